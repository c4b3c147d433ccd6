"""What each rank of a data-parallel run does: server shard, worker, pipeline stage or DDP rank.

Ranks of an async/sync run: the S parameter-server shards first (with a plan, the shards of all
stages), then the workers (with a plan, worker w's stages at S + w*P .. S + w*P + P-1, each pipeline
with its own process group for its stage-to-stage traffic). A DDP run has W ranks.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from placewise.run.data import Dataset
from placewise.run.dataparallel.checkpoint import checkpoint_path, load_checkpoint
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.ddp import run_ddp
from placewise.run.dataparallel.layout import Layout, parameter_layout
from placewise.run.dataparallel.model import build_model
from placewise.run.dataparallel.pipeline_ddp import run_pipeline_ddp
from placewise.run.dataparallel.server import ParameterServer, ServerSettings, record_file
from placewise.run.dataparallel.shared import SharedBuffers
from placewise.run.choices import DDP
from placewise.run.tasks import make_task
from placewise.run.dataparallel.worker import run_pipeline_worker, run_worker
from placewise.run.launcher import run_folder


def run_server(rank: int, cfg: TrainConfig, data: Dataset, model: nn.Module, layout: Layout) -> dict[str, Any]:
    params = list(model.parameters())
    fingerprint = cfg.fingerprint(data.features, data.classes)
    resume = load_checkpoint(checkpoint_path(cfg.resume, rank, layout.servers), fingerprint) if cfg.resume else None
    settings = ServerSettings(mode=cfg.mode, steps=cfg.total_steps(data.train_size), optimizer=cfg.optimizer,
                              lr=cfg.lr, momentum=cfg.momentum, staleness=cfg.policy(), dc_asgd=cfg.dc_asgd,
                              gap_aware=cfg.gap_aware, backup_workers=cfg.backup_workers, checkpoint=cfg.checkpoint,
                              checkpoint_every=cfg.checkpoint_every,
                              snapshot_every=cfg.snapshot_interval(data.train_size),
                              progress=cfg.progress and rank == 0, fingerprint=fingerprint,
                              kill_at=cfg.kill_step(rank), version_file=record_file(rank, run_folder()))
    clients = [c for c in layout.stage_ranks(layout.shard_stage[rank]) if c not in cfg.absent]
    server = ParameterServer(rank, layout.servers, [params[i].detach() for i in layout.shards[rank]], clients,
                             settings, resume, SharedBuffers.of(cfg))
    return server.serve()


def rank_main(rank: int, world_size: int, cfg: TrainConfig, data: Dataset | None = None) -> dict[str, Any]:
    """The rank function for `launch` and `run_rank`: server shard, worker, pipeline stage or DDP rank by `rank`.

    `data` comes from the launching process when there is one (loaded once, no scikit-learn import
    per rank); under torchrun each rank loads it."""
    data = data if data is not None else make_task(cfg.model, cfg.dataset, cfg.seed, cfg.input_shape).data
    if cfg.mode == DDP:
        return (run_pipeline_ddp if cfg.mapping else run_ddp)(rank, world_size, cfg, data)
    model = build_model(cfg.model, data.features, data.classes, cfg.seed, cfg.input_shape)
    layout, prepared = parameter_layout(cfg, model, data)
    groups = []
    if prepared is not None:
        # One group per pipeline for its stage-to-stage traffic; new_group is collective over all ranks.
        groups = [dist.new_group(layout.worker_ranks(w)) for w in range(layout.workers)]
    if rank < layout.servers:
        return run_server(rank, cfg, data, model, layout)
    if prepared is not None:
        worker = (rank - layout.servers) // layout.stages
        return run_pipeline_worker(rank, cfg, data, model, layout, prepared, groups[worker])
    return run_worker(rank, cfg, data, model, layout)
