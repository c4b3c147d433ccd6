"""A DDP rank: local forward and backward, gradients all-reduced by `DistributedDataParallel`, its own
(optionally forward-fused) optimizer. The reference synchronous method beside the parameter server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from placewise.run.data import BatchStream, Dataset
from placewise.run.dataparallel.checkpoint import load_checkpoint, save_checkpoint
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.model import build_model, forward_backward
from placewise.run.optim import module_optimizer


def run_ddp(rank: int, world_size: int, cfg: TrainConfig, data: Dataset) -> dict[str, Any]:
    """One DDP rank: local forward/backward, all-reduced gradients, its own (optionally fused) optimizer."""
    from torch.nn.parallel import DistributedDataParallel
    model = build_model(cfg.model, data.features, data.classes, cfg.seed, cfg.input_shape)
    steps = cfg.total_steps(data.train_size)
    fingerprint = cfg.fingerprint(data.features, data.classes)
    resume = load_checkpoint(Path(cfg.resume), fingerprint) if cfg.resume else None
    if resume is not None:
        with torch.no_grad():
            for p, saved in zip(model.parameters(), resume["params"]):
                p.copy_(saved)
    ddp = DistributedDataParallel(model)
    # Only a forward-fused update can wait for DDP's averaged gradients (TrainConfig.validate says why).
    optimizer = module_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.fuse)
    version = 0
    history: list[dict[str, Any]] = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        version = int(resume["version"])
        history = list(resume["history"]) if rank == 0 else []
    resumed_from = version if resume is not None else None
    stream = BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, rank)
    every = cfg.snapshot_interval(data.train_size)
    snapshots: list[tuple[int, float, torch.Tensor]] = []
    local: list[tuple[float, float, float]] = []  # this rank's (loss sum, correct, samples) per update
    flush = getattr(optimizer, "flush", lambda: None)

    def snapshot(now: float) -> None:
        flush()
        snapshots.append((version, now, torch.cat([p.detach().reshape(-1) for p in model.parameters()])))

    began = time.perf_counter()
    while version < steps:
        cfg.maybe_kill(rank, version)
        x, y = stream.batch(version)
        optimizer.zero_grad()
        loss_sum, right = forward_backward(ddp, x, y)
        optimizer.step()
        version += 1
        local.append((loss_sum, right, float(len(y))))
        if rank == 0:
            now = time.perf_counter() - began
            history.append({"version": version, "seconds": now, "worker": -1, "loss": local[-1][0] / len(y),
                            "accuracy": local[-1][1] / len(y), "staleness": 0})
            if every and version % every == 0:
                snapshot(now)
            if cfg.checkpoint and cfg.checkpoint_every and version % cfg.checkpoint_every == 0:
                flush()
                save_checkpoint(Path(cfg.checkpoint), {
                    "version": version, "params": [p.detach().clone() for p in model.parameters()],
                    "optimizer": optimizer.state_dict(), "worker_steps": {}, "history": history,
                    "fingerprint": fingerprint})
    seconds = time.perf_counter() - began
    if rank == 0 and (not snapshots or snapshots[-1][0] != version):
        snapshot(seconds)
    return {"role": "ddp", "rank": rank, "version": version, "history": history, "local": local,
            "snapshots": snapshots, "resumed_from": resumed_from, "seconds": seconds, "lost": {}}
