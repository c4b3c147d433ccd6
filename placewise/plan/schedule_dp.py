"""The exact planner with schedule-aware memory: a DP over ideals that builds stages in pipeline order.

The throughput DP checks each device's summed node memory. Under a schedule a stage holds more, and
how much depends on its position: under 1F1B stage i of p keeps the saved activations of
min(m, p - i) microbatches, under GPipe all m, plus torch's receive buffers and the backward's
transient room (`plan.stage_memory`). So the memory of a set depends on where in the pipeline it
sits. This DP places stages from the last to the first: a state is the ideal I of units still to
place (a prefix of the pipeline) and how many devices of each kind the stages after it use; the
stage I \\ J it adds sits in front of those, so its distance from the end (p - i - 1, the number of
stages already placed) is known exactly, as is whether a stage comes before it (J not empty) and
after it (I not all units). Each stage is checked with `stage_memory`, the same function that
`plan.predict` reports with, and the objective is the cost model's max-load.

With `options.recompute`, a stage that does not fit at its position may recompute its activations
(`plan.recompute`): it then needs `stage_memory(..., recompute=True)` and its load grows by its forward
time. Recompute only adds time and the objective is the largest load, so each stage's best choice is
the cheaper one that fits, independent of the others: without recompute when that fits, else with.

Plain Python over the ideal lattice: meant for graphs of up to a few thousand ideals (layer-level
profiles of chain-like models, tests); larger graphs raise a one-line error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.ideals import enumerate_ideals
from placewise.plan.options import ScheduleDPOptions
from placewise.plan.plan import Plan, plan_from_assignment
from placewise.plan.recompute import evaluate_recomputed
from placewise.plan.replicas import stage_assignment
from placewise.plan.schedule import Schedule
from placewise.plan.units import simplify
from placewise.plan.stage_memory import StageBytes, backward_workspace, stage_memory

# Ideals beyond this many make the pure-Python DP too slow for a planner run.
IDEAL_LIMIT = 5000


@dataclass(frozen=True)
class _Lattice:
    """Ideals as bitmasks, with per-ideal sums the stage costs are differences of."""
    masks: list[int]
    bits: np.ndarray  # (ideals, words) uint64, as the lattice gives them
    time: np.ndarray  # (ideals, kinds): compute time of the ideal's units on each kind (over its speed)
    forward: np.ndarray  # (ideals, kinds): the same for the forward nodes only (what recompute runs again)
    parts: np.ndarray  # (ideals, 4): parameters, gradients, optimizer state, activations
    unsupported: np.ndarray  # (ideals,): unsupported units in the ideal
    crossing: np.ndarray  # (ideals,): bytes per microbatch crossing out of the ideal (a pipeline boundary)


def _node_parts(graph: OpGraph) -> np.ndarray:
    missing = [n.id for n in graph.nodes if None in (n.parameters, n.gradients, n.optimizer_state, n.activations)]
    if missing:
        raise PlacewiseError(f"schedule-aware planning needs each node's memory split (parameters, gradients, optimizer "
                             f"state, activations); node {missing[0]} lacks it. Profile with `placewise profile`")
    return np.array([[n.parameters, n.gradients, n.optimizer_state, n.activations] for n in graph.nodes], float)


def _lattice(graph: OpGraph, cluster: Cluster, kinds, units, scale: float) -> _Lattice:
    lattice = enumerate_ideals(units.pred_units, limit=IDEAL_LIMIT)
    masks = [int.from_bytes(lattice.bits[i].tobytes(), "little") for i in range(lattice.count)]
    member = np.array([[(m >> u) & 1 for u in range(units.count)] for m in masks], dtype=float)  # (ideals, units)
    unit_time = np.stack([(units.acc_time if k.accelerator else units.cpu_time) / k.speed for k in kinds], axis=1)
    unit_forward = np.zeros((units.count, len(kinds)))
    forward_nodes = ~graph.is_backward
    for t, k in enumerate(kinds):
        times = (graph.acc_time if k.accelerator else graph.cpu_time) / k.speed
        np.add.at(unit_forward[:, t], units.unit_of[forward_nodes], times[forward_nodes])
    unit_parts = np.zeros((units.count, 4))
    np.add.at(unit_parts, units.unit_of, _node_parts(graph))
    unit_parts[:, 3] *= scale
    # A forward value crosses the boundary after ideal J when its unit is in J and some reader is not.
    readers: dict[int, int] = {}
    nbytes: dict[int, float] = {}
    for e in graph.edges:
        u, v = graph.index[e.src], graph.index[e.dst]
        if graph.is_backward[u] or graph.is_backward[v] or units.unit_of[u] == units.unit_of[v]:
            continue
        readers[u] = readers.get(u, 0) | (1 << int(units.unit_of[v]))
        nbytes[u] = (e.bytes or 0.0) * scale
    crossing = np.array([sum(nbytes[u] for u, r in readers.items() if (m >> int(units.unit_of[u])) & 1 and r & ~m)
                         for m in masks])
    return _Lattice(masks, lattice.bits, member @ unit_time, member @ unit_forward, member @ unit_parts,
                    member @ (~units.supported).astype(float), crossing)


def _largest_output(graph: OpGraph, units) -> np.ndarray:
    """Per unit: the largest forward output (bytes) among its nodes."""
    out = np.zeros(units.count)
    for i, n in enumerate(graph.nodes):
        if not n.backward:
            out[units.unit_of[i]] = max(out[units.unit_of[i]], n.output or 0.0)
    return out


def solve(graph: OpGraph, cluster: Cluster, options: ScheduleDPOptions | None = None) -> Plan:
    """The least max-load contiguous plan whose every stage fits its device's memory at its position
    under `options.schedule`; one device per stage. Transfers are paid as the cost model pays them."""
    options = options or ScheduleDPOptions()
    if options.objective != "throughput" or not options.contiguous:
        raise PlacewiseError("the dp-schedule solver plans contiguous pipelines for throughput; drop --objective "
                             "latency and --noncontiguous, or use another solver")
    started = time.perf_counter()
    schedule, scale = options.schedule, options.microbatch_scale
    kinds = [k for k in cluster.kinds if k.count > 0]
    if not kinds:
        raise PlacewiseError("the cluster has no devices; give --accelerators and/or --cpus of at least 1")
    # Memory-bearing zero-time units must not be merged: their memory's weight depends on position.
    units = simplify(graph, Cluster(tuple(replace(k, memory=0.0) for k in cluster.kinds), cluster.bandwidth))
    lat = _lattice(graph, cluster, kinds, units, scale)
    largest = _largest_output(graph, units) * scale
    ports = _ports(units)
    full, n_ideals = len(lat.masks) - 1, len(lat.masks)
    training = graph.is_training
    counts = tuple(k.count for k in kinds)
    # Forward only nothing is saved for a backward, so recompute cannot make a stage fit.
    recompute_allowed = options.recompute and training

    def fits(i: int, j: int, work: float, t: int, placed: int, recompute: bool) -> bool:
        """Whether stage I \\ J (`work`: its largest forward output) fits kind t's memory in front of
        `placed` stages."""
        memory = kinds[t].memory
        return memory is None or _need(lat, work, i, j, placed, schedule, training, recompute,
                                       kinds[t].pays_transfers) <= \
            memory * (1 + MEMORY_TOLERANCE)

    subsets = [[int(j) for j in np.flatnonzero(((lat.bits & ~lat.bits[i]) == 0).all(axis=1)) if j != i]
               for i in range(n_ideals)]

    # What stage I \\ J costs wherever it goes, once per I rather than once per device-count state.
    pairs = lru_cache(maxsize=None)(lambda i: _pairs(lat, largest, ports, i, subsets[i]))

    def stage_cost(i: int, j: int, transfer: float, work: float, t: int, placed: int) -> tuple[float, bool]:
        """Load of stage I \\ J on kind t, placed in front of `placed` stages, and whether it recomputes;
        inf if it cannot go there."""
        kind = kinds[t]
        if kind.accelerator and lat.unsupported[i] - lat.unsupported[j] > 0:
            return np.inf, False
        load = lat.time[i, t] - lat.time[j, t]
        load += transfer if kind.pays_transfers else 0.0
        if fits(i, j, work, t, placed, False):
            return load, False
        if recompute_allowed and fits(i, j, work, t, placed, True):
            return load + lat.forward[i, t] - lat.forward[j, t], True
        return np.inf, False

    @lru_cache(maxsize=None)
    def best(i: int, used: tuple[int, ...]) -> tuple[float, tuple]:
        """Least max-load placing ideal i in front of stages using `used` devices per kind."""
        if i == 0:
            return 0.0, ()
        value, choice = np.inf, ()
        for t in range(len(kinds)):
            if used[t] >= counts[t]:
                continue
            more = tuple(u + (s == t) for s, u in enumerate(used))
            for j, transfer, work in pairs(i):
                load, recompute = stage_cost(i, j, transfer, work, t, sum(used))
                if load >= value:
                    continue
                rest, chain = best(j, more)
                if max(load, rest) < value:
                    value, choice = max(load, rest), ((i, j, t, recompute),) + chain
        return value, choice

    value, chain = best(full, tuple(0 for _ in kinds))
    if not np.isfinite(value):
        also = "" if recompute_allowed else ", recompute (drop --no-recompute)" if training else ""
        raise PlacewiseError(f"no contiguous plan fits the devices' memory under {schedule.kind} with "
                             f"{schedule.microbatches} microbatches; give the devices more memory, use more devices, "
                             f"fewer microbatches{also} or 1F1B")
    return _plan(graph, cluster, units, lat, kinds, chain, schedule, time.perf_counter() - started, value)


def _pairs(lat: _Lattice, largest: np.ndarray, ports: list[tuple[int, int, float]], i: int, subsets: list[int]
           ) -> list[tuple[int, float, float]]:
    """Per sub-ideal J of I (`subsets`), (J, transfer, largest forward output) of stage I \\ J."""
    out = []
    for j in subsets:
        members = lat.masks[i] & ~lat.masks[j]
        work = max((largest[u] for u in range(len(largest)) if (members >> u) & 1), default=0.0)
        out.append((j, _transfer(members, ports), work))
    return out


def _need(lat: _Lattice, work: float, i: int, j: int, placed: int, schedule: Schedule, training: bool,
          recompute: bool, pays_transfers: bool) -> float:
    """Peak bytes of stage I \\ J (`work`: its largest forward output) in front of `placed` stages
    (`stage_memory`)."""
    params, grads, state, act = lat.parts[i] - lat.parts[j]
    # A stage that pays transfers holds torch's receive buffers; shared-memory cores hand values over.
    buffered = 1.0 if pays_transfers else 0.0
    stage = StageBytes(max(params, 0.0), max(state, 0.0), max(act, 0.0), buffered * lat.crossing[j],
                       buffered * lat.crossing[i], max(grads, 0.0), backward_workspace(work))
    # Only the stages after it and whether one comes before it matter: position 1 (or 0 when it
    # is the first) of a pipeline with `placed` stages after it.
    position = 1 if j != 0 else 0
    return stage_memory(stage, position, position + 1 + placed, schedule, training=training,
                        recompute=recompute).total


def _ports(units) -> list[tuple[int, int, float]]:
    """Per port: owner unit, bitmask of target units, cost."""
    out = []
    for p, owner in enumerate(units.port_owner):
        targets = units.port_targets[units.port_target_ptr[p]:units.port_target_ptr[p + 1]]
        out.append((int(owner), sum(1 << int(t) for t in targets), float(units.port_cost[p])))
    return out


def _transfer(members: int, ports: list[tuple[int, int, float]]) -> float:
    """The cost model's transfer rule on units: a port is paid once its owner and a target are split."""
    total = 0.0
    for owner, targets, cost in ports:
        inside = (members >> owner) & 1
        if (inside and targets & ~members) or (not inside and targets & members):
            total += cost
    return total


def _plan(graph: OpGraph, cluster: Cluster, units, lat: _Lattice, kinds, chain: tuple, schedule: Schedule,
          seconds: float, value: float) -> Plan:
    """Number each kind's devices in pipeline order and score the split with the cost model."""
    stages = chain[::-1]  # the chain runs from the last stage to the first
    assignment, firsts = stage_assignment(graph, units.members, [k.name for k in kinds], [
        (t, 1, [u for u in range(units.count) if ((lat.masks[i] & ~lat.masks[j]) >> u) & 1]) for i, j, t, _ in stages])
    order = list(firsts)  # one device per stage, in pipeline order
    recomputed = [device for device, (*_, recompute) in zip(order, stages) if recompute]
    # This DP places every node once (no replicable-node rule), so its plan is scored the same way.
    evaluation = evaluate_recomputed(graph, cluster, assignment, recomputed, replicate=False)
    plan = in_order(plan_from_assignment(graph, cluster, assignment, solver="dp-schedule", seconds=seconds,
                                         schedule=schedule, notes={"schedule_dp_value": value},
                                         evaluation=evaluation, replicate=False), order)
    if abs(plan.max_load - value) > 1e-9 * max(1.0, abs(value)):
        raise RuntimeError(f"dp-schedule: the cost model scores the plan {plan.max_load}, the DP {value}")
    return plan



def in_order(plan: Plan, devices: list[Device]) -> Plan:
    """The plan with its stages in the given pipeline order. Stages that do not depend on each other
    may run in either order, but under a schedule their positions decide their memory, so the order
    the planner checked is the one the plan must keep."""
    by_device = {s.device: s for s in plan.stages}
    return replace(plan, stages=[by_device[d] for d in devices])
