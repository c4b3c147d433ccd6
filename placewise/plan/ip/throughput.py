"""The throughput models: least max-load, with units on devices (non-contiguous) or on pipeline
positions whose prefixes are ideals (contiguous)."""

from __future__ import annotations

import numpy as np

from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.ip.milp import Milp
from placewise.plan.ip.model import kinds_of, memory_limit, number_by_lowest_unit, order_identical, transfer_rows
from placewise.plan.options import IPOptions
from placewise.plan.plan import Plan
from placewise.plan.units import Colocated


def throughput_model(graph: OpGraph, cluster: Cluster, options: IPOptions, warm: Plan | None):
    """The throughput model: (model, objective column, solution -> split, warm start vector)."""
    units = Colocated.of(graph)
    kinds = kinds_of(cluster)
    m = Milp()
    # Any split is at most the sum of all times plus all transfers; a finite bound helps the LP.
    ceiling = float(max(units.acc_time.sum(), units.cpu_time.sum()) / min(k.speed for k in kinds) + 2 * graph.out_cost.sum()) + 1
    load = m.var(1, 0.0, ceiling, cost=1.0)[0]
    if options.contiguous:
        assign, start = _contiguous_model(m, graph, units, kinds, load, warm)
    else:
        assign, start = _noncontiguous_model(m, graph, units, kinds, load, warm)
    return m, load, assign, start


def _noncontiguous_model(m: Milp, graph: OpGraph, units: Colocated, kinds: list[DeviceKind], load: int, warm: Plan | None):
    """Units to devices; every device's load at most `load`. Returns (solution -> split, warm start)."""
    devices = [(k, i) for k in kinds for i in range(k.count)]
    D, U = len(devices), units.count
    is_acc = np.array([k.accelerator for k, _ in devices])
    ub = np.ones((U, D))
    ub[np.ix_(~units.supported, is_acc)] = 0.0
    y = m.var((U, D), 0.0, ub, integer=True)
    m.add([(y, 1.0)], lb=1.0, ub=1.0)
    for d, (k, _) in enumerate(devices):
        if k.memory is not None:
            m.add([(y[:, d][None, :], units.memory[None, :])], ub=memory_limit(k))
    # Devices that pay transfers (accelerators, CPU cores in separate processes) get transfer rows.
    paying_slots = np.flatnonzero([k.pays_transfers for k, _ in devices])
    into, out, cost = transfer_rows(m, graph, units, lambda g, s: y[g, paying_slots[s]],
                                     lambda g, s: y[g, paying_slots[s]], len(paying_slots))
    transfer_of = {int(d): s for s, d in enumerate(paying_slots)}
    for d, (k, _) in enumerate(devices):
        time_d = (units.acc_time if k.accelerator else units.cpu_time) / k.speed
        terms = [(np.array([load]), -1.0), (y[:, d][None, :], time_d[None, :])]
        if d in transfer_of:
            s = transfer_of[d]
            terms += [(into[:, s][None, :], cost[None, :]), (out[:, s][None, :], cost[None, :])]
        m.add(terms, ub=0.0)
    offset = 0
    for k in kinds:
        order_identical(m, y[:, offset:offset + k.count])
        offset += k.count

    def assign(x: np.ndarray) -> dict[int, Device]:
        choice = np.argmax(x[y], axis=1)
        return {n.id: Device(devices[choice[units.of_node[i]]][0].name, devices[choice[units.of_node[i]]][1])
                for i, n in enumerate(graph.nodes)}

    start = None
    if warm is not None:
        number = {(k.name, i): d for d, (k, i) in enumerate(devices)}
        unit_device = np.zeros(U, dtype=int)
        for node_id, dev in warm.assignment().items():
            unit_device[units.of_node[graph.index[node_id]]] = number[(dev.kind, dev.index)]
        offset = 0
        for k in kinds:
            unit_device = number_by_lowest_unit(unit_device, offset, k.count)
            offset += k.count
        start = np.zeros(m.n_cols)
        start[y[np.arange(U), unit_device]] = 1.0
    return assign, start


def _contiguous_model(m: Milp, graph: OpGraph, units: Colocated, kinds: list[DeviceKind], load: int, warm: Plan | None):
    """Units to pipeline positions, each position one device of some kind, every prefix an ideal.
    Returns (solution -> split, warm start)."""
    T, K, U = sum(k.count for k in kinds), len(kinds), units.count
    acc_kind = np.array([k.accelerator for k in kinds])
    ub = np.ones((U, T, K))
    ub[np.ix_(~units.supported, np.arange(T), acc_kind)] = 0.0
    y = m.var((U, T, K), 0.0, ub, integer=True)  # unit at pipeline position t on a device of kind k
    c = m.var((T, K), 0.0, 1.0, integer=True)  # position t is held by a device of kind k
    m.add([(y.reshape(U, -1), 1.0)], lb=1.0, ub=1.0)
    m.add([(y.ravel(), 1.0), (np.broadcast_to(c, (U, T, K)).ravel(), -1.0)], ub=0.0)
    m.add([(c, 1.0)], ub=1.0)
    m.add([(c.T, 1.0)], ub=np.array([k.count for k in kinds], float))
    # A position is held only when it holds a unit, and used positions come first (no empty gaps).
    m.add([(c.ravel(), 1.0), (y.transpose(1, 2, 0).reshape(T * K, U), -1.0)], ub=0.0)
    if T > 1:
        m.add([(c[1:], 1.0), (c[:-1], -1.0)], ub=0.0)
    for ki, k in enumerate(kinds):
        if k.memory is not None:
            m.add([(y[:, :, ki].T, units.memory[None, :]), (c[:, ki], -k.memory * (1 + MEMORY_TOLERANCE))], ub=0.0)
    # Z[g, t] = is unit g within the first t+1 positions; every such prefix must be an ideal.
    if T > 1 and len(units.forward_edges):
        Z = m.var((U, T - 1), 0.0, 1.0)
        m.add([(Z[:, 0], 1.0), (y[:, 0, :], -1.0)], lb=0.0, ub=0.0)
        if T > 2:
            m.add([(Z[:, 1:].ravel(), 1.0), (Z[:, :-1].ravel(), -1.0), (y[:, 1:T - 1, :].reshape(-1, K), -1.0)], lb=0.0, ub=0.0)
        gu, gv = units.forward_edges[:, 0], units.forward_edges[:, 1]
        m.add([(Z[gv].ravel(), 1.0), (Z[gu].ravel(), -1.0)], ub=0.0)
    paying_cols = np.flatnonzero([k.pays_transfers for k in kinds])
    into, out, cost = transfer_rows(m, graph, units, lambda g, t: y[g, t][:, paying_cols], lambda g, t: y[g, t], T)
    time_k = np.stack([(units.acc_time if k.accelerator else units.cpu_time) / k.speed for k in kinds], axis=1)  # (U, K)
    for t in range(T):
        m.add([(np.array([load]), -1.0), (y[:, t, :].ravel()[None, :], time_k.ravel()[None, :]),
               (into[:, t][None, :], cost[None, :]), (out[:, t][None, :], cost[None, :])], ub=0.0)

    def assign(x: np.ndarray) -> dict[int, Device]:
        val = x[y]
        taken = {k.name: 0 for k in kinds}
        device_at = {}
        for t in range(T):
            ki = int(np.argmax(x[c[t]]))
            if x[c[t, ki]] > 0.5:
                device_at[t] = Device(kinds[ki].name, taken[kinds[ki].name])
                taken[kinds[ki].name] += 1
        flat = np.argmax(val.reshape(U, -1), axis=1)
        return {n.id: device_at[int(flat[units.of_node[i]] // K)] for i, n in enumerate(graph.nodes)}

    start = None
    if warm is not None and warm.feasible and all(s.nodes for s in warm.stages):
        start = np.zeros(m.n_cols)
        kind_index = {k.name: i for i, k in enumerate(kinds)}
        # The plan's stages are in pipeline order (the cost model's stage order).
        for t, stage in enumerate(warm.stages):
            ki = kind_index[stage.kind]
            start[c[t, ki]] = 1.0
            for node_id in stage.nodes:
                start[y[units.of_node[graph.index[node_id]], t, ki]] = 1.0
    return assign, start
