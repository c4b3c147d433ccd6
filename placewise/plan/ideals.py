"""The ideals of the unit DAG (see `plan/units.py` for the units): the contiguous cut points.

A contiguous set is I \\ I' for ideals (predecessor-closed sets) I' ⊆ I of the forward unit
DAG. `enumerate_ideals` lists them all with the lattice's "remove one maximal unit" edges, which is
what the DP walks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from placewise.errors import PlacewiseError
from placewise.plan.csr import csr
from placewise.plan.options import DEFAULT_IDEAL_LIMIT


@dataclass(frozen=True)
class IdealLattice:
    """All ideals of the unit DAG, sorted by size, with each ideal's immediate sub-ideals.

    `down_ptr[i]:down_ptr[i+1]` index `down_ideal` (the ideal without one of i's maximal units) and
    `down_unit` (that unit). Ideal 0 is empty, the last one holds every unit.
    """

    bits: np.ndarray  # (ideals, words) uint64 membership
    size: np.ndarray  # units per ideal
    down_ptr: np.ndarray
    down_ideal: np.ndarray
    down_unit: np.ndarray

    @property
    def count(self) -> int:
        return len(self.size)

    def units(self, ideal: int) -> np.ndarray:
        words = self.bits[ideal]
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits)


# A unit whose predecessors all lie more than this many units below it is tried for every ideal
# (as sources are) instead of being listed for each of the highest units it may follow.
SPAN_CAP = 64


def _candidates(pred_units: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For an ideal whose highest unit is h, the units it may grow by are those above h with every
    predecessor at most h. CSR over h + 1 (h = -1 for the empty ideal) of those whose highest
    predecessor is within SPAN_CAP below them, and the rest (sources, long spans) in one list."""
    n = len(pred_units)
    lists: list[list[int]] = [[] for _ in range(n + 1)]
    always = []
    for v, ps in enumerate(pred_units):
        top = max(ps, default=-1)
        if not ps or v - top > SPAN_CAP:
            always.append(v)
            continue
        for h in range(top, v):
            lists[h + 1].append(v)
    ptr, flat = csr(lists)
    return ptr, flat, np.array(always, dtype=np.int64)


@njit(cache=True)
def _enumerate(pred_ptr, preds, cand_ptr, cands, always, n_units, words, limit):
    """Every ideal once, by reverse search: an ideal's parent drops its highest-numbered unit, so a
    child adds a unit numbered above the parent's highest whose predecessors are all present. The
    units tried are `_candidates`' for that highest unit, merged in increasing order."""
    cap = 1024
    bits = np.zeros((cap, words), dtype=np.uint64)
    count = 1
    stack = np.zeros(n_units + 2, dtype=np.int64)
    # Depth-first over the reverse-search tree; stack holds ideal ids, the next candidate of each
    # list kept apart.
    next_listed = np.zeros(n_units + 2, dtype=np.int64)
    next_always = np.zeros(n_units + 2, dtype=np.int64)
    high = np.zeros(n_units + 2, dtype=np.int64)
    depth = 0
    stack[0] = 0
    high[0] = -1
    next_listed[0] = cand_ptr[0]
    next_always[0] = 0
    while depth >= 0:
        cur = stack[depth]
        i, j = next_listed[depth], next_always[depth]
        end = cand_ptr[high[depth] + 2]
        if i >= end and j >= len(always):
            depth -= 1
            continue
        if j >= len(always) or (i < end and cands[i] < always[j]):
            v = cands[i]
            next_listed[depth] = i + 1
        else:
            v = always[j]
            next_always[depth] = j + 1
        ok = True
        for k in range(pred_ptr[v], pred_ptr[v + 1]):
            p = preds[k]
            if (bits[cur, p >> 6] >> np.uint64(p & 63)) & np.uint64(1) == 0:
                ok = False
                break
        if not ok:
            continue
        if count >= limit:
            return bits[:0], -1
        if count == cap:
            cap *= 2
            nb = np.zeros((cap, words), dtype=np.uint64)
            nb[:count] = bits[:count]
            bits = nb
        bits[count] = bits[cur]
        bits[count, v >> 6] |= np.uint64(1) << np.uint64(v & 63)
        depth += 1
        stack[depth] = count
        high[depth] = v
        next_listed[depth] = cand_ptr[v + 1]
        next_always[depth] = np.searchsorted(always, v + 1)
        count += 1
    return bits[:count], count


@njit(cache=True)
def _hash_rows(bits, keys):
    h = np.zeros(bits.shape[0], dtype=np.uint64)
    for i in range(bits.shape[0]):
        x = np.uint64(0)
        for w in range(bits.shape[1]):
            x ^= bits[i, w] * keys[w]
            x = (x << np.uint64(13)) | (x >> np.uint64(51))
        h[i] = x
    return h


@njit(cache=True)
def _down_edges(bits, hashes, table, mask, keys, succ_ptr, succs, n_units):
    """For each ideal and each maximal unit u in it, the id of the ideal without u."""
    n = bits.shape[0]
    words = bits.shape[1]
    ptr = np.zeros(n + 1, dtype=np.int64)
    cap = n * 4 + 16
    down_ideal = np.zeros(cap, dtype=np.int64)
    down_unit = np.zeros(cap, dtype=np.int64)
    row = np.zeros(words, dtype=np.uint64)
    m = 0
    for i in range(n):
        for u in range(n_units):
            if (bits[i, u >> 6] >> np.uint64(u & 63)) & np.uint64(1) == 0:
                continue
            maximal = True
            for k in range(succ_ptr[u], succ_ptr[u + 1]):
                s = succs[k]
                if (bits[i, s >> 6] >> np.uint64(s & 63)) & np.uint64(1) != 0:
                    maximal = False
                    break
            if not maximal:
                continue
            row[:] = bits[i]
            row[u >> 6] &= ~(np.uint64(1) << np.uint64(u & 63))
            x = np.uint64(0)
            for w in range(words):
                x ^= row[w] * keys[w]
                x = (x << np.uint64(13)) | (x >> np.uint64(51))
            slot = x & mask
            found = -1
            while table[slot] >= 0:
                j = table[slot]
                if hashes[j] == x:
                    same = True
                    for w in range(words):
                        if bits[j, w] != row[w]:
                            same = False
                            break
                    if same:
                        found = j
                        break
                slot = (slot + np.uint64(1)) & mask
            if m == cap:
                cap *= 2
                a = np.zeros(cap, dtype=np.int64)
                a[:m] = down_ideal[:m]
                down_ideal = a
                b = np.zeros(cap, dtype=np.int64)
                b[:m] = down_unit[:m]
                down_unit = b
            down_ideal[m] = found
            down_unit[m] = u
            m += 1
        ptr[i + 1] = m
    return ptr, down_ideal[:m], down_unit[:m]


@njit(cache=True)
def _fill_table(hashes, mask):
    table = np.full(int(mask) + 1, -1, dtype=np.int64)
    for i in range(hashes.shape[0]):
        slot = hashes[i] & mask
        while table[slot] >= 0:
            slot = (slot + np.uint64(1)) & mask
        table[slot] = i
    return table


def successors(pred_units: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    out: list[list[int]] = [[] for _ in pred_units]
    for v, ps in enumerate(pred_units):
        for p in ps:
            out[p].append(v)
    return tuple(tuple(x) for x in out)


def pendants(pred_units: tuple[tuple[int, ...], ...], work: np.ndarray) -> list[tuple[int, tuple[int, ...]]]:
    """Side branches that end the graph: (attachment unit v, the branch's units), where the branch
    is everything below one successor w of v, nothing outside it but v feeds it, and some other
    branch below v holds more work (so the main line is never taken for a side branch). An
    auxiliary classifier is one. Such a branch multiplies the ideals of everything beside it."""
    succ = successors(pred_units)
    # A branch larger than this is taken for the main line without listing it all: listing every
    # branch of every fork is quadratic (minutes on a 20,000-unit graph). Inception's auxiliary
    # classifier, the side branch this is for, has about ten units.
    cap = 512
    # A successor from which the last unit is reached leads (back) to the main line: it is taken
    # for the main line unwalked, as a branch over `cap` is (walking every fork's main line was most
    # of a 50,000-node graph's planning time).
    main = [False] * len(succ)
    for u in range(len(succ) - 1, -1, -1):
        main[u] = u == len(succ) - 1 or any(main[s] for s in succ[u])
    found: list[tuple[int, frozenset[int]]] = []
    for v, ws in enumerate(succ):
        if len(ws) < 2:
            continue
        below = {w: None if main[w] else _descendants(w, succ, cap) for w in ws}
        weight = {w: np.inf if b is None else float(work[list(b)].sum()) for w, b in below.items()}
        heaviest = max(ws, key=lambda w: weight[w])
        for w in ws:
            branch = below[w]
            if w != heaviest and branch is not None and all(p in branch or p == v for u in branch
                                                             for p in pred_units[u]):
                found.append((v, frozenset(branch)))
    # A branch inside another one is merged with it anyway.
    return [(v, tuple(sorted(b))) for v, b in found if not any(b < other for _, other in found)]


def _descendants(start: int, succ: tuple[tuple[int, ...], ...], cap: int) -> set[int] | None:
    """Everything reachable from `start` (itself included), or None when that is more than `cap` units."""
    seen, stack = {start}, [start]
    while stack:
        for nxt in succ[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                if len(seen) > cap:
                    return None
                stack.append(nxt)
    return seen


def enumerate_ideals(pred_units: tuple[tuple[int, ...], ...], limit: int = DEFAULT_IDEAL_LIMIT) -> IdealLattice:
    """All ideals of the DAG given by each unit's predecessors (units numbered topologically)."""
    n_units = len(pred_units)
    words = max(1, (n_units + 63) // 64)
    pred_ptr, preds = csr(pred_units)
    succ_ptr, succs = csr(successors(pred_units))
    bits, count = _enumerate(pred_ptr, preds, *_candidates(pred_units), n_units, words, limit)
    if count < 0:
        raise PlacewiseError(
            f"the graph's {n_units} units have more than {limit:,} ideals (contiguous cut points), too many for the exact "
            "DP; coarsen the graph (layer granularity) or use another solver (--solver ip)")
    size = np.zeros(count, dtype=np.int64)
    for w in range(words):
        size += np.bitwise_count(bits[:, w]).astype(np.int64)
    order = np.argsort(size, kind="stable")
    bits = np.ascontiguousarray(bits[order])
    size = size[order]
    keys = np.random.default_rng(12345).integers(1, 2**63, size=words, dtype=np.int64).astype(np.uint64) | np.uint64(1)
    hashes = _hash_rows(bits, keys)
    table_size = 1 << int(np.ceil(np.log2(max(2 * count, 16))))
    mask = np.uint64(table_size - 1)
    table = _fill_table(hashes, mask)
    down_ptr, down_ideal, down_unit = _down_edges(bits, hashes, table, mask, keys, succ_ptr, succs, n_units)
    assert (down_ideal >= 0).all(), "every ideal minus a maximal unit is an ideal"
    return IdealLattice(bits, size, down_ptr, down_ideal, down_unit)


def chain_lattice(n_units: int, order: np.ndarray) -> IdealLattice:
    """The prefixes of one topological order: a sub-lattice whose pairs are the order's segments."""
    words = max(1, (n_units + 63) // 64)
    bits = np.zeros((n_units + 1, words), dtype=np.uint64)
    for k, u in enumerate(order):
        bits[k + 1] = bits[k]
        bits[k + 1, u >> 6] |= np.uint64(1) << np.uint64(u & 63)
    size = np.arange(n_units + 1, dtype=np.int64)
    down_ptr = np.concatenate([[0], np.arange(n_units + 1, dtype=np.int64)])
    down_ideal = np.arange(n_units, dtype=np.int64)
    down_unit = np.asarray(order, dtype=np.int64)
    return IdealLattice(bits, size, down_ptr, down_ideal, down_unit)
