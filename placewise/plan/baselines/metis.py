"""A real graph partitioner: METIS (via pymetis), as the paper used Scotch.

As in the paper's Scotch baseline (`dp.cpp -scotch`), the units (colocation classes, see
`common.units`) become vertices weighted by accelerator time, joined by undirected edges weighted
by the transfer costs of the outputs crossing between them; METIS cuts them into k balanced parts
with a small weighted cut, one part per accelerator. It knows nothing of memory, CPUs or
contiguity, so the split is scored as a non-contiguous one and is infeasible when a part does not
fit in its accelerator's memory.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pymetis

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.baselines.common import accelerators, score, units
from placewise.plan.plan import Plan

# METIS takes integer weights; scale the sums to this so rounding is negligible and nothing overflows.
WEIGHT_SCALE = 1e7


def metis(graph: OpGraph, cluster: Cluster, options) -> Plan:
    start = time.perf_counter()
    devices = accelerators(cluster, "metis")
    u = units(graph, cluster)
    bad = [graph.nodes[u.members[k][0]].id for k in range(u.count) if not u.supported[k]]
    if bad:
        raise PlacewiseError(f"metis places on accelerators only, but node {bad[0]} is not supported on one; use dp or greedy")
    # Edge weight between two units: the output costs of the nodes of one read by the other, both ways.
    weight: dict[tuple[int, int], float] = defaultdict(float)
    readers: dict[int, set[int]] = defaultdict(set)
    for a, b in graph.edge_array:
        ua, ub = int(u.unit_of[a]), int(u.unit_of[b])
        if ua != ub:
            readers[int(a)].add(ub)
    for a, targets in readers.items():
        for ub in targets:
            ua = int(u.unit_of[a])
            weight[min(ua, ub), max(ua, ub)] += float(graph.out_cost[a])
    if len(devices) == 1 or u.count <= 1:
        parts = np.zeros(u.count, dtype=np.int64)
    else:
        adjacency: list[list[tuple[int, float]]] = [[] for _ in range(u.count)]
        for (a, b), w in sorted(weight.items()):
            adjacency[a].append((b, w))
            adjacency[b].append((a, w))
        edge_total = max(sum(weight.values()), 1e-300)
        vertex_total = max(float(u.acc_time.sum()), 1e-300)
        xadj = np.zeros(u.count + 1, dtype=np.int64)
        for k, nb in enumerate(adjacency):
            xadj[k + 1] = xadj[k] + len(nb)
        adjncy = [b for nb in adjacency for b, _ in nb]
        # Every edge keeps weight >= 1 so that free edges still hold neighbours together a little.
        eweights = [max(1, round(w / edge_total * WEIGHT_SCALE)) for nb in adjacency for _, w in nb]
        vweights = [round(t / vertex_total * WEIGHT_SCALE) for t in u.acc_time]
        result = pymetis.part_graph(len(devices), pymetis.CSRAdjacency(xadj.tolist(), adjncy), vweights=vweights,
                                    eweights=eweights or None, options=pymetis.Options(seed=options.seed))
        parts = np.asarray(result[1], dtype=np.int64)
    assignment = {graph.nodes[i].id: devices[int(parts[u.unit_of[i]])] for i in range(len(graph.nodes))}
    return score(graph, cluster, assignment, solver="metis", seconds=time.perf_counter() - start,
                 objective=options.objective, notes={"seed": options.seed})
