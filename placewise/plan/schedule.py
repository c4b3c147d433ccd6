"""A pipeline schedule: which one (GPipe or 1F1B) and how many microbatches.

It lives in `plan/` because the planner needs it (how many microbatches' activations each pipeline
position keeps, the fill and drain of a step); `run/` executes it with torch's pipelining
schedules. Torch-free, so the CLI can derive its `choices` from `SCHEDULES` before importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from placewise.errors import PlacewiseError

# The schedule kinds, defined once. GPipe runs every microbatch's forward, then every backward;
# 1F1B alternates one forward and one backward once the pipeline is full.
GPIPE = "gpipe"
ONE_F_ONE_B = "1f1b"
SCHEDULES: tuple[str, ...] = (GPIPE, ONE_F_ONE_B)
DEFAULT_SCHEDULE = ONE_F_ONE_B


@dataclass(frozen=True)
class Schedule:
    kind: str = DEFAULT_SCHEDULE
    microbatches: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise PlacewiseError(f"--schedule {self.kind!r}: use one of {', '.join(SCHEDULES)}")
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise PlacewiseError(f"--microbatches {self.microbatches!r}: use a whole number of at least 1")

    def in_flight(self, position: int, stages: int) -> int:
        """Microbatches whose activations stage `position` (0-based) of `stages` holds at its peak.

        GPipe keeps all m until the backward starts; 1F1B keeps min(m, p - i) (PipeDream-Flush).
        """
        if self.kind == GPIPE:
            return self.microbatches
        return min(self.microbatches, stages - position)

    def to_json(self) -> dict:
        return {"kind": self.kind, "microbatches": self.microbatches}

    @classmethod
    def from_json(cls, data: object, source: str = "schedule") -> "Schedule":
        if not isinstance(data, dict):
            raise PlacewiseError(f"{source}: expected {{\"kind\": ..., \"microbatches\": ...}}; fix it")
        return cls(kind=data.get("kind", DEFAULT_SCHEDULE), microbatches=data.get("microbatches", 1))
