"""The schedule-aware DP against brute force over every contiguous split (and, with recompute, every
choice of recomputed stages), scored by the cost model and by `plan.predict`'s per-stage memory (the
functions a plan reports with)."""

import functools
import itertools
import json
import random
from dataclasses import replace

import pytest

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, DeviceKind, Edge, Node, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.plan import Plan, plan_from_assignment
from placewise.plan.predict import predict
from placewise.plan.recompute import evaluate_recomputed
from placewise.plan.schedule import GPIPE, ONE_F_ONE_B, Schedule
from placewise.plan.options import ScheduleDPOptions
from placewise.plan.schedule_dp import in_order, solve


def _graph(seed: int, n: int = 6) -> OpGraph:
    """A random training DAG: n forward nodes (each with a backward mate), memory split, bytes on edges."""
    rng = random.Random(seed)
    fwd, bwd, edges = [], [], []
    for i in range(1, n + 1):
        t = rng.uniform(1, 5)
        p = rng.choice([0.0, 10.0, 40.0])
        fwd.append(Node(i, None, t / 3, t, p + 20, True, False, i, parameters=p, gradients=0.0, optimizer_state=0.0,
                        activations=rng.uniform(5, 30), output=20.0))
        bwd.append(Node(100 + i, None, 2 * t / 3, 2 * t, 2 * p, True, True, i, parameters=0.0, gradients=p,
                        optimizer_state=p, activations=0.0, output=20.0))
    for i in range(2, n + 1):
        for j in rng.sample(range(1, i), k=min(i - 1, rng.choice([1, 1, 2]))):
            edges += [Edge(j, i, 0.5, 20.0), Edge(100 + i, 100 + j, 0.5, 20.0)]
    return OpGraph.build(fwd + bwd, edges, name=f"random{seed}")


def _ideal_chains(graph: OpGraph):
    """Every ordered split of the forward nodes into contiguous sets (a chain of ideals)."""
    ids = [n.id for n in graph.nodes if not n.backward]
    preds = {i: {e.src for e in graph.edges if e.dst == i} for i in ids}
    ideals = [frozenset(c) for r in range(len(ids) + 1) for c in itertools.combinations(ids, r)
              if all(preds[i] <= set(c) for i in c)]

    def chains(done):
        if len(done) == len(ids):
            yield []
            return
        for nxt in ideals:
            if done < nxt:
                for rest in chains(nxt):
                    yield [nxt - done] + rest
    yield from chains(frozenset())


def _brute(graph: OpGraph, cluster: Cluster, schedule: Schedule, recompute: bool = False) -> float:
    """The least max-load over every contiguous split, kinds per stage and (with `recompute`) every set
    of recomputed stages whose memory fits at its position."""
    best = float("inf")
    kinds = [k for k in cluster.kinds if k.count > 0]
    for sets in _ideal_chains(graph):
        for choice in itertools.product(range(len(kinds)), repeat=len(sets)):
            if any(choice.count(t) > kinds[t].count for t in range(len(kinds))):
                continue
            index = [0] * len(kinds)
            assignment, order = {}, []
            for s, t in zip(sets, choice):
                order.append(Device(kinds[t].name, index[t]))
                for node in s:
                    assignment[node] = assignment[100 + node] = order[-1]
                index[t] += 1
            for flags in itertools.product((False, True) if recompute else (False,), repeat=len(sets)):
                chosen = [d for d, flag in zip(order, flags) if flag]
                scored = evaluate_recomputed(graph, cluster, assignment, chosen)
                plan = in_order(plan_from_assignment(graph, cluster, assignment, solver="brute", seconds=0.0,
                                                     evaluation=scored), order)
                if not plan.feasible and any("memory" not in v for v in plan.violations):
                    continue
                memory = predict(graph, cluster, plan, schedule).memory
                if all(m.total <= cluster.kind(st.kind).memory * (1 + MEMORY_TOLERANCE)
                       for m, st in zip(memory, plan.stages) if cluster.kind(st.kind).memory is not None):
                    best = min(best, plan.max_load)
    return best


def _cluster(memory: float, shared_memory: bool = True) -> Cluster:
    """Two accelerators and a CPU core: the paper's (shared memory) or one in its own process, which
    pays transfers and holds receive buffers."""
    return Cluster((DeviceKind("accelerator", 2, True, memory, 3.0),
                    DeviceKind("cpu", 1, False, memory, shared_memory=shared_memory)), 20.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind,m,shared", [(ONE_F_ONE_B, 4, True), (GPIPE, 2, True), (ONE_F_ONE_B, 4, False)])
@pytest.mark.parametrize("recompute", [False, True])
def test_equals_brute_force(seed, kind, m, shared, recompute):
    graph = _graph(seed)
    schedule = Schedule(kind, m)
    cluster = functools.partial(_cluster, shared_memory=shared)
    options = ScheduleDPOptions(schedule=schedule, recompute=recompute)
    free = solve(graph, cluster(1e12), options)
    unconstrained = free.max_load
    assert not any(s.recompute for s in free.stages)  # memory does not bind: nothing to recompute
    # A cap just under what the unconstrained optimum's fullest stage needs, so that memory binds.
    cap = 0.97 * max(mem.total for mem in predict(graph, cluster(1e12), free, schedule).memory)
    expected = _brute(graph, cluster(cap), schedule, recompute)
    if expected == float("inf"):
        with pytest.raises(PlacewiseError, match="fits"):
            solve(graph, cluster(cap), options)
        return
    plan = solve(graph, cluster(cap), options)
    assert plan.max_load == pytest.approx(expected)
    assert plan.max_load >= unconstrained - 1e-9
    assert plan.schedule == schedule
    memory = predict(graph, cluster(cap), plan, schedule).memory
    assert all(mem.total <= cap * (1 + 1e-9) for mem in memory)


def test_the_cap_moves_the_optimum_and_position_matters():
    graph = _graph(3)
    schedule = Schedule(ONE_F_ONE_B, 4)
    free = solve(graph, _cluster(1e12), ScheduleDPOptions(schedule=schedule))
    need = [mem.total for mem in predict(graph, _cluster(1e12), free, schedule).memory]
    capped = solve(graph, _cluster(0.97 * max(need)), ScheduleDPOptions(schedule=schedule))
    assert capped.max_load > free.max_load + 1e-9


def test_recompute_only_where_memory_forces_it_and_the_plan_says_so():
    graph, schedule = _graph(0), Schedule(ONE_F_ONE_B, 4)
    # The CPU core in its own process, as the runtime runs it (it holds receive buffers).
    cluster = functools.partial(_cluster, shared_memory=False)
    free = solve(graph, cluster(1e12), ScheduleDPOptions(schedule=schedule))
    cap = 0.97 * max(mem.total for mem in predict(graph, cluster(1e12), free, schedule).memory)
    with pytest.raises(PlacewiseError, match="drop --no-recompute"):
        solve(graph, cluster(cap), ScheduleDPOptions(schedule=schedule, recompute=False))
    plan = solve(graph, cluster(cap), ScheduleDPOptions(schedule=schedule))
    assert [s.recompute for s in plan.stages] == [True, False, False]
    first = plan.stages[0]
    # Its load pays its forward again: the forward nodes' time on its device.
    forward = sum(graph.node(n).acc_time for n in first.nodes if not graph.node(n).backward) / 3.0
    assert first.recompute_time == pytest.approx(forward) and forward > 0
    assert first.load == pytest.approx(first.compute + first.transfer + forward)
    predicted = predict(graph, cluster(cap), plan, schedule)
    assert all(mem.total <= cap * (1 + 1e-9) for mem in predicted.memory)
    without = predict(graph, cluster(cap), replace(plan, stages=[replace(first, recompute=False)] + plan.stages[1:]),
                      schedule)
    assert without.memory[0].total > cap  # the same split without recompute would not fit
    assert predicted.stage_times[0].backward == pytest.approx(
        without.stage_times[0].backward + predicted.stage_times[0].forward)
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert [s.recompute for s in again.stages] == [True, False, False]
    assert again.stages[0].recompute_time == pytest.approx(forward)


def test_a_graph_with_replicable_nodes_is_planned_and_scored_without_replication():
    """A cheap size node read by every layer is replicable under the cost model's default rule; this
    DP places every node once, so its plan is scored that way too (it used to fail its own check)."""
    parts = dict(parameters=0.0, gradients=0.0, optimizer_state=0.0, activations=1.0, output=8.0)
    layers = 4
    nodes = [Node(i, f"l{i}", 10.0, 20.0, 1e3, True, False, i, **{**parts, "output": 1e6}) for i in range(layers)]
    edges = [Edge(i, i + 1, 1.0, 1e6) for i in range(layers - 1)]
    nodes.append(Node(layers, "size", 0.001, 0.001, 8.0, True, False, layers, **parts))
    edges += [Edge(layers, r, 1e-5, 8.0) for r in range(layers)]
    nodes += [Node(1000 + n.id, n.name + ".b", 1.0 if n.id < layers else 0.0, 1.0, 0.0, True, True, n.id, **parts)
              for n in list(nodes)]
    edges += [Edge(1000 + i + 1, 1000 + i, 1.0, 1e6) for i in range(layers - 1)]
    graph = OpGraph.build(nodes, edges, name="sizes")
    cluster = Cluster((DeviceKind("accelerator", 2, True, None, 1.0),), 20.0)
    plan = solve(graph, cluster, ScheduleDPOptions(schedule=Schedule(ONE_F_ONE_B, 4)))
    assert plan.notes["replication"] == "off"
    assert plan.max_load == pytest.approx(plan.notes["schedule_dp_value"], rel=1e-12)
    assert len(plan.stages) == 2
