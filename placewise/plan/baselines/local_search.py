"""The paper's local search (`dp.cpp -localSearch N`): steepest descent from random starts.

Each restart gives every unit (colocation class, see `common.units`) a uniformly random accelerator,
then repeatedly makes the single move (one unit to another accelerator) that lowers the max-load the
most, until no move lowers it; the best of N restarts wins (the paper used 10). Like the paper's, it
ignores memory and contiguity and uses accelerators only; the split is scored by the cost model as a
non-contiguous one (infeasible where memory is exceeded). Seeded: `options.seed` fixes the starts;
`options.restarts` sets N; `options.time_limit` stops it early with the best so far.

A move changes only the loads of the unit's old and new device, so only moves touching a device at
the max-load can lower it; the scan skips the others.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.baselines._incremental import DeviceTable, State, move_delta, relocate
from placewise.plan.baselines.common import accelerators, score, units
from placewise.plan.csr import csr
from placewise.plan.options import LocalSearchOptions
from placewise.plan.plan import Plan

# A move must lower the max-load by more than this fraction (the paper's code: 1e-5 absolute).
IMPROVEMENT = 1e-9


@njit(cache=True)
def _best_move(unit_ptr, unit_members, unit_device, device, count, placed, load, pred_ptr, pred, cost,
               acc_time, cpu_time, accelerator, pays_transfers, speed, mark, stamp):
    top = load.max()
    at_max = load >= top * (1 - 1e-12)
    best, best_unit, best_target = np.inf, -1, -1
    for k in range(unit_ptr.shape[0] - 1):
        a = unit_device[k]
        nodes = unit_members[unit_ptr[k]:unit_ptr[k + 1]]
        for b in range(load.shape[0]):
            if b == a or not (at_max[a] or at_max[b]):
                continue
            delta = move_delta(nodes, b, device, count, placed, load, pred_ptr, pred, cost, acc_time, cpu_time,
                               accelerator, pays_transfers, speed, mark, stamp)
            value = (load + delta).max()
            if value < best:
                best, best_unit, best_target = value, k, b
    return best, best_unit, best_target


def local_search(graph: OpGraph, cluster: Cluster, options: LocalSearchOptions) -> Plan:
    start = time.perf_counter()
    devices = accelerators(cluster, "local-search")
    restarts = int(options.restarts)
    if restarts < 1:
        raise PlacewiseError(f"local-search: restarts is {restarts}; use 1 or more")
    u = units(graph, cluster)
    bad = [graph.nodes[u.members[k][0]].id for k in range(u.count) if not u.supported[k]]
    if bad:
        raise PlacewiseError(f"local-search places on accelerators only, but node {bad[0]} is not supported on one; "
                             "use dp or greedy")
    ptr, members = csr(u.members)
    table = DeviceTable(cluster, devices)
    starts = np.random.default_rng(options.seed).integers(0, len(devices), size=(restarts, u.count))
    best_value, best_device, steps, done = np.inf, None, 0, 0
    for start_units in starts:
        state = State(graph, table)
        for k in range(u.count):
            relocate(members[ptr[k]:ptr[k + 1]], int(start_units[k]), state.device, state.count, state.placed,
                     state.pred_ptr, state.pred)
        # Loads from scratch once; moves then keep them current.
        unit_device = start_units.astype(np.int64).copy()
        state.load[:] = 0.0
        state.load += _loads_of(state, graph)
        while True:
            value, k, b = _best_move(ptr, members, unit_device, *state.args())
            if k < 0 or value >= state.load.max() * (1 - IMPROVEMENT):
                break
            state.move(members[ptr[k]:ptr[k + 1]], int(b))
            unit_device[k] = b
            steps += 1
            if options.time_limit is not None and time.perf_counter() - start > options.time_limit:
                break
        done += 1
        if state.load.max() < best_value:
            best_value, best_device = float(state.load.max()), state.device.copy()
        if options.time_limit is not None and time.perf_counter() - start > options.time_limit:
            break
    assignment = {graph.nodes[i].id: devices[int(d)] for i, d in enumerate(best_device)}
    return score(graph, cluster, assignment, solver="local-search", seconds=time.perf_counter() - start,
                 objective=options.objective,
                 notes={"seed": options.seed, "restarts": restarts, "restarts_done": done, "moves": steps})


def _loads_of(state: State, graph: OpGraph) -> np.ndarray:
    """Every device's load for the state's full placement, by the same rule as the moves."""
    table = state.table
    load = np.zeros(len(table.devices))
    for d in range(len(load)):
        on = state.device == d
        time_on = graph.acc_time if table.accelerator[d] else graph.cpu_time
        load[d] = time_on[on].sum() / table.speed[d]
        if table.pays_transfers[d]:
            own = on & (state.placed > state.count[:, d])
            other = ~on & (state.device >= 0) & (state.count[:, d] > 0)
            load[d] += graph.out_cost[own | other].sum()
    return load
