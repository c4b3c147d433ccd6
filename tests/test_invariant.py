"""The planner's promise: on every valid graph the default `plan` returns a feasible plan whose
max-load is at most that of every contiguous baseline `compare` runs, with a lower bound and a gap."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PAPER, WORKLOADS
from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Edge, Node, OpGraph, load_graph
from placewise.plan import SolveOptions, evaluate, solve
from placewise.plan.compare import compare, default_methods
from placewise.plan.options import DPOptions

# Relative rounding allowed between two plans' max-loads.
REL = 1e-9


def _check_invariant(graph: OpGraph, cluster: Cluster, options: SolveOptions | None = None) -> None:
    options = options or SolveOptions()
    plan = solve(graph, cluster, "dp", DPOptions(**vars(options)))
    ev = evaluate(graph, cluster, plan.assignment())
    assert plan.feasible and ev.feasible, plan.violations
    assert ev.max_load == pytest.approx(plan.max_load, rel=1e-9, abs=1e-12)
    assert plan.lower_bound is not None and plan.gap is not None
    assert plan.lower_bound <= plan.max_load * (1 + REL)
    if plan.max_load > 0:
        assert plan.gap == pytest.approx((plan.max_load - plan.lower_bound) / plan.max_load, abs=1e-12)
    methods = [m for m in default_methods() if m not in ("dp", "ip", "local-search", "metis")]
    for row in compare(graph, cluster, methods, options).rows:
        if row.error is None and row.feasible and row.contiguous and math.isfinite(row.max_load):
            assert plan.max_load <= row.max_load * (1 + REL) + 1e-12, (row.method, row.max_load, plan.max_load)


@st.composite
def graphs(draw):
    """Random DAGs of up to 12 operators, some read far along by cheap size-like nodes, maybe training."""
    n = draw(st.integers(1, 12))
    training = draw(st.booleans())
    time = st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0])
    nodes = [Node(i, f"n{i}", draw(time), draw(time) * 2, draw(st.sampled_from([0.0, 1.0, 4.0])), True, False,
                  i if training else None, parameters=draw(st.sampled_from([0.0, 1.0]))) for i in range(n)]
    cost = [draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(n)]
    edges = [Edge(u, v, cost[u], 100.0) for u in range(n) for v in range(u + 1, min(n, u + 4))
             if draw(st.integers(0, 2)) > 0]
    if training:
        nodes += [Node(100 + i, None, nodes[i].acc_time, nodes[i].cpu_time, 0.0, True, True, i, parameters=0.0)
                  for i in range(n)]
        edges += [Edge(100 + e.dst, 100 + e.src, 1.0, 100.0) for e in list(edges)]
    memory = draw(st.sampled_from([None, 8.0, 16.0]))
    return OpGraph.build(nodes, edges, name="random"), Cluster.simple(draw(st.integers(1, 4)), draw(st.integers(0, 1)),
                                                                       memory)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_default_plan_is_never_worse_than_a_contiguous_baseline(problem) -> None:
    graph, cluster = problem
    try:
        _check_invariant(graph, cluster)
    except PlacewiseError as e:  # only a problem where memory rules out every split may refuse
        assert "memory" in str(e) or "bytes" in str(e), str(e)


SHARED = sorted((PAPER / "throughput-inputs").glob("*/*.json")) + sorted((WORKLOADS / "pipedream").glob("*/graph.txt"))


@pytest.mark.parametrize("path", SHARED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shared_workload_keeps_the_invariant(path) -> None:
    graph = load_graph(path)
    cluster = graph.cluster or Cluster.simple(4, 0, None)
    _check_invariant(graph, cluster, SolveOptions(time_limit=60.0))


def test_ip_starts_from_the_best_solver_or_baseline_and_is_never_worse():
    from placewise.plan.warm_start import warm_starts
    graph = load_graph(WORKLOADS / "pipedream" / "gnmt" / "graph.txt")
    cluster = Cluster.simple(4, 0, None)
    starts = warm_starts(graph, cluster, SolveOptions(time_limit=20.0))
    assert {"dp", "block-time", "pipedream-nocomm"} <= {p.solver for p in starts}
    plan = solve(graph, cluster, "ip", SolveOptions(time_limit=20.0))
    assert plan.feasible and plan.max_load <= min(p.max_load for p in starts) * (1 + REL)
