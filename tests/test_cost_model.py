import json
from dataclasses import fields, replace

import pytest

from conftest import EXPERTS, THROUGHPUT_LAYER
from placewise.graph import Cluster, Device, Edge, Node, OpGraph, load_graph
from placewise.errors import PlacewiseError
from placewise.plan import Plan, evaluate, load_split, plan_from_assignment

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


# ---- memory breakdown, replicas, schedule and the plan JSON version ------------------------------------
def _split_memory_graph() -> OpGraph:
    """The diamond with its memory split: parameters + output = memory on every node."""
    parts = {1: (2.0, 3.0), 2: (1.0, 4.0), 3: (4.0, 1.0), 4: (0.0, 5.0)}
    nodes = [replace(n, parameters=parts[n.id][0], output=parts[n.id][1], gradients=0.0, optimizer_state=0.0,
                     activations=float(n.id)) for n in _diamond().nodes]
    return OpGraph.build(nodes, _diamond().edges, cluster=_diamond().cluster)


def test_memory_breakdown_per_stage():
    from placewise.plan.cost import MemoryBreakdown, memory_breakdown
    g = _split_memory_graph()
    assert memory_breakdown(g, [1, 2]) == MemoryBreakdown(3.0, 0.0, 0.0, 3.0, 7.0)
    assert memory_breakdown(g, [3, 4]) == MemoryBreakdown(4.0, 0.0, 0.0, 7.0, 6.0)
    # one node that does not say makes the stage's part unknown, not smaller
    mixed = OpGraph.build([g.node(1), replace(g.node(2), activations=None)] + [g.node(3), g.node(4)], g.edges)
    assert memory_breakdown(mixed, [1, 2]).activations is None and memory_breakdown(mixed, [1, 2]).parameters == 3.0
    assert memory_breakdown(_diamond(), [1, 2, 3, 4]) == MemoryBreakdown()


def test_memory_breakdown_follows_the_graph_parts():
    from placewise.graph.model import MEMORY_PARTS
    from placewise.plan.cost import MemoryBreakdown
    assert tuple(f.name for f in fields(MemoryBreakdown)) == MEMORY_PARTS


def test_split_memory_leaves_evaluate_unchanged():
    split = {1: A0, 2: A0, 3: A1, 4: A1}
    plain, parts = _diamond(), _split_memory_graph()
    assert evaluate(plain, plain.cluster, split) == evaluate(parts, parts.cluster, split)


def test_plan_records_breakdown_replicas_and_schedule(tmp_path):
    from placewise.plan import load_plan
    from placewise.plan.cost import MemoryBreakdown
    from placewise.plan.schedule import GPIPE, Schedule
    g = _split_memory_graph()
    plan = plan_from_assignment(g, g.cluster, {1: A0, 2: A0, 3: A1, 4: A1}, solver="hand", seconds=0.0,
                                schedule=Schedule(GPIPE, 4))
    assert [s.replicas for s in plan.stages] == [1, 1] and plan.schedule == Schedule(GPIPE, 4)
    assert [s.memory_breakdown for s in plan.stages] == [MemoryBreakdown(3.0, 0.0, 0.0, 3.0, 7.0),
                                                          MemoryBreakdown(4.0, 0.0, 0.0, 7.0, 6.0)]
    assert [s.memory for s in plan.stages] == [10.0, 10.0]  # the total the cost model checks, as before
    plan.stages[1].replicas = 2  # a stage on accelerators 1 and 2: the data can say it
    assert plan.stages[1].devices == (A1, Device("accelerator", 2))
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["schedule"] == {"kind": "gpipe", "microbatches": 4}
    assert data["stages"][0]["memory_breakdown"]["activations"] == 3.0
    assert load_plan(path) == plan


def test_version_1_plan_file_still_loads(tmp_path):
    from placewise.plan import load_plan
    v1 = {"format": "placewise-plan", "version": 1, "stages": [
        {"kind": "accelerator", "index": 0, "accelerator": True, "nodes": [1, 2], "load": 3.75, "compute": 3.0,
         "transfer": 0.75, "memory": 10.0, "modules": []},
        {"kind": "accelerator", "index": 1, "accelerator": True, "nodes": [3, 4], "load": 7.75, "compute": 7.0,
         "transfer": 0.75, "memory": 10.0, "modules": []}],
        "max_load": 7.75, "latency": 11.5, "solver": "dp", "seconds": 0.01, "objective": "throughput",
        "lower_bound": 7.75, "gap": 0.0, "feasible": True, "violations": [], "graph": "", "contiguous": True,
        "cluster": None, "notes": {}}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    plan = load_plan(path)
    assert plan.schedule is None and [s.replicas for s in plan.stages] == [1, 1]
    assert all(s.memory_breakdown is None for s in plan.stages)
    assert plan.max_load == 7.75 and plan.assignment() == {1: A0, 2: A0, 3: A1, 4: A1}
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("change,words", [
    (lambda d: d.update(version=3), "version"),
    (lambda d: d["stages"][0].update(replicas=0), "replicas"),
    (lambda d: d["stages"][0].update(memory_breakdown={"weights": 1.0}), "memory_breakdown"),
    (lambda d: d.update(schedule={"kind": "zigzag", "microbatches": 2}), "schedule"),
])
def test_bad_plan_fields_are_one_line(change, words):
    g = _diamond()
    data = plan_from_assignment(g, g.cluster, {1: A0, 2: A0, 3: A1, 4: A1}, solver="hand", seconds=0.0).to_json()
    data = json.loads(json.dumps(data))
    change(data)
    with pytest.raises(PlacewiseError, match=words) as err:
        Plan.from_json(data)
    assert "\n" not in str(err.value)


def test_cpu_cores_in_separate_processes_pay_transfers_and_run_as_blocks():
    from placewise.graph import DeviceKind
    # a -> b -> c on CPU times 1, 2, 3; each output costs 0.5 to move.
    graph = OpGraph.build([Node(i, n, 9.0, t, 0.0, True) for i, n, t in ((0, "a", 1.0), (1, "b", 2.0), (2, "c", 3.0))],
                          [Edge(0, 1, 0.5), Edge(1, 2, 0.5)])
    split = {0: C0, 1: Device("cpu", 1), 2: C0}
    shared = evaluate(graph, Cluster((DeviceKind("cpu", 2, False),)), split, contiguous=False)
    separate = evaluate(graph, Cluster((DeviceKind("cpu", 2, False, shared_memory=False),)), split, contiguous=False)
    # The paper's shared-memory cores pay nothing and run node by node: latency 1 + 2 + 3.
    assert [d.transfer for d in shared.devices] == [0.0, 0.0] and shared.latency == pytest.approx(6.0)
    # Separate processes pay a's and b's outputs on both sides, as accelerators do ...
    assert sorted(d.transfer for d in separate.devices) == [1.0, 1.0]
    assert separate.max_load == pytest.approx(1.0 + 3.0 + 1.0)
    # ... and each runs its set as one block: core 0 (a and c) waits on core 1, which waits on it.
    assert separate.latency is None


def test_an_accelerator_cannot_share_host_memory():
    from placewise.graph import DeviceKind
    with pytest.raises(PlacewiseError, match="accelerator cannot share host memory"):
        DeviceKind("gpu", 1, True, shared_memory=True)


def _chain_with_shared_size() -> OpGraph:
    """h0 -> h1 -> h2 -> h3 (heavy) and a cheap size node s read by h1 and h3: with replication on,
    every stage holding a reader recomputes s. Each node's memory is the sum of its parts."""
    def node(i, name, time, params, out):
        return Node(i, name, time, time, params + out, True, parameters=params, gradients=0.0, optimizer_state=0.0,
                    activations=0.0, output=out)
    nodes = [node(i, f"h{i}", 10.0, 100.0, 1000.0) for i in range(4)] + [node(9, "s", 0.001, 0.0, 8.0)]
    edges = [Edge(i, i + 1, 1.0, 1000.0) for i in range(3)] + [Edge(9, 1, 0.0, 8.0), Edge(9, 3, 0.0, 8.0)]
    return OpGraph.build(nodes, edges, cluster=Cluster.simple(2, 0, None))


@pytest.mark.parametrize("s_on", [A0, A1])
def test_a_stage_breakdown_and_recompute_count_its_replicated_copies(s_on):
    from placewise.graph.model import MEMORY_PARTS
    from placewise.plan.recompute import evaluate_recomputed
    from placewise.plan.replicable import find_replicable
    g = _chain_with_shared_size()
    assert find_replicable(g).any  # s is copied into both stages, wherever the split puts it
    split = {0: A0, 1: A0, 2: A1, 3: A1, 9: s_on}
    plan = plan_from_assignment(g, g.cluster, split, solver="hand", seconds=0.0)
    for stage in plan.stages:
        b = stage.memory_breakdown
        assert sum(getattr(b, part) for part in MEMORY_PARTS) == pytest.approx(stage.memory)
        assert stage.memory == pytest.approx(2200.0 + 8.0)
    ev = evaluate_recomputed(g, g.cluster, split, [A0, A1])
    assert [d.recompute_time for d in ev.devices] == pytest.approx([d.compute for d in ev.devices])
