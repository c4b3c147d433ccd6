"""The throughput programs under the replication rule (`plan.replicable`): on random DAGs with
replicable nodes read far along and dead-end checks (the DP's generator), the programs' own optimum,
run cold (no warm start to hide behind), equals the cost model's re-score of their split and the brute
force over every split of the original graph; the contiguous one also equals the DP's."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from bruteforce import best_split
from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Edge, OpGraph
from placewise.plan import IPOptions, evaluate, solve
from placewise.plan.ip.milp import run
from placewise.plan.ip.throughput import throughput_model
from placewise.plan.replicable import attach_dead_ends, find_replicable
from test_replication_dp import BIG, _node, replicated_problems


def _cold_optimum(graph: OpGraph, cluster: Cluster, contiguous: bool) -> tuple[float, dict] | None:
    """The throughput program's proven optimum and its split, from no warm start; None if infeasible."""
    m, _, assign, _ = throughput_model(graph, cluster, IPOptions(contiguous=contiguous), None)
    result = run(m.lp(), time_limit=60, gap=0.0, seed=0, start=None, progress=False, what="test")
    if result.infeasible:
        return None
    assert result.status == "Optimal"
    split, replicas = assign(result.x)
    assert replicas == {}  # one device per stage unless max_replicas asks for more
    return result.objective, split


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicated_problems())
def test_throughput_ips_follow_the_replication_rule(problem) -> None:
    graph, cluster = problem
    assert find_replicable(graph).count >= 1
    # The rule puts dead-end checks with what they check; the brute force splits that graph freely.
    attached = attach_dead_ends(graph, find_replicable(graph))
    for contiguous in (True, False):
        expected = best_split(attached, cluster, contiguous=contiguous)
        found = _cold_optimum(graph, cluster, contiguous)
        assert (found is None) == (expected is None)
        if found is None:
            continue
        objective, assignment = found
        ev = evaluate(graph, cluster, assignment, contiguous=contiguous)
        assert ev.feasible, ev.violations
        # What the program minimises is what the cost model scores (within HiGHS's feasibility
        # tolerance on rows, 1e-6: the search's AGREEMENT_TOLERANCE).
        assert ev.max_load == pytest.approx(objective, rel=1e-6, abs=1e-6)
        assert ev.max_load == pytest.approx(expected[0], rel=1e-9, abs=1e-9)
        if contiguous:
            assert ev.max_load == pytest.approx(solve(graph, cluster, "dp").max_load, rel=1e-9, abs=1e-9)


def _sizes_graph() -> OpGraph:
    """Four heavy layers in a chain, all reading one size node (the DP's test graph)."""
    nodes = [_node(i, f"h{i}", 5.0, 5.0, BIG, True) for i in range(4)] + [_node(9, "size", 0.0, 0.0, 0.0, True)]
    edges = [Edge(i, i + 1, 1.0, BIG) for i in range(3)] + [Edge(9, v, 0.05, 8.0) for v in range(4)]
    return OpGraph.build(nodes, edges)


@pytest.mark.parametrize("contiguous", [True, False])
def test_ip_plans_are_scored_with_replication_and_switched_off_without(contiguous):
    graph, cluster = _sizes_graph(), Cluster.simple(2, 0, None)
    on = solve(graph, cluster, "ip", IPOptions(contiguous=contiguous, gap=0.0, time_limit=30))
    off = solve(graph, cluster, "ip", IPOptions(contiguous=contiguous, gap=0.0, time_limit=30, replicate=False))
    # Replicated: 10 per device, nothing sent for the size. Once: the size's output crosses the cut.
    assert on.max_load == pytest.approx(11.0) and on.lower_bound == pytest.approx(11.0)
    assert off.max_load == pytest.approx(11.05) and off.notes["replication"] == "off"
    assert evaluate(graph, cluster, on.assignment(), contiguous=contiguous).max_load == pytest.approx(on.max_load)
    for plan in (on, off):
        if plan.notes["solver_objective"] is not None:
            assert plan.notes["solver_objective"] == pytest.approx(plan.max_load, rel=1e-6, abs=1e-6)


def test_an_infeasible_split_under_copies_memory_is_reported():
    # Each heavy layer fits a device with its copy of the size, but not two of them.
    nodes = [_node(i, f"h{i}", 5.0, 5.0, BIG, True) for i in range(2)] + [_node(9, "size", 0.0, 0.0, 10.0, True)]
    edges = [Edge(0, 1, 1.0, BIG), Edge(9, 0, 0.05, 8.0), Edge(9, 1, 0.05, 8.0)]
    graph = OpGraph.build(nodes, edges)
    assert find_replicable(graph).count == 1
    # Two devices of BIG + 10 bytes: each holds one layer and its copy of the size; BIG + 5 holds no copy.
    assert _cold_optimum(graph, Cluster.simple(2, 0, BIG + 10), True)[0] == pytest.approx(6.0)
    assert _cold_optimum(graph, Cluster.simple(2, 0, BIG + 5), True) is None
    with pytest.raises(PlacewiseError):
        solve(graph, Cluster.simple(2, 0, BIG + 5), "ip", IPOptions(warm_starts=()))
