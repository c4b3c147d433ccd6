"""The integer program's default warm start, found by the caller before the IP runs.

The exact DP's contiguous optimum (throughput) is a valid start for the contiguous and the
non-contiguous program; the latency greedy is the fallback, and the start for latency. This is
called through the registry entry of `ip` (its `prepare`), so the IP never looks solvers up.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.options import DPOptions, IPOptions, SolveOptions
from placewise.plan.plan import Plan

# The DP's warm start may take this share of a time limit (past it, the DP returns its best split).
WARM_SHARE = 0.25


def warm_start(graph: OpGraph, cluster: Cluster, options: SolveOptions) -> Plan | None:
    """The DP's plan for throughput, else the latency greedy's, whichever is first feasible."""
    from placewise.plan.dp import solve as dp
    from placewise.plan.latency_greedy import solve as greedy

    plain = DPOptions(objective=options.objective, contiguous=True, seed=options.seed,
                      time_limit=None if options.time_limit is None else WARM_SHARE * options.time_limit)
    candidates: list[Callable[[], Plan]] = []
    if options.objective != "latency":
        candidates.append(lambda: dp(graph, cluster, plain))
    candidates.append(lambda: greedy(graph, cluster, SolveOptions(objective=options.objective,
                                                                  contiguous=options.contiguous)))
    for make in candidates:
        try:
            plan = make()
        except PlacewiseError:
            continue
        if plan.feasible and (options.objective != "latency" or plan.latency is not None):
            return plan
    return None


def with_warm_start(graph: OpGraph, cluster: Cluster, options: IPOptions) -> IPOptions:
    """`options` with a warm start when none is given; the time it took comes off the time limit."""
    if options.warm_starts:
        return options
    begin = time.perf_counter()
    plan = warm_start(graph, cluster, options)
    limit = options.time_limit
    if limit is not None:
        limit = max(limit - (time.perf_counter() - begin), 0.1)
    return replace(options, warm_starts=() if plan is None else (plan,), time_limit=limit)
