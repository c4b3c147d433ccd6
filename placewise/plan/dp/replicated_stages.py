"""The exact DP with replicated stages (`dp --max-replicas R`): each stage also chooses r, 1 <= r <= R.

A contiguous split with replicated stages is a chain of ideals ∅ = I_0 ⊆ ... ⊆ I_p = all units, stage
j running I_j \\ I_{j-1} on r_j devices of one kind t_j. With s the vector of devices still free per
kind, `dp[I, s]` is the least max-load of such a split of I onto at most s:

    dp[∅, s] = 0,   dp[I, s] = min over J ⊊ I, kind t, r <= min(R, s_t) of max(dp[J, s - r e_t], load_t,r(I \\ J))

with load_t,r(S) = (compute_t(S) + transfer_t(S)) / r + all-reduce(params(S), r) per unit of work
(`cost.replicated_load`, `plan.allreduce`); memory and support as for one device (each replica
holds the whole stage). A set whose units do not all say their parameter bytes gets r = 1 only.

Unlike the throughput DP (`dp.kernels`), every pair of ideals is visited (no bound, no band), so the
lattice is capped at `IDEAL_LIMIT` ideals; beyond it the same DP runs on the prefixes of a few
topological orders (a chain lattice, exact over those orders' segments) and the plan says it is not
exact. Every plan is re-scored by the cost model (`plan.replicas.evaluate_replicated`), which must
agree with the DP's value. With R = 1 the plain DP (`dp.solve`) runs instead, so no optimum changes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from numba import njit

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.dp.bound_search import topological_orders
from placewise.plan.dp.copies import copies_in_difference
from placewise.plan.dp.per_ideal import find_split_ports, has, prefix_sums
from placewise.plan.dp.problem import Problem, make_problem
from placewise.plan.dp.replicated import Reduced
from placewise.plan.dp.run import copy_groups, unit_ports
from placewise.plan.ideals import IdealLattice, chain_lattice, enumerate_ideals
from placewise.plan.options import DPOptions
from placewise.plan.plan import Plan
from placewise.plan.predict import cluster_link
from placewise.plan.replicas import replicated_plan, stage_assignment, unit_parameter_bytes
from placewise.plan.units import Units

# Every pair of ideals is visited: beyond this many ideals the DP runs on chains instead.
IDEAL_LIMIT = 5000
# The DP's differences of prefix sums and the cost model's sums round differently.
AGREEMENT = 1e-9


@njit(cache=True)
def _in_set(bits, outer, inner, u):
    """Whether unit u is in the set outer \\ inner (inner a sub-ideal of outer)."""
    return has(bits, outer, u) and not has(bits, inner, u)


@njit(cache=True)
def _pays(bits, i, j, p, port_owner, port_ptr, port_targets):
    """Whether port p is paid by the set I \\ J (the cost model's transfer rule, see `plan.units`)."""
    owner_in = _in_set(bits, i, j, port_owner[p])
    for q in range(port_ptr[p], port_ptr[p + 1]):
        if _in_set(bits, i, j, port_targets[q]) != owner_in:
            return True
    return False


@njit(cache=True)
def _fill(bits, sums, memory, unsup, split_ptr, split, ports, copies, pays_transfer, accelerator, memory_limit,
          kind_count, counts, strides, coef, const, max_r, dp, arg_sub, arg_kind, arg_r):
    """Fill dp over every pair J ⊊ I of ideals (see the module's docstring). One function so that the
    pair loop, the set's sums and the (kind, replicas, state) choice stay in compiled code. `sums`
    (ideals, kinds + 2): per ideal the time on each kind, then parameter bytes and units that do not
    say them. Only ports split by I or by J can be paid by I \\ J (a port wholly inside J, wholly
    outside I, or wholly in I \\ J is not), so a pair looks at those only."""
    n_ideals, words = bits.shape
    n_kinds = pays_transfer.shape[0]
    n_states = dp.shape[1]
    # The arrays themselves, not the tuple: a compiled call taking the tuple pays for all of its arrays.
    port_owner, port_cost, port_ptr, port_targets = ports.owner, ports.cost, ports.target_ptr, ports.targets
    split_by_root = np.full(port_owner.shape[0], -1, dtype=np.int64)
    extra_time = np.zeros(n_kinds)
    for i in range(1, n_ideals):
        lo, hi = split_ptr[i], split_ptr[i + 1]
        # In port order, so that a pair's transfer is summed (and rounded) the same way on any lattice.
        split[lo:hi] = np.sort(split[lo:hi])
        for k in range(lo, hi):
            split_by_root[split[k]] = i
        for j in range(i):
            subset = True
            for w in range(words):
                if bits[j, w] & ~bits[i, w]:
                    subset = False
                    break
            if not subset:
                continue
            transfer = 0.0
            for k in range(lo, hi):
                if _pays(bits, i, j, split[k], port_owner, port_ptr, port_targets):
                    transfer += port_cost[split[k]]
            for k in range(split_ptr[j], split_ptr[j + 1]):
                p = split[k]
                if split_by_root[p] != i and _pays(bits, i, j, p, port_owner, port_ptr, port_targets):
                    transfer += port_cost[p]
            extra_time[:] = 0.0
            mem = memory[i] - memory[j] + copies_in_difference(i, j, copies, extra_time)
            nbytes = sums[i, n_kinds] - sums[j, n_kinds]
            known = sums[i, n_kinds + 1] - sums[j, n_kinds + 1] < 0.5
            for t in range(n_kinds):
                if mem > memory_limit[t] or (accelerator[t] and unsup[i] - unsup[j] > 0.5):
                    continue
                base = sums[i, t] - sums[j, t] + extra_time[t]
                if pays_transfer[t]:
                    base += transfer
                top = min(max_r, kind_count[t]) if known else 1
                for r in range(1, top + 1):
                    load = base if r == 1 else base / r + coef[r] * nbytes + const[r]
                    for s in range(n_states):
                        if counts[s, t] < r:
                            continue
                        cand = max(dp[j, s - r * strides[t]], load)
                        if cand < dp[i, s]:
                            dp[i, s] = cand
                            arg_sub[i, s] = j
                            arg_kind[i, s] = t
                            arg_r[i, s] = r


@dataclass
class _Result:
    value: float
    stages: list[tuple[int, int, np.ndarray]]  # (kind index, replicas, units) in pipeline order


def _run(lattice: IdealLattice, units: Units, problem: Problem, unit_params, unit_unknown, coef, const,
         max_r: int) -> _Result:
    # Per ideal: time per kind, then parameter bytes and units not saying them, as one matrix of sums.
    per_unit = np.vstack([problem.time, unit_params, unit_unknown])
    sums, memory, unsup, _ = prefix_sums(lattice.down_ptr, lattice.down_ideal, lattice.down_unit, per_unit,
                                         units.memory, (~units.supported).astype(float), np.zeros(units.count))
    ports = unit_ports(units)
    split_ptr, split = find_split_ports(lattice.bits, lattice.down_ptr, lattice.down_ideal, lattice.down_unit, ports)
    # Removing one device of kind t from a state subtracts its stride (every kind has a device in the full state).
    strides = (problem.full_state - problem.prev[problem.full_state]).astype(np.int64)
    n_states = problem.prev.shape[0]
    dp = np.full((lattice.count, n_states), np.inf)
    dp[0] = 0.0
    arg_sub = np.zeros((lattice.count, n_states), dtype=np.int64)
    arg_kind = np.zeros_like(arg_sub)
    arg_r = np.ones_like(arg_sub)
    _fill(lattice.bits, sums, memory, unsup, split_ptr, split, ports, copy_groups(units, problem, lattice),
          problem.pays_transfers, problem.accelerator, problem.memory_limit,
          np.array([k.count for k in problem.kinds], dtype=np.int64), problem.counts.astype(np.int64), strides, coef,
          const, max_r, dp, arg_sub, arg_kind, arg_r)
    value = float(dp[-1, problem.full_state])
    stages = []
    i, s = lattice.count - 1, problem.full_state
    while i != 0 and math.isfinite(value):
        j, t, r = int(arg_sub[i, s]), int(arg_kind[i, s]), int(arg_r[i, s])
        inside = lattice.bits[i] & ~lattice.bits[j]
        stages.append((t, r, np.flatnonzero(np.unpackbits(inside.view(np.uint8), bitorder="little"))))
        s -= r * int(strides[t])
        i = j
    return _Result(value, stages[::-1])


def solve_replicated(graph: OpGraph, cluster: Cluster, options: DPOptions) -> Plan:
    """The optimal contiguous split with up to `options.max_replicas` replicas per stage (throughput)."""
    start = time.perf_counter()
    if options.objective != "throughput" or not options.contiguous:
        raise PlacewiseError("--max-replicas plans contiguous splits for throughput only; drop --noncontiguous and "
                             "--objective latency, or use --max-replicas 1")
    reduced = Reduced.of(graph, options.replicate)
    units = reduced.units(cluster)
    problem = make_problem(units, cluster)
    max_r = int(options.max_replicas)
    link = cluster_link(graph, cluster)
    ar = options.allreduce
    # all-reduce per unit of work = coef[r] * parameter bytes + const[r] (linear in the bytes).
    coef, const = (np.array(c) for c in zip(*(ar.linear(r, link.bandwidth, link.latency) for r in range(max_r + 1))))
    unit_params, unit_unknown = unit_parameter_bytes(reduced.work, units.unit_of, units.count)
    try:
        lattices = [enumerate_ideals(units.pred_units, IDEAL_LIMIT)]
        exact = True
    except PlacewiseError:
        lattices = [chain_lattice(units.count, order) for order in topological_orders(units)]
        exact = False
    result = min((_run(lat, units, problem, unit_params, unit_unknown, coef, const, max_r) for lat in lattices),
                 key=lambda r: r.value)
    if not math.isfinite(result.value):
        raise PlacewiseError("no contiguous split with replicated stages fits the devices (memory or unsupported "
                             "operators); add devices or memory")
    assignment, replicas = stage_assignment(reduced.work, units.members, [k.name for k in problem.kinds], result.stages)
    assignment = reduced.complete(assignment, list(dict.fromkeys(assignment.values())))
    notes = {"ideals": lattices[0].count if exact else f"over {IDEAL_LIMIT:,} (chains of {len(lattices)} orders)",
             "exact": exact, "max_replicas": max_r, **units.stats}
    plan = replicated_plan(graph, cluster, assignment, replicas, ar, solver="dp", seconds=time.perf_counter() - start,
                           replicate=options.replicate, notes=notes, lower_bound=result.value if exact else None,
                           gap=0.0 if exact else None)
    if not plan.feasible or abs(plan.max_load - result.value) > AGREEMENT * max(1.0, abs(result.value)):
        raise AssertionError(f"replicated dp value {result.value!r} disagrees with the cost model's {plan.max_load!r} "
                             f"(violations: {plan.violations})")
    return plan
