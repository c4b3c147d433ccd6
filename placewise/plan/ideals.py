"""The contiguous-split structure of an operator graph: units, their forward DAG, and its ideals.

A *unit* is a group of operators that every contiguous split keeps on one device: a colocation
class (a forward node with its backward nodes), grown by the simplifications of the paper's code:

- colocation classes are contracted;
- a backward-only class (an "orphan": backward nodes with no forward mate) gets a place in the
  forward order by mirroring its backward edges (b1 -> b2 gives unit(b2) -> unit(b1)), as in the
  paper, so the backward pass runs through the pipeline in reverse;
- strongly connected components of the resulting forward unit graph are fused (a cycle through
  contracted classes can only sit on one device of a contiguous split);
- a unit with no time, whose every edge leads to one other unit, is merged into it when that can
  never make a split worse (no memory that could bind, support kept) — this only removes choices
  that are dominated, so the optimum is unchanged.

A contiguous set is then I \\ I' for ideals (predecessor-closed sets) I' ⊆ I of the forward unit
DAG. `enumerate_ideals` lists them all with the lattice's "remove one maximal unit" edges, which is
what the DP walks.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
from numba import njit

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.options import DEFAULT_IDEAL_LIMIT



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

    @property
    def count(self) -> int:
        return len(self.members)


def _classes(graph: OpGraph) -> list[int]:
    """Colocation class of every node (a fresh class for a node without one)."""
    class_ids: dict[int, int] = {}
    out = []
    for i, n in enumerate(graph.nodes):
        key = ("c", n.colocate) if n.colocate is not None else ("n", i)
        out.append(class_ids.setdefault(key, len(class_ids)))
    return out


def _memory_never_binds(graph: OpGraph, cluster: Cluster) -> bool:
    limits = [k.memory for k in cluster.kinds if k.count > 0 and k.memory is not None]
    return not limits or float(graph.memory.sum()) <= min(limits) * (1 + MEMORY_TOLERANCE)


def simplify(graph: OpGraph, cluster: Cluster) -> Units:
    """Contract colocation classes, order orphans, fuse forward cycles, merge dominated zero-time units."""
    n = len(graph.nodes)
    cls = _classes(graph)
    n_cls = max(cls) + 1
    backward = graph.is_backward
    has_forward = np.zeros(n_cls, dtype=bool)
    for i in range(n):
        if not backward[i]:
            has_forward[cls[i]] = True
    # Forward class graph: real forward edges, and mirrored backward edges at orphan classes.
    class_edges: set[tuple[int, int]] = set()
    for u, v in graph.edge_array:
        a, b = cls[u], cls[v]
        if a == b:
            continue
        if not backward[u] and not backward[v]:
            class_edges.add((a, b))
        elif backward[u] and backward[v] and (not has_forward[a] or not has_forward[b]):
            class_edges.add((b, a))
    uf = _UnionFind(n_cls)
    dag = nx.DiGraph()
    dag.add_nodes_from(range(n_cls))
    dag.add_edges_from(class_edges)
    fused = 0
    for comp in nx.strongly_connected_components(dag):
        comp = list(comp)
        fused += len(comp) - 1
        for c in comp[1:]:
            uf.union(c, comp[0])

    # Zero-time merges. A unit whose every edge (forward, backward or mirrored) meets one other unit
    # m and that takes no time can move onto m's device without raising any load: its own outputs
    # stop crossing, m's outputs cross no more than before, nothing else changes; the forward
    # quotient graph only loses edges, so contiguity holds. It must also not add memory that could
    # bind, nor bring an unsupported operator onto an accelerator.
    roots = sorted({uf.find(c) for c in range(n_cls)})
    time = np.zeros(n_cls)
    mem = np.zeros(n_cls)
    unsupported = np.zeros(n_cls, dtype=bool)
    for i in range(n):
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

    # Ports: nodes grouped by (unit, set of other units their outputs reach).
    out_units: list[set[int]] = [set() for _ in range(n)]
    for u, v in graph.edge_array:
        if unit_of[u] != unit_of[v]:
            out_units[u].add(int(unit_of[v]))
    port_index: dict[tuple[int, tuple[int, ...]], int] = {}
    port_cost: list[float] = []
    for i in range(n):
        if out_units[i] and graph.out_cost[i] > 0:
            key = (int(unit_of[i]), tuple(sorted(out_units[i])))
            if key not in port_index:
                port_index[key] = len(port_cost)
                port_cost.append(0.0)
            port_cost[port_index[key]] += float(graph.out_cost[i])
    keys = sorted(port_index, key=port_index.get)
    ptr = np.zeros(len(keys) + 1, dtype=np.int64)
    for p, (_, targets) in enumerate(keys):
        ptr[p + 1] = ptr[p] + len(targets)
    targets_flat = np.array([t for _, targets in keys for t in targets], dtype=np.int64)

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


@njit(cache=True)
def _enumerate(pred_ptr, preds, n_units, words, limit):
    """Every ideal once, by reverse search: an ideal's parent drops its highest-numbered unit, so a
    child adds a unit numbered above the parent's highest whose predecessors are all present."""
    cap = 1024
    bits = np.zeros((cap, words), dtype=np.uint64)
    count = 1
    stack = np.zeros(n_units + 2, dtype=np.int64)
    # Depth-first over the reverse-search tree; stack holds ideal ids, next unit to try kept apart.
    next_unit = np.zeros(n_units + 2, dtype=np.int64)
    depth = 0
    stack[0] = 0
    next_unit[0] = 0
    while depth >= 0:
        cur = stack[depth]
        v = next_unit[depth]
        if v >= n_units:
            depth -= 1
            continue
        next_unit[depth] = v + 1
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
        next_unit[depth] = v + 1
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


def _csr(lists: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(lists) + 1, dtype=np.int64)
    for i, lst in enumerate(lists):
        ptr[i + 1] = ptr[i] + len(lst)
    flat = np.array([x for lst in lists for x in lst], dtype=np.int64)
    return ptr, flat


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
    found: list[tuple[int, frozenset[int]]] = []
    for v, ws in enumerate(succ):
        if len(ws) < 2:
            continue
        below = {w: _descendants(w, succ) for w in ws}
        heaviest = max(ws, key=lambda w: float(work[list(below[w])].sum()))
        for w in ws:
            branch = below[w]
            if w != heaviest and all(p in branch or p == v for u in branch for p in pred_units[u]):
                found.append((v, frozenset(branch)))
    # A branch inside another one is merged with it anyway.
    return [(v, tuple(sorted(b))) for v, b in found if not any(b < other for _, other in found)]


def _descendants(start: int, succ: tuple[tuple[int, ...], ...]) -> set[int]:
    seen, stack = {start}, [start]
    while stack:
        for nxt in succ[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def enumerate_ideals(pred_units: tuple[tuple[int, ...], ...], limit: int = DEFAULT_IDEAL_LIMIT) -> IdealLattice:
    """All ideals of the DAG given by each unit's predecessors (units numbered topologically)."""
    n_units = len(pred_units)
    words = max(1, (n_units + 63) // 64)
    pred_ptr, preds = _csr(pred_units)
    succ_ptr, succs = _csr(successors(pred_units))
    bits, count = _enumerate(pred_ptr, preds, n_units, words, limit)
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
