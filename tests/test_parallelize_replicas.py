"""`placewise.parallelize` with a replicated stage: a hand-made plan of 2 stages, the second on 2 processes
(3 in all, gloo, 1 thread each), trains a user's MLP with the losses, gradients and parameters of one process
(atol 1e-5), embedded and under torchrun-style ranks, and leaves no process behind. What run/ refuses for
replicated stages (microbatches the replicas cannot share, batch normalisation) is refused in one line."""

from __future__ import annotations

import functools
import multiprocessing as mp

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from placewise.errors import PlacewiseError  # noqa: E402
from placewise.plan import Plan, Stage  # noqa: E402
from test_parallelize import (ATOL, LR, TORCHRUN_ENV, assert_same, batches, reference, run_torchrun,  # noqa: E402
                              train)

pytestmark = pytest.mark.torch


class MLP(nn.Module):
    """A user's model without batch normalisation (its fx nodes: inp, relu, hidden, tanh, out)."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(24, 64)
        self.hidden = nn.Linear(64, 64)
        self.norm = nn.BatchNorm1d(64) if norm else nn.Identity()
        self.out = nn.Linear(64, 5)

    def forward(self, x):
        return self.out(self.norm(torch.tanh(self.hidden(torch.relu(self.inp(x))))))


def two_stage_plan(replicas: int, second: tuple[str, ...] = ("hidden", "tanh", "out"), first: int = 1) -> Plan:
    """inp and relu on `first` processes, the rest on `replicas` processes."""
    def stage(index: int, modules: list[str], r: int) -> Stage:
        return Stage("accelerator", index, True, [], 0.0, 0.0, 0.0, 0.0, modules=modules, replicas=r)
    return Plan([stage(0, ["inp", "relu"], first), stage(1, list(second), replicas)], max_load=0.0, latency=None,
                solver="hand", seconds=0.0)


def _children() -> list:
    return [p for p in mp.active_children() if p.is_alive()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("replicas", [(1, 2), (2, 1)])
def test_a_replicated_stage_trains_like_one_process_and_leaves_no_process_behind(replicas):
    from placewise import parallelize
    torch.manual_seed(0)
    model, data = MLP(), batches()
    ref_losses, ref_grads, ref_state = reference(model, data)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    before = _children()
    pipe = parallelize(model, data[0][0], plan=two_stage_plan(replicas[1], first=replicas[0]), microbatches=2,
                       loss_fn=F.cross_entropy, optimizer=functools.partial(torch.optim.SGD, lr=LR), threads=1)
    try:
        assert tuple(s.replicas for s in pipe.plan.stages) == replicas and pipe.n_stages == 2
        losses, grads = train(pipe, data)
        assert_same(losses, grads, ref_losses, ref_grads)
        state = pipe.state_dict()
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, atol=ATOL, rtol=0, msg=k)
        # Both replicas of the replicated stage (ranks 1 and 2, or 0 and 1) hold the same trained copy.
        states = pipe._backend.call("state_dict", [()] * 3, 60)
        lead, follower = states[1:] if replicas == (1, 2) else states[:2]
        for k, v in lead.items():
            torch.testing.assert_close(follower[k], v, atol=0, rtol=0, msg=k)
        fresh = MLP()
        fresh.load_state_dict(state)
        torch.testing.assert_close(pipe.eval_step(data[0][0]), fresh.eval()(data[0][0]), atol=ATOL, rtol=0)
        for k, v in initial.items():  # the model given stays as it was: its trained state is pipe.state_dict()
            torch.testing.assert_close(model.state_dict()[k], v, atol=0, rtol=0, msg=k)
        pipe.load_state_dict(initial)  # back to the start: the first step again, on every replica
        assert pipe.step(*data[0]) == pytest.approx(ref_losses[0], abs=ATOL)
    finally:
        pipe.close()
    assert not pipe._backend.thread.is_alive()
    assert _children() == before


def _torchrun_rank(rank: int, world_size: int) -> tuple:
    """Each rank of a torchrun job (`TORCHRUN_ENV`)."""
    from placewise import parallelize
    from placewise.run.launcher import is_torchrun
    assert is_torchrun()
    torch.manual_seed(0)
    model, data = MLP(), batches()
    with parallelize(model, data[0][0], plan=two_stage_plan(2), microbatches=2, loss_fn=F.cross_entropy,
                     optimizer=functools.partial(torch.optim.SGD, lr=LR)) as pipe:
        losses, grads = train(pipe, data)
        return losses, grads, pipe.state_dict()


@pytest.mark.timeout(300)
def test_a_replicated_stage_under_torchrun_trains_like_one_process():
    from placewise.run.launcher import launch
    torch.manual_seed(0)
    model, data = MLP(), batches()
    ref_losses, ref_grads, ref_state = reference(model, data)
    results, _ = launch(_torchrun_rank, 3, (), timeout_s=240, env=TORCHRUN_ENV)
    for losses, grads, state in results:  # every rank, the follower too, gets the pipeline's results
        assert_same(losses, grads, ref_losses, ref_grads)
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, atol=ATOL, rtol=0)


def test_what_replicas_cannot_run_is_refused_in_one_line():
    from placewise import parallelize
    x = batches(1)[0][0]
    before = _children()
    with pytest.raises(PlacewiseError, match="microbatches of 4 samples, which stage 1's 3 replicas") as e:
        parallelize(MLP(), x, plan=two_stage_plan(3), microbatches=2)
    assert "\n" not in str(e.value) and "microbatches=2" in str(e.value)
    with pytest.raises(PlacewiseError, match="batch normalisation") as e:
        parallelize(MLP(norm=True), x, plan=two_stage_plan(2, ("hidden", "tanh", "norm", "out")), microbatches=2)
    assert "\n" not in str(e.value)
    for bad in (0, 1.5, True):
        with pytest.raises(PlacewiseError, match="max_replicas="):
            parallelize(MLP(), x, cluster=2, max_replicas=bad)
    with pytest.raises(PlacewiseError, match="only solver='dp'"):
        parallelize(MLP(), x, cluster=2, max_replicas=2, solver="greedy")
    assert _children() == before  # nothing was started


def test_max_replicas_lets_the_dp_choose_replicas_per_stage(monkeypatch):
    """`max_replicas` reaches the DP with the all-reduce paid once per step (one example batch per step)."""
    from placewise.graph import Cluster
    from placewise.parallel import planning
    from placewise.plan import DPOptions
    seen = []

    def solve(graph, cluster, solver, options=None):
        seen.append(options)
        return real(graph, cluster, solver, options)

    real = planning.solve
    monkeypatch.setattr(planning, "solve", solve)
    plan = planning.plan_module(MLP(), batches(1)[0][:1], Cluster.simple(3), max_replicas=2)
    assert isinstance(seen[0], DPOptions) and seen[0].max_replicas == 2 and seen[0].allreduce.step_units == 1.0
    assert all(1 <= s.replicas <= 2 for s in plan.stages) and sum(s.replicas for s in plan.stages) <= 3
    planning.plan_module(MLP(), batches(1)[0][:1], Cluster.simple(3))
    assert seen[1] is None  # without max_replicas the solver's defaults: one process per stage


TORCHRUN_SCRIPT = '''
import functools, json, os, sys
import torch, torch.nn.functional as F
sys.path.insert(0, {tests!r})
from test_parallelize import batches, train
from test_parallelize_replicas import MLP, two_stage_plan
import placewise

torch.manual_seed(0)
model, data = MLP(), batches()
with placewise.parallelize(model, data[0][0], plan=two_stage_plan(2), microbatches=2, loss_fn=F.cross_entropy,
                           optimizer=functools.partial(torch.optim.SGD, lr={lr})) as pipe:
    losses, grads = train(pipe, data)
    state = pipe.state_dict()
rank = int(os.environ["RANK"])
torch.save({{"losses": losses, "grads": grads, "state": state}}, f"rank{{rank}}.pt")
'''


@pytest.mark.timeout(300)
def test_a_replicated_stage_under_real_torchrun_trains_like_one_process(tmp_path):
    """torchrun --nproc-per-node 3: the plan's 2 stages with 3 replicas in all, each rank joining the group itself."""
    from pathlib import Path
    run_torchrun(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), lr=LR), tmp_path, 3)
    torch.manual_seed(0)
    model, data = MLP(), batches()
    ref_losses, ref_grads, ref_state = reference(model, data)
    for rank in range(3):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_same(got["losses"], got["grads"], ref_losses, ref_grads)
        for k, v in ref_state.items():
            torch.testing.assert_close(got["state"][k], v, atol=ATOL, rtol=0, msg=f"rank {rank}: {k}")
