"""The contiguous throughput program with replicated stages (`IPOptions.max_replicas`): on random small
graphs (the replicated DP's generator: training or not, mixed device kinds, CPUs that pay transfers
or not, memory caps, ring and PipeDream all-reduce, with or without a link latency; and the
replication rule's generator: replicable nodes and dead-end checks), the program's own optimum, run
cold (no warm start to hide behind), equals the cost model's re-score of its split and replicas, the
brute force over every split and replica count, and the replicated DP's optimum."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, DeviceKind, OpGraph
from placewise.plan import solve
from placewise.plan.allreduce import PIPEDREAM, AllReduce
from placewise.plan.ip.milp import run
from placewise.plan.ip.throughput import throughput_model
from placewise.plan.options import DPOptions, IPOptions
from placewise.plan.replicable import find_replicable
from placewise.plan.replicas import evaluate_replicated
from test_replicated_stages import BYTES_PER_UNIT, _brute_force, _chain, _stage_splits, problems
from test_replication_dp import replicated_problems


def _cold_optimum(graph: OpGraph, cluster: Cluster, options: IPOptions) -> tuple[float, dict, dict] | None:
    """The program's proven optimum, its split and replicas, from no warm start; None if infeasible."""
    m, _, assign, _ = throughput_model(graph, cluster, options, None)
    result = run(m.lp(), time_limit=60, gap=0.0, seed=0, start=None, progress=False, what="test")
    if result.infeasible:
        return None
    assert result.status == "Optimal"
    return (result.objective, *assign(result.x))


def _brute_force_over(groups: list[list[int]], graph: OpGraph, cluster: Cluster, max_r: int, allreduce: AllReduce,
                      contiguous: bool) -> float | None:
    """The least max-load over every split of `groups` into stages with replica counts up to `max_r`."""
    kinds = [k for k in cluster.kinds if k.count > 0]
    best = None
    for split, replicas in _stage_splits(groups, kinds, max_r):
        ev = evaluate_replicated(graph, cluster, split, replicas, allreduce, contiguous=contiguous)
        if ev.feasible and (best is None or ev.max_load < best):
            best = ev.max_load
    return best


def _check_against(graph: OpGraph, cluster: Cluster, max_r: int, allreduce: AllReduce, expected: float | None,
                   contiguous: bool = True) -> float | None:
    """The cold program's optimum equals `expected` (the brute force's) and its re-score, and (when
    contiguous) the replicated DP's; returns it."""
    found = _cold_optimum(graph, cluster, IPOptions(max_replicas=max_r, allreduce=allreduce, contiguous=contiguous))
    assert (found is None) == (expected is None)
    dp_options = DPOptions(max_replicas=max_r, allreduce=allreduce)
    if found is None:
        if contiguous:
            with pytest.raises(PlacewiseError):
                solve(graph, cluster, "dp", dp_options)
        return None
    objective, split, replicas = found
    assert all(2 <= r <= max_r for r in replicas.values())
    ev = evaluate_replicated(graph, cluster, split, replicas, allreduce, contiguous=contiguous)
    assert ev.feasible, ev.violations
    # What the program minimises is what the cost model scores (within HiGHS's row tolerance).
    assert ev.max_load == pytest.approx(objective, rel=1e-6, abs=1e-6)
    assert ev.max_load == pytest.approx(expected, rel=1e-9, abs=1e-9)
    if contiguous:
        assert ev.max_load == pytest.approx(solve(graph, cluster, "dp", dp_options).max_load, rel=1e-9, abs=1e-9)
    return ev.max_load


@st.composite
def linked_problems(draw):
    """The replicated DP's problems, some with a cluster link of its own (bandwidth and a latency,
    which the ring all-reduce pays per step whatever the bytes)."""
    graph, cluster, max_r, allreduce = draw(problems())
    if draw(st.booleans()):
        graph = replace(graph, meta=(("time_unit", "s"),))
        cluster = replace(cluster, bandwidth=BYTES_PER_UNIT, latency=draw(st.sampled_from([0.0, 0.25, 1.0])))
    return graph, cluster, max_r, allreduce


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linked_problems())
def test_ip_with_replicas_equals_brute_force_and_the_dp(problem):
    graph, cluster, max_r, allreduce = problem
    _check_against(graph, cluster, max_r, allreduce, _brute_force(graph, cluster, max_r, allreduce))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linked_problems())
def test_noncontiguous_ip_with_replicas_equals_brute_force(problem):
    """Without contiguity a stage's set need not be ordered with the others (the brute force tries every
    partition, and the cost model checks no order); never worse than the contiguous optimum."""
    graph, cluster, max_r, allreduce = problem
    groups: dict = {}
    for node in graph.nodes:
        groups.setdefault(node.colocate if node.colocate is not None else ("n", node.id), []).append(node.id)
    expected = _brute_force_over(list(groups.values()), graph, cluster, max_r, allreduce, contiguous=False)
    found = _check_against(graph, cluster, max_r, allreduce, expected, contiguous=False)
    contiguous = _brute_force(graph, cluster, max_r, allreduce)
    if contiguous is not None:
        assert found <= contiguous * (1 + 1e-9)


def _groups_placed_once(graph: OpGraph) -> list[list[int]]:
    """Node ids the brute force moves together: colocation classes, each dead-end check with what it
    checks, and each replicable node (with its backward mates) with a node that needs it. The cost
    model counts checks with their anchors and replicable nodes on every device needing them, so where
    a split puts them changes nothing, and trying each place would only multiply the splits."""
    replication = find_replicable(graph)
    key = [("class", n.colocate) if n.colocate is not None else ("node", i) for i, n in enumerate(graph.nodes)]
    parent = {k: k for k in key}

    def find(k):
        while parent[k] != k:
            k = parent[k]
        return k

    def join(a: int, b: int) -> None:
        parent[find(key[a])] = find(key[b])

    for check, anchor in replication.attached:
        join(check, anchor)
    reader = {}
    for v, needs in enumerate(replication.needs):
        for r in needs:
            reader.setdefault(r, v)
    placed = int(np.flatnonzero(~replication.replicable)[0])
    for r, mates in enumerate(replication.mates):
        for i in mates:
            join(i, reader.get(r, placed))
    groups: dict = {}
    for i, n in enumerate(graph.nodes):
        groups.setdefault(find(key[i]), []).append(n.id)
    return list(groups.values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicated_problems(), st.sampled_from([2, 3]), st.sampled_from([AllReduce(), AllReduce(PIPEDREAM)]))
def test_replicated_stages_pay_their_copies_of_replicable_nodes_per_replica(problem, max_r, allreduce):
    """Graphs with replicable nodes (sizes, masks) and dead-end checks: a replicated stage computes
    its copies over its replicas like the rest of its work, and holds them on each."""
    graph, cluster = problem
    groups = _groups_placed_once(graph)
    for contiguous in (True, False):
        expected = _brute_force_over(groups, graph, cluster, max_r, allreduce, contiguous)
        _check_against(graph, cluster, max_r, allreduce, expected, contiguous)


def test_a_dominant_layer_is_replicated_by_the_cold_program_and_the_solver():
    graph = _chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0])
    cluster = Cluster((DeviceKind("acc", 4, True),))
    plain = solve(graph, cluster, "dp").max_load
    for allreduce in (AllReduce(), AllReduce(PIPEDREAM)):
        options = IPOptions(max_replicas=4, allreduce=allreduce)
        objective, split, replicas = _cold_optimum(graph, cluster, options)
        assert max(replicas.values()) > 1 and objective < plain / 2
        dp = solve(graph, cluster, "dp", DPOptions(max_replicas=4, allreduce=allreduce))
        assert objective == pytest.approx(dp.max_load, rel=1e-6)
        # Through the solver (warm-started from the DPs): re-scored, proven, and recorded as replicated.
        plan = solve(graph, cluster, "ip", IPOptions(max_replicas=4, allreduce=allreduce, gap=0.0, time_limit=30))
        assert plan.feasible and plan.max_load == pytest.approx(dp.max_load, rel=1e-9)
        assert plan.replicas() and plan.lower_bound == pytest.approx(plan.max_load, rel=1e-6)
        assert plan.notes["max_replicas"] == 4 and plan.notes["allreduce"]["model"] == allreduce.model
        again = evaluate_replicated(graph, cluster, plan.assignment(), plan.replicas(), allreduce)
        assert again.max_load == pytest.approx(plan.max_load, rel=1e-12)


def test_units_without_parameter_bytes_and_one_device_per_kind_keep_one_replica():
    graph = _chain([1.0, 30.0, 1.0], [None, None, None])
    cluster = Cluster((DeviceKind("acc", 4, True),))
    objective, _, replicas = _cold_optimum(graph, cluster, IPOptions(max_replicas=4))
    assert replicas == {} and objective == pytest.approx(solve(graph, cluster, "dp").max_load)
    known = _chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0])
    single = Cluster((DeviceKind("acc", 1, True), DeviceKind("cpu", 1, False)))
    objective, _, replicas = _cold_optimum(known, single, IPOptions(max_replicas=3))
    assert replicas == {} and objective == pytest.approx(solve(known, single, "dp").max_load)


def test_replicas_for_throughput_only():
    graph, cluster = _chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0]), Cluster((DeviceKind("acc", 4, True),))
    with pytest.raises(PlacewiseError, match="--max-replicas"):
        solve(graph, cluster, "ip", IPOptions(max_replicas=2, objective="latency"))
    plan = solve(graph, cluster, "ip", IPOptions(max_replicas=4, contiguous=False, gap=0.0, time_limit=30))
    assert plan.feasible and plan.replicas() and not plan.contiguous
    assert plan.max_load == pytest.approx(solve(graph, cluster, "dp", DPOptions(max_replicas=4)).max_load, rel=1e-9)


def test_cli_plans_replicas_with_the_ip(tmp_path, capsys):
    from placewise.cli import main
    from placewise.graph import save_graph
    path = tmp_path / "g.json"
    save_graph(_chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0]), path)
    assert main(["plan", str(path), "-k", "4", "--solver", "ip", "--max-replicas", "4", "--allreduce", "pipedream",
                 "--json"]) == 0
    ip = json.loads(capsys.readouterr().out)
    assert main(["plan", str(path), "-k", "4", "--max-replicas", "4", "--allreduce", "pipedream", "--json"]) == 0
    dp = json.loads(capsys.readouterr().out)
    assert ip["solver"] == "ip" and max(s["replicas"] for s in ip["stages"]) > 1
    assert ip["max_load"] == pytest.approx(dp["max_load"], rel=1e-9)
    assert main(["plan", str(path), "-k", "4", "--solver", "ip", "--max-replicas", "2", "--objective", "latency"]) == 2
    err = capsys.readouterr().err
    assert "--max-replicas" in err and len(err.strip().splitlines()) == 1
