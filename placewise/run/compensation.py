"""Staleness compensation of asynchronous pushes, and the backup-worker rule of synchronous rounds.

Pure torch on flat parameter and gradient tensors, no processes: the parameter server applies these
to every push of a shard, and the tests replay them in one process. Every formula is written as a
fixed sequence of element-wise operations (no fused multiply-add), so a shard of the server and a
replay over the same flat layout compute the same bits.

A push from worker m carries the gradient g computed on the parameters w_stale that m last fetched;
the server holds w_now, moved by the other workers' pushes since. Three answers from the literature:

- DC-ASGD (Zheng, Meng, Wang, Chen, Yu, Ma, Liu: "Asynchronous Stochastic Gradient Descent with Delay
  Compensation", ICML 2017): the first-order Taylor term of g around w_stale, with the Hessian
  approximated by the outer product of the gradient, diagonal only, scaled by lambda:
  g + lambda * g*g*(w_now - w_stale). DC-ASGD-a makes lambda adaptive per parameter,
  lambda_0 / sqrt(MeanSquare + eps) with MeanSquare a moving average of g*g.
- Gap-aware (Barkai, Hakimi, Schuster: "Gap-Aware Mitigation of Gradient Staleness", ICLR 2020):
  divide each parameter's gradient by its Gap, 1 + |w_now - w_stale| / C, where C is the size of one
  update step of that parameter (a running average), so a parameter that did not move is not
  penalised whatever the step count, and one that moved far is penalised more.
- Synchronous SGD with backup workers (Chen, Pan, Monga, Bengio, Jozefowicz: "Revisiting Distributed
  Synchronous SGD", 2016): with W workers and B backups, a round takes the first W - B gradients
  computed on its parameters and drops the rest, so the B slowest workers never hold a round up.

The server must keep, per worker, the parameters that worker last fetched (`remember`): that is the
per-worker state of both policies (W copies of the shard); gap-aware also keeps the running average
of update sizes (one copy), DC-ASGD-a the running mean square of gradients (one copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from placewise.errors import PlacewiseError


# ---- the formulas ------------------------------------------------------------------------------------
# Each formula writes into `out`, a buffer the server allocates once: a fresh tensor per push of a 1M-parameter
# shard costs more in page faults (about 2 ms each) than the arithmetic, and on a server that shares its cores
# with the workers every millisecond of an update is one the workers wait for.
def delay_term(grad: torch.Tensor, now: torch.Tensor, stale: torch.Tensor, lam: float | torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
    """DC-ASGD's compensation term lambda * g*g*(w_now - w_stale), element-wise, into `out`."""
    return torch.sub(now, stale, out=out).mul_(grad).mul_(grad).mul_(lam)


def delay_compensated(grad: torch.Tensor, now: torch.Tensor, stale: torch.Tensor,
                      lam: float | torch.Tensor) -> torch.Tensor:
    """DC-ASGD's gradient (Zheng et al. 2017, eq. 10): g + lambda * g*g*(w_now - w_stale), element-wise.
    `lam` is a number (DC-ASGD-c) or a tensor like `grad` (DC-ASGD-a's per-parameter lambda)."""
    return grad + delay_term(grad, now, stale, lam, torch.empty_like(grad))


def adaptive_lambda(lam: float, meansquare: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """DC-ASGD-a's per-parameter lambda (Zheng et al. 2017, section 5): lambda_0 / sqrt(MeanSquare + eps)."""
    # rsqrt: one pass where sqrt and reciprocal take two, each as slow as several multiplications.
    return torch.add(meansquare, eps, out=out if out is not None else torch.empty_like(meansquare)).rsqrt_().mul_(lam)


def gap_divisor(now: torch.Tensor, stale: torch.Tensor, step_size: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gap-aware's Gap, 1 + |w_now - w_stale| / C, element-wise, into `out`."""
    return torch.sub(now, stale, out=out).abs_().div_(step_size).add_(1.0)


def gap_penalised(grad: torch.Tensor, now: torch.Tensor, stale: torch.Tensor, step_size: torch.Tensor) -> torch.Tensor:
    """Gap-aware's gradient (Barkai et al. 2020): g / (1 + |w_now - w_stale| / C), element-wise, with C
    (`step_size`, positive) the size of one update step of each parameter. Where w_now = w_stale the
    divisor is exactly 1, so an unstale push is applied unchanged."""
    return grad / gap_divisor(now, stale, step_size, torch.empty_like(grad))


# ---- options -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DcAsgdOptions:
    """`lam` is lambda_0; `meansquare` 0 keeps lambda constant (DC-ASGD-c), a momentum m in (0, 1) makes
    it adaptive (DC-ASGD-a; the paper uses m = 0.95) with MeanSquare = m * MeanSquare + (1 - m) * g*g."""
    lam: float = 0.04
    meansquare: float = 0.0
    eps: float = 1e-7

    def check(self) -> None:
        if not self.lam >= 0:
            raise PlacewiseError(f"--dc-lambda {self.lam}: use 0 or more (0 is plain asynchronous SGD)")
        if not 0 <= self.meansquare < 1:
            raise PlacewiseError(f"--dc-meansquare {self.meansquare}: use 0 (constant lambda) or a momentum in (0, 1)")


@dataclass(frozen=True)
class GapAwareOptions:
    """C, the size of one update step, is the root of a moving average (momentum `decay`, bias-corrected
    as Adam's) of the squared steps the server actually applied, w_after - w_before, per parameter:
    the steps include the optimizer's momentum, which the gap also accumulates."""
    decay: float = 0.99
    eps: float = 1e-12

    def check(self) -> None:
        if not 0 <= self.decay < 1:
            raise PlacewiseError(f"--gap-decay {self.decay}: use a moving-average momentum in [0, 1)")


# ---- per-worker state ------------------------------------------------------------------------------
class Compensation:
    """What the server keeps for a compensating policy over one flat shard: the parameters each worker
    last fetched. Subclasses transform a pushed gradient in place (`compensate`) and may watch each
    update (`before_step`, `after_step`).

    `stale`, when given, are tensors that already hold what each worker last fetched (the shared
    transport's parameter buffers, which the server fills on every fetch and the worker only reads):
    then nothing is copied per fetch and no copy of the shard is kept per worker."""

    def __init__(self, like: torch.Tensor, workers: list[int], stale: dict[int, torch.Tensor] | None = None) -> None:
        self.owned = stale is None
        self.stale: dict[int, torch.Tensor] = ({w: like.detach().clone() for w in workers} if stale is None
                                               else {w: stale[w] for w in workers})
        self.scratch = torch.empty_like(like)

    def remember(self, worker: int, params: torch.Tensor) -> None:
        """`params` were sent to `worker`: its next pushes are computed on them."""
        if self.owned:
            self.stale[worker].copy_(params)

    def compensate(self, worker: int, grad: torch.Tensor, params: torch.Tensor) -> None:
        raise NotImplementedError

    def before_step(self, params: torch.Tensor) -> None:
        """Called with the parameters just before the optimizer applies an update."""

    def after_step(self, params: torch.Tensor) -> None:
        """Called with the parameters just after the optimizer applied an update."""

    def state_dict(self) -> dict[str, Any]:
        return {"stale": {w: t.clone() for w, t in self.stale.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for w, t in state["stale"].items():
            if w in self.stale:
                self.stale[w].copy_(t)


class DelayCompensation(Compensation):
    """DC-ASGD (Zheng et al. 2017), constant or adaptive lambda (`DcAsgdOptions`)."""

    def __init__(self, like: torch.Tensor, workers: list[int], options: DcAsgdOptions,
                 stale: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__(like, workers, stale)
        self.options = options
        self.meansquare = torch.zeros_like(like) if options.meansquare else None
        self.lam = torch.empty_like(like) if options.meansquare else None   # DC-ASGD-a's lambda, per push

    def compensate(self, worker: int, grad: torch.Tensor, params: torch.Tensor) -> None:
        lam: float | torch.Tensor = self.options.lam
        if self.meansquare is not None and self.lam is not None:
            m = self.options.meansquare
            self.meansquare.mul_(m).add_(torch.mul(grad, grad, out=self.lam).mul_(1.0 - m))
            lam = adaptive_lambda(self.options.lam, self.meansquare, self.options.eps, out=self.lam)
        grad.add_(delay_term(grad, params, self.stale[worker], lam, self.scratch))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "meansquare": None if self.meansquare is None else self.meansquare.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.meansquare is not None and state.get("meansquare") is not None:
            self.meansquare.copy_(state["meansquare"])


class GapAware(Compensation):
    """Gap-aware (Barkai et al. 2020) with C from the steps the server applied (`GapAwareOptions`)."""

    def __init__(self, like: torch.Tensor, workers: list[int], options: GapAwareOptions,
                 stale: dict[int, torch.Tensor] | None = None) -> None:
        super().__init__(like, workers, stale)
        self.options = options
        self.squared_steps = torch.zeros_like(like)   # moving average of (w_after - w_before)**2
        self.steps = 0
        self._before = torch.zeros_like(like)
        self._size = torch.empty_like(like)           # C, recomputed once per update, not once per push
        self._update_size()

    def step_size(self) -> torch.Tensor:
        """C per parameter: the bias-corrected root mean square of the applied steps, at least eps."""
        return self._size

    def _update_size(self) -> None:
        correction = 1.0 - self.options.decay ** self.steps if self.steps else 1.0
        # Clamped before the root: the square root of 0 (a parameter that never moved) is some 5x slower on
        # CPUs than that of a normal number, and C is computed over the whole shard once per update.
        eps = self.options.eps
        torch.div(self.squared_steps, correction, out=self._size).clamp_(min=eps * eps).sqrt_()

    def compensate(self, worker: int, grad: torch.Tensor, params: torch.Tensor) -> None:
        grad.div_(gap_divisor(params, self.stale[worker], self._size, self.scratch))

    def before_step(self, params: torch.Tensor) -> None:
        self._before.copy_(params)

    def after_step(self, params: torch.Tensor) -> None:
        step = torch.sub(params, self._before, out=self.scratch)
        self.squared_steps.mul_(self.options.decay).add_(step.mul_(step).mul_(1.0 - self.options.decay))
        self.steps += 1
        self._update_size()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "squared_steps": self.squared_steps.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.squared_steps.copy_(state["squared_steps"])
        self.steps = int(state["steps"])
        self._update_size()


# ---- synchronous rounds with backup workers --------------------------------------------------------
@dataclass(frozen=True)
class BackupWorkers:
    """Synchronous SGD with `backup` backup workers (Chen et al. 2016): of `workers` workers, a round
    closes with the first `workers - backup` gradients computed on its parameters (fewer when workers
    died: a dead worker uses up a backup); a gradient that arrives after its round closed was computed
    on the previous parameters and is dropped, and its worker takes the new ones."""
    workers: int
    backup: int = 0

    def check(self) -> None:
        if not 0 <= self.backup < self.workers:
            raise PlacewiseError(f"--backup-workers {self.backup}: use 0..{self.workers - 1} (each round needs at "
                                 f"least one of the {self.workers} workers' gradients)")

    def quorum(self, live: int) -> int:
        """Gradients that close a round when `live` workers are alive."""
        return max(1, min(self.workers - self.backup, live))

    @staticmethod
    def accepts(fetched_version: int, version: int) -> bool:
        """A push joins the open round only if computed on that round's parameters."""
        return fetched_version == version
