"""The model of data-parallel training: any model placewise builds (its data: `placewise.run.tasks`),
and one minibatch's forward and backward with its loss and correct predictions."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from placewise.run.tasks import build_task_model, hits
from placewise.run.workload import loss_fn


def build_model(spec: str, features: int, classes: int, seed: int,
                input_shape: Sequence[int] | None = None) -> nn.Module:
    """`spec` with weights drawn from `seed` (every rank builds the same one; so does `placewise profile
    SPEC`, whose graph a plan for pipeline workers names). An MLP (`mlp`, `mlp:H1xH2`) takes `features`
    inputs and gives `classes` scores, the data's; any other model is built for `input_shape` (None:
    `tasks.default_input_shape`)."""
    from placewise.profile.models import build_mlp, mlp_widths
    hidden = mlp_widths(spec)
    if hidden is None:
        return build_task_model(spec, input_shape, seed)[0]
    torch.manual_seed(seed)
    return build_mlp(hidden, features, classes)


def correct(output: torch.Tensor, target: torch.Tensor) -> float:
    """Correct predictions of a batch in samples (`tasks.hits`); 0 for regression targets."""
    return hits(output, target) if target.dtype == torch.int64 else 0.0


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Forward and backward of one minibatch (gradients accumulate); returns loss sum and correct count."""
    out = model(x)
    loss = loss_fn(out, y)
    loss.backward()
    return loss.item() * len(y), correct(out, y)
