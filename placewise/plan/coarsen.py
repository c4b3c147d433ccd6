"""Coarsening a unit DAG by collapsing single-entry/single-exit regions (NAS cells, attention blocks).

The idea is PipeDream's (`compress_graph_branches`: merge the branches between a fork and the node
where they join), made precise with dominators so that it also covers regions with several entries
(a NASNet cell reads the two previous cells) or several exits. In a DAG whose units are numbered
topologically, a unit with everything it dominates (every path from the start to them passes it) is
a single-entry region, and a unit with everything it post-dominates (every path from them to the
end passes it) a single-exit region. Both are convex, so making one a single unit keeps the DAG
acyclic, and every contiguous split of the coarsened DAG is a contiguous split of the original: the
DP on it gives an upper bound, with a map back to the original units. Each family is laminar
(nested or disjoint); a region crossing one already collapsed is skipped.

Which regions to collapse: the lightest first, while they stay small against a device's share of
the work, until the coarsened DAG fits; refinement then opens the regions next to the cut points
of a plan and solves again.

Pure functions of predecessor lists and per-unit work; nothing here knows solvers or torch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from placewise.graph import OpGraph
from placewise.plan.ideals import successors

Pred = Sequence[Sequence[int]]


@dataclass(frozen=True)
class Region:
    entry: int  # its first unit
    exit: int  # its last unit
    interior: frozenset[int]  # its units, first and last included
    work: float  # their work


@dataclass(frozen=True)
class Coarsening:
    """A coarsened DAG: group k holds original units `groups[k]` (in topological order)."""

    group_of: np.ndarray  # original unit -> group
    groups: tuple[tuple[int, ...], ...]
    pred: tuple[tuple[int, ...], ...]  # the groups' DAG, groups numbered topologically
    collapsed: tuple[Region, ...]

    def expand(self, groups: Sequence[int]) -> list[int]:
        """The original units of some groups."""
        return sorted(u for g in groups for u in self.groups[g])


def _check_topological(pred: Pred) -> None:
    for v, ps in enumerate(pred):
        if any(not 0 <= p < v for p in ps):
            raise ValueError(f"unit {v} has predecessor(s) {list(ps)} not numbered below it; number units topologically")


def immediate_dominators(pred: Pred) -> np.ndarray:
    """idom of each unit, -1 for units reached from the virtual start directly (sources, or units
    two sources reach). Units numbered topologically: a dominator has a lower number."""
    n = len(pred)
    idom = np.full(n, -1, dtype=np.int64)
    for v in range(n):
        ps = list(pred[v])
        if not ps:
            continue
        x = ps[0]
        for y in ps[1:]:
            x = _meet(x, y, idom, lambda a, b: a > b)
            if x < 0:
                break
        idom[v] = x
    return idom


def immediate_post_dominators(pred: Pred) -> np.ndarray:
    """ipdom of each unit, n (the virtual end) for sinks and units two sinks follow."""
    n = len(pred)
    succ = successors(pred)
    ipdom = np.full(n, n, dtype=np.int64)
    for v in range(n - 1, -1, -1):
        ss = succ[v]
        if not ss:
            continue
        x = ss[0]
        for y in ss[1:]:
            x = _meet(x, y, ipdom, lambda a, b: a < b, end=n)
            if x >= n:
                break
        ipdom[v] = x
    return ipdom


def _meet(x: int, y: int, parent: np.ndarray, behind: Callable[[int, int], bool], end: int = -1) -> int:
    """The nearest common ancestor of x and y in a tree given by `parent` (root `end`), where a
    parent is always on the far side of its child in the numbering."""
    while x != y:
        if x == end or y == end:
            return end
        if behind(x, y):
            x = int(parent[x])
        else:
            y = int(parent[y])
    return x


def _subtrees(parent: np.ndarray, root: int, work: np.ndarray, share: float, max_size: int) -> dict[int, list[int]]:
    """Members of every subtree (with its top) of the tree `parent` whose work is at most `share`
    and size at most `max_size`, keyed by its top; `root` is the virtual root, left out."""
    n = len(parent)
    children: list[list[int]] = [[] for _ in range(n)]
    for v in range(n):
        if parent[v] != root:
            children[int(parent[v])].append(v)
    total = np.asarray(work, dtype=float).copy()
    size = np.ones(n, dtype=np.int64)
    # A parent is on the far side of its children in the numbering: accumulate from the near end.
    for v in (range(n) if root >= n else range(n - 1, -1, -1)):
        if parent[v] != root:
            total[parent[v]] += total[v]
            size[parent[v]] += size[v]
    out: dict[int, list[int]] = {}
    for v in range(n):
        if size[v] < 2 or size[v] > max_size or total[v] > share:
            continue
        members, stack = [], [v]
        while stack:
            x = stack.pop()
            members.append(x)
            stack.extend(children[x])
        out[v] = sorted(members)
    return out


def regions(pred: Pred, work: np.ndarray, *, share: float = np.inf, max_size: int = 512) -> list[Region]:
    """The single-entry regions (a unit with everything it dominates) and single-exit regions (a
    unit with everything it post-dominates) of at most `share` work and `max_size` units (a NAS cell
    or a transformer layer has tens; the cap keeps long chains from listing quadratically many),
    smallest first. Each is convex: a path between two members that left it would have to come back in
    through its one entry (or leave twice through its one exit), a cycle."""
    _check_topological(pred)
    n = len(pred)
    found: dict[frozenset[int], Region] = {}
    for parent, root in ((immediate_dominators(pred), -1), (immediate_post_dominators(pred), n)):
        for members in _subtrees(parent, root, work, share, max_size).values():
            inside = frozenset(members)
            if inside not in found:
                found[inside] = Region(members[0], members[-1], inside, float(np.asarray(work)[members].sum()))
    return sorted(found.values(), key=lambda r: (len(r.interior), r.work, r.entry))


def collapse(pred: Pred, chosen: Sequence[Region]) -> Coarsening:
    """The DAG with each chosen region made one group, in the order given. A region that meets
    groups made before is taken only when it holds them wholly (a region around nested ones); one
    that would cut a group is left out (the union of two crossing regions need not be convex)."""
    n = len(pred)
    owner = np.arange(n)
    group: dict[int, set[int]] = {u: {u} for u in range(n)}
    kept: list[Region] = []
    for r in chosen:
        touched = {int(owner[u]) for u in r.interior}
        if any(not group[o] <= r.interior for o in touched):
            continue
        label = min(r.interior)
        for o in touched:
            del group[o]
        group[label] = set(r.interior)
        owner[list(r.interior)] = label
        kept.append(r)
    # Number the groups topologically (the quotient of a DAG by convex groups is a DAG), the
    # group with the earliest first unit first among those ready, so that no collapse keeps the
    # original numbering.
    labels = sorted(group)
    edges: dict[int, set[int]] = {lab: set() for lab in labels}
    for v in range(n):
        for p in pred[v]:
            if owner[p] != owner[v]:
                edges[int(owner[p])].add(int(owner[v]))
    indegree = {lab: 0 for lab in labels}
    for targets in edges.values():
        for t in targets:
            indegree[t] += 1
    ready = [lab for lab in labels if indegree[lab] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        lab = heapq.heappop(ready)
        order.append(lab)
        for t in edges[lab]:
            indegree[t] -= 1
            if indegree[t] == 0:
                heapq.heappush(ready, t)
    number = {lab: k for k, lab in enumerate(order)}
    group_of = np.array([number[int(owner[u])] for u in range(n)], dtype=np.int64)
    preds: list[set[int]] = [set() for _ in order]
    for src, targets in edges.items():
        for t in targets:
            preds[number[t]].add(number[src])
    return Coarsening(group_of, tuple(tuple(sorted(group[lab])) for lab in order),
                      tuple(tuple(sorted(p)) for p in preds), tuple(kept))


def coarsen(pred: Pred, work: np.ndarray, fits: Callable[[Coarsening], bool], *, share: float,
            keep_open: frozenset[int] = frozenset()) -> Coarsening:
    """Collapse regions, lightest first, until `fits` accepts the coarsened DAG.

    Regions heavier than `share` (a device's fair share of the work, say) are never collapsed: a
    stage could not be balanced around them. Regions holding a unit of `keep_open` (the cut points
    being refined) stay open. Regions are added in rounds of doubling size; the first coarsening
    that fits is returned, or the coarsest one tried.
    """
    # Chains are taken too: a light chain beside a branch is what lets the branch's region close.
    candidates = [r for r in regions(pred, work, share=share) if not (r.interior & keep_open)]
    candidates.sort(key=lambda r: r.work)
    current = collapse(pred, [])
    if fits(current):
        return current
    taken = 0
    step = max(1, len(candidates) // 64)
    while taken < len(candidates):
        taken = min(len(candidates), taken + step)
        step *= 2
        current = collapse(pred, candidates[:taken])
        if fits(current):
            return current
    return current


def near_cuts(coarse: Coarsening, stage_of_group: Sequence[int], radius: int = 1) -> frozenset[int]:
    """Original units of the collapsed groups within `radius` groups of a cut of a coarse plan
    (a group whose neighbour in the DAG sits on another stage), to be opened when refining."""
    succ = successors(coarse.pred)
    frontier = {g for g in range(len(coarse.groups))
                if any(stage_of_group[s] != stage_of_group[g] for s in succ[g])
                or any(stage_of_group[p] != stage_of_group[g] for p in coarse.pred[g])}
    near = set(frontier)
    for _ in range(radius):
        near |= {s for g in near for s in succ[g]} | {p for g in near for p in coarse.pred[g]}
    return frozenset(u for g in near if len(coarse.groups[g]) > 1 for u in coarse.groups[g])


def colocated(graph: OpGraph, members: Sequence[Sequence[int]], coarse: Coarsening) -> OpGraph:
    """`graph` with the nodes of every collapsed group in one new colocation class: the coarsened
    problem as a graph (its splits are splits of `graph`). `members` maps units to dense node indices."""
    fresh = max((n.colocate for n in graph.nodes if n.colocate is not None), default=-1) + 1
    colocate: dict[int, int] = {}
    for k, units in enumerate(coarse.groups):
        if len(units) > 1:
            for u in units:
                for i in members[u]:
                    colocate[i] = fresh + k
    return replace(graph, nodes=tuple(replace(n, colocate=colocate.get(i, n.colocate)) for i, n in enumerate(graph.nodes)))
