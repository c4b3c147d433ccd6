"""The solver registry: every exact solver and baseline is a `Solver`, `(graph, cluster, options) -> Plan`.

An entry names the solver's options type and loads the solver on first use (through a loader
function), so that `plan --solver NAME` and `compare` import only what they run. An entry may also
say how to prepare its options (the IP's warm start); `run` does that, so no solver looks another
one up here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, TypeVar

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.options import (DPOptions, ExpertOptions, IPOptions, LocalSearchOptions, PipeDreamOptions,
                                    ScheduleDPOptions, SolveOptions, options_for)
from placewise.plan.plan import Plan

O = TypeVar("O", bound=SolveOptions)
O_contra = TypeVar("O_contra", bound=SolveOptions, contravariant=True)


class Solver(Protocol[O_contra]):
    def __call__(self, graph: OpGraph, cluster: Cluster, options: O_contra) -> Plan: ...


@dataclass(frozen=True)
class SolverEntry(Generic[O]):
    name: str
    load: Callable[[], Solver[O]]
    options_type: type[O]
    # Fills in what the options leave to the caller (e.g. warm starts), before the solver runs.
    prepare: Callable[[OpGraph, Cluster, O], O] | None = None
    # Its plans replicate stages, which the other methods' do not: `compare` runs it only when named.
    replicates: bool = False

    def options(self, common: SolveOptions | None = None, **specific: Any) -> O:
        """This solver's options: the shared fields of `common` and its own `specific` ones."""
        return options_for(self.options_type, common, self.name, **specific)

    def coerce(self, options: SolveOptions | None) -> O:
        """`options` as this solver's type: shared options get its defaults; another solver's are an error."""
        if isinstance(options, self.options_type):
            return options
        if options is None or type(options) is SolveOptions:
            return self.options(options)
        raise PlacewiseError(f"the {self.name} solver takes {self.options_type.__name__}, not {type(options).__name__}")


def _one_accelerator() -> Solver[SolveOptions]:
    from placewise.plan.baselines.simple import one_accelerator
    return one_accelerator


def _expert() -> Solver[ExpertOptions]:
    from placewise.plan.baselines.simple import expert
    return expert


def _greedy() -> Solver[SolveOptions]:
    from placewise.plan.baselines.greedy import greedy
    return greedy


def _pipedream() -> Solver[PipeDreamOptions]:
    from placewise.plan.baselines.pipedream import pipedream
    return pipedream


def _pipedream_hybrid() -> Solver[PipeDreamOptions]:
    from placewise.plan.baselines.pipedream import pipedream_hybrid
    return pipedream_hybrid


def _pipedream_nocomm() -> Solver[SolveOptions]:
    from placewise.plan.baselines.pipedream import pipedream_nocomm
    return pipedream_nocomm


def _block_time() -> Solver[SolveOptions]:
    from placewise.plan.baselines.block import block_time
    return block_time


def _block_params() -> Solver[SolveOptions]:
    from placewise.plan.baselines.block import block_params
    return block_params


def _block_uniform() -> Solver[SolveOptions]:
    from placewise.plan.baselines.block import block_uniform
    return block_uniform


def _metis() -> Solver[SolveOptions]:
    from placewise.plan.baselines.metis import metis
    return metis


def _local_search() -> Solver[LocalSearchOptions]:
    from placewise.plan.baselines.local_search import local_search
    return local_search


def _dp() -> Solver[DPOptions]:
    from placewise.plan.dp import solve as dp
    return dp


def _dp_schedule() -> Solver[ScheduleDPOptions]:
    from placewise.plan.schedule_dp import solve as dp_schedule
    return dp_schedule


def _ip() -> Solver[IPOptions]:
    from placewise.plan.ip import solve as ip
    return ip


def _ip_warm_start(graph: OpGraph, cluster: Cluster, options: IPOptions) -> IPOptions:
    from placewise.plan.warm_start import with_warm_start
    return with_warm_start(graph, cluster, options)


def _greedy_latency() -> Solver[SolveOptions]:
    from placewise.plan.latency_greedy import solve as greedy_latency
    return greedy_latency


_ENTRIES: tuple[SolverEntry, ...] = (
    SolverEntry("one-accelerator", _one_accelerator, SolveOptions),
    SolverEntry("expert", _expert, ExpertOptions),
    SolverEntry("greedy", _greedy, SolveOptions),
    SolverEntry("pipedream", _pipedream, PipeDreamOptions),
    SolverEntry("pipedream-nocomm", _pipedream_nocomm, SolveOptions),
    SolverEntry("pipedream-hybrid", _pipedream_hybrid, PipeDreamOptions, replicates=True),
    SolverEntry("block-time", _block_time, SolveOptions),
    SolverEntry("block-params", _block_params, SolveOptions),
    SolverEntry("block-uniform", _block_uniform, SolveOptions),
    SolverEntry("metis", _metis, SolveOptions),
    SolverEntry("local-search", _local_search, LocalSearchOptions),
    SolverEntry("dp", _dp, DPOptions),
    SolverEntry("dp-schedule", _dp_schedule, ScheduleDPOptions),
    SolverEntry("ip", _ip, IPOptions, prepare=_ip_warm_start),
    SolverEntry("greedy-latency", _greedy_latency, SolveOptions),
)
SOLVERS: dict[str, SolverEntry] = {e.name: e for e in _ENTRIES}


def get_entry(name: str) -> SolverEntry:
    if name not in SOLVERS:
        raise PlacewiseError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def get_solver(name: str) -> Solver:
    """The solver itself, with nothing prepared: its options must be complete (see `run`)."""
    return get_entry(name).load()


def run(graph: OpGraph, cluster: Cluster, name: str, options: SolveOptions | None = None) -> Plan:
    """Prepare the options as the entry asks, then solve; the plan's seconds cover both."""
    entry = get_entry(name)
    options = entry.coerce(options)
    begin = time.perf_counter()
    if entry.prepare is not None:
        options = entry.prepare(graph, cluster, options)
    preparing = time.perf_counter() - begin
    plan = entry.load()(graph, cluster, options)
    plan.seconds += preparing
    return plan


def solve(graph: OpGraph, cluster: Cluster, solver: str = "dp", options: SolveOptions | None = None) -> Plan:
    if not cluster.devices():
        raise PlacewiseError("the cluster has no devices; give --accelerators and/or --cpus of at least 1")
    return run(graph, cluster, solver, options)
