"""Baselines that need no search: everything on one accelerator, and a given (expert) split."""

from __future__ import annotations

import time

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.baselines.common import score
from placewise.plan.options import ExpertOptions, SolveOptions
from placewise.plan.plan import Plan, load_split


def one_accelerator(graph: OpGraph, cluster: Cluster, options: SolveOptions) -> Plan:
    """Everything on the first accelerator, except operators it cannot run, which go to the first CPU."""
    start = time.perf_counter()
    acc = next((k for k in cluster.kinds if k.accelerator and k.count > 0), None)
    cpu = next((k for k in cluster.kinds if not k.accelerator and k.count > 0), None)
    assignment = {}
    for n in graph.nodes:
        home = acc if (acc is not None and n.on_accelerator) or cpu is None else cpu
        assignment[n.id] = Device(home.name, 0)
    return score(graph, cluster, assignment, solver="one-accelerator", seconds=time.perf_counter() - start,
                 objective=options.objective)


def expert(graph: OpGraph, cluster: Cluster, options: ExpertOptions) -> Plan:
    """A split given as a file (`options.split`): the paper's human-expert splits, or any plan.

    A forward-only split of a training graph is completed by colocation (backward beside forward).
    """
    path = options.split
    if not path:
        raise PlacewiseError("the expert baseline needs a split file; give --expert SPLIT.json")
    start = time.perf_counter()
    assignment = load_split(path, graph)
    return score(graph, cluster, assignment, solver="expert", seconds=time.perf_counter() - start,
                 objective=options.objective, notes={"split": str(path)})
