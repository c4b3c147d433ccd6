import json

import pytest

from conftest import PAPER, WORKLOADS
from placewise.graph import load_graph, write_paper, write_placewise
from placewise.graph.formats import read_placewise

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
