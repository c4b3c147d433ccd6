"""Integer programs on HiGHS: least max-load (contiguous or not) and least single-sample latency.

The models follow the paper (Tarnawski et al., NeurIPS 2020) and score exactly what
`plan/cost.py` scores, so a solver's objective and the cost model's value of its plan agree:

* Operators that must share a device (a colocation class) are one *unit* with one set of
  assignment variables.
* An accelerator pays, per node whose output crosses its boundary, that node's transfer cost once
  per direction (`into[s, d] >= y[v, d] - y[s, d]` and `out[s, d] >= y[s, d] - y[v, d]` over edges
  s -> v); CPUs pay none.
* Throughput, non-contiguous: units go to devices (`y[unit, device]`), the max-load is minimised.
* Throughput, contiguous: the cost model calls a split contiguous when the devices can be put in
  a pipeline order with every forward edge going forward, i.e. the prefixes of that order are
  ideals (predecessor-closed sets). The paper's IP only asks each device's set to be convex, which
  admits splits whose devices depend on each other in a cycle; so here units go to *pipeline
  positions* (`y[unit, position, kind]`), `Z[unit, t]` (is the unit in the first t+1 positions)
  must be an ideal for every t, and each used position takes one device of some kind.
* Latency (the paper's model, as `cost.latency` computes it): CPU nodes run as soon as their
  inputs are done on unboundedly many cores (`maxCPUs` is ignored, as in the paper's code); each
  accelerator runs its set as one block once every input of the block has arrived, paying its
  transfers inside the block. Big-M constraints use the warm start's latency as M, which is sound
  because only splits at least as good as the warm start are searched.

Warm starts come from the exact DP (throughput, when the `dp` solver is registered) or the latency
greedy baseline; HiGHS gets them through `setSolution`, so a time limit always returns a plan, and
the plan carries HiGHS's dual bound and the gap it proves.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.options import OBJECTIVES, IPOptions
from placewise.plan.plan import Plan, plan_from_assignment

# How far the cost model's value may sit above the solver's objective before it is a modelling bug
# (HiGHS's feasibility tolerances on rows are 1e-7 on values of order 1-1e4).
AGREEMENT_TOLERANCE = 1e-6
# The direct minimisation gets this share of a time limit (or these seconds without one) before the
# target tests take over; it finds good splits, the tests prove bounds.
DIRECT_SHARE = 0.15
DIRECT_SECONDS = 30.0
# The smallest relative step a target test takes below the best split.
MIN_TARGET_GAP = 1e-7
# Bisecting target tests stop halving once the gap is within this many times the one asked for.
BISECT_ABOVE = 4.0


# ---- a small sparse MILP builder ------------------------------------------------------------------
@dataclass
class _Milp:
    """Columns and rows collected as numpy blocks, handed to HiGHS in one `passModel`."""

    lower: list[np.ndarray] = field(default_factory=list)
    upper: list[np.ndarray] = field(default_factory=list)
    cost: list[np.ndarray] = field(default_factory=list)
    integer: list[np.ndarray] = field(default_factory=list)
    n_cols: int = 0
    entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # (row, col, value)
    row_lower: list[np.ndarray] = field(default_factory=list)
    row_upper: list[np.ndarray] = field(default_factory=list)
    n_rows: int = 0

    def var(self, shape: int | tuple[int, ...], lb=0.0, ub=1.0, integer: bool = False, cost: float = 0.0) -> np.ndarray:
        """A block of columns; returns their indices in `shape`. `lb`/`ub` broadcast to `shape`."""
        shape = (shape,) if isinstance(shape, int) else shape
        size = int(np.prod(shape))
        idx = np.arange(self.n_cols, self.n_cols + size).reshape(shape)
        self.lower.append(np.broadcast_to(np.asarray(lb, float), shape).ravel())
        self.upper.append(np.broadcast_to(np.asarray(ub, float), shape).ravel())
        self.cost.append(np.full(size, float(cost)))
        self.integer.append(np.full(size, integer))
        self.n_cols += size
        return idx

    def add(self, terms: Sequence[tuple[np.ndarray, object]], lb=-np.inf, ub=np.inf) -> None:
        """Rows `lb <= sum of terms <= ub`, one row per entry of the terms' first axis.

        A term is (columns, coefficients): columns of shape (R,) or (R, m) (m columns summed into each
        row), coefficients broadcastable to that shape. Columns < 0 are absent and skipped.
        """
        n_rows = len(terms[0][0])
        if n_rows == 0:
            return
        rows = np.arange(self.n_rows, self.n_rows + n_rows)
        for cols, coef in terms:
            cols = np.asarray(cols).reshape(n_rows, -1)
            coef = np.asarray(coef, float)
            # A 1-D coefficient is one value per row.
            vals = np.broadcast_to(coef.reshape(n_rows, 1) if coef.ndim == 1 else coef, cols.shape)
            keep = (cols >= 0) & (vals != 0)
            self.entries.append((np.broadcast_to(rows[:, None], cols.shape)[keep], cols[keep], vals[keep]))
        self.row_lower.append(np.broadcast_to(np.asarray(lb, float), (n_rows,)).copy())
        self.row_upper.append(np.broadcast_to(np.asarray(ub, float), (n_rows,)).copy())
        self.n_rows += n_rows

    def lp(self):
        """The model as a HiGHS LP with integrality (built once, solved possibly several times)."""
        import highspy

        rows = np.concatenate([e[0] for e in self.entries])
        cols = np.concatenate([e[1] for e in self.entries])
        vals = np.concatenate([e[2] for e in self.entries])
        # Column-wise matrix with duplicate (row, col) entries summed.
        stride = max(self.n_rows, 1)
        key, inverse = np.unique(cols.astype(np.int64) * stride + rows, return_inverse=True)
        summed = np.bincount(inverse, weights=vals, minlength=len(key))
        keep = summed != 0
        key, summed = key[keep], summed[keep]
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self.n_cols, self.n_rows
        lp.col_cost_ = np.concatenate(self.cost)
        lp.col_lower_, lp.col_upper_ = np.concatenate(self.lower), np.concatenate(self.upper)
        lp.row_lower_, lp.row_upper_ = np.concatenate(self.row_lower), np.concatenate(self.row_upper)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.searchsorted(key // stride, np.arange(self.n_cols + 1)).astype(np.int32)
        lp.a_matrix_.index_ = (key % stride).astype(np.int32)
        lp.a_matrix_.value_ = summed
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in np.concatenate(self.integer)]
        return lp


def _run(lp, *, time_limit: float | None, gap: float, seed: int, start: np.ndarray | None, progress: bool,
         what: str, fix: tuple[int, float] | None = None) -> "_Result":
    """One HiGHS run on `lp`; `fix` = (column, value) pins a column (the objective, for a target test)."""
    import highspy

    h = highspy.Highs()
    h.silent()
    h.setOptionValue("mip_rel_gap", float(gap))
    h.setOptionValue("random_seed", int(seed))
    if time_limit is not None:
        h.setOptionValue("time_limit", max(float(time_limit), 0.01))
    h.passModel(lp)
    if fix is not None:
        h.changeColBounds(fix[0], fix[1], fix[1])
    if start is not None:
        # A partial solution (integer columns only): HiGHS completes the continuous ones.
        cols = np.flatnonzero(np.asarray(lp.integrality_) == highspy.HighsVarType.kInteger).astype(np.int32)
        h.setSolution(len(cols), cols, start[cols].astype(float))
    with _Progress(h, what, time_limit, enabled=progress):
        h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
    return _Result(h.modelStatusToString(status), status == highspy.HighsModelStatus.kInfeasible,
                   np.asarray(h.getSolution().col_value) if has_solution else None,
                   float(info.objective_function_value) if has_solution else math.inf,
                   float(info.mip_dual_bound))


@dataclass
class _Result:
    status: str
    infeasible: bool
    x: np.ndarray | None
    objective: float
    bound: float


class _Progress:
    """A rich status line on stderr with HiGHS's incumbent, bound and gap while it runs."""

    def __init__(self, highs, what: str, time_limit: float | None, enabled: bool) -> None:
        self.highs, self.what, self.limit, self.enabled = highs, what, time_limit, enabled
        self.last = 0.0

    def __enter__(self):
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.status import Status
        self.status = Status(f"{self.what}: starting HiGHS", console=Console(stderr=True))
        self.status.start()
        self.highs.cbMipInterrupt += self._update
        return self

    def _update(self, event) -> None:
        out = event.data_out
        if out.running_time - self.last < 0.25:
            return
        self.last = out.running_time
        limit = f" of {self.limit:g}" if self.limit else ""
        self.status.update(f"{self.what}: {out.running_time:.1f}{limit} s, best {out.mip_primal_bound:.6g}, "
                           f"bound {out.mip_dual_bound:.6g}, gap {100 * out.mip_gap:.2f}%, {out.mip_node_count} nodes")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.highs.cbMipInterrupt -= self._update
            self.status.stop()


# ---- the problem, dense --------------------------------------------------------------------------
@dataclass
class _Units:
    """Colocation classes merged into units; per-unit sums of the node arrays."""

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
    def of(cls, graph: OpGraph) -> "_Units":
        n = len(graph.nodes)
        root = np.arange(n)
        for group in graph.colocation_groups:
            root[list(group)] = group[0]
        uniq, of_node = np.unique(root, return_inverse=True)
        count = len(uniq)

        def total(values: np.ndarray) -> np.ndarray:
            return np.bincount(of_node, weights=values, minlength=count)

        edges = graph.edge_array
        su, sv = of_node[edges[:, 0]], of_node[edges[:, 1]]
        cross = edges[su != sv]
        fwd = (su != sv) & ~graph.is_backward[edges[:, 0]] & ~graph.is_backward[edges[:, 1]]
        forward_edges = np.unique(np.stack([su[fwd], sv[fwd]], axis=1), axis=0).reshape(-1, 2)
        label = [graph.nodes[int(r)].label for r in uniq]
        return cls(of_node, count, total(graph.acc_time), total(graph.cpu_time), total(graph.memory),
                   np.bincount(of_node, weights=~graph.supported, minlength=count) == 0, forward_edges, cross, label)


def _check_placeable(graph: OpGraph, cluster: Cluster, units: _Units) -> None:
    """Name the plainest reasons no split exists before asking the solver."""
    if any(not k.accelerator and k.count > 0 for k in cluster.kinds):
        return
    accs = [k for k in cluster.kinds if k.accelerator and k.count > 0]
    bad = np.flatnonzero(~graph.supported)
    if len(bad):
        raise PlacewiseError(f"no split exists: node {graph.nodes[bad[0]].id} is not supported on an accelerator and the "
                             "cluster has no CPU; add a CPU (--cpus 1)")
    biggest = max((math.inf if k.memory is None else k.memory) for k in accs)
    too_big = np.flatnonzero(units.memory > biggest * (1 + MEMORY_TOLERANCE))
    if len(too_big):
        raise PlacewiseError(f"no split exists: {units.label[too_big[0]]} (with its colocation class) needs "
                             f"{units.memory[too_big[0]]:.6g} bytes, more than any accelerator's {biggest:.6g}, and the "
                             "cluster has no CPU; add a CPU or memory (--memory)")
    capacity = sum(math.inf if k.memory is None else k.memory * k.count for k in accs)
    if units.memory.sum() > capacity * (1 + MEMORY_TOLERANCE):
        raise PlacewiseError(f"no split exists: the graph needs {units.memory.sum():.6g} bytes, more than the "
                             f"{capacity:.6g} of all accelerators together, and the cluster has no CPU; add devices or memory")


def _infeasible(what: str, cluster: Cluster, contiguous: bool) -> PlacewiseError:
    kinds = ", ".join(f"{k.count} x {k.name}" + (f" ({k.memory:.6g} bytes each)" if k.memory is not None else "")
                      for k in cluster.kinds)
    also = " and contiguity" if contiguous else ""
    fix = "add devices or memory" + (", or use --noncontiguous" if contiguous else "")
    return PlacewiseError(f"the {what} integer program is infeasible: no split of the graph onto {kinds} meets the memory, "
                          f"support, colocation{also} constraints; {fix}")


def _kinds(cluster: Cluster) -> list[DeviceKind]:
    return [k for k in cluster.kinds if k.count > 0]


def _limit(kind: DeviceKind) -> float:
    return math.inf if kind.memory is None else kind.memory * (1 + MEMORY_TOLERANCE)


def _order_identical(m: _Milp, block: np.ndarray) -> None:
    """Identical devices are interchangeable: order them by their lowest unit.

    `block` (units x devices of one kind) holds assignment columns; unit g may go to device j only if
    device j-1 holds a unit below g. Every split has exactly one such numbering, so this is sound.
    """
    U, count = block.shape
    if count < 2:
        return
    prefix = m.var((U, count - 1), 0.0, U)  # prefix[g, j] = how many of units 0..g are on device j
    m.add([(prefix[0, :], 1.0), (block[0, :-1], -1.0)], lb=0.0, ub=0.0)
    m.add([(prefix[1:, :].ravel(), 1.0), (prefix[:-1, :].ravel(), -1.0), (block[1:, :-1].ravel(), -1.0)], lb=0.0, ub=0.0)
    m.add([(block[1:, 1:].ravel(), 1.0), (prefix[:-1, :].ravel(), -1.0)], ub=0.0)
    m.add([(block[0, 1:], 1.0)], ub=0.0)


def _number_by_lowest_unit(unit_device: np.ndarray, first: int, count: int) -> np.ndarray:
    """Renumber devices first..first+count-1 in a split (device per unit) as `_order_identical` asks."""
    lowest = {d: (np.flatnonzero(unit_device == d)[:1].tolist() or [len(unit_device)])[0] for d in range(first, first + count)}
    remap = {old: first + j for j, old in enumerate(sorted(lowest, key=lowest.get))}
    return np.array([remap.get(int(d), int(d)) for d in unit_device])


# ---- throughput -----------------------------------------------------------------------------------
def _transfer_rows(m: _Milp, graph: OpGraph, units: _Units, y_acc, y_all, n_slots: int):
    """Transfer indicators `into[s, slot]`, `out[s, slot]` for each node s whose output crosses between
    units, and their rows; returns them with each s's cost for the load rows. `y_acc(units, slot)` gives
    the columns placing those units on an accelerator in that slot, `y_all(units, slot)` on any device."""
    cross = units.cross
    sources = np.unique(cross[:, 0])
    cost = graph.out_cost[sources]
    # Sources with zero cost change no load; leave them out.
    keep = cost > 0
    sources, cost = sources[keep], cost[keep]
    cross = cross[np.isin(cross[:, 0], sources)]
    pos = np.searchsorted(sources, cross[:, 0])
    into = m.var((len(sources), n_slots), 0.0, 1.0)
    out = m.var((len(sources), n_slots), 0.0, 1.0)
    gs, gv = units.of_node[cross[:, 0]], units.of_node[cross[:, 1]]
    for slot in range(n_slots):
        a_v, all_s = y_acc(gv, slot), y_all(gs, slot)
        a_s, all_v = y_acc(gs, slot), y_all(gv, slot)
        m.add([(into[pos, slot], 1.0), (a_v, -1.0), (all_s, 1.0)], lb=0.0)
        m.add([(out[pos, slot], 1.0), (a_s, -1.0), (all_v, 1.0)], lb=0.0)
    return into, out, cost


def _throughput_model(graph: OpGraph, cluster: Cluster, options, warm: Plan | None):
    """The throughput model: (model, objective column, solution -> split, warm start vector)."""
    units = _Units.of(graph)
    kinds = _kinds(cluster)
    m = _Milp()
    # Any split is at most the sum of all times plus all transfers; a finite bound helps the LP.
    ceiling = float(max(units.acc_time.sum(), units.cpu_time.sum()) / min(k.speed for k in kinds) + 2 * graph.out_cost.sum()) + 1
    load = m.var(1, 0.0, ceiling, cost=1.0)[0]
    if options.contiguous:
        assign, start = _contiguous_model(m, graph, units, kinds, load, warm)
    else:
        assign, start = _noncontiguous_model(m, graph, units, kinds, load, warm)
    return m, load, assign, start


def _noncontiguous_model(m: _Milp, graph: OpGraph, units: _Units, kinds: list[DeviceKind], load: int, warm: Plan | None):
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
            m.add([(y[:, d][None, :], units.memory[None, :])], ub=_limit(k))
    acc_slots = np.flatnonzero(is_acc)
    into, out, cost = _transfer_rows(m, graph, units, lambda g, s: y[g, acc_slots[s]], lambda g, s: y[g, acc_slots[s]],
                                     len(acc_slots))
    transfer_of = {int(d): s for s, d in enumerate(acc_slots)}
    for d, (k, _) in enumerate(devices):
        time_d = (units.acc_time if k.accelerator else units.cpu_time) / k.speed
        terms = [(np.array([load]), -1.0), (y[:, d][None, :], time_d[None, :])]
        if d in transfer_of:
            s = transfer_of[d]
            terms += [(into[:, s][None, :], cost[None, :]), (out[:, s][None, :], cost[None, :])]
        m.add(terms, ub=0.0)
    offset = 0
    for k in kinds:
        _order_identical(m, y[:, offset:offset + k.count])
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
            unit_device = _number_by_lowest_unit(unit_device, offset, k.count)
            offset += k.count
        start = np.zeros(m.n_cols)
        start[y[np.arange(U), unit_device]] = 1.0
    return assign, start


def _contiguous_model(m: _Milp, graph: OpGraph, units: _Units, kinds: list[DeviceKind], load: int, warm: Plan | None):
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
    acc_cols = np.flatnonzero(acc_kind)
    into, out, cost = _transfer_rows(m, graph, units, lambda g, t: y[g, t][:, acc_cols], lambda g, t: y[g, t], T)
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


# ---- latency --------------------------------------------------------------------------------------
def _latency_model(graph: OpGraph, cluster: Cluster, options, warm: Plan | None):
    """The latency model: (model, objective column, solution -> split, warm start vector)."""
    units = _Units.of(graph)
    kinds = _kinds(cluster)
    accelerators = [(k, i) for k in kinds if k.accelerator for i in range(k.count)]
    cpu_kinds = [k for k in kinds if not k.accelerator]
    cpu = max(cpu_kinds, key=lambda k: k.speed, default=None)  # unbounded parallel cores of the fastest kind
    A, U, n = len(accelerators), units.count, len(graph.nodes)
    if warm is not None and warm.latency is not None:
        # Big M: every time in a split at least as good as the warm start is at most its latency.
        big = float(warm.latency) * (1 + 1e-6) + 1e-6
    else:
        # Running every block and CPU node one after another bounds any latency: each node's slower
        # time, and each output paid out once and in on every accelerator.
        slowest = min(k.speed for k in kinds)
        big = float(np.maximum(graph.acc_time, graph.cpu_time).sum() / slowest + graph.out_cost.sum() * (A + 1)) + 1.0
    m = _Milp()
    total = m.var(1, 0.0, big, cost=1.0)[0]
    slots = A + (1 if cpu is not None else 0)  # the last slot is the CPU pool
    ub = np.ones((U, slots))
    ub[np.ix_(~units.supported, np.arange(A))] = 0.0
    y = m.var((U, slots), 0.0, ub, integer=True)
    m.add([(y, 1.0)], lb=1.0, ub=1.0)
    for a, (k, _) in enumerate(accelerators):
        if k.memory is not None:
            m.add([(y[:, a][None, :], units.memory[None, :])], ub=_limit(k))
    node_y = y[units.of_node]  # (n, slots)
    edges = graph.edge_array
    s_nodes, v_nodes = edges[:, 0], edges[:, 1]
    # Transfer indicators for every node with an out-edge (a zero-cost input still delays a block).
    sources = np.unique(s_nodes)
    pos = np.searchsorted(sources, s_nodes)
    into = m.var((len(sources), A), 0.0, 1.0)
    out = m.var((len(sources), A), 0.0, 1.0)
    cross = units.of_node[s_nodes] != units.of_node[v_nodes]
    for a in range(A):
        m.add([(into[pos[cross], a], 1.0), (node_y[v_nodes[cross], a], -1.0), (node_y[s_nodes[cross], a], 1.0)], lb=0.0)
        m.add([(out[pos[cross], a], 1.0), (node_y[s_nodes[cross], a], -1.0), (node_y[v_nodes[cross], a], 1.0)], lb=0.0)
    # Each block is convex (the paper's ideal-based rows): W[., a] is a predecessor-closed set holding
    # the block that a node leaving the block cannot belong to.
    W = m.var((n, A), 0.0, 1.0)
    m.add([(W.ravel(), 1.0), (node_y[:, :A].ravel(), -1.0)], lb=0.0)
    for a in range(A):
        m.add([(W[v_nodes, a], 1.0), (W[s_nodes, a], -1.0)], ub=0.0)
        m.add([(W[v_nodes, a], 1.0), (node_y[v_nodes, a], -1.0), (node_y[s_nodes, a], 1.0)], ub=1.0)
    finish_node = m.var(n, 0.0, big)  # when each node's output is ready
    start = m.var(A, 0.0, big)
    finish = m.var(A, 0.0, big)
    cost = graph.out_cost[sources]
    acc_time = [units.acc_time / k.speed for k, _ in accelerators]
    for a in range(A):
        # finish = start + compute + transfers in and out, all inside the block.
        m.add([(np.array([finish[a]]), 1.0), (np.array([start[a]]), -1.0), (y[:, a][None, :], -acc_time[a][None, :]),
               (into[:, a][None, :], -cost[None, :]), (out[:, a][None, :], -cost[None, :])], lb=0.0, ub=0.0)
        # The block starts after every input it receives is ready: start >= finish_node[s] when into[s, a] = 1.
        m.add([(np.full(len(sources), start[a]), 1.0), (finish_node[sources], -1.0), (into[:, a], -big)], lb=-big)
        # Its nodes are ready when it finishes.
        m.add([(finish_node, 1.0), (np.full(n, finish[a]), -1.0), (node_y[:, a], -big)], lb=-big)
    if cpu is not None:
        cpu_time = graph.cpu_time / cpu.speed
        m.add([(finish_node, 1.0), (node_y[:, A], -cpu_time)], lb=0.0)
        m.add([(finish_node[v_nodes], 1.0), (finish_node[s_nodes], -1.0), (node_y[v_nodes, A], -cpu_time[v_nodes])], lb=0.0)
    else:
        m.add([(finish_node[v_nodes], 1.0), (finish_node[s_nodes], -1.0)], lb=0.0)
    m.add([(np.full(n, total), 1.0), (finish_node, -1.0)], lb=0.0)
    # Path bound (valid, and what makes the relaxation useful): a path visits each convex block in one
    # stretch, so the latency is at least the sum along any path of each node's own time on its device
    # plus the transfer paid wherever the path enters or leaves an accelerator block.
    own = [(node_y[:, a], graph.acc_time / accelerators[a][0].speed) for a in range(A)]
    if cpu is not None:
        own.append((node_y[:, A], graph.cpu_time / cpu.speed))
    path = m.var(n, 0.0, big)
    m.add([(path, 1.0)] + [(cols, -coef) for cols, coef in own], lb=0.0)
    cut_in = m.var(len(edges), 0.0, 1.0)  # the edge enters an accelerator block
    cut_out = m.var(len(edges), 0.0, 1.0)  # the edge leaves one
    for a in range(A):
        m.add([(cut_in, 1.0), (node_y[v_nodes, a], -1.0), (node_y[s_nodes, a], 1.0)], lb=0.0)
        m.add([(cut_out, 1.0), (node_y[s_nodes, a], -1.0), (node_y[v_nodes, a], 1.0)], lb=0.0)
    edge_cost = graph.out_cost[s_nodes]
    m.add([(path[v_nodes], 1.0), (path[s_nodes], -1.0), (cut_in, -edge_cost), (cut_out, -edge_cost)]
          + [(cols[v_nodes], -coef[v_nodes]) for cols, coef in own], lb=0.0)
    m.add([(np.full(n, total), 1.0), (path, -1.0)], lb=0.0)
    offset = 0
    for k in kinds:
        if k.accelerator:
            _order_identical(m, y[:, offset:offset + k.count])
            offset += k.count

    first_start = None
    if warm is not None and warm.latency is not None:
        number = {(k.name, i): a for a, (k, i) in enumerate(accelerators)}
        unit_slot = np.full(U, A)
        for node_id, dev in warm.assignment().items():
            if (dev.kind, dev.index) in number:
                unit_slot[units.of_node[graph.index[node_id]]] = number[(dev.kind, dev.index)]
        offset = 0
        for k in kinds:
            if k.accelerator:
                unit_slot = _number_by_lowest_unit(unit_slot, offset, k.count)
                offset += k.count
        first_start = np.zeros(m.n_cols)
        first_start[y[np.arange(U), unit_slot]] = 1.0

    def assign(x: np.ndarray) -> dict[int, Device]:
        choice = np.argmax(x[y], axis=1)
        assignment: dict[int, Device] = {}
        cpu_nodes = []
        for i, node in enumerate(graph.nodes):
            slot = int(choice[units.of_node[i]])
            if slot < A:
                assignment[node.id] = Device(accelerators[slot][0].name, accelerators[slot][1])
            else:
                cpu_nodes.append(i)
        # The latency model does not care which core runs a CPU node; spread them for a fair max-load.
        core_load = np.zeros(cpu.count if cpu is not None else 0)
        for i in sorted(cpu_nodes, key=lambda i: -graph.cpu_time[i]):
            core = int(np.argmin(core_load))
            core_load[core] += graph.cpu_time[i] / cpu.speed
            assignment[graph.nodes[i].id] = Device(cpu.name, core)
        return assignment

    return m, total, assign, first_start


# ---- entry point ----------------------------------------------------------------------------------
def _search(graph: OpGraph, cluster: Cluster, options, warm: Plan | None, what: str, contiguous: bool) -> tuple[Plan, float | None, dict]:
    """Minimise, then certify: returns the best plan (scored by the cost model), a proven lower bound, notes.

    HiGHS first minimises the objective directly from the warm start. When its dual bound leaves a gap
    above `options.gap`, the objective column is pinned to a target t = best * (1 - gap) (or, once such
    a test could not decide in time, halfway between bound and best) and HiGHS asks whether any split
    has every load (or the latency) within t. With the objective a constant, each
    device's load row is a knapsack, whose cover cuts HiGHS finds -- the direct model's relaxation cannot
    see that, e.g., five layers never fit under t. "Infeasible" proves t a lower bound; a split found is
    better than the best, and the search goes on from it.
    """
    latency = options.objective == "latency"
    builder = _latency_model if latency else _throughput_model
    m, objective_col, assign, start = builder(graph, cluster, options, warm)
    lp = m.lp()
    begin = time.perf_counter()
    deadline = None if options.time_limit is None else begin + options.time_limit

    def left() -> float | None:
        return None if deadline is None else deadline - time.perf_counter()

    def score(x: np.ndarray, objective: float) -> Plan:
        plan = plan_from_assignment(graph, cluster, assign(x), solver="ip", seconds=0.0, objective=options.objective,
                                    contiguous=contiguous)
        if not plan.feasible or plan.value > objective + AGREEMENT_TOLERANCE * max(1.0, abs(objective)):
            raise RuntimeError(f"bug: the cost model scores the {what} IP's split {plan.value!r} "
                               f"({'; '.join(plan.violations) or 'feasible'}), above the solver's objective {objective!r}")
        return plan

    best = warm if warm is not None and warm.feasible and math.isfinite(warm.value) else None
    # The direct run gets a share of the time; the target tests get the rest.
    first = DIRECT_SECONDS if deadline is None else max(min(5.0, options.time_limit), DIRECT_SHARE * options.time_limit)
    result = _run(lp, time_limit=first, gap=options.gap, seed=options.seed, start=start, progress=options.progress,
                  what=f"{what} IP")
    if result.infeasible:
        raise _infeasible(what, cluster, contiguous)
    runs = [f"minimise: {result.status}"]
    objective_at_best = None
    if result.x is not None:
        found = score(result.x, result.objective)
        if best is None or found.value <= best.value:
            best, objective_at_best = found, result.objective
    bound = result.bound if math.isfinite(result.bound) else None
    # A target must sit below the best split, or a zero gap would test the best split forever.
    gap = max(options.gap, MIN_TARGET_GAP)
    bisect = False
    while best is not None and (bound is None or best.value - bound > gap * best.value * (1 + 1e-9)):
        remaining = left()
        if remaining is not None and remaining <= 0.05:
            break
        # A hair above value * (1 - gap), so that proving it leaves a gap within `gap` after rounding.
        # That test gets half the time left; if it cannot decide, halve the interval between bound and
        # best instead, so the certificate (or the split) still improves in steps before time runs out.
        target = best.value * (1 - gap * (1 - 1e-9))
        share = remaining
        floor = 0.0 if bound is None else bound
        if bisect and best.value - floor > BISECT_ABOVE * gap * best.value:
            target = min(target, (floor + best.value) / 2)
        elif not bisect and remaining is not None:
            share = remaining / 2
        test = _run(lp, time_limit=share, gap=options.gap, seed=options.seed, start=None, progress=options.progress,
                    what=f"{what} IP: is there a split within {target:.6g}?", fix=(objective_col, target))
        runs.append(f"target {target:.10g}: {test.status}")
        if test.infeasible:
            bound = target if bound is None else max(bound, target)
        elif test.x is not None:
            best, objective_at_best = score(test.x, target), None
        elif bisect:
            break
        else:
            bisect = True
    if best is None:
        limit = f" within {options.time_limit:g} s" if options.time_limit else ""
        raise PlacewiseError(f"the {what} integer program found no split{limit} ({result.status}); raise --time-limit")
    notes = {"runs": runs, "warm_start": warm.solver if warm is not None else None,
             "solver_objective": objective_at_best, "from_warm_start": best is warm}
    return best, bound, notes


def _best_start(plans: tuple[Plan, ...]) -> Plan | None:
    """The feasible warm start of least value, else the first one given."""
    feasible = [p for p in plans if p.feasible and p.value is not None and math.isfinite(p.value)]
    return min(feasible, key=lambda p: p.value) if feasible else (plans[0] if plans else None)


def solve(graph: OpGraph, cluster: Cluster, options: IPOptions) -> Plan:
    """Registry entry `ip`: the throughput IP (contiguous or not) or the latency IP, by `options`."""
    begin = time.perf_counter()
    if options.objective not in OBJECTIVES:
        raise PlacewiseError(f"objective {options.objective!r} is not known; use throughput or latency")
    _check_placeable(graph, cluster, _Units.of(graph))
    warm = _best_start(options.warm_starts)
    latency = options.objective == "latency"
    # Latency splits let CPU nodes interleave with accelerator blocks: no chain of device sets is asked for.
    contiguous = options.contiguous and not latency
    what = "latency" if latency else ("contiguous" if contiguous else "non-contiguous") + " throughput"
    if options.time_limit is not None:
        # The time limit covers the warm start too.
        options = replace(options, time_limit=max(options.time_limit - (time.perf_counter() - begin), 0.1))
    best, bound, notes = _search(graph, cluster, options, warm, what, contiguous)
    plan = plan_from_assignment(graph, cluster, best.assignment(), solver="ip", seconds=time.perf_counter() - begin,
                                objective=options.objective, contiguous=contiguous, notes=notes)
    value = plan.value
    plan.lower_bound = None if bound is None else min(bound, value)
    plan.gap = None if bound is None else (0.0 if value <= 0 else max(0.0, (value - plan.lower_bound) / value))
    return plan
