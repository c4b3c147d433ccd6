"""Units: the one place where operators that must share a device are merged, with the paper's simplifications.

`colocation_classes` merges colocated operators (a forward node with its backward nodes); every
solver that places classes whole starts there. `Colocated` sums the node arrays per class (the
integer programs), `inseparable_blocks` merges classes that reach each other (the latency greedy).

`simplify` grows the classes into the *units* that every contiguous split keeps on one device, by
the simplifications of the paper's code:

- colocation classes are contracted;
- a backward-only class (an "orphan": backward nodes with no forward mate) gets a place in the
  forward order by mirroring its backward edges (b1 -> b2 gives unit(b2) -> unit(b1)), as in the
  paper, so the backward pass runs through the pipeline in reverse;
- strongly connected components of the resulting forward unit graph are fused (a cycle through
  contracted classes can only sit on one device of a contiguous split);
- a unit with no time, whose every edge leads to one other unit, is merged into it when that can
  never make a split worse (no memory that could bind, support kept) — this only removes choices
  that are dominated, so the optimum is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from placewise.graph import Cluster, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.csr import csr
from placewise.plan.replicable import SharedCopies


def colocation_classes(graph: OpGraph) -> tuple[np.ndarray, int]:
    """The colocation class of every dense node index (a fresh class for a node without one),
    numbered by first appearance, and how many classes there are."""
    class_ids: dict[tuple[str, int], int] = {}
    out = np.zeros(len(graph.nodes), dtype=np.int64)
    for i, n in enumerate(graph.nodes):
        key = ("c", n.colocate) if n.colocate is not None else ("n", i)
        out[i] = class_ids.setdefault(key, len(class_ids))
    return out, len(class_ids)


@dataclass
class Colocated:
    """Colocation classes as units, without further simplification; per-unit sums of the node arrays."""

    of_node: np.ndarray  # unit of each dense node index
    count: int
    acc_time: np.ndarray
    cpu_time: np.ndarray
    memory: np.ndarray
    supported: np.ndarray
    forward_edges: np.ndarray  # (m, 2) unit pairs of forward-forward edges between different units
    cross: np.ndarray  # (m, 2) node pairs (s, v) of edges between different units
    label: list[str]

    @classmethod
    def of(cls, graph: OpGraph) -> "Colocated":
        of_node, count = colocation_classes(graph)
        first = np.full(count, len(of_node))
        np.minimum.at(first, of_node, np.arange(len(of_node)))

        def total(values: np.ndarray) -> np.ndarray:
            return np.bincount(of_node, weights=values, minlength=count)

        edges = graph.edge_array
        su, sv = of_node[edges[:, 0]], of_node[edges[:, 1]]
        cross = edges[su != sv]
        fwd = (su != sv) & ~graph.is_backward[edges[:, 0]] & ~graph.is_backward[edges[:, 1]]
        forward_edges = np.unique(np.stack([su[fwd], sv[fwd]], axis=1), axis=0).reshape(-1, 2)
        label = [graph.nodes[int(r)].label for r in first]
        return cls(of_node, count, total(graph.acc_time), total(graph.cpu_time), total(graph.memory),
                   np.bincount(of_node, weights=~graph.supported, minlength=count) == 0, forward_edges, cross, label)


def inseparable_blocks(graph: OpGraph) -> list[list[int]]:
    """Dense node indices grouped into inseparable blocks, blocks in topological order: colocation
    classes, merged where classes lie on a common cycle (they reach each other)."""
    klass, _ = colocation_classes(graph)
    contracted = nx.DiGraph()
    contracted.add_nodes_from(int(c) for c in np.unique(klass))
    contracted.add_edges_from((int(klass[u]), int(klass[v])) for u, v in graph.edge_array if klass[u] != klass[v])
    condensed = nx.condensation(contracted)
    members: dict[int, list[int]] = {b: [] for b in condensed.nodes}
    block_of_class = condensed.graph["mapping"]
    position = {}
    for pos, i in enumerate(graph.topological_order):
        block = block_of_class[int(klass[i])]
        members[block].append(i)
        position.setdefault(block, pos)
    # Among ready blocks take the one holding the earliest node, so the order follows the graph's.
    order = nx.lexicographical_topological_sort(condensed, key=lambda b: position[b])
    return [members[b] for b in order]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass(frozen=True)
class Units:
    """The simplified problem: units in a topological order of their forward DAG, and their ports.

    A *port* is a group of operators in one unit (its owner) whose outputs go to the same other
    units (its targets); its cost is the sum of their transfer costs. A port is paid by a device's
    set S when its owner is in S and some target is not, or its owner is not in S and some target is.
    That is the cost model's transfer rule, grouped so that the DP can update it per unit.
    """

    unit_of: np.ndarray  # dense node index -> unit
    members: tuple[tuple[int, ...], ...]  # unit -> dense node indices
    pred_units: tuple[tuple[int, ...], ...]  # forward DAG (with the orphans' mirror edges)
    acc_time: np.ndarray
    cpu_time: np.ndarray
    memory: np.ndarray
    supported: np.ndarray
    port_owner: np.ndarray
    port_cost: np.ndarray
    port_target_ptr: np.ndarray  # CSR over ports: their target units
    port_targets: np.ndarray
    stats: dict
    # Replicable nodes needed by several units (their cost is paid once per set that needs them);
    # those needed by one unit are already in its times and memory. None: no replication.
    copies: "SharedCopies | None" = None

    @property
    def count(self) -> int:
        return len(self.members)


def _memory_never_binds(graph: OpGraph, cluster: Cluster) -> bool:
    limits = [k.memory for k in cluster.kinds if k.count > 0 and k.memory is not None]
    return not limits or float(graph.memory.sum()) <= min(limits) * (1 + MEMORY_TOLERANCE)


def _forward_class_edges(graph: OpGraph, cls: list[int], n_cls: int) -> tuple[set[tuple[int, int]], np.ndarray]:
    """Forward class graph: real forward edges, and mirrored backward edges at orphan classes.
    Returns the edges and, per class, whether it has a forward node."""
    backward = graph.is_backward
    has_forward = np.zeros(n_cls, dtype=bool)
    for i in range(len(graph.nodes)):
        if not backward[i]:
            has_forward[cls[i]] = True
    class_edges: set[tuple[int, int]] = set()
    for u, v in graph.edge_array:
        a, b = cls[u], cls[v]
        if a == b:
            continue
        if not backward[u] and not backward[v]:
            class_edges.add((a, b))
        elif backward[u] and backward[v] and (not has_forward[a] or not has_forward[b]):
            class_edges.add((b, a))
    return class_edges, has_forward


def _fuse_cycles(uf: _UnionFind, n_cls: int, class_edges: set[tuple[int, int]]) -> int:
    """Union the classes on a common forward cycle; returns how many were fused away."""
    dag = nx.DiGraph()
    dag.add_nodes_from(range(n_cls))
    dag.add_edges_from(class_edges)
    fused = 0
    for comp in nx.strongly_connected_components(dag):
        comp = list(comp)
        fused += len(comp) - 1
        for c in comp[1:]:
            uf.union(c, comp[0])
    return fused


def _merge_zero_time(graph: OpGraph, cluster: Cluster, uf: _UnionFind, cls: list[int], n_cls: int,
                     class_edges: set[tuple[int, int]]) -> int:
    """Zero-time merges; returns how many units were merged away.

    A unit whose every edge (forward, backward or mirrored) meets one other unit m and that takes no
    time can move onto m's device without raising any load: its own outputs stop crossing, m's outputs
    cross no more than before, nothing else changes; the forward quotient graph only loses edges, so
    contiguity holds. It must also not add memory that could bind, nor bring an unsupported operator
    onto an accelerator.
    """
    roots = sorted({uf.find(c) for c in range(n_cls)})
    time = np.zeros(n_cls)
    mem = np.zeros(n_cls)
    unsupported = np.zeros(n_cls, dtype=bool)
    for i in range(len(graph.nodes)):
        r = uf.find(cls[i])
        time[r] += graph.acc_time[i] + graph.cpu_time[i]
        mem[r] += graph.memory[i]
        unsupported[r] |= not graph.supported[i]
    neighbours: dict[int, set[int]] = {r: set() for r in roots}
    all_edges = [(cls[u], cls[v]) for u, v in graph.edge_array] + list(class_edges)
    for a, b in all_edges:
        ra, rb = uf.find(a), uf.find(b)
        if ra != rb:
            neighbours[ra].add(rb)
            neighbours[rb].add(ra)
    memory_free = _memory_never_binds(graph, cluster)
    merged = 0
    queue = list(roots)
    while queue:
        r = queue.pop()
        if r not in neighbours or len(neighbours[r]) != 1 or time[r] != 0:
            continue
        m = next(iter(neighbours[r]))
        if not (memory_free or mem[r] == 0) or (unsupported[r] and not unsupported[m]):
            continue
        uf.parent[r] = m  # r and m are roots
        mem[m] += mem[r]
        unsupported[m] |= unsupported[r]
        neighbours[m].discard(r)
        del neighbours[r]
        merged += 1
        queue.append(m)
    return merged


def _ports(graph: OpGraph, unit_of: np.ndarray) -> tuple[list[tuple[int, tuple[int, ...]]], list[float]]:
    """Ports: nodes grouped by (unit, set of other units their outputs reach); their keys and costs."""
    out_units: list[set[int]] = [set() for _ in graph.nodes]
    for u, v in graph.edge_array:
        if unit_of[u] != unit_of[v]:
            out_units[u].add(int(unit_of[v]))
    port_index: dict[tuple[int, tuple[int, ...]], int] = {}
    port_cost: list[float] = []
    for i in range(len(graph.nodes)):
        if out_units[i] and graph.out_cost[i] > 0:
            key = (int(unit_of[i]), tuple(sorted(out_units[i])))
            if key not in port_index:
                port_index[key] = len(port_cost)
                port_cost.append(0.0)
            port_cost[port_index[key]] += float(graph.out_cost[i])
    return sorted(port_index, key=port_index.get), port_cost


def simplify(graph: OpGraph, cluster: Cluster) -> Units:
    """Contract colocation classes, order orphans, fuse forward cycles, merge dominated zero-time units."""
    n = len(graph.nodes)
    classes, n_cls = colocation_classes(graph)
    cls = classes.tolist()  # plain ints: the loops below index with them many times
    class_edges, has_forward = _forward_class_edges(graph, cls, n_cls)
    uf = _UnionFind(n_cls)
    fused = _fuse_cycles(uf, n_cls, class_edges)
    merged = _merge_zero_time(graph, cluster, uf, cls, n_cls, class_edges)

    # Number the units in a topological order of the forward unit DAG.
    root_of_class = [uf.find(c) for c in range(n_cls)]
    unit_dag = nx.DiGraph()
    unit_dag.add_nodes_from(sorted(set(root_of_class)))
    unit_dag.add_edges_from((root_of_class[a], root_of_class[b]) for a, b in class_edges
                            if root_of_class[a] != root_of_class[b])
    order = list(nx.lexicographical_topological_sort(unit_dag))
    number = {r: k for k, r in enumerate(order)}
    unit_of = np.array([number[root_of_class[cls[i]]] for i in range(n)], dtype=np.int64)
    n_units = len(order)
    members: list[list[int]] = [[] for _ in range(n_units)]
    for i in range(n):
        members[unit_of[i]].append(i)
    pred_units = tuple(tuple(sorted(number[p] for p in unit_dag.predecessors(r))) for r in order)
    keys, port_cost = _ports(graph, unit_of)
    ptr, targets_flat = csr([targets for _, targets in keys])

    def per_unit(values: np.ndarray, reduce=np.add) -> np.ndarray:
        out = np.zeros(n_units, dtype=values.dtype) if reduce is np.add else np.ones(n_units, dtype=values.dtype)
        reduce.at(out, unit_of, values)
        return out

    return Units(
        unit_of=unit_of, members=tuple(tuple(m) for m in members), pred_units=pred_units,
        acc_time=per_unit(graph.acc_time), cpu_time=per_unit(graph.cpu_time), memory=per_unit(graph.memory),
        supported=per_unit(graph.supported, np.logical_and),
        port_owner=np.array([o for o, _ in keys], dtype=np.int64), port_cost=np.array(port_cost, dtype=float),
        port_target_ptr=ptr, port_targets=targets_flat,
        stats={"nodes": n, "classes": n_cls, "orphan_classes": int((~has_forward).sum()),
               "fused_by_cycles": fused, "zero_time_merges": merged, "units": n_units, "ports": len(keys)})
