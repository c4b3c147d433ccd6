"""The overlap worker: one daemon thread that runs bucket updates beside the rest of backward."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

THREAD_NAME = "placewise-fuse-overlap"
UNBOUNDED_QUEUE = 1024  # updates queued before submit() waits: in practice never
# With released gradients, each queued update holds its bucket's gradients: one queued behind the
# running one keeps the worker busy, and backward waits rather than piling up gradients.
RELEASE_QUEUE = 1


class Worker:
    """One daemon thread running the submitted updates in order (torch's kernels release the GIL).

    `submit()` blocks while `maxsize` jobs wait to run. `wait()` blocks until every submitted job ran
    and re-raises the first exception one raised (the jobs after a failed one are skipped: the step
    is broken anyway). `stop()` ends the thread.
    The thread holds the worker, never the optimizer, except through a job while it is queued.
    """

    def __init__(self, maxsize: int = UNBOUNDED_QUEUE) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize)
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not finished yet."""
        return self._jobs.unfinished_tasks

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=_work, args=(self._jobs, self), name=THREAD_NAME, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def wait(self, raise_error: bool = True) -> None:
        if self._thread is None or self._thread is threading.current_thread():
            return
        self._jobs.join()
        if raise_error and self.error is not None:
            error, self.error = self.error, None
            raise error

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._jobs.put(None)
        # __del__ may run on the worker itself, or at interpreter exit, when daemon threads no longer run.
        if thread is not threading.current_thread() and not sys.is_finalizing():
            thread.join()


def _work(jobs: queue.Queue[Callable[[], None] | None], worker: Worker) -> None:
    """The worker thread's loop: run jobs until the None sentinel."""
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            if worker.error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the thread that waits
                    worker.error = exc
        finally:
            job = None  # a job holds the optimizer: drop it before blocking on the next one
            jobs.task_done()
