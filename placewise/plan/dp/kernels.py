"""The DP's compiled core (numba, cached on disk): set loads, port bookkeeping, and filling dp rows.

The kernels take their arrays in named tuples (`UnitData`, `Ports`, `Lattice`, `Bounds`), so that a
field is read by name: numba compiles attribute access on a named tuple to a plain field load. A call
passes every array of its tuples, though, so the tuples of the per-step calls (`_toggle`) stay small:
copy groups have their own (`copies.Copies`), and the preparation kernels are in `per_ideal`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from placewise.plan.dp.copies import copies_in_difference, toggle_copies
from placewise.plan.dp.per_ideal import has


class UnitData(NamedTuple):
    """Per unit: its time on each kind, memory, and 1 if an accelerator cannot run it. (Shared copies
    of replicable nodes are in `copies.Copies`, not here: see there why.)"""

    time: np.ndarray  # (kinds, units)
    memory: np.ndarray
    unsupported: np.ndarray  # int64


class Ports(NamedTuple):
    """The units' ports (see `plan.units.Units`) and, per unit, the ports it owns or is a target of."""

    cost: np.ndarray
    owner: np.ndarray
    n_targets: np.ndarray
    target_ptr: np.ndarray  # CSR over ports: their target units
    targets: np.ndarray
    own_ptr: np.ndarray  # CSR over units: the ports each owns
    own_ports: np.ndarray
    tgt_ptr: np.ndarray  # CSR over units: the ports each is a target of
    tgt_ports: np.ndarray


class Lattice(NamedTuple):
    """The ideal lattice with what the DP precomputes per ideal."""

    down_ptr: np.ndarray  # CSR over ideals: sub-ideals one maximal unit smaller ...
    down_ideal: np.ndarray
    down_unit: np.ndarray  # ... and the unit removed
    bits: np.ndarray  # (ideals, words) membership
    work: np.ndarray  # least work per ideal
    comp_ideal: np.ndarray  # (ideals, kinds) compute time
    mem_ideal: np.ndarray
    unsup_ideal: np.ndarray
    by_work: np.ndarray  # ideals sorted by work
    work_sorted: np.ndarray
    bits_by_work: np.ndarray
    pos_of: np.ndarray  # ideal -> position in by_work
    split_ptr: np.ndarray  # CSR over ideals: the ports each splits ...
    split_ports: np.ndarray
    split_cost: np.ndarray  # ... and their total cost


class Bounds(NamedTuple):
    """The device kinds and states, with what a run at one bound may keep."""

    accelerator: np.ndarray  # (kinds,) bool: runs supported units only
    pays_transfers: np.ndarray  # (kinds,) bool: a set's load on the kind includes its transfers
    memory_limit: np.ndarray  # (kinds,)
    prev: np.ndarray  # (states, kinds): the state with one device of the kind fewer, -1 if none
    capacity: np.ndarray  # (states,) least work the state's devices can hold under the bound
    reach: float  # least work one device can hold under the bound
    all_pay_transfers: np.ndarray  # (states,) every device of the state pays transfers
    transfer_share: float  # transfers count at this share in the least work of a side that pays them
    walk_cost: int  # a walk step costs this many scanned band entries (0: scan only, <0: walk only)


# ---- the compiled core ------------------------------------------------------------------------------
@njit(cache=True)
def _port_pays(in_owner, count, n_targets):
    if in_owner:
        return count < n_targets
    return count > 0


@njit(cache=True)
def _toggle(u, sign, comp, state, units, ports, in_set, port_count):
    """Add (sign=+1) or remove (sign=-1) unit u from the walked set; state = [memory, unsupported, transfer]."""
    port_cost, port_owner, port_n_targets = ports.cost, ports.owner, ports.n_targets
    own_ptr, own_ports, tgt_ptr, tgt_ports = ports.own_ptr, ports.own_ports, ports.tgt_ptr, ports.tgt_ports
    for t in range(comp.shape[0]):
        comp[t] += sign * units.time[t, u]
    state[0] += sign * units.memory[u]
    state[1] += sign * units.unsupported[u]
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
def _pays_in_difference(bits, outer, inner, p, ports):
    """Whether port p is paid by the set outer \\ inner."""
    o = ports.owner[p]
    owner_in = has(bits, outer, o) and not has(bits, inner, o)
    for k in range(ports.target_ptr[p], ports.target_ptr[p + 1]):
        t = ports.targets[k]
        target_in = has(bits, outer, t) and not has(bits, inner, t)
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
def _set_loads(comp, mem, unsup, transfer, bounds, prune, loads):
    """Per kind: the set's load, or inf where it cannot go (memory, support, over the bound).
    Returns whether any superset could still fit somewhere (compute, memory, support only grow)."""
    accelerator, memory_limit = bounds.accelerator, bounds.memory_limit
    alive = False
    for t in range(loads.shape[0]):
        if mem > memory_limit[t] or (accelerator[t] and unsup > 0) or comp[t] > prune:
            loads[t] = np.inf
            continue
        alive = True
        load = comp[t] + transfer if bounds.pays_transfers[t] else comp[t]
        loads[t] = load if load <= prune else np.inf
    return alive


@njit(cache=True)
def _relevant_states(root, lat, bounds, total_work, relevant):
    """Mark the device-count states in which the root ideal can still finish: its least work fits the
    state's capacity and the rest's the other devices'. Returns (any, band_lo, band_hi, needed): the
    band of sub-ideal work worth looking at, and the bits of the states a sub-ideal must have finite."""
    prev, capacity = bounds.prev, bounds.capacity
    n_states = prev.shape[0]
    full = n_states - 1
    work = lat.work[root]
    any_relevant = False
    band_lo, band_hi = np.inf, -np.inf
    needed = np.uint64(0)
    # Each side of the cut pays every port the cut splits at least once; a side whose devices all pay
    # transfers pays it in load (shared-memory cores pay none, so a side with them gets work alone).
    left = work + (bounds.transfer_share * lat.split_cost[root])
    right = total_work - work + (bounds.transfer_share * lat.split_cost[root])
    for s in range(n_states):
        relevant[s] = (left if bounds.all_pay_transfers[s] else work) <= capacity[s] and \
            (right if bounds.all_pay_transfers[full - s] else total_work - work) <= capacity[full - s]
        if not relevant[s]:
            continue
        any_relevant = True
        for t in range(prev.shape[1]):
            p = prev[s, t]
            if p >= 0:
                band_lo = min(band_lo, total_work - capacity[full - p])
                band_hi = max(band_hi, capacity[p])
                if n_states <= 64:
                    needed |= np.uint64(1) << np.uint64(p)
    if n_states > 64:
        needed = ~np.uint64(0)
    return any_relevant, band_lo, band_hi, needed


@njit(cache=True)
def _walk(root, band_lo, band_hi, needed, budget, lat, units, copies, ports, bounds, prune, dp, arg_ideal, arg_kind,
          finite, stamp, in_set, port_count, relevant, comp, state, loads, stack, pos, added):
    """Walk down from the root while the set could still fit a device and the sub-ideal's work has not
    dropped below the band (work only drops further down), keeping the set's load incrementally.
    Gives up after `budget` visits. Returns (visits, stack, pos, added): the scratch arrays may grow."""
    down_ptr, down_ideal, down_unit, work = lat.down_ptr, lat.down_ideal, lat.down_unit, lat.work
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
                toggle_copies(added[depth], -1, comp, state, copies)
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
        toggle_copies(u, 1, comp, state, copies)
        if not _set_loads(comp, state[0], state[1], state[2], bounds, prune, loads):
            _toggle(u, -1, comp, state, units, ports, in_set, port_count)
            toggle_copies(u, -1, comp, state, copies)
            continue
        if work[sub] <= band_hi and finite[sub] & needed != 0:
            _update(root, sub, loads, dp, arg_ideal, arg_kind, bounds.prev, relevant)
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
    return visits, stack, pos, added


@njit(cache=True)
def _scan(root, first, last, needed, lat, copies, ports, bounds, prune, dp, arg_ideal, arg_kind, finite_at, relevant,
          comp, loads, stats):
    """Scan the band (positions first..last-1 of the work-sorted ideals) for sub-ideals of the root with
    a finite needed state, with the set's loads from prefix sums and its transfer from split ports."""
    bits, split_ptr, split_ports, split_cost = lat.bits, lat.split_ptr, lat.split_ports, lat.split_cost
    n_states, n_kinds = bounds.prev.shape
    words = bits.shape[1]
    masks = n_states <= 64
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
            sub = lat.by_work[idx]
            if sub == root:
                continue
            subset = True
            for q in range(words):
                if lat.bits_by_work[idx, q] & ~bits[root, q] != 0:
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
                comp[t] = lat.comp_ideal[root, t] - lat.comp_ideal[sub, t]
                loads[t] = comp[t] + floor if bounds.pays_transfers[t] else comp[t]
            if not _could_improve(root, sub, loads, prune, dp, bounds.prev, relevant):
                continue
            transfer = 0.0
            for k in range(split_ptr[root], split_ptr[root + 1]):
                p = split_ports[k]
                if _pays_in_difference(bits, root, sub, p, ports):
                    transfer += ports.cost[p]
            for k in range(split_ptr[sub], split_ptr[sub + 1]):
                p = split_ports[k]
                # Ports split by both ideals were counted above.
                if _port_split(bits, root, p, ports):
                    continue
                if _pays_in_difference(bits, root, sub, p, ports):
                    transfer += ports.cost[p]
            # Copies only add to the compute the floor test used, so they are counted after it.
            copy_memory = copies_in_difference(root, sub, copies, comp)
            _set_loads(comp, lat.mem_ideal[root] - lat.mem_ideal[sub] + copy_memory,
                       lat.unsup_ideal[root] - lat.unsup_ideal[sub], transfer, bounds, prune, loads)
            _update(root, sub, loads, dp, arg_ideal, arg_kind, bounds.prev, relevant)


@njit(cache=True)
def _leave_empty(root, place, prev, dp, arg_ideal, arg_kind, finite, finite_at, relevant):
    """Leaving devices empty: dp[root, s] <= dp[root, s - e_t], in increasing s; then mark the
    root's finite states."""
    n_states = prev.shape[0]
    masks = n_states <= 64
    for s in range(n_states):
        if not relevant[s]:
            continue
        for t in range(prev.shape[1]):
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
def run_chunk(lo, hi, lat, units, copies, ports, bounds, prune, total_work, dp, arg_ideal, arg_kind, finite, finite_at,
              stamp, in_set, port_count, stats):
    """Fill dp rows lo..hi-1 (ideals sorted by size, so every sub-ideal's row is final).

    For each ideal (root) only the device-count states s that can still finish are kept. The
    sub-ideals whose state can finish lie in a band of work; they are found by walking down from the
    root (set load kept incrementally), or, when the walk would visit more ideals than the band holds,
    by scanning the band (ideals sorted by work) with a subset test and loads from prefix sums.
    """
    n_kinds = bounds.prev.shape[1]
    n_states = bounds.prev.shape[0]
    comp = np.zeros(n_kinds)
    state = np.zeros(3)
    loads = np.zeros(n_kinds)
    relevant = np.zeros(n_states, dtype=np.bool_)
    stack = np.zeros(64, dtype=np.int64)
    pos = np.zeros(64, dtype=np.int64)
    added = np.zeros(64, dtype=np.int64)
    for root in range(lo, hi):
        for s in range(n_states):
            dp[root, s] = np.inf
            arg_ideal[root, s] = -1
            arg_kind[root, s] = -1
        finite[root] = 0
        any_relevant, band_lo, band_hi, needed = _relevant_states(root, lat, bounds, total_work, relevant)
        if not any_relevant:
            continue
        place = lat.pos_of[root]
        if root == 0:
            for s in range(n_states):
                dp[root, s] = 0.0
            finite[root] = ~np.uint64(0)
            for row in range(finite_at.shape[0]):
                finite_at[row, place >> 6] |= np.uint64(1) << np.uint64(place & 63)
            continue
        band_lo = max(band_lo, lat.work[root] - bounds.reach)
        band_hi = min(band_hi, lat.work[root])
        first = np.searchsorted(lat.work_sorted, band_lo, side="left")
        last = np.searchsorted(lat.work_sorted, band_hi, side="right")
        # A walk step costs about as much as walk_cost band entries of a scan (most of which fail the
        # cheap finite-row test), so walk only while that is cheaper. Tests force either way: walk_cost
        # 0 scans only, a negative one walks only.
        if bounds.walk_cost == 0:
            budget = -1
        elif bounds.walk_cost < 0:
            budget = len(lat.work)
        else:
            budget = max((last - first) // bounds.walk_cost, 16)
        visits, stack, pos, added = _walk(root, band_lo, band_hi, needed, budget, lat, units, copies, ports, bounds,
                                          prune, dp, arg_ideal, arg_kind, finite, stamp, in_set, port_count, relevant,
                                          comp, state, loads, stack, pos, added)
        stats[0] += visits
        if visits > budget:
            stats[1] += 1
            _scan(root, first, last, needed, lat, copies, ports, bounds, prune, dp, arg_ideal, arg_kind, finite_at,
                  relevant, comp, loads, stats)
        _leave_empty(root, place, bounds.prev, dp, arg_ideal, arg_kind, finite, finite_at, relevant)


@njit(cache=True)
def _port_split(bits, ideal, p, ports):
    inside = has(bits, ideal, ports.owner[p])
    for k in range(ports.target_ptr[p], ports.target_ptr[p + 1]):
        if has(bits, ideal, ports.targets[k]) != inside:
            return True
    return False
