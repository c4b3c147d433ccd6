"""Generated command lines of plan, evaluate, compare and devices, good and bad mixed.

Every run ends either with exit 2 and exactly one line on stderr (and nothing on stdout), or with
success and strict JSON on stdout; a run given any value known to be bad must end with exit 2.
The commands run in-process (`placewise.cli.main`), so that hundreds of examples take seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from placewise.errors import MAX_FILE_BYTES
from test_validation import paper_graph, run_cli, strict_json

DEEP = 50_000


@dataclass(frozen=True)
class Value:
    """A flag's or argument's text, and whether placewise must refuse it whatever comes with it."""

    text: str
    bad: bool


def values(good: list[str], bad: list[str]) -> st.SearchStrategy[Value]:
    """Good values three times as often as bad ones, so that some whole command lines are good."""
    good_values = st.sampled_from([Value(t, False) for t in good])
    return st.one_of(good_values, good_values, good_values, st.sampled_from([Value(t, True) for t in bad]))


COUNT = values(["0", "1", "2", "3"], ["-1", "1e30", str(10**30), "50000000", "4611686018427387904", "x", "2.5", "nan"])
BYTES = values(["1e9", "100", "3.5"], ["nan", "0", "inf", "-inf", "x", "1e309", ""])
SECONDS = values(["5", "0.5"], ["nan", "0", "inf", "x"])
GAP = values(["0", "1e-4", "0.5"], ["-1", "nan", "inf", "x"])
SEED = values(["0", "7", str(2**32 - 1)], ["-1", str(2**32), "x", "1.5"])
OBJECTIVE = values(["throughput", "latency"], ["speed"])
SOLVER = values(["dp", "greedy", "pipedream", "block-time", "one-accelerator"], ["nosuch"])
# Files are named by key; the `files` fixture makes them.
GRAPH = values(["graph"], ["deep", "huge-count", "huge", "/dev/zero", "missing", "dir", "binary", "empty", "split",
                           "garbage", "negative-cost"])
SPLIT = values(["split", "plan-file"], ["deep", "/dev/zero", "missing", "dir", "graph", "partial", "garbage"])
DEVICES = values(["cluster"], ["bits", "deep-yaml", "deep", "huge-count-yaml", "missing", "/dev/zero", "dir", "garbage"])
OUT = values(["out"], ["dir", "missing-parent"])
PLOT = values(["out-png"], ["folder-png", "missing-parent", "out-txt"])
EXPERT = values(["split"], ["missing", "dir"])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("fuzz")
    texts = {
        "graph": json.dumps(paper_graph()),
        "split": json.dumps({"fpgas": [{"nodes": [1, 2]}, {"nodes": [3, 4]}], "cpus": []}),
        "partial": json.dumps({"fpgas": [{"nodes": [1, 2]}], "cpus": []}),
        "deep": "[" * DEEP + "]" * DEEP,
        "deep-yaml": "- " * DEEP + "x\n",
        "huge-count": json.dumps(paper_graph(maxFPGAs=1e30)),
        "empty": "",
        "garbage": "}{ not a file placewise reads",
        "negative-cost": json.dumps({**paper_graph(), "edges": [{"sourceId": 1, "destId": 2, "cost": -1}]}),
        "cluster": "kinds:\n  - {name: accelerator, count: 2, memory: 1 GB}\n  - {name: cpu, count: 1}\n",
        "bits": "kinds:\n  - {name: accelerator, count: 2, memory: 16Gb}\n",
        "huge-count-yaml": "kinds:\n  - {name: accelerator, count: 1e30}\n",
    }
    paths = {"/dev/zero": "/dev/zero", "dir": str(d), "missing": str(d / "missing.json"),
             "missing-parent": str(d / "no-such-folder" / "x.json"), "out": str(d / "out.json"),
             "out-png": str(d / "chart.png"), "out-txt": str(d / "chart.txt"), "folder-png": str(d / "folder.png")}
    for name, text in texts.items():
        paths[name] = str(d / f"{name}{'.yaml' if 'yaml' in name or name in ('cluster', 'bits') else '.json'}")
        Path(paths[name]).write_text(text)
    (d / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    paths["binary"] = str(d / "binary.json")
    with open(d / "huge.json", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    paths["huge"] = str(d / "huge.json")
    (d / "folder.png").mkdir()
    from placewise.graph import load_graph
    from placewise.graph.devices import Cluster
    from placewise.plan import plan_from_assignment
    from placewise.plan.plan import load_split
    graph = load_graph(paths["graph"])
    plan = plan_from_assignment(graph, Cluster.simple(2, 1), load_split(paths["split"], graph), solver="test",
                                seconds=0.0)
    plan.save(d / "plan-file.json")
    paths["plan-file"] = str(d / "plan-file.json")
    return paths


@st.composite
def command_lines(draw) -> tuple[str, list[Value | str]]:
    """A command and its argv, as Values (to be checked) and plain strings (flag names, fixed words)."""
    command = draw(st.sampled_from(["plan", "evaluate", "compare", "devices"]))
    argv: list[Value | str] = [command]
    optional: dict[str, st.SearchStrategy[Value]] = {"--out": OUT}
    if command != "devices":
        argv.append(draw(GRAPH))
        if command == "evaluate":
            argv.append(draw(SPLIT))
        optional.update({"-k": COUNT, "-l": COUNT, "--memory": BYTES, "--bandwidth": BYTES, "--devices": DEVICES,
                         "--objective": OBJECTIVE})
    if command == "plan":
        optional.update({"--solver": SOLVER, "--time-limit": SECONDS, "--gap": GAP, "--seed": SEED})
    if command == "compare":
        del optional["--out"]
        optional.update({"--plot": PLOT, "--expert": EXPERT, "--time-limit": SECONDS, "--seed": SEED})
        methods = draw(st.lists(SOLVER, min_size=1, max_size=3))
        argv += ["--methods", *methods]
    for flag in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=3)):
        argv += [flag, draw(optional[flag])]
    if draw(st.booleans()):
        argv.append("--json")
    return command, argv


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=command_lines())
def test_generated_command_lines_end_in_one_line_or_valid_output(files, capsys, case):
    command, argv = case
    # A file key stands for its path; any other text goes as it is. `--flag=value` keeps values
    # that start with '-' from being read as flags.
    words: list[str] = []
    for i, item in enumerate(argv):
        if isinstance(item, Value):
            text = files.get(item.text, item.text)
            if i > 0 and isinstance(argv[i - 1], str) and argv[i - 1].startswith("-") and text.startswith("-"):
                words[-1] = f"{words[-1]}={text}"
            else:
                words.append(text)
        else:
            words.append(item)
    must_fail = any(isinstance(item, Value) and item.bad for item in argv)
    code, out, err, _ = run_cli(words, capsys)
    lines = err.strip().splitlines()
    event(f"{command}: exit {code}")
    if code == 2:
        assert out == "" and len(lines) == 1 and lines[0].startswith("placewise: error: "), (words, out, err)
        return
    assert not must_fail, f"accepted {words}: exit {code}"
    assert code == 0 or (command == "evaluate" and code == 1), (words, code, err)  # 1: an infeasible split, scored
    assert "Traceback" not in err
    if "--json" in words:
        strict_json(out)
    else:
        assert out.strip(), words
