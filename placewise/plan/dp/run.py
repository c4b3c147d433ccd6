"""One DP run at a bound: the per-lattice preparation (reused across bounds) and the chunked fill."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from placewise.plan.csr import csr_by
from placewise.plan.dp.copies import Copies, copies_per_ideal
from placewise.plan.dp.kernels import Bounds, Lattice, Ports, UnitData, run_chunk
from placewise.plan.dp.per_ideal import find_split_ports, prefix_sums
from placewise.plan.dp.problem import INF, Problem, least_work
from placewise.plan.ideals import IdealLattice
from placewise.plan.units import Units

# Sets are pruned when their compute alone exceeds the bound by more than rounding.
PRUNE_SLACK = 1e-9
# A walk step costs about as many scanned band entries as this: most band entries fail the cheap
# finite-row test, so scanning wins unless the walk is short (measured on gnmt and inceptionv3:
# 4, 16, 64, 1024 gave 2.6, 1.7, 1.3, 0.9 s of CPU on gnmt).
WALK_COST = 1024
# Ideals processed per compiled call, so that progress can be shown between calls.
CHUNK = 2048


@dataclass
class DPResult:
    value: float
    sets: list[tuple[int, np.ndarray]]  # (kind index, units) per device, in pipeline order
    pairs: int  # sets whose load was evaluated
    scanned_roots: int  # ideals whose sub-ideals were scanned rather than walked


@dataclass
class Prepared:
    """What the DP needs of a lattice that does not depend on the bound (reused across bounds)."""

    unit_data: UnitData
    copies: Copies | None  # None without shared copy groups (see `dp.copies`)
    ports: Ports
    lat: Lattice
    ratio: np.ndarray  # per kind, the most least-work a device holds per unit of its own time
    total_work: float
    transfer_share: float
    all_pay_transfers: np.ndarray  # per state: every one of its devices pays transfers


def prepare(units: Units, problem: Problem, lattice: IdealLattice) -> Prepared:
    """Ports by unit, per-ideal prefix sums and split ports, ideals sorted by work."""
    n_ideals = lattice.count
    ports = unit_ports(units)
    unsupported = (~units.supported).astype(np.int64)
    least, ratio = least_work(units, problem)
    comp_ideal, mem_ideal, unsup_ideal, work = prefix_sums(
        lattice.down_ptr, lattice.down_ideal, lattice.down_unit, problem.time, units.memory, unsupported.astype(float), least)
    by_work = np.argsort(work, kind="stable")
    pos_of = np.empty(n_ideals, dtype=np.int64)
    pos_of[by_work] = np.arange(n_ideals)
    split_ptr, split_ports = find_split_ports(lattice.bits, lattice.down_ptr, lattice.down_ideal, lattice.down_unit, ports)
    split_cost = np.add.reduceat(np.append(units.port_cost[split_ports], 0.0), split_ptr[:-1]) \
        if len(split_ports) else np.zeros(n_ideals)
    split_cost[np.diff(split_ptr) == 0] = 0.0
    lat = Lattice(lattice.down_ptr, lattice.down_ideal, lattice.down_unit, lattice.bits, work, comp_ideal, mem_ideal,
                  unsup_ideal, by_work, work[by_work], np.ascontiguousarray(lattice.bits[by_work]), pos_of, split_ptr,
                  split_ports, split_cost)
    # Transfers count in the load of a side whose devices all pay them at the lowest such kind's work ratio.
    paying_ratio = ratio[problem.pays_transfers]
    transfer_share = float(paying_ratio.min()) * (1 - PRUNE_SLACK) if len(paying_ratio) else 0.0
    return Prepared(UnitData(problem.time, units.memory, unsupported), copy_groups(units, problem, lattice), ports,
                    lat, ratio, float(work[-1]), transfer_share,
                    problem.counts[:, ~problem.pays_transfers].sum(axis=1) == 0)


def unit_ports(units: Units) -> Ports:
    """The units' ports with, per unit, the ports it owns and those it is a target of."""
    n_ports = len(units.port_cost)
    own_ptr, own_ports = csr_by(units.port_owner, np.arange(n_ports), units.count)
    port_of_target = np.repeat(np.arange(n_ports), np.diff(units.port_target_ptr))
    tgt_ptr, tgt_ports = csr_by(units.port_targets, port_of_target, units.count)
    return Ports(units.port_cost, units.port_owner, np.diff(units.port_target_ptr), units.port_target_ptr,
                 units.port_targets, own_ptr, own_ports, tgt_ptr, tgt_ports)


def copy_groups(units: Units, problem: Problem, lattice: IdealLattice) -> Copies | None:
    """The shared copy groups for the kernels: per unit the groups it needs, per ideal their needers."""
    copies = units.copies
    if copies is None or copies.count == 0:
        return None
    group_of_needer = np.repeat(np.arange(copies.count), np.diff(copies.needer_ptr))
    copy_ptr, copy_groups = csr_by(copies.needers, group_of_needer, units.count)
    return Copies(copies.time_per_kind(problem.kinds), copies.memory, copy_ptr, copy_groups,
                  np.zeros(copies.count, dtype=np.int64),
                  copies_per_ideal(lattice.down_ptr, lattice.down_ideal, lattice.down_unit, copy_ptr, copy_groups,
                                   copies.count))


def run_dp(units: Units, problem: Problem, lattice: IdealLattice, bound: float = INF,
           progress: Callable[[int, int], None] | None = None,
           deadline: float | None = None, walk_cost: int = WALK_COST, prepared: Prepared | None = None
           ) -> DPResult | None:
    """The DP on a lattice (all ideals, or a chain's prefixes) with sets above `bound` left out;
    None when `deadline` (a perf_counter time) passes first. `walk_cost` 0 finds sub-ideals by
    scanning only, -1 by walking only (both are exact; tests check they agree). The value is the
    optimum whenever it is at most `bound`, and infinite when the optimum is above it."""
    if prepared is None:
        prepared = prepare(units, problem, lattice)
    n_ideals = lattice.count
    prune = bound * (1 + PRUNE_SLACK) if math.isfinite(bound) else INF
    # Capacity of each state in least work, with slack for rounding in the sums.
    ratio = prepared.ratio
    share = problem.counts @ ratio
    if math.isfinite(prune):
        capacity = share * prune * (1 + PRUNE_SLACK) + PRUNE_SLACK
        reach = float(ratio.max(initial=0.0)) * prune * (1 + PRUNE_SLACK) + PRUNE_SLACK
    else:
        capacity = np.where(share > 0, INF, PRUNE_SLACK)
        reach = INF
    bounds = Bounds(problem.accelerator, problem.pays_transfers, problem.memory_limit, problem.prev, capacity,
                    float(reach), prepared.all_pay_transfers, float(prepared.transfer_share), int(walk_cost))
    n_states = problem.prev.shape[0]
    dp = np.empty((n_ideals, n_states))
    arg_ideal = np.empty((n_ideals, n_states), dtype=np.int64)
    arg_kind = np.empty((n_ideals, n_states), dtype=np.int64)
    finite = np.zeros(n_ideals, dtype=np.uint64)  # per ideal, a bit per state whose dp is finite
    # Per state (one row for all when states > 64), a bit per work-sorted position whose dp is finite.
    finite_at = np.zeros((n_states if n_states <= 64 else 1, (n_ideals + 63) // 64), dtype=np.uint64)
    stamp = np.full(n_ideals, -1, dtype=np.int64)
    in_set = np.zeros(units.count, dtype=np.int64)
    port_count = np.zeros(len(units.port_cost), dtype=np.int64)
    stats = np.zeros(3, dtype=np.int64)
    for lo in range(0, n_ideals, CHUNK):
        hi = min(n_ideals, lo + CHUNK)
        run_chunk(lo, hi, prepared.lat, prepared.unit_data, prepared.copies, prepared.ports, bounds, prune,
                  prepared.total_work, dp, arg_ideal, arg_kind, finite, finite_at, stamp, in_set, port_count, stats)
        if progress is not None:
            progress(hi, n_ideals)
        if deadline is not None and hi < n_ideals and time.perf_counter() > deadline:
            return None
    value = float(dp[n_ideals - 1, problem.full_state])
    sets = _sets(problem, lattice, arg_ideal, arg_kind) if math.isfinite(value) else []
    return DPResult(value, sets, int(stats[0] + stats[2]), int(stats[1]))


def _sets(problem: Problem, lattice: IdealLattice, arg_ideal: np.ndarray, arg_kind: np.ndarray
          ) -> list[tuple[int, np.ndarray]]:
    """The optimal split's sets (kind index, units), in pipeline order, traced back from the full ideal."""
    sets: list[tuple[int, np.ndarray]] = []
    ideal, s = lattice.count - 1, problem.full_state
    while ideal != 0:
        sub, t = int(arg_ideal[ideal, s]), int(arg_kind[ideal, s])
        if sub != ideal:
            inside = lattice.bits[ideal] & ~lattice.bits[sub]
            sets.append((t, np.flatnonzero(np.unpackbits(inside.view(np.uint8), bitorder="little"))))
        s = int(problem.prev[s, t])
        ideal = sub
    sets.reverse()
    return sets
