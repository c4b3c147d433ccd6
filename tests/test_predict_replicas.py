"""The predicted step and memory of a plan with a replicated stage (`plan.predict`, module docstring):
a two-stage example whose numbers are worked out by hand, a plan with one replica per stage predicted
as before, and `plan --max-replicas --schedule` then `simulate` from the command line."""

import json
from dataclasses import replace

import pytest

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, DeviceKind, Edge, Node, OpGraph, save_graph
from placewise.plan.plan import plan_from_assignment
from placewise.plan.predict import Link, predict
from placewise.plan.replicas import replicated_plan
from placewise.plan.schedule import GPIPE, ONE_F_ONE_B, Schedule
from placewise.plan.simulate import ALLREDUCE, LinkTimes, StageTimes

LINK = Link(latency=0.5, bandwidth=100.0)  # bytes per ms


def _pair(parameters: float | None = 800.0) -> OpGraph:
    """a -> b forward (CPU ms 1 and 4; backward 2 and 8); b holds `parameters` bytes, saves 40 bytes
    of activations; every output is 100 bytes."""
    a = Node(1, "a", 1.0, 1.0, 0.0, True, False, 1, parameters=0.0, gradients=0.0, optimizer_state=0.0,
             activations=0.0, output=100.0)
    b = Node(2, "b", 4.0, 4.0, 0.0, True, False, 2, parameters=parameters, gradients=0.0, optimizer_state=0.0,
             activations=40.0, output=100.0)
    a_ = Node(11, "a'", 2.0, 2.0, 0.0, True, True, 1, parameters=0.0, gradients=0.0, optimizer_state=0.0,
              activations=0.0, output=100.0)
    b_ = Node(12, "b'", 8.0, 8.0, 0.0, True, True, 2, parameters=0.0, gradients=800.0, optimizer_state=800.0,
              activations=0.0, output=100.0)
    return OpGraph.build([a, b, a_, b_], [Edge(1, 2, 1.0, 100.0), Edge(12, 11, 1.0, 100.0)], name="pair",
                         meta={"time_unit": "ms"})


CLUSTER = Cluster((DeviceKind("cpu", 3, False, shared_memory=False),))  # separate processes: they pay the link
SPLIT = {1: Device("cpu", 0), 11: Device("cpu", 0), 2: Device("cpu", 1), 12: Device("cpu", 1)}


def _replicated(graph: OpGraph, r: int = 2):
    return replicated_plan(graph, CLUSTER, SPLIT, {Device("cpu", 1): r}, solver="test", seconds=0.0)


def test_two_stages_with_the_second_on_two_replicas_by_hand():
    pred = predict(_pair(), CLUSTER, _replicated(_pair()), Schedule(GPIPE, 2), link=LINK)
    assert pred.boundary_bytes == (100.0,)
    # The boundary: 0.5 ms latency + 100 bytes / 100 bytes per ms, each way.
    assert pred.links == (LinkTimes(1.5, 1.5),)
    # Stage 1 on 2 replicas. Forward: 4 ms / 2, the command (0.5), the scatter of half its 100 input
    # bytes (0.5 + 50 / 100 = 1.0), no output bytes to gather (it is the last stage): 3.5 ms.
    # Backward: 8 / 2 + 0.5 + the gather of half the input gradient (1.0): 5.5 ms.
    # All-reduce of 800 parameter bytes at the step's end: the end command (0.5) + the ring,
    # 2 (r - 1) x (800 / 2 / 100 + 0.5) = 9.0: 9.5 ms.
    assert pred.stage_times == (StageTimes(1.0, 2.0), StageTimes(3.5, 5.5, allreduce=9.5))
    # GPipe, 2 microbatches: the replicated stage is the bottleneck. Its step, from its first forward:
    # two forwards (7), two backwards (11), waiting for its last gradient to arrive at stage 0 (1.5) and
    # the all-reduce (9.5): 29 ms. Stage 0 meanwhile has its next forward ready (it finishes its own
    # step 21.5 ms after the replicated stage began, and its next forward arrives 2.5 ms later).
    assert pred.step_time == pytest.approx(7.0 + 11.0 + 1.5 + 9.5)
    assert pred.simulation.busy[1] == pytest.approx(2 * (3.5 + 5.5) + 9.5)
    steady = pred.simulation.step_events(1)
    assert [e.kind for e in steady if e.stage == 1 and not e.kind.startswith("send")] == [
        "forward", "forward", "backward", "backward", ALLREDUCE, "update"]
    # One replica: 4 + 8 ms a microbatch and no all-reduce; stage 0's chain then sets the step: its
    # forward (1), the link (1.5), stage 1's two forwards and backwards (24), the link back (1.5) and
    # stage 0's last backward (2).
    single = predict(_pair(), CLUSTER, _replicated(_pair(), 1), Schedule(GPIPE, 2), link=LINK)
    assert single.stage_times[1] == StageTimes(4.0, 8.0)
    assert single.step_time == pytest.approx(1.0 + 1.5 + 24.0 + 1.5 + 2.0)


def test_a_replica_holds_the_whole_parameters_and_its_share_of_the_activations():
    pred = predict(_pair(), CLUSTER, _replicated(_pair()), Schedule(ONE_F_ONE_B, 2), link=LINK)
    single = predict(_pair(), CLUSTER, _replicated(_pair(), 1), Schedule(ONE_F_ONE_B, 2), link=LINK)
    lead = pred.memory[1]
    assert lead.in_flight == 1  # the last of two stages under 1F1B
    # Parameters, gradients and optimizer state whole (800 each); half of 40 bytes of activations for
    # the one microbatch in flight; torch's receive buffers on the lead whole (2 microbatches x 100);
    # half the room of two 100-byte gradients; the scattered input share (100 / 2) for the microbatch
    # in flight (nothing to gather: the last stage sends no bytes on).
    assert (lead.parameters, lead.gradients, lead.optimizer_state) == (800.0, 800.0, 800.0)
    assert (lead.activations, lead.buffers, lead.workspace, lead.replica_copies) == (20.0, 200.0, 100.0, 50.0)
    assert lead.total == pytest.approx(2400 + 20 + 200 + 100 + 50)
    assert single.memory[1].total == pytest.approx(2400 + 40 + 200 + 200)
    assert pred.memory[0] == single.memory[0]  # the unreplicated stage holds what it held


def test_one_replica_per_stage_predicts_as_a_plan_without_replicas():
    graph = _pair()
    plain = plan_from_assignment(graph, CLUSTER, SPLIT, solver="test", seconds=0.0)
    for schedule in (Schedule(GPIPE, 4), Schedule(ONE_F_ONE_B, 3)):
        a = predict(graph, CLUSTER, plain, schedule, link=LINK)
        b = predict(graph, CLUSTER, _replicated(graph, 1), schedule, link=LINK)
        assert a.to_json() == b.to_json()
        assert all(t.allreduce == 0.0 for t in a.stage_times)


def test_shared_memory_cores_scatter_for_free_but_still_all_reduce():
    shared = Cluster((DeviceKind("cpu", 3, False, shared_memory=True),))
    plan = replicated_plan(_pair(), shared, SPLIT, {Device("cpu", 1): 2}, solver="test", seconds=0.0)
    pred = predict(_pair(), shared, plan, Schedule(GPIPE, 2), link=LINK)
    assert pred.stage_times[1] == StageTimes(2.0, 4.0, allreduce=9.5)


def test_a_replicated_stage_without_parameter_bytes_is_one_line():
    graph = _pair(parameters=None)
    plan = replace(_replicated(_pair()), notes={})  # replicas set by hand on a graph that cannot cost them
    with pytest.raises(PlacewiseError, match="stage 1 is replicated 2 times .* parameter bytes"):
        predict(graph, CLUSTER, plan, Schedule(GPIPE, 2), link=LINK)


def test_plan_with_replicas_and_a_schedule_is_predicted_and_simulated(tmp_path, capsys):
    from placewise.cli import main
    graph_path, plan_path, picture = tmp_path / "pair.json", tmp_path / "plan.json", tmp_path / "timeline.png"
    save_graph(_pair(parameters=100.0), graph_path)
    assert main(["plan", str(graph_path), "--cpus", "3", "--accelerators", "0", "--max-replicas", "2",
                 "--schedule", "1f1b", "--microbatches", "2", "--out", str(plan_path)]) == 0
    printed = capsys.readouterr().out
    assert "1f1b with 2 microbatches: predicted step" in printed
    plan = json.loads(plan_path.read_text())
    assert [s["replicas"] for s in plan["stages"]] == [1, 2]
    prediction = plan["notes"]["prediction"]
    assert prediction["stage_times"][1]["allreduce"] > 0 and prediction["stage_memory"][1]["in_flight"] == 1
    assert main(["simulate", str(plan_path), "--picture", str(picture), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step_time"] == pytest.approx(prediction["step_time"])
    assert picture.stat().st_size > 1000
