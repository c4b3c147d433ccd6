"""Bucket sizing: how many parameters one fused optimizer call updates, chosen for the machine.

Each bucket update is one Python-level call of the optimizer's ``step()``: a fixed cost (Python,
argument checks, kernel launches) plus a cost per element. Many small buckets give locality and
the earliest release of gradients; each one adds the fixed cost, which on a GPU can exceed the
update itself. ``min_bucket_numel="auto"`` measures both costs with the optimizer's own class,
kernel and hyper-parameters on scratch tensors of the parameters' device and dtype (a few
milliseconds), then takes the smallest buckets whose fixed costs together stay within
`BUDGET` of the update of all parameters in one call, which is part of every training step. Where
even two calls would exceed it, it falls back to unfused: no hooks, torch's own single ``step()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

BUDGET = 0.02  # fixed per-call cost of all buckets, as a fraction of the whole update's time
_SMALL, _LARGE = 1 << 12, 1 << 20  # elements of the two scratch buckets timed
_REPEATS = 7


@dataclass(frozen=True)
class BucketChoice:
    """The bucket size floor in use and why; ``min_bucket_numel=None`` means unfused (torch's own step)."""

    min_bucket_numel: int | None
    reason: str


def fixed(min_bucket_numel: int) -> BucketChoice:
    """The floor the caller gave."""
    return BucketChoice(min_bucket_numel, "given")


def choose_buckets(inner: torch.optim.Optimizer) -> BucketChoice:
    """Measure one optimizer call's fixed and per-element cost here, and size the buckets from them."""
    params = [p for g in inner.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        return BucketChoice(None, "no trainable parameter")
    numel = sum(p.numel() for p in params)
    threads = 1 if params[0].is_cuda else torch.get_num_threads()
    small, large = (_time_step(inner, n, params[0]) for n in (_SMALL, _LARGE))
    # Timed on one CPU thread; the step splits the elements over `threads` (at best perfectly:
    # the per-element cost is taken that low, so the budget affords fewer calls, never more).
    per_element = max(large - small, 0.0) / (_LARGE - _SMALL) / threads
    per_call = max(small - per_element * threads * _SMALL, 1e-9)
    whole = per_call + per_element * numel  # the unfused step: one call over everything
    calls = math.floor(BUDGET * whole / per_call)
    measured = f"{per_call * 1e6:.0f} us per call + {per_element * 1e9:.3f} ns per element, {whole * 1e3:.1f} ms for all"
    if calls < 2:
        return BucketChoice(None, f"{measured}: two calls already cost over {BUDGET:.0%} of that")
    return BucketChoice(math.ceil(numel / calls), f"{measured}: at most {calls} calls within {BUDGET:.0%} of it")


def _time_step(inner: torch.optim.Optimizer, numel: int, like: torch.Tensor) -> float:
    """The fastest of a few steps of `inner`'s class and first group's settings on one scratch tensor."""
    param = torch.zeros(numel, device=like.device, dtype=like.dtype, requires_grad=True)
    param.grad = torch.full_like(param, 1e-3)
    scratch = type(inner)([param])
    scratch.param_groups[0].update({k: v for k, v in inner.param_groups[0].items() if k != "params"})
    step: Callable[[Any], Any] = getattr(type(inner).step, "__wrapped__", type(inner).step)
    if like.is_cuda:  # a GPU's time only shows on the wall clock, once the device has finished
        sync, clock = torch.cuda.synchronize, time.perf_counter
        threads = torch.get_num_threads()
    else:  # one intra-op thread's CPU time: other processes' time slices on a shared CPU do not count
        sync, clock = (lambda: None), time.thread_time
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        step(scratch)  # the first step creates the state
        sync()
        best = math.inf
        for _ in range(_REPEATS):
            start = clock()
            step(scratch)
            sync()
            best = min(best, clock() - start)
    finally:
        torch.set_num_threads(threads)
    return best
