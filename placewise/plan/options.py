"""Solver options: the settings every solver shares, and one dataclass per solver for its own.

Options are typed so that a misspelt setting is an error instead of being ignored: build a solver's
options with `options_for` (or `SolverEntry.options`), which names the unknown field. This module
imports nothing heavy, so the registry can name every options type without loading a solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from placewise.errors import PlacewiseError
from placewise.plan.allreduce import PIPEDREAM, AllReduce
from placewise.plan.schedule import Schedule

if TYPE_CHECKING:
    from placewise.plan.plan import Plan

OBJECTIVES = ("throughput", "latency")
# Ideals beyond this many would need more memory and time than a planner run should take.
DEFAULT_IDEAL_LIMIT = 4_000_000
# The paper's local search ran 10 random starts.
DEFAULT_RESTARTS = 10


@dataclass(frozen=True)
class SolveOptions:
    """What every solver takes."""

    objective: str = "throughput"  # one of OBJECTIVES
    contiguous: bool = True
    time_limit: float | None = None  # seconds
    gap: float = 1e-4  # relative MIP gap at which an integer program may stop
    seed: int = 0
    progress: bool = False  # show a rich progress bar on stderr
    # Replicable nodes (sizes, masks, position ids, constants) are recomputed by every stage that
    # needs them (`plan.replicable`); False plans and scores every node once.
    replicate: bool = True


@dataclass(frozen=True)
class ReplicaOptions(SolveOptions):
    """What the solvers that choose replicated stages take (`dp.replicated_stages`, contiguous; the
    throughput programs in `ip.throughput`, contiguous or not)."""

    # Replicas a stage may have; 1: one device per stage, the plain problem.
    max_replicas: int = 1
    allreduce: AllReduce = field(default_factory=AllReduce)  # how a replicated stage's all-reduce is costed

    def __post_init__(self) -> None:
        if isinstance(self.max_replicas, bool) or not isinstance(self.max_replicas, int) or self.max_replicas < 1:
            raise PlacewiseError(f"--max-replicas {self.max_replicas!r}: use a whole number of at least 1")


@dataclass(frozen=True)
class DPOptions(ReplicaOptions):
    ideal_limit: int = DEFAULT_IDEAL_LIMIT  # refuse graphs with more ideals (cut points) than this


@dataclass(frozen=True)
class ScheduleDPOptions(SolveOptions):
    """The schedule-aware DP (`dp-schedule`): the schedule whose per-position memory it checks."""
    schedule: Schedule = field(default_factory=Schedule)
    microbatch_scale: float = 1.0  # microbatch size over the profiled batch size (scales activations, bytes)
    # A stage that does not fit at its position may recompute its activations in its backward (then
    # it pays its forward again); the planner picks it only where memory forces it. False: never.
    recompute: bool = True


@dataclass(frozen=True)
class IPOptions(ReplicaOptions):
    # Plans to start from; the best feasible one is used. The caller (`solve`, `compare`) finds one
    # when none is given.
    warm_starts: tuple[Plan, ...] = ()


@dataclass(frozen=True)
class LocalSearchOptions(SolveOptions):
    restarts: int = DEFAULT_RESTARTS


@dataclass(frozen=True)
class ExpertOptions(SolveOptions):
    split: str | None = None  # the split file (the paper's expert splits, or any plan)


@dataclass(frozen=True)
class PipeDreamOptions(SolveOptions):
    transfers: bool = True  # False: stage time is compute only (PipeDream's default objective)
    # pipedream-hybrid: how its replicated stages' all-reduce is costed (PipeDream's own model).
    allreduce: AllReduce = field(default_factory=lambda: AllReduce(PIPEDREAM))


O = TypeVar("O", bound=SolveOptions)


def common_fields(options: SolveOptions) -> dict[str, Any]:
    """The fields every solver shares, as set in `options`."""
    return {f.name: getattr(options, f.name) for f in fields(SolveOptions)}


def options_for(options_type: type[O], common: SolveOptions | None = None, solver: str | None = None,
                **specific: Any) -> O:
    """`options_type` with the shared fields of `common` and the given solver-specific ones; an unknown
    field is an error that names it (and the solver, when given)."""
    known = {f.name for f in fields(options_type)}
    unknown = sorted(set(specific) - known)
    if unknown:
        own = sorted(known - {f.name for f in fields(SolveOptions)})
        whose = f"the {solver} solver" if solver else options_type.__name__
        raise PlacewiseError(f"{whose} has no option {unknown[0]!r}; "
                             f"its own options are: {', '.join(own) or 'none'}")
    return options_type(**{**(common_fields(common) if common is not None else {}), **specific})
