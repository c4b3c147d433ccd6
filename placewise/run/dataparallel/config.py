"""The settings of a data-parallel run (async, sync or DDP; workers of one process or pipelines),
checked once, with one line per bad setting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from placewise.errors import PlacewiseError
from placewise.plan.schedule import DEFAULT_SCHEDULE
from placewise.run.choices import ASYNC, DATA_PARALLEL_MODES, DDP, DEFAULT_MOMENTUM, SYNC, TRANSPORTS
from placewise.run.compensation import BackupWorkers, DcAsgdOptions, GapAwareOptions
from placewise.run.dataparallel.staleness import Staleness
from placewise.run.faults import fail_step, maybe_fail
from placewise.run.job import PipelineJob
from placewise.run.optim import optimizer_class

# Processes on one machine: beyond this the embedded launcher only thrashes (and gloo opens W*S pairs).
MAX_PROCESSES = 64


@dataclass
class TrainConfig:
    model: str = "mlp"
    mode: str = ASYNC
    workers: int = 2
    servers: int = 1
    n_push: int = 1
    n_fetch: int = 1
    staleness: str = "none"
    dc_asgd: DcAsgdOptions = field(default_factory=DcAsgdOptions)       # with --staleness dc-asgd
    gap_aware: GapAwareOptions = field(default_factory=GapAwareOptions)  # with --staleness gap-aware
    backup_workers: int = 0         # sync: each round takes the first workers - backup_workers gradients
    dataset: str = "digits"
    input_shape: tuple[int, ...] | None = None  # one sample's shape (None: the model's data-parallel default)
    steps: int | None = None        # server updates (async: one per push; sync/ddp: one per round)
    epochs: float | None = None     # or this many passes over the training set, summed over workers
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = DEFAULT_MOMENTUM
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
    schedule: str = DEFAULT_SCHEDULE
    microbatches: int = 4
    # How gradients and parameters travel between workers and servers: "shared" memory (ranks that
    # the embedded launcher starts on this machine), "gloo" messages, or "auto" (shared when possible).
    transport: str = "auto"
    shared_dir: str | None = None   # set by the launching process for the shared transport
    # Set by the launching process: workers rejoin a restarted server (`train.py`), and the ranks that
    # will not rejoin it (dead or done) stay out of the restarted server's clients.
    recover: bool = False
    absent: tuple[int, ...] = ()

    def policy(self) -> Staleness:
        return Staleness.parse(self.staleness)

    def backup(self) -> BackupWorkers:
        return BackupWorkers(self.workers, self.backup_workers)

    @property
    def stages(self) -> int:
        """Processes per worker: the plan's stages, or 1."""
        return max(self.mapping.values()) + 1 if self.mapping else 1

    def world_size(self) -> int:
        """Processes of the run; with a plan, at most this (a stage without parameters has no server)."""
        return self.workers * self.stages if self.mode == DDP else (self.servers + self.workers) * self.stages

    def server_count(self) -> int:
        return 0 if self.mode == DDP else self.servers * self.stages

    def total_steps(self, train_size: int) -> int:
        """Server updates of the run: `steps`, or `epochs` passes over the data (all workers together)."""
        if self.steps is not None:
            return self.steps
        # A sync round with backup workers takes W - B gradients: epochs count the samples it uses.
        per_update = self.batch_size * self.n_push * (1 if self.mode == ASYNC else self.workers - self.backup_workers)
        return max(1, int(-(-self.epochs * train_size // per_update)))

    def validate(self) -> None:
        """Reject bad settings with one line each (the CLI exits 2)."""
        if self.mode not in DATA_PARALLEL_MODES:
            raise PlacewiseError(f"--mode {self.mode!r}: data-parallel modes are {', '.join(DATA_PARALLEL_MODES)}")
        optimizer_class(self.optimizer)
        if self.servers < 1:
            raise PlacewiseError(f"--servers {self.servers}: use 1 or more parameter-server shards")
        if self.mapping:
            self._validate_pipelines()
        elif self.server_count() >= MAX_PROCESSES:
            raise PlacewiseError(f"--servers {self.servers}: use 1..{MAX_PROCESSES - 1} (at most {MAX_PROCESSES} "
                                 f"processes on one machine, the servers and at least one worker)")
        elif self.workers < 1 or self.world_size() > MAX_PROCESSES:
            raise PlacewiseError(f"--workers {self.workers}: use 1..{MAX_PROCESSES - self.server_count()} "
                                 f"(at most {MAX_PROCESSES} processes with the servers on one machine)")
        for flag, value in (("--n-push", self.n_push), ("--n-fetch", self.n_fetch)):
            if value < 1:
                raise PlacewiseError(f"{flag} {value}: must be 1 or more (steps between pushes/fetches)")
        policy = self.policy()
        if self.mode != ASYNC and policy.policy != "none":
            raise PlacewiseError(f"--staleness {self.staleness} applies to --mode async only; {self.mode} has no "
                                 f"stale gradients")
        self.dc_asgd.check()
        self.gap_aware.check()
        if self.backup_workers and self.mode != SYNC:
            raise PlacewiseError(f"--backup-workers {self.backup_workers} applies to --mode sync only (a round that "
                                 f"takes the first W - B gradients); {self.mode} has no rounds to drop them from")
        self.backup().check()
        if self.mode == DDP and (self.n_push, self.n_fetch, self.servers) != (1, 1, 1):
            raise PlacewiseError("--mode ddp has no parameter server: drop --n-push, --n-fetch and --servers")
        if self.mode == SYNC and self.n_fetch != self.n_push:
            raise PlacewiseError(f"--mode sync: --n-fetch {self.n_fetch} must equal --n-push {self.n_push} "
                                 f"(every worker takes the parameters of each synchronous round)")
        if self.fuse != "none":
            if self.mode != DDP:
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
        if self.workers < 1:
            raise PlacewiseError(f"--workers {self.workers}: use 1 or more pipelines")
        # The pipeline's own checks: schedule, optimizer, microbatches against the batch and the stages.
        PipelineJob(model=self.model, batch_size=self.batch_size, mapping=self.mapping, schedule=self.schedule,
                    microbatches=self.microbatches, optimizer=self.optimizer).check()
        if self.backup_workers:
            raise PlacewiseError("--backup-workers with --plan: each stage's server would take its own first W - B "
                                 "pipelines, so one update could mix stages of different pipelines; drop one of them")
        # Sync stage servers all save after the same rounds; async ones at their own moments, and a resumed run
        # reconciles them (each server skips the steps it applied already). DDP's stages have no server to save.
        if self.mode == DDP and (self.checkpoint or self.checkpoint_every or self.resume):
            raise PlacewiseError("--checkpoint/--resume with --plan are not supported yet for --mode ddp: DDP over "
                                 "pipelines keeps no checkpoints yet; use --mode sync or async, or drop them or --plan")

    def snapshot_interval(self, train_size: int) -> int:
        """Updates between parameter copies for the accuracy curve."""
        return self.snapshot_every or max(1, self.total_steps(train_size) // 20)

    def maybe_kill(self, rank: int, step: int) -> None:
        """Fault injection: rank `kill_rank` kills itself (SIGKILL) at its step/update `kill_at`, and so
        does any rank that `PLACEWISE_FAIL_AT` names (`placewise.run.faults`)."""
        maybe_fail(rank, step, (self.kill_rank, self.kill_at))

    def kill_step(self, rank: int) -> int | None:
        """The update at which this process of server `rank` kills itself, if any."""
        return fail_step(rank, (self.kill_rank, self.kill_at))

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
