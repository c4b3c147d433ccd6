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
- only states that can still finish are kept: with w the least work of a unit (its least time on
  any kind) and each device holding at most ratio_t * U of it, ideal I with s devices needs
  w(I) <= cap(s) and w(rest) <= cap(all - s); an all-accelerator side also pays every port the cut
  splits. So each ideal has few live states, and its useful sub-ideals J lie in a band of work;
- those J are found by scanning the band (ideals sorted by work; a per-ideal bitmask of finite dp
  states rejects most at once, then a subset test), with the set's compute, memory and support from
  per-ideal prefix sums and its transfer from the ports the two ideals split (no other port can be
  paid by I \\ J); or, where shorter, by walking down from I one maximal unit at a time while the
  set could still fit a device (compute, memory and support only grow), its load kept incrementally;
- everything runs compiled (numba, cached on disk).
A time limit stops the DP and returns the chain split with its gap (marked not exact).
Every plan is re-scored by the cost model, which must agree with the DP's value.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
from numba import njit

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.ideals import IdealLattice, chain_lattice, enumerate_ideals, pendants
from placewise.plan.units import Units, simplify
from placewise.plan.options import DPOptions
from placewise.plan.plan import Plan, plan_from_assignment

INF = math.inf
# The DP's incremental sums and the cost model's sums round differently; they must agree to this.
AGREEMENT = 1e-9
# Sets are pruned when their compute alone exceeds the bound by more than rounding.
PRUNE_SLACK = 1e-9
# Device-count vectors (product of (count + 1) over kinds) beyond this would make dp too wide.
STATE_LIMIT = 4096
# A walk step costs about as many scanned band entries as this: most band entries fail the cheap
# finite-row test, so scanning wins unless the walk is short (measured on gnmt and inceptionv3:
# 4, 16, 64, 1024 gave 2.6, 1.7, 1.3, 0.9 s of CPU on gnmt).
WALK_COST = 1024
# Ideals processed per compiled call, so that progress can be shown between calls.
CHUNK = 2048
# The search's first run, just below the chain bound, gets this many seconds before the bound search
# starts.
QUICK_TRY = 2.0
# A split from a restricted problem is certified optimal by a DP run at this fraction below its
# max-load finding nothing (cheap: runs just below the optimum are).
CERTIFY_GAP = 1e-8
# The bound search raises the bound by this fraction per failed run. On PipeDream's inception_v3 with
# 4 devices, steps of 0.5%, 1%, 2%, 4% took 17.4, 15.2, 19.0, 14.7 s (62, 32, 17, 9 runs): about the
# same, since failed runs get cheaper as steps get longer while the overshoot gets dearer.
BOUND_STEP = 0.01


@dataclass(frozen=True)
class Problem:
    """The DP's view of a cluster: per kind, per-unit time, memory limit, whether it pays transfers."""

    kinds: tuple[DeviceKind, ...]  # kinds with at least one device
    time: np.ndarray  # (kinds, units): a unit's compute time on one device of the kind
    accelerator: np.ndarray  # (kinds,) bool
    memory_limit: np.ndarray  # (kinds,) bytes, inf when unlimited
    prev: np.ndarray  # (states, kinds): the state with one device of that kind fewer, -1 if none
    counts: np.ndarray  # (states, kinds): devices of each kind in a state
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
    counts = np.zeros((n_states, len(kinds)))
    for s in range(n_states):
        for t, stride in enumerate(strides):
            counts[s, t] = (s // stride) % radix[t]
            if counts[s, t] > 0:
                prev[s, t] = s - stride
    time_ = np.array([(units.acc_time if k.accelerator else units.cpu_time) / k.speed for k in kinds])
    return Problem(kinds, time_, np.array([k.accelerator for k in kinds]),
                   np.array([INF if k.memory is None else k.memory * (1 + MEMORY_TOLERANCE) for k in kinds]),
                   prev, counts, n_states - 1)


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
        unsupported = [graph.nodes[i].id for i in members if not graph.supported[i]]
        has_cpu = any(not k.accelerator for k in problem.kinds)
        limits = ", ".join(f"{k.name} {k.memory:.6g}" for k in problem.kinds if k.memory is not None)
        heaviest = max(members, key=lambda i: graph.memory[i])
        if unsupported and not has_cpu:
            raise PlacewiseError(
                f"node {unsupported[0]} cannot run on an accelerator (not supported there) and the cluster has no "
                "CPU cores; give --cpus 1 or more")
        # One node too big for every device says it most precisely; otherwise the group is to blame.
        if all(graph.memory[heaviest] > problem.memory_limit[t] for t in range(len(problem.kinds))):
            raise PlacewiseError(
                f"node {graph.nodes[heaviest].id} needs {graph.memory[heaviest]:.6g} bytes, more than any device that "
                f"could run it holds ({limits}); raise --memory or add CPU cores")
        shown = ", ".join(str(graph.nodes[i].id) for i in members[:6]) + (" ..." if len(members) > 6 else "")
        raise PlacewiseError(
            f"nodes {shown} must share one device in a contiguous split (a colocation class, or a cycle through "
            f"colocation classes) and together need {units.memory[u]:.6g} bytes, more than any device that could run "
            f"them holds ({limits}); raise --memory or add CPU cores")


# ---- the compiled core ------------------------------------------------------------------------------
@njit(cache=True)
def _has(bits, ideal, u):
    return (bits[ideal, u >> 6] >> np.uint64(u & 63)) & np.uint64(1) != 0


@njit(cache=True)
def _port_pays(in_owner, count, n_targets):
    if in_owner:
        return count < n_targets
    return count > 0


@njit(cache=True)
def _toggle(u, sign, comp, state, units, ports, in_set, port_count):
    """Add (sign=+1) or remove (sign=-1) unit u from the walked set; state = [memory, unsupported, transfer]."""
    time_, memory, unsupported = units
    port_cost, port_owner, port_n_targets, _, _, own_ptr, own_ports, tgt_ptr, tgt_ports = ports
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
def _split_ports(bits, down_ptr, down_ideal, down_unit, ports):
    """For every ideal, the ports it splits (some of the port's units inside, some outside). Only such
    ports can be paid by a difference of two ideals: an unsplit port is wholly in or out of the set.
    Built along one down edge per ideal (i = j + unit u): only ports that involve u can change."""
    port_owner, target_ptr, targets, own_ptr, own_ports, tgt_ptr, tgt_ports = \
        ports[1], ports[3], ports[4], ports[5], ports[6], ports[7], ports[8]
    n = bits.shape[0]
    ptr = np.zeros(n + 1, dtype=np.int64)
    touched = np.full(port_owner.shape[0], -1, dtype=np.int64)
    cap = 16 * n + 16
    flat = np.zeros(cap, dtype=np.int64)
    m = 0
    for i in range(1, n):
        k = down_ptr[i]
        j, u = down_ideal[k], down_unit[k]
        for a in range(own_ptr[u], own_ptr[u + 1]):
            touched[own_ports[a]] = i
        for a in range(tgt_ptr[u], tgt_ptr[u + 1]):
            touched[tgt_ports[a]] = i
        # Room for the parent's list plus every port of u.
        need = m + (ptr[j + 1] - ptr[j]) + (own_ptr[u + 1] - own_ptr[u]) + (tgt_ptr[u + 1] - tgt_ptr[u])
        if need > cap:
            cap = max(2 * cap, need)
            grown = np.zeros(cap, dtype=np.int64)
            grown[:m] = flat[:m]
            flat = grown
        for a in range(ptr[j], ptr[j + 1]):
            if touched[flat[a]] != i:
                flat[m] = flat[a]
                m += 1
        for side in range(2):
            lo, hi = (own_ptr[u], own_ptr[u + 1]) if side == 0 else (tgt_ptr[u], tgt_ptr[u + 1])
            for a in range(lo, hi):
                p = own_ports[a] if side == 0 else tgt_ports[a]
                if touched[p] != i:
                    continue  # already decided for this ideal
                touched[p] = -2
                inside = _has(bits, i, port_owner[p])
                for b in range(target_ptr[p], target_ptr[p + 1]):
                    if _has(bits, i, targets[b]) != inside:
                        flat[m] = p
                        m += 1
                        break
        ptr[i + 1] = m
    return ptr, flat[:m]


@njit(cache=True)
def _pays_in_difference(bits, outer, inner, p, ports):
    """Whether port p is paid by the set outer \\ inner."""
    port_cost, port_owner, _, target_ptr, targets, _, _, _, _ = ports
    o = port_owner[p]
    owner_in = _has(bits, outer, o) and not _has(bits, inner, o)
    for k in range(target_ptr[p], target_ptr[p + 1]):
        t = targets[k]
        target_in = _has(bits, outer, t) and not _has(bits, inner, t)
        if target_in != owner_in:
            return True
    return False


@njit(cache=True)
def _update(root, sub, loads, dp, arg_ideal, arg_kind, prev, relevant):
    for s in range(prev.shape[0]):
        if not relevant[s]:
            continue
        best = dp[root, s]
        for t in range(prev.shape[1]):
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


@njit(cache=True)
def _bit_index(single):
    """Position of the one set bit of a uint64."""
    i = 0
    if single >> np.uint64(32) != 0:
        i += 32
        single >>= np.uint64(32)
    if single >> np.uint64(16) != 0:
        i += 16
        single >>= np.uint64(16)
    if single >> np.uint64(8) != 0:
        i += 8
        single >>= np.uint64(8)
    if single >> np.uint64(4) != 0:
        i += 4
        single >>= np.uint64(4)
    if single >> np.uint64(2) != 0:
        i += 2
        single >>= np.uint64(2)
    if single >> np.uint64(1) != 0:
        i += 1
    return i


@njit(cache=True)
def _could_improve(root, sub, least_loads, prune, dp, prev, relevant):
    """Whether a set whose load on kind t is at least least_loads[t] could lower some dp[root, s]."""
    for s in range(prev.shape[0]):
        if not relevant[s]:
            continue
        for t in range(prev.shape[1]):
            p = prev[s, t]
            if p >= 0 and least_loads[t] <= prune and max(dp[sub, p], least_loads[t]) < dp[root, s]:
                return True
    return False


@njit(cache=True)
def _set_loads(comp, mem, unsup, transfer, kinds, prune, loads):
    """Per kind: the set's load, or inf where it cannot go (memory, support, over the bound).
    Returns whether any superset could still fit somewhere (compute, memory, support only grow)."""
    accelerator, memory_limit = kinds[0], kinds[1]
    alive = False
    for t in range(loads.shape[0]):
        if mem > memory_limit[t] or (accelerator[t] and unsup > 0) or comp[t] > prune:
            loads[t] = np.inf
            continue
        alive = True
        load = comp[t] + transfer if accelerator[t] else comp[t]
        loads[t] = load if load <= prune else np.inf
    return alive


@njit(cache=True)
def _run_chunk(lo, hi, lat, units, ports, kinds, prune, total_work, dp, arg_ideal, arg_kind, finite, finite_at, stamp,
               in_set, port_count, stats):
    """Fill dp rows lo..hi-1 (ideals sorted by size, so every sub-ideal's row is final).

    For each ideal (root) only the device-count states s that can still finish are kept: the
    ideal's least work must fit in s's capacity and the rest's in the other devices'. The sub-ideals
    whose state can finish lie in a band of work; they are found by walking down from the root (set
    load kept incrementally), or, when the walk would visit more ideals than the band holds, by
    scanning the band (ideals sorted by work) with a subset test and loads from prefix sums.
    """
    down_ptr, down_ideal, down_unit, bits, work, comp_ideal, mem_ideal, unsup_ideal, by_work, work_sorted, \
        bits_by_work, pos_of, split_ptr, split_ports, split_cost = lat
    accelerator, memory_limit, prev, capacity, reach, all_accelerators, transfer_share, walk_cost = kinds
    port_cost = ports[0]
    n_kinds = prev.shape[1]
    n_states = prev.shape[0]
    full = n_states - 1
    words = bits.shape[1]
    comp = np.zeros(n_kinds)
    state = np.zeros(3)
    loads = np.zeros(n_kinds)
    relevant = np.zeros(n_states, dtype=np.bool_)
    masks = n_states <= 64  # finite[] holds one bit per state
    stack = np.zeros(64, dtype=np.int64)
    pos = np.zeros(64, dtype=np.int64)
    added = np.zeros(64, dtype=np.int64)
    for root in range(lo, hi):
        for s in range(n_states):
            dp[root, s] = np.inf
            arg_ideal[root, s] = -1
            arg_kind[root, s] = -1
        finite[root] = 0
        any_relevant = False
        band_lo, band_hi = np.inf, -np.inf
        needed = np.uint64(0)
        # Each side of the cut pays every port the cut splits at least once; an all-accelerator side
        # pays it in load (CPU cores pay no transfers, so a side with CPUs gets work alone).
        left = work[root] + (transfer_share * split_cost[root])
        right = total_work - work[root] + (transfer_share * split_cost[root])
        for s in range(n_states):
            relevant[s] = (left if all_accelerators[s] else work[root]) <= capacity[s] and \
                (right if all_accelerators[full - s] else total_work - work[root]) <= capacity[full - s]
            if not relevant[s]:
                continue
            any_relevant = True
            for t in range(n_kinds):
                p = prev[s, t]
                if p >= 0:
                    band_lo = min(band_lo, total_work - capacity[full - p])
                    band_hi = max(band_hi, capacity[p])
                    if masks:
                        needed |= np.uint64(1) << np.uint64(p)
        if not masks:
            needed = ~np.uint64(0)
        if not any_relevant:
            continue
        place = pos_of[root]
        if root == 0:
            for s in range(n_states):
                dp[root, s] = 0.0
            finite[root] = ~np.uint64(0)
            for row in range(finite_at.shape[0]):
                finite_at[row, place >> 6] |= np.uint64(1) << np.uint64(place & 63)
            continue
        band_lo = max(band_lo, work[root] - reach)
        band_hi = min(band_hi, work[root])
        first = np.searchsorted(work_sorted, band_lo, side="left")
        last = np.searchsorted(work_sorted, band_hi, side="right")
        # A walk step costs about as much as walk_cost band entries of a scan (most of which fail the
        # cheap finite-row test), so walk only while that is cheaper. Tests force either way: walk_cost
        # 0 scans only, a negative one walks only.
        if walk_cost == 0:
            budget = -1
        elif walk_cost < 0:
            budget = len(work)
        else:
            budget = max((last - first) // walk_cost, 16)
        # Walk down from the root while the set could still fit a device and the sub-ideal's work
        # has not dropped below the band (work only drops further down).
        comp[:] = 0.0
        state[:] = 0.0
        depth = 0
        stack[0] = root
        pos[0] = down_ptr[root]
        visits = 0
        while depth >= 0:
            cur = stack[depth]
            k = pos[depth]
            if k == down_ptr[cur + 1] or visits > budget:
                if depth > 0:
                    _toggle(added[depth], -1, comp, state, units, ports, in_set, port_count)
                depth -= 1
                continue
            pos[depth] = k + 1
            sub = down_ideal[k]
            if stamp[sub] == root:
                continue
            stamp[sub] = root
            if work[sub] < band_lo:
                continue
            visits += 1
            u = down_unit[k]
            _toggle(u, 1, comp, state, units, ports, in_set, port_count)
            if not _set_loads(comp, state[0], state[1], state[2], kinds, prune, loads):
                _toggle(u, -1, comp, state, units, ports, in_set, port_count)
                continue
            if work[sub] <= band_hi and finite[sub] & needed != 0:
                _update(root, sub, loads, dp, arg_ideal, arg_kind, prev, relevant)
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
        stats[0] += visits
        if visits > budget:
            stats[1] += 1
            # Only band entries with a finite needed state matter: walk the bitsets of such positions.
            w_first, w_last = first >> 6, (last + 63) >> 6
            for w in range(w_first, w_last):
                word = np.uint64(0)
                if masks:
                    for p in range(n_states):
                        if needed & (np.uint64(1) << np.uint64(p)) != 0:
                            word |= finite_at[p, w]
                else:
                    word = finite_at[0, w]
                while word != 0:
                    low = word & (~word + np.uint64(1))
                    word ^= low
                    idx = w * 64 + _bit_index(low)
                    if idx < first or idx >= last:
                        continue
                    sub = by_work[idx]
                    if sub == root:
                        continue
                    subset = True
                    for q in range(words):
                        if bits_by_work[idx, q] & ~bits[root, q] != 0:
                            subset = False
                            break
                    if not subset:
                        continue
                    stats[2] += 1
                    # Ports split by the root but not paid by the set are split by the sub-ideal, and the
                    # other way round: the set pays at least the difference of the two split costs.
                    # Skip the exact transfer where that floor and the compute cannot improve a state.
                    floor = abs(split_cost[root] - split_cost[sub])
                    for t in range(n_kinds):
                        comp[t] = comp_ideal[root, t] - comp_ideal[sub, t]
                        loads[t] = comp[t] + floor if accelerator[t] else comp[t]
                    if not _could_improve(root, sub, loads, prune, dp, prev, relevant):
                        continue
                    transfer = 0.0
                    for k in range(split_ptr[root], split_ptr[root + 1]):
                        p = split_ports[k]
                        if _pays_in_difference(bits, root, sub, p, ports):
                            transfer += port_cost[p]
                    for k in range(split_ptr[sub], split_ptr[sub + 1]):
                        p = split_ports[k]
                        # Ports split by both ideals were counted above.
                        if _port_split(bits, root, p, ports):
                            continue
                        if _pays_in_difference(bits, root, sub, p, ports):
                            transfer += port_cost[p]
                    _set_loads(comp, mem_ideal[root] - mem_ideal[sub], unsup_ideal[root] - unsup_ideal[sub], transfer,
                               kinds, prune, loads)
                    _update(root, sub, loads, dp, arg_ideal, arg_kind, prev, relevant)
        # Leaving devices empty: dp[root, s] <= dp[root, s - e_t], in increasing s.
        for s in range(n_states):
            if not relevant[s]:
                continue
            for t in range(n_kinds):
                p = prev[s, t]
                if p >= 0 and dp[root, p] < dp[root, s]:
                    dp[root, s] = dp[root, p]
                    arg_ideal[root, s] = root
                    arg_kind[root, s] = t
            if dp[root, s] < np.inf:
                row = s if masks else 0
                finite[root] |= (np.uint64(1) << np.uint64(s)) if masks else ~np.uint64(0)
                finite_at[row, place >> 6] |= np.uint64(1) << np.uint64(place & 63)


@njit(cache=True)
def _port_split(bits, ideal, p, ports):
    port_owner, target_ptr, targets = ports[1], ports[3], ports[4]
    inside = _has(bits, ideal, port_owner[p])
    for k in range(target_ptr[p], target_ptr[p + 1]):
        if _has(bits, ideal, targets[k]) != inside:
            return True
    return False


@njit(cache=True)
def _prefix_sums(down_ptr, down_ideal, down_unit, time_, memory, unsupported, least):
    """Per ideal: compute time per kind, memory, unsupported count and least work, along one down edge."""
    n = down_ptr.shape[0] - 1
    comp = np.zeros((n, time_.shape[0]))
    mem = np.zeros(n)
    unsup = np.zeros(n)
    work = np.zeros(n)
    for i in range(1, n):
        k = down_ptr[i]
        j, u = down_ideal[k], down_unit[k]
        for t in range(time_.shape[0]):
            comp[i, t] = comp[j, t] + time_[t, u]
        mem[i] = mem[j] + memory[u]
        unsup[i] = unsup[j] + unsupported[u]
        work[i] = work[j] + least[u]
    return comp, mem, unsup, work


def _csr_by(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ptr, keys + 1, 1)
    return np.cumsum(ptr), values[order].astype(np.int64)


@dataclass
class DPResult:
    value: float
    sets: list[tuple[int, np.ndarray]]  # (kind index, units) per device, in pipeline order
    pairs: int  # sets whose load was evaluated
    scanned_roots: int  # ideals whose sub-ideals were scanned rather than walked


def _fitting_times(units: Units, problem: Problem) -> np.ndarray:
    """Each unit's time on each kind (kinds x units), infinite where it cannot go (memory, support)."""
    times = problem.time.copy()
    for t in range(len(problem.kinds)):
        bad = units.memory > problem.memory_limit[t]
        if problem.accelerator[t]:
            bad |= ~units.supported
        times[t, bad] = INF
    return times


def _least_work(units: Units, problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's least time on a kind that can hold it, and per kind the most least-work a device
    can hold per unit of its own time (a device's load bound B caps its least work at ratio * B)."""
    times = _fitting_times(units, problem)
    least = times.min(axis=0)
    least[~np.isfinite(least)] = 0.0  # such a unit fits nowhere; checked before the DP
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((times > 0) & np.isfinite(times), least[None, :] / times, 0.0)
    return least, ratio.max(axis=1, initial=0.0)


@dataclass
class Prepared:
    """What the DP needs of a lattice that does not depend on the bound (reused across bounds)."""

    unit_data: tuple
    ports: tuple
    lat: tuple
    ratio: np.ndarray  # per kind, the most least-work a device holds per unit of its own time
    total_work: float
    transfer_share: float
    all_accelerators: np.ndarray  # per state: no CPU among its devices


def prepare(units: Units, problem: Problem, lattice: IdealLattice) -> Prepared:
    n_ideals = lattice.count
    n_units = units.count
    n_ports = len(units.port_cost)
    own_ptr, own_ports = _csr_by(units.port_owner, np.arange(n_ports), n_units)
    port_of_target = np.repeat(np.arange(n_ports), np.diff(units.port_target_ptr))
    tgt_ptr, tgt_ports = _csr_by(units.port_targets, port_of_target, n_units)
    ports = (units.port_cost, units.port_owner, np.diff(units.port_target_ptr), units.port_target_ptr,
             units.port_targets, own_ptr, own_ports, tgt_ptr, tgt_ports)
    unsupported = (~units.supported).astype(np.int64)
    least, ratio = _least_work(units, problem)
    comp_ideal, mem_ideal, unsup_ideal, work = _prefix_sums(
        lattice.down_ptr, lattice.down_ideal, lattice.down_unit, problem.time, units.memory, unsupported.astype(float), least)
    by_work = np.argsort(work, kind="stable")
    pos_of = np.empty(n_ideals, dtype=np.int64)
    pos_of[by_work] = np.arange(n_ideals)
    split_ptr, split_ports = _split_ports(lattice.bits, lattice.down_ptr, lattice.down_ideal, lattice.down_unit, ports)
    split_cost = np.add.reduceat(np.append(units.port_cost[split_ports], 0.0), split_ptr[:-1]) \
        if len(split_ports) else np.zeros(n_ideals)
    split_cost[np.diff(split_ptr) == 0] = 0.0
    lat = (lattice.down_ptr, lattice.down_ideal, lattice.down_unit, lattice.bits, work, comp_ideal, mem_ideal,
           unsup_ideal, by_work, work[by_work], np.ascontiguousarray(lattice.bits[by_work]), pos_of, split_ptr,
           split_ports, split_cost)
    # Transfers count in an all-accelerator side's load at the slowest accelerator kind's work ratio.
    accelerator_ratio = ratio[problem.accelerator]
    transfer_share = float(accelerator_ratio.min()) * (1 - PRUNE_SLACK) if len(accelerator_ratio) else 0.0
    return Prepared((problem.time, units.memory, unsupported), ports, lat, ratio, float(work[-1]), transfer_share,
                    problem.counts[:, ~problem.accelerator].sum(axis=1) == 0)


def run_dp(units: Units, problem: Problem, lattice: IdealLattice, bound: float = INF, progress=None,
           deadline: float | None = None, walk_cost: int = WALK_COST, prepared: Prepared | None = None
           ) -> DPResult | None:
    """The DP on a lattice (all ideals, or a chain's prefixes) with sets above `bound` left out;
    None when `deadline` (a perf_counter time) passes first. `walk_cost` 0 finds sub-ideals by
    scanning only, -1 by walking only (both are exact; tests check they agree). The value is the
    optimum whenever it is at most `bound`, and infinite when the optimum is above it."""
    if prepared is None:
        prepared = prepare(units, problem, lattice)
    n_ideals = lattice.count
    prune = bound * (1 + PRUNE_SLACK) if math.isfinite(bound) else INF
    # Capacity of each state in least work, with slack for rounding in the sums.
    ratio = prepared.ratio
    share = problem.counts @ ratio
    if math.isfinite(prune):
        capacity = share * prune * (1 + PRUNE_SLACK) + PRUNE_SLACK
        reach = float(ratio.max(initial=0.0)) * prune * (1 + PRUNE_SLACK) + PRUNE_SLACK
    else:
        capacity = np.where(share > 0, INF, PRUNE_SLACK)
        reach = INF
    kinds = (problem.accelerator, problem.memory_limit, problem.prev, capacity, reach, prepared.all_accelerators,
             prepared.transfer_share, walk_cost)
    n_states = problem.prev.shape[0]
    dp = np.empty((n_ideals, n_states))
    arg_ideal = np.empty((n_ideals, n_states), dtype=np.int64)
    arg_kind = np.empty((n_ideals, n_states), dtype=np.int64)
    finite = np.zeros(n_ideals, dtype=np.uint64)  # per ideal, a bit per state whose dp is finite
    # Per state (one row for all when states > 64), a bit per work-sorted position whose dp is finite.
    finite_at = np.zeros((n_states if n_states <= 64 else 1, (n_ideals + 63) // 64), dtype=np.uint64)
    stamp = np.full(n_ideals, -1, dtype=np.int64)
    in_set = np.zeros(units.count, dtype=np.int64)
    port_count = np.zeros(len(units.port_cost), dtype=np.int64)
    stats = np.zeros(3, dtype=np.int64)
    for lo in range(0, n_ideals, CHUNK):
        hi = min(n_ideals, lo + CHUNK)
        _run_chunk(lo, hi, prepared.lat, prepared.unit_data, prepared.ports, kinds, prune, prepared.total_work, dp,
                   arg_ideal, arg_kind, finite, finite_at, stamp, in_set, port_count, stats)
        if progress is not None:
            progress(hi, n_ideals)
        if deadline is not None and hi < n_ideals and time.perf_counter() > deadline:
            return None
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
    return DPResult(value, sets, int(stats[0] + stats[2]), int(stats[1]))


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
    least = _fitting_times(units, problem).min(axis=0)
    devices = sum(k.count for k in problem.kinds)
    return float(max(least.max(initial=0.0), least.sum() / devices))


@dataclass
class _Outcome:
    result: DPResult | None  # the DP's optimal split; None when out of time or when `upper` is optimal
    proven: float  # every split has at least this max-load
    upper_optimal: bool  # the split behind `upper` is optimal (to CERTIFY_GAP)
    runs: int
    pairs: int


def _search(units: Units, problem: Problem, lattice: IdealLattice, prepared: Prepared, lower: float, upper: float,
            certify: bool, reporter: "_Progress | None", deadline: float | None) -> _Outcome:
    """The optimum, found by DP runs at a few bounds.

    A run at bound B returns the optimum if it is at most B and nothing otherwise, and costs more the
    more sets fit under B; far more once B passes the optimum, since then many partial splits
    survive, while a run that fails just below the optimum is cheap. So the first run is just below
    `upper` (the best split known): it fails when that split is optimal and otherwise finds the
    optimum. It may take until the deadline where `upper` is the optimum of a restricted problem
    (`certify`: likely optimal here too), else QUICK_TRY seconds (enough where the chain split is
    near optimal or the graph is small). Past those, runs from the work lower bound up in steps of
    BOUND_STEP, each failure proving a higher lower bound, until the first success, which
    overshoots by at most one step.
    """
    outcome = _Outcome(None, lower, False, 0, 0)

    def run(bound: float, until: float | None) -> DPResult | None:
        outcome.runs += 1
        if reporter:
            reporter.describe(f"sets up to {bound:.6g}")
        result = run_dp(units, problem, lattice, bound, reporter.update if reporter else None, until, prepared=prepared)
        if result is not None:
            outcome.pairs += result.pairs
        return result

    if not math.isfinite(upper):
        outcome.result = run(INF, deadline)
        return outcome
    below = upper * (1 - CERTIFY_GAP)
    until = deadline
    if not certify:
        quick = time.perf_counter() + QUICK_TRY
        until = quick if deadline is None else min(quick, deadline)
    outcome.result = run(below, until)
    if outcome.result is not None:
        if not math.isfinite(outcome.result.value):
            outcome.result, outcome.proven, outcome.upper_optimal = None, below, True
        return outcome
    if certify:
        return outcome
    # From a work bound of 0 (no compute anywhere, only transfers) steps in % would never move.
    bound = lower if lower > 0 else upper / 2
    while deadline is None or time.perf_counter() < deadline:
        bound = min(bound * (1 + BOUND_STEP), upper)
        outcome.result = run(bound, deadline)
        if outcome.result is None or math.isfinite(outcome.result.value):
            return outcome
        outcome.proven = bound
    return outcome


def _merged_pendants(graph: OpGraph, units: Units) -> OpGraph | None:
    """The graph with every side branch that ends it (an auxiliary classifier) colocated with the
    unit it hangs off: a restricted problem with far fewer ideals whose splits are splits here too."""
    found = pendants(units.pred_units, units.acc_time)
    if not found:
        return None
    fresh = max((n.colocate for n in graph.nodes if n.colocate is not None), default=-1) + 1
    colocate: dict[int, int] = {}
    for k, (v, branch) in enumerate(found):
        for u in (v, *branch):
            for i in units.members[u]:
                colocate[i] = fresh + k
    return replace(graph, nodes=tuple(replace(n, colocate=colocate.get(i, n.colocate))
                                      for i, n in enumerate(graph.nodes)))


def solve(graph: OpGraph, cluster: Cluster, options: DPOptions) -> Plan:
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
    chains = [run_dp(units, problem, chain_lattice(units.count, order)) for order in _topological_orders(units)]
    best_chain = min(chains, key=lambda r: r.value)
    upper = best_chain.value
    best_assignment = _assignment(graph, units, problem, best_chain.sets)
    deadline = None if options.time_limit is None else start + options.time_limit
    lower = _lower_bound(units, problem)
    # Listed first: a graph with too many ideals fails here at once, before any restricted solve.
    limit = int(options.ideal_limit)
    lattice = enumerate_ideals(units.pred_units, limit)
    # A side branch that ends the graph multiplies its ideals: the optimum with such branches kept
    # on the unit they hang off is found on far fewer ideals, and is often the optimum here too.
    merged = _merged_pendants(graph, units)
    restricted = None
    if merged is not None:
        left = None if deadline is None else max(deadline - time.perf_counter(), 1e-3)
        try:
            restricted = solve(merged, cluster, replace(options, progress=False, time_limit=left))
        except PlacewiseError:
            restricted = None  # e.g. a branch and its unit do not fit one device together
        if restricted is not None and restricted.notes["exact"] and restricted.max_load <= upper:
            upper, best_assignment = restricted.max_load, restricted.assignment()
        else:
            restricted = None
    prepared = prepare(units, problem, lattice)

    reporter = _progress(options.progress, graph.name, lattice.count)
    try:
        outcome = _search(units, problem, lattice, prepared, lower, upper, restricted is not None, reporter, deadline)
    finally:
        if reporter:
            reporter.close()
    exact = outcome.result is not None or outcome.upper_optimal
    if outcome.result is not None:
        if not math.isfinite(outcome.result.value):
            _raise_infeasible(graph, units, problem)
        value, assignment = outcome.result.value, _assignment(graph, units, problem, outcome.result.sets)
        bound = value
    else:
        # Certified, or out of time: the best split known, with the best bound the DP runs proved.
        if not math.isfinite(upper):
            raise PlacewiseError(f"the dp solver ran out of its {options.time_limit:g} s before finding a split; "
                                 "raise --time-limit")
        value, assignment, bound = upper, best_assignment, min(outcome.proven, upper)
    notes = {"ideals": lattice.count, "ideal_pairs": outcome.pairs, "dp_runs": outcome.runs, "upper_bound": upper,
             "work_lower_bound": lower, "exact": exact, **units.stats}
    if restricted is not None:
        notes["restricted"] = (f"side branches kept with the unit they hang off: {restricted.notes['ideals']:,} "
                               f"ideals, max-load {restricted.max_load:.10g}"
                               + (f", optimal here to {CERTIFY_GAP:g} (no split below it)" if outcome.upper_optimal
                                  else ""))
    if not exact:
        notes["stopped"] = (f"time limit {options.time_limit:g} s: best split known; "
                            f"every split has max-load at least {outcome.proven:.6g}")
    plan = plan_from_assignment(graph, cluster, assignment, solver="dp", seconds=time.perf_counter() - start,
                                lower_bound=bound, gap=(value - bound) / value if value else 0.0, notes=notes)
    if not plan.feasible or abs(plan.max_load - value) > AGREEMENT * max(1.0, abs(value)):
        raise AssertionError(f"dp value {value!r} disagrees with the cost model's {plan.max_load!r} "
                             f"(violations: {plan.violations})")
    return plan


def _assignment(graph: OpGraph, units: Units, problem: Problem, sets: list[tuple[int, np.ndarray]]) -> dict:
    """Node id -> device for DP sets (kind index, units) in pipeline order."""
    assignment = {}
    used = {t: 0 for t in range(len(problem.kinds))}
    for t, unit_set in sets:
        device = Device(problem.kinds[t].name, used[t])
        used[t] += 1
        for u in unit_set:
            for i in units.members[u]:
                assignment[graph.nodes[i].id] = device
    return assignment


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
        self._name = name
        self._task = self._progress.add_task(f"{name}: ideals", total=total)

    def update(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done)

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=f"{self._name}: {text}", completed=0)

    def close(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, name: str, total: int) -> _Progress | None:
    return _Progress(name or "graph", total) if enabled else None
