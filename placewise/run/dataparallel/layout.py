"""Who holds which parameters: server shards of whole tensors (per pipeline stage with a plan), and the
ranks of workers and servers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from placewise.errors import PlacewiseError
from placewise.run.cut import Prepared, cut_model
from placewise.run.data import Dataset
from placewise.run.dataparallel.config import TrainConfig


def shard_parameters(sizes: list[int], servers: int) -> list[list[int]]:
    """Parameter indices held by each server: whole tensors, largest first onto the lightest shard.

    Whole tensors (not slices) keep each server's optimizer working tensor by tensor, exactly as a
    single-process optimizer does, so one worker through one server reproduces plain SGD bitwise."""
    if not 1 <= servers <= len(sizes):
        raise PlacewiseError(f"--servers {servers}: the model has {len(sizes)} parameter tensors to shard; "
                             f"use 1..{len(sizes)}")
    loads = [0] * servers
    shards: list[list[int]] = [[] for _ in range(servers)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        s = min(range(servers), key=lambda s: (loads[s], s))
        shards[s].append(i)
        loads[s] += sizes[i]
    return [sorted(shard) for shard in shards]


@dataclass(frozen=True)
class Layout:
    """The ranks of a server run: server rank r holds the parameters `shards[r]` (indices into
    `model.parameters()`) of pipeline stage `shard_stage[r]`; worker w is `worker_ranks(w)`, one rank
    per stage (one rank in all for single-process workers, whose one "stage" is the whole model)."""
    shards: tuple[tuple[int, ...], ...]
    shard_stage: tuple[int, ...]
    stages: int
    workers: int

    @property
    def servers(self) -> int:
        return len(self.shards)

    @property
    def world_size(self) -> int:
        return self.servers + self.workers * self.stages

    def worker_ranks(self, worker: int) -> list[int]:
        base = self.servers + worker * self.stages
        return list(range(base, base + self.stages))

    def stage_ranks(self, stage: int) -> list[int]:
        """The rank that runs `stage` in every worker: the clients of that stage's servers."""
        return [self.worker_ranks(w)[stage] for w in range(self.workers)]

    def stage_shards(self, stage: int) -> dict[int, tuple[int, ...]]:
        """Server rank -> parameter indices, for the servers of `stage`."""
        return {r: shard for r, shard in enumerate(self.shards) if self.shard_stage[r] == stage}


def parameter_layout(cfg: TrainConfig, model: nn.Module, data: Dataset) -> tuple[Layout, Prepared | None]:
    """Who holds which parameters, and, with a plan, the model traced and cut into its stages (the stages'
    modules share `model`'s parameters). Every rank computes the same; bad plans fail here in one line."""
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    if not cfg.mapping:
        shards = shard_parameters(sizes, cfg.servers)
        return Layout(tuple(map(tuple, shards)), (0,) * len(shards), 1, cfg.workers), None
    model.train()
    prepared = cut_model(model, (data.x_train[:cfg.batch_size],), cfg.mapping, cfg.microbatches)
    index = {id(p): i for i, p in enumerate(params)}
    shards: list[tuple[int, ...]] = []
    stage_of: list[int] = []
    for part in prepared.parts:
        own = [index[id(p)] for p in part.module.parameters()]
        if not own:
            continue  # a stage without parameters (only activations) has nothing to serve
        if cfg.servers > len(own):
            raise PlacewiseError(f"--servers {cfg.servers}: stage {part.index} of the plan holds {len(own)} parameter "
                                 f"tensor(s); with --plan each stage's tensors are sharded, use --servers 1..{len(own)}")
        for shard in shard_parameters([sizes[i] for i in own], cfg.servers):
            shards.append(tuple(own[j] for j in shard))
            stage_of.append(part.index)
    if not shards:
        raise PlacewiseError(f"model {cfg.model!r} has no parameters to train")
    return Layout(tuple(shards), tuple(stage_of), len(prepared.parts), cfg.workers), prepared
