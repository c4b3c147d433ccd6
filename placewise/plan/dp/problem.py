"""The DP's encoding of a cluster: device kinds, device-count states, per-kind unit times, the
work bounds derived from them, and DP sets turned back into a node assignment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, DeviceKind, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.replicas import stage_assignment
from placewise.plan.units import Units

INF = np.inf
# Weights and loads compared with this margin, so that rounding never forces a unit in or out wrongly.
SLACK = 1e-9
# Device-count vectors (product of (count + 1) over kinds) beyond this would make dp too wide.
STATE_LIMIT = 4096


@dataclass(frozen=True)
class Problem:
    """The DP's view of a cluster: per kind, per-unit time, memory limit, whether it pays transfers."""

    kinds: tuple[DeviceKind, ...]  # kinds with at least one device
    time: np.ndarray  # (kinds, units): a unit's compute time on one device of the kind
    accelerator: np.ndarray  # (kinds,) bool: takes accelerator times and runs supported units only
    pays_transfers: np.ndarray  # (kinds,) bool: pays its boundary's transfers (`DeviceKind.pays_transfers`)
    memory_limit: np.ndarray  # (kinds,) bytes, inf when unlimited
    prev: np.ndarray  # (states, kinds): the state with one device of that kind fewer, -1 if none
    counts: np.ndarray  # (states, kinds): devices of each kind in a state
    full_state: int


def make_problem(units: Units, cluster: Cluster) -> Problem:
    kinds = tuple(k for k in cluster.kinds if k.count > 0)
    if not kinds:
        raise PlacewiseError("the cluster has no devices; give --accelerators and/or --cpus of at least 1")
    radix = [k.count + 1 for k in kinds]
    n_states = int(np.prod(radix))
    if n_states > STATE_LIMIT:
        raise PlacewiseError(
            f"the cluster's device counts ({', '.join(f'{k.count} x {k.name}' for k in kinds)}) give {n_states} device-count "
            f"combinations, over the DP's {STATE_LIMIT}; merge identical kinds or use fewer devices")
    # Mixed radix: state = sum_t used_t * stride_t, so removing one device of kind t subtracts stride_t.
    strides = np.cumprod([1] + radix[:-1])
    prev = np.full((n_states, len(kinds)), -1, dtype=np.int64)
    counts = np.zeros((n_states, len(kinds)))
    for s in range(n_states):
        for t, stride in enumerate(strides):
            counts[s, t] = (s // stride) % radix[t]
            if counts[s, t] > 0:
                prev[s, t] = s - stride
    time_ = np.array([(units.acc_time if k.accelerator else units.cpu_time) / k.speed for k in kinds])
    return Problem(kinds, time_, np.array([k.accelerator for k in kinds]), np.array([k.pays_transfers for k in kinds]),
                   np.array([INF if k.memory is None else k.memory * (1 + MEMORY_TOLERANCE) for k in kinds]),
                   prev, counts, n_states - 1)


def fitting_times(units: Units, problem: Problem) -> np.ndarray:
    """Each unit's time on each kind (kinds x units), infinite where it cannot go (memory, support)."""
    times = problem.time.copy()
    for t in range(len(problem.kinds)):
        bad = units.memory > problem.memory_limit[t]
        if problem.accelerator[t]:
            bad |= ~units.supported
        times[t, bad] = INF
    return times


def least_work(units: Units, problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's least time on a kind that can hold it, and per kind the most least-work a device
    can hold per unit of its own time (a device's load bound B caps its least work at ratio * B)."""
    times = fitting_times(units, problem)
    least = times.min(axis=0)
    least[~np.isfinite(least)] = 0.0  # such a unit fits nowhere; checked before the DP
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((times > 0) & np.isfinite(times), least[None, :] / times, 0.0)
    return least, ratio.max(axis=1, initial=0.0)


def lower_bound(units: Units, problem: Problem) -> float:
    """Each unit needs at least its least time on any kind; the devices share that work at best evenly."""
    least = fitting_times(units, problem).min(axis=0)
    devices = sum(k.count for k in problem.kinds)
    return float(max(least.max(initial=0.0), least.sum() / devices))


def sets_assignment(graph: OpGraph, units: Units, problem: Problem, sets: list[tuple[int, np.ndarray]]) -> dict:
    """Node id -> device for DP sets (kind index, units) in pipeline order."""
    return stage_assignment(graph, units.members, [k.name for k in problem.kinds], ((t, 1, s) for t, s in sets))[0]
