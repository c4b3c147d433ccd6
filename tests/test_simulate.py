"""The schedule simulator against step times worked out by hand and against the known fill/drain formula."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placewise.errors import PlacewiseError
from placewise.plan.schedule import GPIPE, ONE_F_ONE_B, Schedule
from placewise.plan.simulate import LinkTimes, SimulateOptions, StageTimes, simulate


def _equal(p: int, f: float = 1.0, b: float = 2.0) -> list[StageTimes]:
    return [StageTimes(f, b)] * p


def test_one_stage_runs_its_microbatches_back_to_back():
    sim = simulate([StageTimes(1.0, 2.0, update=0.5)], [], Schedule(GPIPE, 3))
    assert sim.step_time == pytest.approx(3 * 3 + 0.5)
    assert sim.busy == (pytest.approx(9.5),)
    assert sim.bubble == pytest.approx(0.0)


@pytest.mark.parametrize("kind", [GPIPE, ONE_F_ONE_B])
@pytest.mark.parametrize("p,m", [(2, 2), (2, 4), (3, 3), (3, 8), (4, 4), (4, 7)])
def test_equal_stages_without_transfers_take_m_plus_p_minus_1_slots(kind, p, m):
    # With equal stages and free links both schedules need (m + p - 1) forward and backward slots.
    sim = simulate(_equal(p), [LinkTimes()] * (p - 1), Schedule(kind, m))
    assert sim.first_step == pytest.approx((m + p - 1) * 3.0)
    assert sim.step_time == pytest.approx((m + p - 1) * 3.0)
    assert sim.bubble == pytest.approx((p - 1) / (m + p - 1))


def test_gpipe_two_stages_with_transfers_by_hand():
    # Stage 0: F0 [0,1] F1 [1,2]; F0 arrives 1.5, F1 at 2.5 (eager). Stage 1: F0 [1.5,2.5] F1 [2.5,3.5]
    # B0 [3.5,5.5] B1 [5.5,7.5]; B0 arrives at stage 0 at 6, B1 at 8: B0 [6,8] B1 [8,10].
    links = [LinkTimes(0.5, 0.5)]
    sim = simulate(_equal(2), links, Schedule(GPIPE, 2))
    assert sim.first_step == pytest.approx(10.0)
    starts = {(e.stage, e.kind, e.microbatch): (e.start, e.end) for e in sim.step_events(0)}
    assert starts[(1, "forward", 1)] == pytest.approx((2.5, 3.5))
    assert starts[(0, "backward", 0)] == pytest.approx((6.0, 8.0))
    assert starts[(0, "send-forward", 1)] == pytest.approx((2.0, 2.5))


def test_rendezvous_delays_a_send_until_the_receiver_posts():
    # Rendezvous: F1 leaves stage 0 only when stage 1 posts its receive after F0 (at 2.5): arrives at 3.
    # Stage 1: F1 [3,4] B0 [4,6] B1 [6,8]; stage 0 posted recv B0 at 3: B0 arrives 6.5, [6.5,8.5];
    # B1 sent at 8, stage 0 posts at 8.5: arrives 9, [9,11].
    sim = simulate(_equal(2), [LinkTimes(0.5, 0.5)], Schedule(GPIPE, 2), SimulateOptions(rendezvous=True))
    assert sim.first_step == pytest.approx(11.0)


def test_a_late_receive_waits_for_the_sender_to_stop_computing():
    # Forward only, stage 0 1 per chunk, stage 1 1.5, free links. Stage 0: F0 [0,1] F1 [1,2] F2 [2,3], then
    # waits for its sends. Stage 1: F0 [1,2.5]; it posts F1's receive at 2.5, after F1 was sent (2), while
    # stage 0 computes F2: answered at 3, F1 [3,4.5]; F2's receive, posted at 4.5, finds stage 0 waiting:
    # at once, F2 [4.5,6]. Without the rule F1 would start at 2.5.
    times = [StageTimes(1.0), StageTimes(1.5)]
    # With a late answer of half the rest of the chunk, F1 waits until 2.75.
    for late, f1 in ((1.0, 3.0), (0.5, 2.75), (0.0, 2.5)):
        sim = simulate(times, [LinkTimes(late_answer=late)], Schedule(GPIPE, 3), SimulateOptions(training=False))
        ev = {(e.stage, e.kind, e.microbatch): (e.start, e.end) for e in sim.step_events(0)}
        assert ev[(1, "forward", 1)] == pytest.approx((f1, f1 + 1.5))
        assert ev[(1, "forward", 2)][0] == pytest.approx(f1 + 1.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 5), st.floats(0.1, 9)), min_size=2, max_size=4),
       st.floats(0, 2), st.integers(1, 6), st.sampled_from([GPIPE, ONE_F_ONE_B]))
def test_answering_late_receives_only_delays(chunks, wire, m, kind):
    # The rule only ever starts a transfer later than a plain replay would, so no step gets shorter.
    times = [StageTimes(f, b) for f, b in chunks]
    m = max(m, len(times))
    plain = simulate(times, [LinkTimes(wire, wire)] * (len(times) - 1), Schedule(kind, m))
    answered = simulate(times, [LinkTimes(wire, wire, late_answer=1.0)] * (len(times) - 1), Schedule(kind, m))
    assert answered.step_time >= plain.step_time - 1e-9
    assert answered.first_step >= plain.first_step - 1e-9


def test_without_overlap_the_sender_pays_the_transfer():
    # Stage 0 copies each forward itself: F0 [0,1] copy to 1.5, F1 [1.5,2.5] copy to 3.
    sim = simulate(_equal(2), [LinkTimes(0.5, 0.5)], Schedule(GPIPE, 2), SimulateOptions(overlap=False))
    ev = {(e.stage, e.kind, e.microbatch): (e.start, e.end) for e in sim.step_events(0)}
    assert ev[(0, "forward", 1)] == pytest.approx((1.5, 2.5))
    assert ev[(1, "forward", 1)][0] == pytest.approx(3.0)


def test_one_f_one_b_two_stages_by_hand():
    # Stage 1 (one warm-up forward): F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]; stage 0: F0 [0,1] F1 [1,2],
    # B0 waits for stage 1's send posted at 4: [4,6], B1 at 7: [7,9].
    sim = simulate(_equal(2), [LinkTimes()], Schedule(ONE_F_ONE_B, 2))
    ev = {(e.stage, e.kind, e.microbatch): (e.start, e.end) for e in sim.step_events(0)}
    assert ev[(1, "forward", 1)] == pytest.approx((4.0, 5.0))
    assert ev[(0, "backward", 0)] == pytest.approx((4.0, 6.0))
    assert ev[(0, "backward", 1)] == pytest.approx((7.0, 9.0))


def test_slow_stage_sets_the_period_plus_the_fill():
    # The steady state is the slow stage (4 per microbatch x m); the fast stage adds its own fill.
    times = [StageTimes(0.5, 0.5), StageTimes(2.0, 2.0)]
    sim = simulate(times, [LinkTimes()], Schedule(ONE_F_ONE_B, 4))
    assert sim.step_time == pytest.approx(4 * 4.0 + 1.0)
    assert max(sim.busy) == pytest.approx(16.0)


def test_update_time_repeats_every_step():
    times = [StageTimes(1.0, 1.0, update=3.0), StageTimes(1.0, 1.0, update=0.0)]
    sim = simulate(times, [LinkTimes()], Schedule(GPIPE, 2))
    # Step 0: stage 1 ends at 5 (B1 [4,5]); stage 0 ends B1 at 6, updates until 9. Step 1: stage 0's F0
    # [9,10], stage 1's F0 [10,11] ... B1 [13,14]: the last stage ends 9 after its previous step.
    assert sim.step_time == pytest.approx(9.0)


def test_inference_runs_forwards_only():
    sim = simulate(_equal(3), [LinkTimes()] * 2, Schedule(ONE_F_ONE_B, 4), SimulateOptions(training=False))
    assert sim.first_step == pytest.approx(6.0)
    assert all(e.kind in ("forward", "send-forward") for e in sim.events)


@pytest.mark.parametrize("times,links,schedule,message", [
    ([], [], Schedule(GPIPE, 2), "no stages"),
    (_equal(2), [], Schedule(GPIPE, 2), "link"),
    ([StageTimes(-1.0)], [], Schedule(GPIPE, 2), "negative"),
    (_equal(3), [LinkTimes()] * 2, Schedule(ONE_F_ONE_B, 2), "one microbatch per stage"),
])
def test_bad_input_is_one_line(times, links, schedule, message):
    with pytest.raises(PlacewiseError, match=message):
        simulate(times, links, schedule)


def test_overhead_is_charged_half_to_each_forward_and_backward():
    # One stage, m = 2: each chunk 1 + 0.25 (half of 0.5 per microbatch), then the update of 3.
    sim = simulate([StageTimes(1.0, 1.0, update=3.0, overhead=0.5)], [], Schedule(GPIPE, 2))
    ev = [(e.kind, e.start, e.end) for e in sim.step_events(0)]
    assert ev[:2] == [("forward", 0.0, 1.25), ("forward", 1.25, 2.5)]
    assert sim.step_time == pytest.approx(2 * (1.0 + 1.0 + 0.5) + 3.0)
    assert sim.busy == pytest.approx((8.0,))
    # Forward only: the whole overhead goes with the forward.
    infer = simulate([StageTimes(1.0, overhead=0.5)], [], Schedule(GPIPE, 2), SimulateOptions(training=False))
    assert infer.step_time == pytest.approx(3.0)
