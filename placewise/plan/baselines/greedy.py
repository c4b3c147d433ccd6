"""Greedy list scheduling for throughput: each unit, in topological order, goes where the max-load
grows least.

Units (colocation classes, see `common.units`) are taken in a topological order; each is tried on
every device that supports it and has memory left, and placed where the resulting max-load (the cost
model's, transfers included, counted over the units placed so far) is smallest, ties broken by the
smaller load on that device and then by device order. This is the classic makespan greedy made
aware of transfers; it may give non-contiguous splits (scored as such). The paper's latency greedy,
which fills accelerators by memory, is a different baseline (`placewise.plan.latency_greedy`).
"""

from __future__ import annotations

import time

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.baselines._incremental import DeviceTable, State
from placewise.plan.baselines.common import score, units
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.plan import Plan


def greedy(graph: OpGraph, cluster: Cluster, options) -> Plan:
    start = time.perf_counter()
    devices = cluster.devices()
    table = DeviceTable(cluster, devices)
    state = State(graph, table)
    memory_used = np.zeros(len(devices))
    u = units(graph, cluster)
    for k, members in enumerate(u.members):
        nodes = np.array(members, dtype=np.int64)
        best = None
        for d in range(len(devices)):
            if (table.accelerator[d] and not u.supported[k]) or \
                    memory_used[d] + u.memory[k] > table.memory[d] * (1 + MEMORY_TOLERANCE):
                continue
            new_load = state.load + state.delta(nodes, d)
            key = (float(new_load.max()), float(new_load[d]), d)
            if best is None or key < best:
                best = key
        if best is None:
            first = graph.nodes[members[0]].id
            raise PlacewiseError(f"greedy: the unit holding node {first} fits on no device (memory {u.memory[k]:.6g} bytes"
                                 f"{'' if u.supported[k] else ', not supported on an accelerator'}); add CPUs or memory")
        state.move(nodes, best[2])
        memory_used[best[2]] += u.memory[k]
    assignment = {graph.nodes[i].id: devices[int(d)] for i, d in enumerate(state.device)}
    return score(graph, cluster, assignment, solver="greedy", seconds=time.perf_counter() - start,
                 objective=options.objective)
