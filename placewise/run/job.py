"""A pipelined job: what every rank needs to rebuild the same model, cut it the same way and run its stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from placewise.errors import PlacewiseError
from placewise.plan.schedule import DEFAULT_SCHEDULE, SCHEDULES
from placewise.run.choices import DEFAULT_MOMENTUM, FUSE_MODES, OPTIMIZERS
from placewise.run.cut import Prepared, cut_model, output_tensor
from placewise.run.replicas import check_replicas, check_shardable
from placewise.run.recompute import recompute
from placewise.run.workload import batch, build


@dataclass
class PipelineJob:
    """What every rank needs to rebuild the same model, cut it the same way and run its stage."""
    model: str
    batch_size: int
    mapping: dict[str, int] = field(default_factory=dict)  # empty: run the whole model in one process
    recompute: tuple[int, ...] = ()  # stages that recompute their activations in their backward (a plan's)
    replicas: tuple[int, ...] = ()  # processes per stage (a plan's `Stage.replicas`); empty: 1 each
    plan_name: str = "the plan"  # where `mapping` and `replicas` came from, for messages
    input_shape: tuple[int, ...] | None = None
    mode: str = "train"  # train | infer
    schedule: str = DEFAULT_SCHEDULE
    microbatches: int = 4
    steps: int = 1
    warmup: int = 0  # steps run before timing starts
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = DEFAULT_MOMENTUM
    fuse: str = "none"  # none | backward | backward-overlap | forward (see placewise.fuse)
    seed: int = 0
    collect: tuple[str, ...] = ()  # grads, outputs, memory (peak live tensor bytes): also return these
    fail_at_step: tuple[int, int] | None = None  # (stage, step): raise there (tests of shutdown)
    progress: bool = False

    @property
    def n_stages(self) -> int:
        return max(self.mapping.values()) + 1 if self.mapping else 1

    @property
    def stage_replicas(self) -> tuple[int, ...]:
        return self.replicas or (1,) * self.n_stages

    @property
    def n_ranks(self) -> int:
        """The processes the job runs on: every stage's replicas."""
        return sum(self.stage_replicas)

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise PlacewiseError(f"schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise PlacewiseError(f"optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.fuse not in FUSE_MODES:
            raise PlacewiseError(f"--fuse {self.fuse!r}: use one of {', '.join(FUSE_MODES)}")
        for name in ("batch_size", "microbatches", "steps"):
            if getattr(self, name) < 1:
                raise PlacewiseError(f"--{name.replace('_', '-')} is {getattr(self, name)}; use 1 or more")
        check_microbatches(self.batch_size, self.microbatches, self.n_stages, flags=True)
        outside = [s for s in self.recompute if not 0 <= s < self.n_stages]
        if self.mapping and outside:
            raise PlacewiseError(f"{self.plan_name}: recompute names stage {outside[0]}, but the plan has stages "
                                 f"0..{self.n_stages - 1}; plan again")
        if self.replicas:
            check_replicas(self.replicas, self.n_stages, self.batch_size, self.microbatches, self.fuse, self.plan_name)

    @property
    def training(self) -> bool:
        return self.mode == "train"

    def batch(self, example_inputs: tuple[torch.Tensor, ...], output_like: torch.Tensor,
              step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """This job's inputs and targets of `step` (`workload.batch`), the same on every rank."""
        return batch(self.batch_size, self.seed, self.training, example_inputs, output_like, step)


def check_microbatches(batch_size: int, microbatches: int, n_stages: int, *, flags: bool) -> None:
    """A batch of `batch_size` must split into `microbatches` equal ones, at least one per stage (torch's
    schedules need that); a PlacewiseError names the numbers as the caller took them: command-line
    flags (`flags`), or the arguments of `placewise.parallelize`."""
    batch, count = ((f"--batch-size {batch_size}", f"--microbatches {microbatches}") if flags else
                    (f"the batch of {batch_size}", f"microbatches={microbatches}"))
    if batch_size % microbatches:
        raise PlacewiseError(f"{batch} does not split into {microbatches} equal microbatches; "
                             + ("make it a multiple of --microbatches" if flags else
                                "give a batch that is a multiple of microbatches"))
    if microbatches < n_stages:
        raise PlacewiseError(f"{count} is fewer than the plan's {n_stages} stages; "
                             "torch's pipeline schedules need at least one microbatch per stage")


def prepare(job: PipelineJob) -> Prepared:
    """Build, trace and cut the job's model; every rank does the same and gets the same cut."""
    job.check()
    model, example_inputs = build(job.model, job.batch_size, job.input_shape, job.seed)
    model.train(job.training)
    prepared = cut_model(model, example_inputs, job.mapping, job.microbatches)
    if job.mapping:
        check_replicated(prepared, job.stage_replicas)
    if job.training:
        for part in prepared.parts:
            if part.index in job.recompute:
                recompute(part.module)
    return prepared


def check_replicated(prepared: Prepared, replicas: Sequence[int]) -> None:
    """Each replicated stage of the cut can share its microbatches by sample (`check_shardable`)."""
    for s, r in enumerate(replicas):
        if r > 1:
            names, values = zip(*_crossing(prepared, s))
            check_shardable(s, r, prepared.parts[s].module, names, values, prepared.micro[0].shape[0])


def _crossing(prepared: Prepared, s: int) -> list[tuple[str, Any]]:
    """The values stage `s` receives and sends, by name (the model's inputs and output at the ends)."""
    part = prepared.parts[s]
    received = ([(n, prepared.values[n]) for n in part.inputs] if s else
                [(f"input {i}", t) for i, t in enumerate(prepared.micro)])
    sent = ([(n, prepared.values[n]) for n in part.outputs] if part.outputs else
            [("the model's output", output_tensor(prepared.values, prepared.gm))])
    return received + sent
