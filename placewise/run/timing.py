"""What a pipeline stage measures about itself: seconds computing its chunks, and when."""

from __future__ import annotations

import time
from typing import Callable


class StageClock:
    """Seconds a stage spends computing forward and backward chunks (not waiting for its neighbours):
    wall time, and the CPU time of the computing thread (what a one-thread profile measures; it does
    not grow when other processes share the cores). Each timed chunk is also kept as an event
    (forward/backward, microbatch, start, end) on the machine's monotonic clock, which all local
    ranks share, for the pipeline timeline picture."""

    def __init__(self) -> None:
        self.forward = self.backward = self.cpu = 0.0
        self.on = False
        self.events: list[tuple[str, int, float, float]] = []

    def wrap(self, fn: Callable, attr: str) -> Callable:
        def timed(*args, **kwargs):
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    end = time.perf_counter()
                    setattr(self, attr, getattr(self, attr) + end - start)
                    self.cpu += time.thread_time() - start_cpu
                    chunk = args[0] if args and isinstance(args[0], int) else -1
                    self.events.append((attr, chunk, start, end))
        return timed

