"""Data-parallel training: asynchronous workers around a parameter server, its synchronous twin, and DDP.

Ranks of an async/sync run: 0..S-1 are parameter-server shards (`placewise.run.server`), S..S+W-1 are
workers. A worker computes the gradient of one minibatch per step, pushes the mean of its accumulated
gradients every `n_push` steps and fetches fresh parameters every `n_fetch` steps. A DDP run has W
ranks, each a worker with `DistributedDataParallel` and its own optimizer (the reference synchronous
method; optimizer fusion applies there). Every process is started by `placewise.run.launcher.launch`
over 127.0.0.1 (or by torchrun through `run_rank`).

With a plan (`TrainConfig.mapping`), every worker is a whole pipeline of P stage processes (model
parallelism inside, data parallelism across: Downpour's layout). The servers are then sharded by
stage: each stage's parameters have their own shard(s), and each stage process talks only to those,
pushing its stage's gradients and fetching its stage's parameters; its pipeline step is one batch
through torch's GPipe or 1F1B schedule. Ranks: the S shards of all stages first, then worker w's
stages at S + w*P .. S + w*P + P-1, each pipeline with its own process group for its stage-to-stage
traffic. The stages of a pipeline agree every step on whether to go on (any of its stages' servers
still running), so a pipeline never stops half-way; a stage whose servers have stopped computes on
without pushing until its siblings' servers stop too.

Worker `i` (0-based among workers) of every mode reads the same deterministic batch stream
(`data.BatchStream` with worker `i`), so sync and DDP compute the same mathematics and a resumed
run repeats the uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from placewise.errors import PlacewiseError
from placewise.run.data import BatchStream, Dataset, load_dataset
from placewise.run.launcher import is_torchrun, launch, run_rank
from placewise.run.pipeline import PipelineJob, Prepared, cut_model, stage_schedule
from placewise.run.server import (HEADER, REPLY, STOP, Kind, ParameterServer, ServerSettings, SharedBuffers, Staleness,
                                  checkpoint_path, flat_views, load_checkpoint, make_optimizer, optimizer_class,
                                  optimizer_kwargs, save_checkpoint, shard_parameters)

MODES = ("async", "sync", "ddp")
TRANSPORTS = ("auto", "shared", "gloo")
# Processes on one machine: beyond this the embedded launcher only thrashes (and gloo opens W*S pairs).
MAX_PROCESSES = 64
# Imported once by the launcher's fork server: later runs in the same process start in well under a second.
PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "torch.distributed.pipelining",
           "placewise.run.async_sgd")


# ---- models --------------------------------------------------------------------------------------
def parse_model(spec: str) -> tuple[int, ...]:
    """Hidden widths of `mlp`, `mlp:256` or `mlp:1024x1024`."""
    from placewise.profile.models import mlp_widths
    hidden = mlp_widths(spec)
    if hidden is None:
        raise PlacewiseError(f"model {spec!r} is not available for data-parallel training; use mlp, mlp:H or "
                             f"mlp:H1xH2 (hidden widths)")
    return hidden


def build_model(spec: str, features: int, classes: int, seed: int) -> nn.Sequential:
    """The MLP `spec` with weights drawn from `seed` (every rank builds the same one; so does `placewise
    profile SPEC`, whose graph a plan for pipeline workers names)."""
    from placewise.profile.models import build_mlp
    hidden = parse_model(spec)
    torch.manual_seed(seed)
    return build_mlp(hidden, features, classes)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


# ---- configuration -------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    model: str = "mlp"
    mode: str = "async"
    workers: int = 2
    servers: int = 1
    n_push: int = 1
    n_fetch: int = 1
    staleness: str = "none"
    dataset: str = "digits"
    steps: int | None = None        # server updates (async: one per push; sync/ddp: one per round)
    epochs: float | None = None     # or this many passes over the training set, summed over workers
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    fuse: str = "none"
    seed: int = 0
    threads: int = 1
    checkpoint: str | None = None
    checkpoint_every: int = 0
    resume: str | None = None
    snapshot_every: int = 0         # parameter copies for the accuracy curve (0: about 20 per run)
    progress: bool = False
    timeout_s: float = 1800.0
    # Fault injection for tests and demos: rank `kill_rank` kills itself (SIGKILL) at its step/update `kill_at`.
    kill_rank: int | None = None
    kill_at: int | None = None
    # Pipeline workers: {fx node name: stage} from a plan (`pipeline.mapping_from_plan`); {} for
    # single-process workers. `servers` then counts shards per stage.
    mapping: dict[str, int] = field(default_factory=dict)
    schedule: str = "1f1b"
    microbatches: int = 4
    # How gradients and parameters travel between workers and servers: "shared" memory (ranks that
    # the embedded launcher starts on this machine), "gloo" messages, or "auto" (shared when possible).
    transport: str = "auto"
    shared_dir: str | None = None   # set by the launching process for the shared transport

    def policy(self) -> Staleness:
        return Staleness.parse(self.staleness)

    @property
    def stages(self) -> int:
        """Processes per worker: the plan's stages, or 1."""
        return max(self.mapping.values()) + 1 if self.mapping else 1

    def world_size(self) -> int:
        """Processes of the run; with a plan, at most this (a stage without parameters has no server)."""
        return self.workers if self.mode == "ddp" else (self.servers + self.workers) * self.stages

    def server_count(self) -> int:
        return 0 if self.mode == "ddp" else self.servers * self.stages

    def total_steps(self, train_size: int) -> int:
        """Server updates of the run: `steps`, or `epochs` passes over the data (all workers together)."""
        if self.steps is not None:
            return self.steps
        per_update = self.batch_size * self.n_push * (1 if self.mode == "async" else self.workers)
        return max(1, int(-(-self.epochs * train_size // per_update)))

    def validate(self) -> None:
        """Reject bad settings with one line each (the CLI exits 2)."""
        if self.mode not in MODES:
            raise PlacewiseError(f"--mode {self.mode!r}: data-parallel modes are {', '.join(MODES)}")
        parse_model(self.model)
        optimizer_class(self.optimizer)
        if self.servers < 1:
            raise PlacewiseError(f"--servers {self.servers}: use 1 or more parameter-server shards")
        if self.mapping:
            self._validate_pipelines()
        elif self.workers < 1 or self.world_size() > MAX_PROCESSES:
            raise PlacewiseError(f"--workers {self.workers}: use 1..{MAX_PROCESSES - self.server_count()} "
                                 f"(at most {MAX_PROCESSES} processes with the servers on one machine)")
        for flag, value in (("--n-push", self.n_push), ("--n-fetch", self.n_fetch)):
            if value < 1:
                raise PlacewiseError(f"{flag} {value}: must be 1 or more (steps between pushes/fetches)")
        policy = self.policy()
        if self.mode != "async" and policy.policy != "none":
            raise PlacewiseError(f"--staleness {self.staleness} applies to --mode async only; {self.mode} has no "
                                 f"stale gradients")
        if self.mode == "ddp" and (self.n_push, self.n_fetch, self.servers) != (1, 1, 1):
            raise PlacewiseError("--mode ddp has no parameter server: drop --n-push, --n-fetch and --servers")
        if self.mode == "sync" and self.n_fetch != self.n_push:
            raise PlacewiseError(f"--mode sync: --n-fetch {self.n_fetch} must equal --n-push {self.n_push} "
                                 f"(every worker takes the parameters of each synchronous round)")
        if self.fuse != "none":
            if self.mode != "ddp":
                fix = ("use --fuse none, or drop --workers/--mode to fuse the optimizer into each stage of one "
                       "pipeline" if self.mapping else "use --mode ddp or --fuse none")
                raise PlacewiseError(f"--fuse {self.fuse} does not apply to --mode {self.mode}: the parameter "
                                     f"server updates from received gradients, with no forward or backward pass "
                                     f"to fuse into; {fix}")
            if self.fuse != "forward":
                raise PlacewiseError(f"--fuse {self.fuse} with --mode ddp would update from local gradients "
                                     f"before DDP averages them; use --fuse forward")
        if self.steps is None and self.epochs is None:
            raise PlacewiseError("give --steps N or --epochs E")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise PlacewiseError("--steps and --epochs must be positive")
        if self.batch_size < 1:
            raise PlacewiseError(f"--batch-size {self.batch_size}: must be 1 or more")
        if self.lr <= 0:
            raise PlacewiseError(f"--lr {self.lr}: must be positive")
        if self.checkpoint_every < 0 or (self.checkpoint_every and not self.checkpoint):
            raise PlacewiseError("--checkpoint-every K needs K >= 1 and --checkpoint PATH")
        if self.threads < 1:
            raise PlacewiseError(f"--threads {self.threads}: must be 1 or more")
        if self.transport not in TRANSPORTS:
            raise PlacewiseError(f"--transport {self.transport!r}: use one of {', '.join(TRANSPORTS)}")

    def _validate_pipelines(self) -> None:
        if self.mode == "ddp":
            raise PlacewiseError("--plan with --mode ddp: DDP all-reduces the gradients of whole-model replicas, "
                                 "pipeline workers would need one all-reduce group per stage, which is not built; "
                                 "use --mode sync (the same mean gradient, through the server) or drop --plan")
        if self.workers < 1:
            raise PlacewiseError(f"--workers {self.workers}: use 1 or more pipelines")
        # The pipeline's own checks: schedule, optimizer, microbatches against the batch and the stages.
        PipelineJob(model=self.model, batch_size=self.batch_size, mapping=self.mapping, schedule=self.schedule,
                    microbatches=self.microbatches, optimizer=self.optimizer).check()
        if self.checkpoint or self.checkpoint_every or self.resume:
            raise PlacewiseError("--checkpoint/--resume with --plan are not supported yet: each stage's server "
                                 "saves at its own moment, so the files would not describe one state of the run; "
                                 "drop them or drop --plan")

    def fingerprint(self, features: int, classes: int) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it."""
        return {"model": self.model, "features": features, "classes": classes, "mode": self.mode,
                "optimizer": self.optimizer, "servers": self.server_count(), "dataset": self.dataset,
                "batch_size": self.batch_size, "n_push": self.n_push, "seed": self.seed}


def check_processes(cfg: TrainConfig, world_size: int) -> None:
    """One line when the run would start more than MAX_PROCESSES processes on this machine."""
    if world_size <= MAX_PROCESSES:
        return
    if not cfg.mapping:
        raise PlacewiseError(f"--workers {cfg.workers}: use 1..{MAX_PROCESSES - cfg.server_count()} "
                             f"(at most {MAX_PROCESSES} processes with the servers on one machine)")
    p = cfg.stages
    servers = world_size - cfg.workers * p
    most = (MAX_PROCESSES - servers) // p
    fix = f"use --workers 1..{most}" if most >= 1 else "use a plan with fewer stages or fewer --servers"
    raise PlacewiseError(f"--workers {cfg.workers} with a {p}-stage plan needs {world_size} processes "
                         f"({cfg.workers} x {p} stage processes and {servers} server shard(s)); at most "
                         f"{MAX_PROCESSES} run on one machine: {fix}")


# ---- who holds which parameters ------------------------------------------------------------------
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


# ---- workers -------------------------------------------------------------------------------------
def _maybe_kill(cfg: TrainConfig, rank: int, step: int) -> None:
    if cfg.kill_rank == rank and cfg.kill_at == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Forward and backward of one minibatch (gradients accumulate); returns loss sum and correct count."""
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    return loss.item() * len(y), float((out.argmax(dim=1) == y).sum())


class ServerLink:
    """A worker process's side of the server protocol, with the server shards that hold its parameters
    (every shard for a single-process worker; its stage's shards for a pipeline stage).

    The parameters and their gradients become views of one flat buffer per shard: fetched parameters
    land in the model and pushed gradients leave it without copies. With `shared` buffers (this
    process's `rank` names them) those flat buffers are the ones the server reads and writes."""

    def __init__(self, params: list[nn.Parameter], shards: dict[int, tuple[int, ...]],
                 shared: SharedBuffers | None = None, rank: int = -1) -> None:
        self.servers = sorted(shards)
        self.shared = shared
        self.param_flat: dict[int, torch.Tensor] = {}
        self.grad_flat: dict[int, torch.Tensor] = {}
        for s in self.servers:
            numel = sum(params[i].numel() for i in shards[s])
            pf, pviews = flat_views([params[i] for i in shards[s]],
                                    into=shared.parameters(s, rank, numel) if shared else None)
            gf, gviews = flat_views([torch.zeros_like(params[i]) for i in shards[s]],
                                    into=shared.gradients(s, rank, numel) if shared else None)
            for i, pv, gv in zip(shards[s], pviews, gviews):
                params[i].data = pv
                params[i].grad = gv
            self.param_flat[s], self.grad_flat[s] = pf, gf
        self.reply = torch.zeros(REPLY, dtype=torch.float64)
        self.headers = {s: torch.zeros(HEADER, dtype=torch.float64) for s in self.servers}
        self.fetched = dict.fromkeys(self.servers, 0)
        self.running = set(self.servers)  # shards that have not said STOP

    def exchange(self, kind: Kind, step: int, stats: tuple[float, float, float]) -> int:
        """Send `kind` to every running shard, read their replies; returns the start step (HELLO)."""
        works = []
        for s in sorted(self.running):
            self.headers[s].copy_(torch.tensor([float(kind), step, self.fetched[s], *stats], dtype=torch.float64))
            works.append(dist.isend(self.headers[s], dst=s))
            if kind in (Kind.PUSH, Kind.PUSH_FETCH) and self.shared is None:
                works.append(dist.isend(self.grad_flat[s], dst=s))
        for w in works:
            w.wait()
        start = 0
        for s in sorted(self.running):
            dist.recv(self.reply, src=s)
            if float(self.reply[0]) == STOP:
                self.running.discard(s)
                dist.send(torch.tensor([float(Kind.BYE)] + [0.0] * (HEADER - 1), dtype=torch.float64), dst=s)
                continue
            if kind in (Kind.HELLO, Kind.PUSH_FETCH, Kind.FETCH):
                if self.shared is None:
                    dist.recv(self.param_flat[s], src=s)
                self.fetched[s] = int(self.reply[1])
            if s == self.servers[0]:
                start = int(self.reply[2])
        return start

    def train(self, cfg: TrainConfig, rank: int, start: int, compute: Callable[[int], tuple[float, float, float]],
              go_on: Callable[[], bool], share: Callable[[tuple[float, float, float]], tuple[float, float, float]]
              = lambda stats: stats) -> int:
        """Steps from `start` while `go_on()`: `compute(step)` adds one minibatch's gradients and returns its
        (loss sum, correct, samples); every `n_push` steps the mean gradient is pushed with the steps'
        statistics (`share` may pool them first), every `n_fetch` steps parameters are fetched.
        Returns the step reached."""
        step, accumulated, totals = start, 0, (0.0, 0.0, 0.0)
        while go_on():
            _maybe_kill(cfg, rank, step)
            totals = tuple(a + b for a, b in zip(totals, compute(step)))
            step += 1
            accumulated += 1
            push, fetch = step % cfg.n_push == 0, step % cfg.n_fetch == 0
            if not (push or fetch):
                continue
            if push:
                totals = share(totals)
                if accumulated > 1:
                    for g in self.grad_flat.values():
                        g.div_(accumulated)  # the mean gradient of the accumulated steps
            kind = Kind.PUSH_FETCH if push and fetch else Kind.PUSH if push else Kind.FETCH
            self.exchange(kind, step, totals if push else (0.0, 0.0, 0.0))
            if push:
                for g in self.grad_flat.values():
                    g.zero_()
                accumulated, totals = 0, (0.0, 0.0, 0.0)
        return step


def run_worker(rank: int, cfg: TrainConfig, data: Dataset, model: nn.Module, layout: Layout) -> dict[str, Any]:
    """A single-process parameter-server worker: steps until every server shard has said STOP."""
    worker = rank - layout.servers
    link = ServerLink(list(model.parameters()), layout.stage_shards(0), _shared(cfg), rank)
    stream = BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, worker)

    def compute(step: int) -> tuple[float, float, float]:
        x, y = stream.batch(step)
        return (*_step(model, x, y), float(len(y)))

    start = link.exchange(Kind.HELLO, 0, (0.0, 0.0, 0.0))
    began = time.perf_counter()
    step = link.train(cfg, rank, start, compute, lambda: bool(link.running))
    return {"role": "worker", "rank": rank, "steps": step - start, "seconds": time.perf_counter() - began}


def run_pipeline_worker(rank: int, cfg: TrainConfig, data: Dataset, model: nn.Module, layout: Layout,
                        prepared: Prepared, group) -> dict[str, Any]:
    """One stage of a pipeline worker: its stage of every batch through the schedule, its stage's gradients
    pushed to and parameters fetched from its stage's server shards. `group` is the pipeline's own group."""
    worker, stage_index = divmod(rank - layout.servers, layout.stages)
    link = ServerLink(list(model.parameters()), layout.stage_shards(stage_index), _shared(cfg), rank)
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
        return loss * len(y), float((out.detach().argmax(dim=1) == y).sum()), float(len(y))

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

    start = link.exchange(Kind.HELLO, 0, (0.0, 0.0, 0.0))
    began = time.perf_counter()
    step = link.train(cfg, rank, start, compute, go_on, share)
    return {"role": "stage", "rank": rank, "worker": worker, "stage": stage_index, "steps": step - start,
            "seconds": time.perf_counter() - began}


def run_server(rank: int, cfg: TrainConfig, data: Dataset, model: nn.Module, layout: Layout) -> dict[str, Any]:
    params = list(model.parameters())
    fingerprint = cfg.fingerprint(data.features, data.classes)
    resume = load_checkpoint(checkpoint_path(cfg.resume, rank, cfg.servers), fingerprint) if cfg.resume else None
    settings = ServerSettings(mode=cfg.mode, steps=cfg.total_steps(data.train_size), optimizer=cfg.optimizer,
                              lr=cfg.lr, momentum=cfg.momentum, staleness=cfg.policy(), checkpoint=cfg.checkpoint,
                              checkpoint_every=cfg.checkpoint_every, snapshot_every=_snapshot_every(cfg, data),
                              progress=cfg.progress and rank == 0, fingerprint=fingerprint,
                              kill_at=cfg.kill_at if cfg.kill_rank == rank else None)
    clients = layout.stage_ranks(layout.shard_stage[rank])
    server = ParameterServer(rank, layout.servers, [params[i].detach() for i in layout.shards[rank]], clients,
                             settings, resume, _shared(cfg))
    return server.serve()


def _shared(cfg: TrainConfig) -> SharedBuffers | None:
    return SharedBuffers(cfg.shared_dir) if cfg.shared_dir else None


def run_ddp(rank: int, world_size: int, cfg: TrainConfig, data: Dataset) -> dict[str, Any]:
    """One DDP rank: local forward/backward, all-reduced gradients, its own (optionally fused) optimizer."""
    from torch.nn.parallel import DistributedDataParallel
    model = build_model(cfg.model, data.features, data.classes, cfg.seed)
    steps = cfg.total_steps(data.train_size)
    fingerprint = cfg.fingerprint(data.features, data.classes)
    resume = load_checkpoint(Path(cfg.resume), fingerprint) if cfg.resume else None
    if resume is not None:
        with torch.no_grad():
            for p, saved in zip(model.parameters(), resume["params"]):
                p.copy_(saved)
    ddp = DistributedDataParallel(model)
    if cfg.fuse == "forward":
        from placewise.fuse import fuse_optimizer
        optimizer = fuse_optimizer(model, optimizer_class(cfg.optimizer), mode="forward",
                                   **optimizer_kwargs(cfg.optimizer, cfg.lr, cfg.momentum))
    else:
        optimizer = make_optimizer(cfg.optimizer, list(model.parameters()), cfg.lr, cfg.momentum)
    version = 0
    history: list[dict[str, Any]] = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        version = int(resume["version"])
        history = list(resume["history"]) if rank == 0 else []
    resumed_from = version if resume is not None else None
    stream = BatchStream(data.x_train, data.y_train, cfg.batch_size, cfg.seed, rank)
    every = _snapshot_every(cfg, data)
    snapshots: list[tuple[int, float, torch.Tensor]] = []
    local: list[tuple[float, float, float]] = []  # this rank's (loss sum, correct, samples) per update
    flush = getattr(optimizer, "flush", lambda: None)

    def snapshot(now: float) -> None:
        flush()
        snapshots.append((version, now, torch.cat([p.detach().reshape(-1) for p in model.parameters()])))

    began = time.perf_counter()
    while version < steps:
        _maybe_kill(cfg, rank, version)
        x, y = stream.batch(version)
        optimizer.zero_grad()
        out = ddp(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        version += 1
        local.append((loss.item() * len(y), float((out.argmax(dim=1) == y).sum()), float(len(y))))
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


def _snapshot_every(cfg: TrainConfig, data: Dataset) -> int:
    return cfg.snapshot_every or max(1, cfg.total_steps(data.train_size) // 20)


def rank_main(rank: int, world_size: int, cfg: TrainConfig, data: Dataset | None = None) -> dict[str, Any]:
    """The rank function for `launch` and `run_rank`: server shard, worker, pipeline stage or DDP rank by `rank`.

    `data` comes from the launching process when there is one (loaded once, no scikit-learn import
    per rank); under torchrun each rank loads it."""
    data = data if data is not None else load_dataset(cfg.dataset, cfg.seed)
    if cfg.mode == "ddp":
        return run_ddp(rank, world_size, cfg, data)
    model = build_model(cfg.model, data.features, data.classes, cfg.seed)
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


# ---- the run and its report ----------------------------------------------------------------------
@dataclass
class TrainReport:
    mode: str
    model: str
    parameters: int
    workers: int
    servers: int
    updates: int
    seconds: float
    updates_per_s: float
    final_loss: float
    test_accuracy: float
    mean_staleness: float
    max_staleness: int
    lost_workers: dict[int, str]
    resumed_from: int | None
    curve: list[tuple[int, float, float]] = field(default_factory=list)   # (update, seconds, test accuracy)
    history: list[dict[str, Any]] = field(default_factory=list)            # one entry per update (server 0's)
    stages: int = 1                                                        # processes per worker (pipelines)
    worker_ranks: list[list[int]] = field(default_factory=list)            # each worker's ranks, by stage
    # Pipeline workers: the staleness of every push that stage s's (first) server applied, per stage.
    stage_staleness: list[list[int]] = field(default_factory=list)
    final_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the trained model's

    def time_to_accuracy(self, target: float) -> float | None:
        """Seconds (since serving began) of the first snapshot at `target` test accuracy, if any."""
        return next((t for _, t, acc in self.curve if acc >= target), None)

    @property
    def staleness(self) -> list[int]:
        """Staleness of every push (of every stage's server, for pipeline workers)."""
        if self.stage_staleness:
            return [v for values in self.stage_staleness for v in values]
        return [u["staleness"] for u in self.history if u["worker"] >= 0]

    def to_dict(self, with_history: bool = False) -> dict[str, Any]:
        d = asdict(replace(self, final_state={}))
        d.pop("final_state")
        if not with_history:
            d.pop("history")
        return d


def _run_under_torchrun(cfg: TrainConfig, data: Dataset) -> tuple[list[dict[str, Any]] | None, list]:
    """This process is one rank that torchrun started; rank 0 (server or DDP rank 0) gets the results.

    torchrun stops every rank when one fails, so surviving a dead worker needs the embedded launcher."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if cfg.mapping:
        raise PlacewiseError("--plan with --mode async/sync under torchrun is not supported yet (only the embedded "
                             "launcher collects every stage server's results); run it without torchrun")
    if world != cfg.world_size():
        raise PlacewiseError(f"torchrun started {world} processes; --mode {cfg.mode} with {cfg.workers} worker(s) "
                             f"needs {cfg.world_size()}: set --nproc-per-node (times --nnodes) to that")
    if cfg.server_count() > 1:
        raise PlacewiseError("--servers > 1 under torchrun is not supported yet; use --servers 1 or the embedded "
                             "launcher (run without torchrun)")
    torch.set_num_threads(cfg.threads)
    value = run_rank(rank_main, (cfg, data), timeout_s=cfg.timeout_s)
    return ([value], []) if rank == 0 else (None, [])


def train_data_parallel(cfg: TrainConfig) -> TrainReport | None:
    """Run `cfg` (async, sync or ddp; workers of one process or, with a plan, pipelines) and evaluate its
    snapshots on the test set.

    Starts every rank on this machine over 127.0.0.1, or, under torchrun, is one of the ranks
    (then only rank 0 returns the report; the others return None)."""
    cfg.validate()
    data = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, data.features, data.classes, cfg.seed)
    params = list(model.parameters())
    layout, _ = parameter_layout(cfg, model, data)
    world_size = cfg.workers if cfg.mode == "ddp" else layout.world_size
    check_processes(cfg, world_size)
    if cfg.resume:
        for s in range(cfg.server_count() or 1):
            load_checkpoint(checkpoint_path(cfg.resume, s, cfg.server_count() or 1),
                            cfg.fingerprint(data.features, data.classes))
    worker_ranks = [] if cfg.mode == "ddp" else [layout.worker_ranks(w) for w in range(cfg.workers)]
    if is_torchrun():
        if cfg.transport == "shared":
            raise PlacewiseError("--transport shared needs every rank started by placewise on this machine; under "
                                 "torchrun use --transport gloo (or auto)")
        results, failures = _run_under_torchrun(cfg, data)
        if results is None:
            return None
    else:
        with _shared_folder(cfg, _shared_bytes(layout, params)) as shared_dir:
            results, failures = launch(rank_main, world_size, (replace(cfg, shared_dir=shared_dir), data),
                                       threads=cfg.threads, timeout_s=cfg.timeout_s,
                                       tolerate=[r for ranks in worker_ranks for r in ranks], preload=PRELOAD)
    shards = [list(shard) for shard in layout.shards]
    if cfg.mode == "ddp":
        lead = results[0]
        history = lead["history"]
        start = len(history) - len(lead["local"])
        # Loss and accuracy of an update: all ranks' minibatches together, as the sync server reports them.
        for i, per_rank in enumerate(zip(*(r["local"] for r in results))):
            samples = sum(p[2] for p in per_rank)
            history[start + i]["loss"] = sum(p[0] for p in per_rank) / samples
            history[start + i]["accuracy"] = sum(p[1] for p in per_rank) / samples
        server_results = [lead]
        shards = [list(range(len(params)))]
    else:
        server_results = results[:layout.servers]
        history = server_results[0]["history"]
    lost = {}
    for r in server_results:
        lost.update(r["lost"])
    for f in failures:
        lost.setdefault(f.rank, f.message)
    # A pipeline is lost with any of its stages (its siblings cannot go on without it).
    lost_workers = [w for w, ranks in enumerate(worker_ranks) if any(r in lost for r in ranks)] if worker_ranks \
        else list(lost)
    if cfg.workers - len(lost_workers) < 1:
        raise PlacewiseError(f"all {cfg.workers} workers died before the run finished: "
                             f"{'; '.join(f'rank {r}: {m}' for r, m in sorted(lost.items()))}")
    curve = _evaluate(model, params, shards, server_results, data)
    version = server_results[0]["version"]
    resumed_from = server_results[0]["resumed_from"]
    new_updates = [u for u in history if resumed_from is None or u["version"] > resumed_from]
    seconds = max(r["seconds"] for r in server_results)
    stage_staleness = []
    if cfg.mapping:
        for stage in range(layout.stages):
            first = min(layout.stage_shards(stage), default=None)  # a stage without parameters has no server
            stage_staleness.append([] if first is None else
                                   [u["staleness"] for u in results[first]["history"] if u["worker"] >= 0])
        stale = [v for values in stage_staleness for v in values]
    else:
        stale = [u["staleness"] for u in history if u["worker"] >= 0]
    return TrainReport(
        mode=cfg.mode, model=cfg.model, parameters=sum(p.numel() for p in params), workers=cfg.workers,
        servers=cfg.server_count() if not cfg.mapping else layout.servers, updates=version, seconds=seconds,
        updates_per_s=len(new_updates) / seconds if seconds > 0 else 0.0,
        final_loss=sum(u["loss"] for u in history[-20:]) / max(1, len(history[-20:])),
        test_accuracy=curve[-1][2] if curve else float("nan"),
        mean_staleness=sum(stale) / len(stale) if stale else 0.0, max_staleness=max(stale, default=0),
        lost_workers={int(k): v for k, v in sorted(lost.items())}, resumed_from=resumed_from,
        curve=curve, history=history, stages=cfg.stages, worker_ranks=worker_ranks,
        stage_staleness=stage_staleness,
        final_state={k: v.detach().clone() for k, v in model.state_dict().items()})


def _shared_bytes(layout: Layout, params: list[nn.Parameter]) -> int:
    """Bytes of the shared transport's buffers: a float32 gradient and parameter copy of each shard per client."""
    return sum(8 * sum(params[i].numel() for i in shard) * len(layout.stage_ranks(layout.shard_stage[s]))
               for s, shard in enumerate(layout.shards))


@contextlib.contextmanager
def _shared_folder(cfg: TrainConfig, needed: int) -> Iterator[str | None]:
    """A fresh folder for the shared transport's `needed` bytes of buffers (in memory where /dev/shm
    exists), removed after the run whatever happens; None for the gloo transport, for DDP (no server),
    and for `auto` when the folder's file system has less than twice that free (a full tmpfs would
    kill a rank writing its buffer with SIGBUS instead of an error)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    if cfg.mode == "ddp" or cfg.transport == "gloo":
        yield None
        return
    free = shutil.disk_usage(base).free
    if 2 * needed > free:
        if cfg.transport == "shared":
            raise PlacewiseError(f"--transport shared needs {needed / 2**20:.0f} MiB in {base}, which has "
                                 f"{free / 2**20:.0f} MiB free; free some space there or use --transport gloo")
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="placewise-server-", dir=base) as folder:
        yield folder


def _evaluate(model: nn.Module, params: list[nn.Parameter], shards: list[list[int]],
              server_results: list[dict[str, Any]], data: Dataset) -> list[tuple[int, float, float]]:
    """Test accuracy of every snapshot (shards joined by update number)."""
    by_version: dict[int, list[tuple[float, torch.Tensor]]] = {}
    for r in server_results:
        for version, seconds, flat in r["snapshots"]:
            by_version.setdefault(version, []).append((seconds, flat))
    curve = []
    for version in sorted(by_version):
        parts = by_version[version]
        if len(parts) != len(server_results):
            continue  # a shard that stopped earlier has no copy at this update
        with torch.no_grad():
            for shard, (_, flat) in zip(shards, parts):
                offset = 0
                for i in shard:
                    n = params[i].numel()
                    params[i].copy_(flat[offset:offset + n].view_as(params[i]))
                    offset += n
        curve.append((version, max(s for s, _ in parts), accuracy(model, data.x_test, data.y_test)))
    return curve


def plot_staleness(runs: dict[str, list[int]], path: str | Path) -> Path:
    """A histogram of push staleness per run (label -> staleness values), written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    top = max((max(v, default=0) for v in runs.values()), default=0)
    bins = [b - 0.5 for b in range(top + 2)]
    for label, values in runs.items():
        mean = sum(values) / max(1, len(values))
        # Shares, not counts: runs of different lengths compare on one scale.
        ax.hist(values, bins=bins, alpha=0.6, weights=[1 / max(1, len(values))] * len(values),
                label=f"{label} (mean {mean:.2f}, {len(values)} pushes)")
    ax.set_xlabel("staleness (server updates since the worker fetched)")
    ax.set_ylabel("share of pushes")
    ax.set_ylim(0, 1.35)  # room for the legend above the bars
    ax.set_xticks(range(top + 1))
    ax.set_title("Staleness of asynchronous pushes")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: TrainReport, out: str | Path) -> list[Path]:
    """`report.json` (with the per-update history) and, for async runs, `staleness.png` in `out`."""
    import json
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    written[0].write_text(json.dumps(report.to_dict(with_history=True), indent=1))
    if report.mode == "async" and report.staleness:
        runs = ({f"stage {s} of {report.workers} pipelines": values for s, values in enumerate(report.stage_staleness)}
                if report.stage_staleness else {f"{report.workers} workers": report.staleness})
        written.append(plot_staleness(runs, out / "staleness.png"))
    return written


def print_report(report: TrainReport) -> None:
    """The final report as a rich table on stdout."""
    import sys
    from rich.console import Console
    from rich.table import Table
    workers = f"{report.workers} worker(s)" + (f" of {report.stages} pipeline stages each"
                                                if report.stage_staleness else "")
    table = Table(title=f"{report.mode} training of {report.model} ({report.parameters:,} parameters), "
                        f"{workers}" + (f", {report.servers} server(s)" if report.servers else ""))
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("updates" + (" (per stage server)" if report.stage_staleness else ""),
             f"{report.updates}" + (f" (resumed at {report.resumed_from})"
                                                  if report.resumed_from is not None else "")),
            ("seconds", f"{report.seconds:.2f}"), ("updates/s", f"{report.updates_per_s:.1f}"),
            ("final training loss", f"{report.final_loss:.4f}"), ("test accuracy", f"{report.test_accuracy:.2%}")]
    if report.mode == "async":
        rows += [("mean staleness", f"{report.mean_staleness:.2f}"), ("max staleness", str(report.max_staleness))]
        for stage, values in enumerate(report.stage_staleness):
            rows.append((f"stage {stage}: pushes, mean / max staleness",
                         f"{len(values)}, {sum(values) / len(values):.2f} / {max(values)}" if values else "no server"))
    for target in (0.9, 0.95):
        t = report.time_to_accuracy(target)
        rows.append((f"seconds to {target:.0%} test accuracy", f"{t:.2f}" if t is not None else "not reached"))
    rows.append(("workers lost", "; ".join(f"rank {r}: {m}" for r, m in report.lost_workers.items()) or "none"))
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 120).print(table)
