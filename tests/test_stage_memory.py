"""Per-stage memory by pipeline position: 1F1B keeps min(m, p - i) microbatches, GPipe all m."""

import pytest

from placewise.errors import PlacewiseError
from placewise.plan.schedule import GPIPE, ONE_F_ONE_B, Schedule
from placewise.plan.stage_memory import StageBytes, pipeline_memory, stage_memory

STAGE = StageBytes(parameters=100.0, optimizer_state=100.0, activations=10.0, inputs=3.0, outputs=2.0)


def test_one_f_one_b_first_stage_holds_the_most():
    mems = pipeline_memory([STAGE] * 4, Schedule(ONE_F_ONE_B, 8))
    assert [m.in_flight for m in mems] == [4, 3, 2, 1]
    assert [m.activations for m in mems] == [40.0, 30.0, 20.0, 10.0]
    # 100 parameters + 100 gradients + 100 optimizer state + activations + buffers (8 x 3 in, 8 x 2 out).
    assert mems[0].total == pytest.approx(300 + 40 + 16)
    assert mems[1].total == pytest.approx(300 + 30 + 24 + 16)
    assert mems[3].total == pytest.approx(300 + 10 + 24)


def test_gpipe_every_stage_holds_every_microbatch():
    mems = pipeline_memory([STAGE] * 3, Schedule(GPIPE, 5))
    assert [m.in_flight for m in mems] == [5, 5, 5]
    assert mems[2].activations == pytest.approx(50.0)


def test_fewer_microbatches_than_stages_cap_in_flight():
    assert stage_memory(STAGE, 0, 4, Schedule(ONE_F_ONE_B, 2)).in_flight == 2


def test_inference_holds_no_gradients_or_optimizer_state():
    mem = stage_memory(STAGE, 1, 2, Schedule(GPIPE, 4), training=False)
    assert (mem.gradients, mem.optimizer_state, mem.in_flight) == (0.0, 0.0, 1)
    assert mem.total == pytest.approx(100 + 10 + 4 * 3)


def test_bad_input_is_one_line():
    with pytest.raises(PlacewiseError, match="position"):
        stage_memory(STAGE, 3, 3, Schedule(GPIPE, 2))
    with pytest.raises(PlacewiseError, match="activations"):
        StageBytes(parameters=1.0, activations=-1.0)


def test_workspace_is_added_once_whatever_the_position():
    stage = StageBytes(parameters=0.0, activations=10.0, workspace=7.0)
    mems = pipeline_memory([stage] * 2, Schedule(ONE_F_ONE_B, 4))
    assert [m.total for m in mems] == [pytest.approx(20 + 7), pytest.approx(10 + 7)]


def test_recompute_keeps_outputs_per_microbatch_and_one_microbatchs_activations():
    plain, recomputed = (stage_memory(STAGE, 0, 4, Schedule(ONE_F_ONE_B, 8), recompute=r) for r in (False, True))
    assert plain.activations == pytest.approx(4 * 10.0)
    # 4 microbatches in flight keep their 2-byte outputs; the one in its backward holds all 10 again.
    assert recomputed.activations == pytest.approx(4 * 2.0 + 10.0)
    assert plain.total - recomputed.total == pytest.approx(40.0 - 18.0)
    assert [m.activations for m in pipeline_memory([STAGE] * 2, Schedule(GPIPE, 3), recompute=[True, False])] == \
        [pytest.approx(3 * 2.0 + 10.0), pytest.approx(30.0)]


def test_recompute_changes_nothing_forward_only():
    assert stage_memory(STAGE, 1, 2, Schedule(GPIPE, 4), training=False, recompute=True) == \
        stage_memory(STAGE, 1, 2, Schedule(GPIPE, 4), training=False)
