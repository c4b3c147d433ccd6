"""The latency greedy baseline of the paper's appendix (Tarnawski et al., NeurIPS 2020).

Operators that must share a device (a colocation class), and classes that reach each other, form
inseparable blocks; the blocks are put in topological order and poured into the accelerators one
after another: an accelerator takes consecutive blocks while they fit in its memory, a block that
fits on no accelerator (or holds an operator no accelerator supports) goes to the CPUs, and once
every accelerator is used the rest goes to the CPUs. Each accelerator therefore holds an interval
of one topological order, so its set is convex and the blocks never wait on each other in a cycle.
"""

from __future__ import annotations

import time

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.options import SolveOptions
from placewise.plan.plan import Plan, plan_from_assignment
from placewise.plan.units import inseparable_blocks


def greedy_assignment(graph: OpGraph, cluster: Cluster) -> dict[int, Device]:
    """The greedy split: consecutive blocks fill each accelerator; what does not fit runs on a CPU."""
    accelerators = [d for d in cluster.devices() if cluster.kind(d.kind).accelerator]
    cpu_kinds = [k for k in cluster.kinds if not k.accelerator and k.count > 0]
    # CPU cores run in parallel in the latency model, so every CPU node goes to the fastest kind.
    cpu_kind = max(cpu_kinds, key=lambda k: k.speed, default=None)
    cpu_load = np.zeros(cpu_kind.count if cpu_kind else 0)
    assignment: dict[int, Device] = {}

    def to_cpu(block: list[int]) -> None:
        if cpu_kind is None:
            ids = [graph.nodes[i].id for i in block[:4]]
            raise PlacewiseError(f"nodes {ids} fit on no accelerator (memory or support) and the cluster has no CPU; "
                                 "add a CPU (--cpus 1) or accelerator memory (--memory)")
        # Spread CPU nodes over the cores (least loaded first): latency does not care, max-load does.
        for i in block:
            core = int(np.argmin(cpu_load))
            cpu_load[core] += graph.cpu_time[i] / cpu_kind.speed
            assignment[graph.nodes[i].id] = Device(cpu_kind.name, core)

    blocks = inseparable_blocks(graph)
    sizes = [float(graph.memory[b].sum()) for b in blocks]
    movable = [bool(graph.supported[b].all()) for b in blocks]
    nxt, acc = 0, 0
    while nxt < len(blocks):
        kind = cluster.kind(accelerators[acc].kind) if acc < len(accelerators) else None
        limit = np.inf if kind is None or kind.memory is None else kind.memory
        if kind is None or not movable[nxt] or sizes[nxt] > limit:
            to_cpu(blocks[nxt])
            nxt += 1
            continue
        used = 0.0
        while nxt < len(blocks) and movable[nxt] and used + sizes[nxt] <= limit:
            used += sizes[nxt]
            for i in blocks[nxt]:
                assignment[graph.nodes[i].id] = accelerators[acc]
            nxt += 1
        acc += 1
    return assignment


def solve(graph: OpGraph, cluster: Cluster, options: SolveOptions) -> Plan:
    """Registry entry `greedy-latency`: the greedy split, scored by the cost model."""
    start = time.perf_counter()
    assignment = greedy_assignment(graph, cluster)
    # The latency model lets CPU nodes interleave with accelerator blocks, so device sets need not chain.
    return plan_from_assignment(graph, cluster, assignment, solver="greedy-latency", seconds=time.perf_counter() - start,
                                objective=options.objective, contiguous=options.contiguous and options.objective != "latency")
