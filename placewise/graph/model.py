"""The operator graph: a validated, immutable DAG of operators with their costs.

Node times are in one unit per graph (the paper's inputs use abstract units, PipeDream's profiles
milliseconds, placewise's profiler milliseconds). An edge's `transfer_cost` is the time to move its
source's output between an accelerator and host memory; it is a property of the source node, so all
edges out of one node carry the same cost.

A node's `memory` is the one figure the cost model checks against a device's memory; what it
holds depends on the source (the paper's `size`, PipeDream's activation plus parameter bytes, the
profiler's parameters and output, or gradients and optimizer state on a backward node). Where the
source says, the same bytes are also given split by what they hold (`MEMORY_PARTS`, None where the
source does not say), for schedule-aware memory: see `placewise.plan.cost.memory_breakdown`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from placewise.errors import PlacewiseError, where
from placewise.graph.devices import Cluster

# Costs on edges out of one node may differ by rounding only (the paper's own check uses 1e-6).
COST_TOLERANCE = 1e-6

# A node's memory split by what it holds, in bytes, defined once: the weights (parameters and
# buffers), their gradients, the optimizer's state for them, the activations autograd saves for
# the backward pass (one microbatch's worth), and the node's output.
MEMORY_PARTS: tuple[str, ...] = ("parameters", "gradients", "optimizer_state", "activations", "output")


@dataclass(frozen=True)
class Node:
    id: int
    name: str | None
    acc_time: float
    cpu_time: float
    memory: float
    on_accelerator: bool
    backward: bool = False
    colocate: int | None = None
    layer: int | None = None
    # For profiled graphs: the fx node or module the operator came from, so a plan can cut the model.
    module: str | None = None
    # Memory split by what it holds (see MEMORY_PARTS); None: the source does not say, which is not
    # the same as 0 (a ReLU's known parameter bytes). Not summed into `memory`, which keeps its meaning.
    parameters: float | None = None
    gradients: float | None = None
    optimizer_state: float | None = None
    activations: float | None = None
    output: float | None = None

    @property
    def label(self) -> str:
        return self.name if self.name else f"node{self.id}"


@dataclass(frozen=True)
class Edge:
    src: int
    dst: int
    transfer_cost: float
    bytes: float | None = None


@dataclass(frozen=True, eq=True)
class OpGraph:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    cluster: Cluster | None = None
    name: str = ""
    # A split that came with the input (PipeDream's `stage_id`), as (node id, stage) pairs.
    split: tuple[tuple[int, int], ...] | None = None
    meta: tuple[tuple[str, str], ...] = field(default=())

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, nodes, edges, *, cluster: Cluster | None = None, name: str = "",
              split=None, meta: dict | None = None, source: str | None = None) -> "OpGraph":
        """Validate and freeze. Errors name `source` (a file) and the offending field."""
        graph = cls(tuple(nodes), tuple(edges), cluster, name,
                    None if split is None else tuple((int(a), int(b)) for a, b in split),
                    tuple(sorted((str(k), str(v)) for k, v in (meta or {}).items())))
        graph.validate(source)
        return graph

    def validate(self, source: str | None = None) -> None:
        at = where(source)
        if not self.nodes:
            raise PlacewiseError(f"{at}nodes: the graph is empty; give at least one node")
        seen: dict[int, int] = {}
        for i, n in enumerate(self.nodes):
            if n.id in seen:
                raise PlacewiseError(f"{at}nodes[{i}].id: duplicate id {n.id} (also nodes[{seen[n.id]}]); give every node its own id")
            seen[n.id] = i
            for fname in ("acc_time", "cpu_time", "memory") + MEMORY_PARTS:
                value = getattr(n, fname)
                if value is None and fname in MEMORY_PARTS:
                    continue
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                    raise PlacewiseError(f"{at}node {n.id}: {fname} is {value!r}; use a finite non-negative number")
        out_cost: dict[int, tuple[float, int]] = {}
        for j, e in enumerate(self.edges):
            for end in ("src", "dst"):
                if getattr(e, end) not in seen:
                    raise PlacewiseError(f"{at}edges[{j}].{end}: unknown node id {getattr(e, end)}; every edge must join two listed nodes")
            if e.src == e.dst:
                raise PlacewiseError(f"{at}edges[{j}]: self-loop on node {e.src}; remove it")
            if not (math.isfinite(e.transfer_cost) and e.transfer_cost >= 0):
                raise PlacewiseError(f"{at}edges[{j}].cost: {e.transfer_cost!r}; use a finite non-negative number")
            if e.bytes is not None and not (math.isfinite(e.bytes) and e.bytes >= 0):
                raise PlacewiseError(f"{at}edges[{j}].size: {e.bytes!r}; use a finite non-negative number of bytes")
            if e.src in out_cost:
                cost, first = out_cost[e.src]
                if abs(cost - e.transfer_cost) > COST_TOLERANCE * max(1.0, abs(cost)):
                    raise PlacewiseError(
                        f"{at}edges[{j}].cost: {e.transfer_cost} differs from {cost} on edges[{first}], another edge out of node {e.src}; "
                        "an edge's cost is its source's output transfer time, so give all edges out of one node the same cost")
            else:
                out_cost[e.src] = (e.transfer_cost, j)
            if self.nodes[seen[e.src]].backward and not self.nodes[seen[e.dst]].backward:
                raise PlacewiseError(f"{at}edges[{j}]: goes from backward node {e.src} to forward node {e.dst}; backward nodes may feed only backward nodes")
        cycle = self._find_cycle()
        if cycle:
            raise PlacewiseError(f"{at}edges: the graph has a cycle through nodes {' -> '.join(map(str, cycle))}; an operator graph must be acyclic")
        if self.split is not None:
            for node_id, _ in self.split:
                if node_id not in seen:
                    raise PlacewiseError(f"{at}split: unknown node id {node_id}")

    def _find_cycle(self) -> list[int] | None:
        order = self._topological_indices()
        if order is not None:
            return None
        # Walk predecessors among the nodes left over by Kahn's algorithm to show one cycle.
        indeg = [len(p) for p in self.pred]
        stack = [i for i, d in enumerate(indeg) if d == 0]
        while stack:
            u = stack.pop()
            for v in self.succ[u]:
                indeg[v] -= 1
                if indeg[v] == 0:
                    stack.append(v)
        left = {i for i, d in enumerate(indeg) if d > 0}
        start = next(iter(left))
        path, pos, u = [], {}, start
        while u not in pos:
            pos[u] = len(path)
            path.append(u)
            u = next(p for p in self.pred[u] if p in left)
        cyc = path[pos[u]:][::-1]
        return [self.nodes[i].id for i in cyc + [cyc[0]]]

    def _topological_indices(self) -> list[int] | None:
        indeg = [len(p) for p in self.pred]
        stack = [i for i in range(len(self.nodes) - 1, -1, -1) if indeg[i] == 0]
        order = []
        while stack:
            u = stack.pop()
            order.append(u)
            for v in reversed(self.succ[u]):
                indeg[v] -= 1
                if indeg[v] == 0:
                    stack.append(v)
        return order if len(order) == len(self.nodes) else None

    # ---- derived views (computed once) ----------------------------------------------------------
    @cached_property
    def index(self) -> dict[int, int]:
        """Node id -> position in `nodes` (the dense index solvers use)."""
        return {n.id: i for i, n in enumerate(self.nodes)}

    @cached_property
    def succ(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in self.nodes]
        for e in self.edges:
            v = self.index[e.dst]
            lst = out[self.index[e.src]]
            if v not in lst:
                lst.append(v)
        return tuple(tuple(x) for x in out)

    @cached_property
    def pred(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in self.nodes]
        for u, vs in enumerate(self.succ):
            for v in vs:
                out[v].append(u)
        return tuple(tuple(x) for x in out)

    @cached_property
    def topological_order(self) -> tuple[int, ...]:
        order = self._topological_indices()
        assert order is not None, "validated graphs are acyclic"
        return tuple(order)

    @cached_property
    def out_cost(self) -> np.ndarray:
        """Transfer cost of each node's output (0 for nodes without out-edges), by dense index."""
        cost = np.zeros(len(self.nodes))
        for e in self.edges:
            cost[self.index[e.src]] = e.transfer_cost
        return cost

    @cached_property
    def acc_time(self) -> np.ndarray:
        return np.array([n.acc_time for n in self.nodes], dtype=float)

    @cached_property
    def cpu_time(self) -> np.ndarray:
        return np.array([n.cpu_time for n in self.nodes], dtype=float)

    @cached_property
    def memory(self) -> np.ndarray:
        return np.array([n.memory for n in self.nodes], dtype=float)

    @cached_property
    def supported(self) -> np.ndarray:
        return np.array([n.on_accelerator for n in self.nodes], dtype=bool)

    @cached_property
    def is_backward(self) -> np.ndarray:
        return np.array([n.backward for n in self.nodes], dtype=bool)

    @cached_property
    def edge_array(self) -> np.ndarray:
        """Unique (src, dst) dense-index pairs, shape (m, 2)."""
        pairs = [(u, v) for u, vs in enumerate(self.succ) for v in vs]
        return np.array(pairs, dtype=np.int64).reshape(-1, 2)

    @cached_property
    def colocation_groups(self) -> tuple[tuple[int, ...], ...]:
        """Dense indices that must share a device: one group per colocation class (singletons omitted)."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            if n.colocate is not None:
                groups[n.colocate].append(i)
        return tuple(tuple(g) for g in groups.values() if len(g) > 1)

    @property
    def is_training(self) -> bool:
        return bool(self.is_backward.any())

    @property
    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)

    def node(self, node_id: int) -> Node:
        return self.nodes[self.index[node_id]]

    def __hash__(self) -> int:  # cached_property needs no hashing; identity hash is enough for caches
        return id(self)
