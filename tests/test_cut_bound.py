"""The cut bound (`plan.dp.cut_bound`) against a brute force over every split: on random branchy
DAGs with heavy transfers, replicable nodes, training graphs and several kinds, it never exceeds the
best contiguous split's max-load; beyond the ideal limit the certificate uses it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import best_split
from placewise.graph import Cluster, DeviceKind, Edge, OpGraph
from placewise.plan import solve
from placewise.plan.dp.cut_bound import INTERVALS, cut_bound
from placewise.plan.dp.problem import lower_bound, make_problem
from placewise.plan.dp.replicated import Reduced
from test_beyond import BEYOND, _bracketed
from test_replication_dp import BIG, _node


@st.composite
def branchy_problems(draw):
    n = draw(st.integers(2, 6))
    training = draw(st.booleans())
    time = st.sampled_from([0.5, 1.0, 2.0, 4.0])
    nodes = [_node(i, f"h{i}", draw(time), draw(time), BIG, True, False, i if training else None) for i in range(n)]
    cost = [draw(st.sampled_from([0.5, 2.0, 6.0])) for _ in range(n)]
    edges = []
    for v in range(1, n):  # each node reads one or two earlier ones: branches and joins
        for u in draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=2, unique=True)):
            edges.append(Edge(u, v, cost[u], BIG))
    if draw(st.booleans()):  # a replicable size read far along
        nodes.append(_node(100, "r", 0.0, 0.0, 8.0, True, False, 100 if training else None))
        edges += [Edge(100, v, 0.0, 8.0) for v in draw(st.lists(st.integers(0, n - 1), min_size=1, unique=True))]
    if training:
        for node in list(nodes):
            nodes.append(_node(1000 + node.id, None, node.acc_time / 2, node.cpu_time / 2, 0.0, True, True, node.id))
        edges += [Edge(1000 + e.dst, 1000 + e.src, 1.0, BIG) for e in list(edges) if e.src < 100]
    kinds = [DeviceKind("acc", draw(st.integers(1, 3)), True, None, draw(st.sampled_from([1.0, 2.0])))]
    if draw(st.booleans()):  # a CPU core in its own process pays transfers; one sharing memory does not
        kinds.append(DeviceKind("cpu", 1, False, shared_memory=draw(st.booleans())))
    return OpGraph.build(nodes, edges, name="branchy"), Cluster(tuple(kinds))


def _bound(graph: OpGraph, cluster: Cluster) -> tuple[float, float]:
    units = Reduced.of(graph, True).units(cluster)
    problem = make_problem(units, cluster)
    return cut_bound(units, problem).value, lower_bound(units, problem)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branchy_problems())
def test_cut_bound_is_below_the_brute_force_optimum(problem) -> None:
    graph, cluster = problem
    expected = best_split(graph, cluster, contiguous=True)
    if expected is None:
        return
    bound, _ = _bound(graph, cluster)
    assert bound <= expected[0] * (1 + 1e-9) + 1e-12


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branchy_problems())
def test_beyond_the_limit_the_certificate_brackets_the_brute_force(problem) -> None:
    _bracketed(*problem)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.deferred(lambda: skip_problems()))
def test_beyond_the_limit_a_skipped_stage_keeps_the_certificate(problem) -> None:
    """The danger, the exact cuts and the ideal chains all run here: the plan and its bound still
    bracket the brute force."""
    _bracketed(*problem)


def test_transfers_lift_the_bound_to_the_optimum() -> None:
    """Four unit-time nodes in a chain, each output costing 5 to send, on 2 accelerators: any cut
    costs a stage 5, so one device (4) is best; the work bound says 2, the cut bound proves 4 less
    one weight interval (the profile's grid: 4 / INTERVALS)."""
    nodes = [_node(i, f"h{i}", 1.0, 1.0, BIG, True, False, None) for i in range(4)]
    graph = OpGraph.build(nodes, [Edge(i, i + 1, 5.0, BIG) for i in range(3)], name="chain")
    cluster = Cluster((DeviceKind("acc", 2, True),))
    bound, work = _bound(graph, cluster)
    assert work == pytest.approx(2.0)
    assert 4.0 - 4.0 / INTERVALS - 1e-9 <= bound <= 4.0
    plan = solve(graph, cluster, "dp", BEYOND)
    assert plan.max_load == pytest.approx(4.0)
    assert plan.lower_bound == pytest.approx(bound) and plan.gap <= 1.0 / INTERVALS + 1e-9
    assert plan.notes["beyond_ideal_limit"]["cut_lower_bound"] == pytest.approx(bound)


def test_a_shared_memory_core_leaves_only_the_work_bound() -> None:
    """A CPU core sharing memory pays no transfers, so the cut bound does not apply."""
    nodes = [_node(i, f"h{i}", 1.0, 1.0, BIG, True, False, None) for i in range(4)]
    graph = OpGraph.build(nodes, [Edge(i, i + 1, 5.0, BIG) for i in range(3)], name="chain")
    assert _bound(graph, Cluster((DeviceKind("acc", 1, True), DeviceKind("cpu", 1, False))))[0] == 0.0


@st.composite
def skip_problems(draw):
    """A chain a -> c_1 -> ... -> c_m -> d with a side node x (a -> x -> d) whose output only d
    reads: a stage inside the chain can have x's port cut by both of its boundaries and not pay it."""
    m = draw(st.integers(1, 5))
    time = st.sampled_from([0.5, 1.0, 2.0])
    ids = list(range(m + 3))
    a, x, d = 0, 1, m + 2
    nodes = [_node(i, f"h{i}", draw(time), draw(time), BIG, True, False, None) for i in ids]
    cost = st.sampled_from([0.25, 0.5, 2.0])
    out_a = draw(cost)  # one output per node: every edge out of it costs the same
    edges = [Edge(a, x, out_a, BIG), Edge(x, d, draw(st.sampled_from([2.0, 4.0, 10.0])), BIG),
             Edge(a, 2, out_a, BIG)] + [Edge(i, i + 1, draw(cost), BIG) for i in range(2, m + 2)]
    return OpGraph.build(nodes, edges, name="skip"), Cluster((DeviceKind("acc", draw(st.integers(2, 4)), True),))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(skip_problems())
def test_a_port_skipping_a_stage_is_not_counted_by_it(problem) -> None:
    graph, cluster = problem
    expected = best_split(graph, cluster, contiguous=True)
    assert expected is not None
    bound, _ = _bound(graph, cluster)
    assert bound <= expected[0] * (1 + 1e-9) + 1e-12


def test_the_skipped_stage_example() -> None:
    """a -> c1 -> c2 -> c3 -> d and a -> x -> d, unit times, x's output costing 10, on 3 devices: the
    optimum 3 has a middle stage that x's port skips; counted on both of its boundaries, the bound
    would be 3.76."""
    nodes = [_node(i, f"h{i}", 1.0, 1.0, BIG, True, False, None) for i in range(6)]
    edges = [Edge(0, 1, 0.5, BIG), Edge(1, 5, 10.0, BIG), Edge(0, 2, 0.5, BIG), Edge(2, 3, 0.5, BIG),
             Edge(3, 4, 0.5, BIG), Edge(4, 5, 0.5, BIG)]
    graph, cluster = OpGraph.build(nodes, edges, name="skip"), Cluster((DeviceKind("acc", 3, True),))
    assert best_split(graph, cluster, contiguous=True)[0] == pytest.approx(3.0)
    bound, _ = _bound(graph, cluster)
    assert 2.9 <= bound <= 3.0 + 1e-12
