"""The model of data-parallel training: an MLP named by `mlp`, `mlp:H` or `mlp:H1xH2`."""

from __future__ import annotations

import torch
from torch import nn

from placewise.errors import PlacewiseError


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
