"""Staleness compensation (DC-ASGD, gap-aware), backup workers, and the in-process replays of runs."""

from __future__ import annotations

import pytest
import torch

from placewise.errors import PlacewiseError
from placewise.run.compensation import (BackupWorkers, DcAsgdOptions, DelayCompensation, GapAware, GapAwareOptions,
                                        adaptive_lambda, delay_compensated, gap_penalised)
from placewise.run.tasks import make_task
from replay import Push, plain_sgd, replay_async, replay_sync

SETTINGS = dict(seed=4, lr=0.1, momentum=0.9, batch_size=32)


def test_delay_compensation_is_zheng_et_al_formula():
    g, now, stale = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -1.0]), torch.tensor([0.1, 0.4, -1.0])
    out = delay_compensated(g, now, stale, 0.5)
    assert out.tolist() == pytest.approx([1.0 + 0.5 * 1 * 0.2, -2.0 + 0.5 * 4 * -0.3, 0.5])
    assert torch.equal(g, torch.tensor([1.0, -2.0, 0.5]))  # the gradient itself is left alone
    # Per-parameter lambda of DC-ASGD-a: lambda_0 / sqrt(MeanSquare + eps).
    lam = adaptive_lambda(2.0, torch.tensor([4.0, 1.0, 0.25]), 0.0)
    assert lam.tolist() == pytest.approx([1.0, 2.0, 4.0])


def test_delay_compensation_recovers_the_fresh_gradient_when_lambda_matches_the_curvature():
    # Loss sum(a * w**2 / 2): g(w) = a * w, Hessian diag a. With lambda * g_stale**2 = a the Taylor term is exact.
    a = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    stale, now = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), torch.tensor([0.8, -0.1, 1.5], dtype=torch.float64)
    g = a * stale
    lam = a / (g * g)
    assert torch.allclose(delay_compensated(g, now, stale, lam), a * now)


def test_gap_penalty_divides_by_one_plus_gap_over_step_size():
    g = torch.tensor([1.0, 1.0, -3.0, 2.0])
    now, stale = torch.tensor([0.0, 0.2, 0.3, 5.0]), torch.tensor([0.0, 0.0, 0.0, 5.0])
    out = gap_penalised(g, now, stale, torch.tensor([0.1, 0.1, 0.3, 0.1]))
    assert out.tolist() == pytest.approx([1.0, 1.0 / 3.0, -3.0 / 2.0, 2.0])
    assert out[0] == g[0] and out[3] == g[3]  # no gap: unchanged, exactly


def test_gap_aware_measures_the_steps_the_server_applied():
    ga = GapAware(torch.zeros(2), [1, 2], GapAwareOptions(decay=0.5))
    params = torch.zeros(2)
    for step in (torch.tensor([0.2, 0.0]), torch.tensor([0.2, 0.0])):
        ga.before_step(params)
        params += step
        ga.after_step(params)
    # Bias-corrected mean of squared steps: 0.04 in the first coordinate, 0 (clamped to eps) in the second.
    assert ga.step_size().tolist() == pytest.approx([0.2, ga.options.eps])
    # Worker 1 fetched at the start (gap 0.4 = two steps), worker 2 now (no gap).
    ga.remember(2, params)
    g1, g2 = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])
    ga.compensate(1, g1, params)
    ga.compensate(2, g2, params)
    assert g1.tolist() == pytest.approx([1.0 / 3.0, 1.0]) and g2.tolist() == [1.0, 1.0]


def test_policy_state_survives_a_checkpoint():
    for make in (lambda: DelayCompensation(torch.zeros(3), [1, 2], DcAsgdOptions(lam=0.5, meansquare=0.9)),
                 lambda: GapAware(torch.zeros(3), [1, 2], GapAwareOptions())):
        first, second = make(), make()
        params = torch.tensor([0.5, -1.0, 2.0])
        first.before_step(torch.zeros(3))
        first.after_step(params)
        first.remember(1, params * 0.5)
        first.compensate(1, torch.ones(3), params)
        second.load_state_dict(first.state_dict())
        a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0])
        first.compensate(1, a, params)
        second.compensate(1, b, params)
        assert torch.equal(a, b) and not torch.equal(a, torch.tensor([1.0, 2.0, 3.0]))


def test_backup_workers_take_the_first_w_minus_b_fresh_gradients():
    rule = BackupWorkers(workers=4, backup=1)
    assert [rule.quorum(live) for live in (4, 3, 2, 1)] == [3, 3, 2, 1]  # a dead worker uses up a backup
    assert rule.accepts(7, 7) and not rule.accepts(6, 7)
    assert BackupWorkers(workers=2).quorum(2) == 2
    for bad in (-1, 4):
        with pytest.raises(PlacewiseError, match="--backup-workers"):
            BackupWorkers(workers=4, backup=bad).check()
    with pytest.raises(PlacewiseError, match="--dc-lambda"):
        DcAsgdOptions(lam=-1.0).check()
    with pytest.raises(PlacewiseError, match="--gap-decay"):
        GapAwareOptions(decay=1.0).check()


# ---- the replays -------------------------------------------------------------------------------------
POLICIES = {
    "none": None,
    "dc-asgd": lambda flat, workers: DelayCompensation(flat, workers, DcAsgdOptions(lam=0.5)),
    "dc-asgd-a": lambda flat, workers: DelayCompensation(flat, workers, DcAsgdOptions(lam=0.5, meansquare=0.95)),
    "gap-aware": lambda flat, workers: GapAware(flat, workers, GapAwareOptions()),
}


@pytest.fixture(scope="module", params=["mlp:32", "cnn:4x8"])
def task(request):
    return make_task(request.param, "digits", seed=SETTINGS["seed"])


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_one_worker_replay_is_plain_sgd_whatever_the_policy(task, policy):
    # One worker never computes on stale parameters: every compensation vanishes, bit for bit.
    steps = 12
    r = replay_async(task, [Push(0, k, 0) for k in range(1, steps + 1)], policy=POLICIES[policy], **SETTINGS)
    losses, model, _ = plain_sgd(task, steps, **SETTINGS)
    assert r.losses == losses
    assert all(torch.equal(r.state()[k], v) for k, v in model.state_dict().items())


def test_one_worker_sync_replay_is_plain_sgd(task):
    r = replay_sync(task, [[(0, k)] for k in range(1, 9)], **SETTINGS)
    losses, model, _ = plain_sgd(task, 8, **SETTINGS)
    assert r.losses == losses
    assert all(torch.equal(r.state()[k], v) for k, v in model.state_dict().items())


def round_robin(pushes: int, workers: int = 2) -> list[Push]:
    """Workers taking turns, all fetching at the start: each push is W - 1 updates stale once all began."""
    return [Push(i % workers, i // workers + 1, min(i, workers - 1)) for i in range(pushes)]


def test_stale_replays_differ_by_policy_and_lambda_zero_is_plain_async(task):
    pushes = round_robin(10)
    runs = {name: replay_async(task, pushes, policy=make, **SETTINGS).state() for name, make in POLICIES.items()}
    for name in ("dc-asgd", "dc-asgd-a", "gap-aware"):
        assert any(not torch.equal(runs[name][k], runs["none"][k]) for k in runs["none"]), name
    zero = replay_async(task, pushes, policy=lambda f, w: DelayCompensation(f, w, DcAsgdOptions(lam=0.0)), **SETTINGS)
    assert all(torch.equal(zero.state()[k], v) for k, v in runs["none"].items())
    # lr / staleness changes nothing at staleness 1, and does with three workers (staleness 2).
    scaled = replay_async(task, pushes, lr_scaling=True, **SETTINGS).state()
    assert all(torch.equal(scaled[k], v) for k, v in runs["none"].items())
    three = round_robin(9, workers=3)
    plain, scaled = (replay_async(task, three, lr_scaling=s, **SETTINGS).state() for s in (False, True))
    assert any(not torch.equal(scaled[k], plain[k]) for k in scaled)


def test_backup_round_replay_averages_its_members_in_worker_order(task):
    # Rounds that took workers {1, 0}, then {2, 1}: the order in which they arrived does not matter.
    a = replay_sync(task, [[(1, 1), (0, 1)], [(2, 1), (1, 2)]], **SETTINGS).state()
    b = replay_sync(task, [[(0, 1), (1, 1)], [(1, 2), (2, 1)]], **SETTINGS).state()
    c = replay_sync(task, [[(0, 1), (1, 1)], [(0, 2), (1, 2)]], **SETTINGS).state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
