"""The parameter server with staleness compensation and backup workers, on models beyond the MLP, each run
compared bitwise with its in-process replay (`replay.py`): the server records the order it applied the
pushes in, the replay recomputes every gradient and update from that order alone."""

from __future__ import annotations

import json

import pytest
import torch

from placewise.cli import main
from placewise.run.compensation import DcAsgdOptions, DelayCompensation, GapAware, GapAwareOptions
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.protocol import Kind
from placewise.run.dataparallel.server import ParameterServer, ServerSettings
from placewise.run.dataparallel.train import train_data_parallel
from placewise.run.tasks import make_task
from replay import Push, plain_sgd, replay_async, replay_sync

TIMEOUT = 240.0
CNN = dict(model="cnn:8x16", dataset="digits", batch_size=32, lr=0.1, momentum=0.9, seed=6, timeout_s=TIMEOUT)
SETTINGS = dict(seed=6, lr=0.1, momentum=0.9, batch_size=32)


@pytest.fixture(scope="module")
def cnn_task():
    return make_task("cnn:8x16", "digits", seed=6)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_cnn_worker_through_the_server_is_plain_sgd(cnn_task):
    report = train_data_parallel(TrainConfig(**CNN, mode="async", workers=1, steps=25))
    losses, model, _ = plain_sgd(cnn_task, 25, **SETTINGS)
    assert [u["loss"] for u in report.history] == losses
    assert same_state(report.final_state, model.state_dict())


POLICIES = {
    "dc-asgd": (dict(staleness="dc-asgd", dc_asgd=DcAsgdOptions(lam=0.5)),
                lambda flat, workers: DelayCompensation(flat, workers, DcAsgdOptions(lam=0.5))),
    "dc-asgd-a": (dict(staleness="dc-asgd", dc_asgd=DcAsgdOptions(lam=2.0, meansquare=0.95)),
                  lambda flat, workers: DelayCompensation(flat, workers, DcAsgdOptions(lam=2.0, meansquare=0.95))),
    "gap-aware": (dict(staleness="gap-aware", gap_aware=GapAwareOptions(decay=0.9)),
                  lambda flat, workers: GapAware(flat, workers, GapAwareOptions(decay=0.9))),
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_compensated_async_run_is_its_replay(cnn_task, policy):
    settings, make = POLICIES[policy]
    report = train_data_parallel(TrainConfig(**CNN, mode="async", workers=2, steps=30, **settings))
    # Rank 0 is the server, so worker w (0-based, its batch stream) is rank w + 1.
    pushes = [Push(u["pushes"][0][0] - 1, u["pushes"][0][1], u["staleness"]) for u in report.history]
    assert {p.worker for p in pushes} == {0, 1} and max(p.staleness for p in pushes) >= 1
    replay = replay_async(cnn_task, pushes, policy=make, **SETTINGS)
    assert [u["loss"] for u in report.history] == replay.losses
    assert same_state(report.final_state, replay.state())
    # The compensation did something: the same pushes without it end elsewhere.
    assert not same_state(replay.state(), replay_async(cnn_task, pushes, **SETTINGS).state())


def test_lr_scaled_async_run_is_its_replay(cnn_task):
    report = train_data_parallel(TrainConfig(**CNN, mode="async", workers=3, steps=24, staleness="lr"))
    pushes = [Push(u["pushes"][0][0] - 1, u["pushes"][0][1], u["staleness"]) for u in report.history]
    replay = replay_async(cnn_task, pushes, lr_scaling=True, **SETTINGS)
    assert [u["loss"] for u in report.history] == replay.losses
    assert same_state(report.final_state, replay.state())


def test_sync_with_a_backup_worker_is_its_replay(cnn_task):
    # Three workers, one backup: every round takes the first two gradients and drops the third.
    report = train_data_parallel(TrainConfig(**CNN, mode="sync", workers=3, backup_workers=1, steps=12))
    rounds = [[(w - 1, step) for w, step in u["pushes"]] for u in report.history]
    assert all(len(members) == 2 for members in rounds) and len(rounds) == 12 and report.dropped <= 12
    replay = replay_sync(cnn_task, rounds, **SETTINGS)
    assert [u["loss"] for u in report.history] == replay.losses
    assert same_state(report.final_state, replay.state())


def test_gpt2_config_trains_async_from_the_command_line(capsys):
    assert main(["train", "gpt2-tiny", "--workers", "2", "--mode", "async", "--steps", "6", "--dataset", "synthetic",
                 "--input-shape", "16", "--batch-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "gpt2-tiny" and report["updates"] == 6 and 0.0 <= report["test_accuracy"] <= 1.0


@pytest.mark.parametrize("argv, words", [
    (["mlp", "--mode", "async", "--backup-workers", "1"], "applies to --mode sync only"),
    (["mlp", "--mode", "sync", "--backup-workers", "2"], "--backup-workers 2: use 0..1"),
    (["mlp", "--staleness", "dc-asgd", "--dc-lambda", "-1"], "--dc-lambda -1.0"),
    (["mlp", "--staleness", "gap-aware", "--gap-decay", "1.5"], "--gap-decay 1.5"),
    (["mlp", "--mode", "sync", "--staleness", "gap-aware"], "async only"),
    (["gpt2-tiny", "--dataset", "digits"], "--dataset digits needs a classifier"),
])
def test_bad_policy_settings_exit_2_with_one_line(capsys, argv, words):
    assert main(["train", *argv[:1], "--workers", "2", "--steps", "5", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("placewise: error:") and "\n" not in err and words in err


class Recording(ParameterServer):
    """The serving logic without a process group: replies are recorded instead of sent."""

    def __init__(self, workers: list[int], **settings) -> None:
        super().__init__(0, 1, [torch.zeros(2)], workers, ServerSettings(mode="sync", steps=10, lr=1.0, momentum=0.0,
                                                                         **settings))
        self.replies: list[tuple[int, int, bool]] = []

    def _reply(self, worker, status, fetch=False, start_step=0):
        self.replies.append((worker, self.version, fetch))

    def push(self, worker: int, grad: float, step: int, fetched: int) -> None:
        self.payload[worker].fill_(grad)
        self._handle(worker, torch.tensor([Kind.PUSH_FETCH, step, fetched, 1.0, 1.0, 1.0], dtype=torch.float64))


def test_backup_worker_round_closes_without_the_slowest_and_drops_its_late_push():
    s = Recording([1, 2, 3], backup_workers=1)
    s.push(3, 4.0, 1, 0)
    s.push(1, 2.0, 1, 0)  # two of three: the round closes with the mean of 4 and 2
    assert s.version == 1 and s.flat.tolist() == [-3.0, -3.0] and sorted(s.replies) == [(1, 1, True), (3, 1, True)]
    assert s.history[-1].pushes == [(1, 1), (3, 1)]
    s.push(2, 100.0, 1, 0)  # computed on the parameters of update 0: dropped, and worker 2 takes the new ones
    assert s.version == 1 and s.dropped == 1 and s.replies[-1] == (2, 1, True) and s.worker_steps[2] == 1
    s.push(2, 1.0, 2, 1)
    s._drop(1, "gone")  # a dead worker uses up the backup: worker 2 alone no longer closes a round of two...
    assert s.version == 1
    s.push(3, 3.0, 2, 1)  # ...but with worker 3 it does
    assert s.version == 2 and s.flat.tolist() == [-5.0, -5.0]
