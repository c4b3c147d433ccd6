"""In-process replays of data-parallel runs, the references the server's runs are compared with bitwise.

A replay takes the order a run applied its pushes in (what the server records: which worker, at which
of its steps, how stale) and recomputes the whole run in one process: each gradient on the parameters
that worker had fetched, the staleness policy on it, then the optimizer, over one flat parameter
buffer laid out as a one-shard server lays it out. Of the server's code only the plumbing that lays
views over a flat buffer is shared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from placewise.run.compensation import Compensation
from placewise.run.dataparallel.protocol import views_like
from placewise.run.data import BatchStream
from placewise.run.tasks import Task


@dataclass(frozen=True)
class Push:
    """One update of an asynchronous run: `worker` (0-based) pushed the gradient of its step `step`
    (1-based: steps done), computed on parameters `staleness` updates older than the server's."""
    worker: int
    step: int
    staleness: int


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Compute with `n` torch threads, as the workers do (the reduction order depends on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Replay:
    """The server's flat parameters and optimizer, and a scratch model to compute gradients with."""

    def __init__(self, task: Task, seed: int, lr: float, momentum: float, batch_size: int) -> None:
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.server = task.build(seed)
        self.scratch = task.build(seed)
        tensors = [p.detach() for p in self.server.parameters()]
        self.flat = torch.cat([t.reshape(-1) for t in tensors])
        self.params = views_like(self.flat, tensors)
        self.grad_flat = torch.zeros_like(self.flat)
        for p, g in zip(self.params, views_like(self.grad_flat, tensors)):
            p.grad = g
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        self.streams: dict[int, BatchStream] = {}
        self.losses: list[float] = []

    def gradient(self, worker: int, step: int, at: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Worker `worker`'s gradient of its step `step` (1-based) on flat parameters `at`, and its loss."""
        data = self.task.data
        stream = self.streams.setdefault(worker, BatchStream(data.x_train, data.y_train, self.batch_size,
                                                             self.seed, worker))
        x, y = stream.batch(step - 1)
        with torch.no_grad():
            for p, v in zip(self.scratch.parameters(), views_like(at, list(self.scratch.parameters()))):
                p.copy_(v)
        self.scratch.zero_grad(set_to_none=False)
        loss = self.task.loss(self.scratch(x), y)
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in self.scratch.parameters()]), loss.item()

    def apply(self, grad: torch.Tensor, policy: Compensation | None = None) -> None:
        self.grad_flat.copy_(grad)
        if policy is not None:
            policy.before_step(self.flat)
        self.optimizer.step()
        if policy is not None:
            policy.after_step(self.flat)

    def state(self) -> dict[str, torch.Tensor]:
        """The trained model's state dict (parameters from the flat buffer)."""
        with torch.no_grad():
            for p, v in zip(self.server.parameters(), self.params):
                p.copy_(v)
        return {k: v.detach().clone() for k, v in self.server.state_dict().items()}


def replay_async(task: Task, pushes: list[Push], *, seed: int, lr: float, momentum: float, batch_size: int,
                 policy: Callable[[torch.Tensor, list[int]], Compensation] | None = None,
                 lr_scaling: bool = False, n_threads: int = 1) -> Replay:
    """An asynchronous run (one push and one fetch per step) replayed from its pushes in order. `policy`
    builds the compensation (its state over the flat parameters and the workers); `lr_scaling` divides the
    learning rate by the staleness (Zhang et al. 2016)."""
    with threads(n_threads):
        r = Replay(task, seed, lr, momentum, batch_size)
        versions = [r.flat.clone()]   # the parameters after each update: what a fetch returned
        compensation = policy(r.flat, sorted({p.worker for p in pushes})) if policy else None
        for push in pushes:
            fetched = versions[len(versions) - 1 - push.staleness]
            grad, loss = r.gradient(push.worker, push.step, fetched)
            if compensation is not None:
                compensation.remember(push.worker, fetched)
                compensation.compensate(push.worker, grad, r.flat)
            for group in r.optimizer.param_groups:
                group["lr"] = lr / max(1, push.staleness) if lr_scaling else lr
            r.apply(grad, compensation)
            r.losses.append(loss)
            versions.append(r.flat.clone())
    return r


def replay_sync(task: Task, rounds: list[list[tuple[int, int]]], *, seed: int, lr: float, momentum: float,
                batch_size: int, n_threads: int = 1) -> Replay:
    """A synchronous run replayed from its rounds: each round the list of (worker, step) whose gradients it
    took (with backup workers, the first W - B to arrive), all on the round's parameters, averaged in
    worker order."""
    with threads(n_threads):
        r = Replay(task, seed, lr, momentum, batch_size)
        for members in rounds:
            total, loss_sum = None, 0.0
            for worker, step in sorted(members):
                grad, loss = r.gradient(worker, step, r.flat.clone())
                total = grad if total is None else total.add_(grad)
                loss_sum += loss
            r.apply(total.div_(len(members)))
            r.losses.append(loss_sum / len(members))
    return r


def plain_sgd(task: Task, steps: int, *, seed: int, lr: float, momentum: float, batch_size: int,
              n_threads: int = 1) -> tuple[list[float], nn.Module, torch.optim.Optimizer]:
    """One worker's run without any server: torch.optim.SGD on the model itself, worker 0's batches. Returns
    each step's loss, the model and its optimizer (whose momentum buffers a server's checkpoint holds too)."""
    with threads(n_threads):
        model = task.build(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        stream = BatchStream(task.data.x_train, task.data.y_train, batch_size, seed, worker=0)
        losses = []
        for step in range(steps):
            x, y = stream.batch(step)
            opt.zero_grad()
            loss = task.loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, model, opt
