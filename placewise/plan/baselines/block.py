"""Balanced block partitions of a topological order, as GPipe/torchgpipe and DeepSpeed cut models.

The units (see `common.units`) are taken in a topological order and cut into at most k consecutive
blocks, one per accelerator, so that the heaviest block is as light as possible (an exact min-max
linear partition). What "heavy" means is the method's choice, never the cost model's:

- `block-time`: accelerator time (torchgpipe's `balance_by_time`);
- `block-params`: bytes held (DeepSpeed's `partition_method="parameters"`; our graphs carry one
  memory figure per operator, its weights, plus for PipeDream profiles its activations);
- `block-uniform`: number of forward operators (DeepSpeed's `"uniform"`: layers per stage).

Transfers and memory limits are ignored when cutting, as those tools do; the result is then scored
by the cost model, and a block over an accelerator's memory makes the row infeasible.
"""

from __future__ import annotations

import time

import numpy as np

from placewise.graph import Cluster, OpGraph
from placewise.plan.baselines.common import accelerators, chain_assignment, score, units
from placewise.plan.plan import Plan


def min_max_cuts(weights: np.ndarray, parts: int) -> list[int]:
    """Cut points 0 = c0 <= c1 <= ... <= c_parts = n minimising the largest block sum (exact DP)."""
    n = len(weights)
    prefix = np.concatenate([[0.0], np.cumsum(weights)])
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((parts, n + 1), dtype=np.int64)
    for s in range(parts):
        new = np.empty(n + 1)
        for j in range(n + 1):
            # The last block is [i, j); the first minimiser keeps the cuts early and deterministic.
            candidates = np.maximum(best[:j + 1], prefix[j] - prefix[:j + 1])
            i = int(np.argmin(candidates))
            new[j], choice[s, j] = candidates[i], i
        best = new
    cuts = [n]
    for s in range(parts - 1, -1, -1):
        cuts.append(int(choice[s, cuts[-1]]))
    return cuts[::-1]


def _block(graph: OpGraph, cluster: Cluster, options, method: str, weight: str) -> Plan:
    start = time.perf_counter()
    devices = accelerators(cluster, method)
    u = units(graph, cluster)
    if weight == "time":
        w = u.acc_time
    elif weight == "params":
        w = u.memory
    else:
        forward = ~graph.is_backward
        w = np.array([sum(1 for i in m if forward[i]) for m in u.members], dtype=float)
    cuts = min_max_cuts(np.asarray(w, dtype=float), len(devices))
    assignment = chain_assignment(graph, u, cuts, devices)
    return score(graph, cluster, assignment, solver=method, seconds=time.perf_counter() - start,
                 objective=options.objective, notes={"balanced_by": weight})


def block_time(graph: OpGraph, cluster: Cluster, options) -> Plan:
    return _block(graph, cluster, options, "block-time", "time")


def block_params(graph: OpGraph, cluster: Cluster, options) -> Plan:
    return _block(graph, cluster, options, "block-params", "params")


def block_uniform(graph: OpGraph, cluster: Cluster, options) -> Plan:
    return _block(graph, cluster, options, "block-uniform", "uniform")
