"""Bad input gets one line naming the file, the problem and the fix — never a traceback."""

import json
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXPERTS, THROUGHPUT_LAYER
from placewise.errors import PlacewiseError
from placewise.graph import load_graph, parse_graph
from placewise.plan import read_split

SOURCE = "bad-input.json"


def _paper_graph(n: int) -> dict:
    """A valid chain graph in the paper's format."""
    return {
        "maxSizePerFPGA": 100.0, "maxFPGAs": 2, "maxCPUs": 1,
        "nodes": [{"id": i, "supportedOnFpga": 1, "cpuLatency": 2.0, "fpgaLatency": 1.0, "isBackwardNode": 0,
                   "colorClass": i, "size": 1.0} for i in range(1, n + 1)],
        "edges": [{"sourceId": i, "destId": i + 1, "cost": 0.5} for i in range(1, n)],
    }


NODE_REQUIRED = ["id", "supportedOnFpga", "cpuLatency", "fpgaLatency", "isBackwardNode"]
EDGE_REQUIRED = ["sourceId", "destId", "cost"]
TOP_REQUIRED = ["maxSizePerFPGA", "maxFPGAs", "maxCPUs", "nodes", "edges"]
NOT_A_NUMBER = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.none(), st.booleans(),
                         st.floats(max_value=-1e-3, allow_nan=False, allow_infinity=False), st.just(float("inf")),
                         st.just(float("nan")))


@st.composite
def malformed_paper_json(draw) -> str:
    g = _paper_graph(draw(st.integers(2, 6)))
    n = len(g["nodes"])
    kind = draw(st.sampled_from(["drop-top", "drop-node-field", "drop-edge-field", "bad-node-number", "bad-edge-number",
                                 "bad-flag", "duplicate-id", "unknown-edge-end", "cycle", "self-loop", "cost-mismatch",
                                 "empty", "bad-count", "not-json", "not-object", "node-not-object", "backward-to-forward"]))
    i = draw(st.integers(0, n - 1))
    j = draw(st.integers(0, n - 2))
    if kind == "drop-top":
        del g[draw(st.sampled_from(TOP_REQUIRED))]
    elif kind == "drop-node-field":
        del g["nodes"][i][draw(st.sampled_from(NODE_REQUIRED))]
    elif kind == "drop-edge-field":
        del g["edges"][j][draw(st.sampled_from(EDGE_REQUIRED))]
    elif kind == "bad-node-number":
        g["nodes"][i][draw(st.sampled_from(["cpuLatency", "fpgaLatency", "size"]))] = draw(NOT_A_NUMBER)
    elif kind == "bad-edge-number":
        g["edges"][j]["cost"] = draw(NOT_A_NUMBER)
    elif kind == "bad-flag":
        g["nodes"][i][draw(st.sampled_from(["supportedOnFpga", "isBackwardNode"]))] = draw(
            st.one_of(st.integers(2, 9), st.text(max_size=3), st.none(), st.floats(0.1, 0.9)))
    elif kind == "duplicate-id":
        g["nodes"][i]["id"] = g["nodes"][(i + 1) % n]["id"]
    elif kind == "unknown-edge-end":
        g["edges"][j][draw(st.sampled_from(["sourceId", "destId"]))] = 1000 + draw(st.integers(0, 99))
    elif kind == "cycle":
        g["edges"].append({"sourceId": n, "destId": 1, "cost": 0.0})
    elif kind == "self-loop":
        g["edges"].append({"sourceId": i + 1, "destId": i + 1, "cost": 0.0})
    elif kind == "cost-mismatch":
        g["edges"].append({"sourceId": 1, "destId": n, "cost": 0.5 + draw(st.floats(0.01, 10))})
    elif kind == "empty":
        g["nodes"], g["edges"] = [], []
    elif kind == "bad-count":
        g[draw(st.sampled_from(["maxFPGAs", "maxCPUs"]))] = draw(st.one_of(st.integers(-9, -1), st.text(max_size=3), st.floats(0.1, 0.9)))
    elif kind == "not-json":
        text = json.dumps(g)
        # cut at least the closing "}]}" so no suffix can complete it again
        return text[: draw(st.integers(0, len(text) - 3))] + draw(st.sampled_from(["", "{,", "]"]))
    elif kind == "not-object":
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=4).map(json.dumps))))
    elif kind == "node-not-object":
        g["nodes"][i] = draw(st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)))
    elif kind == "backward-to-forward":
        g["nodes"][0]["isBackwardNode"] = 1
    return json.dumps(g)


@st.composite
def malformed_pipedream(draw) -> str:
    lines = ["node1 -- Input -- forward_compute_time=0.000, backward_compute_time=0.000, activation_size=4.0, parameter_size=0.000",
             "node2 -- Conv2d(3, 8) -- forward_compute_time=1.000, backward_compute_time=2.000, activation_size=8.0, parameter_size=16.000",
             "node3 -- ReLU() -- forward_compute_time=0.500, backward_compute_time=0.500, activation_size=[8.0; 4.0], parameter_size=0.000",
             "\tnode1 -- node2", "\tnode2 -- node3"]
    kind = draw(st.sampled_from(["bad-number", "negative", "garbage-line", "unknown-edge", "duplicate", "cycle"]))
    if kind == "bad-number":
        lines[1] = lines[1].replace("1.000", draw(st.sampled_from(["x", "1.0.0", "--", "nan"])))
    elif kind == "negative":
        lines[2] = lines[2].replace("0.500", "-0.500", 1)
    elif kind == "garbage-line":
        lines.insert(draw(st.integers(1, len(lines))), draw(st.sampled_from(["hello", "node4 -- X", "\tnode1 - node2"])))
    elif kind == "unknown-edge":
        lines.append("\tnode3 -- node9")
    elif kind == "duplicate":
        lines.append(lines[1])
    elif kind == "cycle":
        lines.append("\tnode3 -- node1")
    return "\n".join(lines) + "\n"


def _assert_one_line_error(text: str, source: str) -> None:
    try:
        parse_graph(text, source)
    except PlacewiseError as e:
        message = str(e)
        assert "\n" not in message and source in message and ";" in message, message
    else:
        raise AssertionError(f"accepted malformed input: {text[:200]!r}")


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed_paper_json())
def test_malformed_paper_json_gives_one_line_error(text):
    _assert_one_line_error(text, SOURCE)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed_pipedream())
def test_malformed_pipedream_gives_one_line_error(text):
    _assert_one_line_error(text, "graph.txt")


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_malformed_split_gives_one_line_error(data):
    graph = parse_graph(json.dumps(_paper_graph(4)), SOURCE)
    split = {"fpgas": [{"nodes": [1, 2]}, {"nodes": [3, 4]}], "cpus": []}
    kind = data.draw(st.sampled_from(["unknown", "missing", "twice", "not-list", "not-ids", "not-object"]))
    if kind == "unknown":
        split["fpgas"][0]["nodes"].append(data.draw(st.integers(5, 99)))
    elif kind == "missing":
        split["fpgas"][1]["nodes"].pop()
    elif kind == "twice":
        split["fpgas"][1]["nodes"].append(1)
    elif kind == "not-list":
        split["fpgas"] = data.draw(st.one_of(st.integers(), st.text(max_size=3)))
    elif kind == "not-ids":
        split["fpgas"][0]["nodes"] = data.draw(st.one_of(st.text(max_size=3), st.lists(st.text(max_size=2), min_size=1, max_size=2)))
    else:
        split = data.draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.just({"foo": 1})))
    try:
        read_split(split, graph, "split.json")
    except PlacewiseError as e:
        assert "\n" not in str(e) and "split.json" in str(e) and ";" in str(e), str(e)
    else:
        raise AssertionError(f"accepted malformed split {split!r}")


def _cli(*args: str):
    return subprocess.run([sys.executable, "-m", "placewise.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    bad_graph = tmp_path / "broken.json"
    bad_graph.write_text(json.dumps({**_paper_graph(3), "edges": [{"sourceId": 1, "destId": 2, "cost": -1}]}))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"fpgas": [{"nodes": list(range(1, 9))}], "cpus": []}))
    good_graph = THROUGHPUT_LAYER / "bert24_inference.json"
    cases = [
        (str(bad_graph), str(EXPERTS / "bert24_inference_expert.json"), "broken.json"),
        (str(tmp_path / "missing.json"), str(partial), "missing.json"),
        (str(good_graph), str(partial), "partial.json"),
        (str(good_graph), str(bad_graph), "broken.json"),
    ]
    for graph, split, named in cases:
        result = _cli("evaluate", graph, split)
        assert result.returncode == 2, result
        assert result.stdout == "" and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("placewise: error: ") and named in lines[0], result.stderr


def test_evaluate_json_output_matches_cost_model():
    result = _cli("evaluate", str(THROUGHPUT_LAYER / "bert24_inference.json"),
                  str(EXPERTS / "bert24_inference_expert.json"), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert abs(plan["max_load"] - 20.084) < 5e-4 and plan["feasible"]
    graph = load_graph(THROUGHPUT_LAYER / "bert24_inference.json")
    assert sorted(n for s in plan["stages"] for n in s["nodes"]) == sorted(n.id for n in graph.nodes)
