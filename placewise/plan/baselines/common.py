"""What the baselines share: the devices they may use, the unit chain they cut, and honest scoring."""

from __future__ import annotations

from typing import Mapping

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.cost import evaluate
from placewise.plan.plan import Plan, plan_from_assignment
from placewise.plan.units import Units, simplify


def accelerators(cluster: Cluster, method: str) -> list[Device]:
    devices = [d for d in cluster.devices() if cluster.kind(d.kind).accelerator]
    if not devices:
        raise PlacewiseError(f"{method} places on accelerators only and the cluster has none; give --accelerators of at least 1")
    return devices


def units(graph: OpGraph, cluster: Cluster) -> Units:
    """The graph's units (colocation classes with forward cycles fused), numbered in a topological order.

    Cutting this order into consecutive runs always gives a contiguous split, with every backward
    node beside its forward node: the "linearized" order that the chain baselines cut.
    """
    return simplify(graph, cluster)


def chain_assignment(graph: OpGraph, u: Units, cuts: list[int], devices: list[Device]) -> dict[int, Device]:
    """Units [cuts[s], cuts[s+1]) go to devices[s]."""
    out = {}
    for s in range(len(cuts) - 1):
        for k in range(cuts[s], cuts[s + 1]):
            for i in u.members[k]:
                out[graph.nodes[i].id] = devices[s]
    return out


def score(graph: OpGraph, cluster: Cluster, assignment: Mapping[int, Device], *, solver: str, seconds: float,
          objective: str, notes: dict | None = None) -> Plan:
    """Score with the cost model as a contiguous split; a split that is not contiguous is scored as
    one that need not be (plan.contiguous False), so its row says what it is instead of failing."""
    contiguous = not any(v.kind == "contiguity" for v in evaluate(graph, cluster, assignment).violations)
    return plan_from_assignment(graph, cluster, assignment, solver=solver, seconds=seconds, objective=objective,
                                contiguous=contiguous, notes=notes)
