"""Bucket sizing: how many parameters one fused optimizer call updates, chosen for the machine.

Each bucket update is one Python-level call of the optimizer's ``step()``: a fixed cost (Python,
argument checks, kernel launches) on top of the elementwise work; each fused parameter also costs
one gradient hook. Many small buckets give locality and the earliest release of gradients, but
each adds the fixed cost, which on a GPU can exceed the update itself. ``min_bucket_numel="auto"``:

1. At construction, times one call of the optimizer's own class, kernel and hyper-parameters on a
   small scratch tensor of the parameters' device and dtype (about a millisecond), and starts with
   `PROVISIONAL` buckets (small: the first steps' peak memory counts too).
2. Once `TIMED_STEPS` training steps were timed (between ``step()`` calls: the process's CPU time
   on a CPU, the wall clock on a GPU; the first step left out: it creates the optimizer state; the
   shortest is kept, the least disturbed by other processes), it re-sizes the buckets to the smallest whose fixed costs, with the hooks', fit in
   `BUDGET` of the step without them. Where even two calls do not fit, it falls back to unfused:
   no hooks, torch's own single ``step()``.
3. Without ``release_grads``, it also times as many unfused steps in between and falls back to
   unfused if the fused step was more than `BUDGET` slower: fusion can lose to one fused call for
   reasons no per-call cost shows (the updates' memory traffic evicting backward's data from the
   cache). With ``release_grads`` the unfused trial is skipped, since an unfused step holds every
   gradient at once and would raise the peak that releasing lowers; only the fixed costs are bounded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

BUDGET = 0.01  # fixed costs of all bucket calls and hooks, as a fraction of the training step
TIMED_STEPS = 3
PROVISIONAL = 1 << 18  # elements: the bucket floor until the step was timed
HOOK_SECONDS = 5e-6  # one gradient hook's Python cost (measured: 2-core AMD EPYC, torch 2.14, 2026-11-28)
_SCRATCH = 1 << 12  # elements of the scratch bucket timed
_REPEATS = 7


@dataclass(frozen=True)
class CallCost:
    """What fusing costs here beyond the unfused optimizer's work: `per_call` per bucket, a hook per tensor."""

    per_call: float
    numel: int
    tensors: int
    on_cpu: bool = True

    def overhead(self, choice: BucketChoice, buckets: int) -> float:
        """Seconds per step that bucket calls and hooks add under `choice` with this many buckets."""
        return 0.0 if choice.min_bucket_numel is None else buckets * self.per_call + self.tensors * HOOK_SECONDS

    def choose(self, step: float) -> BucketChoice:
        """The smallest buckets whose fixed costs and hooks fit in `BUDGET` of a `step`-second training step."""
        calls = math.floor((BUDGET * step - self.tensors * HOOK_SECONDS) / self.per_call)
        measured = f"{self.per_call * 1e6:.0f} us per call, {step * 1e3:.1f} ms per step"
        if calls < 2:
            return BucketChoice(None, f"{measured}: two calls and the hooks exceed {BUDGET:.0%} of the step", self)
        return BucketChoice(math.ceil(self.numel / calls), f"{measured}: up to {calls} calls within {BUDGET:.0%} of the step", self)


@dataclass(frozen=True)
class BucketChoice:
    """The bucket size floor in use and why; ``min_bucket_numel=None`` means unfused (torch's own step).

    `cost` is set when the choice was measured ("auto"): the step timing may then revise it.
    """

    min_bucket_numel: int | None
    reason: str
    cost: CallCost | None = None


def fixed(min_bucket_numel: int) -> BucketChoice:
    """The floor the caller gave."""
    return BucketChoice(min_bucket_numel, "given")


def choose_buckets(inner: torch.optim.Optimizer) -> BucketChoice:
    """Measure one optimizer call's fixed cost here; provisional buckets until the step was timed."""
    params = [p for g in inner.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        return BucketChoice(None, "no trainable parameter")
    try:
        per_call = _time_step(inner, _SCRATCH, params[0])
    except (TypeError, ValueError, RuntimeError) as exc:  # a class that cannot be built from one tensor alone
        return BucketChoice(PROVISIONAL, f"default: one call could not be timed ({type(exc).__name__})")
    cost = CallCost(per_call, sum(p.numel() for p in params), len(params), on_cpu=params[0].device.type == "cpu")
    return BucketChoice(PROVISIONAL, f"{cost.per_call * 1e6:.0f} us per call; provisional until {TIMED_STEPS} steps are timed", cost)


class StepTimer:
    """Times the first training steps at their boundaries and decides the bucketing from them.

    First `TIMED_STEPS` fused steps (after one left out: it creates the optimizer state); then,
    unless gradients are released (an unfused step holds them all, raising the very peak that
    releasing lowers), as many unfused steps, and fusion is kept only if its step was not more
    than `BUDGET` slower. The shortest step of each kind is kept: the least disturbed by others.
    """

    def __init__(self, cost: CallCost, compare_unfused: bool) -> None:
        self._cost = cost
        self._compare = compare_unfused
        self._stamps: list[float] = []
        self._fused: float | None = None  # the fused step, once timed
        self._overhead = 0.0  # fusion's fixed costs in it
        self.done = False

    def tick(self, overhead: float) -> BucketChoice | None:
        """A step boundary (fusion's fixed costs in this step: `overhead`): a new choice, else None.

        The choice is final once `done`; before, it is the unfused trial.
        """
        # On a CPU this process's CPU time: a shared machine's other processes inflate the wall
        # clock by more than the difference measured. A GPU's step shows on the wall clock only.
        self._stamps.append(time.process_time() if self._cost.on_cpu else time.perf_counter())
        if self._fused is None:
            if len(self._stamps) < TIMED_STEPS + 2:
                return None
            self._fused = min(b - a for a, b in zip(self._stamps[1:], self._stamps[2:]))
            self._overhead = overhead
            self._stamps = self._stamps[-1:]
            if self._compare:
                return BucketChoice(None, "timing the unfused step", self._cost)
            self.done = True
            return self._cost.choose(max(self._fused - overhead, 0.0))
        if len(self._stamps) < TIMED_STEPS + 1:
            return None
        self.done = True
        unfused = min(b - a for a, b in zip(self._stamps, self._stamps[1:]))
        versus = f"fused step {self._fused * 1e3:.1f} ms, unfused {unfused * 1e3:.1f} ms"
        if self._fused > unfused * (1 + BUDGET):
            return BucketChoice(None, f"{versus}: fusion is slower here", self._cost)
        choice = self._cost.choose(max(self._fused - self._overhead, 0.0))
        return BucketChoice(choice.min_bucket_numel, f"{choice.reason}; {versus}", self._cost)


def _time_step(inner: torch.optim.Optimizer, numel: int, like: torch.Tensor) -> float:
    """The fastest of a few steps of `inner`'s class and first group's settings on one scratch tensor."""
    param = torch.zeros(numel, device=like.device, dtype=like.dtype, requires_grad=True)
    param.grad = torch.full_like(param, 1e-3)
    scratch = type(inner)([param])
    scratch.param_groups[0].update({k: v for k, v in inner.param_groups[0].items() if k != "params"})
    step: Callable[[Any], Any] = getattr(type(inner).step, "__wrapped__", type(inner).step)
    threads = torch.get_num_threads()
    if like.is_cuda:  # a GPU's time only shows on the wall clock, once the device has finished
        sync, clock = torch.cuda.synchronize, time.perf_counter
    else:  # one intra-op thread's CPU time: other processes' time slices on a shared CPU do not count
        sync, clock = (lambda: None), time.thread_time
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
