"""Recompute at run time: a checkpointed stage trains exactly like one without, holds less, and keeps
batch-norm statistics and dropout masks as a run without recompute would."""

from __future__ import annotations

import copy
import time

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from placewise.errors import PlacewiseError  # noqa: E402
from placewise.run.job import PipelineJob  # noqa: E402
from placewise.run.launcher import launch  # noqa: E402
from placewise.run.pipeline import pipeline_rank, run_single  # noqa: E402
from placewise.run.recompute import recompute  # noqa: E402

pytestmark = pytest.mark.torch
WIDTH, BLOCKS, MICRO = 128, 6, 512


def heavy(batch_size: int = MICRO):
    """Blocks whose saved activations outweigh their weights (spec "test_recompute:heavy")."""
    blocks = [m for _ in range(BLOCKS) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Sigmoid(), nn.Tanh())]
    return nn.Sequential(nn.Linear(32, WIDTH), *blocks, nn.Linear(WIDTH, 10)), (torch.randn(batch_size, 32),)


def test_recomputed_module_matches_gradients_statistics_and_dropout():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 2))
    checkpointed = recompute(copy.deepcopy(plain))
    x = torch.randn(12, 8)
    losses = []
    for module in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks, if the rerun restores the random state
        loss = module(x).square().sum()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, msg=name)
    # The rerun in the backward does not move the running statistics a second time.
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(b, c, atol=0, rtol=0, msg=name)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]


def test_recompute_outside_the_plan_is_one_line():
    job = PipelineJob(model="test_recompute:heavy", batch_size=8, mapping={"a": 0, "b": 1}, microbatches=2,
                      recompute=(2,))
    with pytest.raises(PlacewiseError, match="recompute names stage 2"):
        job.check()


def _mapping(first_stage_nodes: int) -> dict[str, int]:
    from placewise.run.cut import trace
    model, inputs = heavy()
    names = [n.name for n in trace(model, inputs).graph.nodes if n.op == "call_module"]
    return {name: int(i >= first_stage_nodes) for i, name in enumerate(names)}


@pytest.mark.timeout(300)
def test_two_stages_with_recompute_train_like_one_process_and_hold_less():
    mapping = _mapping(1 + 4 * BLOCKS // 2)  # the first half of the blocks on stage 0

    def job(recomputed: tuple[int, ...], collect: tuple[str, ...]) -> PipelineJob:
        return PipelineJob(model="test_recompute:heavy", batch_size=2 * MICRO, mapping=mapping, recompute=recomputed,
                           schedule="1f1b", microbatches=2, steps=2, seed=3, collect=collect)
    jobs = [job((0,), ("grads",)), job((), ("memory",)), job((0,), ("memory",))]
    start = time.monotonic()
    results, failures = launch(pipeline_rank, 2, (jobs,), timeout_s=240,
                               preload=["torch", "torch.distributed.pipelining"])
    assert not failures
    reference = run_single(job((), ("grads",)))
    trained = [r[0] for r in results]
    assert trained[1]["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    grads = {**trained[0]["grads"], **trained[1]["grads"]}
    assert grads.keys() == reference["grads"].keys()
    for key, grad in reference["grads"].items():
        torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {key}")
    plain, recomputed = ([results[rank][j]["peak_memory_bytes"] for rank in range(2)] for j in (1, 2))
    print(f"peak stage memory (MB): without recompute {[p / 1e6 for p in plain]}, recompute on stage 0 "
          f"{[p / 1e6 for p in recomputed]} ({time.monotonic() - start:.0f} s)")
    assert recomputed[0] < 0.8 * plain[0]
    assert recomputed[1] == pytest.approx(plain[1], rel=0.05)  # stage 1 runs as before
