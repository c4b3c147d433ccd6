"""The DP's entry point: bounds, the side-branch restriction, the bound search, and the plan."""

from __future__ import annotations

import math
import time
from dataclasses import replace


from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.dp.infeasible import check_units_fit, raise_infeasible
from placewise.plan.dp.pendants import merged_pendants
from placewise.plan.dp.problem import Problem, lower_bound, make_problem, sets_assignment
from placewise.plan.dp.run import prepare, run_dp
from placewise.plan.dp.bound_search import CERTIFY_GAP, search, topological_orders
from placewise.plan.ideals import chain_lattice, enumerate_ideals
from placewise.plan.options import DPOptions
from placewise.plan.plan import Plan, plan_from_assignment
from placewise.plan.progress import progress_line
from placewise.plan.dp.beyond import COARSE_TRIGGER, beyond_limit, coarse_restriction
from placewise.plan.dp.replicated import Reduced
from placewise.plan.units import Units

# The DP's incremental sums and the cost model's sums round differently; they must agree to this.
AGREEMENT = 1e-9


def solve(graph: OpGraph, cluster: Cluster, options: DPOptions) -> Plan:
    """Optimal contiguous split for throughput (least max-load)."""
    if options.max_replicas > 1:
        from placewise.plan.dp.replicated_stages import solve_replicated  # replicated stages: their own DP
        return solve_replicated(graph, cluster, options)
    start = time.perf_counter()
    _check_options(options)
    reduced = Reduced.of(graph, options.replicate)
    work = reduced.work
    units = reduced.units(cluster)
    problem = make_problem(units, cluster)
    check_units_fit(work, units, problem)

    # Upper bound: the exact optimum over the segments of a few topological orders.
    lower = lower_bound(units, problem)
    chains = [_chain_optimum(units, problem, chain_lattice(units.count, order), lower)
              for order in topological_orders(units)]
    best_chain = min(chains, key=lambda r: r.value)
    upper = best_chain.value
    best_assignment = sets_assignment(work, units, problem, best_chain.sets)
    deadline = None if options.time_limit is None else start + options.time_limit
    # Listed first: a graph with too many ideals goes beyond the limit at once, before any restricted solve.
    try:
        lattice = enumerate_ideals(units.pred_units, int(options.ideal_limit))
    except PlacewiseError:
        return _beyond(reduced, units, problem, cluster, options, best_assignment, lower, start)
    # A side branch that ends the graph multiplies its ideals: the optimum with such branches kept
    # on the unit they hang off is found on far fewer ideals, and is often the optimum here too.
    restricted = _restricted(reduced, cluster, options, units, deadline, upper)
    if lattice.count > COARSE_TRIGGER:
        # Light branchy regions (attention's q/k/v branches) multiply the ideals too: the optimum
        # with them collapsed is found on far fewer ideals and is often the optimum here as well.
        left = None if deadline is None else max(deadline - time.perf_counter(), 1e-3)
        coarse = _exact_or_none(lambda: coarse_restriction(
            reduced, units, problem, cluster, options, upper if restricted is None else restricted.max_load, left))
        if coarse is not None and coarse.max_load <= (upper if restricted is None else restricted.max_load):
            restricted = coarse
    if restricted is not None:
        upper, best_assignment = restricted.max_load, restricted.assignment()
    prepared = prepare(units, problem, lattice)

    reporter = progress_line(options.progress, f"dp {graph.name or 'graph'}", "ideals", lattice.count)
    try:
        outcome = search(units, problem, lattice, prepared, lower, upper, restricted is not None, reporter, deadline)
    finally:
        if reporter:
            reporter.close()
    exact = outcome.result is not None or outcome.upper_optimal
    if outcome.result is not None:
        if not math.isfinite(outcome.result.value):
            raise_infeasible(work, units, problem)
        value, assignment = outcome.result.value, sets_assignment(work, units, problem, outcome.result.sets)
        bound = value
    else:
        # Certified, or out of time: the best split known, with the best bound the DP runs proved.
        if not math.isfinite(upper):
            raise PlacewiseError(f"the dp solver ran out of its {options.time_limit:g} s before finding a split; "
                                 "raise --time-limit")
        value, assignment, bound = upper, best_assignment, min(outcome.proven, upper)
    notes = {"ideals": lattice.count, "ideal_pairs": outcome.pairs, "dp_runs": outcome.runs, "upper_bound": upper,
             "work_lower_bound": lower, "exact": exact, **units.stats,
             **reduced.notes(cluster, units.count, lattice.count)}
    if restricted is not None:
        notes["restricted"] = (f"side branches or light branchy regions kept whole: {restricted.notes['ideals']:,} "
                               f"ideals, max-load {restricted.max_load:.10g}"
                               + (f", optimal here to {CERTIFY_GAP:g} (no split below it)" if outcome.upper_optimal
                                  else ""))
    if not exact:
        notes["stopped"] = (f"time limit {options.time_limit:g} s: best split known; "
                            f"every split has max-load at least {outcome.proven:.6g}")
    # Assignments are built stage by stage, so their devices first appear in pipeline order.
    assignment = reduced.complete(assignment, list(dict.fromkeys(assignment.values())))
    plan = plan_from_assignment(graph, cluster, assignment, solver="dp", seconds=time.perf_counter() - start,
                                lower_bound=bound, gap=(value - bound) / value if value else 0.0, notes=notes,
                                replicate=options.replicate)
    if not plan.feasible or abs(plan.max_load - value) > AGREEMENT * max(1.0, abs(value)):
        raise AssertionError(f"dp value {value!r} disagrees with the cost model's {plan.max_load!r} "
                             f"(violations: {plan.violations})")
    return plan


def _check_options(options: DPOptions) -> None:
    if options.objective != "throughput":
        raise PlacewiseError(f"the dp solver optimizes throughput only, not {options.objective}; use --solver ip for latency")
    if not options.contiguous:
        raise PlacewiseError("the dp solver finds contiguous splits only; drop --noncontiguous or use --solver ip")


def _beyond(reduced: Reduced, units: Units, problem: Problem, cluster: Cluster, options: DPOptions,
            chain: dict[int, Device], lower: float, start: float) -> Plan:
    """The certified answer beyond the ideal limit (`dp.beyond`): the best split found, the larger of
    the work bound and the cut bound."""
    chain = reduced.complete(chain, list(dict.fromkeys(chain.values())))
    value, assignment, found = beyond_limit(reduced, units, problem, cluster, options, chain, solve, start)
    bound = max(lower, found["cut_lower_bound"])
    if bound > value + AGREEMENT * max(1.0, abs(value)):  # a bound above a split found is a bug, not a gap of 0
        raise AssertionError(f"lower bound {bound!r} exceeds the split found, {value!r}")
    bound = min(bound, value)  # equal up to rounding
    notes = {"exact": False, "ideals": f"over {int(options.ideal_limit):,}", "work_lower_bound": lower,
             "beyond_ideal_limit": found, **units.stats, **reduced.notes(cluster, units.count, None)}
    if "ideals_after_replication" in notes:
        notes["ideals_after_replication"] = notes["ideals"]
    return plan_from_assignment(reduced.graph, cluster, assignment, solver="dp", seconds=time.perf_counter() - start,
                                lower_bound=bound, gap=(value - bound) / value if value else 0.0, notes=notes,
                                replicate=options.replicate)


# Bounds tried for the chain DP, as multiples of the work lower bound, before an unbounded run.
CHAIN_STEPS = (1.05, 1.25, 2.0)


def _chain_optimum(units: Units, problem: Problem, chain, lower: float):
    """The DP on one topological order's prefixes. An unbounded run compares every pair of prefixes
    (minutes on 20,000 units); a run at a bound only pairs within a device's reach, and finds the
    optimum whenever it is under the bound, so a few rising bounds come first."""
    for factor in CHAIN_STEPS if lower > 0 else ():
        result = run_dp(units, problem, chain, lower * factor)
        if math.isfinite(result.value):
            return result
    return run_dp(units, problem, chain)


def _exact_or_none(make) -> Plan | None:
    try:
        plan = make()
    except PlacewiseError:
        return None  # e.g. a merged group does not fit one device
    return plan if plan is not None and plan.notes["exact"] else None


def _restricted(reduced: Reduced, cluster: Cluster, options: DPOptions, units: Units, deadline: float | None,
                upper: float) -> Plan | None:
    """The exact optimum of the side-branch restriction, when there is one and it is no worse than `upper`."""
    merged = merged_pendants(reduced.work, units)
    if merged is None:
        return None
    left = None if deadline is None else max(deadline - time.perf_counter(), 1e-3)
    restricted = _exact_or_none(
        lambda: solve(reduced.colocated_like(merged), cluster, replace(options, progress=False, time_limit=left)))
    return restricted if restricted is not None and restricted.max_load <= upper else None


