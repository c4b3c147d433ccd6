"""One rank's part of a parallelized model: a training step, a forward-only step, and its state.

The stage is built by run/'s stage runtime (`stage_schedule`: a `PipelineStage` with static shapes and
torch's GPipe or 1F1B schedule); this adds what a user's training loop needs between steps. State and
gradients are keyed as in the unsplit model: a stage module keeps its parameters at their original
dotted names. A replicated stage runs as run/ runs it (`placewise.run.replicas`): its lead, a
`StageRunner`, takes part in the schedule and spreads each microbatch over the stage's followers,
each a `ReplicaRunner`; the replicas' gradients are summed before the optimizer steps.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence

import torch

from placewise.errors import PlacewiseError
from placewise.plan.schedule import Schedule
from placewise.run.cut import Prepared
from placewise.run.replicas import StageGroup, follow, stage_groups, stage_ranks
from placewise.run.stage import follower, stage_schedule

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def rank_runner(prepared: Prepared, rank: int, world_size: int, replicas: Sequence[int], schedule: Schedule,
                loss_fn: LossFn | None, optimizer: OptimizerFactory | None) -> "StageRunner | ReplicaRunner":
    """Rank `rank`'s part of the pipeline, `replicas[s]` processes for stage s on consecutive ranks, the first
    of each its lead (`run.replicas.stage_ranks`). Every rank calls this at once: it makes the process groups."""
    ranks = stage_ranks(replicas)
    pipeline, groups = stage_groups(replicas, world_size)
    s = next(s for s, members in enumerate(ranks) if rank in members)
    own = StageGroup(groups[s], ranks[s]) if replicas[s] > 1 else None
    _unshared(prepared.parts[s].module)
    if rank != ranks[s][0]:
        return ReplicaRunner(prepared, s, optimizer, own)
    return StageRunner(prepared, s, schedule, loss_fn, optimizer, group=pipeline, replicas=own)


def _unshared(module: torch.nn.Module) -> None:
    """Give `module` tensors of this process's own. The embedded mode sends the cut to its processes through
    multiprocessing, which moves tensors into shared memory, the user's model's own: its stage processes would
    train that model in place, and a stage's replicas would step one copy together."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_shared():
            t.data = t.data.clone()


class _StageState:
    """The state and gradients of one copy of stage `index` (its `module`), under the unsplit model's keys."""

    index: int
    module: torch.nn.Module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def gradients(self) -> dict[str, torch.Tensor]:
        return {k: p.grad.detach().cpu().clone() for k, p in self.module.named_parameters() if p.grad is not None}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load this stage's entries of the unsplit model's `state` (others are ignored)."""
        own = self.module.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise PlacewiseError(f"load_state_dict: stage {self.index} needs {len(missing)} key(s) the state lacks "
                                 f"({', '.join(missing[:3])}); give the unsplit model's state_dict()")
        self.module.load_state_dict({k: state[k] for k in own})


def _optimizer(module: torch.nn.Module, factory: OptimizerFactory | None) -> torch.optim.Optimizer | None:
    params = [p for p in module.parameters() if p.requires_grad]
    return factory(params) if factory is not None and params else None


class StageRunner(_StageState):
    """Stage `index` of `prepared` (every rank of the pipeline's group builds its own, collectively); with
    `replicas`, this process leads that replicated stage."""

    def __init__(self, prepared: Prepared, index: int, schedule: Schedule, loss_fn: LossFn | None,
                 optimizer: OptimizerFactory | None, group: Any = None, replicas: StageGroup | None = None) -> None:
        self.index, self.n_stages = index, len(prepared.parts)
        self.module, self.stage, self.schedule = stage_schedule(
            prepared, index, schedule=schedule.kind, microbatches=schedule.microbatches, training=True,
            group=group, loss=loss_fn, replicas=replicas)
        self.shared = self.stage.submod.replicas if replicas is not None else None
        # torch's eval() still computes the loss when the schedule has one (and wants targets): forward-only
        # steps go through a second schedule, without a loss, over the same stage.
        self.forward_only = type(self.schedule)(self.stage, schedule.microbatches)
        self.optimizer = _optimizer(self.module, optimizer)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1

    def _args(self, inputs: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.stage.device) for t in inputs) if self.first and inputs is not None else ()

    def step(self, inputs: tuple[torch.Tensor, ...] | None, target: torch.Tensor | None) -> float | None:
        """One training step (every rank at once): forward and backward of each microbatch, then the
        optimizer. The gradients stay until the next step. The batch's loss on the last stage, else None."""
        self.module.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        kwargs = {"target": target.to(self.stage.device)} if self.last else {}
        self.schedule.step(*self._args(inputs), losses=losses, **kwargs)
        if self.shared is not None:
            self.shared.end_step()
        if self.optimizer is not None:
            self.optimizer.step()
        return float(torch.stack(losses).sum().detach()) if self.last else None

    def eval_step(self, inputs: tuple[torch.Tensor, ...] | None) -> torch.Tensor | None:
        """The model's output for `inputs`, forward only, in eval mode; on the last stage, else None."""
        self.module.eval()
        try:
            with torch.no_grad():
                out = self.forward_only.eval(*self._args(inputs))
            if self.shared is not None:
                self.shared.command()  # the followers' end of the pass
        finally:
            self.module.train()
        return out.detach().cpu() if self.last else None


class ReplicaRunner(_StageState):
    """A follower of replicated stage `index`: its share of every microbatch, as the stage's lead commands,
    then the replicas' gradients summed and this copy's optimizer step (the same update on every replica)."""

    def __init__(self, prepared: Prepared, index: int, optimizer: OptimizerFactory | None,
                 replicas: StageGroup) -> None:
        self.index = index
        self.shared, self.likes = follower(prepared, index, replicas, training=True)
        self.module = self.shared.module
        self.optimizer = _optimizer(self.module, optimizer)

    def step(self, inputs: Any, target: Any) -> None:
        """The lead's `step`, from this replica's side (the lead holds the batch; the arguments are unused)."""
        self.module.zero_grad(set_to_none=True)
        follow(self.shared, self.likes)
        self.shared.sum_gradients()
        if self.optimizer is not None:
            self.optimizer.step()

    def eval_step(self, inputs: Any) -> None:
        """The lead's `eval_step`, from this replica's side."""
        self.module.eval()
        try:
            with torch.no_grad():
                follow(self.shared, self.likes)
        finally:
            self.module.train()


def merge_states(parts: list[Mapping[str, torch.Tensor]], keys: list[str],
                 fallback: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unsplit model's state (in its key order) from the stages' states; what no stage holds (modules the
    forward never calls) comes from `fallback`, the model as it was given."""
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            merged.setdefault(k, v)
    return {k: merged[k] if k in merged else fallback[k] for k in keys}
