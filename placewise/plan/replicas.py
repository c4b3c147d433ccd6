"""Scoring a split with replicated stages: the cost model's `evaluate` plus `cost.replicated_load`.

A split with replicated stages is a node -> first device map (as for any split) and, per replicated
stage, its replica count r: the stage runs on devices index .. index + r - 1 of its kind, which no
other stage may use. Its all-reduce moves the stage's parameter bytes (the nodes' `parameters`;
a stage whose nodes do not all say cannot be replicated) over the cluster's link in the graph's
time unit (`plan.predict.cluster_link`), costed by `plan.allreduce.AllReduce`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Mapping, Sequence

import numpy as np

from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.allreduce import AllReduce
from placewise.plan.cost import Evaluation, Violation, evaluate, replicated_load
from placewise.plan.plan import PLAN_FORMAT, Plan, plan_from_assignment
from placewise.plan.predict import cluster_link


def parameter_bytes(graph: OpGraph, nodes: Iterable[int]) -> float | None:
    """The parameter bytes of a stage's nodes (ids); None when some node does not say."""
    values = [graph.node(n).parameters for n in nodes]
    return None if any(v is None for v in values) else float(sum(values))


def unit_parameter_bytes(graph: OpGraph, unit_of: np.ndarray, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit (node k of `graph` in unit `unit_of[k]`): its parameter bytes, and how many of its
    nodes do not say them (a set holding such a node cannot be costed replicated)."""
    raw = [n.parameters for n in graph.nodes]
    params = np.array([0.0 if p is None else p for p in raw], dtype=float)
    unknown = np.array([p is None for p in raw], dtype=float)
    return (np.bincount(unit_of, weights=params, minlength=n_units),
            np.bincount(unit_of, weights=unknown, minlength=n_units))


def stage_assignment(graph: OpGraph, members: Sequence[Sequence[int]], kinds: Sequence[str],
                     stages: Iterable[tuple[int, int, Iterable[int]]]) -> tuple[dict[int, Device], dict[Device, int]]:
    """Node id -> first device, and first device -> replicas, for stages (kind index into `kinds`,
    replicas, units) in pipeline order; `members[u]`: unit u's nodes (dense indices of `graph`).
    Each kind's devices are taken in order: a stage on r of them takes the next r."""
    assignment: dict[int, Device] = {}
    replicas: dict[Device, int] = {}
    used = [0] * len(kinds)
    for t, r, unit_set in stages:
        device = Device(kinds[t], used[t])
        used[t] += r
        replicas[device] = r
        for u in unit_set:
            for i in members[u]:
                assignment[graph.nodes[i].id] = device
    return assignment, replicas


def evaluate_replicated(graph: OpGraph, cluster: Cluster, assignment: Mapping[int, Device],
                        replicas: Mapping[Device, int], allreduce: AllReduce = AllReduce(), *,
                        contiguous: bool = True, replicate: bool = True) -> Evaluation:
    """`evaluate`, with the stage on each device of `replicas` (its first device) replicated that
    many times; violations also name replicas that overlap another stage, run past the kind's count,
    or need parameter bytes the graph does not give. Without replicas above 1 it is `evaluate`."""
    ev = evaluate(graph, cluster, assignment, contiguous=contiguous, replicate=replicate)
    wanted = {Device(*d): r for d, r in replicas.items() if r != 1}
    if not wanted:
        return ev
    link = cluster_link(graph, cluster)
    violations = list(ev.violations)
    held = {d.device for d in ev.devices}
    # Device -> the first device of the stage running on it: every stage's own first, then the replicas.
    taken: dict[Device, Device] = {d: d for d in held}
    for first in held:
        for k in range(1, wanted.get(first, 1) if isinstance(wanted.get(first, 1), int) else 1):
            taken.setdefault(Device(first.kind, first.index + k), first)
    for first, r in sorted(wanted.items()):
        problem = _replica_problem(cluster, first, r, held, taken)
        if problem:
            violations.append(Violation("replicas", problem))
    loads = []
    for dl in ev.devices:
        r = wanted.get(dl.device, 1)
        if r > 1:
            nbytes = parameter_bytes(graph, dl.computed)
            if nbytes is None:
                violations.append(Violation("replicas", f"the stage on {dl.device} is replicated {r} times, but not all "
                                            "of its nodes say their parameter bytes, so its all-reduce cannot be "
                                            "costed; profile with `placewise profile` or keep 1 replica"))
                nbytes = 0.0
            dl = replicated_load(dl, r, allreduce.per_unit(nbytes, r, link.bandwidth, link.latency))
        loads.append(dl)
    return replace(ev, devices=tuple(loads), max_load=max((d.load for d in loads), default=0.0),
                   violations=tuple(violations))


def _replica_problem(cluster: Cluster, first: Device, r: int, held: set[Device], taken: dict[Device, Device]
                     ) -> str | None:
    """Why the stage on `first` cannot have `r` replicas; None when it can."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        return f"the stage on {first} has {r!r} replicas; use a whole number of at least 1"
    if first not in held:
        return f"replicas are given for {first}, which holds no stage; give them on a stage's first device"
    count = next((k.count for k in cluster.kinds if k.name == first.kind), 0)
    if first.index + r > count:
        return (f"the stage on {first} needs {r} devices {first.kind}:{first.index}..{first.index + r - 1}, but the "
                f"cluster has {count} {first.kind}; use fewer replicas or more devices")
    clash = [str(d) for k in range(1, r) if (d := Device(first.kind, first.index + k)) in taken and taken[d] != first]
    if clash:
        return f"the stage on {first} is replicated onto {clash[0]}, which another stage uses; renumber the stages"
    return None


def replicated_plan(graph: OpGraph, cluster: Cluster, assignment: Mapping[int, Device], replicas: Mapping[Device, int],
                    allreduce: AllReduce = AllReduce(), *, solver: str, seconds: float, contiguous: bool = True,
                    replicate: bool = True, **plan_fields) -> Plan:
    """The split scored with its replicated stages and wrapped as a Plan (`plan_from_assignment`);
    the all-reduce model is recorded in the notes."""
    ev = evaluate_replicated(graph, cluster, assignment, replicas, allreduce, contiguous=contiguous, replicate=replicate)
    notes = dict(plan_fields.pop("notes", None) or {})
    if any(d.replicas > 1 for d in ev.devices):
        notes["allreduce"] = {"model": allreduce.model, "step_units": allreduce.step_units}
    return plan_from_assignment(graph, cluster, assignment, solver=solver, seconds=seconds, contiguous=contiguous,
                                replicate=replicate, evaluation=ev, notes=notes, **plan_fields)


def split_replicas(data: object) -> tuple[dict[Device, int], AllReduce]:
    """A split file's replicated stages (only a placewise plan records them) and the all-reduce model it
    was planned with (its notes; the ring model when it does not say)."""
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        return {}, AllReduce()
    plan = Plan.from_json(data)
    recorded = plan.notes.get("allreduce")
    allreduce = AllReduce(**recorded) if isinstance(recorded, dict) and set(recorded) <= {"model", "step_units"} \
        else AllReduce()
    return plan.replicas(), allreduce
