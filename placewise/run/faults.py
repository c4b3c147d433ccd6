"""Fault injection for tests and demos, in the spirit of torchft's `fail_at(rank, step)`.

`PLACEWISE_FAIL_AT="RANK@STEP[,RANK@STEP...]"` makes rank RANK kill itself (SIGKILL, no clean-up: what
a crash or the OOM killer does) when it reaches STEP: a worker or stage at its training step, a
parameter server or DDP rank at its update. The launcher counts how often it started each rank
(its incarnation, in `PLACEWISE_INCARNATION`): the k-th entry for a rank applies to its k-th
process, so `0@40,0@90` kills the server at update 40 and its restarted successor at update 90,
and a restarted rank never repeats its predecessor's fault.
"""

from __future__ import annotations

import functools
import os
import signal

from placewise.errors import PlacewiseError

FAIL_AT = "PLACEWISE_FAIL_AT"
INCARNATION = "PLACEWISE_INCARNATION"


@functools.lru_cache(maxsize=8)  # read at every step: parse each text once
def parse_fail_at(text: str) -> dict[int, tuple[int, ...]]:
    """rank -> the steps at which its successive processes die, from `RANK@STEP,...`."""
    plan: dict[int, list[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        rank, _, step = item.partition("@")
        if not (rank.isdigit() and step.isdigit()):
            raise PlacewiseError(f"{FAIL_AT}={text!r}: {item!r} is not RANK@STEP (two whole numbers, e.g. 0@40)")
        plan.setdefault(int(rank), []).append(int(step))
    return {rank: tuple(steps) for rank, steps in plan.items()}


def incarnation() -> int:
    """How many processes ran this rank before this one (0 for the first)."""
    return int(os.environ.get(INCARNATION, "0"))


def fail_step(rank: int, configured: tuple[int | None, int | None] = (None, None)) -> int | None:
    """The step at which this process of `rank` must die, if any: from the environment, or from a run's
    own `configured` (kill_rank, kill_at) pair, which applies to the rank's first process only."""
    steps = list(parse_fail_at(os.environ.get(FAIL_AT, "")).get(rank, ()))
    if configured[0] == rank and configured[1] is not None:
        steps = [configured[1], *steps]
    k = incarnation()
    return steps[k] if k < len(steps) else None


def maybe_fail(rank: int, step: int, configured: tuple[int | None, int | None] = (None, None)) -> None:
    """Kill this process (SIGKILL) if `rank` is due to die at `step`."""
    if fail_step(rank, configured) == step:
        os.kill(os.getpid(), signal.SIGKILL)
