"""Asynchronous data parallelism: parameter server, sync baseline, DDP, checkpoints, dead workers.

Each launch starts real processes talking gloo over 127.0.0.1, so the tests are few and each checks
a lot: the synchronous run also serves as the uninterrupted reference for the resume test.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from placewise.cli import main
from placewise.errors import PlacewiseError
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.model import build_model
from placewise.run.dataparallel.train import train_data_parallel
from placewise.run.data import BatchStream, digits
from placewise.run.dataparallel.checkpoint import load_checkpoint
from placewise.run.dataparallel.layout import shard_parameters
from placewise.run.dataparallel.protocol import CONTINUE, STOP, Kind
from placewise.run.dataparallel.server import ParameterServer, ServerSettings
from placewise.run.dataparallel.staleness import Staleness
from placewise.run.tasks import make_task
from replay import plain_sgd

TIMEOUT = 240.0
# 2 workers x 32 samples per synchronous round: 21 rounds per epoch of the 1347 training digits.
SYNC = dict(model="mlp", mode="sync", workers=2, epochs=8, batch_size=32, lr=0.05, momentum=0.9, seed=3,
            snapshot_every=50, timeout_s=TIMEOUT)


@pytest.mark.parametrize("transport", ["shared", "gloo"])
def test_one_worker_async_equals_plain_sgd(tmp_path, transport):
    ckpt = tmp_path / "one.pt"
    cfg = TrainConfig(model="mlp:32", mode="async", workers=1, steps=40, batch_size=32, lr=0.1, momentum=0.9,
                      seed=1, checkpoint=str(ckpt), checkpoint_every=40, timeout_s=TIMEOUT, transport=transport)
    report = train_data_parallel(cfg)
    losses, model, opt = plain_sgd(make_task(cfg.model, cfg.dataset, cfg.seed), 40, seed=cfg.seed, lr=cfg.lr,
                                   momentum=cfg.momentum, batch_size=cfg.batch_size, n_threads=cfg.threads)
    assert report.updates == 40 and [u["version"] for u in report.history] == list(range(1, 41))
    # Step for step: the same losses and, at the end, the same parameters and momentum buffers (bitwise).
    assert [u["loss"] for u in report.history] == losses
    assert all(u["staleness"] == 0 for u in report.history)
    state = load_checkpoint(ckpt, cfg.fingerprint(64, 10))
    for saved, p in zip(state["params"], model.parameters()):
        assert torch.equal(saved, p.detach())
    buffers = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in zip(buffers, model.parameters()))


def downpour_reference(cfg: TrainConfig) -> tuple[list[float], list[int], torch.nn.Module]:
    """One worker's Downpour schedule replayed in one process: a local copy of the model computes each
    minibatch's gradient; every n_push steps the mean of the accumulated gradients is applied to the
    server's copy by torch.optim.SGD, and every n_fetch steps the local copy takes the server's values.
    Returns the mean loss of each push, each push's staleness, and the server's model."""
    data = digits(seed=cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        server, local = (build_model(cfg.model, data.features, data.classes, cfg.seed) for _ in range(2))
        opt = torch.optim.SGD(server.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        stream = BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, worker=0)
        losses, staleness, version, fetched, loss_sum, samples, accumulated = [], [], 0, 0, 0.0, 0.0, 0
        step = 0
        while version < cfg.steps:
            x, y = stream.batch(step)
            loss = F.cross_entropy(local(x), y)
            loss.backward()
            loss_sum, samples, accumulated, step = loss_sum + loss.item() * len(y), samples + len(y), accumulated + 1, \
                step + 1
            if step % cfg.n_push == 0:
                for mine, theirs in zip(local.parameters(), server.parameters()):
                    theirs.grad = mine.grad.div_(accumulated) if accumulated > 1 else mine.grad
                opt.step()
                losses.append(loss_sum / samples)
                staleness.append(version - fetched)
                version += 1
                local.zero_grad(set_to_none=False)
                loss_sum, samples, accumulated = 0.0, 0.0, 0
            if step % cfg.n_fetch == 0:
                with torch.no_grad():
                    for mine, theirs in zip(local.parameters(), server.parameters()):
                        mine.copy_(theirs)
                fetched = version
    finally:
        torch.set_num_threads(threads)
    return losses, staleness, server


@pytest.mark.parametrize("n_push, n_fetch, transport", [(2, 2, "gloo"), (1, 3, "shared"), (2, 3, "shared")])
def test_push_and_fetch_intervals_follow_downpour(n_push, n_fetch, transport):
    # Accumulated gradients go up every n_push steps; between fetches the worker computes on stale values.
    cfg = TrainConfig(model="mlp:32", mode="async", workers=1, steps=18, batch_size=32, lr=0.1, momentum=0.9,
                      seed=2, n_push=n_push, n_fetch=n_fetch, timeout_s=TIMEOUT, transport=transport)
    report = train_data_parallel(cfg)
    losses, staleness, model = downpour_reference(cfg)
    assert [u["loss"] for u in report.history] == losses
    assert [u["staleness"] for u in report.history] == staleness and max(staleness) >= (n_fetch > n_push)
    for name, value in model.state_dict().items():
        assert torch.equal(report.final_state[name], value)


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("sync") / "sync.pt"
    cfg = TrainConfig(**SYNC, checkpoint=str(ckpt), checkpoint_every=50)
    return cfg, train_data_parallel(cfg)


@pytest.fixture(scope="module")
def ddp_run():
    # With forward-fused optimizer steps: the same mathematics, applied in the next forward.
    return train_data_parallel(TrainConfig(**{**SYNC, "mode": "ddp", "fuse": "forward"}))


def test_two_workers_reach_95_percent_async_sync_ddp(sync_run, ddp_run):
    cfg, sync = sync_run
    asyn = train_data_parallel(TrainConfig(**{**SYNC, "mode": "async", "epochs": 8}))
    for report in (asyn, sync, ddp_run):
        # Reached within 8 epochs (a snapshot at >= 95%), and not lost again by the end of the run.
        assert report.time_to_accuracy(0.95) is not None, (report.mode, report.curve)
        assert report.test_accuracy >= 0.93, (report.mode, report.curve)
        assert report.lost_workers == {}
    # 8 epochs: 1347 digits, 64 per synchronous round (ceil 168.4), 32 per asynchronous push (ceil 336.8).
    assert (sync.updates, ddp_run.updates, asyn.updates) == (169, 169, 337)
    # Both workers pushed, with staleness (the other worker's pushes in between) recorded per push.
    workers = {u["worker"] for u in asyn.history}
    assert workers == {1, 2} and asyn.max_staleness >= 1 and len(asyn.staleness) == 337
    # The sync server and DDP compute the same mathematics (mean gradient of the same two batches).
    sync_losses = [u["loss"] for u in sync.history]
    ddp_losses = [u["loss"] for u in ddp_run.history]
    assert sync_losses[:30] == pytest.approx(ddp_losses[:30], rel=1e-4, abs=1e-6)


def test_killed_run_resumes_from_checkpoint_step_for_step(sync_run, tmp_path):
    cfg, reference = sync_run
    ckpt = tmp_path / "killed.pt"
    killed = TrainConfig(**SYNC, checkpoint=str(ckpt), checkpoint_every=50, kill_rank=0, kill_at=120)
    # The server dies at update 120: the launcher restarts it from its checkpoint at 100, the workers
    # rejoin and go on from their steps there, so the run repeats the uninterrupted one step for step.
    recovered = train_data_parallel(killed)
    assert recovered.server_restarts == [{"died_at": 120, "resumed_at": 100, "lost_updates": 20}]
    assert recovered.resumed_from is None and recovered.updates == reference.updates
    assert [u["version"] for u in recovered.history] == list(range(1, reference.updates + 1))
    assert [u["loss"] for u in recovered.history] == [u["loss"] for u in reference.history]
    assert load_checkpoint(ckpt, cfg.fingerprint(64, 10))["version"] == 150  # the last one of the run
    resumed = train_data_parallel(TrainConfig(**SYNC, resume=str(ckpt)))
    assert resumed.resumed_from == 150 and resumed.updates == reference.updates
    assert [u["version"] for u in resumed.history] == list(range(1, reference.updates + 1))
    # Every loss after the checkpoint equals the uninterrupted run's (same floating-point operations).
    assert [u["loss"] for u in resumed.history[150:]] == [u["loss"] for u in reference.history[150:]]
    assert resumed.test_accuracy == reference.test_accuracy


def shared_folders() -> set[str]:
    """The shared transport's buffer folders that exist now."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return {p.name for p in base.glob("placewise-server-*")}


def test_dead_worker_does_not_stop_the_run():
    # Two server shards (ranks 0, 1), workers are ranks 2 and 3; rank 3 dies at its 15th step.
    cfg = TrainConfig(mode="async", workers=2, servers=2, steps=300, staleness="bound:2", seed=5,
                      snapshot_every=100, kill_rank=3, kill_at=15, timeout_s=TIMEOUT, transport="shared")
    before = shared_folders()
    report = train_data_parallel(cfg)
    assert shared_folders() <= before  # the killed worker's buffers went with the run's folder
    assert report.updates == 300 and list(report.lost_workers) == [3]
    pushes = {w: sum(u["worker"] == w for u in report.history) for w in (2, 3)}
    assert pushes[3] <= 15 and pushes[2] >= 285  # the survivor carried the run
    # SSP bound 2: a push is at most (W-1)(2S+1) updates stale; the dead worker held nobody back.
    assert report.max_staleness <= 5
    assert report.test_accuracy >= 0.9


@pytest.mark.parametrize("argv, words", [
    (["--n-push", "0"], "--n-push 0"),
    (["--workers", "1000"], "--workers 1000"),
    (["--workers", "0"], "--workers 0"),
    (["--plan", "no-such-plan.json"], "no-such-plan.json: no such plan file"),
    (["--staleness", "sometimes"], "--staleness"),
    (["--fuse", "backward"], "does not apply"),
    (["--mode", "ddp", "--fuse", "backward"], "use --fuse forward"),
    (["--mode", "sync", "--staleness", "lr"], "async only"),
    (["--servers", "9"], "--servers 9"),
    (["--resume", "no-such-checkpoint.pt"], "checkpoint not found"),
])
def test_bad_settings_exit_2_with_one_line(capsys, argv, words):
    assert main(["train", "mlp", "--workers", "2", "--mode", "async", "--steps", "5", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("placewise: error:") and "\n" not in err and words in err


class RecordingServer(ParameterServer):
    """The serving logic without a process group: replies are recorded instead of sent."""

    def __init__(self, mode: str, staleness: str = "none", steps: int = 100) -> None:
        super().__init__(0, 1, [torch.zeros(3)], [1, 2], ServerSettings(mode=mode, steps=steps, lr=0.5, momentum=0.0,
                                                                         staleness=Staleness.parse(staleness)))
        self.replies: list[tuple[int, float, int]] = []
        self.steps = {1: 0, 2: 0}

    def _reply(self, worker, status, fetch=False, start_step=0):
        self.replies.append((worker, status, self.version))

    def push(self, worker: int, grad: float, fetched_version: int, step: int | None = None) -> None:
        """Worker's next step (or `step`) with gradient `grad`, computed on the parameters of `fetched_version`."""
        self.steps[worker] = self.steps[worker] + 1 if step is None else step
        self.payload[worker].fill_(grad)
        self._handle(worker, torch.tensor([Kind.PUSH_FETCH, self.steps[worker], fetched_version, 1.0, 1.0, 1.0],
                                          dtype=torch.float64))


def test_shared_transport_needs_room_for_its_buffers(monkeypatch):
    from placewise.run.dataparallel import shared
    usage = shutil.disk_usage
    monkeypatch.setattr(shared.shutil, "disk_usage", lambda path: usage(path)._replace(free=10 << 20))
    with shared.shared_folder(TrainConfig(steps=5), needed=4 << 20) as folder:
        assert folder is not None and Path(folder).is_dir()  # 4 MiB fit twice into 10 MiB
    assert not Path(folder).exists()
    with shared.shared_folder(TrainConfig(steps=5), needed=6 << 20) as folder:
        assert folder is None  # auto falls back to gloo
    with pytest.raises(PlacewiseError, match=r"needs 6 MiB in .*, which has 10 MiB free; .* --transport gloo"):
        with shared.shared_folder(TrainConfig(steps=5, transport="shared"), needed=6 << 20):
            pass


def test_staleness_picture_takes_a_stage_without_pushes(tmp_path):
    # A pipeline stage without parameters has no server, so no pushes: its histogram is empty.
    from placewise.pictures import plot_staleness
    path = plot_staleness({"stage 0": [0, 1, 1, 2], "stage 1": []}, tmp_path / "staleness.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_transport_is_one_line():
    with pytest.raises(PlacewiseError, match=r"^--transport 'pigeon': use one of auto, shared, gloo$"):
        TrainConfig(steps=5, transport="pigeon").validate()


def test_server_staleness_policies_and_sync_rounds_in_process():
    # lr / staleness: pushes of gradient 1 with staleness 0, 1 and 2 move the parameters by 0.5, 0.5 and 0.25.
    s = RecordingServer("async", "lr")
    for worker, fetched in ((1, 0), (2, 0), (1, 0)):
        s.push(worker, 1.0, fetched)
    assert [u.staleness for u in s.history] == [0, 1, 2]
    assert s.flat.tolist() == pytest.approx([-(0.5 + 0.5 + 0.25)] * 3)
    # bound:1 (SSP): worker 1 may run one push ahead of worker 2, not two; a dead worker 2 releases it.
    s = RecordingServer("async", "bound:1")
    s.push(1, 1.0, 0)
    s.push(1, 1.0, 1)
    assert s.replies == [(1, CONTINUE, 1)]  # the second push is applied but its reply waits
    s.push(2, 1.0, 0)
    assert sorted(s.replies[1:]) == [(1, CONTINUE, 3), (2, CONTINUE, 3)]
    s.push(1, 1.0, 3)  # clocks 3 and 1: worker 1 waits again
    assert len(s.replies) == 3
    s._drop(2, "connection closed")
    assert s.replies[-1] == (1, CONTINUE, 4) and s.lost == {2: "connection closed"}
    # sync: one step per round with the mean gradient; a worker that dies mid-round does not block it.
    s = RecordingServer("sync", steps=2)
    s.push(2, 3.0, 0)
    assert s.version == 0 and s.replies == []
    s.push(1, 1.0, 0)
    assert s.version == 1 and s.flat.tolist() == [-1.0] * 3 and sorted(s.replies) == [(1, CONTINUE, 1), (2, CONTINUE, 1)]
    s.push(1, 1.0, 1)
    s._drop(2, "gone")
    assert s.version == 2 and s.flat.tolist() == [-1.5] * 3 and s.replies[-1] == (1, STOP, 2) and not s.active


def test_async_server_applies_each_step_of_a_worker_once():
    # A resumed pipeline's stages go on from their least advanced server's step: the others skip what they applied.
    s = RecordingServer("async")
    s.push(1, 1.0, 0)
    s.push(1, 1.0, 1)
    s.push(1, 5.0, 2, step=2)  # step 2 again: answered with the parameters, not applied
    assert s.version == 2 and s.flat.tolist() == [-1.0] * 3 and s.replies[-1] == (1, CONTINUE, 2)
    s.push(1, 1.0, 2, step=3)
    assert s.version == 3 and s.worker_steps == {1: 3}


@pytest.mark.parametrize("sizes, servers", [([5, 1, 9, 3, 3], 1), ([5, 1, 9, 3, 3], 3), ([5, 1, 9, 3, 3], 5), ([7], 1)])
def test_shards_hold_every_tensor_once(sizes, servers):
    shards = shard_parameters(sizes, servers)
    assert sorted(i for shard in shards for i in shard) == list(range(len(sizes))) and all(shards)
    with pytest.raises(PlacewiseError):
        shard_parameters(sizes, len(sizes) + 1)
