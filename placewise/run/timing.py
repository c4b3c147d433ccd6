"""What a pipeline stage measures about itself: seconds computing its chunks, and when, and what it
spends outside them."""

from __future__ import annotations

import time
from typing import Callable


# What a stage does outside its forward and backward chunks, timed separately (wall seconds):
# posting sends and receives, waiting for them, the last stage's loss, a replicated stage's gradient
# all-reduce, the optimizer's update. The last two are also kept as timeline events, as the
# simulation draws them.
OUTSIDE = ("post", "wait", "loss", "allreduce", "update")
EVENTS_OUTSIDE = ("allreduce", "update")


class StageClock:
    """Seconds a stage spends computing forward and backward chunks (not waiting for its neighbours):
    wall time, and the CPU time of the computing thread (what a one-thread profile measures; it does
    not grow when other processes share the cores). Each timed chunk is also kept as an event
    (forward/backward, microbatch, start, end) on the machine's monotonic clock, which all local
    ranks share, for the pipeline timeline picture. `outside` holds the wall seconds of the parts
    named in `OUTSIDE` (what the step spends beyond its chunks)."""

    def __init__(self) -> None:
        self.forward = self.backward = self.cpu = 0.0
        self.outside = dict.fromkeys(OUTSIDE, 0.0)
        self.outside_cpu = dict.fromkeys(OUTSIDE, 0.0)  # the same parts' thread CPU seconds
        self._depth = dict.fromkeys(OUTSIDE, 0)  # per part: timed calls now running
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

    def wrap_outside(self, fn: Callable, part: str) -> Callable:
        """`fn` with its wall time added to `outside[part]`; a call made inside another timed call of
        the same part (torch's sorted p2p batches call the plain one) is not counted twice."""
        def timed(*args, **kwargs):
            self._depth[part] += 1
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[part] -= 1
                if self.on and self._depth[part] == 0:
                    end = time.perf_counter()
                    self.outside[part] += end - start
                    self.outside_cpu[part] += time.thread_time() - start_cpu
                    if part in EVENTS_OUTSIDE:
                        self.events.append((part, -1, start, end))
        return timed

