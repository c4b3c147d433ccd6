"""One rank's stage of a parallelized model: a training step, a forward-only step, and its state.

The stage is built by run/'s stage runtime (`stage_schedule`: a `PipelineStage` with static shapes and
torch's GPipe or 1F1B schedule); this adds what a user's training loop needs between steps. State and
gradients are keyed as in the unsplit model: a stage module keeps its parameters at their original
dotted names.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from placewise.errors import PlacewiseError
from placewise.plan.schedule import Schedule
from placewise.run.cut import Prepared
from placewise.run.stage import stage_schedule

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class StageRunner:
    """Stage `index` of `prepared` (every rank of the pipeline's group builds its own, collectively)."""

    def __init__(self, prepared: Prepared, index: int, schedule: Schedule, loss_fn: LossFn | None,
                 optimizer: OptimizerFactory | None, group: Any = None) -> None:
        self.index, self.n_stages = index, len(prepared.parts)
        self.module, self.stage, self.schedule = stage_schedule(
            prepared, index, schedule=schedule.kind, microbatches=schedule.microbatches, training=True,
            group=group, loss=loss_fn)
        # torch's eval() still computes the loss when the schedule has one (and wants targets): forward-only
        # steps go through a second schedule, without a loss, over the same stage.
        self.forward_only = type(self.schedule)(self.stage, schedule.microbatches)
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = optimizer(params) if optimizer is not None and params else None

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
        if self.optimizer is not None:
            self.optimizer.step()
        return float(torch.stack(losses).sum().detach()) if self.last else None

    def eval_step(self, inputs: tuple[torch.Tensor, ...] | None) -> torch.Tensor | None:
        """The model's output for `inputs`, forward only, in eval mode; on the last stage, else None."""
        self.module.eval()
        try:
            with torch.no_grad():
                out = self.forward_only.eval(*self._args(inputs))
        finally:
            self.module.train()
        return out.detach().cpu() if self.last else None

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


def merge_states(parts: list[Mapping[str, torch.Tensor]], keys: list[str],
                 fallback: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unsplit model's state (in its key order) from the stages' states; what no stage holds (modules the
    forward never calls) comes from `fallback`, the model as it was given."""
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            merged.setdefault(k, v)
    return {k: merged[k] if k in merged else fallback[k] for k in keys}
