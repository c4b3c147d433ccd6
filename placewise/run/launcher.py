"""Start one process per rank on this machine, joined in a torch.distributed group over 127.0.0.1.

The embedded default for pipelines and data-parallel training. Under `torchrun` (several machines)
the same rank function runs once per process that torchrun started: see `run_rank`.
A rank that raises stops every other rank; its error is reported once, as a PlacewiseError.
Ranks listed in `tolerate` may fail (async workers): the others carry on and the failure is reported.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable

from placewise.errors import PlacewiseError

LOOPBACK = "127.0.0.1"
# Seconds a terminated rank gets before it is killed.
GRACE = 3.0


@dataclass
class RankFailure:
    rank: int
    message: str
    traceback: str = ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def is_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def _init_group(rank: int, world_size: int, backend: str, timeout_s: float) -> None:
    import torch.distributed as dist
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def run_rank(fn: Callable[..., Any], args: tuple = (), *, backend: str = "gloo", timeout_s: float = 300.0) -> Any:
    """Run `fn(rank, world_size, *args)` in a process started by torchrun (env:// rendezvous)."""
    import torch.distributed as dist
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _init_group(rank, world_size, backend, timeout_s)
    try:
        return fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _child(fn, rank: int, world_size: int, args: tuple, port: int, backend: str, threads: int | None,
           timeout_s: float, results, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    import torch
    import torch.distributed as dist
    if threads:
        torch.set_num_threads(threads)
    try:
        _init_group(rank, world_size, backend, timeout_s)
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


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), *, backend: str = "gloo",
           threads: int | None = 1, timeout_s: float = 600.0, tolerate: Iterable[int] = (),
           env: dict[str, str] | None = None, preload: Iterable[str] = ()) -> tuple[list[Any], list[RankFailure]]:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes; return per-rank results.

    With `preload` (module names, e.g. "torch"), ranks are forked from a fork server that imported
    those modules once per launching process, so repeated launches skip the imports (seconds each);
    `env` then cannot change what those modules read at import time.

    `fn` must be importable (module level). Results come back pickled; a failed tolerated rank gives
    None. Raises PlacewiseError with the first failing rank's error (after stopping the others) when a
    rank outside `tolerate` fails, exits without a result, or the whole run exceeds `timeout_s`.
    """
    if world_size < 1:
        raise PlacewiseError(f"world size is {world_size}; need at least one process")
    preload = list(preload)
    ctx = mp.get_context("forkserver" if preload else "spawn")
    if preload:
        ctx.set_forkserver_preload(preload)
    results = ctx.Queue()
    port = free_port()
    tolerated = set(tolerate)
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, args, port, backend, threads, timeout_s, results,
                                                 dict(env or {})), name=f"placewise-rank{r}")
             for r in range(world_size)]
    values: dict[int, Any] = {}
    failures: dict[int, RankFailure] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while len(values) + len(failures) < world_size:
            try:
                status, rank, payload = results.get(timeout=0.2)
            except queue.Empty:
                # A rank that died without a word (killed, segfault) counts as failed.
                for r, p in enumerate(procs):
                    if r not in values and r not in failures and not p.is_alive() and p.exitcode not in (0, None):
                        time.sleep(0.2)  # its last message may still be in flight
                        if results.empty():
                            failures[r] = RankFailure(r, f"process exited with code {p.exitcode}")
                            if r not in tolerated:
                                raise _failed(failures[r])
                if time.monotonic() > deadline:
                    raise PlacewiseError(f"the run did not finish within {timeout_s:.0f} s; ranks still running: "
                                         f"{[r for r in range(world_size) if r not in values and r not in failures]}")
                continue
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                if rank not in tolerated:
                    raise _failed(_first_cause(payload, procs, values, failures, results))
        for p in procs:
            p.join(GRACE)
    finally:
        _stop(procs)
        results.close()
    return [values.get(r) for r in range(world_size)], [failures[r] for r in sorted(failures)]


# A rank's error that only says its peer went away (gloo's words); the peer's own failure is the news.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _first_cause(failure: RankFailure, procs: list, values: dict, failures: dict, results) -> RankFailure:
    """When `failure` only says a peer went away, wait briefly for the peer's own story: a rank that
    died without a word (killed) or one whose error says something else."""
    if not any(marker in failure.message for marker in PEER_LOST):
        return failure
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            status, rank, payload = results.get(timeout=0.1)
            if status == "error" and not any(marker in payload.message for marker in PEER_LOST):
                return payload
        except queue.Empty:
            for r, p in enumerate(procs):
                if r not in values and r not in failures and not p.is_alive() and p.exitcode not in (0, None):
                    return RankFailure(r, f"process exited with code {p.exitcode}")
    return failure


def _failed(failure: RankFailure) -> PlacewiseError:
    return PlacewiseError(f"rank {failure.rank} failed: {failure.message}")
