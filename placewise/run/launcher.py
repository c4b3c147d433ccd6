"""Start one process per rank on this machine, joined in a torch.distributed group over 127.0.0.1.

The embedded default for pipelines and data-parallel training. Under `torchrun` (several machines)
the same rank function runs once per process that torchrun started: see `run_rank`.
A rank that raises stops every other rank; its error is reported once, as a PlacewiseError.
Ranks listed in `tolerate` may fail (async workers): the others carry on and the failure is reported.

Nothing outlives a run. The ranks meet through a file store in the run's own temporary folder, so a
local run opens no listening socket beyond gloo's on the loopback interface. A rank that dies before
every rank has joined the group fails the run at once (the others would wait in the rendezvous).
SIGTERM and SIGHUP to the launching process stop every rank, as SIGINT does; a rank whose launcher
died (even by SIGKILL) removes the run's folders and exits. `restart` lets a failed rank be replaced
by a fresh process in a new group generation (`rejoin_group`): the parameter server's recovery.

Every rank runs glibc's malloc as a caching allocator (`caching_malloc`), as torch's own CPU launcher
(`torch.backends.xeon.run_cpu`) preloads jemalloc or tcmalloc: a training step frees and allocates
the same large tensors (activations, gradients after `zero_grad`), and with glibc's defaults the
large ones come back from the kernel as fresh pages each step, page faults included.
PLACEWISE_MALLOC=default in the launching environment keeps glibc's defaults.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import util as mp_util
from typing import Any, Callable, Iterable, Iterator

from placewise.errors import PlacewiseError
from placewise.run.faults import FAIL_AT, INCARNATION, JOIN, maybe_fail

# Seconds a terminated rank gets before it is killed.
GRACE = 3.0


@dataclass
class RankFailure:
    rank: int
    message: str
    traceback: str = ""


def is_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def _init_group(rank: int, world_size: int, backend: str, timeout_s: float, store: Any = None) -> None:
    import torch.distributed as dist
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            store=store)


def caching_malloc() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process: no block mapped on its own
    (M_MMAP_MAX 0) and the heap trimmed only past 2 GiB free (M_TRIM_THRESHOLD, a C int), so a
    step's tensors reuse the last step's pages. False where the C library is not glibc (nothing
    changed, or with PLACEWISE_MALLOC=default in the environment, which keeps glibc's defaults)."""
    import ctypes
    if os.environ.get("PLACEWISE_MALLOC") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def run_rank(fn: Callable[..., Any], args: tuple = (), *, backend: str = "gloo", timeout_s: float = 300.0) -> Any:
    """Run `fn(rank, world_size, *args)` in a process started by torchrun (env:// rendezvous)."""
    import torch.distributed as dist
    caching_malloc()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _init_group(rank, world_size, backend, timeout_s)
    try:
        return fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


# ---- inside a rank -------------------------------------------------------------------------------
@dataclass
class _RankContext:
    """What a rank started by `launch` knows about its run (None under torchrun)."""
    rank: int
    world_size: int
    backend: str
    timeout_s: float
    run_dir: str
    generation: int
    results: Any                   # the launcher's queue: "ready" notes go there too

    def join(self) -> None:
        """Join generation `generation`'s group (a fresh store file: no key of an older one is seen)."""
        import torch.distributed as dist
        maybe_fail(self.rank, JOIN)
        store = dist.FileStore(os.path.join(self.run_dir, f"store.{self.generation}"), self.world_size)
        _init_group(self.rank, self.world_size, self.backend, self.timeout_s, store)
        self.results.put(("ready", self.rank, self.generation))


_context: _RankContext | None = None


def run_folder() -> str | None:
    """The run's own temporary folder, shared by its ranks and its launcher (None under torchrun)."""
    return _context.run_dir if _context is not None else None


def rejoin_group() -> None:
    """Leave this rank's process group and join the next generation's, where the launcher has started a
    fresh process for a rank that died (see `launch`'s `restart`). Every surviving rank must call it."""
    import torch.distributed as dist
    if _context is None:
        raise PlacewiseError("a rank can only rejoin a group that placewise's own launcher started (not torchrun)")
    with contextlib.suppress(Exception):  # the dead peer's connections are broken; leaving is local
        dist.destroy_process_group()
    _context.generation += 1
    _context.join()


def _watch_launcher(cleanup: list[str]) -> None:
    """Exit when the launching process is gone (killed with SIGKILL, say), after removing the run's
    folders: nobody else is left to remove them, and a rank must not compute for nobody."""
    from multiprocessing.connection import wait
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-launcher").start()


def _no_shared_tqdm_lock() -> None:
    """torch.fx's Interpreter opens a tqdm bar, and tqdm's first bar makes a process-shared lock: a named
    semaphore that a killed rank leaks, and the launcher's resource tracker then warns about at exit.
    A rank draws no bar shared with other processes: a lock of its own threads is enough."""
    try:
        from tqdm.std import TqdmDefaultWriteLock
    except ImportError:
        return
    TqdmDefaultWriteLock.mp_lock = None


def _child(fn, rank: int, world_size: int, args: tuple, run_dir: str, backend: str, threads: int | None,
           timeout_s: float, results, env: dict[str, str], generation: int, cleanup: list[str]) -> None:
    global _context
    _watch_launcher(cleanup)
    _no_shared_tqdm_lock()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    import torch
    import torch.distributed as dist
    if threads:
        torch.set_num_threads(threads)
    caching_malloc()
    try:
        _context = _RankContext(rank, world_size, backend, timeout_s, run_dir, generation, results)
        _context.join()
        value = fn(rank, world_size, *args)
        # Plain pickle: tensors go by value, not as shared-memory handles that die with this process.
        results.put(("ok", rank, pickle.dumps(value)))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent once
        # One line: the first non-blank line of the message (torch's often start with a newline).
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        message = first if isinstance(e, PlacewiseError) else f"{type(e).__name__}: {first}".rstrip(": ")
        results.put(("error", rank, RankFailure(rank, message,
                                                traceback.format_exc())))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - peers may be gone already
                pass


def _absent(rank: int, world_size: int) -> None:
    """Stands in for a rank that died before its group's generation changed: joins, then leaves."""


# ---- the launching process -----------------------------------------------------------------------
class Stopped(PlacewiseError):
    """The launching process was asked to stop (SIGTERM or SIGHUP) and stopped every rank."""


def _stopped(signum: int) -> Stopped:
    return Stopped(f"stopped by {signal.Signals(signum).name}; every process of the run was stopped")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """SIGTERM and SIGHUP raise `Stopped` in the main thread, so the run's clean-up runs as for Ctrl-C.
    Yields `deferred()`: a context in which they wait until it ends (the clean-up itself must finish:
    a second SIGTERM would otherwise leave the run's folder behind)."""
    pending: list[int] = []
    deferring = [False]

    def stop(signum, frame) -> None:
        if deferring[0]:
            pending.append(signum)
            return
        raise _stopped(signum)

    @contextlib.contextmanager
    def deferred() -> Iterator[None]:
        deferring[0] = True
        try:
            yield
        finally:
            deferring[0] = False
        if pending:
            raise _stopped(pending[0])

    if threading.current_thread() is not threading.main_thread():
        yield contextlib.nullcontext
        return
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield deferred
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(procs: Iterable[mp.Process]) -> None:
    procs = [p for p in procs if p.is_alive()]
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + GRACE
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(1.0)


# restart(rank, failure, gone, run_folder) -> the failed rank's new args (its fresh process joins the next
# group generation), or None to fail the run as usual; it may raise PlacewiseError to fail it with a
# reason. `gone`: the ranks that will not join that generation (failed before, or finished).
Restart = Callable[[int, "RankFailure", set[int], str], "tuple | None"]


@dataclass
class _Launch:
    """The processes of one `launch` and what they have said so far."""
    ctx: Any
    fn: Callable[..., Any]
    world_size: int
    settings: tuple                      # _child's (backend, threads, timeout_s, results, env)
    run_dir: str
    cleanup: list[str]
    tolerated: set[int]
    restart: Restart | None
    procs: dict[int, mp.Process] = field(default_factory=dict)
    placeholders: list[mp.Process] = field(default_factory=list)
    incarnations: dict[int, int] = field(default_factory=dict)
    values: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, RankFailure] = field(default_factory=dict)
    ready: set[int] = field(default_factory=set)
    generation: int = 0

    def start(self, rank: int, fn: Callable[..., Any], args: tuple) -> mp.Process:
        backend, threads, timeout_s, results, env = self.settings
        k = self.incarnations.get(rank, -1) + 1
        if fn is self.fn:
            self.incarnations[rank] = k
        p = self.ctx.Process(target=_child, name=f"placewise-rank{rank}", args=(
            fn, rank, self.world_size, args, self.run_dir, backend, threads, timeout_s, results,
            # The launching process's faults now, not the fork server's environment from its start.
            {**env, INCARNATION: str(k), FAIL_AT: os.environ.get(FAIL_AT, "")}, self.generation, self.cleanup))
        p.start()
        return p

    @property
    def results(self):
        return self.settings[3]

    def pending(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self.values and r not in self.failures]

    def on_failure(self, failure: RankFailure) -> None:
        """A rank failed: restart it, tolerate it, or raise the run's error."""
        rank = failure.rank
        if rank not in self.ready:
            # The others wait for it in the rendezvous (or will, at their next collective).
            raise PlacewiseError(f"rank {rank} failed while the ranks were joining their process group: "
                                 f"{failure.message}")
        if self.restart is not None:
            args = self.restart(rank, failure, {*self.failures, *self.values}, self.run_dir)
            if args is not None:
                self._restart(rank, args)
                return
        self.failures[rank] = failure
        if rank not in self.tolerated:
            raise _failed(failure)

    def _restart(self, rank: int, args: tuple) -> None:
        self.generation += 1
        gone = {*self.failures, *self.values}
        self.ready = set(gone)  # the gone stay gone (stood in for); everyone else joins the new generation
        self.procs[rank] = self.start(rank, self.fn, args)
        self.placeholders += [self.start(r, _absent, ()) for r in gone]

    def dead_without_a_word(self) -> RankFailure | None:
        for r in self.pending():
            p = self.procs[r]
            if not p.is_alive() and p.exitcode not in (0, None):
                time.sleep(0.2)  # its last message may still be in flight
                if self.results.empty():
                    return RankFailure(r, f"process exited with code {p.exitcode}")
        return None

    def receive(self, deadline: float, timeout_s: float) -> None:
        while self.pending():
            try:
                status, rank, payload = self.results.get(timeout=0.2)
            except queue.Empty:
                # A rank that died without a word (killed, segfault) counts as failed.
                failure = self.dead_without_a_word()
                if failure is not None:
                    self.on_failure(failure)
                if time.monotonic() > deadline:
                    raise PlacewiseError(f"the run did not finish within {timeout_s:.0f} s; ranks still running: "
                                         f"{self.pending()}")
                continue
            if status == "ready":
                if payload == self.generation:
                    self.ready.add(rank)
            elif rank not in self.pending():
                continue  # a placeholder's word, or the last word of a rank already replaced
            elif status == "ok":
                self.values[rank] = pickle.loads(payload)
            else:
                if rank not in self.tolerated and rank in self.ready:
                    cause = _first_cause(payload, self)
                    if cause.rank != rank:
                        raise _failed(cause)
                self.on_failure(payload)


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), *, backend: str = "gloo",
           threads: int | None = 1, timeout_s: float = 600.0, tolerate: Iterable[int] = (),
           env: dict[str, str] | None = None, preload: Iterable[str] = (), cleanup: Iterable[str] = (),
           restart: Restart | None = None) -> tuple[list[Any], list[RankFailure]]:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes; return per-rank results.

    With `preload` (module names, e.g. "torch"), ranks are forked from a fork server that imported
    those modules once per launching process, so repeated launches skip the imports (seconds each);
    `env` then cannot change what those modules read at import time. `cleanup` names folders the
    ranks remove should this process die without removing them itself. `restart`: see `Restart`.

    `fn` must be importable (module level). Results come back pickled; a failed tolerated rank gives
    None. Raises PlacewiseError with the first failing rank's error (after stopping the others) when a
    rank outside `tolerate` fails, any rank fails before all have joined the group, a rank exits
    without a result, the whole run exceeds `timeout_s`, or SIGTERM/SIGHUP arrives (`Stopped`).
    """
    if world_size < 1:
        raise PlacewiseError(f"world size is {world_size}; need at least one process")
    preload = list(preload)
    ctx = mp.get_context("forkserver" if preload else "spawn")
    if preload:
        ctx.set_forkserver_preload(preload)
    deadline = time.monotonic() + timeout_s
    with _stop_on_signals() as deferred:
        run_dir, run = None, None
        try:
            with deferred():  # the folder is made and named here, or not at all
                # The launching pid in the name tells whose folder it is while that process lives.
                run_dir = tempfile.mkdtemp(prefix=f"placewise-run-{os.getpid()}-")
            # The fork server listens on a socket in this process's multiprocessing temp folder
            # (pymp-*), which only this process's exit removes: after a SIGKILL the ranks must.
            forkserver_dir = [mp_util.get_temp_dir()] if preload else []
            run = _Launch(ctx, fn, world_size, (backend, threads, timeout_s, ctx.Queue(), dict(env or {})),
                          run_dir, [run_dir, *cleanup, *forkserver_dir], set(tolerate), restart)
            for r in range(world_size):
                run.procs[r] = run.start(r, fn, args)
            run.receive(deadline, timeout_s)
            for p in run.procs.values():
                p.join(GRACE)
        finally:
            with deferred():
                if run is not None:
                    _stop([*run.procs.values(), *run.placeholders])
                    run.results.close()
                if run_dir is not None:
                    shutil.rmtree(run_dir, ignore_errors=True)
    return [run.values.get(r) for r in range(world_size)], [run.failures[r] for r in sorted(run.failures)]


# A rank's error that only says its peer went away (gloo's words); the peer's own failure is the news.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_lost(failure: RankFailure) -> bool:
    """Whether `failure` only says a peer went away, in its message or in the error it was raised from
    (torch's pipeline stage re-raises a collective's error as "[Stage i] failed to run forward")."""
    return any(marker in failure.message or marker in failure.traceback for marker in PEER_LOST)


def _first_cause(failure: RankFailure, run: _Launch) -> RankFailure:
    """When `failure` only says a peer went away, wait briefly for the peer's own story: a rank that
    died without a word (killed) or one whose error says something else."""
    if not _peer_lost(failure):
        return failure
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            status, rank, payload = run.results.get(timeout=0.1)
            if status == "error" and not _peer_lost(payload):
                return payload
        except queue.Empty:
            for r in run.pending():
                p = run.procs[r]
                if not p.is_alive() and p.exitcode not in (0, None):
                    return RankFailure(r, f"process exited with code {p.exitcode}")
    return failure


def _failed(failure: RankFailure) -> PlacewiseError:
    return PlacewiseError(f"rank {failure.rank} failed: {failure.message}")
