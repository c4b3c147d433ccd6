"""A plan's predicted step time and per-stage memory under a schedule, from a small training graph."""

import pytest

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, DeviceKind, Edge, Node, OpGraph
from placewise.plan.plan import plan_from_assignment
from placewise.plan.predict import Link, boundary_bytes, predict
from placewise.plan.schedule import GPIPE, ONE_F_ONE_B, Schedule
from placewise.plan.simulate import LinkTimes, StageTimes, simulate


def _chain() -> OpGraph:
    """a -> b -> c forward (CPU ms 1, 2, 3; backward 2, 4, 6) with a skip a -> c; 100 bytes per output."""
    forward = [Node(i, name, t, t, 0.0, True, False, i, parameters=10.0 * i, gradients=0.0, optimizer_state=0.0,
                    activations=5.0, output=100.0) for i, name, t in ((1, "a", 1.0), (2, "b", 2.0), (3, "c", 3.0))]
    backward = [Node(10 + i, f"{n.name}'", 2 * n.cpu_time, 2 * n.cpu_time, 0.0, True, True, i, parameters=0.0,
                     gradients=10.0 * i, optimizer_state=10.0 * i, activations=0.0, output=100.0)
                for i, n in enumerate(forward, 1)]
    edges = [Edge(1, 2, 1.0, 100.0), Edge(2, 3, 1.0, 100.0), Edge(1, 3, 1.0, 100.0),
             Edge(13, 12, 1.0, 100.0), Edge(12, 11, 1.0, 100.0), Edge(13, 11, 1.0, 100.0)]
    return OpGraph.build(forward + backward, edges, name="chain")


def _plan(graph: OpGraph, cuts: dict[int, int], shared_memory: bool = False):
    """The graph cut onto CPU cores: separate processes that pay the link (the runtime's stages), or
    with `shared_memory` the paper's cores in one process."""
    cluster = Cluster((DeviceKind("cpu", 3, False, shared_memory=shared_memory),))
    assignment = {n.id: Device("cpu", cuts[n.colocate]) for n in graph.nodes}
    return cluster, plan_from_assignment(graph, cluster, assignment, solver="test", seconds=0.0)


def test_boundary_bytes_carry_skips_through_each_stage():
    graph = _chain()
    stage_of = {1: 0, 2: 1, 3: 2, 11: 0, 12: 1, 13: 2}
    # Boundary 0: a's output (read by b and by c); boundary 1: b's and a's (riding through stage 1).
    assert boundary_bytes(graph, stage_of, 3) == [100.0, 200.0]


def test_prediction_is_the_simulation_of_the_stage_times():
    graph = _chain()
    cluster, plan = _plan(graph, {1: 0, 2: 0, 3: 1})
    schedule = Schedule(ONE_F_ONE_B, 4)
    pred = predict(graph, cluster, plan, schedule, link=Link(latency=0.5, bandwidth=100.0))
    assert pred.stage_times == (StageTimes(3.0, 6.0), StageTimes(3.0, 6.0))
    assert pred.boundary_bytes == (200.0,)  # a's and b's outputs both reach c
    expected = simulate([StageTimes(3.0, 6.0)] * 2, [LinkTimes(2.5, 2.5)], schedule).step_time
    assert pred.step_time == pytest.approx(expected)
    assert pred.step_time > 4 * 9.0  # more than the steady state: fill, drain and transfers
    assert pred.max_load == pytest.approx(9.0)


def test_memory_by_position():
    graph = _chain()
    cluster, plan = _plan(graph, {1: 0, 2: 1, 3: 2})
    pred = predict(graph, cluster, plan, Schedule(ONE_F_ONE_B, 4))
    first, middle, last = pred.memory
    assert (first.in_flight, middle.in_flight, last.in_flight) == (3, 2, 1)
    # Stage 0: parameters 10, gradients 10, optimizer state 10, 3 x 5 activations, 4 x 100 outgoing
    # buffers, and room for two gradients of its largest output (100).
    assert first.total == pytest.approx(30 + 15 + 400 + 200)
    # Stage 2: 30 x 3, one microbatch's activations, 4 x 200 incoming buffers, 2 x 100.
    assert last.total == pytest.approx(90 + 5 + 800 + 200)
    gpipe = predict(graph, cluster, plan, Schedule(GPIPE, 4))
    assert [m.in_flight for m in gpipe.memory] == [4, 4, 4]


def test_graph_without_bytes_is_refused_in_one_line():
    graph = _chain()
    bare = OpGraph.build(graph.nodes, [Edge(e.src, e.dst, e.transfer_cost, None) for e in graph.edges])
    cluster, plan = _plan(bare, {1: 0, 2: 0, 3: 1})
    with pytest.raises(PlacewiseError, match="no bytes"):
        predict(bare, cluster, plan, Schedule(GPIPE, 2))


def test_shared_memory_cores_pay_no_link_and_hold_no_buffers():
    graph = _chain()
    schedule = Schedule(ONE_F_ONE_B, 4)
    cluster, plan = _plan(graph, {1: 0, 2: 0, 3: 1}, shared_memory=True)
    pred = predict(graph, cluster, plan, schedule, link=Link(latency=0.5, bandwidth=100.0))
    assert pred.links == (LinkTimes(),)
    assert pred.step_time == pytest.approx(simulate([StageTimes(3.0, 6.0)] * 2, [LinkTimes()], schedule).step_time)
    separate = predict(graph, *_plan(graph, {1: 0, 2: 0, 3: 1}), schedule, link=Link(latency=0.5, bandwidth=100.0))
    # The same stages in separate processes add 4 x 200 outgoing / incoming buffer bytes.
    assert [b.total - a.total for a, b in zip(pred.memory, separate.memory)] == pytest.approx([800.0, 800.0])
    assert separate.step_time > pred.step_time


def test_update_is_shared_by_parameter_bytes_and_overhead_reaches_every_stage():
    graph = _chain()
    # The profile's optimizer step over all parameters (a: 10, b: 20, c: 30 bytes) took 6 ms on a core.
    timed = OpGraph.build(graph.nodes, graph.edges, name="chain", meta={"cpu_update_ms": "6", "acc_update_ms": "1"})
    cluster, plan = _plan(timed, {1: 0, 2: 0, 3: 1})
    pred = predict(timed, cluster, plan, Schedule(GPIPE, 2), overhead=0.25)
    assert [t.update for t in pred.stage_times] == pytest.approx([6.0 * 30 / 60, 6.0 * 30 / 60])
    assert [t.overhead for t in pred.stage_times] == [0.25, 0.25]
    untimed = predict(graph, cluster, plan, Schedule(GPIPE, 2))
    assert [t.update for t in untimed.stage_times] == [0.0, 0.0]
    assert pred.step_time > untimed.step_time


def test_a_plan_for_a_measured_cluster_carries_its_overhead():
    from dataclasses import replace

    from placewise.plan.predict import with_prediction
    graph = OpGraph.build(_chain().nodes, _chain().edges, name="chain", meta={"time_unit": "ms"})
    cluster, plan = _plan(graph, {1: 0, 2: 0, 3: 1})
    measured = replace(cluster, bandwidth=1e9, latency=1e-4, overhead=5e-4)
    recorded = with_prediction(graph, measured, plan, Schedule(GPIPE, 2)).notes["prediction"]
    assert [t["overhead"] for t in recorded["stage_times"]] == pytest.approx([0.5, 0.5])  # ms per microbatch
