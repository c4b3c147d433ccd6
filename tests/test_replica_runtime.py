"""Replicated pipeline stages (a plan's `Stage.replicas` > 1) against one process: each microbatch's
samples are shared by the stage's replicas and their gradients summed, so losses and gradients match
the uncut model's (atol 1e-5), launched here, from the CLI, and under torchrun; bad combinations are one
line; a killed replica stops the run and leaves nothing behind.

The plans are built by hand: the planner choosing replicas is not what is tested here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from faults import run_placewise  # noqa: E402
from placewise.errors import PlacewiseError  # noqa: E402
from placewise.run.job import PipelineJob, prepare  # noqa: E402
from placewise.run.launcher import launch  # noqa: E402
from placewise.run.pipeline import pipeline_rank, run_single  # noqa: E402
from test_pipeline import PRELOAD, cut_before, even_mapping  # noqa: E402

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
ATOL = 1e-5
# Transformer cut between its blocks: what crosses is the activations, split by sample.
TRANSFORMER_CUT = "getattr_2"


def bnnet(batch_size: int = 8):
    """Batch normalisation mixes a microbatch's samples: a stage holding it cannot share them."""
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5)), (torch.randn(batch_size, 16),)


def job(name: str, replicas: tuple[int, ...], **kw) -> PipelineJob:
    mapping = cut_before(name, TRANSFORMER_CUT) if name == "transformer" else even_mapping(name, len(replicas))
    return PipelineJob(model=f"test_pipeline:{name}", batch_size=8, mapping=mapping, replicas=replicas,
                       microbatches=4, seed=3, **kw)


# (model, replicas per stage, schedule): the replicated stage last, first and in the middle.
CASES = [("mlp", (1, 2), "gpipe"), ("mlp", (2, 1), "1f1b"), ("transformer", (1, 2), "1f1b"),
         ("mlp", (1, 2, 1), "1f1b")]


@pytest.fixture(scope="module")
def pipelined():
    """Every replicated job of this module, in one launch of 4 processes (3-rank jobs leave one idle)."""
    jobs = [job(name, replicas, schedule=s, steps=3, collect=("grads",)) for name, replicas, s in CASES]
    jobs += [job("mlp", (2, 1), mode="infer", collect=("outputs",))]
    start = time.monotonic()
    results, failures = launch(pipeline_rank, 4, (jobs,), timeout_s=280, preload=PRELOAD)
    assert not failures
    print(f"replicated jobs: {time.monotonic() - start:.1f} s")
    return [[r[i] for r in results] for i in range(len(jobs))]


def reference(name: str, **kw) -> dict:
    """The uncut model in this process on the same batches and microbatches."""
    return run_single(replace(job(name, (1,)), mapping={}, replicas=(), **kw))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_replicated_stage_trains_like_one_process(pipelined, case):
    name, replicas, _ = CASES[case]
    ranks = pipelined[case]
    expected = reference(name, steps=3, collect=("grads",))
    last_lead = sum(replicas) - replicas[-1]
    # Step 0's loss, then after one and two SGD updates of every replica.
    assert ranks[last_lead]["losses"] == pytest.approx(expected["losses"], abs=ATOL)
    start = 0
    for s, r in enumerate(replicas):
        stage = ranks[start:start + r]
        start += r
        assert [rank["stage"] for rank in stage] == [s] * r
        # Every replica holds the whole stage's gradient (summed over the replicas' shares).
        for rank in stage:
            assert rank["grads"], f"stage {s} has no gradients"
            for key, grad in rank["grads"].items():
                torch.testing.assert_close(grad, expected["grads"][key], atol=ATOL, rtol=1e-4,
                                           msg=f"{name} {replicas}: gradient of {key} on stage {s}")
    leads = [ranks[sum(replicas[:s])] for s in range(len(replicas))]
    assert set().union(*(rank["grads"] for rank in leads)) == expected["grads"].keys()
    assert [rank["replicas"] for rank in leads] == list(replicas)
    assert all(rank is None for rank in ranks[sum(replicas):])
    # A replicated stage's lead times its step-end all-reduce, once per timed step on its timeline.
    for lead, r in zip(leads, replicas):
        allreduces = [e for e in lead["events"] if e[0] == "allreduce"]
        assert len(allreduces) == (len(lead["step_seconds"]) if r > 1 else 0)
        assert (lead["outside_seconds"]["allreduce"] > 0) == (r > 1)


def test_replicated_first_stage_infers_like_one_process(pipelined):
    ranks = pipelined[len(CASES)]
    expected = reference("mlp", mode="infer", collect=("outputs",))
    torch.testing.assert_close(ranks[2]["outputs"], expected["outputs"], atol=ATOL, rtol=ATOL)


# ---- one line for what cannot run --------------------------------------------------------------------
def test_bad_replica_combinations_are_one_line():
    with pytest.raises(PlacewiseError, match=r"microbatches of 2 samples, which stage 1's 3 replicas .* multiple of 3"):
        job("mlp", (1, 3)).check()
    with pytest.raises(PlacewiseError, match="--fuse backward .* stage 1 has 2 replicas.*use --fuse none"):
        job("mlp", (1, 2), fuse="backward").check()
    with pytest.raises(PlacewiseError, match="2 replica counts for 3 stages"):
        replace(job("mlp", (1, 2, 1)), replicas=(1, 2)).check()
    # A stage that receives shapes (the attention's reshape sizes) cannot share its samples.
    shapes = replace(job("transformer", (1, 2)), mapping=cut_before("transformer", "floordiv"))
    with pytest.raises(PlacewiseError, match="stage 1 has 2 replicas.* is not split by sample; move the cut"):
        prepare(shapes)
    gm_nodes = ["_0", "_1", "_2", "_3"]
    batchnorm = PipelineJob(model="test_replica_runtime:bnnet", batch_size=8, microbatches=4,
                            mapping={n: int(i >= 1) for i, n in enumerate(gm_nodes)}, replicas=(1, 2))
    with pytest.raises(PlacewiseError, match="batch normalisation .* give that stage 1 replica"):
        prepare(batchnorm)


def test_torchrun_with_too_few_processes_for_the_replicas_is_one_line(monkeypatch):
    from placewise.run.pipeline import run_pipeline
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PlacewiseError, match="torchrun started 2 processes but the plan has 2 stages with 3 "
                                             "replicas in all; start 3"):
        run_pipeline(job("mlp", (1, 2)))


def replicated_plan(tmp_path: Path, replicas: tuple[int, ...]) -> Path:
    """A placewise plan (what `placewise plan` writes) of the MLP's even cut, with these replicas."""
    from placewise.plan.plan import Plan, Stage
    mapping = even_mapping("mlp", len(replicas))
    stages, device = [], 0
    for s, r in enumerate(replicas):
        stages.append(Stage("cpu", device, False, [], 1.0, 1.0, 0.0, 0.0,
                            [n for n, i in mapping.items() if i == s], replicas=r))
        device += r
    path = tmp_path / "plan.json"
    Plan(stages=stages, max_load=1.0, latency=None, solver="test", seconds=0.0).save(path)
    return path


def test_the_cli_names_the_plan_and_the_flag_that_do_not_fit(tmp_path, capsys):
    from placewise.cli import main
    plan = replicated_plan(tmp_path, (1, 2))
    assert main(["train", "test_pipeline:mlp", "--plan", str(plan), "--workers", "2", "--mode", "async"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"placewise: error: --mode async with --plan {plan}: its stage 1 has 2 replicas, which only a "
                   "single pipeline runs (data-parallel workers run each stage once); drop --workers/--mode, or "
                   "plan without replicas")
    assert main(["train", "test_pipeline:mlp", "--plan", str(plan), "--batch-size", "12", "--microbatches", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"stage 1's 2 replicas ({plan}) cannot share equally" in err, err


# ---- the CLI, here and under torchrun ----------------------------------------------------------------
CLI = ["--batch-size", "8", "--microbatches", "4", "--steps", "2", "--seed", "3", "--json"]


@pytest.mark.timeout(300)
def test_train_runs_a_replicated_plan_from_the_cli(tmp_path):
    plan = replicated_plan(tmp_path, (1, 2))
    out = run_placewise(["train", "test_pipeline:mlp", "--plan", str(plan), *CLI], timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    # The CLI's defaults: one warm-up step, then --steps, SGD with momentum 0.9.
    expected = run_single(replace(job("mlp", (1,)), mapping={}, replicas=(), steps=2, warmup=1, momentum=0.9))
    assert report["losses"] == pytest.approx(expected["losses"], abs=ATOL)
    assert [(row["stage"], row["replicas"], row["device"]) for row in report["stages"]] == [(0, 1, "cpu:0"),
                                                                                           (1, 2, "cpu:1 x2")]
    assert not out.left, out.left


def test_a_killed_replica_stops_the_run_and_leaves_nothing(tmp_path):
    plan = replicated_plan(tmp_path, (1, 2))
    out = run_placewise(["train", "test_pipeline:mlp", "--plan", str(plan), *CLI[:-1], "--steps", "1000"],
                        fail_at="2@2", timeout=240)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "placewise: error: rank 2 failed: process exited with code -9"
    assert not out.left, out.left


TORCHRUN_SCRIPT = '''
import sys
import torch
sys.path.insert(0, {tests!r})
from test_replica_runtime import job
from placewise.run.pipeline import run_pipeline

if __name__ == "__main__":
    reports = run_pipeline(job("mlp", (1, 2), schedule="1f1b", steps=3, collect=("grads",)))
    if reports is not None:  # rank 0: every stage lead's report
        torch.save(reports, "reports.pt")
'''


@pytest.mark.timeout(300)
def test_replicated_stage_under_torchrun_trains_like_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(HERE)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp_path)}  # torchrun leaves its log folder (torchelastic_*) in the temp dir
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                             str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"torchrun: {time.monotonic() - start:.1f} s")
    reports = torch.load(tmp_path / "reports.pt")
    expected = reference("mlp", steps=3, collect=("grads",))
    assert [r["replicas"] for r in reports] == [1, 2]
    assert reports[1]["losses"] == pytest.approx(expected["losses"], abs=ATOL)
    grads = {k: v for r in reports for k, v in r["grads"].items()}
    assert grads.keys() == expected["grads"].keys()
    for key, grad in expected["grads"].items():
        torch.testing.assert_close(grads[key], grad, atol=ATOL, rtol=1e-4, msg=f"gradient of {key}")
