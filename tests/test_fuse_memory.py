"""Releasing gradients lowers the live tensor bytes of a training step by what the structure allows.

Measured without any allocator in the way: benchmarks/fusion_memory.py counts the live bytes from
torch profiler's allocation records, at a steady-state step (the optimizer state exists), for the
plain optimizer and for backward fusion with release, on the same model and data. The bounds are
those docs/fusion.md states: release keeps the gradients of the bucket in flight, and a tied
parameter's gradient for the whole backward.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from placewise.fuse import fuse_optimizer

_SPEC = importlib.util.spec_from_file_location("fusion_memory", pathlib.Path(__file__).parents[1] / "benchmarks" / "fusion_memory.py")
assert _SPEC is not None and _SPEC.loader is not None
fusion_memory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fusion_memory)

WIDTH = 256  # each hidden layer's weight: 256 KiB, far above any bookkeeping allocation
VOCAB = 1024
SLACK = 64 << 10  # grad outputs (batch x VOCAB floats) and bookkeeping: small against a 1 MiB layer


class TiedLM(nn.Module):
    """An embedding whose weight is also the output layer's (as GPT-2's), between three hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.body = nn.Sequential(*(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(3)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(ids)) @ self.embed.weight.t()


def mlp() -> nn.Module:
    return nn.Sequential(*(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(4)), nn.Linear(WIDTH, VOCAB))


def peak_held(model: nn.Module, make_opt: Callable[[nn.Module], Any]) -> dict[str, Any]:
    """Live bytes at the peak of the fourth step, and what they are."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (8,))
    x = torch.randn(8, WIDTH) if not isinstance(model, TiedLM) else ids
    fusion_memory.mark_gradients(model)
    opt = make_opt(model)

    def step() -> None:
        with fusion_memory.phase("zero_grad"):
            opt.zero_grad(set_to_none=True)
        with fusion_memory.phase("forward"):
            loss = nn.functional.cross_entropy(model(x), ids)
        with fusion_memory.phase("backward"):
            loss.backward()
        with fusion_memory.phase("step"):
            opt.step()

    step()
    step()
    return fusion_memory.live_peak(step, "cpu")


def grad_bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


@pytest.mark.parametrize("tied", [False, True])
def test_release_keeps_only_the_gradients_in_flight(tied: bool) -> None:
    torch.manual_seed(0)
    base = TiedLM() if tied else mlp()
    plain = peak_held(_copy(base), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True))
    fused = peak_held(_copy(base), lambda m: fuse_optimizer(m, torch.optim.AdamW, "backward", release_grads=True, min_bucket_numel=0, lr=1e-3, fused=True))
    params = list(base.parameters())
    total = sum(grad_bytes(p) for p in params)
    assert plain["held"]["gradients"] + plain["held"]["backward buffers"] >= total  # the plain peak holds every gradient
    largest_layer = max(grad_bytes(m.weight) + grad_bytes(m.bias) for m in base.modules() if isinstance(m, nn.Linear))
    saved = sum(plain["held"].values()) - sum(fused["held"].values())
    if not tied:
        assert fused["held"]["gradients"] <= largest_layer
        assert saved >= total - largest_layer - SLACK
    else:
        # The tied matrix's two parts, the output layer's (a transposed view, held until the end) and
        # the embedding's (dense), and autograd's out-of-place sum of them: three copies, as unfused.
        tied_bytes = grad_bytes(base.embed.weight)
        assert fused["held"]["gradients"] + fused["held"]["backward buffers"] <= 3 * tied_bytes + SLACK
        assert saved >= total - tied_bytes - SLACK


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
