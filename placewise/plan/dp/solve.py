"""The DP's entry point: bounds, the side-branch restriction, the bound search, and the plan."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.dp.infeasible import check_units_fit, raise_infeasible
from placewise.plan.dp.pendants import merged_pendants
from placewise.plan.dp.problem import Problem, lower_bound, make_problem
from placewise.plan.dp.run import prepare, run_dp
from placewise.plan.dp.bound_search import CERTIFY_GAP, search, topological_orders
from placewise.plan.ideals import chain_lattice, enumerate_ideals
from placewise.plan.options import DPOptions
from placewise.plan.plan import Plan, plan_from_assignment
from placewise.plan.progress import progress_line
from placewise.plan.units import Units, simplify

# The DP's incremental sums and the cost model's sums round differently; they must agree to this.
AGREEMENT = 1e-9


def solve(graph: OpGraph, cluster: Cluster, options: DPOptions) -> Plan:
    """Optimal contiguous split for throughput (least max-load)."""
    start = time.perf_counter()
    if options.objective != "throughput":
        raise PlacewiseError(f"the dp solver optimizes throughput only, not {options.objective}; use --solver ip for latency")
    if not options.contiguous:
        raise PlacewiseError("the dp solver finds contiguous splits only; drop --noncontiguous or use --solver ip")
    units = simplify(graph, cluster)
    problem = make_problem(units, cluster)
    check_units_fit(graph, units, problem)

    # Upper bound: the exact optimum over the segments of a few topological orders.
    chains = [run_dp(units, problem, chain_lattice(units.count, order)) for order in topological_orders(units)]
    best_chain = min(chains, key=lambda r: r.value)
    upper = best_chain.value
    best_assignment = _assignment(graph, units, problem, best_chain.sets)
    deadline = None if options.time_limit is None else start + options.time_limit
    lower = lower_bound(units, problem)
    # Listed first: a graph with too many ideals fails here at once, before any restricted solve.
    limit = int(options.ideal_limit)
    lattice = enumerate_ideals(units.pred_units, limit)
    # A side branch that ends the graph multiplies its ideals: the optimum with such branches kept
    # on the unit they hang off is found on far fewer ideals, and is often the optimum here too.
    restricted = _restricted(graph, cluster, options, units, deadline, upper)
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
            raise_infeasible(graph, units, problem)
        value, assignment = outcome.result.value, _assignment(graph, units, problem, outcome.result.sets)
        bound = value
    else:
        # Certified, or out of time: the best split known, with the best bound the DP runs proved.
        if not math.isfinite(upper):
            raise PlacewiseError(f"the dp solver ran out of its {options.time_limit:g} s before finding a split; "
                                 "raise --time-limit")
        value, assignment, bound = upper, best_assignment, min(outcome.proven, upper)
    notes = {"ideals": lattice.count, "ideal_pairs": outcome.pairs, "dp_runs": outcome.runs, "upper_bound": upper,
             "work_lower_bound": lower, "exact": exact, **units.stats}
    if restricted is not None:
        notes["restricted"] = (f"side branches kept with the unit they hang off: {restricted.notes['ideals']:,} "
                               f"ideals, max-load {restricted.max_load:.10g}"
                               + (f", optimal here to {CERTIFY_GAP:g} (no split below it)" if outcome.upper_optimal
                                  else ""))
    if not exact:
        notes["stopped"] = (f"time limit {options.time_limit:g} s: best split known; "
                            f"every split has max-load at least {outcome.proven:.6g}")
    plan = plan_from_assignment(graph, cluster, assignment, solver="dp", seconds=time.perf_counter() - start,
                                lower_bound=bound, gap=(value - bound) / value if value else 0.0, notes=notes)
    if not plan.feasible or abs(plan.max_load - value) > AGREEMENT * max(1.0, abs(value)):
        raise AssertionError(f"dp value {value!r} disagrees with the cost model's {plan.max_load!r} "
                             f"(violations: {plan.violations})")
    return plan


def _restricted(graph: OpGraph, cluster: Cluster, options: DPOptions, units: Units, deadline: float | None,
                upper: float) -> Plan | None:
    """The exact optimum of the side-branch restriction, when there is one and it is no worse than `upper`."""
    merged = merged_pendants(graph, units)
    if merged is None:
        return None
    left = None if deadline is None else max(deadline - time.perf_counter(), 1e-3)
    try:
        restricted = solve(merged, cluster, replace(options, progress=False, time_limit=left))
    except PlacewiseError:
        return None  # e.g. a branch and its unit do not fit one device together
    return restricted if restricted.notes["exact"] and restricted.max_load <= upper else None


def _assignment(graph: OpGraph, units: Units, problem: Problem, sets: list[tuple[int, np.ndarray]]) -> dict:
    """Node id -> device for DP sets (kind index, units) in pipeline order."""
    assignment = {}
    used = {t: 0 for t in range(len(problem.kinds))}
    for t, unit_set in sets:
        device = Device(problem.kinds[t].name, used[t])
        used[t] += 1
        for u in unit_set:
            for i in units.members[u]:
                assignment[graph.nodes[i].id] = device
    return assignment
