"""Replicated stages: the all-reduce cost, the cost model's scoring of replicas, the DP that chooses
them against a brute force over every contiguous split and replica count, PipeDream's replicated
planner, and the plan's JSON and console."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, DeviceKind, Edge, Node, OpGraph
from placewise.plan import solve
from placewise.plan.allreduce import PIPEDREAM, RING, AllReduce
from placewise.plan.cost import evaluate
from placewise.plan.options import DPOptions, PipeDreamOptions
from placewise.plan.plan import Plan
from placewise.plan.replicas import evaluate_replicated

PIPEDREAM_PROFILES = Path(__file__).resolve().parents[1].parent / "shared" / "workloads" / "pipedream"
BYTES_PER_UNIT = 1000.0  # the test graphs' link: an edge's cost is its bytes over this


def _chain(times, params, cost=1.0) -> OpGraph:
    """A forward chain; node i has acc time times[i] and params[i] parameter bytes (None: unknown)."""
    nodes = [Node(i, f"n{i}", t, 2 * t, 10.0, True, parameters=p) for i, (t, p) in enumerate(zip(times, params))]
    edges = [Edge(i, i + 1, cost, cost * BYTES_PER_UNIT) for i in range(len(times) - 1)]
    return OpGraph.build(nodes, edges, name="chain")


def test_allreduce_formulas():
    ring, pd = AllReduce(RING), AllReduce(PIPEDREAM)
    assert ring.time(1000.0, 1, 10.0) == 0.0 and ring.per_unit(1000.0, 1, 10.0) == 0.0
    # Ring: 2(r-1)/r x bytes / bandwidth + 2(r-1) latencies; per unit of work over r (one batch per replica).
    assert ring.time(1000.0, 4, 10.0, 0.5) == pytest.approx(2 * 3 / 4 * 100 + 2 * 3 * 0.5)
    assert ring.per_unit(1000.0, 4, 10.0) == pytest.approx(2 * 3 / 4 * 100 / 4)
    # PipeDream's optimizer: 4 m P / (B (m + 1)) with m + 1 replicas, no latency.
    assert pd.time(1000.0, 4, 10.0, 0.5) == pytest.approx(4 * 3 * 1000 / (10 * 4))
    # A step of 8 profiled batches pays the all-reduce once for all 8.
    assert AllReduce(RING, step_units=8).per_unit(1000.0, 2, 10.0) == pytest.approx(100 / 8)
    with pytest.raises(PlacewiseError, match="--allreduce"):
        AllReduce("tree")
    with pytest.raises(PlacewiseError, match="--max-replicas"):
        DPOptions(max_replicas=0)


def test_evaluate_replicated_costs_shares_and_checks_devices():
    graph = _chain([8.0, 4.0], [500.0, 100.0])
    cluster = Cluster((DeviceKind("acc", 4, True),))
    split = {0: Device("acc", 0), 1: Device("acc", 3)}
    plain = evaluate(graph, cluster, split)
    assert evaluate_replicated(graph, cluster, split, {}) == plain
    ev = evaluate_replicated(graph, cluster, split, {Device("acc", 0): 3}, AllReduce(PIPEDREAM))
    assert ev.feasible, ev.violations
    first = ev.devices[0]
    # (8 compute + 1 transfer) / 3, plus PipeDream's all-reduce of 500 bytes at 1000 bytes/unit, over 3.
    assert first.replicas == 3 and first.compute == pytest.approx(8 / 3) and first.transfer == pytest.approx(1 / 3)
    assert first.allreduce == pytest.approx(4 * 2 * 500 / (1000 * 3) / 3)
    assert ev.max_load == pytest.approx(max(first.load, 5.0))
    clash = evaluate_replicated(graph, cluster, split, {Device("acc", 0): 4})
    assert any(v.kind == "replicas" and "another stage" in v.message for v in clash.violations)
    past = evaluate_replicated(graph, cluster, {0: Device("acc", 2), 1: Device("acc", 0)}, {Device("acc", 2): 3})
    assert any("cluster has 4" in v.message for v in past.violations)
    unknown = evaluate_replicated(_chain([8.0, 4.0], [None, 1.0]), cluster, split, {Device("acc", 0): 2})
    assert any("parameter bytes" in v.message for v in unknown.violations)


def _stage_splits(groups: list[list[int]], kinds: list[DeviceKind], max_r: int):
    """Every split of the groups into stages, each stage with a kind and a replica count that fit:
    (assignment, replicas). Stages of a kind take consecutive devices in the order of the blocks."""
    n = len(groups)

    def partitions(i, blocks):
        if i == n:
            yield [list(b) for b in blocks]
            return
        for b in blocks:
            b.append(i)
            yield from partitions(i + 1, blocks)
            b.pop()
        blocks.append([i])
        yield from partitions(i + 1, blocks)
        blocks.pop()

    for blocks in partitions(0, []):
        for choice in itertools.product(range(len(kinds)), range(1, max_r + 1), repeat=len(blocks)):
            used = [0] * len(kinds)
            assignment, replicas = {}, {}
            for b, block in enumerate(blocks):
                t, r = choice[2 * b], choice[2 * b + 1]
                device = Device(kinds[t].name, used[t])
                used[t] += r
                replicas[device] = r
                for g in block:
                    for node in groups[g]:
                        assignment[node] = device
            if all(u <= k.count for u, k in zip(used, kinds)):
                yield assignment, replicas


def _brute_force(graph: OpGraph, cluster: Cluster, max_r: int, allreduce: AllReduce) -> float | None:
    groups: dict = {}
    for node in graph.nodes:
        groups.setdefault(node.colocate if node.colocate is not None else ("n", node.id), []).append(node.id)
    kinds = [k for k in cluster.kinds if k.count > 0]
    best = None
    for assignment, replicas in _stage_splits(list(groups.values()), kinds, max_r):
        ev = evaluate_replicated(graph, cluster, assignment, replicas, allreduce)
        if ev.feasible and (best is None or ev.max_load < best):
            best = ev.max_load
    return best


@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    training = draw(st.booleans())
    time = st.sampled_from([1.0, 2.0, 4.0, 9.0])
    param = st.sampled_from([0.0, 200.0, 3000.0])
    nodes = [Node(i, f"n{i}", draw(time), draw(time), draw(st.sampled_from([1.0, 2.0])), True, False,
                  i if training else None, parameters=draw(param)) for i in range(n)]
    edges = [Edge(u, v, c, c * BYTES_PER_UNIT) for u in range(n) for v in range(u + 1, n)
             if draw(st.integers(0, 2)) > 0 for c in [float(u % 2 + 1)]]
    if training:
        nodes += [Node(100 + i, None, node.acc_time, node.cpu_time, 0.0, True, True, i, parameters=0.0)
                  for i, node in enumerate(list(nodes))]
        edges += [Edge(100 + e.dst, 100 + e.src, 1.0, BYTES_PER_UNIT) for e in list(edges)]
    kinds = [DeviceKind("acc", draw(st.integers(1, 3)), True, draw(st.sampled_from([None, 3.0])))]
    if draw(st.booleans()):
        kinds.append(DeviceKind("fast", draw(st.integers(1, 2)), True, None, 2.0))
    if draw(st.booleans()):
        # Cores in one process (the paper's) or in separate processes, which pay transfers.
        kinds.append(DeviceKind("cpu", 2, False, shared_memory=draw(st.booleans())))
    allreduce = AllReduce(draw(st.sampled_from([RING, PIPEDREAM])), draw(st.sampled_from([None, 3.0])))
    return OpGraph.build(nodes, edges, name="rs"), Cluster(tuple(kinds)), draw(st.integers(2, 3)), allreduce


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_replicated_dp_equals_brute_force(problem):
    graph, cluster, max_r, allreduce = problem
    expected = _brute_force(graph, cluster, max_r, allreduce)
    options = DPOptions(max_replicas=max_r, allreduce=allreduce)
    if expected is None:
        with pytest.raises(PlacewiseError):
            solve(graph, cluster, "dp", options)
        return
    plan = solve(graph, cluster, "dp", options)
    assert plan.max_load == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # The plan's own replicas, re-scored by the cost model, give its value; never worse than one replica each.
    ev = evaluate_replicated(graph, cluster, plan.assignment(), plan.replicas(), allreduce)
    assert ev.feasible and ev.max_load == pytest.approx(plan.max_load, rel=1e-9)
    assert plan.max_load <= solve(graph, cluster, "dp").max_load * (1 + 1e-9)


def test_one_device_per_kind_gives_the_plain_optimum_and_a_dominant_layer_is_replicated():
    graph = _chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0])
    single = Cluster((DeviceKind("acc", 1, True), DeviceKind("cpu", 1, False)))
    assert solve(graph, single, "dp", DPOptions(max_replicas=4)).max_load == pytest.approx(
        solve(graph, single, "dp").max_load)
    cluster = Cluster((DeviceKind("acc", 4, True),))
    plain = solve(graph, cluster, "dp")
    replicated = solve(graph, cluster, "dp", DPOptions(max_replicas=4))
    assert plain.max_load == pytest.approx(30.0 + 2.0)  # the dominant layer and its two transfers
    assert replicated.max_load < plain.max_load / 2
    assert any(s.replicas > 1 for s in replicated.stages) and replicated.notes["exact"]
    # Unknown parameter bytes: no stage may be replicated, so the plain optimum comes back.
    unknown = _chain([1.0, 30.0, 1.0], [None, None, None])
    assert solve(unknown, cluster, "dp", DPOptions(max_replicas=4)).max_load == pytest.approx(plain.max_load)


def test_plan_json_round_trip_keeps_replicas_and_the_console_shows_them(capsys):
    graph = _chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0])
    plan = solve(graph, Cluster((DeviceKind("acc", 4, True),)), "dp", DPOptions(max_replicas=4))
    again = Plan.from_json(plan.to_json())
    assert [(s.replicas, s.allreduce) for s in again.stages] == [(s.replicas, s.allreduce) for s in plan.stages]
    assert again.replicas() == plan.replicas() and again.notes["allreduce"]["model"] == RING
    from placewise.console import print_plan
    print_plan(plan, "t")
    assert "replicas" in capsys.readouterr().out


def test_cli_max_replicas_and_refusal_for_other_solvers(tmp_path, capsys):
    import json

    from placewise.cli import main
    from placewise.graph import save_graph
    path = tmp_path / "g.json"
    save_graph(_chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0]), path)
    assert main(["plan", str(path), "-k", "4", "--max-replicas", "4", "--allreduce", "pipedream", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert max(s["replicas"] for s in plan["stages"]) > 1 and plan["notes"]["allreduce"]["model"] == PIPEDREAM
    assert main(["plan", str(path), "-k", "4", "--solver", "greedy", "--max-replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert "--solver dp" in err and len(err.strip().splitlines()) == 1


def _profiles():
    return sorted(PIPEDREAM_PROFILES.glob("*/graph.txt")) if PIPEDREAM_PROFILES.is_dir() else []


@pytest.mark.skipif(not _profiles(), reason="the shared PipeDream profiles are absent")
@pytest.mark.parametrize("path", _profiles(), ids=lambda p: p.parent.name)
def test_replicated_optimum_is_no_worse_than_pipedreams_planner(path):
    """With PipeDream's communication model, on 4 and 8 accelerators: the DP's value is at most that of
    PipeDream's replicated planner (with and without transfers in its objective), all scored alike."""
    from placewise.graph.formats import parse_graph
    graph = parse_graph(path.read_text(), str(path))
    for k in (4, 8):
        cluster = Cluster.simple(k)
        ours = solve(graph, cluster, "dp", DPOptions(max_replicas=k, allreduce=AllReduce(PIPEDREAM)))
        for transfers in (True, False):
            theirs = solve(graph, cluster, "pipedream-hybrid", PipeDreamOptions(transfers=transfers))
            assert theirs.feasible
            assert ours.max_load <= theirs.max_load * (1 + 1e-9), (k, transfers)


def test_evaluate_cli_rescores_a_replicated_plan(tmp_path, capsys):
    import json

    from placewise.cli import main
    from placewise.graph import save_graph
    graph_path, plan_path = tmp_path / "g.json", tmp_path / "plan.json"
    save_graph(_chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0]), graph_path)
    assert main(["plan", str(graph_path), "-k", "4", "--max-replicas", "4", "--allreduce", "pipedream",
                 "--out", str(plan_path), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(graph_path), str(plan_path), "-k", "4", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["max_load"] == pytest.approx(planned["max_load"])
    assert [s["replicas"] for s in scored["stages"]] == [s["replicas"] for s in planned["stages"]]


PARTITIONED = PIPEDREAM_PROFILES / "partitioned" / "resnet50_partitioned.txt"


@pytest.mark.skipif(not PARTITIONED.is_file(), reason="the shared PipeDream split is absent")
def test_pipedreams_own_split_as_13_1_1_1_workers():
    """PipeDream's shared 4-stage resnet50 split on 13-1-1-1 of 16 workers (the files do not record
    replica counts, so they are given), scored with its all-reduce model; the DP is no worse."""
    from placewise.graph.formats import parse_graph
    from placewise.plan.baselines.pipedream import pipedream_split
    graph = parse_graph(PARTITIONED.read_text(), str(PARTITIONED))
    cluster = Cluster.simple(16)
    expert = pipedream_split(graph, cluster, [13, 1, 1, 1])
    assert expert.feasible and [s.replicas for s in expert.stages] == [13, 1, 1, 1]
    assert [s.index for s in expert.stages] == [0, 13, 14, 15]
    ours = solve(graph, cluster, "dp", DPOptions(max_replicas=16, allreduce=AllReduce(PIPEDREAM)))
    assert ours.max_load <= expert.max_load
    with pytest.raises(PlacewiseError, match="4 stages"):
        pipedream_split(graph, cluster, [15, 1])


def test_a_schedules_step_pays_the_allreduce_once_and_compare_runs_replication_only_when_named(tmp_path, capsys):
    import json

    from placewise.cli import main
    from placewise.graph import save_graph
    from placewise.plan.compare import default_methods
    path = tmp_path / "g.json"
    save_graph(_chain([1.0, 30.0, 1.0], [10.0, 10.0, 10.0]), path)
    assert main(["plan", str(path), "-k", "4", "--max-replicas", "4", "--microbatches", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["notes"]["allreduce"] == {"model": RING, "step_units": 8.0}
    assert plan["schedule"] == {"kind": "1f1b", "microbatches": 8}
    assert "pipedream-hybrid" not in default_methods() and "pipedream" in default_methods()
