"""Simple baselines that need no search."""

from __future__ import annotations

import time

from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.plan import Plan, plan_from_assignment


def one_accelerator(graph: OpGraph, cluster: Cluster, options) -> Plan:
    """Everything on the first accelerator, except operators it cannot run, which go to the first CPU."""
    start = time.perf_counter()
    acc = next((k for k in cluster.kinds if k.accelerator and k.count > 0), None)
    cpu = next((k for k in cluster.kinds if not k.accelerator and k.count > 0), None)
    assignment = {}
    for n in graph.nodes:
        home = acc if (acc is not None and n.on_accelerator) or cpu is None else cpu
        assignment[n.id] = Device(home.name, 0)
    return plan_from_assignment(graph, cluster, assignment, solver="one-accelerator",
                                seconds=time.perf_counter() - start, objective=options.objective)
