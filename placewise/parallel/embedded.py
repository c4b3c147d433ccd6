"""The embedded default: this process starts one process per stage replica (over 127.0.0.1) and drives them.

Each process builds its runner (`rank_runner`: a stage, or a follower of a replicated stage) from the cut
model (fx GraphModules of standard modules, so they travel by pickle even when the user's model class lives
in `__main__`) and then carries out the commands this process sends it: step, eval_step, state_dict,
gradients, load_state_dict, close.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from placewise.errors import PlacewiseError

CLOSE = "close"
# Seconds between looks at whether the stage processes are still alive while waiting for replies.
POLL = 0.2


@dataclass(frozen=True)
class RankSetup:
    """What a stage process needs to build its runner (pickled into it)."""
    prepared: Any
    schedule: Any
    loss_fn: Any
    optimizer: Any
    replicas: tuple[int, ...]  # processes per stage, in stage order (`run.replicas.stage_ranks`)


def _rank_main(rank: int, world_size: int, setup: RankSetup, commands: Sequence[Any], replies: Any) -> None:
    from placewise.parallel.runner import rank_runner
    runner = rank_runner(setup.prepared, rank, world_size, setup.replicas, setup.schedule, setup.loss_fn,
                         setup.optimizer)
    while True:
        command, args = commands[rank].get()
        if command == CLOSE:
            return
        # An exception ends this rank; the launcher stops the others and reports it to the driver.
        replies.put((rank, getattr(runner, command)(*args)))


class EmbeddedStages:
    """Stage processes on this machine, one per replica (`setup.replicas`); `call` sends each rank its
    arguments and returns every rank's reply."""

    def __init__(self, setup: RankSetup, *, backend: str, threads: int, timeout_s: float) -> None:
        from placewise.run.launcher import launch
        if getattr(mp.current_process(), "_inheriting", False):  # multiprocessing's own test for this case
            raise PlacewiseError("parallelize ran again while a stage process imported your script; put the code "
                                 "that calls it under `if __name__ == \"__main__\":`")
        ctx = mp.get_context("spawn")
        self.n = sum(setup.replicas)
        self.commands = [ctx.Queue() for _ in range(self.n)]
        self.replies = ctx.Queue()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                launch(_rank_main, self.n, (setup, self.commands, self.replies), backend=backend, threads=threads,
                       timeout_s=timeout_s)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                self.error = e

        self.thread = threading.Thread(target=run, name="placewise-stages", daemon=True)
        self.thread.start()
        # Stop the stage processes when this is dropped or the interpreter exits without close(): they wait
        # for commands, and multiprocessing would wait for them at exit.
        self._finalizer = weakref.finalize(self, _shut_down, self.commands, self.thread)

    def call(self, command: str, args: Sequence[tuple], timeout_s: float) -> list[Any]:
        """Send `command` with args[r] to rank r (all at once: steps are collective); every rank's reply."""
        for r in range(self.n):
            self.commands[r].put((command, args[r]))
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.n:
            try:
                rank, value = self.replies.get(timeout=POLL)
                replies[rank] = value
            except queue.Empty:
                if self.error is not None or not self.thread.is_alive():
                    raise self._failure() from None
                if time.monotonic() > deadline:
                    raise PlacewiseError(f"the stages did not answer {command} within {timeout_s:.0f} s") from None
        return [replies[r] for r in range(self.n)]

    def _failure(self) -> PlacewiseError:
        message = str(self.error or "the stage processes stopped without a word")
        if "process exited with code" in message:  # died before the launcher could catch anything
            message += ("; a script that calls parallelize must do it under `if __name__ == \"__main__\":` "
                        "(each stage process imports the script)")
        return PlacewiseError(message)

    def close(self) -> None:
        self._finalizer()


def _shut_down(commands: Sequence[Any], thread: threading.Thread, timeout_s: float = 30.0) -> None:
    if thread.is_alive():
        for q in commands:
            q.put((CLOSE, ()))
        thread.join(timeout_s)
