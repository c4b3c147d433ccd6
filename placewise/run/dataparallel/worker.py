"""Parameter-server workers: a single process stepping on its minibatches, or one stage of a pipeline
worker (its stage of every batch through torch's schedule, its stage's gradients pushed to and
parameters fetched from its stage's server shards)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from placewise.run.cut import Prepared
from placewise.run.data import BatchStream, Dataset
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.layout import Layout
from placewise.run.dataparallel.link import ServerLink
from placewise.run.dataparallel.model import correct, forward_backward
from placewise.run.dataparallel.protocol import Kind
from placewise.run.dataparallel.shared import SharedBuffers
from placewise.run.stage import stage_schedule


def run_worker(rank: int, cfg: TrainConfig, data: Dataset, model: nn.Module, layout: Layout) -> dict[str, Any]:
    """A single-process parameter-server worker: steps until every server shard has said STOP."""
    worker = rank - layout.servers
    link = ServerLink(list(model.parameters()), layout.stage_shards(0), SharedBuffers.of(cfg), rank)
    stream = BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, worker)

    def compute(step: int) -> tuple[float, float, float]:
        x, y = stream.batch(step)
        return (*forward_backward(model, x, y), float(len(y)))

    start = link.call(cfg, Kind.HELLO, 0, (0.0, 0.0, 0.0))
    began = time.perf_counter()
    step = link.train(cfg, rank, start, compute, lambda: bool(link.running))
    return {"role": "worker", "rank": rank, "steps": step - start, "seconds": time.perf_counter() - began}


def run_pipeline_worker(rank: int, cfg: TrainConfig, data: Dataset, model: nn.Module, layout: Layout,
                        prepared: Prepared, group) -> dict[str, Any]:
    """One stage of a pipeline worker: its stage of every batch through the schedule, its stage's gradients
    pushed to and parameters fetched from its stage's server shards. `group` is the pipeline's own group."""
    worker, stage_index = divmod(rank - layout.servers, layout.stages)
    link = ServerLink(list(model.parameters()), layout.stage_shards(stage_index), SharedBuffers.of(cfg), rank)
    _, _, schedule = stage_schedule(prepared, stage_index, schedule=cfg.schedule, microbatches=cfg.microbatches,
                                    training=True, group=group)
    first, last = stage_index == 0, stage_index == layout.stages - 1
    # Every stage reads the same batch stream: the first stage feeds the inputs, the last the targets.
    stream = BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, worker)
    flag, pooled = torch.zeros(1), torch.zeros(3, dtype=torch.float64)

    def compute(step: int) -> tuple[float, float, float]:
        x, y = stream.batch(step)
        losses: list[torch.Tensor] = []
        out = schedule.step(*((x,) if first else ()), **({"target": y, "losses": losses} if last else {}))
        if not last:
            return 0.0, 0.0, 0.0
        # Each microbatch's loss is divided by the microbatch count: their sum is the batch mean.
        loss = float(torch.stack(losses).sum().detach())
        return loss * len(y), correct(out, y), float(len(y))

    def share(totals: tuple[float, float, float]) -> tuple[float, float, float]:
        # Only the last stage sees the loss; every stage's push carries it, so every server's record has it.
        pooled.copy_(torch.tensor(totals, dtype=torch.float64))
        dist.all_reduce(pooled, group=group)
        return tuple(pooled.tolist())

    def go_on() -> bool:
        # The pipeline steps together: on while any of its stages still has a running server.
        flag.fill_(1.0 if link.running else 0.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    start = link.call(cfg, Kind.HELLO, 0, (0.0, 0.0, 0.0))
    # Resumed asynchronous stage servers saved their checkpoints at their own moments: one may have applied
    # this pipeline's step k and another not. The stages go on together from the least advanced one's step;
    # a server skips the steps it already applied (`server.py`).
    agreed = torch.tensor([float(start)])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    began = time.perf_counter()
    step = link.train(cfg, rank, int(agreed.item()), compute, go_on, share)
    return {"role": "stage", "rank": rank, "worker": worker, "stage": stage_index, "steps": step - start,
            "seconds": time.perf_counter() - began}
