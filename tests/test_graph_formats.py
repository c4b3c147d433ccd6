import json

import pytest

from conftest import PAPER, WORKLOADS
from placewise.errors import PlacewiseError
from placewise.graph import Node, OpGraph, load_graph, parse_graph, write_paper, write_placewise
from placewise.graph.formats import read_placewise
from placewise.graph.model import MEMORY_PARTS

PAPER_FILES = sorted(p for p in PAPER.rglob("*.json") if "human-experts" not in p.parts)
PIPEDREAM_FILES = sorted((WORKLOADS / "pipedream").rglob("*.txt"))
PIPEDREAM_FILES = [p for p in PIPEDREAM_FILES if p.name != "LICENSE.txt"]


def test_every_shared_workload_is_found():
    assert len(PAPER_FILES) == 21 and len(PIPEDREAM_FILES) == 12


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_paper_json_roundtrips(path):
    original = json.loads(path.read_text())
    graph = load_graph(path)
    assert len(graph.nodes) == len(original["nodes"]) and len(graph.edges) == len(original["edges"])
    # paper -> placewise JSON -> graph is the same graph, and writing the paper format gives the file back
    again = read_placewise(json.loads(json.dumps(write_placewise(graph))), "roundtrip")
    assert again == graph
    assert write_paper(again) == original


@pytest.mark.parametrize("path", PIPEDREAM_FILES, ids=lambda p: p.parent.name + "/" + p.name)
def test_pipedream_graph_loads_and_roundtrips(path):
    graph = load_graph(path)
    forward = [n for n in graph.nodes if not n.backward]
    backward = [n for n in graph.nodes if n.backward]
    assert len(forward) == len(backward) == sum(1 for line in path.read_text().splitlines() if line.startswith("node"))
    # each forward node and its backward node share a colocation class
    assert {n.colocate for n in forward} == {n.colocate for n in backward}
    again = read_placewise(json.loads(json.dumps(write_placewise(graph))), "roundtrip")
    assert again == graph
    if "partitioned" in path.parts:
        assert graph.split is not None and len(graph.split) == len(graph.nodes)
    else:
        assert graph.split is None


def test_pipedream_costs_follow_bandwidth():
    path = WORKLOADS / "pipedream" / "vgg16" / "graph.txt"
    slow, fast = load_graph(path, bandwidth=1e9), load_graph(path, bandwidth=2e9)
    by_src = {e.src: e for e in slow.edges}
    for e in fast.edges:
        assert e.transfer_cost == pytest.approx(by_src[e.src].transfer_cost / 2)
    conv = next(n for n in slow.nodes if n.module and n.module.startswith("Conv2d") and not n.backward)
    line = next(l for l in path.read_text().splitlines() if l.startswith(f"{conv.name} "))
    fields = dict(kv.split("=") for kv in line.split(" -- ")[2].split(", "))
    assert conv.acc_time == float(fields["forward_compute_time"])
    assert conv.memory == float(fields["activation_size"]) + float(fields["parameter_size"])


# ---- the node memory split and the graph JSON version ------------------------------------------------
def _v1_graph(version):
    """A graph file as placewise wrote it before the memory split (version 1, or no version at all)."""
    data = {"format": "placewise-graph", "name": "old", "cluster": None, "split": None, "meta": {},
            "nodes": [{"id": 0, "name": "a", "acc_time": 1.0, "cpu_time": 2.0, "memory": 30.0, "on_accelerator": True,
                       "backward": False, "colocate": None, "layer": None, "module": "a"},
                      {"id": 1, "name": "b", "acc_time": 1.5, "cpu_time": 3.0, "memory": 40.0, "on_accelerator": True,
                       "backward": False, "colocate": None, "layer": None, "module": "b"}],
            "edges": [{"src": 0, "dst": 1, "transfer_cost": 0.5, "bytes": 8.0}]}
    if version is not None:
        data["version"] = version
    return data


@pytest.mark.parametrize("version", [1, None])
def test_version_1_graph_json_still_loads(version):
    graph = parse_graph(json.dumps(_v1_graph(version)), "old.json")
    assert [n.memory for n in graph.nodes] == [30.0, 40.0] and graph.node(1).module == "b"
    assert all(getattr(n, part) is None for n in graph.nodes for part in MEMORY_PARTS)
    written = write_placewise(graph)
    assert written["version"] == 2 and read_placewise(written, "again") == graph


def test_memory_parts_roundtrip_and_unknown_is_not_zero():
    data = _v1_graph(2)
    data["nodes"][0].update(parameters=10.0, gradients=0.0, optimizer_state=0.0, activations=5.0, output=20.0)
    graph = read_placewise(data, "v2.json")
    a, b = graph.node(0), graph.node(1)
    assert (a.parameters, a.gradients, a.optimizer_state, a.activations, a.output) == (10.0, 0.0, 0.0, 5.0, 20.0)
    assert b.parameters is None and b.output is None
    assert read_placewise(json.loads(json.dumps(write_placewise(graph))), "again") == graph


@pytest.mark.parametrize("version", [3, "2", True])
def test_unknown_graph_version_is_one_line(version):
    with pytest.raises(PlacewiseError, match="version") as err:
        read_placewise(_v1_graph(version), "new.json")
    assert "\n" not in str(err.value)


def test_negative_memory_part_is_rejected():
    data = _v1_graph(2)
    data["nodes"][1]["activations"] = -1
    with pytest.raises(PlacewiseError, match=r"nodes\[1\]\.activations"):
        read_placewise(data, "bad.json")
    with pytest.raises(PlacewiseError, match="node 0: output"):
        OpGraph.build([Node(0, None, 1.0, 1.0, 0.0, True, output=float("nan"))], [])


def test_paper_json_has_no_memory_split():
    graph = load_graph(PAPER_FILES[0])
    assert all(getattr(n, part) is None for n in graph.nodes for part in MEMORY_PARTS)


def test_pipedream_maps_parameter_and_activation_sizes():
    path = WORKLOADS / "pipedream" / "vgg16" / "graph.txt"
    graph = load_graph(path)
    lines = {l.split(" -- ")[0]: l for l in path.read_text().splitlines() if l.startswith("node")}
    for n in graph.nodes:
        if n.backward:
            assert n.parameters == n.activations == 0.0 and n.memory == 0.0
            # a backward node outputs the gradients it sends to its forward node's producers
            assert n.output == max((e.bytes for e in graph.edges if e.src == n.id), default=0.0)
        else:
            fields = dict(kv.split("=") for kv in lines[n.name].split(" -- ")[2].split(", "))
            if n.module.startswith("Input"):
                assert n.parameters == n.activations == n.output == 0.0
                continue
            assert n.parameters == float(fields["parameter_size"])
            assert n.activations == n.output == float(fields["activation_size"])
            assert n.memory == n.parameters + n.output
        assert n.gradients is None and n.optimizer_state is None  # not in PipeDream's file
