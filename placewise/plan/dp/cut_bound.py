"""A lower bound on the best contiguous split that counts transfers: the cut bound.

A contiguous split on k devices is a chain of ideals (down-sets of the unit DAG)
∅ = I_0 ⊆ I_1 ⊆ ... ⊆ I_k = V; stage s is S = I_s minus I_{s-1}. With w a unit's least time on any
kind, a port p (`Units`: owner and targets, the hyperedge e_p) is paid by S when S meets e_p without
holding all of it. Say an ideal I *cuts* p when it meets e_p without holding all of it. Then:

1. A port cut by exactly one of I_{s-1}, I_s is paid by S (if I_{s-1} misses e_p, S meets it where
   I_s does and misses what I_s misses; if I_s holds e_p, S holds the part I_{s-1} misses).
2. A port cut by both has x in I_{s-1} and y outside I_s (x ≠ y, y not an ancestor of x), so S
   misses the ancestors of x and the descendants of y (disjoint sets): w(S) <= W - A(x) - D(y), with
   A, D the least time of a unit's ancestors and descendants (itself included). Let span(p) be the
   largest such value over pairs of e_p. A stage with w(S) > span(p) cannot have p cut by both.
3. So for the *short* ports (span < tau), a stage of least time w(S) >= tau pays
   c_tau(I_{s-1}) + c_tau(I_s) on top of w(S) (each cut short port once, none counted twice), with
   c_tau(I) the cost of the short ports I cuts. The first and last stages pay c_tau of their one
   inner boundary whatever their size (nothing is cut by ∅ or V).
3'. Where the boundaries lie tells more: with I_{s-1} of weight at most b and I_s at least a', a
   port can be cut by both only if some pair of e_p has A(x) <= b and W - D(y) >= a' (`_danger`).
   So a stage pays c(I_{s-1}) + c(I_s), every port counted, less twice the cost of those ports.
   On NASNet-A Mobile (parallel branches make most spans longer than a stage) this lifted the
   bound on 8 accelerators from 86.95 to 100.19, the best split known being 100.69.
4. An ideal of least time x in [a, b] holds every unit whose descendants weigh more than W - a,
   and no unit whose ancestors weigh more than b; so c_tau(I) >= G[a, b], the least c_tau over
   ideals holding the first and missing the second: a minimum cut (max-flow, `_Network`), with
   costs rounded down to integers, so the profile G never exceeds the true one; Lagrange
   multipliers on the weight limits tighten it (`_profile`).
5. Over the weight grid of intervals, a DP over k boundaries takes for each stage the least load
   these facts allow (the least stage time between the intervals, plus both G of every port less
   the danger, or plus both G when that least time is at least tau, for the best of a few tau per
   stage) and minimises the largest; fewer stages are
   chains with empty stages. No chain can do better, so its value is a lower bound on every split's
   max-load, replicated copies and memory only adding to it.

It applies when every kind pays transfers (a shared-memory CPU core pays none) and the units are
few enough for their ancestor sets; otherwise it is 0 and the work bound stands alone. Each minimum
cut's source side is an ideal with a cheap cut for its weight: they are kept (`CutBound.ideals`) as
the boundaries that `dp.ideal_chains` builds an upper bound from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from placewise.plan.dp.problem import SLACK, Problem, least_work
from placewise.plan.units import Units

# Above this many units the ancestor sets (units^2 bits) and the max-flows cost more than they give.
MAX_UNITS = 4000
# Weight intervals of the profiles (every port's is also computed on the fine grid: on NASNet-A
# Mobile, 8 accelerators, 256 intervals gave 98.85 and 1,024 gave 100.19, the best split being
# 100.69), and the short-port thresholds tried (quantiles of the spans).
INTERVALS = 256
FINE_INTERVALS = 1024
TAU_QUANTILES = (0.8, 0.6, 0.45, 0.3, 0.15)  # every port's profile stands for 1.0 (3')
# Lagrange multipliers on an interval's weight limits, as multiples of the ports' cost per weight.
MULTIPLIERS = (0.03, 0.1, 0.3)
# Port costs are scaled to integers below this for the max-flow (rounded down: the cut stays below).
SCALE_TOTAL = 2 ** 40


@dataclass
class CutBound:
    """The bound (0 when it does not apply or ran out of time) and the distinct ideals its minimum
    cuts found, in the order found (`ideals`: bool, ideals x units)."""

    value: float = 0.0
    found: dict[bytes, np.ndarray] = field(default_factory=dict)
    # What the chain bound was computed from, for `dp.exact_cuts` to tighten: the fine grid's
    # edges, every port's profile on it, the danger, the short ports' profiles, W, devices.
    grid: "tuple[np.ndarray, np.ndarray, np.ndarray, list, float, int] | None" = None

    def add(self, ideal: np.ndarray, first: bool = False) -> None:
        """Keep a new ideal last, or `first` (an exact cut's: the ideal chains may keep only the
        first `ideal_chains.MAX_IDEALS`)."""
        key = np.packbits(ideal).tobytes()
        if first:
            self.found.pop(key, None)
            self.found = {key: ideal, **self.found}
        else:
            self.found.setdefault(key, ideal)

    def ideals(self, n: int) -> np.ndarray:
        return np.array(list(self.found.values())) if self.found else np.zeros((0, n), dtype=bool)


def cut_bound(units: Units, problem: Problem, deadline: float | None = None) -> CutBound:
    """The cut bound on the max-load of every contiguous split (see the module docstring)."""
    n = units.count
    out = CutBound()
    if n == 0 or n > MAX_UNITS or not problem.pays_transfers.all() or len(units.port_cost) == 0:
        return out
    devices = int(sum(k.count for k in problem.kinds))
    w = least_work(units, problem)[0]
    total = float(w.sum())
    anc = _ancestors(units.pred_units)
    up = anc.astype(float) @ w  # A(u): ancestors and u
    down = anc.T.astype(float) @ w  # D(u): descendants and u
    span = _spans(units, anc, up, down, total)
    fine = np.linspace(0.0, total, FINE_INTERVALS + 1)
    coarse = fine[::FINE_INTERVALS // INTERVALS]  # every coarse interval a union of fine ones
    everything = np.ones(len(span), dtype=bool)
    # The profiles by what they give per second: every port's on the coarse grid, then on the fine
    # one, then the short ports' (6 for the tau of the spans' quantile q, on the coarse grid).
    runs = [(None, coarse), (None, fine)] + [(float(np.quantile(span, q)) * (1 + 1e-9) + SLACK * (1 + total), coarse)
                                             for q in TAU_QUANTILES]
    full, profiles = None, []
    for tau, edges in runs:
        if deadline is not None and time.perf_counter() > deadline:
            break
        profile = _profile(units, everything if tau is None else span < tau, w, anc, up, down, edges, deadline, out)
        if profile is None:
            break
        profile = np.repeat(profile, (len(fine) - 1) // (len(edges) - 1))  # a fine cell lies in its interval
        if tau is None:
            full = profile if full is None else np.maximum(full, profile)
        else:
            profiles.append((tau, profile))
    if full is not None:
        out.grid = (fine, full, _danger(units, anc, up, down, fine, total), profiles, total, devices)
        out.value = chain_bound(*out.grid)[0]
    return out


def _ancestors(pred: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """anc[u, v]: v is u or an ancestor of u (units are in topological order)."""
    n = len(pred)
    anc = np.zeros((n, n), dtype=bool)
    for u in range(n):
        anc[u, u] = True
        for v in pred[u]:
            anc[u] |= anc[v]
    return anc


def _spans(units: Units, anc: np.ndarray, up: np.ndarray, down: np.ndarray, total: float) -> np.ndarray:
    """Per port, the most least time a stage can have while both its boundaries cut the port."""
    out = np.empty(len(units.port_cost))
    for p in range(len(out)):
        members = np.unique(np.concatenate(
            [[units.port_owner[p]], units.port_targets[units.port_target_ptr[p]:units.port_target_ptr[p + 1]]]))
        # Pairs (x, y), x != y, y not an ancestor of x (which cannot lie outside an ideal holding x).
        allowed = ~anc[np.ix_(members, members)] & ~np.eye(len(members), dtype=bool)
        values = total - up[members][:, None] - down[members][None, :]
        out[p] = values[allowed].max(initial=-np.inf)
    return out


def _profile(units: Units, short: np.ndarray, w: np.ndarray, anc: np.ndarray, up: np.ndarray, down: np.ndarray,
             edges: np.ndarray, deadline: float | None, found: CutBound) -> np.ndarray | None:
    """Per weight interval [a, b], a lower bound on the short ports' cut cost of any ideal weighing
    within it (inf: no ideal does); None when out of time. Each cut's ideal is added to `found`.
    Besides the forced units, the weight limits enter by Lagrange multipliers: for lam, mu >= 0 and
    a <= w(I) <= b, c(I) >= c(I) + lam (a - w(I)) + mu (w(I) - b), whose least over ideals is again
    a cut (lam w(u) to leave u out, mu w(u) to take it in); capacities are rounded down, so each
    value stays below."""
    n, total = units.count, float(w.sum())
    rate = float(units.port_cost[short].sum()) / max(total, 1e-300)  # cost per unit of weight
    pairs = [(0.0, 0.0)] + [(m * rate, 0.0) for m in MULTIPLIERS] + [(0.0, m * rate) for m in MULTIPLIERS]
    scale = SCALE_TOTAL / max(float(units.port_cost[short].sum()) + 2 * max(MULTIPLIERS) * rate * total, 1e-300)
    network = _Network(units, short, scale)
    profile = np.empty(len(edges) - 1)
    for i in range(len(profile)):
        if deadline is not None and time.perf_counter() > deadline:
            return None
        a, b = edges[i], edges[i + 1]
        must_in = total - down < a - SLACK * (1 + total)
        must_out = up > b + SLACK * (1 + total)
        if anc[must_in].any(axis=0)[must_out].any():
            profile[i] = np.inf  # no ideal weighs within [a, b]
            continue
        best = 0.0
        for lam, mu in pairs:
            network.cap[network.source_arcs] = np.where(must_in, INFINITE, np.floor(lam * w * scale).astype(np.int64))
            network.cap[network.sink_arcs] = np.where(must_out, INFINITE, np.floor(mu * w * scale).astype(np.int64))
            flow, level = _max_flow(network.head, network.to, network.rev, network.tail, network.cap, n, n + 1)
            cut = flow / scale
            # The units the source still reaches: a minimum cut's source side, an ideal (infinite
            # arcs lead from each unit to its predecessors).
            found.add(level[:n] >= 0)
            # The constant part, less a margin for its rounding.
            best = max(best, cut + lam * (a - total) - mu * b - SLACK * (1 + (lam + mu) * total))
        profile[i] = best
    return profile


# An arc that a cut may never cross; finite cuts stay below SCALE_TOTAL, far from it.
INFINITE = 2 ** 62


class _Network:
    """The ideal cut problem as a flow network (source side = the ideal): an infinite arc from each
    unit to its predecessors (an ideal holds them), and per port p an arc in_p -> out_p of its cost
    with infinite arcs v -> in_p and out_p -> v for its units v (a cut that splits them crosses it).
    Nodes: units, source, sink, then in_p, out_p per short port. CSR arcs, each with its reverse."""

    def __init__(self, units: Units, short: np.ndarray, scale: float) -> None:
        n = units.count
        tails, heads, caps = [], [], []
        for u, preds in enumerate(units.pred_units):
            for v in preds:
                tails.append(u), heads.append(v), caps.append(INFINITE)
        first_source = len(tails)
        for u in range(n):
            tails.append(n), heads.append(u), caps.append(0)
            tails.append(u), heads.append(n + 1), caps.append(0)
        node = n + 2
        for p in np.flatnonzero(short):
            members = {int(units.port_owner[p])} | {
                int(t) for t in units.port_targets[units.port_target_ptr[p]:units.port_target_ptr[p + 1]]}
            tails.append(node), heads.append(node + 1), caps.append(int(np.floor(units.port_cost[p] * scale)))
            for v in members:
                tails += [v, node + 1]
                heads += [node, v]
                caps += [INFINITE, INFINITE]
            node += 2
        tail = np.array(tails, dtype=np.int64)
        # Arc e at 2e, its reverse (no capacity) at 2e + 1; sorted by tail for CSR.
        both_tail = np.stack([tail, np.array(heads, dtype=np.int64)], axis=1).ravel()
        both_cap = np.stack([np.array(caps, dtype=np.int64), np.zeros(len(caps), dtype=np.int64)], axis=1).ravel()
        order = np.argsort(both_tail, kind="stable")
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        self.tail = both_tail[order]
        self.to = both_tail[order ^ 1]
        self.rev = position[order ^ 1]
        self.cap = both_cap[order]
        self.head = np.searchsorted(self.tail, np.arange(node + 1)).astype(np.int64)
        self.source_arcs = position[2 * (first_source + 2 * np.arange(n))]
        self.sink_arcs = position[2 * (first_source + 2 * np.arange(n) + 1)]


@njit(cache=True)
def _max_flow(head, to, rev, tail, cap0, source, sink):  # pragma: no cover - compiled
    """Dinic's maximum flow (integer capacities), iterative so that numba compiles it, and the final
    BFS levels (>= 0: reached from the source in the residual network, a minimum cut's source side)."""
    cap = cap0.copy()
    n = len(head) - 1
    level = np.empty(n, dtype=np.int64)
    nxt = np.empty(n, dtype=np.int64)
    queue = np.empty(n, dtype=np.int64)
    path = np.empty(n, dtype=np.int64)
    flow = 0
    while True:
        level[:] = -1
        level[source] = 0
        queue[0], lo, hi = source, 0, 1
        while lo < hi:
            v = queue[lo]
            lo += 1
            for a in range(head[v], head[v + 1]):
                if cap[a] > 0 and level[to[a]] < 0:
                    level[to[a]] = level[v] + 1
                    queue[hi] = to[a]
                    hi += 1
        if level[sink] < 0:
            return flow, level
        nxt[:] = head[:-1]
        while True:
            depth, v = 0, source
            while v != sink:
                while nxt[v] < head[v + 1] and not (cap[nxt[v]] > 0 and level[to[nxt[v]]] == level[v] + 1):
                    nxt[v] += 1
                if nxt[v] < head[v + 1]:
                    path[depth] = nxt[v]
                    depth += 1
                    v = to[nxt[v]]
                elif depth == 0:
                    break
                else:  # a dead end: drop it from this phase and step back
                    level[v] = -1
                    depth -= 1
                    v = tail[path[depth]]
                    nxt[v] += 1
            if v != sink:
                break
            push = cap[path[0]]
            for i in range(1, depth):
                push = min(push, cap[path[i]])
            for i in range(depth):
                cap[path[i]] -= push
                cap[rev[path[i]]] += push
            flow += push


def _danger(units: Units, anc: np.ndarray, up: np.ndarray, down: np.ndarray, edges: np.ndarray,
            total: float) -> np.ndarray:
    """danger[i, j]: the cost of the ports that a stage from a boundary I in interval i to a boundary
    J in interval j can have cut by both. Such a port has x in I and y outside J (x != y, y not an
    ancestor of x), so w(I) >= A(x) and w(J) <= W - D(y): A(x) <= hi_i and lo_j <= W - D(y). Every
    other port cut by I or by J is cut by one of them only, and so paid by the stage (fact 1)."""
    lo, hi = edges[:-1], edges[1:]
    m = len(lo)
    margin = SLACK * (1 + total)
    corners = np.zeros((m + 1, m + 1))  # a 2-D difference array of the ports' dangerous regions
    for p in range(len(units.port_cost)):
        members = np.unique(np.concatenate(
            [[units.port_owner[p]], units.port_targets[units.port_target_ptr[p]:units.port_target_ptr[p + 1]]]))
        xs, ys = np.nonzero(~anc[np.ix_(members, members)] & ~np.eye(len(members), dtype=bool))
        if len(xs) == 0:
            continue
        first_i = np.searchsorted(hi, up[members[xs]] - margin)  # the first interval that can hold x
        last_j = np.searchsorted(lo, total - down[members[ys]] + margin, side="right") - 1
        # The union of the quadrants i >= first_i, j <= last_j: a staircase of disjoint rectangles.
        order = np.argsort(first_i, kind="stable")
        starts, reach = first_i[order], np.maximum.accumulate(last_j[order])
        ends = np.append(starts[1:], m)
        for a, b, r in zip(starts, ends, reach):
            if a < b and r >= 0:
                corners[a, 0] += units.port_cost[p]
                corners[b, 0] -= units.port_cost[p]
                corners[a, r + 1] -= units.port_cost[p]
                corners[b, r + 1] += units.port_cost[p]
    return np.cumsum(np.cumsum(corners, axis=0), axis=1)[:m, :m]


def chain_bound(edges: np.ndarray, full: np.ndarray, danger: np.ndarray, profiles: list[tuple[float, np.ndarray]],
                total: float, devices: int) -> tuple[float, list[int]]:
    """The least largest stage load over chains of at most `devices` boundaries placed in intervals,
    and the intervals of one chain that has it. An inner stage pays its least time, both
    boundaries' cut of every port (`full`) less twice the ports it may not pay (`danger`), or, where
    its least time allows a (tau, profile) pair, both boundaries' cut of the short ports; the larger."""
    lo, hi = edges[:-1], edges[1:]
    # Inner stage from a boundary in interval i to one in interval j: its least time, and its cuts.
    least = np.maximum(lo[None, :] - hi[:, None], 0.0)
    with np.errstate(invalid="ignore"):
        inner = np.maximum(least, least + full[:, None] + full[None, :] - 2 * danger)
    for tau, profile in profiles:
        with np.errstate(invalid="ignore"):
            inner = np.where(least >= tau, np.maximum(inner, least + profile[:, None] + profile[None, :]), inner)
    # Every port cut by a boundary is paid by a first or last stage (nothing is cut by ∅ or V).
    cuts = np.max([full] + [profile for _, profile in profiles], axis=0)
    inner[lo[None, :] < lo[:, None]] = np.inf  # boundaries move forward (an ideal at a shared end: either)
    inner[~np.isfinite(cuts)[:, None] | ~np.isfinite(cuts)[None, :]] = np.inf
    first = lo + cuts  # from ∅: pays every cut of its boundary
    last = total - hi + cuts  # to V
    best, chain, reach, back = total, [], first, []
    for _ in range(devices - 1):
        ends = np.maximum(reach, last)
        j = int(np.argmin(ends))
        if ends[j] < best:
            best, chain = float(ends[j]), [j]
            for arg in reversed(back):  # the boundaries before j, back to the first
                chain.append(int(arg[chain[-1]]))
        step = np.maximum(reach[:, None], inner)
        back.append(np.argmin(step, axis=0))
        reach = step[back[-1], np.arange(len(reach))]
    return best, chain[::-1]
