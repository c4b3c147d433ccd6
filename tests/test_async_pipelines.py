"""Pipelines as parameter-server workers (Downpour: model parallelism inside, data parallelism across).

Each run starts real processes (server shards per stage, one process per stage of every pipeline)
talking gloo over 127.0.0.1; every run is started once and checked for several things. References
run in this process on the uncut model, with the same batches split into the same microbatches.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from placewise.cli import main
from placewise.errors import PlacewiseError
from placewise.plan.plan import Plan, Stage
from placewise.run.dataparallel.checkpoint import load_checkpoint
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.model import build_model
from placewise.run.dataparallel.train import train_data_parallel
from placewise.run.data import BatchStream, digits
from placewise.run.cut import trace

pytestmark = pytest.mark.torch
TIMEOUT = 120.0


def nodes(spec: str) -> list[str]:
    """The fx nodes of the data-parallel MLP `spec` that a plan names (what `placewise profile` lists)."""
    model = build_model(spec, 64, 10, 0)
    return [n.name for n in trace(model, (torch.zeros(2, 64),)).graph.nodes if n.op == "call_module"]


def mapping(spec: str, first_of_stage_1: str) -> dict[str, int]:
    """Two stages, the second starting at the named node."""
    names = nodes(spec)
    start = names.index(first_of_stage_1)
    return {name: int(i >= start) for i, name in enumerate(names)}


def reference(cfg: TrainConfig, rounds: int) -> tuple[list[float], torch.nn.Module]:
    """Plain SGD in this process, no server: per round, the mean over the workers of each worker's batch
    gradient, each batch in `cfg.microbatches` microbatches whose losses are divided by their count
    (the pipeline's arithmetic; for one worker, the pipeline trained on its own)."""
    data = digits(seed=cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # the stages compute with this many threads
    try:
        model = build_model(cfg.model, data.features, data.classes, cfg.seed)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        streams = [BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, w) for w in range(cfg.workers)]
        losses = []
        for step in range(rounds):
            total = [torch.zeros_like(p) for p in params]
            loss_sum = 0.0
            for stream in streams:
                opt.zero_grad()
                x, y = stream.batch(step)
                parts = []
                for xm, ym in zip(x.chunk(cfg.microbatches), y.chunk(cfg.microbatches)):
                    loss = F.cross_entropy(model(xm), ym) / cfg.microbatches
                    loss.backward()
                    parts.append(loss.detach())
                loss_sum += float(torch.stack(parts).sum()) * len(y)
                for t, p in zip(total, params):
                    t.add_(p.grad)
            for t, p in zip(total, params):
                p.grad = t / len(streams) if len(streams) > 1 else t
            opt.step()
            losses.append(loss_sum / (cfg.batch_size * len(streams)))
    finally:
        torch.set_num_threads(threads)
    return losses, model


def assert_same_training(report, cfg: TrainConfig, rounds: int) -> None:
    losses, model = reference(cfg, rounds)
    assert report.updates == rounds and [u["version"] for u in report.history] == list(range(1, rounds + 1))
    # Step for step: the losses the last stage measured (pushed by every stage), and the final parameters.
    assert [u["loss"] for u in report.history] == pytest.approx(losses, rel=1e-6, abs=1e-7)
    assert report.final_state.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(report.final_state[name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.timeout(180)
def test_one_pipeline_worker_async_equals_plain_sgd():
    # mlp:32x32 is Linear, ReLU, Linear, ReLU, Linear: stage 0 has the first two layers, stage 1 the last.
    cfg = TrainConfig(model="mlp:32x32", mode="async", workers=1, steps=30, batch_size=32, lr=0.1, momentum=0.9,
                      seed=1, mapping=mapping("mlp:32x32", "_3"), microbatches=4, schedule="1f1b",
                      timeout_s=TIMEOUT)
    report = train_data_parallel(cfg)
    assert report.stages == 2 and report.worker_ranks == [[2, 3]] and report.servers == 2
    # Each stage's server applied each of the 30 pushes of that stage, none of them stale.
    assert report.stage_staleness == [[0] * 30, [0] * 30]
    assert_same_training(report, cfg, 30)


@pytest.mark.timeout(180)
def test_two_pipelines_sync_average_their_gradients_like_plain_sgd():
    # Every round averages one push of each pipeline, stage by stage: the mean gradient of the two batches.
    cfg = TrainConfig(model="mlp:32x32", mode="sync", workers=2, steps=20, batch_size=32, lr=0.1, momentum=0.9,
                      seed=2, mapping=mapping("mlp:32x32", "_2"), microbatches=2, schedule="gpipe",
                      timeout_s=TIMEOUT)
    report = train_data_parallel(cfg)
    assert report.worker_ranks == [[2, 3], [4, 5]] and report.lost_workers == {}
    assert all(u["worker"] == -1 and u["staleness"] == 0 for u in report.history)
    assert_same_training(report, cfg, 20)


@pytest.mark.timeout(180)
def test_two_pipeline_workers_reach_95_percent_async():
    # 2 pipelines x 2 stages, 8 epochs of digits: 32 samples per push, ceil(8 * 1347 / 32) = 337 pushes per stage.
    cfg = TrainConfig(model="mlp", mode="async", workers=2, epochs=8, batch_size=32, lr=0.05, momentum=0.9, seed=3,
                      snapshot_every=25, mapping=mapping("mlp", "_2"), microbatches=4, timeout_s=TIMEOUT)
    report = train_data_parallel(cfg)
    print(f"2 pipelines x 2 stages, async: {report.seconds:.1f} s serving, {report.updates_per_s:.1f} updates/s, "
          f"test accuracy {report.test_accuracy:.4f}, first >= 95% at {report.time_to_accuracy(0.95)} s, "
          f"staleness mean {report.mean_staleness:.2f} max {report.max_staleness}")
    assert report.time_to_accuracy(0.95) is not None, report.curve
    assert report.test_accuracy >= 0.93 and report.lost_workers == {}
    assert report.updates == 337
    # Both pipelines pushed to both stages' servers; every push has its staleness, some of them stale.
    assert report.worker_ranks == [[2, 3], [4, 5]]
    assert {u["worker"] for u in report.history} == {2, 4}  # server 0 serves the first stages
    assert [len(values) for values in report.stage_staleness] == [337, 337]
    assert all(max(values) >= 1 for values in report.stage_staleness)
    # The last stage's loss reaches every stage's server: the record shows the training loss falling.
    first, last = (sum(u["loss"] for u in part) / len(part) for part in (report.history[:20], report.history[-20:]))
    assert last < first / 3


# ---- bad settings: one line, exit 2, before any process starts ------------------------------------
def write_plan(path, stages: list[list[str]]):
    plan_stages = [Stage("cpu", s, False, [], 1.0, 1.0, 0.0, 0.0, names) for s, names in enumerate(stages)]
    Plan(stages=plan_stages, max_load=1.0, latency=None, solver="test", seconds=0.0).save(path)
    return str(path)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    return {"good": write_plan(d / "good.json", [["_0", "_1"], ["_2"]]),
            "other model": write_plan(d / "other.json", [["_0", "_1"], ["_2", "_3", "_4"]]),
            "backwards": write_plan(d / "backwards.json", [["_2"], ["_0", "_1"]])}


@pytest.mark.parametrize("plan, argv, words", [
    ("other model", [], "the plan names 2 node(s) the traced model lacks"),
    ("backwards", [], "not contiguous"),
    ("good", ["--workers", "40"], "needs 82 processes"),
    ("good", ["--mode", "ddp", "--checkpoint", "c.pt", "--checkpoint-every", "5"], "not supported yet for --mode ddp"),
    ("good", ["--microbatches", "1"], "fewer than the plan's 2 stages"),
    ("good", ["--batch-size", "30"], "does not split into 4"),
    ("good", ["--fuse", "backward"], "does not apply"),
    ("good", ["--servers", "3"], "stage 0 of the plan holds 2 parameter tensor(s)"),
])
def test_bad_pipeline_settings_exit_2_with_one_line(capsys, plans, plan, argv, words):
    assert main(["train", "mlp", "--plan", plans[plan], "--workers", "2", "--mode", "async", "--steps", "5",
                 *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("placewise: error:") and "\n" not in err and words in err, err


def _killed_at_update_15(base: dict, ckpt) -> None:
    """`base` run with checkpoints every 10 updates until its server (rank 1) is killed at update 15."""
    with pytest.raises(PlacewiseError, match=r"rank 1 \(the parameter server\) failed"):
        train_data_parallel(TrainConfig(**base, checkpoint=str(ckpt), checkpoint_every=10, kill_rank=1, kill_at=15))


@pytest.mark.timeout(300)
def test_sync_pipelines_resume_from_their_stage_checkpoints(tmp_path):
    # Every stage server saves after the same rounds, so its files together are one state of the run.
    base = dict(model="mlp:32x32", mode="sync", workers=2, steps=24, batch_size=32, lr=0.1, momentum=0.9, seed=4,
                mapping=mapping("mlp:32x32", "_2"), microbatches=2, timeout_s=TIMEOUT)
    reference = train_data_parallel(TrainConfig(**base))
    ckpt = tmp_path / "pipes.pt"
    # Rank 1 is a stage's server; only a single server shard is restarted, so the run stops.
    _killed_at_update_15(base, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipes.pt.shard0", "pipes.pt.shard1"]
    resumed = train_data_parallel(TrainConfig(**base, resume=str(ckpt)))
    assert resumed.resumed_from == 10 and resumed.updates == 24
    assert [u["loss"] for u in resumed.history[10:]] == [u["loss"] for u in reference.history[10:]]
    assert all(torch.equal(resumed.final_state[k], v) for k, v in reference.final_state.items())


@pytest.mark.timeout(300)
def test_one_async_pipeline_resumes_step_for_step(tmp_path):
    # One pipeline: every stage server applies its pushes in step order, so the run is deterministic and a
    # resumed run repeats the uninterrupted one from the checkpoint on, bit for bit.
    base = dict(model="mlp:32x32", mode="async", workers=1, steps=24, batch_size=32, lr=0.1, momentum=0.9, seed=4,
                mapping=mapping("mlp:32x32", "_2"), microbatches=2, timeout_s=TIMEOUT)
    reference = train_data_parallel(TrainConfig(**base))
    ckpt = tmp_path / "pipe.pt"
    _killed_at_update_15(base, ckpt)
    resumed = train_data_parallel(TrainConfig(**base, resume=str(ckpt)))
    assert resumed.resumed_from == 10 and resumed.updates == 24
    assert [u["loss"] for u in resumed.history] == [u["loss"] for u in reference.history]
    assert all(torch.equal(resumed.final_state[k], v) for k, v in reference.final_state.items())


@pytest.mark.timeout(300)
def test_two_async_pipelines_resume_applying_every_step_once(tmp_path):
    # Two pipelines: each stage server applies pushes in its own order and saves at its own moment, so the
    # servers' checkpoints may hold different steps of a pipeline. On resume the pipeline goes on from its least
    # advanced server's step and the other servers skip what they applied: every server's record, through
    # the kill and the resume, holds each step of each pipeline exactly once.
    base = dict(model="mlp:32x32", mode="async", workers=2, steps=40, batch_size=32, lr=0.05, momentum=0.9, seed=4,
                mapping=mapping("mlp:32x32", "_2"), microbatches=2, timeout_s=TIMEOUT)
    ckpt = tmp_path / "pipes.pt"
    with pytest.raises(PlacewiseError, match=r"rank 1 \(the parameter server\) failed"):
        train_data_parallel(TrainConfig(**base, checkpoint=str(ckpt), checkpoint_every=10, kill_rank=1, kill_at=25))
    resumed = train_data_parallel(TrainConfig(**base, checkpoint=str(ckpt), checkpoint_every=10, resume=str(ckpt)))
    assert resumed.updates == 40 and resumed.lost_workers == {}
    fingerprint = TrainConfig(**base).fingerprint(64, 10)
    for shard, ranks in ((0, (2, 4)), (1, (3, 5))):  # stage 0's server serves ranks 2 and 4, stage 1's 3 and 5
        history = load_checkpoint(tmp_path / f"pipes.pt.shard{shard}", fingerprint)["history"]
        assert [u["version"] for u in history] == list(range(1, 41))
        for rank in ranks:
            steps = [step for u in history for w, step in u["pushes"] if w == rank]
            assert steps == list(range(1, len(steps) + 1)), (shard, rank, steps)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fuse", ["none", "forward"])
def test_two_pipelines_ddp_average_their_gradients_like_plain_sgd(fuse):
    # One all-reduce group per stage: each stage's gradients averaged over the pipelines, then its own step
    # (forward-fused: applied in the next forward, flushed for the snapshots).
    cfg = TrainConfig(model="mlp:32x32", mode="ddp", workers=2, steps=12, batch_size=32, lr=0.1, momentum=0.9,
                      seed=2, mapping=mapping("mlp:32x32", "_2"), microbatches=2, schedule="gpipe", fuse=fuse,
                      timeout_s=TIMEOUT)
    report = train_data_parallel(cfg)
    assert report.stages == 2 and report.lost_workers == {}
    assert all(u["worker"] == -1 and u["staleness"] == 0 for u in report.history)
    assert_same_training(report, cfg, 12)
