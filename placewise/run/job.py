"""A pipelined job: what every rank needs to rebuild the same model, cut it the same way and run its stage."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from placewise.errors import PlacewiseError
from placewise.plan.schedule import DEFAULT_SCHEDULE, SCHEDULES
from placewise.run.choices import FUSE_MODES, OPTIMIZERS
from placewise.run.cut import Prepared, cut_model
from placewise.run.recompute import recompute
from placewise.run.workload import batch, build


@dataclass
class PipelineJob:
    """What every rank needs to rebuild the same model, cut it the same way and run its stage."""
    model: str
    batch_size: int
    mapping: dict[str, int] = field(default_factory=dict)  # empty: run the whole model in one process
    recompute: tuple[int, ...] = ()  # stages that recompute their activations in their backward (a plan's)
    input_shape: tuple[int, ...] | None = None
    mode: str = "train"  # train | infer
    schedule: str = DEFAULT_SCHEDULE
    microbatches: int = 4
    steps: int = 1
    warmup: int = 0  # steps run before timing starts
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    fuse: str = "none"  # none | backward | backward-overlap | forward (see placewise.fuse)
    seed: int = 0
    collect: tuple[str, ...] = ()  # grads, outputs, memory (peak live tensor bytes): also return these
    fail_at_step: tuple[int, int] | None = None  # (stage, step): raise there (tests of shutdown)
    progress: bool = False

    @property
    def n_stages(self) -> int:
        return max(self.mapping.values()) + 1 if self.mapping else 1

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
        if self.batch_size % self.microbatches:
            raise PlacewiseError(f"--batch-size {self.batch_size} does not split into {self.microbatches} equal "
                                 "microbatches; make it a multiple of --microbatches")
        outside = [s for s in self.recompute if not 0 <= s < self.n_stages]
        if self.mapping and outside:
            raise PlacewiseError(f"recompute names stage {outside[0]}, but the plan has stages 0..{self.n_stages - 1}; "
                                 "plan again")
        if self.mapping and self.microbatches < self.n_stages:
            raise PlacewiseError(f"--microbatches {self.microbatches} is fewer than the plan's {self.n_stages} stages; "
                                 "torch's pipeline schedules need at least one microbatch per stage")


    @property
    def training(self) -> bool:
        return self.mode == "train"

    def batch(self, example_inputs: tuple[torch.Tensor, ...], output_like: torch.Tensor,
              step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """This job's inputs and targets of `step` (`workload.batch`), the same on every rank."""
        return batch(self.batch_size, self.seed, self.training, example_inputs, output_like, step)


def prepare(job: PipelineJob) -> Prepared:
    """Build, trace and cut the job's model; every rank does the same and gets the same cut."""
    job.check()
    model, example_inputs = build(job.model, job.batch_size, job.input_shape, job.seed)
    model.train(job.training)
    prepared = cut_model(model, example_inputs, job.mapping, job.microbatches)
    if job.training:
        for part in prepared.parts:
            if part.index in job.recompute:
                recompute(part.module)
    return prepared
