"""The throughput models: least max-load, with units on devices (non-contiguous) or on pipeline
positions whose prefixes are ideals (contiguous). Under the replication rule (`SolveOptions.replicate`)
the units are those of the graph less its replicable nodes, whose copies each slot pays through
`Placed.copy_columns` (see `ip/copies.py`).

Replicated stages (`ReplicaOptions.max_replicas` R > 1): the positions model (`_positions_model`)
places units on stages, a position each, with the ideal rows when contiguous and without them when
not (a non-contiguous split's stages need no order). A position is held by a stage on r devices of
one kind, 1 <= r <= R, each replica taking a device of that kind. Its load
(`cost.replicated_load`) is (compute + transfer) / r plus the all-reduce share coef[r] x parameter
bytes + const[r] (`plan.allreduce.AllReduce.linear`), which is not linear in r; so every assignment
column is split per r (`y[unit, position, kind, r]`, `c[position, kind, r]`) and each r's columns
carry their own coefficients. At most one r is used per position, so the load row sums exactly the
chosen r's load, with no big-M. Each replica holds the whole stage (memory as for one device), and
a unit that does not say its parameter bytes may only be in a stage of one replica (as the DP).
With R = 1 the r axis has length 1 and the contiguous model is the one-device-per-position model;
the non-contiguous one keeps units on devices (`_noncontiguous_model`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.ip.copies import Placed
from placewise.plan.ip.milp import Milp
from placewise.plan.ip.model import kinds_of, memory_limit, number_by_lowest_unit, order_identical, transfer_rows
from placewise.plan.options import IPOptions
from placewise.plan.plan import Plan
from placewise.plan.predict import cluster_link
from placewise.plan.replicas import unit_parameter_bytes
from placewise.plan.units import Colocated

# What a solution maps to: node id -> (first) device, and first device -> replicas for stages of more than one.
Split = tuple[dict[int, Device], dict[Device, int]]


def throughput_model(graph: OpGraph, cluster: Cluster, options: IPOptions, warm: Plan | None):
    """The throughput model: (model, objective column, solution -> split, warm start vector)."""
    placed = Placed.of(graph, options.replicate)
    kinds = kinds_of(cluster)
    m = Milp()
    # Any split is at most the sum of all times plus all transfers; a finite bound helps the LP.
    ceiling = float(max(placed.total_time()) / min(k.speed for k in kinds) + 2 * graph.out_cost.sum()) + 1
    load = m.var(1, 0.0, ceiling, cost=1.0)[0]
    if options.contiguous or options.max_replicas > 1:
        assign, start = _positions_model(m, placed, kinds, load, warm, _Replicas.of(graph, cluster, placed, options),
                                         ideals=options.contiguous)
    else:
        assign, start = _noncontiguous_model(m, placed, kinds, load, warm)
    return m, load, assign, start


def _copy_terms(placed: Placed, w: np.ndarray | None, slot: int, kind: DeviceKind, what: str,
                replicas: float = 1.0) -> list:
    """The load (`what="time"`, per replica of a slot of `replicas`) or memory row terms of the shared
    copies a slot of `kind` pays."""
    if w is None:
        return []
    copies = placed.copies
    if what == "memory":
        return [(w[:, slot][None, :], copies.memory[None, :])]
    return [(w[:, slot][None, :], copies.time_on(kind)[None, :] / replicas)]


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

    def assign(x: np.ndarray) -> Split:
        unit_device = [Device(devices[d][0].name, devices[d][1]) for d in np.argmax(x[y], axis=1)]
        return placed.assignment(unit_device, list(dict.fromkeys(unit_device))), {}

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


@dataclass(frozen=True)
class _Replicas:
    """The replica counts a position may take (1..R) and their all-reduce share per replica and unit
    of work, `coef[r] * parameter bytes + const[r]`; per unit its parameter bytes and whether it says
    them (a stage with a unit that does not is not replicated)."""

    counts: np.ndarray  # 1.0 .. R
    coef: np.ndarray
    const: np.ndarray
    params: np.ndarray
    known: np.ndarray

    @classmethod
    def of(cls, graph: OpGraph, cluster: Cluster, placed: Placed, options: IPOptions) -> "_Replicas":
        U, R = placed.units.count, options.max_replicas
        if R == 1:
            return cls(np.ones(1), np.zeros(1), np.zeros(1), np.zeros(U), np.ones(U, dtype=bool))
        link = cluster_link(graph, cluster)
        coef, const = (np.array(v) for v in zip(*(options.allreduce.linear(r, link.bandwidth, link.latency)
                                                   for r in range(1, R + 1))))
        params, unknown = unit_parameter_bytes(placed.work, placed.units.of_node, U)
        return cls(np.arange(1.0, R + 1), coef, const, params, unknown < 0.5)


def _positions_model(m: Milp, placed: Placed, kinds: list[DeviceKind], load: int, warm: Plan | None,
                     reps: _Replicas, ideals: bool):
    """Units to pipeline positions, each position held by r replicas of some kind, every prefix an
    ideal when `ideals` (contiguous). Returns (solution -> split, warm start)."""
    graph, units = placed.work, placed.units
    T, K, U, R = sum(k.count for k in kinds), len(kinds), units.count, len(reps.counts)
    count = np.array([k.count for k in kinds], float)
    c_ub = np.broadcast_to((reps.counts[None, :] <= count[:, None]).astype(float), (T, K, R))
    ub = np.broadcast_to(c_ub, (U, T, K, R)).copy()
    ub[np.ix_(~units.supported, np.arange(T), np.array([k.accelerator for k in kinds]), np.arange(R))] = 0.0
    ub[~reps.known, :, :, 1:] = 0.0
    y = m.var((U, T, K, R), 0.0, ub, integer=True)  # unit at position t, held by r + 1 devices of kind k
    c = m.var((T, K, R), 0.0, c_ub, integer=True)  # position t is held by r + 1 devices of kind k
    m.add([(y.reshape(U, -1), 1.0)], lb=1.0, ub=1.0)
    m.add([(y.ravel(), 1.0), (np.broadcast_to(c, (U, T, K, R)).ravel(), -1.0)], ub=0.0)
    m.add([(c.reshape(T, -1), 1.0)], ub=1.0)
    # Every replica takes a device of its kind.
    m.add([(c.transpose(1, 0, 2).reshape(K, -1), np.tile(reps.counts, T)[None, :])], ub=count)
    # A position is held only when it holds a unit, and used positions come first (no empty gaps).
    m.add([(c.ravel(), 1.0), (y.transpose(1, 2, 3, 0).reshape(T * K * R, U), -1.0)], ub=0.0)
    if T > 1:
        m.add([(c[1:].reshape(T - 1, -1), 1.0), (c[:-1].reshape(T - 1, -1), -1.0)], ub=0.0)
    w = placed.copy_columns(m, y.reshape(U, -1))  # slot (t * K + k) * R + r
    for ki, k in enumerate(kinds):
        if k.memory is not None:
            # Each replica holds the whole stage, so the memory row is one device's.
            terms = [(y[:, :, ki].transpose(1, 0, 2).reshape(T, -1), np.repeat(units.memory, R)[None, :]),
                     (c[:, ki], -k.memory * (1 + MEMORY_TOLERANCE))]
            if w is not None:
                w_k = w.reshape(-1, T, K, R)[:, :, ki].transpose(1, 0, 2).reshape(T, -1)
                terms.append((w_k, np.repeat(placed.copies.memory, R)[None, :]))
            m.add(terms, ub=0.0)
    if ideals:
        _ideal_prefixes(m, units, y.reshape(U, T, K * R))
    # Transfer slot t * R + r: position t held by r + 1 replicas, which share its sends and receives.
    paying_cols = np.flatnonzero([k.pays_transfers for k in kinds])
    into, out, cost = transfer_rows(m, graph, units, lambda g, s: y[g, s // R][:, paying_cols, s % R],
                                    lambda g, s: y[g, s // R], T * R)
    time_k = np.stack([(units.acc_time if k.accelerator else units.cpu_time) / k.speed for k in kinds], axis=1)
    # Per (unit, kind, r): its time over r and its bytes' all-reduce share.
    per_replica = time_k[:, :, None] / reps.counts + reps.coef * reps.params[:, None, None]
    for t in range(T):
        terms = [(np.array([load]), -1.0), (y[:, t].ravel()[None, :], per_replica.ravel()[None, :]),
                 (c[t].ravel()[None, :], np.tile(reps.const, K)[None, :])]
        for r in range(R):
            terms += [(into[:, t * R + r][None, :], cost[None, :] / reps.counts[r]),
                      (out[:, t * R + r][None, :], cost[None, :] / reps.counts[r])]
            terms += [term for ki, k in enumerate(kinds)
                      for term in _copy_terms(placed, w, (t * K + ki) * R + r, k, "time", reps.counts[r])]
        m.add(terms, ub=0.0)

    def assign(x: np.ndarray) -> Split:
        taken = {k.name: 0 for k in kinds}
        device_at: dict[int, Device] = {}
        replicas: dict[Device, int] = {}
        for t in range(T):
            ki, r = np.unravel_index(int(np.argmax(x[c[t]])), (K, R))
            if x[c[t, ki, r]] > 0.5:
                device_at[t] = Device(kinds[ki].name, taken[kinds[ki].name])
                taken[kinds[ki].name] += int(r) + 1
                if r > 0:
                    replicas[device_at[t]] = int(r) + 1
        position = np.argmax(x[y].reshape(U, -1), axis=1) // (K * R)
        return placed.assignment([device_at[int(t)] for t in position],
                                 [device_at[t] for t in sorted(device_at)]), replicas

    return assign, _positions_start(m, placed, kinds, warm, y, c)


def _ideal_prefixes(m: Milp, units: Colocated, y: np.ndarray) -> None:
    """Z[g, t] = is unit g within the first t+1 positions; every such prefix must be an ideal.
    `y` (units x positions x slots of a position) holds the assignment columns."""
    U, T, _ = y.shape
    if T < 2 or not len(units.forward_edges):
        return
    Z = m.var((U, T - 1), 0.0, 1.0)
    m.add([(Z[:, 0], 1.0), (y[:, 0], -1.0)], lb=0.0, ub=0.0)
    if T > 2:
        m.add([(Z[:, 1:].ravel(), 1.0), (Z[:, :-1].ravel(), -1.0), (y[:, 1:T - 1].reshape(U * (T - 2), -1), -1.0)],
              lb=0.0, ub=0.0)
    gu, gv = units.forward_edges[:, 0], units.forward_edges[:, 1]
    m.add([(Z[gv].ravel(), 1.0), (Z[gu].ravel(), -1.0)], ub=0.0)


def _positions_start(m: Milp, placed: Placed, kinds: list[DeviceKind], warm: Plan | None, y: np.ndarray,
                      c: np.ndarray) -> np.ndarray | None:
    """The warm start as a solution vector; None without one, or when the program cannot express it."""
    if warm is None or not warm.feasible or not all(s.nodes for s in warm.stages):
        return None
    start = np.zeros(m.n_cols)
    kind_index = {k.name: i for i, k in enumerate(kinds)}
    unit_device = placed.unit_devices(warm.assignment())
    replicas = warm.replicas()
    if any(r > c.shape[2] for r in replicas.values()):
        return None
    # The plan's stages are in pipeline order (the cost model's stage order); a stage holding
    # replicated nodes only takes no position.
    held = [stage.device for stage in warm.stages if stage.device in set(unit_device.values())]
    position = {device: t for t, device in enumerate(held)}
    for device, t in position.items():
        start[c[t, kind_index[device.kind], replicas.get(device, 1) - 1]] = 1.0
    for unit, device in unit_device.items():
        start[y[unit, position[device], kind_index[device.kind], replicas.get(device, 1) - 1]] = 1.0
    return start
