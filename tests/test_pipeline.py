"""Pipelined training and inference (placewise.run.pipeline) against the same model in one process.

One launch of 3 processes runs every pipelined check (2-stage jobs use a subgroup of the first two
ranks), so the processes and torch imports are paid once; references run in this process.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from placewise.errors import PlacewiseError  # noqa: E402
from placewise.run.launcher import launch  # noqa: E402
from placewise.run.cut import assign_stages, cut, record_values, trace  # noqa: E402
from placewise.run.job import PipelineJob  # noqa: E402
from placewise.run.pipeline import pipeline_rank, run_single  # noqa: E402

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


# ---- models (importable by spec "test_pipeline:NAME" in the launched processes) -----------------------
class ResidualMLP(nn.Module):
    def __init__(self, width: int = 32, depth: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        skip = x  # crosses several stages in the 3-stage cut
        for i, layer in enumerate(self.hidden):
            x = torch.tanh(layer(x))
            if i % 2 == 1:
                x = x + skip
        return self.out(x + skip)


class Block(nn.Module):
    """Pre-norm transformer block written out (attention reshapes cross the cuts as shapes)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(torch.relu(self.ff1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2, seq: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.embed(tokens) + self.pos)))


def mlp(batch_size: int = 8):
    return ResidualMLP(), (torch.randn(batch_size, 16),)


def transformer(batch_size: int = 8):
    return TinyTransformer(), (torch.randint(0, 50, (batch_size, 8)),)


def resnet18(batch_size: int = 16):
    # 48x48 leaves layer4 2x2: batch norm over 2x2 maps of 4-sample microbatches is well conditioned
    # (over 1x1 maps of 2 samples its gradients change by 0.1 between thread counts).
    import torchvision
    return torchvision.models.resnet18(num_classes=10), (torch.randn(batch_size, 3, 48, 48),)


MODELS = {"mlp": mlp, "transformer": transformer, "resnet18": resnet18}


def _computing_nodes(name: str) -> list[str]:
    model, inputs = MODELS[name]()
    return [n.name for n in trace(model, inputs).graph.nodes if n.op in ("call_module", "call_function", "call_method")]


def even_mapping(name: str, n_stages: int) -> dict[str, int]:
    """Cut the model's computing nodes into n contiguous runs of about equal count (graph order)."""
    nodes = _computing_nodes(name)
    return {node: i * n_stages // len(nodes) for i, node in enumerate(nodes)}


def cut_before(name: str, first_of_stage_1: str) -> dict[str, int]:
    """Two stages, the second starting at the named node."""
    nodes = _computing_nodes(name)
    start = nodes.index(first_of_stage_1)
    return {node: int(i >= start) for i, node in enumerate(nodes)}


# ---- the cut, in this process -----------------------------------------------------------------------
def test_cut_carries_skips_and_matches_the_model():
    model, inputs = mlp()
    gm = trace(model, inputs)
    mapping = even_mapping("mlp", 3)
    parts = cut(gm, mapping, record_values(gm, inputs))
    assert [p.index for p in parts] == [0, 1, 2]
    # The residual `relu` (made on stage 0, read on stage 2) rides through stage 1 untouched.
    assert "relu" in parts[1].inputs and "relu" in parts[1].outputs and "relu" in parts[2].inputs
    values = inputs
    for part in parts:
        values = part.module(*values)
        values = values if isinstance(values, tuple) else (values,)
    torch.testing.assert_close(values[0], gm(*inputs), atol=0, rtol=0)


def test_cut_packs_shapes_that_cross_a_cut():
    model, inputs = transformer()
    gm = trace(model, inputs)
    nodes = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    # Cut right after the first block's `x.shape` so the shape travels to stage 1.
    getattr_index = next(i for i, n in enumerate(nodes) if n.startswith("getattr"))
    mapping = {n: int(i > getattr_index) for i, n in enumerate(nodes)}
    parts = cut(gm, mapping, record_values(gm, inputs))
    shape_values = [name for name in parts[0].outputs if name.startswith("getattr") or name.startswith("getitem")]
    assert shape_values, parts[0].outputs
    out = parts[1].module(*parts[0].module(*inputs))
    torch.testing.assert_close(out, gm(*inputs), atol=0, rtol=0)


def test_non_contiguous_plan_is_a_clear_error():
    model, inputs = mlp()
    gm = trace(model, inputs)
    mapping = even_mapping("mlp", 2)
    first = next(iter(mapping))
    mapping[first] = 1  # the first op on stage 1 feeds stage 0
    with pytest.raises(PlacewiseError, match="not contiguous"):
        assign_stages(gm, mapping)
    with pytest.raises(PlacewiseError, match="lacks"):
        assign_stages(gm, {"no_such_node": 0})


# ---- pipelined runs against one process --------------------------------------------------------------
CASES = [(name, n, schedule) for name in MODELS for n in (2, 3) for schedule in ("gpipe", "1f1b")]
FUSE_MODES = ("backward", "backward-overlap", "forward")
PRELOAD = ("torch", "torch.distributed.pipelining")


def job(name: str, n_stages: int, **kw) -> PipelineJob:
    return PipelineJob(model=f"test_pipeline:{name}", batch_size=16 if name == "resnet18" else 8,
                       mapping=even_mapping(name, n_stages), microbatches=4, seed=3, **kw)


@pytest.fixture(scope="module")
def pipelined():
    """Every pipelined job of this module, run in one launch of 3 processes."""
    jobs = [job(name, n, schedule=s, steps=2, collect=("grads",)) for name, n, s in CASES]
    jobs += [job(name, n, mode="infer", collect=("outputs",)) for name in MODELS for n in (2, 3)]
    jobs += [job("mlp", 2, steps=3, optimizer="adam", lr=0.01, fuse=mode) for mode in FUSE_MODES]
    # Stage 1 opens with resnet's in-place ReLU on the residual sum it receives.
    jobs += [replace(job("resnet18", 2, steps=2, collect=("grads",)), mapping=cut_before("resnet18", "layer1_0_relu_1"))]
    start = time.monotonic()
    # Ranks fork from a server that imported torch once (children inherit sys.path, so specs resolve).
    results, failures = launch(pipeline_rank, 3, (jobs,), timeout_s=280, preload=PRELOAD)
    assert not failures
    print(f"pipelined jobs: {time.monotonic() - start:.1f} s")
    return {id_: [r[i] for r in results] for i, id_ in enumerate(
        [("train", name, n, s) for name, n, s in CASES] + [("infer", name, n) for name in MODELS for n in (2, 3)]
        + [("fuse", mode) for mode in FUSE_MODES] + [("inplace",)])}


@functools.cache
def single_process(name: str, mode: str) -> dict:
    """The uncut model in this process on the same batches and microbatches (the same for any cut and schedule)."""
    if mode == "train":
        return run_single(job(name, 2, steps=2, collect=("grads",)))
    return run_single(job(name, 2, mode="infer", collect=("outputs",)))


@pytest.mark.parametrize("name,n_stages,schedule", CASES)
def test_pipelined_training_step_matches_one_process(pipelined, name, n_stages, schedule):
    _assert_training_matches_one_process(pipelined[("train", name, n_stages, schedule)], name, n_stages)


def test_stage_opening_with_an_in_place_op_trains_like_one_process(pipelined):
    _assert_training_matches_one_process(pipelined[("inplace",)], "resnet18", 2)


def _assert_training_matches_one_process(ranks: list, name: str, n_stages: int) -> None:
    reference = single_process(name, "train")
    last = ranks[n_stages - 1]
    # Step 0's loss, and step 1's after one SGD update of every stage.
    assert last["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    grads = {}
    for rank in ranks[:n_stages]:
        assert not grads.keys() & rank["grads"].keys(), "a parameter lives on two stages"
        grads.update(rank["grads"])
    assert grads.keys() == reference["grads"].keys()
    for key, grad in reference["grads"].items():
        torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4, msg=f"{name}: gradient of {key}")
    assert ranks[2] is None if n_stages == 2 else ranks[2] is not None


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n_stages", [2, 3])
def test_pipelined_inference_matches_one_process(pipelined, name, n_stages):
    ranks = pipelined[("infer", name, n_stages)]
    reference = single_process(name, "infer")
    torch.testing.assert_close(ranks[n_stages - 1]["outputs"], reference["outputs"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", FUSE_MODES)
def test_fused_optimizer_trains_each_stage_like_the_unfused_one(pipelined, mode):
    # Backward fusion updates inside the last microbatch's backward; forward fusion at the next forward.
    ranks = pipelined[("fuse", mode)]
    reference = run_single(job("mlp", 2, steps=3, optimizer="adam", lr=0.01))
    assert ranks[1]["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert reference["losses"][2] < reference["losses"][0]


# ---- shutdown -----------------------------------------------------------------------------------------
def plan_file(tmp_path: Path, name: str, n_stages: int) -> Path:
    """A placewise plan whose stages list the fx nodes of an even cut (what `placewise plan` writes)."""
    from placewise.plan.plan import Plan, Stage
    mapping = even_mapping(name, n_stages)
    stages = [Stage("cpu", s, False, [], 1.0, 1.0, 0.0, 0.0, [n for n, i in mapping.items() if i == s])
              for s in range(n_stages)]
    path = tmp_path / "plan.json"
    Plan(stages=stages, max_load=1.0, latency=None, solver="test", seconds=0.0).save(path)
    return path


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, oldest first (pids grow)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_killed_stage_stops_every_process_with_its_error(tmp_path):
    plan = plan_file(tmp_path, "mlp", 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    cli = subprocess.Popen([sys.executable, "-m", "placewise.cli", "train", "test_pipeline:mlp", "--plan", str(plan),
                            "--steps", "1000000", "--batch-size", "8", "--json"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        ranks: list[int] = []
        # Mid-run: both ranks exist and have computed a while (imports and setup take a few CPU seconds).
        while time.monotonic() < deadline and cli.poll() is None:
            ranks = [p for p in _children(cli.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
            if len(ranks) == 2 and all(_cpu_seconds(p) > 7 for p in ranks):
                break
            time.sleep(0.5)
        assert cli.poll() is None and len(ranks) == 2, "the pipeline did not get going"
        everyone = _children(cli.pid) + [g for p in ranks for g in _children(p)]
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        out, err = cli.communicate(timeout=30)
        assert time.monotonic() - killed < 30
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 2
    assert err.count("rank 1 failed") == 1, err
    assert "placewise: error: rank 1 failed: process exited with code -9" in err
    time.sleep(0.5)
    assert not [p for p in everyone if _alive(p)], "a process was left behind"


def test_stage_that_raises_stops_the_run_with_its_error():
    failing = job("mlp", 2, steps=3, fail_at_step=(1, 1))
    start = time.monotonic()
    with pytest.raises(PlacewiseError) as raised:
        launch(pipeline_rank, 2, ([failing],), timeout_s=120, preload=PRELOAD)
    assert str(raised.value) == "rank 1 failed: RuntimeError: stage 1 failed on purpose at step 1"
    assert time.monotonic() - start < 120


def test_stages_report_what_they_spend_outside_their_chunks(pipelined):
    first, last = pipelined[("train", "mlp", 2, "1f1b")][:2]  # the third process sits this job out
    for report in (first, last):
        outside = report["outside_seconds"]
        assert set(outside) == {"post", "wait", "loss", "allreduce", "update"} == set(report["outside_cpu_seconds"])
        assert outside["allreduce"] == 0  # no stage is replicated
        # The update is on the timeline beside the chunks, once per timed step.
        assert sum(kind == "update" for kind, *_ in report["events"]) == len(report["step_seconds"])
        assert outside["post"] > 0 and outside["wait"] > 0 and outside["update"] > 0
        # The step's CPU time holds its chunks' and the parts outside them.
        assert report["step_cpu_seconds"] >= report["cpu_seconds"] + report["outside_cpu_seconds"]["update"] - 1e-6
    assert first["outside_seconds"]["loss"] < last["outside_seconds"]["loss"]  # only the last computes it
