"""Staleness policies of asynchronous pushes (staleness = server updates since the pushing worker
fetched the parameters it used): none; "lr" divides the learning rate by the staleness (Zhang et al.
2016); "bound:S" delays the reply to a worker more than S pushes ahead of the slowest live worker
(stale-synchronous parallel)."""

from __future__ import annotations

from dataclasses import dataclass

from placewise.errors import PlacewiseError
from placewise.run.choices import BOUND, STALENESS_HELP, STALENESS_POLICIES


@dataclass(frozen=True)
class Staleness:
    """Staleness policy: "none", "lr" (lr / staleness) or "bound" with `bound` S (SSP)."""
    policy: str = "none"
    bound: int = 0

    @staticmethod
    def parse(text: str) -> "Staleness":
        text = text.strip().lower()
        if text in STALENESS_POLICIES and text != BOUND:
            return Staleness(text)
        if text.startswith(f"{BOUND}:"):
            value = text.split(":", 1)[1]
            if value.isdigit():
                return Staleness(BOUND, int(value))
        raise PlacewiseError(f"--staleness {text!r} is not a policy; use {STALENESS_HELP} with S >= 0")

    def __str__(self) -> str:
        return f"{BOUND}:{self.bound}" if self.policy == BOUND else self.policy
