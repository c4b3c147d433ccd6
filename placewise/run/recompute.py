"""Run a pipeline stage with activation recomputation (`Stage.recompute` in a plan).

The stage's submodule runs under non-reentrant `torch.utils.checkpoint`: its forward saves only its
inputs (torch's receive buffers, or the data on the first stage), and its backward runs the forward
again before going back through it, as the planner costs it (`placewise.plan.recompute`). The random
state is restored for the rerun (checkpoint's default), so dropout draws the same masks. Batch-norm
statistics would move twice (once per run of the forward): the rerun puts the stage's buffers back as
they were before it, so running statistics match a run without recompute.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def recompute(module: nn.Module) -> nn.Module:
    """`module`, its forward now checkpointed (in place: parameter names and the module's type are
    kept, so gradients and state dicts read as without recompute)."""
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        runs = 0

        def run(*inner: Any, **inner_kwargs: Any) -> Any:
            nonlocal runs
            runs += 1
            if runs == 1:
                return forward(*inner, **inner_kwargs)
            # The rerun in the backward: undo what it does to buffers (batch-norm running statistics).
            kept = [b.detach().clone() for b in module.buffers()]
            try:
                return forward(*inner, **inner_kwargs)
            finally:
                with torch.no_grad():
                    for buffer, before in zip(module.buffers(), kept):
                        buffer.copy_(before)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed
    return module
