"""Beyond the ideal limit: a certified answer instead of an error.

When the unit DAG has more ideals than the DP may enumerate, the planner still returns the best
contiguous split it can find, with a proven lower bound and the gap between them:
- upper bounds: the DP on the segments of a few topological orders (already computed by the
  caller), every contiguous baseline, the DP over chains of the cheap-cut ideals that the cut
  bound's minimum cuts found and of the best split's own boundaries (`dp.ideal_chains`), and the DP
  on a coarsened graph whose single-entry/single-exit regions (NAS cells, attention blocks) are
  collapsed (`plan.coarsen`), that coarsening refined near the coarse plan's cut points; each split
  is re-scored by the cost model;
- the lower bound: the larger of the work bound (every unit's least time shared evenly, and the
  largest unit) and the cut bound (`dp.cut_bound`: stages also pay the cheapest cuts their
  boundaries can have), which gets at most `CUT_SHARE` of the time, then is tightened where it
  binds by exact cuts (`dp.exact_cuts`) on at most `EXACT_SHARE` of what is left, their ideals
  offered to the ideal chains again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device
from placewise.plan.coarsen import Coarsening, coarsen, colocated, near_cuts
from placewise.plan.cost import evaluate
from placewise.plan.dp.bound_search import CERTIFY_GAP, search
from placewise.plan.dp.cut_bound import cut_bound
from placewise.plan.dp.exact_cuts import tighten
from placewise.plan.dp.ideal_chains import best_chain
from placewise.plan.dp.problem import Problem, lower_bound, make_problem, sets_assignment
from placewise.plan.dp.run import prepare
from placewise.plan.dp.replicated import Reduced
from placewise.plan.ideals import enumerate_ideals
from placewise.plan.options import DPOptions, IPOptions, PipeDreamOptions, SolveOptions
from placewise.plan.plan import Plan, plan_from_assignment
from placewise.plan.units import Units

# Without a time limit, the search beyond the ideal limit takes at most this long.
BEYOND_SECONDS = 60.0
# A coarsened graph is solved exactly when it has at most this many ideals.
COARSE_IDEALS = 5_000
# Beyond the limit the coarsened graph may have this many ideals (its DP gets half the time left).
BEYOND_COARSE_IDEALS = 20_000
# Within the limit, a lattice this large first gets the coarse restriction's optimum as its upper
# bound (certified by one run just below it when it is optimal): on a Llama with 8 layers and 72k
# ideals the bound search took 156 s, the restriction and its certificate 24 s. Smaller lattices
# (every paper input) keep the plain bound search.
COARSE_TRIGGER = 50_000
# Regions heavier than this share of one device's fair work are never collapsed.
REGION_SHARE = 0.25
# When no search finds a split that fits, the contiguous integer program gets the time left, and at
# least this long (so a search that used up the limit still leaves it a try).
IP_FALLBACK_SECONDS = 1.0
# The cut bound runs first, on at most this share of the time beyond the limit; its exact
# tightening (`dp.exact_cuts`) on at most this share of what is left after the first upper bounds.
CUT_SHARE = 0.3
EXACT_SHARE = 0.5


@dataclass
class Candidates:
    """The best split found so far and where each candidate came from."""

    graph_reduced: Reduced
    cluster: Cluster
    replicate: bool
    best: tuple[float, dict[int, Device], str] | None = None
    values: dict[str, float] = field(default_factory=dict)

    def offer(self, name: str, assignment: dict[int, Device]) -> None:
        ev = evaluate(self.graph_reduced.graph, self.cluster, assignment, replicate=self.replicate)
        if not ev.feasible:
            return
        self.values[name] = ev.max_load
        if self.best is None or ev.max_load < self.best[0]:
            self.best = (ev.max_load, assignment, name)

    def boundaries(self, units: Units) -> np.ndarray:
        """The inner boundaries of the best split (bool, ideals x units): the units of its first
        1, 2, ... stages in pipeline order."""
        if self.best is None:
            return np.zeros((0, units.count), dtype=bool)
        ev = evaluate(self.graph_reduced.graph, self.cluster, self.best[1], replicate=self.replicate)
        position = {load.device: i for i, load in enumerate(ev.devices)}
        work = self.graph_reduced.work
        stage = np.array([position[self.best[1][work.nodes[m[0]].id]] for m in units.members])
        return np.array([stage < s for s in range(1, len(ev.devices))]).reshape(-1, units.count)


def _fits(pred, limit: int) -> bool:
    # The prefixes of a topological order are distinct ideals: a DAG of n units has over n, so a
    # coarsening with `limit` groups or more is rejected without listing (most tries on large graphs).
    if len(pred) >= limit:
        return False
    try:
        enumerate_ideals(pred, limit)
    except PlacewiseError:
        return False
    return True


def _coarse_plan(reduced: Reduced, units: Units, coarse: Coarsening, cluster: Cluster, options: DPOptions,
                 solve: Callable, seconds: float | None):
    graph = reduced.colocated_like(colocated(reduced.work, units.members, coarse))
    return solve(graph, cluster, replace(options, progress=False,
                                         time_limit=None if seconds is None else max(seconds, 1e-3)))


def coarse_units(units: Units, coarse: Coarsening) -> Units:
    """The coarsened problem's units: each group of `coarse` one unit. A port keeps the groups of
    its targets other than its owner's (a target in the owner's group shares its device, so it never
    makes the port paid); a port left with none is never paid and dropped. Shared copy groups keep
    the groups that need them. The DP on these units is the DP on the graph with each group
    colocated, without rebuilding that graph's units."""
    group_of = coarse.group_of
    n = len(coarse.groups)

    def per_group(values: np.ndarray) -> np.ndarray:
        return np.bincount(group_of, weights=values, minlength=n)

    owners, ptr, flat = [], [0], []
    for p in range(len(units.port_cost)):
        owner = int(group_of[units.port_owner[p]])
        targets = group_of[units.port_targets[units.port_target_ptr[p]:units.port_target_ptr[p + 1]]]
        owners.append(owner)
        flat += sorted({int(g) for g in targets} - {owner})
        ptr.append(len(flat))
    ptr_a = np.array(ptr, dtype=np.int64)
    keep = np.flatnonzero(np.diff(ptr_a) > 0)
    copies = units.copies
    if copies is not None:
        needers = [sorted({int(g) for g in group_of[copies.needers[copies.needer_ptr[c]:copies.needer_ptr[c + 1]]]})
                   for c in range(copies.count)]
        copies = replace(copies, unit_acc=per_group(copies.unit_acc), unit_cpu=per_group(copies.unit_cpu),
                         unit_memory=per_group(copies.unit_memory),
                         needer_ptr=np.cumsum([0] + [len(x) for x in needers]).astype(np.int64),
                         needers=np.array([g for x in needers for g in x], dtype=np.int64))
    return replace(
        units, unit_of=group_of[units.unit_of],
        members=tuple(tuple(sorted(i for u in g for i in units.members[u])) for g in coarse.groups),
        pred_units=coarse.pred, acc_time=per_group(units.acc_time), cpu_time=per_group(units.cpu_time),
        memory=per_group(units.memory), supported=per_group((~units.supported).astype(float)) == 0,
        port_owner=np.array(owners, dtype=np.int64)[keep], port_cost=units.port_cost[keep],
        port_target_ptr=np.concatenate([[0], np.cumsum(np.diff(ptr_a)[keep])]).astype(np.int64),
        port_targets=np.array(flat, dtype=np.int64), stats={**units.stats, "units": n}, copies=copies)


def coarse_restriction(reduced: Reduced, units: Units, problem: Problem, cluster: Cluster, options: DPOptions,
                       upper: float, seconds: float | None, limit: int = COARSE_IDEALS) -> Plan | None:
    """The exact optimum of the graph with its light branchy regions collapsed to at most `limit`
    ideals (a restriction: its splits are splits here), when one exists and is at most `upper`.
    Solved on the collapsed units directly: rebuilding the collapsed graph's units, replication
    and notes for a nested solve took most of the time on a 50,000-node graph."""
    start = time.perf_counter()
    work = problem.time.min(axis=0)
    share = REGION_SHARE * float(work.sum()) / sum(k.count for k in problem.kinds)
    coarse = coarsen(units.pred_units, work, lambda c: _fits(c.pred, limit), share=share)
    if not coarse.collapsed or len(coarse.pred) >= limit:
        return None
    try:
        lattice = enumerate_ideals(coarse.pred, limit)
    except PlacewiseError:
        return None  # the coarsest graph tried is still too large
    grouped = coarse_units(units, coarse)
    sub = make_problem(grouped, cluster)
    deadline = None if seconds is None else start + seconds
    # The search's first run is just below its upper bound: lifted so that a split at `upper` is found.
    outcome = search(grouped, sub, lattice, prepare(grouped, sub, lattice), lower_bound(grouped, sub),
                     upper / (1 - CERTIFY_GAP), False, None, deadline)
    if outcome.result is None or not math.isfinite(outcome.result.value):
        return None  # above `upper`, or out of time
    assignment = sets_assignment(reduced.work, grouped, sub, outcome.result.sets)
    assignment = reduced.complete(assignment, list(dict.fromkeys(assignment.values())))
    return plan_from_assignment(reduced.graph, cluster, assignment, solver="dp",
                                seconds=time.perf_counter() - start, notes={"exact": True, "ideals": lattice.count},
                                replicate=options.replicate)


def beyond_limit(reduced: Reduced, units: Units, problem: Problem, cluster: Cluster, options: DPOptions,
                 chain: dict[int, Device], solve: Callable, start: float) -> tuple[float, dict[int, Device], dict]:
    """(max-load, split, notes) of the best contiguous split found within the time left; the notes'
    `cut_lower_bound` is the cut bound (0 when it does not apply or ran out of time)."""
    budget = options.time_limit if options.time_limit is not None else BEYOND_SECONDS
    deadline = start + budget
    cut_start = time.perf_counter()
    cut = cut_bound(units, problem, cut_start + CUT_SHARE * max(deadline - cut_start, 0.0))
    cut_seconds = time.perf_counter() - cut_start
    found = Candidates(reduced, cluster, options.replicate)
    found.offer("chain", chain)
    _offer_baselines(found, reduced, cluster, options)
    _offer_ideal_chain(found, reduced, units, problem, cut.ideals(units.count), deadline)
    exact_start = time.perf_counter()
    if found.best is not None and cut.grid is not None:
        ideals_before = len(cut.found)
        tighten(cut, units, problem, found.best[0], exact_start + EXACT_SHARE * max(deadline - exact_start, 0.0))
        if len(cut.found) > ideals_before:  # the exact cuts' ideals are boundaries too
            _offer_ideal_chain(found, reduced, units, problem, cut.ideals(units.count), deadline)
    work = problem.time.min(axis=0)
    share = REGION_SHARE * float(work.sum()) / sum(k.count for k in problem.kinds)
    # The coarse graph is solved by `solve` with the caller's ideal limit: it must fit under that too,
    # or the nested solve would go beyond the limit again.
    limit = min(BEYOND_COARSE_IDEALS, int(options.ideal_limit))
    coarse = coarsen(units.pred_units, work, lambda c: _fits(c.pred, limit), share=share)
    notes: dict = {"coarse_units": len(coarse.groups), "collapsed_regions": len(coarse.collapsed),
                   "cut_lower_bound": cut.value, "cut_bound_seconds": round(cut_seconds, 3),
                   "exact_cuts_seconds": round(time.perf_counter() - exact_start, 3),
                   "cut_ideals": len(cut.found)}
    refinements = 0
    while _fits(coarse.pred, limit) and time.perf_counter() < deadline:
        left = deadline - time.perf_counter()
        try:
            plan = _coarse_plan(reduced, units, coarse, cluster, options, solve, left / 2)
        except PlacewiseError:
            break
        name = "coarsened" if refinements == 0 else f"refined {refinements}"
        found.offer(name, plan.assignment())
        # Open the collapsed regions next to this plan's cut points and solve again.
        stage = {n: k for k, s in enumerate(plan.stages) for n in s.nodes}
        stage_of_group = [stage[reduced.work.nodes[units.members[g[0]][0]].id] for g in coarse.groups]
        opened = near_cuts(coarse, stage_of_group)
        if not opened:
            break
        finer = coarsen(units.pred_units, work, lambda c: _fits(c.pred, limit), share=share,
                        keep_open=opened)
        if len(finer.groups) <= len(coarse.groups):
            break
        coarse, refinements = finer, refinements + 1
    if found.best is None:
        found.offer("ip", _ip_split(reduced, cluster, options, deadline))
    if found.best is None:  # the program's split, re-scored by the cost model, does not fit either
        raise PlacewiseError("no contiguous split that fits memory and support was found beyond the ideal limit; "
                             "raise --memory, add devices or CPU cores")
    value, assignment, source = found.best
    notes.update(refinements=refinements, best_from=source,
                 upper_bounds={k: v for k, v in sorted(found.values.items(), key=lambda kv: kv[1])})
    return value, assignment, notes


def _offer_ideal_chain(found: Candidates, reduced: Reduced, units: Units, problem: Problem, ideals: np.ndarray,
                       deadline: float) -> None:
    """The best chain of the given ideals and the best split's boundaries (`dp.ideal_chains`), below
    the best max-load found so far, on at most half the time left; nothing without such ideals (the
    best split's boundaries alone give back that split)."""
    if len(ideals) == 0:
        return
    bound = found.best[0] if found.best is not None else math.inf
    now = time.perf_counter()
    chain = best_chain(units, problem, np.vstack([found.boundaries(units), ideals]), bound,
                       now + max(deadline - now, 0.0) / 2)
    if chain is not None:
        assignment = sets_assignment(reduced.work, units, problem, chain[1])
        found.offer("ideal chain", reduced.complete(assignment, list(dict.fromkeys(assignment.values()))))


def _ip_split(reduced: Reduced, cluster: Cluster, options: DPOptions, deadline: float) -> dict[int, Device]:
    """No search above found a split that fits (they follow a few orders and coarsenings, and memory
    can leave only others): the contiguous integer program finds one or proves that none fits, and
    its error says which."""
    from placewise.plan.ip import solve as ip  # here: plan.ip imports plan.dp (dp.replicated) at module level
    left = max(deadline - time.perf_counter(), IP_FALLBACK_SECONDS)
    plan = ip(reduced.graph, cluster, IPOptions(seed=options.seed, replicate=options.replicate, time_limit=left))
    return plan.assignment()


def _offer_baselines(found: Candidates, reduced: Reduced, cluster: Cluster, options: DPOptions) -> None:
    # The baselines themselves, not the registry (which names this module's caller).
    from placewise.plan.baselines.block import block_params, block_time, block_uniform
    from placewise.plan.baselines.pipedream import pipedream, pipedream_nocomm
    from placewise.plan.baselines.simple import one_accelerator
    common = SolveOptions(seed=options.seed, replicate=options.replicate)
    chain_baselines = {"pipedream": lambda g, c: pipedream(g, c, PipeDreamOptions(**vars(common))),
                       "pipedream-nocomm": lambda g, c: pipedream_nocomm(g, c, common),
                       "block-time": lambda g, c: block_time(g, c, common),
                       "block-params": lambda g, c: block_params(g, c, common),
                       "block-uniform": lambda g, c: block_uniform(g, c, common),
                       "one-accelerator": lambda g, c: one_accelerator(g, c, common)}
    for name, run in chain_baselines.items():
        try:
            plan = run(reduced.graph, cluster)
        except PlacewiseError:
            continue
        if plan.contiguous and math.isfinite(plan.max_load):
            found.offer(name, plan.assignment())
