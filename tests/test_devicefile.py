"""Device files: the sample clusters, units, profile-measured speeds, round trips, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placewise.cli import main
from placewise.errors import PlacewiseError
from placewise.graph import Cluster, DeviceKind, Edge, Node, OpGraph, write_placewise
from placewise.graph.devicefile import device_file_text, load_device_file, parse_device_file

DATA = Path(__file__).resolve().parents[1] / "placewise" / "data"
GiB = 2**30


def test_sample_files_load():
    two = load_device_file(DATA / "cluster-2.yaml")
    four = load_device_file(DATA / "cluster-4.yaml")
    demo = load_device_file(DATA / "demo-cluster.yaml")
    assert (two.accelerators, two.cpus, four.accelerators, four.cpus) == (2, 0, 4, 0)
    assert two.kind("accelerator").memory == 4 * GiB and four.kind("accelerator").memory == 2 * GiB
    assert two.bandwidth == 12e9
    assert [(k.name, k.count, k.accelerator, k.speed) for k in demo.kinds] == [
        ("accelerator", 2, True, 20.0), ("accelerator-small", 1, True, 8.0), ("cpu", 2, False, 1.0)]
    assert demo.kind("accelerator-small").memory == 512 * 2**20 and demo.kind("cpu").memory is None


@pytest.mark.parametrize("text,value", [(16e9, 16e9), ("16 GiB", 16 * GiB), ("1.5GB", 1.5e9), ("1e10", 1e10),
                                        ("512 MiB", 512 * 2**20), (0, 0.0)])
def test_memory_units(text, value):
    cluster = parse_device_file({"kinds": [{"name": "gpu", "memory": text}]})
    assert cluster.kind("gpu").memory == value


def test_bandwidth_units_and_type_inference():
    cluster = parse_device_file({"bandwidth": "12.5 GB/s", "kinds": {"accelerator": 3, "cpu-socket": {"count": 8}}})
    assert cluster.bandwidth == 12.5e9
    assert (cluster.accelerators, cluster.cpus) == (3, 8)


def test_json_file_and_cluster_json_are_device_files(tmp_path):
    cluster = Cluster((DeviceKind("accelerator", 2, True, 8e9, 4.0), DeviceKind("cpu", 3, False, None, 0.5)), 5e9)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster.to_json()))
    assert load_device_file(path) == cluster


kinds = st.lists(st.tuples(st.integers(0, 16), st.booleans(),
                           st.one_of(st.none(), st.floats(0, 1e12, allow_nan=False)),
                           st.floats(0.01, 1000, allow_nan=False), st.booleans()), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(kinds, st.one_of(st.none(), st.floats(1, 1e12, allow_nan=False)))
def test_written_device_file_reads_back(tmp_path_factory, spec, bandwidth):
    # A CPU kind's cores share memory or not; an accelerator never does.
    cluster = Cluster(tuple(DeviceKind(f"kind{i}", c, a, m, s, shared_memory=sh and not a)
                            for i, (c, a, m, s, sh) in enumerate(spec)), bandwidth)
    path = tmp_path_factory.mktemp("dev") / "c.yaml"
    path.write_text(device_file_text(cluster, "written by a test"))
    assert load_device_file(path) == cluster


def test_shared_memory_defaults_to_the_papers_rule_and_can_be_turned_off():
    cluster = parse_device_file({"kinds": [{"name": "gpu", "type": "gpu"}, {"name": "cpu", "count": 2},
                                           {"name": "cores", "type": "cpu", "shared_memory": False}]})
    gpu, cpu, cores = cluster.kinds
    assert (gpu.shared_memory, gpu.pays_transfers) == (False, True)
    assert (cpu.shared_memory, cpu.pays_transfers) == (True, False)  # the paper's cores in one process
    assert (cores.shared_memory, cores.pays_transfers) == (False, True)
    assert Cluster.from_json(cluster.to_json()) == cluster
    # A cluster JSON written before the flag existed reads with the defaults.
    old = {"kinds": [{"name": "cpu", "count": 2, "accelerator": False, "memory": None, "speed": 1.0}]}
    assert Cluster.from_json(old).kind("cpu").shared_memory is True


def test_the_machines_cores_pay_the_measured_link():
    from placewise.profile.machine import machine_cluster, machine_device_file
    info = {"cpu": {"model": "test", "cores": 4, "usable_cores": 4}, "memory": None, "torch": None, "cuda": [],
            "link": {"backend": "gloo", "latency": 5e-5, "bandwidth": 2e9}}
    cluster = machine_cluster(info)
    assert cluster.kind("cpu").pays_transfers and (cluster.bandwidth, cluster.latency) == (2e9, 5e-5)
    assert parse_device_file(__import__("yaml").safe_load(machine_device_file(info))) == cluster


def _profile_graph(path: Path, model: str, acc_ms: float, cpu_ms: float) -> None:
    graph = OpGraph.build([Node(0, "a", 1.0, 1.0, 0.0, True, module="a"), Node(1, "b", 1.0, 1.0, 0.0, True, module="b")],
                          [Edge(0, 1, 0.0, 4.0)], name=model,
                          meta={"model": model, "acc_forward_ms": acc_ms, "cpu_forward_ms": cpu_ms})
    path.write_text(json.dumps(write_placewise(graph)))


def test_speed_from_measured_profiles(tmp_path):
    _profile_graph(tmp_path / "ref.json", "resnet18", 200.0, 200.0)
    _profile_graph(tmp_path / "gpu.json", "resnet18", 8.0, 900.0)
    _profile_graph(tmp_path / "big-cpu.json", "resnet18", 50.0, 50.0)
    (tmp_path / "c.yaml").write_text(
        "reference: ref.json\nkinds:\n  - {name: accelerator, type: gpu, count: 2, profile: gpu.json}\n"
        "  - {name: cpu, type: cpu, count: 4, profile: big-cpu.json}\n")
    cluster = load_device_file(tmp_path / "c.yaml")
    assert cluster.kind("accelerator").speed == pytest.approx(25.0)  # 200 / 8 on the accelerator clock
    assert cluster.kind("cpu").speed == pytest.approx(4.0)  # 200 / 50 on the CPU clock
    _profile_graph(tmp_path / "other.json", "vgg16", 8.0, 8.0)
    (tmp_path / "bad.yaml").write_text("reference: ref.json\nkinds:\n  - {name: accelerator, profile: other.json}\n")
    with pytest.raises(PlacewiseError, match="profile the same model"):
        load_device_file(tmp_path / "bad.yaml")


@pytest.mark.parametrize("text,words", [
    ("kinds:\n  - {name: gpu, mem: 4}\n", ["kinds[0] (gpu)", "unknown field 'mem'", "did you mean 'memory'"]),
    ("kinds:\n  - {name: q, type: quantum}\n", ["kinds[0] (q).type", "unknown kind 'quantum'"]),
    ("kinds:\n  - {name: gpu, memory: -4}\n", ["kinds[0] (gpu).memory", "negative"]),
    ("kinds:\n  - {name: gpu, memory: '-4 GiB'}\n", ["memory", "negative"]),
    ("kinds:\n  - {name: gpu, count: -1}\n", ["count", "0 or more"]),
    ("kinds:\n  - {name: gpu, count: 1.5}\n", ["count", "whole number"]),
    ("kinds:\n  - {name: gpu, speed: 0}\n", ["speed", "positive"]),
    ("kinds:\n  - {name: gpu, memory: lots}\n", ["memory", "'lots' is not"]),
    ("kinds:\n  - {name: gpu}\n  - {name: gpu}\n", ["duplicate kind name"]),
    ("kinds: []\n", ["kinds", "missing or empty"]),
    ("kinds:\n  - {count: 2}\n", ["kinds[0].name", "missing"]),
    ("gpus: 2\nkinds:\n  - {name: gpu}\n", ["top level", "unknown field 'gpus'"]),
    ("bandwidth: 0\nkinds:\n  - {name: gpu}\n", ["bandwidth", "positive"]),
    ("kinds:\n  - {name: gpu, type: cpu, accelerator: true}\n", ["contradicts"]),
    ("kinds:\n  - {name: gpu, speed: 2, profile: g.json}\n", ["both speed and profile"]),
    ("kinds:\n  - {name: gpu, profile: g.json}\n", ["needs the top-level `reference`"]),
    ("kinds:\n  - {name: cpu, shared_memory: no-thanks}\n", ["kinds[0] (cpu).shared_memory", "write true"]),
    ("kinds:\n  - {name: gpu, type: gpu, shared_memory: true}\n", ["kinds[0] (gpu).shared_memory", "accelerator"]),
    ("kinds: [\n", ["not YAML", "line"]),
    ("- 1\n- 2\n", ["top level", "expected a mapping"]),
])
def test_bad_device_files_give_one_line(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PlacewiseError) as err:
        load_device_file(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    for word in words:
        assert word in message


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(PlacewiseError, match="no such device file"):
        load_device_file(tmp_path / "nope.yaml")
    (tmp_path / "c.json").write_text("{kinds: 1}")
    with pytest.raises(PlacewiseError, match="not JSON"):
        load_device_file(tmp_path / "c.json")


def _small_graph(path: Path) -> None:
    nodes = [Node(i, f"n{i}", 1.0 + i, 10.0 + i, 1e6, True, module=f"n{i}") for i in range(6)]
    edges = [Edge(i, i + 1, 0.1, 1e6) for i in range(5)]
    path.write_text(json.dumps(write_placewise(OpGraph.build(nodes, edges, name="chain"))))


@pytest.mark.parametrize("text,words", [
    ("kinds:\n  - {name: accelerator, type: tpu9}\n", ["unknown kind 'tpu9'"]),
    ("kinds:\n  - {name: accelerator, memory: -1}\n", ["memory", "negative"]),
])
def test_plan_with_bad_device_file_exits_2(tmp_path, capsys, text, words):
    _small_graph(tmp_path / "g.json")
    (tmp_path / "c.yaml").write_text(text)
    assert main(["plan", str(tmp_path / "g.json"), "--devices", str(tmp_path / "c.yaml"), "--solver", "dp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("placewise: error:") and "\n" not in err
    for word in words:
        assert word in err


def test_plan_uses_the_device_file(tmp_path, capsys):
    _small_graph(tmp_path / "g.json")
    assert main(["plan", str(tmp_path / "g.json"), "--devices", str(DATA / "demo-cluster.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cluster"]["kinds"][1]["name"] == "accelerator-small"
    assert {s["kind"] for s in plan["stages"]} <= {"accelerator", "accelerator-small", "cpu"}
    assert sorted(n for s in plan["stages"] for n in s["nodes"]) == list(range(6))


def test_device_file_loader_does_not_import_torch():
    code = ("import sys; from placewise.graph.devicefile import load_device_file; "
            f"load_device_file({str(DATA / 'demo-cluster.yaml')!r}); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
