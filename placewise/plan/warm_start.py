"""The integer program's default warm start, found by the caller before the IP runs.

The exact DP's contiguous optimum and the chain baselines' splits (throughput) are valid starts for
the contiguous and the non-contiguous program; the latency greedy's is one more, and the start for
latency. The IP starts from the best of them and never returns worse. This is
called through the registry entry of `ip` (its `prepare`), so the IP never looks solvers up.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.options import DPOptions, IPOptions, SolveOptions, options_for
from placewise.plan.plan import Plan

# The DP's warm start may take this share of a time limit (past it, the DP returns its best split).
WARM_SHARE = 0.25


def warm_starts(graph: OpGraph, cluster: Cluster, options: SolveOptions) -> tuple[Plan, ...]:
    """Every feasible start: for throughput the DP's plan (with replicated stages when the program
    may replicate them, `IPOptions.max_replicas`) and each chain baseline's, and the latency greedy's;
    each scored as the programs see a split (`ip.search.scored`)."""
    from placewise.plan.baselines.block import block_params, block_time, block_uniform
    from placewise.plan.baselines.pipedream import pipedream_nocomm
    from placewise.plan.dp import solve as dp
    from placewise.plan.ip.search import scored
    from placewise.plan.latency_greedy import solve as greedy

    if not isinstance(options, IPOptions):
        options = options_for(IPOptions, options)  # shared options only: one device per stage
    plain = DPOptions(objective=options.objective, contiguous=True, seed=options.seed, replicate=options.replicate,
                      time_limit=None if options.time_limit is None else WARM_SHARE * options.time_limit)
    common = SolveOptions(objective=options.objective, contiguous=options.contiguous, seed=options.seed,
                          replicate=options.replicate)
    candidates: list[Callable[[], Plan]] = []
    if options.objective != "latency":
        candidates.append(lambda: dp(graph, cluster, plain))
        if options.max_replicas > 1:
            candidates.append(lambda: dp(graph, cluster, replace(plain, max_replicas=options.max_replicas,
                                                                 allreduce=options.allreduce)))
        candidates += [lambda run=run: run(graph, cluster, common)
                       for run in (pipedream_nocomm, block_time, block_params, block_uniform)]
    candidates.append(lambda: greedy(graph, cluster, common))
    # A contiguous program may only start from a contiguous split (re-scored as one, others fail).
    contiguous = options.contiguous and options.objective != "latency"
    found = []
    for make in candidates:
        try:
            plan = make()
        except PlacewiseError:
            continue
        plan = scored(graph, cluster, options, contiguous, plan.assignment(), plan.replicas(), solver=plan.solver,
                      seconds=plan.seconds)
        if plan.feasible and (options.objective != "latency" or plan.latency is not None):
            found.append(plan)
    return tuple(found)


def with_warm_start(graph: OpGraph, cluster: Cluster, options: IPOptions) -> IPOptions:
    """`options` with warm starts when none are given (the IP starts from the best); the time they
    took comes off the time limit."""
    if options.warm_starts:
        return options
    begin = time.perf_counter()
    plans = warm_starts(graph, cluster, options)
    limit = options.time_limit
    if limit is not None:
        limit = max(limit - (time.perf_counter() - begin), 0.1)
    return replace(options, warm_starts=plans, time_limit=limit)
