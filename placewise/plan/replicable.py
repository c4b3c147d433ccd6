"""Replicable nodes: cheap values with small outputs that every stage reading them recomputes.

Tensor sizes, attention masks, position ids, rotary tables and lifted constants depend only on the
model's inputs and constants, cost next to nothing and are read all along a model. In the ideal
lattice each of them may sit anywhere between its inputs and its first reader, so k of them
multiply the number of ideals by up to the product of their spans (GPT-2's operator graph: one size
node read by 109 operators, 24 lifted constants each read by one far-away layer). Replicating them
removes them from the lattice without changing what the pipeline computes.

The rule (`ReplicationRule`), applied to the forward graph:
- only graphs that give output sizes (edge bytes) replicate anything;
- a node is a *candidate* when it is a forward node supported on accelerators whose accelerator and
  CPU times are each at most `time_fraction` of the graph's total time of that kind, whose output's
  transfer cost is at most `output_fraction` of the median positive transfer cost, that the graph
  says holds no parameters (the profiler and PipeDream's format say; the paper's does not), and whose
  colocation mates are backward nodes with no edges (no gradient flows through it);
- the *replicable* set R is the largest set of candidates closed under predecessors (every
  predecessor of a node in R is in R: it depends only on model inputs and constants, so any stage
  can recompute it), less the nodes from which no node outside R can be reached (nothing keeps
  them: they are not replicated, just placed);
- the cost of a split under replication: a device pays, besides its own nodes outside R, the time
  and memory of every replicable node (with its backward mates) that some node of its own outside R
  needs, once per device; edges out of replicable nodes carry nothing. `needs(v)` is every node of R
  from which v is reached through R only (the closure a stage must recompute to compute v's inputs).

Pure data (an OpGraph in, arrays out); nothing here knows solvers or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import numpy as np

from placewise.graph import DeviceKind, OpGraph

# Relative to the graph: a replicable node's time per kind at most this share of the graph's total.
TIME_FRACTION = 1e-3
# ... and its output's transfer cost at most this share of the median positive transfer cost.
OUTPUT_FRACTION = 0.1


@dataclass(frozen=True)
class ReplicationRule:
    """Which nodes may be replicated (see the module's docstring); `enabled=False` replicates none."""

    enabled: bool = True
    time_fraction: float = TIME_FRACTION
    output_fraction: float = OUTPUT_FRACTION


@dataclass(frozen=True)
class Replication:
    """The replicable nodes of one graph and what each other node needs of them (dense indices)."""

    replicable: np.ndarray  # bool per node: in R, or a backward mate of a node in R
    needs: tuple[tuple[int, ...], ...]  # per node outside R: the forward nodes of R it needs; () inside R
    mates: tuple[tuple[int, ...], ...]  # per forward node of R: it and its backward mates
    reasons: dict[str, int]  # why candidates were not replicated, counted (for the report)
    attached: tuple[tuple[int, int], ...] = ()  # (dead-end check, the node it runs with)

    @property
    def count(self) -> int:
        """Forward nodes replicated."""
        return sum(1 for m in self.mates if m)

    @property
    def any(self) -> bool:
        return bool(self.replicable.any())

    def closure(self, nodes) -> set[int]:
        """The forward nodes of R that a device holding `nodes` (dense indices) recomputes."""
        out: set[int] = set()
        for v in nodes:
            if not self.replicable[v]:
                out.update(self.needs[v])
        return out

    def copies(self, nodes) -> list[int]:
        """Every node (with backward mates) a device holding `nodes` pays for as its own copy."""
        return [i for r in sorted(self.closure(nodes)) for i in self.mates[r]]


def _empty(n: int) -> Replication:
    return Replication(np.zeros(n, dtype=bool), tuple(() for _ in range(n)), tuple(() for _ in range(n)), {})


def _mates(graph: OpGraph) -> list[list[int]]:
    """Per node, the other nodes of its colocation class."""
    out: list[list[int]] = [[] for _ in graph.nodes]
    for group in graph.colocation_groups:
        for i in group:
            out[i] = [j for j in group if j != i]
    return out


def _candidates(graph: OpGraph, rule: ReplicationRule) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(cheap, candidate, reasons): cheap forward nodes (time, output, no parameters), and those of
    them that may also be replicated (no gradient through them, no forward colocation mate)."""
    n = len(graph.nodes)
    forward = ~graph.is_backward
    reasons: dict[str, int] = {}
    ok = forward & graph.supported

    def drop(mask: np.ndarray, why: str) -> None:
        hit = int((ok & ~mask).sum())
        if hit:
            reasons[why] = reasons.get(why, 0) + hit
        ok[:] &= mask

    for times, kind in ((graph.acc_time, "accelerator"), (graph.cpu_time, "CPU")):
        total = float(times.sum())
        drop(times <= rule.time_fraction * total, f"{kind} time over {rule.time_fraction:g} of the graph's")
    positive = graph.out_cost[graph.out_cost > 0]
    limit = rule.output_fraction * float(np.median(positive)) if len(positive) else 0.0
    drop(graph.out_cost <= limit, f"output over {rule.output_fraction:g} of the median transfer")
    # A node with parameters cannot be copied (the copies' weights would diverge); a graph that does
    # not say what a node holds (the paper's format) replicates nothing.
    drop(np.array([n.parameters is not None and n.parameters <= 0 for n in graph.nodes], dtype=bool),
         "holds parameters, or the graph does not say")
    has_edges = np.zeros(n, dtype=bool)
    for u, v in graph.edge_array:
        has_edges[u] = has_edges[v] = True
    mates = _mates(graph)
    lone = np.array([all(graph.is_backward[j] and not has_edges[j] for j in mates[i]) for i in range(n)], dtype=bool)
    cheap = ok.copy()
    drop(lone, "has a gradient or a forward colocation mate")
    return cheap, ok, reasons


@lru_cache(maxsize=16)
def replication_of(graph: OpGraph) -> Replication:
    """`find_replicable` under the default rule, computed once per graph (the cost model's view)."""
    return find_replicable(graph)


def find_replicable(graph: OpGraph, rule: ReplicationRule | None = None) -> Replication:
    """The replicable nodes of `graph` under `rule` (default: the stated rule, enabled)."""
    rule = rule or ReplicationRule()
    n = len(graph.nodes)
    # Without output sizes (the paper's format) nothing says an output is small.
    if not rule.enabled or all(e.bytes is None for e in graph.edges):
        return _empty(n)
    cheap, ok, reasons = _candidates(graph, rule)
    forward = ~graph.is_backward
    # Closed under forward predecessors, in topological order.
    inside = np.zeros(n, dtype=bool)
    for v in graph.topological_order:
        if ok[v] and all(inside[p] for p in graph.pred[v] if forward[p]):
            inside[v] = True
    closed_out = int((ok & ~inside).sum())
    if closed_out:
        reasons["reads a node that is not replicable"] = closed_out
    # Keep only nodes from which a node outside R is reached (walk backwards from such readers).
    kept = np.zeros(n, dtype=bool)
    for v in reversed(graph.topological_order):
        if inside[v]:
            kept[v] = any((forward[s] and not inside[s]) or kept[s] for s in graph.succ[v])
    unread = int((inside & ~kept).sum())
    if unread:
        reasons["read by no node outside the replicable set"] = unread
    mates = _mates(graph)
    replicable = kept.copy()
    for r in np.flatnonzero(kept):
        replicable[mates[r]] = True
    needs = _needs(graph, kept, replicable)
    mate_lists = tuple((int(i), *sorted(mates[i])) if kept[i] else () for i in range(n))
    return Replication(replicable, needs, mate_lists, reasons, _dead_ends(graph, cheap, kept))


def _needs(graph: OpGraph, kept: np.ndarray, replicable: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """Per node outside R, the closure of its R-predecessors (built over R in topological order)."""
    forward = ~graph.is_backward
    ancestors: dict[int, frozenset[int]] = {}
    for v in graph.topological_order:
        if kept[v]:
            ancestors[v] = frozenset({v}).union(*(ancestors[p] for p in graph.pred[v] if forward[p]))
    needs = []
    for v in range(len(graph.nodes)):
        got: set[int] = set()
        if not replicable[v]:
            for p in graph.pred[v]:
                if kept[p]:
                    got |= ancestors[p]
        needs.append(tuple(sorted(got)))
    return tuple(needs)


def _dead_ends(graph: OpGraph, cheap: np.ndarray, kept: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(node, anchor) for dead-end checks: cheap nodes outside R whose outputs lead only to other such
    nodes (shape asserts, unused size reads), grouped into connected pieces; a piece that reads one
    node outside R runs with it, one that reads only R runs with the first node outside R. A piece
    reading several nodes outside R stays a free choice (putting it with one could break contiguity)."""
    forward = ~graph.is_backward
    dead = np.zeros(len(graph.nodes), dtype=bool)
    for v in reversed(graph.topological_order):
        dead[v] = bool(cheap[v] and not kept[v] and all(dead[s] for s in graph.succ[v] if forward[s]))
    if not dead.any():
        return ()
    piece = {int(v): int(v) for v in np.flatnonzero(dead)}

    def find(x: int) -> int:
        while piece[x] != x:
            piece[x] = piece[piece[x]]
            x = piece[x]
        return x

    for v in piece:
        for p in graph.pred[v]:
            if dead[p]:
                piece[find(v)] = find(int(p))
    anchors: dict[int, set[int]] = {}
    for v in piece:
        anchors.setdefault(find(v), set()).update(int(p) for p in graph.pred[v]
                                                  if forward[p] and not dead[p] and not kept[p])
    first = next((int(v) for v in graph.topological_order if forward[v] and not kept[v] and not dead[v]), None)
    out = []
    for v in sorted(piece):
        found = anchors[find(v)]
        anchor = next(iter(found)) if len(found) == 1 else (first if not found else None)
        if anchor is not None:
            out.append((v, anchor))
    return tuple(out)


def attach_dead_ends(graph: OpGraph, replication: Replication) -> OpGraph:
    """`graph` with each dead-end check in one colocation class with its anchor (see `_dead_ends`)."""
    if not replication.attached:
        return graph
    cls = [n.colocate if n.colocate is not None else ("node", i) for i, n in enumerate(graph.nodes)]
    parent: dict = {c: c for c in cls}

    def find(c):
        while parent[c] != c:
            c = parent[c]
        return c

    for v, anchor in replication.attached:
        parent[find(cls[v])] = find(cls[anchor])
    roots = [find(c) for c in cls]
    touched = {find(cls[v]) for v, _ in replication.attached}
    fresh = max((n.colocate for n in graph.nodes if n.colocate is not None), default=-1) + 1
    number = {r: fresh + k for k, r in enumerate(sorted(touched, key=str))}
    return replace(graph, nodes=tuple(replace(n, colocate=number[roots[i]]) if roots[i] in number else n
                                      for i, n in enumerate(graph.nodes)))


@dataclass(frozen=True)
class ReplicationReport:
    """What replication did to one graph: the nodes, why others were not, units and ideals before/after."""

    nodes: tuple[str, ...]  # labels of the replicated forward nodes
    replicated_time: float  # their total accelerator time: the most any one device pays extra
    not_replicated: dict[str, int]
    units_before: int
    units_after: int
    ideals_before: int | None  # None: over the counting limit
    ideals_after: int | None
    limit: int

    def to_notes(self) -> dict:
        def ideals(value: int | None) -> int | str:
            return value if value is not None else f"over {self.limit:,}"
        shown = ", ".join(self.nodes[:8]) + (f" and {len(self.nodes) - 8} more" if len(self.nodes) > 8 else "")
        return {"replicated_nodes": len(self.nodes), "replicated": shown,
                "replicated_time": self.replicated_time, "units_before_replication": self.units_before,
                "units_after_replication": self.units_after, "ideals_before_replication": ideals(self.ideals_before),
                "ideals_after_replication": ideals(self.ideals_after)}


def report(graph: OpGraph, replication: Replication, units_before: int, units_after: int,
           ideals_before: int | None, ideals_after: int | None, limit: int) -> ReplicationReport:
    labels = tuple(graph.nodes[i].label for i, m in enumerate(replication.mates) if m)
    time = float(sum(graph.acc_time[list(m)].sum() for m in replication.mates if m))
    return ReplicationReport(labels, time, dict(replication.reasons), units_before, units_after, ideals_before,
                             ideals_after, limit)


def device_copies(graph: OpGraph, replication: Replication, device_of: np.ndarray, n_devices: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]:
    """Per device, its copies of replicable nodes and what they cost: (accelerator time, CPU time,
    memory, the copied nodes' dense indices), each replicable node (with its backward mates) counted
    once per device that needs it."""
    acc, cpu, mem = np.zeros(n_devices), np.zeros(n_devices), np.zeros(n_devices)
    copied: list[list[int]] = [[] for _ in range(n_devices)]
    needed: set[tuple[int, int]] = set()
    for v in range(len(graph.nodes)):
        d = int(device_of[v])
        if d >= 0 and not replication.replicable[v]:
            needed.update((d, r) for r in replication.needs[v])
    for d, r in needed:
        members = list(replication.mates[r])
        acc[d] += graph.acc_time[members].sum()
        cpu[d] += graph.cpu_time[members].sum()
        mem[d] += graph.memory[members].sum()
        copied[d] += members
    return acc, cpu, mem, copied


def without_replicable(graph: OpGraph, replication: Replication) -> tuple[OpGraph, np.ndarray]:
    """The graph the lattice is built on: `graph` less its replicable nodes and their edges, and
    each of its nodes' dense index in `graph`."""
    keep = np.flatnonzero(~replication.replicable)
    ids = {graph.nodes[i].id for i in keep}
    reduced = replace(graph, nodes=tuple(graph.nodes[i] for i in keep),
                      edges=tuple(e for e in graph.edges if e.src in ids and e.dst in ids))
    return reduced, keep


@dataclass(frozen=True)
class SharedCopies:
    """Replicable nodes as the DP sees them, per unit of the reduced graph.

    Nodes needed by one unit only are paid exactly when that unit is on a device: their cost is
    folded into the unit (`unit_acc`, `unit_cpu`, `unit_memory`). The others are grouped by the set
    of units that need them; a group is paid once by a device holding any of its units.
    """

    unit_acc: np.ndarray
    unit_cpu: np.ndarray
    unit_memory: np.ndarray
    acc: np.ndarray  # per group
    cpu: np.ndarray
    memory: np.ndarray
    needer_ptr: np.ndarray  # CSR over groups: the units that need the group
    needers: np.ndarray

    @property
    def count(self) -> int:
        return len(self.acc)

    def time_on(self, kind: DeviceKind) -> np.ndarray:
        """Per group, its time on one device of `kind` (what a device holding a needer pays)."""
        return (self.acc if kind.accelerator else self.cpu) / kind.speed

    def time_per_kind(self, kinds: Sequence[DeviceKind]) -> np.ndarray:
        """(kinds, groups): `time_on` for each kind, as the DPs' kernels take it."""
        return np.array([self.time_on(kind) for kind in kinds]).reshape(len(kinds), self.count)


def shared_copies(graph: OpGraph, replication: Replication, kept: np.ndarray, unit_of: np.ndarray,
                  n_units: int) -> SharedCopies:
    """Group the replicable nodes by the units (of the reduced graph, whose node k is `kept[k]` in
    `graph`) that need them; see `SharedCopies`."""
    needers: dict[int, set[int]] = {}
    for k, v in enumerate(kept):
        for r in replication.needs[v]:
            needers.setdefault(r, set()).add(int(unit_of[k]))
    unit_acc, unit_cpu, unit_mem = np.zeros(n_units), np.zeros(n_units), np.zeros(n_units)
    groups: dict[tuple[int, ...], list[float]] = {}
    for r, units in needers.items():
        members = list(replication.mates[r])
        cost = [float(graph.acc_time[members].sum()), float(graph.cpu_time[members].sum()),
                float(graph.memory[members].sum())]
        if len(units) == 1:
            (u,) = units
            unit_acc[u] += cost[0]
            unit_cpu[u] += cost[1]
            unit_mem[u] += cost[2]
        else:
            total = groups.setdefault(tuple(sorted(units)), [0.0, 0.0, 0.0])
            for j in range(3):
                total[j] += cost[j]
    keys = sorted(groups)
    ptr = np.zeros(len(keys) + 1, dtype=np.int64)
    for g, key in enumerate(keys):
        ptr[g + 1] = ptr[g] + len(key)
    flat = np.array([u for key in keys for u in key], dtype=np.int64)
    costs = np.array([groups[k] for k in keys], dtype=float).reshape(-1, 3)
    return SharedCopies(unit_acc, unit_cpu, unit_mem, costs[:, 0].copy(), costs[:, 1].copy(), costs[:, 2].copy(),
                        ptr, flat)
