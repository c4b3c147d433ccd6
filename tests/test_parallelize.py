"""`placewise.parallelize` on a user's own nn.Module (not in the model registry): embedded stage processes and
torchrun-style ranks train it as a pipeline with the losses and gradients of one process, and its state
round-trips into the unsplit model. Processes run on 127.0.0.1; every launch is time-bounded."""

from __future__ import annotations

import copy
import functools

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from placewise.errors import PlacewiseError  # noqa: E402

pytestmark = pytest.mark.torch
ATOL = 1e-5
STEPS = 3
LR = 0.1


class Mixer(nn.Module):
    """A user's model: a residual MLP whose skip crosses the middle, written in plain torch."""

    def __init__(self, width: int = 96, classes: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(24, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(4))
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        skip = h
        for block in self.blocks:
            h = block(h) + h
        return self.out(h + skip)


def batches(n: int = STEPS, batch: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 24, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def reference(model: nn.Module, data) -> tuple[list[float], list[dict], dict]:
    """The same training in this process on the unsplit model: losses, each step's gradients, the final state."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return losses, grads, model.state_dict()


def train(pipe, data) -> tuple[list[float], list[dict]]:
    losses, grads = [], []
    for x, y in data:
        losses.append(pipe.step(x, y))
        grads.append(pipe.gradients())
    return losses, grads


def assert_same(losses, grads, ref_losses, ref_grads) -> None:
    assert losses == pytest.approx(ref_losses, abs=ATOL)
    for step, (ours, theirs) in enumerate(zip(grads, ref_grads)):
        assert ours.keys() == theirs.keys(), step
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], atol=ATOL, rtol=0, msg=f"step {step}: {k}")


@pytest.mark.timeout(300)
def test_parallelize_trains_a_users_model_like_one_process_and_round_trips_its_state():
    from placewise import parallelize
    torch.manual_seed(0)
    model, data = Mixer(), batches()
    ref_losses, ref_grads, ref_state = reference(model, data)
    initial = copy.deepcopy(model.state_dict())
    with parallelize(model, data[0][0], cluster=2, microbatches=2, loss_fn=F.cross_entropy,
                     optimizer=functools.partial(torch.optim.SGD, lr=LR)) as pipe:
        assert pipe.n_stages == 2 and len(pipe.plan.stages) == 2
        losses, grads = train(pipe, data)
        assert_same(losses, grads, ref_losses, ref_grads)
        for k, v in initial.items():  # the stage processes train copies, not the model given
            torch.testing.assert_close(model.state_dict()[k], v, atol=0, rtol=0, msg=k)
        state = pipe.state_dict()
        assert list(state) == list(model.state_dict())  # the unsplit model's keys, in its order
        fresh = Mixer()
        fresh.load_state_dict(state)
        for k, v in ref_state.items():
            torch.testing.assert_close(fresh.state_dict()[k], v, atol=ATOL, rtol=0)
        torch.testing.assert_close(pipe.eval_step(data[0][0]), fresh.eval()(data[0][0]), atol=ATOL, rtol=0)
        # And back: the initial state scattered to the stages trains the same first step again.
        pipe.load_state_dict(initial)
        assert pipe.step(*data[0]) == pytest.approx(ref_losses[0], abs=ATOL)
        with pytest.raises(PlacewiseError, match="lacks 1 key"):
            pipe.load_state_dict({k: v for k, v in initial.items() if k != "out.bias"})


# With MASTER_ADDR, as torchrun sets it, the launcher's ranks (which it gives RANK and WORLD_SIZE) count as
# torchrun's: parallelize then runs this rank's stage instead of starting processes of its own.
TORCHRUN_ENV = {"MASTER_ADDR": "127.0.0.1"}


def _torchrun_rank(rank: int, world_size: int, cluster: int) -> tuple:
    """What each rank of a torchrun job runs (`TORCHRUN_ENV`)."""
    from placewise import parallelize
    from placewise.run.launcher import is_torchrun
    assert is_torchrun()
    torch.manual_seed(0)
    model, data = Mixer(), batches()
    with parallelize(model, data[0][0], cluster=cluster, microbatches=4, loss_fn=F.cross_entropy,
                     optimizer=functools.partial(torch.optim.SGD, lr=LR)) as pipe:
        losses, grads = train(pipe, data)
        return len(pipe.plan.stages), losses, grads, pipe.state_dict()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [2, 3])
def test_parallelize_under_torchrun_plans_on_rank_0_and_trains_like_one_process(ranks):
    from placewise.run.launcher import launch
    torch.manual_seed(0)
    model, data = Mixer(), batches()
    ref_losses, ref_grads, ref_state = reference(model, data)
    results, _ = launch(_torchrun_rank, ranks, (ranks,), timeout_s=240, env=TORCHRUN_ENV)
    for n_stages, losses, grads, state in results:  # every rank gets the losses, gradients and whole state
        assert n_stages == ranks
        assert_same(losses, grads, ref_losses, ref_grads)
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, atol=ATOL, rtol=0)


def test_parallelize_says_what_is_wrong_in_one_line():
    from placewise import parallelize
    model, data = Mixer(), batches(1)
    with pytest.raises(PlacewiseError, match="does not split into 3 equal microbatches"):
        parallelize(model, data[0][0], cluster=2, microbatches=3)
    with pytest.raises(PlacewiseError, match="nowhere.yaml"):
        parallelize(model, data[0][0], cluster="nowhere.yaml")
    from placewise.plan import Plan, Stage
    replicated = Plan([Stage("accelerator", 0, True, [], 0.0, 0.0, 0.0, 0.0, modules=["inp"], replicas=3)],
                      max_load=0.0, latency=None, solver="test", seconds=0.0)
    # Replicated stages run (test_parallelize_replicas), but only on microbatches their replicas can share.
    with pytest.raises(PlacewiseError, match="stage 0's 3 replicas"):
        parallelize(model, data[0][0], plan=replicated)


def test_profiles_are_cached_by_structure_shapes_and_device():
    from placewise.parallel.planning import profile_key
    x = torch.randn(8, 24)
    torch.manual_seed(0)
    a, b = Mixer(), Mixer()
    assert profile_key(a, (x,), "cpu") == profile_key(b, (x,), "cpu")  # other weights, same structure
    assert profile_key(a, (x,), "cpu") != profile_key(Mixer(width=64), (x,), "cpu")
    assert profile_key(a, (x,), "cpu") != profile_key(a, (torch.randn(16, 24),), "cpu")
    assert profile_key(a, (x,), "cpu") != profile_key(a, (x,), "cuda")


TORCHRUN_SCRIPT = '''
import functools, json, sys
import torch, torch.nn.functional as F
sys.path.insert(0, {tests!r})
from test_parallelize import Mixer, batches
import placewise

torch.manual_seed(0)
model, data = Mixer(), batches()
with placewise.parallelize(model, data[0][0], cluster=2, microbatches=2, loss_fn=F.cross_entropy,
                           optimizer=functools.partial(torch.optim.SGD, lr={lr})) as pipe:
    losses = [pipe.step(x, y) for x, y in data]
    state = pipe.state_dict()
rank = int(__import__("os").environ["RANK"])
torch.save(state, f"state{{rank}}.pt")
with open(f"report{{rank}}.json", "w") as f:  # not stdout: torchrun interleaves the ranks' lines
    json.dump({{"rank": rank, "losses": losses}}, f)
'''


def run_torchrun(script_text: str, tmp_path, processes: int) -> None:
    """`script_text` run by a real `torchrun --standalone` with `processes` processes in `tmp_path`."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "train.py"
    script.write_text(script_text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp_path)}  # torchrun leaves its log folder in the temp dir
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(processes), str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.timeout(300)
def test_parallelize_under_real_torchrun_joins_the_group_itself(tmp_path):
    import json
    from pathlib import Path
    run_torchrun(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), lr=LR), tmp_path, 2)
    torch.manual_seed(0)
    model, data = Mixer(), batches()
    ref_losses, _, ref_state = reference(model, data)
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["losses"] == pytest.approx(ref_losses, abs=ATOL)
        state = torch.load(tmp_path / f"state{report['rank']}.pt")
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, atol=ATOL, rtol=0)


@pytest.mark.timeout(300)
def test_a_stage_that_fails_stops_the_pipeline_with_one_line():
    from placewise import parallelize
    torch.manual_seed(0)
    model, data = Mixer(), batches(1)
    x, y = data[0]
    pipe = parallelize(model, x, cluster=2, loss_fn=F.cross_entropy)
    with pytest.raises(PlacewiseError, match="rank 1 failed") as failure:
        pipe.step(x, torch.randint(0, 5, (8, 3)))  # targets of the wrong shape: the last stage's loss fails
    assert "\n" not in str(failure.value)
    pipe.close()
    assert not pipe._backend.thread.is_alive()


@pytest.mark.timeout(300)
def test_a_script_without_a_main_guard_is_told_so_and_does_not_hang(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "unguarded.py"
    script.write_text("import torch\nfrom torch import nn\nimport placewise\n"
                      "model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))\n"
                      "pipe = placewise.parallelize(model, torch.randn(8, 8), cluster=2)\n"
                      "pipe.step(torch.randn(8, 8), torch.randint(0, 4, (8,)))\n")  # never closed
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=280)
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr.strip().splitlines()[-1]
