"""Exact cuts (`plan.dp.exact_cuts`): the MILP's least cut over ideals in a weight window equals a
brute force over every ideal, and the tightened cut bound stays below the brute-force optimum."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import best_split
from placewise.plan.dp.cut_bound import cut_bound
from placewise.plan.dp.exact_cuts import ExactCuts, tighten
from placewise.plan.dp.problem import least_work, make_problem
from placewise.plan.dp.replicated import Reduced
from placewise.plan.ideals import enumerate_ideals
from test_cut_bound import branchy_problems, skip_problems


def _prepared(problem):
    graph, cluster = problem
    units = Reduced.of(graph, True).units(cluster)
    return graph, cluster, units, make_problem(units, cluster)


def _cut(units, ideal: np.ndarray) -> float:
    total = 0.0
    for p in range(len(units.port_cost)):
        members = np.concatenate([[units.port_owner[p]],
                                  units.port_targets[units.port_target_ptr[p]:units.port_target_ptr[p + 1]]])
        inside = ideal[members]
        total += units.port_cost[p] if inside.any() and not inside.all() else 0.0
    return total


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branchy_problems(), st.floats(0.0, 1.0), st.floats(0.0, 0.6))
def test_the_least_cut_in_a_window_is_the_brute_force_one(problem, start, width) -> None:
    _, _, units, prob = _prepared(problem)
    w = least_work(units, prob)[0]
    total = float(w.sum())
    a, b = start * total, (start + width) * total
    lattice = enumerate_ideals(units.pred_units)
    ideals = [np.isin(np.arange(units.count), lattice.units(i)) for i in range(lattice.count)]

    def least_cut(margin: float) -> float:
        return min((_cut(units, i) for i in ideals if a - margin <= float(w[i].sum()) <= b + margin), default=math.inf)

    # HiGHS holds the weight row to its feasibility tolerance (1e-7), so an ideal that far outside the
    # window may count: the bound lies between the least cut in the window widened by that and in the window.
    expected, widened = least_cut(1e-9), least_cut(1e-6 * (1 + total))
    bound, ideal = ExactCuts(units, prob).least(a, b, 10.0)
    assert widened - 1e-5 * (1 + widened) <= bound <= expected + 1e-9 or not math.isfinite(widened)
    if math.isfinite(expected):
        assert ideal is not None and _cut(units, ideal) == pytest.approx(bound, rel=1e-5, abs=1e-5)
    if ideal is not None:
        assert a - 1e-6 * (1 + total) <= float(w[ideal].sum()) <= b + 1e-6 * (1 + total)
    if not math.isfinite(widened):
        assert ideal is None and bound == math.inf


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(branchy_problems(), skip_problems()))
def test_the_tightened_bound_is_below_the_brute_force_optimum(problem) -> None:
    graph, cluster, units, prob = _prepared(problem)
    expected = best_split(graph, cluster, contiguous=True)
    if expected is None:
        return
    cut = cut_bound(units, prob)
    before = cut.value
    tighten(cut, units, prob, math.inf, time.perf_counter() + 30.0)
    assert before <= cut.value <= expected[0] * (1 + 1e-9) + 1e-12
