"""Pipelines as DDP workers: W pipelines of the plan's P stages, no server. After each pipeline step the
gradients of every stage are averaged over its W copies (one all-reduce group per stage, as
`DistributedDataParallel` does for whole models) and each stage process applies its own optimizer,
forward-fused with `--fuse forward`.

Pipeline w's stage s is rank w*P + s; every pipeline has its own group for its stage-to-stage traffic.
Worker 0's stage processes report for the run: each the snapshots of its stage's parameters, its last
stage the history (loss and accuracy of all pipelines' batches of each step together).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from placewise.run.data import BatchStream, Dataset
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.layout import parameter_layout
from placewise.run.dataparallel.model import build_model, correct
from placewise.run.optim import module_optimizer
from placewise.run.stage import stage_schedule


def run_pipeline_ddp(rank: int, world_size: int, cfg: TrainConfig, data: Dataset) -> dict[str, Any]:
    """One stage of one pipeline of a DDP run over pipelines."""
    model = build_model(cfg.model, data.features, data.classes, cfg.seed, cfg.input_shape)
    layout, prepared = parameter_layout(cfg, model, data)
    stages, workers = layout.stages, cfg.workers
    worker, stage_index = divmod(rank, stages)
    # new_group is collective: every rank creates every group, in the same order.
    pipelines = [dist.new_group([w * stages + s for s in range(stages)]) for w in range(workers)]
    replicas = [dist.new_group([w * stages + s for w in range(workers)]) for s in range(stages)]
    module, _, schedule = stage_schedule(prepared, stage_index, schedule=cfg.schedule, microbatches=cfg.microbatches,
                                         training=True, group=pipelines[worker])
    optimizer = module_optimizer(module, cfg.optimizer, cfg.lr, cfg.momentum, cfg.fuse)
    own = [p for p in module.parameters() if p.requires_grad]
    params = list(model.parameters())
    shard = next((s for r, s in enumerate(layout.shards) if layout.shard_stage[r] == stage_index), ())
    first, last = stage_index == 0, stage_index == stages - 1
    stream = BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, worker)
    steps, every = cfg.total_steps(data.train_size), cfg.snapshot_interval(data.train_size)
    history: list[dict[str, Any]] = []
    snapshots: list[tuple[int, float, torch.Tensor]] = []
    flush = getattr(optimizer, "flush", lambda: None)
    began = time.perf_counter()
    for version in range(1, steps + 1):
        cfg.maybe_kill(rank, version - 1)
        x, y = stream.batch(version - 1)
        if optimizer is not None:
            optimizer.zero_grad()
        losses: list[torch.Tensor] = []
        out = schedule.step(*((x,) if first else ()), **({"target": y, "losses": losses} if last else {}))
        if own:
            _average_gradients(own, workers, replicas[stage_index])
            optimizer.step()
        if last:
            # Each microbatch's loss is divided by the microbatch count: their sum is the batch mean.
            totals = torch.tensor([float(torch.stack(losses).sum()) * len(y), correct(out, y), float(len(y))],
                                  dtype=torch.float64)
            dist.all_reduce(totals, group=replicas[stage_index])
            if worker == 0:
                history.append({"version": version, "seconds": time.perf_counter() - began, "worker": -1,
                                "loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2]),
                                "staleness": 0})
        if worker == 0 and shard and (version % every == 0 or version == steps):
            flush()
            snapshots.append((version, time.perf_counter() - began,
                              torch.cat([params[i].detach().reshape(-1) for i in shard])))
    return {"role": "ddp", "rank": rank, "stage": stage_index, "version": steps, "history": history,
            "snapshots": snapshots, "resumed_from": None, "seconds": time.perf_counter() - began, "lost": {}}


def _average_gradients(params: list[torch.Tensor], workers: int, group) -> None:
    """The mean of these gradients over the stage's copies, in one all-reduce of a flat buffer."""
    params = [p for p in params if p.grad is not None]  # a parameter this step did not use has none
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat.div_(workers)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
