"""The workload of a pipelined run: the model a spec names, its synthetic batches and its loss.

Every rank builds the same model from the same seed and draws the same batches, so the stages of a
pipeline (and the single-process reference) compute the same mathematics without sending data around.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from placewise.errors import PlacewiseError

# Distinct synthetic batches a run cycles through.
BATCHES = 4


def build(spec: str, batch_size: int, input_shape: Sequence[int] | None = None,
          seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model and a full batch of example inputs, initialised from `seed` (same on every rank).

    `spec` is `package.module:factory` (the factory takes any of `batch_size`, `input_shape`, and returns
    a module or (module, example inputs)) or a model name known to `placewise.profile.models`.
    """
    torch.manual_seed(seed)
    # One place resolves models, so a user factory that fails says so in one line everywhere.
    from placewise.profile.models import build_model, call_factory
    if ":" in spec and spec.partition(":")[0] != "mlp":  # mlp:H1xH2 is a named model
        made = call_factory(spec, batch_size, input_shape)
    else:
        made = build_model(spec, batch_size=batch_size, input_shape=tuple(input_shape) if input_shape else None,
                           seed=seed)
    if isinstance(made, tuple):
        model, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    else:
        if not input_shape:
            raise PlacewiseError(f"model {spec!r} gives no example inputs; pass --input-shape")
        model, inputs = made, (torch.randn(batch_size, *input_shape),)
    if not isinstance(model, nn.Module):
        raise PlacewiseError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    if any(t.shape[0] != batch_size for t in inputs):
        raise PlacewiseError(f"model {spec!r}: example inputs have batch {[t.shape[0] for t in inputs]}, "
                             f"not --batch-size {batch_size}; make the factory honour batch_size")
    return model, inputs


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on class scores (last dim), mean squared error on anything else."""
    if target.dtype == torch.int64:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.mse_loss(output, target)


def batch(batch_size: int, seed: int, training: bool, example_inputs: tuple[torch.Tensor, ...],
          output_like: torch.Tensor, step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Inputs and targets of one step, the same on every rank: synthetic data that cycles through
    BATCHES batches (so training has something to learn), float inputs drawn from the seed, integer
    inputs (token ids) kept; class targets for class scores, regression targets otherwise."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step % BATCHES)
    inputs = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t
                   for t in example_inputs)
    shape = (batch_size, *output_like.shape[1:])
    if output_like.dim() >= 2 and output_like.is_floating_point() and training:
        target = torch.randint(0, output_like.shape[-1], shape[:-1], generator=g)
    else:
        target = torch.randn(shape, generator=g)
    return inputs, target
