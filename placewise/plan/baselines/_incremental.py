"""Device loads kept up to date while groups of operators move, for the search baselines.

The cost model's transfer rule, made incremental: a node u with output cost c is paid by device d
when u sits on d and some placed successor does not, or u sits elsewhere and some successor sits on
d (CPU cores never pay). Keeping, per node and device, how many of its successors sit there
(`count`) and how many of its successors are placed at all (`placed`), a move of a group X changes
only the payments of X and X's predecessors, so one move costs O(|X| + their in-edges) x devices.
Unplaced nodes (device -1) pay nothing and are paid for by no one, as in `cost.evaluate`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.csr import csr


class DeviceTable:
    """The devices a search may use, as arrays the kernels read."""

    def __init__(self, cluster: Cluster, devices: list[Device]) -> None:
        self.devices = devices
        kinds = [cluster.kind(d.kind) for d in devices]
        self.accelerator = np.array([k.accelerator for k in kinds], dtype=np.bool_)
        self.pays_transfers = np.array([k.pays_transfers for k in kinds], dtype=np.bool_)
        self.speed = np.array([k.speed for k in kinds], dtype=float)
        self.memory = np.array([np.inf if k.memory is None else k.memory for k in kinds], dtype=float)


class State:
    """A (partial) placement of a graph's nodes on a DeviceTable, with loads kept current."""

    def __init__(self, graph: OpGraph, table: DeviceTable) -> None:
        n, d = len(graph.nodes), len(table.devices)
        self.pred_ptr, self.pred = csr(graph.pred)
        self.cost = graph.out_cost.copy()
        self.acc_time, self.cpu_time = graph.acc_time.copy(), graph.cpu_time.copy()
        self.table = table
        self.device = np.full(n, -1, dtype=np.int64)
        self.count = np.zeros((n, d), dtype=np.int64)
        self.placed = np.zeros(n, dtype=np.int64)
        self.load = np.zeros(d)
        self.mark = np.zeros(n, dtype=np.int64)  # scratch for deduplicating touched nodes
        self.stamp = np.zeros(1, dtype=np.int64)

    def args(self) -> tuple:
        t = self.table
        return (self.device, self.count, self.placed, self.load, self.pred_ptr, self.pred, self.cost,
                self.acc_time, self.cpu_time, t.accelerator, t.pays_transfers, t.speed, self.mark, self.stamp)

    def delta(self, nodes: np.ndarray, target: int) -> np.ndarray:
        return move_delta(nodes, target, *self.args())

    def move(self, nodes: np.ndarray, target: int) -> None:
        self.load += move_delta(nodes, target, *self.args())
        relocate(nodes, target, self.device, self.count, self.placed, self.pred_ptr, self.pred)


@njit(cache=True)
def _pays(u, d, device, count, placed, pays_transfers):
    if not pays_transfers[d] or device[u] < 0:
        return False
    if device[u] == d:
        return placed[u] > count[u, d]
    return count[u, d] > 0


@njit(cache=True)
def relocate(nodes, target, device, count, placed, pred_ptr, pred):
    """Put `nodes` on `target` (-1: unplace them) and update the successor counts of their predecessors."""
    for x in nodes:
        old = device[x]
        device[x] = target
        for k in range(pred_ptr[x], pred_ptr[x + 1]):
            w = pred[k]
            if old >= 0:
                count[w, old] -= 1
                placed[w] -= 1
            if target >= 0:
                count[w, target] += 1
                placed[w] += 1


@njit(cache=True)
def move_delta(nodes, target, device, count, placed, load, pred_ptr, pred, cost, acc_time, cpu_time,
               accelerator, pays_transfers, speed, mark, stamp):
    """Change of every device's load if `nodes` (all on one device, or unplaced) moved to `target`."""
    n_dev = load.shape[0]
    delta = np.zeros(n_dev)
    stamp[0] += 1
    s = stamp[0]
    touched = []
    for x in nodes:
        if mark[x] != s:
            mark[x] = s
            touched.append(x)
        for k in range(pred_ptr[x], pred_ptr[x + 1]):
            w = pred[k]
            if mark[w] != s:
                mark[w] = s
                touched.append(w)
    for u in touched:
        for d in range(n_dev):
            if _pays(u, d, device, count, placed, pays_transfers):
                delta[d] -= cost[u]
    source = device[nodes[0]] if nodes.shape[0] > 0 else -1
    for x in nodes:
        if source >= 0:
            delta[source] -= (acc_time[x] if accelerator[source] else cpu_time[x]) / speed[source]
        delta[target] += (acc_time[x] if accelerator[target] else cpu_time[x]) / speed[target]
    relocate(nodes, target, device, count, placed, pred_ptr, pred)
    for u in touched:
        for d in range(n_dev):
            if _pays(u, d, device, count, placed, pays_transfers):
                delta[d] += cost[u]
    relocate(nodes, source, device, count, placed, pred_ptr, pred)
    return delta
