"""The integer programs, checked against independent evidence: the exact DP and the paper's reference
optima, brute force on random small graphs, and the cost model's re-scoring of every plan."""

import itertools
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PAPER, ROOT, THROUGHPUT_LAYER
from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, Edge, Node, OpGraph, load_graph
from placewise.plan import IPOptions, SolveOptions, evaluate, solve
from placewise.plan.units import inseparable_blocks

LATENCY_LAYER = PAPER / "latency-inputs" / "LayerGraphs"


def _certified(plan, gap: float) -> None:
    """The plan is feasible, scored by the cost model, and its bound proves it within `gap`."""
    assert plan.feasible, plan.violations
    assert plan.lower_bound is not None and plan.lower_bound <= plan.value + 1e-9
    assert plan.gap is not None and plan.gap <= gap + 1e-12
    rescored = evaluate(plan_graph := _graphs[plan.graph], plan_graph.cluster, plan.assignment(), contiguous=plan.contiguous)
    assert plan.value == pytest.approx(rescored.latency if plan.objective == "latency" else rescored.max_load, rel=1e-12)


_graphs: dict[str, OpGraph] = {}


def _load(path) -> OpGraph:
    graph = load_graph(path)
    _graphs[graph.name] = graph
    return graph


@pytest.mark.parametrize("name", ["bert24_inference", "bert24_training", "resnet50_inference", "resnet50_training"])
def test_contiguous_ip_certifies_the_dp_optimum(name):
    graph = _load(THROUGHPUT_LAYER / f"{name}.json")
    dp = solve(graph, graph.cluster, "dp")
    ip = solve(graph, graph.cluster, "ip", SolveOptions(time_limit=90, gap=1e-4))
    # The IP starts from the DP's plan; what it adds is the proof that no contiguous split is better.
    _certified(ip, 1e-4)
    assert ip.value == pytest.approx(dp.value, rel=1e-9)
    assert ip.lower_bound >= dp.value * (1 - 1e-4)


def test_contiguous_ip_finds_the_dp_optimum_from_the_greedy_start():
    graph = _load(THROUGHPUT_LAYER / "bert24_training.json")
    dp = solve(graph, graph.cluster, "dp")
    greedy = solve(graph, graph.cluster, "greedy-latency")
    assert greedy.value > dp.value * 1.01  # a start far from the optimum
    ip = solve(graph, graph.cluster, "ip", IPOptions(time_limit=60, gap=1e-6, warm_starts=(greedy,)))
    _certified(ip, 1e-6)
    assert ip.value == pytest.approx(dp.value, rel=1e-6)


def test_noncontiguous_bert24_inference_reaches_the_paper_optimum_with_a_proven_gap():
    graph = _load(THROUGHPUT_LAYER / "bert24_inference.json")
    ip = solve(graph, graph.cluster, "ip", SolveOptions(contiguous=False, time_limit=120, gap=0.01))
    _certified(ip, 0.01)
    assert ip.value <= 17.7147 * 1.01
    assert ip.seconds <= 120 + 15  # the limit, plus loading the DP's warm start and building the model


def test_latency_bert24_reaches_the_paper_optimum_with_a_proven_gap():
    graph = _load(LATENCY_LAYER / "bert24_inference.json")
    ip = solve(graph, graph.cluster, "ip", SolveOptions(objective="latency", time_limit=120, gap=0.01))
    _certified(ip, 0.01)
    assert ip.value <= 100.2185 * 1.01
    assert ip.seconds <= 120 + 15


# ---- random small graphs ----------------------------------------------------------------------------
@st.composite
def small_problems(draw):
    n = draw(st.integers(2, 6))
    cpus = draw(st.integers(0, 1))
    accelerators = draw(st.integers(1, 3))
    times = st.integers(0, 20)
    nodes = []
    for i in range(n):
        acc = draw(times)
        nodes.append(Node(i, None, float(acc), float(acc * draw(st.integers(1, 4))), float(draw(st.integers(1, 5))),
                          on_accelerator=cpus == 0 or draw(st.booleans()), colocate=draw(st.sampled_from([None, None, 0]))))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=2 * n)) if pairs else []
    cost = {i: float(draw(st.integers(0, 4))) for i in range(n)}
    edges = [Edge(i, j, cost[i]) for i, j in sorted(chosen)]
    memory = float(draw(st.integers(5, 15))) if cpus else None
    cluster = Cluster.simple(accelerators, cpus, memory)
    if draw(st.booleans()):  # the CPU core in its own process: it pays transfers, as accelerators do
        cluster = Cluster((cluster.kinds[0], replace(cluster.kinds[1], shared_memory=False)))
    return OpGraph.build(nodes, edges, cluster=cluster, name="random")


def _brute_force_latency(graph: OpGraph) -> float:
    """Least latency over every split, CPU nodes on one shared-memory core (the latency model ignores
    which), or on every core where cores pay transfers (each runs its set as a block)."""
    cluster = graph.cluster
    cores = cluster.cpus if cluster.kind("cpu").pays_transfers else min(cluster.cpus, 1)
    places = [Device("accelerator", i) for i in range(cluster.accelerators)] + [Device("cpu", i) for i in range(cores)]
    best = math.inf
    for choice in itertools.product(places, repeat=len(graph.nodes)):
        ev = evaluate(graph, cluster, {n.id: d for n, d in zip(graph.nodes, choice)}, contiguous=False)
        if ev.feasible and ev.latency is not None:
            best = min(best, ev.latency)
    return best


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_ip_matches_brute_force_and_the_dp_on_random_graphs(graph):
    from bruteforce import best_split  # the brute force shared with the DP's tests

    _graphs[graph.name] = graph
    exact = SolveOptions(gap=0.0, time_limit=30)
    try:
        dp = solve(graph, graph.cluster, "dp")
    except PlacewiseError:
        dp = None
    noncontiguous = solve(graph, graph.cluster, "ip", SolveOptions(contiguous=False, gap=0.0, time_limit=30))
    _certified(noncontiguous, 1e-7)
    assert noncontiguous.value == pytest.approx(best_split(graph, graph.cluster, contiguous=False)[0], rel=1e-9, abs=1e-9)
    if dp is not None:
        assert noncontiguous.value <= dp.value + 1e-9
        contiguous = solve(graph, graph.cluster, "ip", exact)
        _certified(contiguous, 1e-7)
        assert contiguous.value == pytest.approx(dp.value, rel=1e-9, abs=1e-9)
    latency = solve(graph, graph.cluster, "ip", SolveOptions(objective="latency", gap=0.0, time_limit=30))
    _certified(latency, 1e-7)
    assert latency.value == pytest.approx(_brute_force_latency(graph), rel=1e-9, abs=1e-9)
    if latency.notes["solver_objective"] is not None:
        # The latency the cost model computes for the IP's split is the objective HiGHS reports.
        assert latency.value == pytest.approx(latency.notes["solver_objective"], rel=1e-7, abs=1e-7)


# ---- the greedy baseline, failures, CLI -------------------------------------------------------------
def test_latency_greedy_pours_topological_blocks_into_accelerators():
    graph = _load(LATENCY_LAYER / "resnet50_inference.json")
    blocks = inseparable_blocks(graph)
    position = {i: p for p, block in enumerate(blocks) for i in block}
    assert all(position[u] <= position[v] for u, v in graph.edge_array)
    plan = solve(graph, graph.cluster, "greedy-latency", SolveOptions(objective="latency"))
    assert plan.feasible and plan.latency is not None
    # Each accelerator holds consecutive blocks and is full: the next block would not have fit.
    for stage in plan.stages:
        if stage.accelerator:
            held = sorted({position[graph.index[n]] for n in stage.nodes})
            assert held == list(range(held[0], held[-1] + 1))


def test_an_infeasible_model_says_what_in_one_line():
    nodes = [Node(1, "a", 1.0, 2.0, 10.0, True), Node(2, "b", 1.0, 2.0, 10.0, True)]
    graph = OpGraph.build(nodes, [Edge(1, 2, 0.5)], cluster=Cluster.simple(1, 0, 15.0))
    for objective in ("throughput", "latency"):
        with pytest.raises(PlacewiseError, match="no split exists") as err:
            solve(graph, graph.cluster, "ip", SolveOptions(objective=objective))
        assert "\n" not in str(err.value)
    # Memory that fits per node but not as a contiguous chain when a colocation ties the ends together.
    nodes = [Node(1, "a", 1.0, 2.0, 6.0, True, colocate=7), Node(2, "b", 1.0, 2.0, 6.0, True),
             Node(3, "c", 1.0, 2.0, 6.0, True, colocate=7)]
    graph = OpGraph.build(nodes, [Edge(1, 2, 0.5), Edge(2, 3, 0.5)], cluster=Cluster.simple(2, 0, 12.0))
    with pytest.raises(PlacewiseError, match="contiguous throughput integer program is infeasible"):
        solve(graph, graph.cluster, "ip", IPOptions(warm_starts=()))


def test_cli_plan_ip_reports_bound_and_gap_and_exits_2_when_infeasible(tmp_path):
    out = tmp_path / "plan.json"
    graph = THROUGHPUT_LAYER / "bert24_inference.json"
    run = subprocess.run([sys.executable, "-m", "placewise.cli", "plan", str(graph), "--solver", "ip", "--time-limit", "30",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "lower bound" in run.stdout and "gap" in run.stdout
    plan = json.loads(out.read_text())
    assert plan["solver"] == "ip" and plan["lower_bound"] <= plan["max_load"] and plan["gap"] is not None
    latency = subprocess.run([sys.executable, "-m", "placewise.cli", "evaluate", str(graph), str(out), "--objective", "latency"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert latency.returncode == 0 and "latency" in latency.stdout
    bad = subprocess.run([sys.executable, "-m", "placewise.cli", "plan", str(graph), "--solver", "ip", "--cpus", "0",
                          "--memory", "1000"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.startswith("placewise: error: ") and bad.stderr.count("\n") == 1


def test_json_stdout_is_only_json_with_highs_in_the_process():
    # HiGHS prints a banner on the C-level stdout when the first solver object is made.
    graph = THROUGHPUT_LAYER / "bert24_inference.json"
    for command in (["plan", str(graph), "--solver", "ip", "--time-limit", "5"],
                    ["compare", str(graph), "--methods", "ip", "greedy", "--time-limit", "5"]):
        run = subprocess.run([sys.executable, "-m", "placewise.cli", *command, "--json"], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
        assert run.returncode == 0, run.stderr
        json.loads(run.stdout)


def test_an_unknown_or_foreign_option_is_an_error_that_names_it():
    from placewise.plan import LocalSearchOptions, get_entry
    with pytest.raises(PlacewiseError, match="the ip solver has no option 'blocks'"):
        get_entry("ip").options(SolveOptions(), blocks=2)
    graph = OpGraph.build([Node(1, "a", 1.0, 2.0, 1.0, True)], [], cluster=Cluster.simple(1, 0))
    with pytest.raises(PlacewiseError, match="takes IPOptions, not LocalSearchOptions"):
        solve(graph, graph.cluster, "ip", LocalSearchOptions())
