"""The throughput models: least max-load, with units on devices (non-contiguous) or on pipeline
positions whose prefixes are ideals (contiguous). Under the replication rule (`SolveOptions.replicate`)
the units are those of the graph less its replicable nodes, whose copies each slot pays through
`Placed.copy_columns` (see `ip/copies.py`)."""

from __future__ import annotations

import numpy as np

from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.ip.copies import Placed
from placewise.plan.ip.milp import Milp
from placewise.plan.ip.model import kinds_of, memory_limit, number_by_lowest_unit, order_identical, transfer_rows
from placewise.plan.options import IPOptions
from placewise.plan.plan import Plan


def throughput_model(graph: OpGraph, cluster: Cluster, options: IPOptions, warm: Plan | None):
    """The throughput model: (model, objective column, solution -> split, warm start vector)."""
    placed = Placed.of(graph, options.replicate)
    kinds = kinds_of(cluster)
    m = Milp()
    # Any split is at most the sum of all times plus all transfers; a finite bound helps the LP.
    ceiling = float(max(placed.total_time()) / min(k.speed for k in kinds) + 2 * graph.out_cost.sum()) + 1
    load = m.var(1, 0.0, ceiling, cost=1.0)[0]
    if options.contiguous:
        assign, start = _contiguous_model(m, placed, kinds, load, warm)
    else:
        assign, start = _noncontiguous_model(m, placed, kinds, load, warm)
    return m, load, assign, start


def _copy_terms(placed: Placed, w: np.ndarray | None, slot: int, kind: DeviceKind, what: str) -> list:
    """The load (`what="time"`) or memory row terms of the shared copies a slot of `kind` pays."""
    if w is None:
        return []
    copies = placed.copies
    if what == "memory":
        return [(w[:, slot][None, :], copies.memory[None, :])]
    return [(w[:, slot][None, :], copies.time_on(kind)[None, :])]


def _noncontiguous_model(m: Milp, placed: Placed, kinds: list[DeviceKind], load: int, warm: Plan | None):
    """Units to devices; every device's load at most `load`. Returns (solution -> split, warm start)."""
    graph, units = placed.work, placed.units
    devices = [(k, i) for k in kinds for i in range(k.count)]
    D, U = len(devices), units.count
    is_acc = np.array([k.accelerator for k, _ in devices])
    ub = np.ones((U, D))
    ub[np.ix_(~units.supported, is_acc)] = 0.0
    y = m.var((U, D), 0.0, ub, integer=True)
    m.add([(y, 1.0)], lb=1.0, ub=1.0)
    w = placed.copy_columns(m, y)
    for d, (k, _) in enumerate(devices):
        if k.memory is not None:
            m.add([(y[:, d][None, :], units.memory[None, :])] + _copy_terms(placed, w, d, k, "memory"),
                  ub=memory_limit(k))
    # Devices that pay transfers (accelerators, CPU cores in separate processes) get transfer rows.
    paying_slots = np.flatnonzero([k.pays_transfers for k, _ in devices])
    into, out, cost = transfer_rows(m, graph, units, lambda g, s: y[g, paying_slots[s]],
                                     lambda g, s: y[g, paying_slots[s]], len(paying_slots))
    transfer_of = {int(d): s for s, d in enumerate(paying_slots)}
    for d, (k, _) in enumerate(devices):
        time_d = (units.acc_time if k.accelerator else units.cpu_time) / k.speed
        terms = [(np.array([load]), -1.0), (y[:, d][None, :], time_d[None, :])] + _copy_terms(placed, w, d, k, "time")
        if d in transfer_of:
            s = transfer_of[d]
            terms += [(into[:, s][None, :], cost[None, :]), (out[:, s][None, :], cost[None, :])]
        m.add(terms, ub=0.0)
    offset = 0
    for k in kinds:
        order_identical(m, y[:, offset:offset + k.count])
        offset += k.count

    def assign(x: np.ndarray) -> dict[int, Device]:
        unit_device = [Device(devices[d][0].name, devices[d][1]) for d in np.argmax(x[y], axis=1)]
        return placed.assignment(unit_device, list(dict.fromkeys(unit_device)))

    start = None
    if warm is not None:
        number = {(k.name, i): d for d, (k, i) in enumerate(devices)}
        unit_device = np.zeros(U, dtype=int)
        for unit, dev in placed.unit_devices(warm.assignment()).items():
            unit_device[unit] = number[(dev.kind, dev.index)]
        offset = 0
        for k in kinds:
            unit_device = number_by_lowest_unit(unit_device, offset, k.count)
            offset += k.count
        start = np.zeros(m.n_cols)
        start[y[np.arange(U), unit_device]] = 1.0
    return assign, start


def _contiguous_model(m: Milp, placed: Placed, kinds: list[DeviceKind], load: int, warm: Plan | None):
    """Units to pipeline positions, each position one device of some kind, every prefix an ideal.
    Returns (solution -> split, warm start)."""
    graph, units = placed.work, placed.units
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
    w = placed.copy_columns(m, y.reshape(U, T * K))  # slot t * K + k: position t on a device of kind k
    for ki, k in enumerate(kinds):
        if k.memory is not None:
            copies = [] if w is None else [(w[:, ki::K].T, placed.copies.memory[None, :])]
            m.add([(y[:, :, ki].T, units.memory[None, :]), (c[:, ki], -k.memory * (1 + MEMORY_TOLERANCE))] + copies,
                  ub=0.0)
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
        copies = [term for ki, k in enumerate(kinds) for term in _copy_terms(placed, w, t * K + ki, k, "time")]
        m.add([(np.array([load]), -1.0), (y[:, t, :].ravel()[None, :], time_k.ravel()[None, :]),
               (into[:, t][None, :], cost[None, :]), (out[:, t][None, :], cost[None, :])] + copies, ub=0.0)

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
        return placed.assignment([device_at[int(f // K)] for f in flat], [device_at[t] for t in sorted(device_at)])

    start = None
    if warm is not None and warm.feasible and all(s.nodes for s in warm.stages):
        start = np.zeros(m.n_cols)
        kind_index = {k.name: i for i, k in enumerate(kinds)}
        unit_device = placed.unit_devices(warm.assignment())
        # The plan's stages are in pipeline order (the cost model's stage order); a stage holding
        # replicated nodes only takes no position.
        held = [stage.device for stage in warm.stages if stage.device in set(unit_device.values())]
        position = {device: t for t, device in enumerate(held)}
        for device, t in position.items():
            start[c[t, kind_index[device.kind]]] = 1.0
        for unit, device in unit_device.items():
            start[y[unit, position[device], kind_index[device.kind]]] = 1.0
    return assign, start
