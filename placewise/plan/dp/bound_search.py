"""The bound search: the optimum found by DP runs at a few bounds, and the chain upper bound's orders."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from placewise.plan.dp.problem import INF, Problem
from placewise.plan.dp.run import DPResult, Prepared, run_dp
from placewise.plan.ideals import IdealLattice
from placewise.plan.progress import ProgressLine
from placewise.plan.units import Units

# The search's first run, just below the chain bound, gets this many seconds before the bound search
# starts.
QUICK_TRY = 2.0
# A split from a restricted problem is certified optimal by a DP run at this fraction below its
# max-load finding nothing (cheap: runs just below the optimum are).
CERTIFY_GAP = 1e-8
# The bound search raises the bound by this fraction per failed run. On PipeDream's inception_v3 with
# 4 devices, steps of 0.5%, 1%, 2%, 4% took 17.4, 15.2, 19.0, 14.7 s (62, 32, 17, 9 runs): about the
# same, since failed runs get cheaper as steps get longer while the overshoot gets dearer.
BOUND_STEP = 0.01


def topological_orders(units: Units) -> list[np.ndarray]:
    """A few topological orders of the units, for the chain upper bound: the numbering itself and a
    depth-first one that finishes a branch before starting the next (keeps segments compact)."""
    n = units.count
    orders = [np.arange(n)]
    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = np.zeros(n, dtype=np.int64)
    for v, ps in enumerate(units.pred_units):
        indeg[v] = len(ps)
        for p in ps:
            succ[p].append(v)
    stack = [v for v in range(n - 1, -1, -1) if indeg[v] == 0]
    order = []
    while stack:
        u = stack.pop()
        order.append(u)
        for v in sorted(succ[u], reverse=True):
            indeg[v] -= 1
            if indeg[v] == 0:
                stack.append(v)
    orders.append(np.array(order, dtype=np.int64))
    return orders


@dataclass
class Outcome:
    result: DPResult | None  # the DP's optimal split; None when out of time or when `upper` is optimal
    proven: float  # every split has at least this max-load
    upper_optimal: bool  # the split behind `upper` is optimal (to CERTIFY_GAP)
    runs: int
    pairs: int


def search(units: Units, problem: Problem, lattice: IdealLattice, prepared: Prepared, lower: float, upper: float,
            certify: bool, reporter: ProgressLine | None, deadline: float | None) -> Outcome:
    """The optimum, found by DP runs at a few bounds.

    A run at bound B returns the optimum if it is at most B and nothing otherwise, and costs more the
    more sets fit under B; far more once B passes the optimum, since then many partial splits
    survive, while a run that fails just below the optimum is cheap. So the first run is just below
    `upper` (the best split known): it fails when that split is optimal and otherwise finds the
    optimum. It may take until the deadline where `upper` is the optimum of a restricted problem
    (`certify`: likely optimal here too), else QUICK_TRY seconds (enough where the chain split is
    near optimal or the graph is small). Past those, runs from the work lower bound up in steps of
    BOUND_STEP, each failure proving a higher lower bound, until the first success, which
    overshoots by at most one step.
    """
    outcome = Outcome(None, lower, False, 0, 0)

    def run(bound: float, until: float | None) -> DPResult | None:
        outcome.runs += 1
        progress = None
        if reporter is not None:
            reporter.update(description=f"sets up to {bound:.6g}", completed=0)
            progress = lambda done, total: reporter.update(completed=done)  # noqa: E731
        result = run_dp(units, problem, lattice, bound, progress, until, prepared=prepared)
        if result is not None:
            outcome.pairs += result.pairs
        return result

    if not math.isfinite(upper):
        outcome.result = run(INF, deadline)
        return outcome
    below = upper * (1 - CERTIFY_GAP)
    until = deadline
    if not certify:
        quick = time.perf_counter() + QUICK_TRY
        until = quick if deadline is None else min(quick, deadline)
    outcome.result = run(below, until)
    if outcome.result is not None:
        if not math.isfinite(outcome.result.value):
            outcome.result, outcome.proven, outcome.upper_optimal = None, below, True
        return outcome
    if certify:
        return outcome
    # From a work bound of 0 (no compute anywhere, only transfers) steps in % would never move.
    bound = lower if lower > 0 else upper / 2
    while deadline is None or time.perf_counter() < deadline:
        bound = min(bound * (1 + BOUND_STEP), upper)
        outcome.result = run(bound, deadline)
        if outcome.result is None or math.isfinite(outcome.result.value):
            return outcome
        outcome.proven = bound
        if bound >= upper:
            # Nothing at or below the best split known, which the cost model scored at `upper`: the two
            # differ by rounding only (the DP sums in another order), so that split is the optimum.
            # Without this, the search ran at `upper` again and again, for ever.
            outcome.result, outcome.upper_optimal = None, True
            return outcome
    return outcome
