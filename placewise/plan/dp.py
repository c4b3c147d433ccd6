"""The exact throughput planner: a DP over the ideals of the forward graph (the paper's algorithm).

A contiguous split is a chain of ideals ∅ = I_0 ⊆ I_1 ⊆ ... ⊆ I_d = all units; device j runs
I_j \\ I_{j-1} (with the backward operators of its units). For every ideal I and every vector s of
how many devices of each kind are still free, `dp[I, s]` is the least max-load of a split of I onto
those devices:

    dp[I, s] = min( dp[I, s - e_t],                                     (leave a device of kind t empty)
                    min over sub-ideals J ⊊ I of max(dp[J, s - e_t], load_t(I \\ J)) )

What makes it fast while staying exact:
- an upper bound U from the same DP restricted to the segments of a few topological orders (exact
  on a chain, cheap: units² pairs); no set of an optimal split has load above U;
- for each ideal I, its sub-ideals J are walked downward from I (removing one maximal unit at a
  time) only while I \\ J could still fit some device under U: compute time, memory and support only
  grow as units are added, so a set that fits nowhere has no superset that fits anywhere;
- the set's load is updated per unit added or removed (compute sums, and transfer per *port*, see
  `ideals.Units`), never recomputed;
- the walk and the DP run compiled (numba, cached on disk).
Every plan is re-scored by the cost model, which must agree with the DP's value.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from numba import njit

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.ideals import DEFAULT_IDEAL_LIMIT, IdealLattice, Units, chain_lattice, enumerate_ideals, simplify
from placewise.plan.plan import Plan, plan_from_assignment

INF = math.inf
# The DP's incremental sums and the cost model's sums round differently; they must agree to this.
AGREEMENT = 1e-9
# Sets are pruned when their compute alone exceeds the bound by more than rounding.
PRUNE_SLACK = 1e-9
# Device-count vectors (product of (count + 1) over kinds) beyond this would make dp too wide.
STATE_LIMIT = 4096
# Ideals processed per compiled call, so that progress can be shown between calls.
CHUNK = 2048


@dataclass(frozen=True)
class Problem:
    """The DP's view of a cluster: per kind, per-unit time, memory limit, whether it pays transfers."""

    kinds: tuple[DeviceKind, ...]  # kinds with at least one device
    time: np.ndarray  # (kinds, units): a unit's compute time on one device of the kind
    accelerator: np.ndarray  # (kinds,) bool
    memory_limit: np.ndarray  # (kinds,) bytes, inf when unlimited
    prev: np.ndarray  # (states, kinds): the state with one device of that kind fewer, -1 if none
    full_state: int


def _problem(units: Units, cluster: Cluster) -> Problem:
    kinds = tuple(k for k in cluster.kinds if k.count > 0)
    if not kinds:
        raise PlacewiseError("the cluster has no devices; give --accelerators and/or --cpus of at least 1")
    radix = [k.count + 1 for k in kinds]
    n_states = int(np.prod(radix))
    if n_states > STATE_LIMIT:
        raise PlacewiseError(
            f"the cluster's device counts ({', '.join(f'{k.count} x {k.name}' for k in kinds)}) give {n_states} device-count "
            f"combinations, over the DP's {STATE_LIMIT}; merge identical kinds or use fewer devices")
    # Mixed radix: state = sum_t used_t * stride_t, so removing one device of kind t subtracts stride_t.
    strides = np.cumprod([1] + radix[:-1])
    prev = np.full((n_states, len(kinds)), -1, dtype=np.int64)
    for s in range(n_states):
        for t, stride in enumerate(strides):
            if (s // stride) % radix[t] > 0:
                prev[s, t] = s - stride
    time_ = np.array([(units.acc_time if k.accelerator else units.cpu_time) / k.speed for k in kinds])
    return Problem(kinds, time_, np.array([k.accelerator for k in kinds]),
                   np.array([INF if k.memory is None else k.memory * (1 + MEMORY_TOLERANCE) for k in kinds]),
                   prev, n_states - 1)


def _check_units_fit(graph: OpGraph, units: Units, problem: Problem) -> None:
    """A unit that fits on no kind of device makes every split infeasible: say which and why."""
    for u in range(units.count):
        fits = False
        for t, kind in enumerate(problem.kinds):
            if units.memory[u] > problem.memory_limit[t]:
                continue
            if kind.accelerator and not units.supported[u]:
                continue
            fits = True
            break
        if fits:
            continue
        members = units.members[u]
        first = graph.nodes[members[0]]
        unsupported = [graph.nodes[i].id for i in members if not graph.supported[i]]
        group = f"node {first.id}" if len(members) == 1 else \
            f"nodes {', '.join(str(graph.nodes[i].id) for i in members[:6])}{' ...' if len(members) > 6 else ''} " \
            f"(one colocation group of {len(members)}, which a contiguous split keeps on one device)"
        has_cpu = any(not k.accelerator for k in problem.kinds)
        if unsupported and not has_cpu:
            raise PlacewiseError(
                f"{group} cannot run on an accelerator (node {unsupported[0]} is not supported there) and the cluster has no "
                "CPU cores; give --cpus 1 or more")
        limits = ", ".join(f"{k.name} {k.memory:.6g}" for k in problem.kinds if k.memory is not None)
        raise PlacewiseError(
            f"{group} needs {units.memory[u]:.6g} bytes, more than any device that could run it holds ({limits}); "
            "raise --memory or add CPU cores")


# ---- the compiled core ------------------------------------------------------------------------------
@njit(cache=True)
def _port_pays(in_owner, count, n_targets):
    if in_owner:
        return count < n_targets
    return count > 0


@njit(cache=True)
def _toggle(u, sign, comp, state, time_, memory, unsupported, in_set, port_count, port_n_targets, port_cost,
            port_owner, own_ptr, own_ports, tgt_ptr, tgt_ports):
    """Add (sign=+1) or remove (sign=-1) unit u from the set; state = [memory, unsupported, transfer]."""
    for t in range(comp.shape[0]):
        comp[t] += sign * time_[t, u]
    state[0] += sign * memory[u]
    state[1] += sign * unsupported[u]
    delta = 0.0
    for k in range(own_ptr[u], own_ptr[u + 1]):
        p = own_ports[k]
        before = _port_pays(in_set[u] == 1, port_count[p], port_n_targets[p])
        after = _port_pays(sign > 0, port_count[p], port_n_targets[p])
        delta += port_cost[p] * (int(after) - int(before))
    in_set[u] = 1 if sign > 0 else 0
    for k in range(tgt_ptr[u], tgt_ptr[u + 1]):
        p = tgt_ports[k]
        owner_in = in_set[port_owner[p]] == 1
        before = _port_pays(owner_in, port_count[p], port_n_targets[p])
        port_count[p] += sign
        after = _port_pays(owner_in, port_count[p], port_n_targets[p])
        delta += port_cost[p] * (int(after) - int(before))
    state[2] += delta


@njit(cache=True)
def _run_chunk(lo, hi, down_ptr, down_ideal, down_unit, time_, accelerator, memory_limit, memory, unsupported,
               port_cost, port_owner, port_n_targets, own_ptr, own_ports, tgt_ptr, tgt_ports, prev, bound, prune,
               dp, arg_ideal, arg_kind, stamp, in_set, port_count, loads, stats):
    """Fill dp rows lo..hi-1 (ideals sorted by size, so every sub-ideal's row is final)."""
    n_kinds = time_.shape[0]
    n_states = prev.shape[0]
    comp = np.zeros(n_kinds)
    state = np.zeros(3)
    stack = np.zeros(64, dtype=np.int64)
    pos = np.zeros(64, dtype=np.int64)
    added = np.zeros(64, dtype=np.int64)
    for root in range(lo, hi):
        for s in range(n_states):
            dp[root, s] = np.inf
            arg_ideal[root, s] = -1
            arg_kind[root, s] = -1
        if root == 0:
            for s in range(n_states):
                dp[root, s] = 0.0
            continue
        comp[:] = 0.0
        state[:] = 0.0
        depth = 0
        stack[0] = root
        pos[0] = down_ptr[root]
        while depth >= 0:
            cur = stack[depth]
            k = pos[depth]
            if k == down_ptr[cur + 1]:
                if depth > 0:
                    _toggle(added[depth], -1, comp, state, time_, memory, unsupported, in_set, port_count,
                            port_n_targets, port_cost, port_owner, own_ptr, own_ports, tgt_ptr, tgt_ports)
                depth -= 1
                continue
            pos[depth] = k + 1
            sub = down_ideal[k]
            if stamp[sub] == root:
                continue
            stamp[sub] = root
            u = down_unit[k]
            _toggle(u, 1, comp, state, time_, memory, unsupported, in_set, port_count,
                    port_n_targets, port_cost, port_owner, own_ptr, own_ports, tgt_ptr, tgt_ports)
            stats[0] += 1
            alive = False
            for t in range(n_kinds):
                if state[0] > memory_limit[t] or (accelerator[t] and state[1] > 0) or comp[t] > prune:
                    loads[t] = np.inf
                    continue
                alive = True
                load = comp[t] + state[2] if accelerator[t] else comp[t]
                loads[t] = load if load <= prune else np.inf
            if not alive:
                _toggle(u, -1, comp, state, time_, memory, unsupported, in_set, port_count,
                        port_n_targets, port_cost, port_owner, own_ptr, own_ports, tgt_ptr, tgt_ports)
                continue
            for s in range(n_states):
                best = dp[root, s]
                for t in range(n_kinds):
                    p = prev[s, t]
                    if p < 0 or loads[t] == np.inf:
                        continue
                    cand = dp[sub, p]
                    if loads[t] > cand:
                        cand = loads[t]
                    if cand < best:
                        best = cand
                        dp[root, s] = cand
                        arg_ideal[root, s] = sub
                        arg_kind[root, s] = t
            depth += 1
            if depth == stack.shape[0]:
                grown = np.zeros(2 * depth, dtype=np.int64)
                grown[:depth] = stack
                stack = grown
                grown = np.zeros(2 * depth, dtype=np.int64)
                grown[:depth] = pos
                pos = grown
                grown = np.zeros(2 * depth, dtype=np.int64)
                grown[:depth] = added
                added = grown
            stack[depth] = sub
            pos[depth] = down_ptr[sub]
            added[depth] = u
        # Leaving devices empty: dp[root, s] <= dp[root, s - e_t], in increasing s.
        for s in range(n_states):
            for t in range(n_kinds):
                p = prev[s, t]
                if p >= 0 and dp[root, p] < dp[root, s]:
                    dp[root, s] = dp[root, p]
                    arg_ideal[root, s] = root
                    arg_kind[root, s] = t


def _csr_by(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ptr, keys + 1, 1)
    return np.cumsum(ptr), values[order].astype(np.int64)


@dataclass
class DPResult:
    value: float
    sets: list[tuple[int, np.ndarray]]  # (kind index, units) per device, in pipeline order
    pairs: int  # ideal pairs whose load was evaluated


def run_dp(units: Units, problem: Problem, lattice: IdealLattice, bound: float = INF, progress=None) -> DPResult:
    """The DP on a lattice (all ideals, or a chain's prefixes) with sets above `bound` left out."""
    n_ideals = lattice.count
    n_units = units.count
    n_ports = len(units.port_cost)
    own_ptr, own_ports = _csr_by(units.port_owner, np.arange(n_ports), n_units)
    port_of_target = np.repeat(np.arange(n_ports), np.diff(units.port_target_ptr))
    tgt_ptr, tgt_ports = _csr_by(units.port_targets, port_of_target, n_units)
    n_states = problem.prev.shape[0]
    dp = np.empty((n_ideals, n_states))
    arg_ideal = np.empty((n_ideals, n_states), dtype=np.int64)
    arg_kind = np.empty((n_ideals, n_states), dtype=np.int64)
    stamp = np.full(n_ideals, -1, dtype=np.int64)
    in_set = np.zeros(n_units, dtype=np.int64)
    port_count = np.zeros(n_ports, dtype=np.int64)
    loads = np.zeros(len(problem.kinds))
    stats = np.zeros(1, dtype=np.int64)
    prune = bound * (1 + PRUNE_SLACK) if math.isfinite(bound) else INF
    unsupported = (~units.supported).astype(np.int64)
    for lo in range(0, n_ideals, CHUNK):
        hi = min(n_ideals, lo + CHUNK)
        _run_chunk(lo, hi, lattice.down_ptr, lattice.down_ideal, lattice.down_unit, problem.time, problem.accelerator,
                   problem.memory_limit, units.memory, unsupported, units.port_cost, units.port_owner,
                   np.diff(units.port_target_ptr), own_ptr, own_ports, tgt_ptr, tgt_ports, problem.prev, bound, prune,
                   dp, arg_ideal, arg_kind, stamp, in_set, port_count, loads, stats)
        if progress is not None:
            progress(hi, n_ideals)
    full = n_ideals - 1
    value = float(dp[full, problem.full_state])
    sets: list[tuple[int, np.ndarray]] = []
    if math.isfinite(value):
        ideal, s = full, problem.full_state
        while ideal != 0:
            sub, t = int(arg_ideal[ideal, s]), int(arg_kind[ideal, s])
            if sub != ideal:
                inside = lattice.bits[ideal] & ~lattice.bits[sub]
                sets.append((t, np.flatnonzero(np.unpackbits(inside.view(np.uint8), bitorder="little"))))
            s = int(problem.prev[s, t])
            ideal = sub
        sets.reverse()
    return DPResult(value, sets, int(stats[0]))


def _topological_orders(units: Units) -> list[np.ndarray]:
    """A few topological orders of the units, for the chain upper bound: the numbering itself and a
    depth-first one that finishes a branch before starting the next (keeps segments compact)."""
    n = units.count
    orders = [np.arange(n)]
    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = np.zeros(n, dtype=np.int64)
    for v, ps in enumerate(units.pred_units):
        indeg[v] = len(ps)
        for p in ps:
            succ[p].append(v)
    stack = [v for v in range(n - 1, -1, -1) if indeg[v] == 0]
    order = []
    while stack:
        u = stack.pop()
        order.append(u)
        for v in sorted(succ[u], reverse=True):
            indeg[v] -= 1
            if indeg[v] == 0:
                stack.append(v)
    orders.append(np.array(order, dtype=np.int64))
    return orders


def _lower_bound(units: Units, problem: Problem) -> float:
    """Each unit needs at least its least time on any kind; the devices share that work at best evenly."""
    best = problem.time.copy()
    for t in range(len(problem.kinds)):
        bad = units.memory > problem.memory_limit[t]
        if problem.accelerator[t]:
            bad |= ~units.supported
        best[t, bad] = INF
    least = best.min(axis=0)
    devices = sum(k.count for k in problem.kinds)
    return float(max(least.max(initial=0.0), least.sum() / devices))


def solve(graph: OpGraph, cluster: Cluster, options) -> Plan:
    """Optimal contiguous split for throughput (least max-load)."""
    start = time.perf_counter()
    if options.objective != "throughput":
        raise PlacewiseError(f"the dp solver optimizes throughput only, not {options.objective}; use --solver ip for latency")
    if not options.contiguous:
        raise PlacewiseError("the dp solver finds contiguous splits only; drop --noncontiguous or use --solver ip")
    units = simplify(graph, cluster)
    problem = _problem(units, cluster)
    _check_units_fit(graph, units, problem)

    # Upper bound: the exact optimum over the segments of a few topological orders.
    upper = min(run_dp(units, problem, chain_lattice(units.count, order)).value for order in _topological_orders(units))
    lower = _lower_bound(units, problem)
    limit = int(options.extra.get("ideal_limit", DEFAULT_IDEAL_LIMIT))
    lattice = enumerate_ideals(units.pred_units, limit)

    reporter = _progress(options.progress, graph.name, lattice.count)
    try:
        result = run_dp(units, problem, lattice, upper, reporter.update if reporter else None)
    finally:
        if reporter:
            reporter.close()
    if not math.isfinite(result.value):
        _raise_infeasible(graph, units, problem)
    assignment = {}
    used = {t: 0 for t in range(len(problem.kinds))}
    for t, unit_set in result.sets:
        device = Device(problem.kinds[t].name, used[t])
        used[t] += 1
        for u in unit_set:
            for i in units.members[u]:
                assignment[graph.nodes[i].id] = device
    notes = {"ideals": lattice.count, "ideal_pairs": result.pairs, "upper_bound": upper, "work_lower_bound": lower,
             **units.stats}
    plan = plan_from_assignment(graph, cluster, assignment, solver="dp", seconds=time.perf_counter() - start,
                                lower_bound=result.value, gap=0.0, notes=notes)
    if not plan.feasible or abs(plan.max_load - result.value) > AGREEMENT * max(1.0, abs(result.value)):
        raise AssertionError(f"dp value {result.value!r} disagrees with the cost model's {plan.max_load!r} "
                             f"(violations: {plan.violations})")
    return plan


def _raise_infeasible(graph: OpGraph, units: Units, problem: Problem) -> None:
    devices = ", ".join(f"{k.count} x {k.name}" + (f" ({k.memory:.6g} bytes each)" if k.memory is not None else "")
                        for k in problem.kinds)
    total = float(units.memory.sum())
    if all(k.memory is not None for k in problem.kinds):
        capacity = sum(k.count * k.memory for k in problem.kinds)
        if total > capacity * (1 + MEMORY_TOLERANCE):
            raise PlacewiseError(f"graph {graph.name or ''} needs {total:.6g} bytes, more than all devices together hold "
                                 f"({devices}: {capacity:.6g} bytes); raise --memory or add devices")
    raise PlacewiseError(f"no contiguous split of graph {graph.name or ''} onto {devices} fits memory and support; "
                         "raise --memory, add devices or CPU cores")


class _Progress:
    def __init__(self, name: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.console import Console
        self._progress = Progress(TextColumn("[bold]dp[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task(f"{name}: ideals", total=total)

    def update(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done)

    def close(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, name: str, total: int) -> _Progress | None:
    return _Progress(name or "graph", total) if enabled else None
