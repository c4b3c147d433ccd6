"""Coarsening by single-entry/single-exit regions, checked against networkx's dominators and a
brute force over the ideals of small random DAGs."""

from __future__ import annotations

import itertools
import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placewise.errors import PlacewiseError
from placewise.plan import solve
from placewise.plan.coarsen import (collapse, coarsen, colocated, immediate_dominators, immediate_post_dominators,
                                    near_cuts, regions)
from placewise.plan.dp import make_problem, run_dp
from placewise.plan.dp.beyond import coarse_units
from placewise.plan.dp.replicated import Reduced
from placewise.plan.ideals import enumerate_ideals
from test_replication_dp import replicated_problems


@st.composite
def dags(draw, max_units: int = 9):
    n = draw(st.integers(1, max_units))
    pred = tuple(tuple(p for p in range(v) if draw(st.integers(0, 2)) == 0) for v in range(n))
    work = np.array([draw(st.sampled_from([0.0, 1.0, 2.0, 5.0])) for _ in range(n)])
    return pred, work


def _ideals(pred) -> set[frozenset[int]]:
    n = len(pred)
    out = set()
    for mask in range(1 << n):
        members = {v for v in range(n) if mask >> v & 1}
        if all(p in members for v in members for p in pred[v]):
            out.add(frozenset(members))
    return out


def _nx_dominators(pred, reverse: bool) -> dict[int, int]:
    n = len(pred)
    g = nx.DiGraph()
    g.add_nodes_from(range(-1, n))
    for v, ps in enumerate(pred):
        g.add_edges_from((p, v) for p in ps)
    for v in range(n):
        if not pred[v]:
            g.add_edge(-1, v)
    sink = n
    g.add_node(sink)
    for v in range(n):
        if not any(v in pred[w] for w in range(n)):
            g.add_edge(v, sink)
    if reverse:
        return nx.immediate_dominators(g.reverse(), sink)
    return nx.immediate_dominators(g, -1)


@settings(max_examples=150, deadline=None)
@given(dags())
def test_dominators_match_networkx(dag):
    pred, _ = dag
    n = len(pred)
    idom = _nx_dominators(pred, reverse=False)
    ipdom = _nx_dominators(pred, reverse=True)
    assert list(immediate_dominators(pred)) == [idom[v] for v in range(n)]
    assert list(immediate_post_dominators(pred)) == [ipdom[v] for v in range(n)]


@settings(max_examples=150, deadline=None)
@given(dags(), st.integers(0, 40))
def test_collapsed_dags_keep_only_ideals_of_the_original(dag, take):
    """Every region is convex; a coarsened DAG is topologically numbered, and each of its ideals,
    expanded, is an ideal of the original (so its contiguous splits are the original's)."""
    pred, work = dag
    found = regions(pred, work)
    reach = nx.transitive_closure_dag(nx.DiGraph([(p, v) for v, ps in enumerate(pred) for p in ps]))
    for r in found:
        for a, b in itertools.permutations(r.interior, 2):
            if reach.has_node(a) and reach.has_edge(a, b):
                assert all(x in r.interior for x in reach.successors(a) if reach.has_edge(x, b)), "not convex"
    chosen = found[: take % (len(found) + 1)]
    coarse = collapse(pred, chosen)
    assert all(p < v for v, ps in enumerate(coarse.pred) for p in ps)
    assert sorted(u for g in coarse.groups for u in g) == list(range(len(pred)))
    original = _ideals(pred)
    for ideal in _ideals(coarse.pred):
        assert frozenset(coarse.expand(ideal)) in original


def _cells(n_cells: int, width: int) -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """NASNet-like: each cell reads the two previous cells' outputs through `width` parallel ops."""
    pred: list[tuple[int, ...]] = [(), (0,)]
    outputs = [0, 1]
    for _ in range(n_cells):
        ins = (outputs[-1], outputs[-2])
        ops = []
        for k in range(width):
            pred.append((ins[k % 2],))
            ops.append(len(pred) - 1)
        pred.append(tuple(ops))
        outputs.append(len(pred) - 1)
    return tuple(pred), np.ones(len(pred))


def test_nas_cells_collapse_and_fit_a_limit():
    pred, work = _cells(8, 4)
    from placewise.plan.ideals import enumerate_ideals

    def count(p):
        return enumerate_ideals(p, 10**7).count

    before = count(pred)
    coarse = coarsen(pred, work, lambda c: count(c.pred) <= 200, share=float(work.sum()) / 4)
    after = count(coarse.pred)
    assert after <= 200 < before
    # Some collapsed group holds parallel branches: a fork or a join inside it.
    def branchy(group: set[int]) -> bool:
        inner = [(p, u) for u in group for p in pred[u] if p in group]
        return len(inner) > len({p for p, _ in inner}) or len(inner) > len({u for _, u in inner})

    assert coarse.collapsed and any(branchy(set(group)) for group in coarse.groups)
    # Opening the groups near one cut point keeps those units apart.
    stage_of_group = [0 if g < len(coarse.groups) // 2 else 1 for g in range(len(coarse.groups))]
    opened = near_cuts(coarse, stage_of_group)
    finer = coarsen(pred, work, lambda c: True, share=float(work.sum()) / 4, keep_open=opened)
    assert all(len(finer.groups[finer.group_of[u]]) == 1 for u in opened)


def test_heavy_regions_stay_open():
    pred, work = _cells(4, 3)
    coarse = coarsen(pred, work, lambda c: False, share=0.5)
    assert len(coarse.groups) == len(pred)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicated_problems(), st.integers(0, 40))
def test_dp_on_coarse_units_equals_the_colocated_graphs_optimum(problem, take):
    """The DP on grouped units (`dp.beyond.coarse_units`, ports and shared copies regrouped) finds
    the optimum of the graph with each group colocated, as a full solve of that graph does."""
    graph, cluster = problem
    reduced = Reduced.of(graph, True)
    units = reduced.units(cluster)
    found = regions(units.pred_units, units.acc_time)
    coarse = collapse(units.pred_units, found[: take % (len(found) + 1)])
    grouped = coarse_units(units, coarse)
    value = run_dp(grouped, make_problem(grouped, cluster), enumerate_ideals(grouped.pred_units)).value
    try:
        expected = solve(reduced.colocated_like(colocated(reduced.work, units.members, coarse)), cluster, "dp").max_load
    except PlacewiseError:
        expected = math.inf
    assert value == pytest.approx(expected, rel=1e-9, abs=1e-9)
