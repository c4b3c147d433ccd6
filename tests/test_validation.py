"""Issue 18's bad inputs: each reproduction ends in one line on stderr and exit 2, at once, before any work.

Files too large or too deeply nested, device counts that would fill memory, non-finite or
out-of-range flags, and output paths that cannot be written. Commands run in-process through
`placewise.cli.main`; argparse's rejections arrive as SystemExit(2).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import EXPERTS, THROUGHPUT_LAYER
from placewise.cli import main
from placewise.errors import MAX_FILE_BYTES, MAX_NESTING, PlacewiseError, dump_json, nesting_depth, read_json
from placewise.graph import Cluster, DeviceKind
from placewise.graph.devicefile import load_device_file, parse_device_file
from placewise.plan import load_plan

DEEP = 100_000
# Every rejection here is a check, not a computation: it must come well within this (seconds, on a loaded machine).
QUICK = 10.0
BERT = str(THROUGHPUT_LAYER / "bert24_inference.json")
BERT_EXPERT = str(EXPERTS / "bert24_inference_expert.json")


def paper_graph(n: int = 4, **top) -> dict:
    """A valid chain graph in the paper's format (two accelerators, one CPU)."""
    return {"maxSizePerFPGA": 100.0, "maxFPGAs": 2, "maxCPUs": 1,
            "nodes": [{"id": i, "supportedOnFpga": 1, "cpuLatency": 2.0, "fpgaLatency": 1.0, "isBackwardNode": 0,
                       "colorClass": i, "size": 1.0} for i in range(1, n + 1)],
            "edges": [{"sourceId": i, "destId": i + 1, "cost": 0.5} for i in range(1, n)], **top}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of `placewise ARGV`, run in this process."""
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help, or a flag its type check rejected
        code = e.code
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    return code, captured.out, captured.err, seconds


def assert_one_line(argv: list[str], capsys, *words: str) -> str:
    code, out, err, seconds = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("placewise: error: "), (code, out, err)
    for word in words:
        assert word in lines[0], lines[0]
    assert seconds < QUICK, f"took {seconds:.1f} s to reject {argv}"
    return lines[0]


def strict_json(text: str):
    """json.loads that rejects NaN and Infinity tokens, as strict parsers do."""
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad-input")
    paths = {}

    def write(name: str, text: str) -> None:
        (d / name).write_text(text)
        paths[name] = str(d / name)

    write("graph.json", json.dumps(paper_graph()))
    write("split.json", json.dumps({"fpgas": [{"nodes": [1, 2]}, {"nodes": [3, 4]}], "cpus": []}))
    write("deep.json", "[" * DEEP + "]" * DEEP)
    write("deep-object.json", '{"a":' * DEEP + "1" + "}" * DEEP)
    write("deep.yaml", "- " * DEEP + "x\n")
    write("huge-count.json", json.dumps(paper_graph(maxFPGAs=1e30)))
    write("huge-count-int.json", json.dumps(paper_graph(maxCPUs=10**30)))
    write("bits.yaml", "kinds:\n  - {name: accelerator, count: 2, memory: 16Gb}\n")
    write("cluster.yaml", "kinds:\n  - {name: accelerator, count: 2, memory: 16 GiB}\n  - {name: cpu, count: 1}\n")
    (d / "a-folder.png").mkdir()
    paths["folder"] = str(d / "a-folder.png")
    paths["missing-parent"] = str(d / "no-such-folder" / "out.json")
    # A sparse file just over the limit: its size is refused before a byte is read.
    with open(d / "huge.json", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    paths["huge.json"] = str(d / "huge.json")
    paths["dir"] = str(d)
    return paths


# ---- the shared readers ---------------------------------------------------------------------------
def test_nesting_depth_ignores_brackets_in_strings():
    assert nesting_depth('{"a": [1, {"b": "[[[[{{{"}], "c": "\\"[["}') == 3
    assert nesting_depth("[" * 1000, limit=10) == 11  # stops counting past the limit
    assert nesting_depth("node1 -- Conv -- activation_size=[8.0; 4.0]") == 1


@pytest.mark.parametrize("name", ["deep.json", "deep-object.json"])
def test_deep_json_plan_and_split_files_give_one_line(files, name):
    for read in (lambda p: load_plan(p), lambda p: read_json(p, "split file")):
        with pytest.raises(PlacewiseError, match=f"nests more than {MAX_NESTING} levels"):
            read(files[name])


@pytest.mark.parametrize("name", ["deep.json", "deep.yaml"])
def test_deep_device_files_give_one_line(files, name):
    with pytest.raises(PlacewiseError, match="nests"):
        load_device_file(files[name])


def test_dev_zero_and_huge_files_are_refused_unread(files):
    for path in ("/dev/zero", files["huge.json"]):
        start = time.perf_counter()
        with pytest.raises(PlacewiseError, match=f"larger than {MAX_FILE_BYTES // 2**20} MiB"):
            load_plan(path)
        assert time.perf_counter() - start < QUICK


def test_binary_file_is_not_text(tmp_path):
    (tmp_path / "g.json").write_bytes(b"{\0\0}")
    with pytest.raises(PlacewiseError, match="not a text file"):
        read_json(tmp_path / "g.json", "graph file")


def test_dump_json_writes_no_nan_or_infinity():
    text = dump_json({"loss": float("nan"), "rates": [1.0, float("inf"), (float("-inf"), 2)], "n": 3})
    assert strict_json(text) == {"loss": None, "rates": [1.0, None, [None, 2]], "n": 3}


# ---- device counts and memories, checked before any device list exists -------------------------------
def test_device_counts_are_bounded_before_devices_are_built():
    for build in (lambda: Cluster.simple(10**30), lambda: Cluster.simple(4097),
                  lambda: Cluster((DeviceKind("a", 3000, True), DeviceKind("b", 3000, False)))):
        start = time.perf_counter()
        with pytest.raises(PlacewiseError, match="4096"):
            build()
        assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("memory", [float("nan"), float("inf"), -1.0])
def test_device_memory_must_be_finite(memory):
    with pytest.raises(PlacewiseError, match="memory"):
        DeviceKind("accelerator", 1, True, memory)


@pytest.mark.parametrize("text,words", [
    ("16Gb", ["Gb is in bits", "'16GB'", "'16GiB'"]),
    ("10 Gbps", ["Gbps is in bits", "'10 GB'"]),
    ("8 b", ["in bits", "'8 B'"]),
])
def test_units_in_bits_are_refused(text, words):
    with pytest.raises(PlacewiseError) as err:
        parse_device_file({"kinds": [{"name": "gpu", "memory": text}]}, "c.yaml")
    assert str(err.value).startswith("c.yaml: kinds[0] (gpu).memory")
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("text,value", [("16G", 16e9), ("16Gi", 16 * 2**30), ("2 kB", 2e3), ("3 KiB", 3 * 2**10),
                                        ("1 TB", 1e12), ("12 GB/s", 12e9)])
def test_byte_units(text, value):
    assert parse_device_file({"kinds": [{"name": "gpu", "memory": text}]}).kind("gpu").memory == value


def test_device_file_counts_are_bounded():
    for kinds in ([{"name": "gpu", "count": 1e30}], [{"name": "gpu", "count": 3000}, {"name": "cpu", "count": 3000}]):
        with pytest.raises(PlacewiseError, match="4096"):
            parse_device_file({"kinds": kinds}, "c.yaml")


# ---- the reproductions, through the command line ---------------------------------------------------
@pytest.mark.parametrize("command", ["plan", "compare", "evaluate"])
@pytest.mark.parametrize("name", ["deep.json", "huge-count.json", "huge-count-int.json", "huge.json"])
def test_bad_graph_files_give_one_line(files, capsys, command, name):
    argv = [command, files[name]] + ([files["split.json"]] if command == "evaluate" else [])
    assert_one_line(argv, capsys)


def test_dev_zero_as_every_input_gives_one_line(files, capsys):
    assert_one_line(["plan", "/dev/zero"], capsys, "/dev/zero", "64 MiB")
    assert_one_line(["evaluate", files["graph.json"], "/dev/zero"], capsys, "/dev/zero")
    assert_one_line(["plan", files["graph.json"], "--devices", "/dev/zero"], capsys, "/dev/zero")


@pytest.mark.parametrize("name", ["deep.json", "deep.yaml", "bits.yaml"])
def test_bad_device_files_through_the_cli(files, capsys, name):
    assert_one_line(["plan", files["graph.json"], "--devices", files[name]], capsys, name)


@pytest.mark.parametrize("command", ["plan", "compare", "evaluate"])
@pytest.mark.parametrize("flags,words", [
    (["-k", "1e30"], ["--accelerators/-k", "'1e30'"]),
    (["-k", str(10**30)], ["--accelerators/-k", "0..4096"]),
    (["-k", "50000000"], ["--accelerators/-k", "0..4096"]),
    (["-l", "4611686018427387904"], ["--cpus/-l", "0..4096"]),
    (["--memory", "nan"], ["--memory", "finite"]),
    (["--memory", "0"], ["--memory", "not positive"]),
    (["--memory=-1e9"], ["--memory", "not positive"]),
    (["--bandwidth", "inf"], ["--bandwidth", "finite"]),
])
def test_bad_cluster_flags(files, capsys, command, flags, words):
    argv = [command, BERT] + ([BERT_EXPERT] if command == "evaluate" else []) + flags
    assert_one_line(argv, capsys, *words)


@pytest.mark.parametrize("argv,words", [
    (["plan", BERT, "--time-limit", "nan"], ["--time-limit", "finite"]),
    (["plan", BERT, "--time-limit", "0"], ["--time-limit", "not positive"]),
    (["compare", BERT, "--time-limit", "nan"], ["--time-limit", "finite"]),
    (["plan", BERT, "--gap", "-1"], ["--gap", "negative"]),
    (["plan", BERT, "--gap", "nan"], ["--gap", "finite"]),
    (["plan", BERT, "--solver", "local-search", "--seed", "-1"], ["--seed", "0..4294967295"]),
    (["compare", BERT, "--seed", str(2**32)], ["--seed"]),
    (["compare", BERT, "--expert", "missing.json"], ["--expert", "missing.json: no such file"]),
    (["train", "mlp", "--lr", "nan"], ["--lr", "finite"]),
    (["train", "mlp", "--lr", "inf"], ["--lr", "finite"]),
    (["train", "mlp", "--lr", "1e6"], ["--lr", "diverges"]),
    (["train", "mlp", "--lr", "0"], ["--lr", "not positive"]),
    (["train", "mlp", "--momentum", "nan"], ["--momentum", "finite"]),
    (["train", "mlp", "--momentum", "5"], ["--momentum", "[0, 1)"]),
    (["train", "mlp", "--momentum", "-0.5"], ["--momentum", "[0, 1)"]),
    (["train", "mlp", "--seed", "-1"], ["--seed"]),
    (["profile", "mlp", "--batch-size", "0"], ["--batch-size"]),
    (["profile", "mlp", "--input-shape", "3", "-5"], ["--input-shape"]),
    (["plan", BERT, "--no-such-flag"], ["unrecognized arguments"]),
])
def test_bad_flags_give_one_line(capsys, argv, words):
    assert_one_line(argv, capsys, *words)


@pytest.mark.parametrize("argv,target,words", [
    (["plan", "GRAPH", "--out"], "dir", ["--out", "is a folder"]),
    (["plan", "GRAPH", "--out"], "missing-parent", ["--out", "does not exist"]),
    (["evaluate", "GRAPH", "SPLIT", "--out"], "dir", ["--out", "is a folder"]),
    (["evaluate", "GRAPH", "SPLIT", "--out"], "missing-parent", ["--out", "does not exist"]),
    (["compare", "GRAPH", "--plot"], "folder", ["--plot", "is a folder"]),
    (["compare", "GRAPH", "--plot"], "missing-parent", ["--plot", "does not exist"]),
    (["devices", "--out"], "dir", ["--out", "is a folder"]),
    (["devices", "--out"], "missing-parent", ["--out", "does not exist"]),
    (["profile", "mlp", "--out"], "dir", ["--out", "is a folder"]),
    (["profile", "mlp", "--out"], "missing-parent", ["--out", "does not exist"]),
    (["profile", "mlp", "--export-paper"], "missing-parent", ["--export-paper", "does not exist"]),
    (["train", "mlp", "--workers", "2", "--mode", "async", "--out"], "graph.json", ["--out", "is a file, not a folder"]),
    (["train", "mlp", "--workers", "2", "--mode", "async", "--checkpoint"], "dir", ["--checkpoint", "is a folder"]),
    (["demo", "--out"], "graph.json", ["--out", "is a file, not a folder"]),
])
def test_bad_output_paths_are_refused_before_any_work(files, capsys, monkeypatch, argv, target, words):
    import placewise.cli as cli

    def no_work(args):
        raise AssertionError("the command ran before its output path was checked")
    for name in ("cmd_plan", "cmd_evaluate", "cmd_compare", "cmd_devices", "cmd_profile", "cmd_train", "cmd_demo"):
        monkeypatch.setattr(cli, name, no_work)
    argv = [{"GRAPH": files["graph.json"], "SPLIT": files["split.json"]}.get(a, a) for a in argv] + [files[target]]
    assert_one_line(argv, capsys, *words)


def test_an_unwritable_folder_is_refused(files, capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_line(["plan", files["graph.json"], "--out", str(locked / "p.json")], capsys, "not writable")
    finally:
        locked.chmod(0o700)


def test_output_folders_and_checkpoints_may_be_created(files, capsys, tmp_path):
    """Folders a command creates itself (train --out, --checkpoint's folder) need only a writable ancestor."""
    from placewise.cli import build_parser
    args = build_parser().parse_args(["train", "mlp", "--out", str(tmp_path / "a" / "b"),
                                      "--checkpoint", str(tmp_path / "c" / "ck.pt")])
    assert args.out == str(tmp_path / "a" / "b") and args.checkpoint == str(tmp_path / "c" / "ck.pt")


# ---- --json output is strict JSON -----------------------------------------------------------------
def test_plan_evaluate_compare_json_parse_strictly(files, capsys, tmp_path):
    code, out, err, _ = run_cli(["plan", files["graph.json"], "--json", "--out", str(tmp_path / "p.json")], capsys)
    assert code == 0, err
    assert strict_json(out)["feasible"]
    code, out, err, _ = run_cli(["evaluate", files["graph.json"], files["split.json"], "--json"], capsys)
    assert code == 0, err
    assert strict_json(out)["max_load"] > 0
    # The latency objective with a split whose devices wait on each other: the value is infinite.
    code, out, err, _ = run_cli(["compare", files["graph.json"], "--methods", "dp", "greedy", "--objective", "latency",
                                 "--json"], capsys)
    assert code == 0, err
    assert {r["method"] for r in strict_json(out)["rows"]} == {"dp", "greedy"}


def test_devices_json_parses_strictly(capsys, tmp_path):
    code, out, err, _ = run_cli(["devices", "--json", "--out", str(tmp_path / "here.yaml")], capsys)
    assert code == 0, err
    assert strict_json(out)["cpu"]["cores"] >= 1
    assert load_device_file(tmp_path / "here.yaml").cpus >= 1


def test_profile_json_parses_strictly(capsys):
    code, out, err, _ = run_cli(["profile", "mlp", "--batch-size", "4", "--repeats", "1", "--json"], capsys)
    assert code == 0, err
    assert strict_json(out)["forward_nodes"] >= 2
