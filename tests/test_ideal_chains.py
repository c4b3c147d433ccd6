"""The DP over chains of given ideals (`plan.dp.ideal_chains`): with every ideal of a small random
DAG it is the exact DP, so it must equal a brute force over all contiguous splits; with any family
its split is feasible and the cost model scores it at the DP's value."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bruteforce import best_split
from placewise.plan import evaluate
from placewise.plan.dp.ideal_chains import best_chain
from placewise.plan.dp.problem import make_problem, sets_assignment
from placewise.plan.dp.replicated import Reduced
from placewise.plan.ideals import enumerate_ideals
from test_cut_bound import branchy_problems


def _setup(problem):
    graph, cluster = problem
    reduced = Reduced.of(graph, True)
    units = reduced.units(cluster)
    lattice = enumerate_ideals(units.pred_units)
    ideals = np.array([np.isin(np.arange(units.count), lattice.units(i)) for i in range(lattice.count)])
    return graph, cluster, reduced, units, make_problem(units, cluster), ideals


def _no_shared_copies(units) -> bool:
    # Shared copies of replicable nodes are left to the cost model's re-score: not compared here.
    return units.copies is None or units.copies.count == 0


def _scored(graph, cluster, reduced, units, problem, sets) -> float:
    assignment = sets_assignment(reduced.work, units, problem, sets)
    ev = evaluate(graph, cluster, reduced.complete(assignment, list(dict.fromkeys(assignment.values()))))
    assert ev.feasible, ev.violations
    return ev.max_load


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(branchy_problems())
def test_with_every_ideal_it_is_the_brute_force_optimum(problem) -> None:
    graph, cluster, reduced, units, prob, ideals = _setup(problem)
    assume(_no_shared_copies(units))
    expected = best_split(graph, cluster, contiguous=True)
    found = best_chain(units, prob, ideals)
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert found[0] == pytest.approx(expected[0], rel=1e-9, abs=1e-12)
    assert _scored(graph, cluster, reduced, units, prob, found[1]) == pytest.approx(found[0], rel=1e-9, abs=1e-12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(branchy_problems(), st.data())
def test_with_some_ideals_the_split_is_feasible_and_scored_as_found(problem, data) -> None:
    graph, cluster, reduced, units, prob, ideals = _setup(problem)
    assume(_no_shared_copies(units))
    keep = data.draw(st.lists(st.booleans(), min_size=len(ideals), max_size=len(ideals)))
    found = best_chain(units, prob, ideals[np.array(keep, dtype=bool)])
    expected = best_split(graph, cluster, contiguous=True)
    if found is None:
        return
    assert expected is not None and found[0] >= expected[0] * (1 - 1e-9) - 1e-12
    assert _scored(graph, cluster, reduced, units, prob, found[1]) == pytest.approx(found[0], rel=1e-9, abs=1e-12)


def test_a_bound_below_the_optimum_finds_nothing() -> None:
    """Splits at or above the bound are left out: at the optimum it is found, just below it not."""
    from placewise.graph import Cluster, DeviceKind, Edge, OpGraph
    from test_replication_dp import BIG, _node
    nodes = [_node(i, f"h{i}", 1.0, 1.0, BIG, True, False, None) for i in range(4)]
    graph = OpGraph.build(nodes, [Edge(i, i + 1, 0.5, BIG) for i in range(3)], name="chain")
    cluster = Cluster((DeviceKind("acc", 2, True),))
    _, _, _, units, prob, ideals = _setup((graph, cluster))
    value, _ = best_chain(units, prob, ideals)
    assert value == pytest.approx(2.5)  # two and two, each paying the one cut
    assert best_chain(units, prob, ideals, bound=value) is not None
    assert best_chain(units, prob, ideals, bound=value * (1 - 1e-6)) is None
    assert math.isfinite(best_chain(units, prob, ideals[:1])[0])  # ∅ and all units are always there
