"""Beyond the ideal limit (forced here by a limit of 2 ideals): the certified answer is a feasible
contiguous split, re-scored by the cost model, whose lower bound is at most the brute-force optimum
and whose max-load is at least it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from bruteforce import best_split
from placewise.errors import PlacewiseError
from placewise.plan import evaluate, solve
from placewise.plan.options import DPOptions
from placewise.plan.replicable import attach_dead_ends, find_replicable
from test_replication_dp import replicated_problems

BEYOND = DPOptions(ideal_limit=2, time_limit=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicated_problems())
def test_lower_bound_and_plan_bracket_the_brute_force_optimum(problem) -> None:
    graph, cluster = problem
    expected = best_split(attach_dead_ends(graph, find_replicable(graph)), cluster, contiguous=True)
    if expected is None:
        with pytest.raises(PlacewiseError):
            solve(graph, cluster, "dp", BEYOND)
        return
    plan = solve(graph, cluster, "dp", BEYOND)
    ev = evaluate(graph, cluster, plan.assignment())
    assert ev.feasible, ev.violations
    assert ev.max_load == pytest.approx(plan.max_load, rel=1e-9, abs=1e-12)
    assert plan.lower_bound <= expected[0] * (1 + 1e-9) + 1e-12
    assert expected[0] <= plan.max_load * (1 + 1e-9) + 1e-12
    if plan.max_load > 0:
        assert plan.gap == pytest.approx((plan.max_load - plan.lower_bound) / plan.max_load, abs=1e-12)
