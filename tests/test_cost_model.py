import pytest

from conftest import EXPERTS, THROUGHPUT_LAYER
from placewise.graph import Cluster, Device, Edge, Node, OpGraph, load_graph
from placewise.plan import evaluate, load_split, plan_from_assignment

A0, A1, C0 = Device("accelerator", 0), Device("accelerator", 1), Device("cpu", 0)

# (graph, expert split, max-load printed in the workloads README)
EXPERT_CASES = [
    ("bert24_inference", "bert24_inference", 20.084),
    ("bert24_training", "bert24_training", 49.40),
    ("gnmt_inference", "gnmt_inference", 46.21),
    ("inceptionv3_inference", "inceptionv3_inference", 102.5),
    ("inceptionv3_training", "inceptionv3_inference", 213.7),
    ("resnet50_inference", "resnet50_inference", 43.92),
    ("resnet50_training", "resnet50_inference", 112.1),
]


def _printed_precision(value: float) -> float:
    digits = str(value).split(".")[1] if "." in str(value) else ""
    return 0.5 * 10 ** -len(digits)


@pytest.mark.parametrize("graph_name,expert,expected", EXPERT_CASES, ids=[c[0] for c in EXPERT_CASES])
def test_expert_split_reproduces_published_max_load(graph_name, expert, expected):
    graph = load_graph(THROUGHPUT_LAYER / f"{graph_name}.json")
    assignment = load_split(EXPERTS / f"{expert}_expert.json", graph)
    plan = plan_from_assignment(graph, graph.cluster, assignment, solver="expert", seconds=0)
    assert plan.feasible, plan.violations
    assert abs(plan.max_load - expected) <= _printed_precision(expected) + 1e-12


def _diamond(**overrides) -> OpGraph:
    # a -> b -> d, a -> c -> d; costs are per source node
    nodes = [Node(1, "a", 1.0, 10.0, 5.0, True), Node(2, "b", 2.0, 20.0, 5.0, True),
             Node(3, "c", 3.0, 30.0, 5.0, overrides.get("c_supported", True)), Node(4, "d", 4.0, 40.0, 5.0, True)]
    edges = [Edge(1, 2, 0.5), Edge(1, 3, 0.5), Edge(2, 4, 0.25), Edge(3, 4, 0.125)]
    return OpGraph.build(nodes, edges, cluster=Cluster.simple(2, 1, overrides.get("memory", 100.0)))


def test_loads_transfers_and_latency_by_hand():
    g = _diamond()
    ev = evaluate(g, g.cluster, {1: A0, 2: A0, 3: A1, 4: A1})
    loads = {d.device: d for d in ev.devices}
    # A0 = {a, b}: compute 3; a's output leaves (0.5), b's output leaves (0.25)
    assert loads[A0].load == pytest.approx(3.75)
    # A1 = {c, d}: compute 7; a's output arrives (0.5), b's output arrives (0.25)
    assert loads[A1].load == pytest.approx(7.75)
    assert ev.max_load == pytest.approx(7.75)
    # latency: A0 block finishes at 3.75, then A1 runs its block: 3.75 + 7.75
    assert ev.latency == pytest.approx(11.5)
    assert [d.device for d in ev.devices] == [A0, A1] and ev.feasible


def test_cpu_pays_no_transfer_and_cpu_nodes_run_in_parallel():
    g = _diamond()
    ev = evaluate(g, g.cluster, {1: A0, 2: C0, 3: C0, 4: A0})
    loads = {d.device: d for d in ev.devices}
    assert loads[C0].load == pytest.approx(50.0)
    # A0 = {a, d}: compute 5, a out 0.5, b in 0.25, c in 0.125
    assert loads[A0].load == pytest.approx(5.875)
    # the accelerator block {a, d} waits for b and c, which wait for a: a cycle between units
    assert ev.latency is None and not ev.feasible
    assert any(v.kind == "contiguity" for v in ev.violations)
    # without the contiguity requirement the same split is accepted (non-contiguous plans)
    assert evaluate(g, g.cluster, {1: A0, 2: C0, 3: C0, 4: A0}, contiguous=False).feasible


def test_violations_are_named():
    g = _diamond(c_supported=False, memory=12.0)
    ev = evaluate(g, g.cluster, {1: A0, 2: A0, 3: A0, 4: Device("accelerator", 7), 99: A0})
    kinds = {v.kind for v in ev.violations}
    assert {"support", "memory", "unknown-device", "unknown-node"} <= kinds
    missing = evaluate(g, g.cluster, {1: A0, 2: A0})
    assert [v.kind for v in missing.violations] == ["missing-node"]
    assert all("\n" not in v.message for v in ev.violations)


def test_colocation_violation():
    nodes = [Node(1, None, 1, 1, 0, True, False, 7), Node(2, None, 1, 1, 0, True, True, 7)]
    g = OpGraph.build(nodes, [], cluster=Cluster.simple(2, 0))
    assert not evaluate(g, g.cluster, {1: A0, 2: A1}).feasible
    assert evaluate(g, g.cluster, {1: A0, 2: A0}).feasible


def test_speed_scales_compute():
    nodes = [Node(1, None, 6.0, 12.0, 0, True)]
    from placewise.graph import DeviceKind
    g = OpGraph.build(nodes, [])
    fast = Cluster((DeviceKind("gpu", 1, True, None, 3.0),))
    assert evaluate(g, fast, {1: Device("gpu", 0)}).max_load == pytest.approx(2.0)


def test_plan_json_and_reference_roundtrip(tmp_path):
    from placewise.plan import load_plan, read_split
    g = _diamond()
    plan = plan_from_assignment(g, g.cluster, {1: A0, 2: A0, 3: A1, 4: A1}, solver="hand", seconds=0.0)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = load_plan(path)
    assert again == plan
    assert read_split(plan.to_reference(), g) == plan.assignment()
