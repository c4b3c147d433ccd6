"""The parameter server of asynchronous data parallelism (Downpour / A-SGD), on torch.distributed p2p.

One server rank holds one shard of the model's parameters (whole tensors; several ranks shard the
model between them) and the optimizer for that shard. Workers talk to it with the request/reply
protocol of `protocol.py`, over gloo, with the bulk data in shared memory (`shared.SharedBuffers`)
when every rank runs on this machine.

The server has one receiving thread per worker, each blocked in `recv(src=worker)`, and each handles
its worker's messages itself under one lock: a push is applied by the thread that received it, with
no hand-over to another thread to wake (on a busy machine every wake-up waits for a core). A worker
that dies closes its connection, its thread's `recv` raises, and the server drops that worker
without waiting for it (gloo cannot time out a receive and use the connection afterwards, so a dead
peer is detected by its closed connection, not a timer).

Modes on the same code path: "async" applies each push as it arrives; "sync" waits for one push
from every live worker, averages them in worker order (deterministic) and steps once. Staleness
policies: `staleness.py`; the compensating ones (DC-ASGD, gap-aware) and the
backup-worker rule of sync rounds: `placewise.run.compensation`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from placewise.errors import PlacewiseError
from placewise.run.choices import BOUND, DC_ASGD, DEFAULT_MOMENTUM, GAP_AWARE, SERVER_MODES, SYNC
from placewise.run.compensation import (BackupWorkers, Compensation, DcAsgdOptions, DelayCompensation, GapAware,
                                        GapAwareOptions)
from placewise.run.dataparallel.checkpoint import checkpoint_path, save_checkpoint
from placewise.run.dataparallel.protocol import CONTINUE, HEADER, STOP, Kind, flat_views, views_like
from placewise.run.dataparallel.shared import SharedBuffers
from placewise.run.dataparallel.staleness import Staleness
from placewise.run.optim import make_optimizer


def record_file(shard: int, folder: str | None) -> str | None:
    """Where server `shard` records its version in the run's `folder` (None: nowhere)."""
    return os.path.join(folder, f"server{shard}.version") if folder else None


def recorded_version(path: str) -> int | None:
    """The last version a server recorded at `path`, if it recorded any."""
    try:
        with open(path, "rb") as f:
            data = f.read(8)
    except OSError:
        return None
    return int.from_bytes(data, sys.byteorder, signed=True) if len(data) == 8 else None


@dataclass
class ServerSettings:
    mode: str                      # "async" or "sync"
    steps: int                     # the run ends when the server has applied this many updates
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = DEFAULT_MOMENTUM
    staleness: Staleness = field(default_factory=Staleness)
    dc_asgd: DcAsgdOptions = field(default_factory=DcAsgdOptions)
    gap_aware: GapAwareOptions = field(default_factory=GapAwareOptions)
    backup_workers: int = 0        # sync: a round closes with the first len(workers) - backup_workers pushes
    checkpoint: str | None = None
    checkpoint_every: int = 0
    snapshot_every: int = 0        # keep a copy of the parameters every this many updates (0: only the last)
    progress: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)
    kill_at: int | None = None     # fault injection: this server kills itself at this update
    version_file: str | None = None  # where each update's version is recorded (see `record_file`)


@dataclass
class Update:
    version: int                   # server updates after this one was applied
    seconds: float                 # since the server started serving
    worker: int                    # worker rank, or -1 for a synchronous round
    loss: float                    # mean training loss of the pushed steps
    accuracy: float                # training accuracy of the pushed steps
    staleness: int
    # (worker, its steps done) of each push this update applied: one for an asynchronous push, the
    # round's members for a synchronous one (what an in-process replay of the run needs).
    pushes: list[tuple[int, int]] = field(default_factory=list)


class ParameterServer:
    """Serves one shard of parameters to `workers` (their ranks) until `settings.steps` updates."""

    def __init__(self, shard: int, servers: int, tensors: list[torch.Tensor], workers: list[int],
                 settings: ServerSettings, resume: dict[str, Any] | None = None,
                 shared: SharedBuffers | None = None) -> None:
        if settings.mode not in SERVER_MODES:
            raise PlacewiseError(f"server mode {settings.mode!r}; use {' or '.join(SERVER_MODES)}")
        self.shard, self.servers, self.workers, self.settings = shard, servers, list(workers), settings
        self.flat, self.params = flat_views(tensors)
        self.grad_flat, grads = flat_views([torch.zeros_like(t) for t in tensors])
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer = make_optimizer(settings.optimizer, self.params, settings.lr, settings.momentum)
        self.base_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.backup = BackupWorkers(len(self.workers), settings.backup_workers)
        self.dropped = 0                         # sync with backup workers: pushes that came too late
        self.version = 0
        self.worker_steps: dict[int, int] = {}
        self.history: list[Update] = []
        self.snapshots: list[tuple[int, float, torch.Tensor]] = []
        # Per-worker receive buffers: a worker waits for its reply before sending again, so its
        # buffer is stable from the moment it is queued until the reply goes out.
        self.shared = shared
        if shared is None:
            self.payload = {w: torch.empty_like(self.flat) for w in self.workers}
        else:
            n = self.flat.numel()
            self.payload = {w: shared.gradients(shard, w, n) for w in self.workers}
            self.worker_params = {w: shared.parameters(shard, w, n) for w in self.workers}
        # An asynchronous push is applied straight from its receive buffer (no copy): per worker,
        # views of that buffer shaped like the parameters, swapped in as their gradients.
        self.payload_grads = {w: views_like(self.payload[w], self.params) for w in self.workers}
        self.own_grads = grads
        # Over shared memory, the buffer a worker computes with is what it last fetched: the policy reads it there.
        self.compensation = _compensation(settings, self.flat, self.workers,
                                          None if shared is None else self.worker_params)
        if resume is not None:
            self.flat.copy_(torch.cat([t.reshape(-1) for t in resume["params"]]))
            self.optimizer.load_state_dict(resume["optimizer"])
            for group, lr in zip(self.optimizer.param_groups, self.base_lr):
                group["lr"] = lr  # this run's --lr, not the last (maybe staleness-scaled) one saved
            self.version = int(resume["version"])
            self.worker_steps = dict(resume["worker_steps"])
            self.history = [Update(**u) for u in resume["history"]]
            if self.compensation is not None:
                self.compensation.load_state_dict(resume["compensation"])
        self.resumed_from = self.version if resume is not None else None
        # The version after every update, where the launching process reads it should this process die:
        # the updates lost since the last checkpoint. A store to a mapped page costs nothing per update.
        self.version_record = None
        if settings.version_file:
            self.version_record = torch.from_file(settings.version_file, shared=True, size=1, dtype=torch.int64)
            self.version_record[0] = self.version
        self.active = set(self.workers)          # alive and not yet told to stop
        self.lost: dict[int, str] = {}
        self.clock = Counter({w: 0 for w in self.workers})  # pushes applied per worker (SSP)
        self.round: dict[int, torch.Tensor] = {}  # sync: worker -> header of its push this round
        self.deferred: dict[int, torch.Tensor] = {}  # bound: worker -> header waiting for its reply
        self._lock = threading.Lock()            # held while a message changes the server's state
        self._finished = threading.Event()       # set once no worker is active (or handling failed)
        self._failure: BaseException | None = None
        self._start, self._serving = time.perf_counter(), False
        self._progress = None

    # ---- receiving ------------------------------------------------------------------------------
    def _receive(self, worker: int) -> None:
        header = torch.zeros(HEADER, dtype=torch.float64)
        while True:
            try:
                dist.recv(header, src=worker)
                kind = Kind(int(header[0]))
                if kind == Kind.BYE:
                    return
                if kind in (Kind.PUSH, Kind.PUSH_FETCH) and self.shared is None:
                    dist.recv(self.payload[worker], src=worker)
            except Exception as e:  # noqa: BLE001 - a closed connection means the worker is gone
                self._locked(self._drop, worker, str(e).splitlines()[0][-160:] if str(e) else type(e).__name__)
                return
            self._locked(self._handle, worker, header.clone())  # kept by sync rounds and deferred replies

    def _locked(self, handler: Any, *args: Any) -> None:
        """Run one message's `handler` under the lock; a failure in it (not the worker's) ends serve()."""
        with self._lock:
            try:
                handler(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised by serve() in the main thread
                self._failure = self._failure or e
            if not self.active or self._failure is not None:
                self._finished.set()

    # ---- serving --------------------------------------------------------------------------------
    def serve(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self._receive, args=(w,), daemon=True, name=f"recv-{w}")
                   for w in self.workers]
        self._start_progress()
        try:
            for t in threads:
                t.start()
            self._finished.wait()
        finally:
            with self._lock:
                self._stop_progress()
        if self._failure is not None:
            raise self._failure
        for t in threads:
            t.join(timeout=5.0)
        self._snapshot(force=True)
        return self._result()

    def _handle(self, worker: int, header: torch.Tensor) -> None:
        kind = Kind(int(header[0]))
        if kind == Kind.HELLO:
            if not self._serving:
                # The clock starts when the first worker is ready, as DDP's starts once its ranks are
                # built: process start-up is not training time.
                self._serving, self._start = True, time.perf_counter()
            if self.done:
                self._finish(worker)
            else:
                self._reply(worker, CONTINUE, fetch=True, start_step=self.worker_steps.get(worker, 0))
        elif kind == Kind.FETCH:
            self._finish(worker) if self.done else self._reply(worker, CONTINUE, fetch=True)
        elif self.done:
            self._finish(worker)
        elif self.settings.mode == SYNC and not self.backup.accepts(int(header[2]), self.version):
            # Computed on an earlier round's parameters: that round closed without it (backup workers).
            self.worker_steps[worker] = int(header[1])
            self.dropped += 1
            self._reply(worker, CONTINUE, fetch=True)
        elif self.settings.mode == SYNC:
            self.round[worker] = header
            self._maybe_close_round()
        elif int(header[1]) <= self.worker_steps.get(worker, 0):
            # A step this server applied before its checkpoint was saved, computed again: the stages of a resumed
            # pipeline restart from the step of their least advanced stage server (`worker.py`), and every
            # server applies each step of each worker once.
            self._reply(worker, CONTINUE, fetch=Kind(int(header[0])) == Kind.PUSH_FETCH)
        else:
            self._apply_push(worker, header)

    @property
    def done(self) -> bool:
        return self.version >= self.settings.steps

    def _apply_push(self, worker: int, header: torch.Tensor) -> None:
        staleness = self.version - int(header[2])
        for p, g in zip(self.params, self.payload_grads[worker]):
            p.grad = g
        if self.settings.staleness.policy == "lr":
            for group, lr in zip(self.optimizer.param_groups, self.base_lr):
                group["lr"] = lr / max(1, staleness)
        if self.compensation is not None:
            self.compensation.compensate(worker, self.payload[worker], self.flat)
        self._step(worker, {worker: header}, staleness)
        self.clock[worker] += 1
        self.deferred[worker] = header
        self._release_deferred()

    def _maybe_close_round(self) -> None:
        if not self.round or len(self.round) < self.backup.quorum(len(self.active)):
            return
        members = sorted(self.round)
        for p, g in zip(self.params, self.own_grads):
            p.grad = g
        # Summed in worker order, whatever order the pushes arrived in: the round is deterministic.
        self.grad_flat.copy_(self.payload[members[0]])
        for w in members[1:]:
            self.grad_flat.add_(self.payload[w])
        self.grad_flat.div_(len(members))
        pushes, self.round = {w: self.round[w] for w in members}, {}
        self._step(-1, pushes, 0)
        for w, header in pushes.items():
            if self.done:
                self._finish(w)
            else:
                self._reply(w, CONTINUE, fetch=Kind(int(header[0])) == Kind.PUSH_FETCH)

    def _step(self, worker: int, pushes: dict[int, torch.Tensor], staleness: int) -> None:
        """Apply the parameters' current gradients (from `pushes`, worker -> header) as one update."""
        if self.compensation is not None:
            self.compensation.before_step(self.flat)
        self.optimizer.step()
        if self.compensation is not None:
            self.compensation.after_step(self.flat)
        self.version += 1
        if self.version_record is not None:
            self.version_record[0] = self.version
        for w, h in pushes.items():
            self.worker_steps[w] = int(h[1])
        loss_sum, correct, samples = (sum(float(h[i]) for h in pushes.values()) for i in (3, 4, 5))
        samples = max(1.0, samples)
        self.history.append(Update(self.version, time.perf_counter() - self._start, worker,
                                   loss_sum / samples, correct / samples, staleness,
                                   [(w, int(h[1])) for w, h in pushes.items()]))
        self._snapshot()
        if self.settings.checkpoint and self.settings.checkpoint_every and \
                self.version % self.settings.checkpoint_every == 0:
            self._checkpoint()
        if self.settings.kill_at is not None and self.version == self.settings.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self._show_progress()

    def _release_deferred(self) -> None:
        """Reply to the pushes whose workers may go on: all once the run is done; under bound:S those
        at most S pushes ahead of the slowest live worker; under other policies, all at once."""
        bound = self.settings.staleness.bound if self.settings.staleness.policy == BOUND else None
        for w in sorted(self.deferred):
            if w not in self.deferred:
                continue  # dropped meanwhile by a failed reply further up this loop
            if w not in self.active:
                del self.deferred[w]
            elif self.done:
                del self.deferred[w]
                self._finish(w)
            elif bound is None or self.clock[w] - min(self.clock[v] for v in self.active) <= bound:
                header = self.deferred.pop(w)
                self._reply(w, CONTINUE, fetch=Kind(int(header[0])) == Kind.PUSH_FETCH)

    def _reply(self, worker: int, status: float, fetch: bool = False, start_step: int = 0) -> None:
        reply = torch.tensor([status, self.version, start_step], dtype=torch.float64)
        send_parameters = fetch and status == CONTINUE
        if send_parameters and self.shared is not None:
            self.worker_params[worker].copy_(self.flat)  # before the reply: the worker reads them after it
        if send_parameters and self.compensation is not None:
            self.compensation.remember(worker, self.flat)
        try:
            dist.send(reply, dst=worker)
            if send_parameters and self.shared is None:
                dist.send(self.flat, dst=worker)
        except Exception as e:  # noqa: BLE001 - the worker died between its message and our reply
            self._drop(worker, str(e).splitlines()[0][-160:] if str(e) else type(e).__name__)

    def _finish(self, worker: int) -> None:
        """Tell `worker` the run is over; it answers BYE, which ends its receiving thread."""
        self._reply(worker, STOP)
        self.active.discard(worker)
        self.deferred.pop(worker, None)

    def _drop(self, worker: int, error: str | None) -> None:
        if worker not in self.active:
            return  # already told to stop: its connection closing is the normal end
        self.active.discard(worker)
        self.lost[worker] = error or "connection lost"
        self.round.pop(worker, None)
        self.deferred.pop(worker, None)
        # A dead worker must not hold up a synchronous round or the slowest-worker bound.
        if self.settings.mode == SYNC:
            self._maybe_close_round()
        else:
            self._release_deferred()

    # ---- records --------------------------------------------------------------------------------
    def _snapshot(self, force: bool = False) -> None:
        every = self.settings.snapshot_every
        due = force or (every and self.version % every == 0)
        if due and (not self.snapshots or self.snapshots[-1][0] != self.version):
            self.snapshots.append((self.version, time.perf_counter() - self._start, self.flat.clone()))

    def _checkpoint(self) -> None:
        state = {"version": self.version, "params": [p.detach().clone() for p in self.params],
                 "optimizer": self.optimizer.state_dict(), "worker_steps": dict(self.worker_steps),
                 "history": [u.__dict__ for u in self.history], "fingerprint": self.settings.fingerprint,
                 "compensation": None if self.compensation is None else self.compensation.state_dict()}
        save_checkpoint(checkpoint_path(self.settings.checkpoint, self.shard, self.servers), state)

    def _result(self) -> dict[str, Any]:
        return {"role": "server", "shard": self.shard, "version": self.version, "dropped": self.dropped,
                "history": [u.__dict__ for u in self.history], "lost": dict(self.lost),
                "snapshots": self.snapshots, "resumed_from": self.resumed_from,
                "seconds": time.perf_counter() - self._start}

    # ---- progress (shard 0 only, on stderr) -----------------------------------------------------
    def _start_progress(self) -> None:
        if not (self.settings.progress and self.shard == 0):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[stats]}"),
                                  console=Console(file=sys.stderr), transient=False)
        self._progress.start()
        self._task = self._progress.add_task(f"{self.settings.mode} training", total=self.settings.steps,
                                             completed=self.version, stats="")
        self._shown = 0.0

    def _show_progress(self) -> None:
        if self._progress is None or not self.history:
            return
        now = time.perf_counter()
        if now - self._shown < 0.2 and not self.done:
            return
        self._shown = now
        recent = self.history[-50:]
        loss = sum(u.loss for u in recent) / len(recent)
        acc = sum(u.accuracy for u in recent) / len(recent)
        stale = sum(u.staleness for u in recent) / len(recent)
        start = self.resumed_from or 0
        rate = (self.version - start) / max(1e-9, now - self._start)
        self._progress.update(self._task, completed=self.version,
                              stats=f"loss {loss:.4f}  train acc {acc:.1%}  {rate:.0f} upd/s  staleness {stale:.2f}"
                                    f"  workers {len(self.active)}/{len(self.workers)}")

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._show_progress()
            self._progress.stop()


def _compensation(settings: ServerSettings, flat: torch.Tensor, workers: list[int],
                  stale: dict[int, torch.Tensor] | None) -> Compensation | None:
    """The state of a compensating staleness policy over this shard's parameters, or None. `stale`: the
    buffers that already hold each worker's fetched parameters (shared transport), or None."""
    policy = settings.staleness.policy
    if policy == DC_ASGD:
        return DelayCompensation(flat, workers, settings.dc_asgd, stale)
    if policy == GAP_AWARE:
        return GapAware(flat, workers, settings.gap_aware, stale)
    return None
