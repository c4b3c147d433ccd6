"""A worker process's side of the parameter-server protocol (`protocol.py`)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.protocol import HEADER, REPLY, STOP, Kind, flat_views
from placewise.run.dataparallel.shared import SharedBuffers
from placewise.run.launcher import PEER_LOST, rejoin_group


class ServerLink:
    """A worker process's side of the server protocol, with the server shards that hold its parameters
    (every shard for a single-process worker; its stage's shards for a pipeline stage).

    The parameters and their gradients become views of one flat buffer per shard: fetched parameters
    land in the model and pushed gradients leave it without copies. With `shared` buffers (this
    process's `rank` names them) those flat buffers are the ones the server reads and writes."""

    def __init__(self, params: list[nn.Parameter], shards: dict[int, tuple[int, ...]],
                 shared: SharedBuffers | None = None, rank: int = -1) -> None:
        self.servers = sorted(shards)
        self.shared = shared
        self.param_flat: dict[int, torch.Tensor] = {}
        self.grad_flat: dict[int, torch.Tensor] = {}
        for s in self.servers:
            numel = sum(params[i].numel() for i in shards[s])
            pf, pviews = flat_views([params[i] for i in shards[s]],
                                    into=shared.parameters(s, rank, numel) if shared else None)
            gf, gviews = flat_views([torch.zeros_like(params[i]) for i in shards[s]],
                                    into=shared.gradients(s, rank, numel) if shared else None)
            for i, pv, gv in zip(shards[s], pviews, gviews):
                params[i].data = pv
                params[i].grad = gv
            self.param_flat[s], self.grad_flat[s] = pf, gf
        self.reply = torch.zeros(REPLY, dtype=torch.float64)
        self.headers = {s: torch.zeros(HEADER, dtype=torch.float64) for s in self.servers}
        self.fetched = dict.fromkeys(self.servers, 0)
        self.running = set(self.servers)  # shards that have not said STOP

    def exchange(self, kind: Kind, step: int, stats: tuple[float, float, float]) -> int:
        """Send `kind` to every running shard, read their replies; returns the start step (HELLO)."""
        works = []
        for s in sorted(self.running):
            self.headers[s].copy_(torch.tensor([float(kind), step, self.fetched[s], *stats], dtype=torch.float64))
            works.append(dist.isend(self.headers[s], dst=s))
            if kind in (Kind.PUSH, Kind.PUSH_FETCH) and self.shared is None:
                works.append(dist.isend(self.grad_flat[s], dst=s))
        for w in works:
            w.wait()
        start = 0
        for s in sorted(self.running):
            dist.recv(self.reply, src=s)
            if float(self.reply[0]) == STOP:
                self.running.discard(s)
                dist.send(torch.tensor([float(Kind.BYE)] + [0.0] * (HEADER - 1), dtype=torch.float64), dst=s)
                continue
            if kind in (Kind.HELLO, Kind.PUSH_FETCH, Kind.FETCH):
                if self.shared is None:
                    dist.recv(self.param_flat[s], src=s)
                self.fetched[s] = int(self.reply[1])
            if s == self.servers[0]:
                start = int(self.reply[2])
        return start

    def call(self, cfg: TrainConfig, kind: Kind, step: int, stats: tuple[float, float, float]) -> int | None:
        """`exchange`; when the server died and the launcher restarts it (`cfg.recover`), rejoin the run's
        group and say HELLO to the successor instead. Returns the step to go on from: HELLO's start
        step, or after a rejoin the step of the successor's checkpoint; None otherwise."""
        try:
            start = self.exchange(kind, step, stats)
            return start if kind == Kind.HELLO else None
        except RuntimeError as e:  # gloo's words for a peer that went away
            if not (cfg.recover and any(marker in str(e) for marker in PEER_LOST)):
                raise
        rejoin_group()
        self.running, self.fetched = set(self.servers), dict.fromkeys(self.servers, 0)
        for g in self.grad_flat.values():
            g.zero_()  # gradients of steps the successor will have this worker compute again
        return self.call(cfg, Kind.HELLO, 0, (0.0, 0.0, 0.0))

    def train(self, cfg: TrainConfig, rank: int, start: int, compute: Callable[[int], tuple[float, float, float]],
              go_on: Callable[[], bool], share: Callable[[tuple[float, float, float]], tuple[float, float, float]]
              = lambda stats: stats) -> int:
        """Steps from `start` while `go_on()`: `compute(step)` adds one minibatch's gradients and returns its
        (loss sum, correct, samples); every `n_push` steps the mean gradient is pushed with the steps'
        statistics (`share` may pool them first), every `n_fetch` steps parameters are fetched.
        Returns the step reached."""
        step, accumulated, totals = start, 0, (0.0, 0.0, 0.0)
        while go_on():
            cfg.maybe_kill(rank, step)
            totals = tuple(a + b for a, b in zip(totals, compute(step)))
            step += 1
            accumulated += 1
            push, fetch = step % cfg.n_push == 0, step % cfg.n_fetch == 0
            if not (push or fetch):
                continue
            if push:
                totals = share(totals)
                if accumulated > 1:
                    for g in self.grad_flat.values():
                        g.div_(accumulated)  # the mean gradient of the accumulated steps
            kind = Kind.PUSH_FETCH if push and fetch else Kind.PUSH if push else Kind.FETCH
            resume_at = self.call(cfg, kind, step, totals if push else (0.0, 0.0, 0.0))
            if resume_at is not None:  # a restarted server: on from its checkpoint's step
                step, accumulated, totals = resume_at, 0, (0.0, 0.0, 0.0)
                continue
            if push:
                for g in self.grad_flat.values():
                    g.zero_()
                accumulated, totals = 0, (0.0, 0.0, 0.0)
        return step
