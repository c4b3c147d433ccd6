"""The latency model (the paper's, as `cost.latency` computes it).

CPU nodes run as soon as their inputs are done on unboundedly many cores of the fastest shared-memory
CPU kind; each device that pays transfers (an accelerator, or a CPU core in its own process:
`DeviceKind.pays_transfers`) runs its set as one convex block once every input of the block has
arrived, paying its transfers inside the block. "accelerators" below are those block devices.
Big-M rows use the warm start's latency as M, which is sound because only splits at least as good
as the warm start are searched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.ip.milp import Milp
from placewise.plan.ip.model import kinds_of, memory_limit, number_by_lowest_unit, order_identical
from placewise.plan.options import IPOptions
from placewise.plan.plan import Plan
from placewise.plan.units import Colocated


@dataclass
class _Latency:
    """The model under construction and what its parts share."""

    graph: OpGraph
    units: Colocated
    kinds: list[DeviceKind]
    accelerators: list[tuple[DeviceKind, int]]
    cpu: DeviceKind | None  # unbounded parallel cores of the fastest CPU kind
    big: float
    m: Milp
    y: np.ndarray  # (units, slots): the last slot is the CPU pool when there is one

    @property
    def n_acc(self) -> int:
        return len(self.accelerators)

    @property
    def node_y(self) -> np.ndarray:
        return self.y[self.units.of_node]


def _big_m(graph: OpGraph, kinds: list[DeviceKind], n_acc: int, warm: Plan | None) -> float:
    if warm is not None and warm.latency is not None:
        # Big M: every time in a split at least as good as the warm start is at most its latency.
        return float(warm.latency) * (1 + 1e-6) + 1e-6
    # Running every block and CPU node one after another bounds any latency: each node's slower
    # time, and each output paid out once and in on every accelerator.
    slowest = min(k.speed for k in kinds)
    return float(np.maximum(graph.acc_time, graph.cpu_time).sum() / slowest + graph.out_cost.sum() * (n_acc + 1)) + 1.0


def _transfers_and_convexity(p: _Latency) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transfer indicators into/out of each block, and the rows that keep each block convex.
    Returns (sources, into, out)."""
    m, graph, node_y, A = p.m, p.graph, p.node_y, p.n_acc
    s_nodes, v_nodes = graph.edge_array[:, 0], graph.edge_array[:, 1]
    # Transfer indicators for every node with an out-edge (a zero-cost input still delays a block).
    sources = np.unique(s_nodes)
    pos = np.searchsorted(sources, s_nodes)
    into = m.var((len(sources), A), 0.0, 1.0)
    out = m.var((len(sources), A), 0.0, 1.0)
    cross = p.units.of_node[s_nodes] != p.units.of_node[v_nodes]
    for a in range(A):
        m.add([(into[pos[cross], a], 1.0), (node_y[v_nodes[cross], a], -1.0), (node_y[s_nodes[cross], a], 1.0)], lb=0.0)
        m.add([(out[pos[cross], a], 1.0), (node_y[s_nodes[cross], a], -1.0), (node_y[v_nodes[cross], a], 1.0)], lb=0.0)
    # Each block is convex (the paper's ideal-based rows): W[., a] is a predecessor-closed set holding
    # the block that a node leaving the block cannot belong to.
    W = m.var((len(graph.nodes), A), 0.0, 1.0)
    m.add([(W.ravel(), 1.0), (node_y[:, :A].ravel(), -1.0)], lb=0.0)
    for a in range(A):
        m.add([(W[v_nodes, a], 1.0), (W[s_nodes, a], -1.0)], ub=0.0)
        m.add([(W[v_nodes, a], 1.0), (node_y[v_nodes, a], -1.0), (node_y[s_nodes, a], 1.0)], ub=1.0)
    return sources, into, out


def _timing(p: _Latency, total: int, sources: np.ndarray, into: np.ndarray, out: np.ndarray) -> None:
    """When each node's output is ready, each block's start and finish; the latency bounds them all."""
    m, graph, node_y, A, big = p.m, p.graph, p.node_y, p.n_acc, p.big
    s_nodes, v_nodes = graph.edge_array[:, 0], graph.edge_array[:, 1]
    n = len(graph.nodes)
    finish_node = m.var(n, 0.0, big)  # when each node's output is ready
    start = m.var(A, 0.0, big)
    finish = m.var(A, 0.0, big)
    cost = graph.out_cost[sources]
    acc_time = [(p.units.acc_time if k.accelerator else p.units.cpu_time) / k.speed for k, _ in p.accelerators]
    for a in range(A):
        # finish = start + compute + transfers in and out, all inside the block.
        m.add([(np.array([finish[a]]), 1.0), (np.array([start[a]]), -1.0), (p.y[:, a][None, :], -acc_time[a][None, :]),
               (into[:, a][None, :], -cost[None, :]), (out[:, a][None, :], -cost[None, :])], lb=0.0, ub=0.0)
        # The block starts after every input it receives is ready: start >= finish_node[s] when into[s, a] = 1.
        m.add([(np.full(len(sources), start[a]), 1.0), (finish_node[sources], -1.0), (into[:, a], -big)], lb=-big)
        # Its nodes are ready when it finishes.
        m.add([(finish_node, 1.0), (np.full(n, finish[a]), -1.0), (node_y[:, a], -big)], lb=-big)
    if p.cpu is not None:
        cpu_time = graph.cpu_time / p.cpu.speed
        m.add([(finish_node, 1.0), (node_y[:, A], -cpu_time)], lb=0.0)
        m.add([(finish_node[v_nodes], 1.0), (finish_node[s_nodes], -1.0), (node_y[v_nodes, A], -cpu_time[v_nodes])], lb=0.0)
    else:
        m.add([(finish_node[v_nodes], 1.0), (finish_node[s_nodes], -1.0)], lb=0.0)
    m.add([(np.full(n, total), 1.0), (finish_node, -1.0)], lb=0.0)


def _path_bound(p: _Latency, total: int) -> None:
    """Path bound (valid, and what makes the relaxation useful): a path visits each convex block in one
    stretch, so the latency is at least the sum along any path of each node's own time on its device
    plus the transfer paid wherever the path enters or leaves an accelerator block."""
    m, graph, node_y, A = p.m, p.graph, p.node_y, p.n_acc
    edges = graph.edge_array
    s_nodes, v_nodes = edges[:, 0], edges[:, 1]
    own = [(node_y[:, a], (graph.acc_time if k.accelerator else graph.cpu_time) / k.speed)
           for a, (k, _) in enumerate(p.accelerators)]
    if p.cpu is not None:
        own.append((node_y[:, A], graph.cpu_time / p.cpu.speed))
    path = m.var(len(graph.nodes), 0.0, p.big)
    m.add([(path, 1.0)] + [(cols, -coef) for cols, coef in own], lb=0.0)
    cut_in = m.var(len(edges), 0.0, 1.0)  # the edge enters an accelerator block
    cut_out = m.var(len(edges), 0.0, 1.0)  # the edge leaves one
    for a in range(A):
        m.add([(cut_in, 1.0), (node_y[v_nodes, a], -1.0), (node_y[s_nodes, a], 1.0)], lb=0.0)
        m.add([(cut_out, 1.0), (node_y[s_nodes, a], -1.0), (node_y[v_nodes, a], 1.0)], lb=0.0)
    edge_cost = graph.out_cost[s_nodes]
    m.add([(path[v_nodes], 1.0), (path[s_nodes], -1.0), (cut_in, -edge_cost), (cut_out, -edge_cost)]
          + [(cols[v_nodes], -coef[v_nodes]) for cols, coef in own], lb=0.0)
    m.add([(np.full(len(graph.nodes), total), 1.0), (path, -1.0)], lb=0.0)


def _start_vector(p: _Latency, warm: Plan | None) -> np.ndarray | None:
    """The warm start's accelerator blocks (renumbered as the symmetry rows ask), everything else on CPUs."""
    if warm is None or warm.latency is None:
        return None
    A, U = p.n_acc, p.units.count
    number = {(k.name, i): a for a, (k, i) in enumerate(p.accelerators)}
    unit_slot = np.full(U, A)
    for node_id, dev in warm.assignment().items():
        if (dev.kind, dev.index) in number:
            unit_slot[p.units.of_node[p.graph.index[node_id]]] = number[(dev.kind, dev.index)]
    offset = 0
    for k in p.kinds:
        if k.pays_transfers:
            unit_slot = number_by_lowest_unit(unit_slot, offset, k.count)
            offset += k.count
    start = np.zeros(p.m.n_cols)
    start[p.y[np.arange(U), unit_slot]] = 1.0
    return start


def _assignment(p: _Latency, x: np.ndarray) -> dict[int, Device]:
    graph, cpu, A = p.graph, p.cpu, p.n_acc
    choice = np.argmax(x[p.y], axis=1)
    assignment: dict[int, Device] = {}
    cpu_nodes = []
    for i, node in enumerate(graph.nodes):
        slot = int(choice[p.units.of_node[i]])
        if slot < A:
            assignment[node.id] = Device(p.accelerators[slot][0].name, p.accelerators[slot][1])
        else:
            cpu_nodes.append(i)
    # The latency model does not care which core runs a CPU node; spread them for a fair max-load.
    core_load = np.zeros(cpu.count if cpu is not None else 0)
    for i in sorted(cpu_nodes, key=lambda i: -graph.cpu_time[i]):
        core = int(np.argmin(core_load))
        core_load[core] += graph.cpu_time[i] / cpu.speed
        assignment[graph.nodes[i].id] = Device(cpu.name, core)
    return assignment


def latency_model(graph: OpGraph, cluster: Cluster, options: IPOptions, warm: Plan | None):
    """The latency model: (model, objective column, solution -> split, warm start vector)."""
    units = Colocated.of(graph)
    kinds = kinds_of(cluster)
    accelerators = [(k, i) for k in kinds if k.pays_transfers for i in range(k.count)]
    cpu = max((k for k in kinds if not k.pays_transfers), key=lambda k: k.speed, default=None)
    A, U = len(accelerators), units.count
    big = _big_m(graph, kinds, A, warm)
    m = Milp()
    total = m.var(1, 0.0, big, cost=1.0)[0]
    slots = A + (1 if cpu is not None else 0)
    ub = np.ones((U, slots))
    ub[np.ix_(~units.supported, [a for a, (k, _) in enumerate(accelerators) if k.accelerator])] = 0.0
    y = m.var((U, slots), 0.0, ub, integer=True)
    m.add([(y, 1.0)], lb=1.0, ub=1.0)
    for a, (k, _) in enumerate(accelerators):
        if k.memory is not None:
            m.add([(y[:, a][None, :], units.memory[None, :])], ub=memory_limit(k))
    p = _Latency(graph, units, kinds, accelerators, cpu, big, m, y)
    sources, into, out = _transfers_and_convexity(p)
    _timing(p, total, sources, into, out)
    _path_bound(p, total)
    offset = 0
    for k in kinds:
        if k.pays_transfers:
            order_identical(m, y[:, offset:offset + k.count])
            offset += k.count
    return m, total, lambda x: (_assignment(p, x), {}), _start_vector(p, warm)
