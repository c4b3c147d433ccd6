"""The DP under the replication rule against a brute force: random DAGs with replicable nodes read far
along (sizes, masks) and dead-end checks; every split of the original graph is scored by the cost
model, which charges each device the replicable nodes it needs."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import best_split
from placewise.errors import PlacewiseError
from placewise.graph import Cluster, DeviceKind, Edge, Node, OpGraph
from placewise.plan import evaluate, solve
from placewise.plan.dp import make_problem, run_dp
from placewise.plan.dp.replicated import Reduced
from placewise.plan.ideals import enumerate_ideals
from placewise.plan.options import DPOptions
from placewise.plan.replicable import attach_dead_ends, find_replicable

BIG = 1000.0  # bytes of a heavy node's output


def _node(*args, parameters: float = 0.0, **kwargs) -> Node:
    """A node that says what it holds (replication needs to know it holds no parameters)."""
    return Node(*args, parameters=parameters, **kwargs)


@st.composite
def replicated_problems(draw):
    n = draw(st.integers(1, 4))
    training = draw(st.booleans())
    time = st.sampled_from([1.0, 2.0, 3.0, 5.0, 8.0])
    nodes = [_node(i, f"h{i}", draw(time), draw(time) * 2, draw(st.sampled_from([BIG, 2 * BIG])), True, False,
                  i if training else None) for i in range(n)]
    cost = [draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in range(n)]
    edges = [Edge(u, v, cost[u], BIG) for u in range(n) for v in range(u + 1, n) if draw(st.integers(0, 2)) > 0]
    # Replicable nodes: a root or a chain of two, each read by some heavy nodes (long fan-outs).
    n_rep = draw(st.integers(1, 2))
    chain = n_rep == 2 and draw(st.booleans())
    for k in range(n_rep):
        r = 100 + k
        nodes.append(_node(r, f"r{k}", draw(st.sampled_from([0.0, 1e-4])), 0.0, 8.0, True, False,
                          r if training else None))
        if chain and k == 1:
            edges.append(Edge(100, 101, 0.0, 8.0))
        readers = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
        edges += [Edge(r, v, 0.0, 8.0) for v in readers]
    if draw(st.booleans()):  # a dead-end check on one heavy node
        anchor = draw(st.integers(0, n - 1))
        nodes.append(_node(200, "check", 1e-4, 1e-4, 0.0, True, False, 200 if training else None))
        edges.append(Edge(anchor, 200, cost[anchor], BIG))
    if training:
        for node in list(nodes):
            nodes.append(_node(1000 + node.id, None, node.acc_time / 2, node.cpu_time / 2, 0.0, True, True, node.id))
        edges += [Edge(1000 + e.dst, 1000 + e.src, 1.0, BIG) for e in list(edges) if e.src < 100 and e.dst < 100]
    kinds = [DeviceKind("acc", draw(st.integers(1, 3)), True, draw(st.sampled_from([None, 4 * BIG])))]
    if draw(st.booleans()):
        kinds.append(DeviceKind("cpu", 1, False))
    return OpGraph.build(nodes, edges, name="rep"), Cluster(tuple(kinds))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicated_problems())
def test_dp_equals_brute_force_under_replication(problem) -> None:
    graph, cluster = problem
    replication = find_replicable(graph)
    assert replication.count >= 1
    # The rule puts dead-end checks with what they check; the brute force splits that graph freely.
    expected = best_split(attach_dead_ends(graph, replication), cluster, contiguous=True)
    if expected is None:
        with pytest.raises(PlacewiseError):
            solve(graph, cluster, "dp")
        return
    plan = solve(graph, cluster, "dp")
    ev = evaluate(graph, cluster, plan.assignment())
    assert ev.feasible, ev.violations
    assert ev.max_load == pytest.approx(plan.max_load, rel=1e-9, abs=1e-12)
    assert plan.max_load == pytest.approx(expected[0], rel=1e-9, abs=1e-9)
    assert plan.notes["replicated_nodes"] == replication.count
    # Walking down and scanning the band both charge the shared copies.
    reduced = Reduced.of(graph, True)
    units = reduced.units(cluster)
    lattice = enumerate_ideals(units.pred_units)
    problem_ = make_problem(units, cluster)
    for walk_cost in (0, -1):
        assert run_dp(units, problem_, lattice, walk_cost=walk_cost).value == pytest.approx(expected[0], rel=1e-9,
                                                                                              abs=1e-9)


def test_switched_off_every_node_is_placed_once():
    nodes = [_node(i, f"h{i}", 5.0, 5.0, BIG, True) for i in range(4)] + [_node(9, "size", 0.0, 0.0, 0.0, True)]
    edges = [Edge(i, i + 1, 1.0, BIG) for i in range(3)] + [Edge(9, v, 0.05, 8.0) for v in range(4)]
    graph = OpGraph.build(nodes, edges)
    cluster = Cluster.simple(2, 0, None)
    on = solve(graph, cluster, "dp")
    off = solve(graph, cluster, "dp", DPOptions(replicate=False))
    assert on.notes["replicated_nodes"] == 1 and "replicated_nodes" not in off.notes and off.notes["replication"] == "off"
    # Replicated: 10 per stage, nothing sent for the size. Once: the size's output crosses the cut.
    assert on.max_load == pytest.approx(11.0)
    assert off.max_load == pytest.approx(11.05)
    assert evaluate(graph, cluster, off.assignment(), replicate=False).max_load == pytest.approx(off.max_load)


def test_cli_explains_replication_and_switches_it_off(tmp_path, capsys):
    import json

    from placewise.cli import main
    from placewise.graph import save_graph
    nodes = [_node(i, f"h{i}", 5.0, 5.0, BIG, True) for i in range(4)] + [_node(9, "size", 0.0, 0.0, 0.0, True)]
    edges = [Edge(i, i + 1, 1.0, BIG) for i in range(3)] + [Edge(9, v, 0.05, 8.0) for v in range(4)]
    path = tmp_path / "g.json"
    save_graph(OpGraph.build(nodes, edges, name="sizes"), path)
    assert main(["plan", str(path), "--accelerators", "2", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "replicated nodes: 1" in out and "units after replication" in out
    assert main(["plan", str(path), "--accelerators", "2", "--no-replicate", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["notes"]["replication"] == "off" and plan["max_load"] == pytest.approx(11.05)
