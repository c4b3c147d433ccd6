"""Minimise, then certify: the IP's search over HiGHS runs, and its entry point `solve`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.ip.latency import latency_model
from placewise.plan.ip.milp import run
from placewise.plan.ip.model import check_placeable, infeasible
from placewise.plan.ip.throughput import throughput_model
from placewise.plan.options import OBJECTIVES, IPOptions, SolveOptions
from placewise.plan.plan import Plan
from placewise.plan.replicas import replicated_plan
from placewise.plan.units import Colocated

# How far the cost model's value may sit above the solver's objective before it is a modelling bug
# (HiGHS's feasibility tolerances on rows are 1e-7 on values of order 1-1e4).
AGREEMENT_TOLERANCE = 1e-6
# The direct minimisation gets this share of a time limit (or these seconds without one) before the
# target tests take over; it finds good splits, the tests prove bounds.
DIRECT_SHARE = 0.15
DIRECT_SECONDS = 30.0
# The smallest relative step a target test takes below the best split.
MIN_TARGET_GAP = 1e-7
# Bisecting target tests stop halving once the gap is within this many times the one asked for.
BISECT_ABOVE = 4.0


@dataclass
class _Search:
    """One search's model, clock and progress: the best plan so far and the best proven bound."""

    graph: OpGraph
    cluster: Cluster
    options: IPOptions
    what: str
    contiguous: bool
    lp: object  # the HiGHS model
    objective_col: int
    assign: Callable[[np.ndarray], tuple[dict[int, Device], dict[Device, int]]]  # -> split, replicas
    deadline: float | None
    best: Plan | None = None
    bound: float | None = None
    objective_at_best: float | None = None
    runs: list[str] = field(default_factory=list)

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def score(self, x: np.ndarray, objective: float) -> Plan:
        plan = scored(self.graph, self.cluster, self.options, self.contiguous, *self.assign(x), seconds=0.0)
        if not plan.feasible or plan.value > objective + AGREEMENT_TOLERANCE * max(1.0, abs(objective)):
            raise RuntimeError(f"bug: the cost model scores the {self.what} IP's split {plan.value!r} "
                               f"({'; '.join(plan.violations) or 'feasible'}), above the solver's objective {objective!r}")
        return plan

    def minimise(self, start: np.ndarray | None) -> str:
        """The direct run, from the warm start; returns HiGHS's status."""
        options = self.options
        # The direct run gets a share of the time; the target tests get the rest.
        first = (DIRECT_SECONDS if self.deadline is None
                 else max(min(5.0, options.time_limit), DIRECT_SHARE * options.time_limit))
        result = run(self.lp, time_limit=first, gap=options.gap, seed=options.seed, start=start,
                     progress=options.progress, what=f"{self.what} IP")
        if result.infeasible:
            raise infeasible(self.what, self.cluster, self.contiguous)
        self.runs.append(f"minimise: {result.status}")
        if result.x is not None:
            found = self.score(result.x, result.objective)
            if self.best is None or found.value <= self.best.value:
                self.best, self.objective_at_best = found, result.objective
        self.bound = result.bound if math.isfinite(result.bound) else None
        return result.status

    def certify(self) -> None:
        """Target tests until the gap is within `options.gap` or time runs out."""
        options = self.options
        # A target must sit below the best split, or a zero gap would test the best split forever.
        gap = max(options.gap, MIN_TARGET_GAP)
        bisect = False
        while self.best is not None and (self.bound is None or
                                         self.best.value - self.bound > gap * self.best.value * (1 + 1e-9)):
            remaining = self.left()
            if remaining is not None and remaining <= 0.05:
                break
            # A hair above value * (1 - gap), so that proving it leaves a gap within `gap` after rounding.
            # That test gets half the time left; if it cannot decide, halve the interval between bound and
            # best instead, so the certificate (or the split) still improves in steps before time runs out.
            best = self.best.value
            target = best * (1 - gap * (1 - 1e-9))
            share = remaining
            floor = 0.0 if self.bound is None else self.bound
            if bisect and best - floor > BISECT_ABOVE * gap * best:
                target = min(target, (floor + best) / 2)
            elif not bisect and remaining is not None:
                share = remaining / 2
            test = run(self.lp, time_limit=share, gap=options.gap, seed=options.seed, start=None,
                       progress=options.progress, what=f"{self.what} IP: is there a split within {target:.6g}?",
                       fix=(self.objective_col, target))
            self.runs.append(f"target {target:.10g}: {test.status}")
            if test.infeasible:
                self.bound = target if self.bound is None else max(self.bound, target)
            elif test.x is not None:
                self.best, self.objective_at_best = self.score(test.x, target), None
            elif bisect:
                break
            else:
                bisect = True


def _search(graph: OpGraph, cluster: Cluster, options: IPOptions, warm: Plan | None, what: str,
            contiguous: bool) -> tuple[Plan, float | None, dict]:
    """Minimise, then certify: returns the best plan (scored by the cost model), a proven lower bound, notes.

    HiGHS first minimises the objective directly from the warm start. When its dual bound leaves a gap
    above `options.gap`, the objective column is pinned to a target t = best * (1 - gap) (or, once such
    a test could not decide in time, halfway between bound and best) and HiGHS asks whether any split
    has every load (or the latency) within t. With the objective a constant, each
    device's load row is a knapsack, whose cover cuts HiGHS finds -- the direct model's relaxation cannot
    see that, e.g., five layers never fit under t. "Infeasible" proves t a lower bound; a split found is
    better than the best, and the search goes on from it.
    """
    builder = latency_model if options.objective == "latency" else throughput_model
    m, objective_col, assign, start = builder(graph, cluster, options, warm)
    lp = m.lp()
    deadline = None if options.time_limit is None else time.perf_counter() + options.time_limit
    search = _Search(graph, cluster, options, what, contiguous, lp, objective_col, assign, deadline)
    search.best = warm if warm is not None and warm.feasible and math.isfinite(warm.value) else None
    status = search.minimise(start)
    search.certify()
    if search.best is None:
        limit = f" within {options.time_limit:g} s" if options.time_limit else ""
        raise PlacewiseError(f"the {what} integer program found no split{limit} ({status}); raise --time-limit")
    notes = {"runs": search.runs, "warm_start": warm.solver if warm is not None else None,
             "solver_objective": search.objective_at_best, "from_warm_start": search.best is warm}
    return search.best, search.bound, notes


def scored(graph: OpGraph, cluster: Cluster, options: IPOptions, contiguous: bool, assignment: dict[int, Device],
           replicas: dict[Device, int], *, solver: str = "ip", **plan_fields) -> Plan:
    """A split (with its replicated stages) scored by the cost model as the program sees it: the
    throughput programs under the replication rule (when on), the latency program with every node
    placed once."""
    return replicated_plan(graph, cluster, assignment, replicas, options.allreduce, solver=solver,
                           objective=options.objective, contiguous=contiguous, replicate=replicates(options),
                           **plan_fields)


def replicates(options: SolveOptions) -> bool:
    """Whether the program for `options` follows the replication rule (`plan.replicable`): the
    throughput programs do when it is on; the latency program places every node once."""
    return options.replicate and options.objective != "latency"


def _best_start(plans: tuple[Plan, ...]) -> Plan | None:
    """The feasible warm start of least value, else the first one given."""
    feasible = [p for p in plans if p.feasible and p.value is not None and math.isfinite(p.value)]
    return min(feasible, key=lambda p: p.value) if feasible else (plans[0] if plans else None)


def solve(graph: OpGraph, cluster: Cluster, options: IPOptions) -> Plan:
    """Registry entry `ip`: the throughput IP (contiguous or not) or the latency IP, by `options`."""
    begin = time.perf_counter()
    if options.objective not in OBJECTIVES:
        raise PlacewiseError(f"objective {options.objective!r} is not known; use throughput or latency")
    latency = options.objective == "latency"
    if options.max_replicas > 1 and latency:
        raise PlacewiseError("--max-replicas: the integer program replicates stages for throughput only; drop "
                             "--objective latency or use --max-replicas 1")
    check_placeable(graph, cluster, Colocated.of(graph))
    warm = _best_start(options.warm_starts)
    # Latency splits let CPU nodes interleave with accelerator blocks: no chain of device sets is asked for.
    contiguous = options.contiguous and not latency
    what = "latency" if latency else ("contiguous" if contiguous else "non-contiguous") + " throughput"
    if options.time_limit is not None:
        # The time limit covers these checks too (the caller took the warm start's time off already).
        options = replace(options, time_limit=max(options.time_limit - (time.perf_counter() - begin), 0.1))
    best, bound, notes = _search(graph, cluster, options, warm, what, contiguous)
    if options.max_replicas > 1:
        notes["max_replicas"] = options.max_replicas
    plan = scored(graph, cluster, options, contiguous, best.assignment(), best.replicas(),
                  seconds=time.perf_counter() - begin, notes=notes)
    value = plan.value
    plan.lower_bound = None if bound is None else min(bound, value)
    plan.gap = None if bound is None else (0.0 if value <= 0 else max(0.0, (value - plan.lower_bound) / value))
    return plan
