"""Beyond the ideal limit (forced here by a limit of 2 ideals): the certified answer is a feasible
contiguous split, re-scored by the cost model, whose lower bound is at most the brute-force optimum
and whose max-load is at least it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from bruteforce import best_split
from placewise.errors import PlacewiseError
from placewise.graph import Cluster, DeviceKind, Edge, OpGraph
from placewise.plan import evaluate, solve
from placewise.plan.options import DPOptions
from test_replication_dp import _node, replicated_problems

BEYOND = DPOptions(ideal_limit=2, time_limit=10)


def _bracketed(graph: OpGraph, cluster: Cluster) -> None:
    expected = best_split(graph, cluster, contiguous=True)
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(replicated_problems())
def test_lower_bound_and_plan_bracket_the_brute_force_optimum(problem) -> None:
    graph, cluster = problem
    _bracketed(graph, cluster)


def test_dead_end_check_apart_from_its_anchor_is_scored_with_it() -> None:
    """Apart from what it checks, on a CPU core (no transfers), the check would look cheaper than the
    DP's units allow; the cost model runs it with its anchor, so the bound and the plan still bracket
    the brute force."""
    nodes = [_node(0, "h0", 1.0, 2.0, 1000.0, True, False, None), _node(1, "h1", 2.0, 2.0, 1000.0, True, False, None),
             _node(100, "r0", 0.0, 0.0, 8.0, True, False, None), _node(200, "check", 1e-4, 1e-4, 0.0, True, False, None)]
    edges = [Edge(100, 0, 0.0, 8.0), Edge(1, 200, 0.5, 1000.0)]
    cluster = Cluster((DeviceKind("acc", 1, True), DeviceKind("cpu", 1, False)))
    _bracketed(OpGraph.build(nodes, edges, name="check"), cluster)


@pytest.mark.parametrize("accelerators", [4, 8])
def test_nasnet_is_certified_within_one_percent_and_beats_pipedream(accelerators) -> None:
    """PipeDream's NASNet-A Mobile (919 units, far beyond the ideal limit) by the default planner:
    a gap of at most 1% within its 60 s, and no worse than PipeDream's planner (about 30 s each at
    load 1 on 2 cores; the gaps were 0.14% and 0.11%)."""
    from conftest import WORKLOADS
    from placewise.graph import load_graph
    from placewise.plan import SolveOptions
    graph = load_graph(WORKLOADS / "pipedream" / "nasnetamobile" / "graph.txt")
    cluster = Cluster.simple(accelerators, 0, None)
    plan = solve(graph, cluster, "dp")
    assert plan.notes["beyond_ideal_limit"]["best_from"] == "ideal chain"
    assert plan.gap <= 0.01 and plan.seconds <= 75
    assert plan.max_load <= solve(graph, cluster, "pipedream", SolveOptions()).max_load


def test_a_split_outside_every_searched_order_is_found_not_declared_infeasible() -> None:
    """Four independent layers of half a device's memory and a size node two of them read: only
    {h1, h3}, {h0}, {h2} fits (h0 and h2 each hold a copy of the size node), which no topological
    order's segments nor any baseline give. The integer program finds it."""
    nodes = [_node(i, f"h{i}", 1.0, 2.0, 2000.0, True, False, None) for i in range(4)]
    nodes.append(_node(100, "r0", 0.0, 0.0, 8.0, True, False, None))
    edges = [Edge(100, 0, 0.0, 8.0), Edge(100, 2, 0.0, 8.0)]
    cluster = Cluster((DeviceKind("acc", 3, True, 4000.0),))
    _bracketed(OpGraph.build(nodes, edges, name="apart"), cluster)
