"""PipeDream's planner as a straight pipeline: a DP over the prefixes of a linearized order.

PipeDream (Narayanan et al., SOSP 2019; `optimizer/optimizer_graph_hierarchical.py`) runs a DP
whose states are downsets of the layer graph, each stage being the difference of two of them, and
the pipeline time is the slowest stage. Without replication (`--straight_pipeline`) a stage runs
on one worker, and its time is its forward plus backward compute; PipeDream's default run ignores
activation transfers (no `--activation_compression_ratio`). The paper we reproduce ran it on a
linearized order (its own code: `dp.cpp -pipeDream` contracts and linearizes the graph, then cuts
prefixes), which keeps the DP quadratic where the number of downsets explodes (Inception).

Here: the units (see `common.units`, each forward node with its backward nodes) in one topological
order; the DP picks, for accelerators in order, consecutive runs of units minimising the largest
stage time. `pipedream` counts a stage's time as the cost model's accelerator load (compute plus
the transfers of outputs crossing the stage's boundary); `pipedream-nocomm` as compute only, which
is PipeDream's default objective. Memory limits are respected (PipeDream's `--use_memory_constraint`
in the cost model's terms); CPUs are not used, as PipeDream plans for GPUs only. The plan is then
scored by the cost model.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from numba import njit

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.allreduce import PIPEDREAM, AllReduce
from placewise.plan.baselines.common import accelerators, chain_assignment, score, units
from placewise.plan.cost import MEMORY_TOLERANCE, complete_by_colocation
from placewise.plan.csr import csr
from placewise.plan.options import PipeDreamOptions
from placewise.plan.plan import Plan
from placewise.plan.predict import cluster_link
from placewise.plan.replicas import replicated_plan, stage_assignment, unit_parameter_bytes


@njit(cache=True)
def _segment_transfers(unit_ptr, unit_members, n_nodes, pred_ptr, pred, out_degree, cost):
    """T[i, j]: transfer cost paid by the set of units i..j-1 (cost model rule), for i < j."""
    n_units = unit_ptr.shape[0] - 1
    out = np.zeros((n_units + 1, n_units + 1))
    inside = np.zeros(n_nodes, dtype=np.bool_)
    succ_inside = np.zeros(n_nodes, dtype=np.int64)
    paying = np.zeros(n_nodes, dtype=np.bool_)
    for i in range(n_units):
        inside[:] = False
        succ_inside[:] = 0
        paying[:] = False
        total = 0.0
        for j in range(i, n_units):
            for k in range(unit_ptr[j], unit_ptr[j + 1]):
                x = unit_members[k]
                inside[x] = True
                for q in range(pred_ptr[x], pred_ptr[x + 1]):
                    succ_inside[pred[q]] += 1
            # Re-derive the payment of the nodes whose status may have changed.
            for k in range(unit_ptr[j], unit_ptr[j + 1]):
                x = unit_members[k]
                now = succ_inside[x] < out_degree[x]
                if now != paying[x]:
                    total += cost[x] if now else -cost[x]
                    paying[x] = now
                for q in range(pred_ptr[x], pred_ptr[x + 1]):
                    w = pred[q]
                    now = succ_inside[w] < out_degree[w] if inside[w] else succ_inside[w] > 0
                    if now != paying[w]:
                        total += cost[w] if now else -cost[w]
                        paying[w] = now
            out[i, j + 1] = total
    return out


def _stage_times(graph: OpGraph, u, kind: DeviceKind, transfers: bool) -> np.ndarray:
    """[i, j]: the time of units i..j-1 as one stage on a device of `kind` (compute over its speed,
    plus the cost model's transfers when `transfers`); infinite for empty segments and those that do
    not fit (memory, unsupported operators)."""
    n = u.count
    acc_prefix = np.concatenate([[0.0], np.cumsum(u.acc_time)])
    mem_prefix = np.concatenate([[0.0], np.cumsum(u.memory)])
    bad_prefix = np.concatenate([[0], np.cumsum(~u.supported)])
    compute = acc_prefix[None, :] - acc_prefix[:, None]  # [i, j]: units i..j-1
    memory = mem_prefix[None, :] - mem_prefix[:, None]
    unsupported = (bad_prefix[None, :] - bad_prefix[:, None]) > 0
    empty = ~np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    if transfers:
        pred_ptr, pred = csr(graph.pred)
        out_degree = np.array([len(s) for s in graph.succ], dtype=np.int64)
        transfer = _segment_transfers(*csr(u.members), len(graph.nodes), pred_ptr, pred, out_degree, graph.out_cost)
    else:
        transfer = 0.0
    stage = compute / kind.speed + transfer
    limit = np.inf if kind.memory is None else kind.memory * (1 + MEMORY_TOLERANCE)
    stage[empty | unsupported | (memory > limit)] = np.inf
    return stage


def _plan(graph: OpGraph, cluster: Cluster, options, method: str, transfers: bool) -> Plan:
    start = time.perf_counter()
    devices = accelerators(cluster, method)
    u = units(graph, cluster)
    n = u.count
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(devices), n + 1), dtype=np.int64)
    stages = {}
    for s, dev in enumerate(devices):
        if dev.kind not in stages:
            stages[dev.kind] = _stage_times(graph, u, cluster.kind(dev.kind), transfers)
        stage = stages[dev.kind].copy()
        stage[np.diag_indices(n + 1)] = 0.0  # a device may stay empty
        candidates = np.maximum(best[:, None], stage)
        choice[s] = np.argmin(candidates, axis=0)
        best = candidates[choice[s], np.arange(n + 1)]
    if not np.isfinite(best[n]):
        raise PlacewiseError(f"{method}: no cut of the linearized order into {len(devices)} stages fits the accelerators "
                             "(memory or unsupported operators); add accelerators or memory, or use dp")
    cuts = [n]
    for s in range(len(devices) - 1, -1, -1):
        cuts.append(int(choice[s, cuts[-1]]))
    assignment = chain_assignment(graph, u, cuts[::-1], devices)
    return score(graph, cluster, assignment, solver=method, seconds=time.perf_counter() - start,
                 objective=options.objective, notes={"transfers": transfers, "planner_max_stage": float(best[n])})


def _replicated_stage_times(graph: OpGraph, cluster: Cluster, u, stage: np.ndarray, max_r: int,
                            allreduce: AllReduce) -> list[np.ndarray]:
    """[r][i, j]: the time of units i..j-1 on r replicas (r = 1..max_r; index 0 unused), PipeDream's
    `(compute + 4 (r-1) P / (B r)) / r` through `cost.replicated_load`'s rule, P the segment's
    parameter bytes; infinite where a segment's parameter bytes are not all known."""
    unit_params, unit_unknown = unit_parameter_bytes(graph, u.unit_of, u.count)
    p_prefix = np.concatenate([[0.0], np.cumsum(unit_params)])
    seg_params = p_prefix[None, :] - p_prefix[:, None]
    q_prefix = np.concatenate([[0.0], np.cumsum(unit_unknown)])
    replicable = (q_prefix[None, :] - q_prefix[:, None]) < 0.5
    link = cluster_link(graph, cluster)
    out = [stage, stage]
    for r in range(2, max_r + 1):
        coef, const = allreduce.linear(r, link.bandwidth, link.latency)
        out.append(np.where(replicable, stage / r + coef * seg_params + const, np.inf))
    return out


def _hybrid_cuts(times: list[np.ndarray], machines: int) -> tuple[float, list[tuple[int, int, int]]]:
    """PipeDream's hierarchical recurrence on one level, on a chain: A[m][j], the least time per
    minibatch of the first j units on exactly m machines, is min over k < j and m' <= m of
    max(A[m - m'][k], T[m'][k, j]). Returns the value and (first unit, end unit, replicas) per stage."""
    n = times[1].shape[0] - 1
    best = np.full((machines + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    arg = np.zeros((machines + 1, n + 1, 2), dtype=np.int64)
    for m in range(1, machines + 1):
        for r in range(1, m + 1):
            candidates = np.maximum(best[m - r][:, None], times[r])
            k = np.argmin(candidates, axis=0)
            value = candidates[k, np.arange(n + 1)]
            better = value < best[m]
            best[m, better] = value[better]
            arg[m, better] = np.stack([k, np.full(n + 1, r)], axis=1)[better]
    stages, j, m = [], n, machines
    while j > 0 and np.isfinite(best[machines, n]):
        k, r = (int(x) for x in arg[m, j])
        stages.append((k, j, r))
        j, m = k, m - r
    return float(best[machines, n]), stages[::-1]


def pipedream_hybrid(graph: OpGraph, cluster: Cluster, options: PipeDreamOptions) -> Plan:
    """PipeDream's planner with replication (`optimizer_graph_hierarchical.py` without
    `--straight_pipeline`): on the linearized units, every stage chooses how many of the accelerators
    replicate it, all of them used (PipeDream's default, no `--use_fewer_machines`). Stage time as
    in `pipedream` (with the cost model's transfers unless `options.transfers` is False) shared by
    the replicas, plus the all-reduce of `options.allreduce` (PipeDream's by default). The plan is
    scored by the cost model with the same all-reduce model."""
    start = time.perf_counter()
    devices = accelerators(cluster, "pipedream-hybrid")
    kinds = {d.kind for d in devices}
    if len(kinds) > 1:
        raise PlacewiseError("pipedream-hybrid plans for one kind of accelerator, as PipeDream does; the cluster has "
                             f"{', '.join(sorted(kinds))}: use dp --max-replicas for mixed kinds")
    kind = cluster.kind(devices[0].kind)
    u = units(graph, cluster)
    stage = _stage_times(graph, u, kind, bool(options.transfers))
    value, stages = _hybrid_cuts(_replicated_stage_times(graph, cluster, u, stage, len(devices), options.allreduce),
                                 len(devices))
    if not np.isfinite(value):
        raise PlacewiseError(f"pipedream-hybrid: no cut of the linearized order onto {len(devices)} accelerators fits "
                             "(memory or unsupported operators); add accelerators or memory, or use dp")
    assignment, replicas = stage_assignment(graph, u.members, [kind.name],
                                            ((0, r, range(first, end)) for first, end, r in stages))
    return replicated_plan(graph, cluster, assignment, replicas, options.allreduce, solver="pipedream-hybrid",
                           seconds=time.perf_counter() - start, objective=options.objective,
                           notes={"transfers": bool(options.transfers), "planner_max_stage": value})


def pipedream(graph: OpGraph, cluster: Cluster, options: PipeDreamOptions) -> Plan:
    """PipeDream's straight-pipeline DP; `options.transfers = False` drops transfers from its objective."""
    transfers = bool(options.transfers)
    return _plan(graph, cluster, options, "pipedream" if transfers else "pipedream-nocomm", transfers)


def pipedream_nocomm(graph: OpGraph, cluster: Cluster, options) -> Plan:
    """PipeDream's default objective: stage time is compute only."""
    return _plan(graph, cluster, options, "pipedream-nocomm", False)


def pipedream_split(graph: OpGraph, cluster: Cluster, replicas: Sequence[int],
                    allreduce: AllReduce = AllReduce(PIPEDREAM)) -> Plan:
    """PipeDream's own split (the `stage_id` its planner wrote into a profile, `graph.split`) as a plan,
    stage s replicated `replicas[s]` times on the first accelerator kind (e.g. 13-1-1-1 workers) and
    scored with `allreduce`. PipeDream's split files do not record replica counts, so they are given."""
    if graph.split is None:
        raise PlacewiseError(f"{graph.name or 'the graph'} carries no PipeDream split (`-- stage_id=S`); give a "
                             "partitioned profile")
    stage_of = dict(graph.split)
    stages = sorted(set(stage_of.values()))
    if len(replicas) != len(stages) or any(r < 1 for r in replicas):
        raise PlacewiseError(f"PipeDream's split has {len(stages)} stages; give that many replica counts of at least 1, "
                             f"not {list(replicas)}")
    kind = cluster.kind(accelerators(cluster, "pipedream split")[0].kind)
    firsts = np.concatenate([[0], np.cumsum(replicas)[:-1]])
    device = {s: Device(kind.name, int(first)) for s, first in zip(stages, firsts)}
    assignment = complete_by_colocation(graph, {n: device[s] for n, s in stage_of.items()})
    return replicated_plan(graph, cluster, assignment, {device[s]: int(r) for s, r in zip(stages, replicas)}, allreduce,
                           solver="pipedream-split", seconds=0.0, notes={"replicas": "-".join(map(str, replicas))})
