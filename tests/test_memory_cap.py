"""Under a per-device memory cap the schedule-aware plan runs within it; the one-figure memory rule
admits a plan that does not fit (both measured: peak live tensor bytes per stage process). Under a cap
that no split fits without recompute, the planner recomputes a stage and the run stays within it."""

import functools
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stage processes import this module's model

from placewise.errors import PlacewiseError  # noqa: E402
from placewise.graph import Cluster, DeviceKind  # noqa: E402
from placewise.plan import SolveOptions, solve  # noqa: E402
from placewise.plan.predict import predict  # noqa: E402
from placewise.plan.schedule import GPIPE, ONE_F_ONE_B, Schedule  # noqa: E402
from placewise.plan.options import ScheduleDPOptions  # noqa: E402
from placewise.plan.schedule_dp import solve as solve_schedule_aware  # noqa: E402
from placewise.profile import profile_model  # noqa: E402
from placewise.run.cut import mapping_from_plan  # noqa: E402
from placewise.run.job import PipelineJob  # noqa: E402
from placewise.run.launcher import launch  # noqa: E402
from placewise.run.pipeline import pipeline_rank  # noqa: E402
from placewise.run.workload import build  # noqa: E402

pytestmark = pytest.mark.torch
SPEC = "test_memory_cap:activation_heavy"
MICRO = 2048
BLOCKS = 12
SCHEDULE = Schedule(ONE_F_ONE_B, 2)


def activation_heavy(batch_size: int = MICRO):
    """Equal blocks whose saved activations outweigh their parameters: a split balanced for time
    cuts in the middle, where 1F1B's first stage holds two microbatches' activations to the second's one."""
    blocks = [m for _ in range(BLOCKS) for m in (nn.Linear(128, 128), nn.Tanh(), nn.Sigmoid(), nn.Tanh())]
    return nn.Sequential(*blocks, nn.Linear(128, 10)), (torch.randn(batch_size, 128),)


def _cpus(memory: float | None) -> Cluster:
    # The stages run as separate processes: they pay the link and hold torch's receive buffers.
    return Cluster((DeviceKind("cpu", 2, False, memory, shared_memory=False),))


def _least_memory(graph, steps: int = 12, recompute: bool = False, schedule: Schedule = SCHEDULE) -> float:
    """About the least per-device memory any 2-stage plan needs under `schedule` (bisection on dp-schedule)."""
    low, high = 0.0, 1e12
    for _ in range(steps):
        middle = (low + high) / 2 if high < 1e12 else 1e9
        try:
            plan = solve_schedule_aware(graph, _cpus(middle), ScheduleDPOptions(schedule=schedule, recompute=recompute))
            high = max(m.total for m in predict(graph, _cpus(None), plan, schedule).memory)
        except PlacewiseError:
            low = middle
    return high


@functools.cache
def _profiled():
    model, inputs = build(SPEC, MICRO)
    return profile_model(model, inputs, name="heavy", training=True, threads=1, repeats=3, warmup=1,
                         optimizer="momentum")


@pytest.mark.timeout(400)
def test_schedule_aware_plan_fits_the_cap_the_one_figure_plan_exceeds():
    graph = _profiled()
    free = solve(graph, _cpus(None), "dp", SolveOptions())
    need = max(m.total for m in predict(graph, _cpus(None), free, SCHEDULE).memory)
    least = _least_memory(graph)
    # The model is built so that the split balanced for time needs far more than the best split for memory.
    assert need > 1.25 * least, (need, least)
    cap = (need * least) ** 0.5
    one_figure = solve(graph, _cpus(cap), "dp", SolveOptions())
    assert one_figure.feasible and max(s.memory for s in one_figure.stages) <= cap  # the old rule admits it
    assert max(m.total for m in predict(graph, _cpus(cap), one_figure, SCHEDULE).memory) > cap
    # Without recompute: this test is about the position-aware rule alone (the next one adds recompute).
    aware = solve_schedule_aware(graph, _cpus(cap), ScheduleDPOptions(schedule=SCHEDULE, recompute=False))
    jobs = [PipelineJob(model=SPEC, batch_size=MICRO * SCHEDULE.microbatches, mapping=mapping_from_plan(plan),
                        schedule=SCHEDULE.kind, microbatches=SCHEDULE.microbatches, steps=2, lr=0.01,
                        collect=("memory",)) for plan in (one_figure, aware)]
    start = time.monotonic()
    results, _ = launch(pipeline_rank, 2, (jobs,), timeout_s=300, preload=["torch"])
    peaks = [[results[rank][j]["peak_memory_bytes"] for rank in range(2)] for j in range(2)]
    predicted = [[m.total / 1e6 for m in predict(graph, _cpus(cap), plan, SCHEDULE).memory] for plan in (one_figure, aware)]
    print(f"cap {cap / 1e6:.1f} MB; one-figure plan: measured {[p / 1e6 for p in peaks[0]]}, predicted {predicted[0]}; "
          f"schedule-aware: measured {[p / 1e6 for p in peaks[1]]}, predicted {predicted[1]} MB "
          f"({time.monotonic() - start:.0f} s)")
    assert max(peaks[0]) > cap
    assert max(peaks[1]) <= cap


@pytest.mark.timeout(400)
def test_recompute_fits_a_cap_no_split_fits_without():
    """GPipe keeps every microbatch's activations on every stage, so recompute saves the most there."""
    graph, schedule = _profiled(), Schedule(GPIPE, 2)
    cap = 0.85 * _least_memory(graph, schedule=schedule)
    with pytest.raises(PlacewiseError, match="fits"):
        solve_schedule_aware(graph, _cpus(cap), ScheduleDPOptions(schedule=schedule, recompute=False))
    plan = solve_schedule_aware(graph, _cpus(cap), ScheduleDPOptions(schedule=schedule))
    assert plan.recomputed()
    # The plan as planned, and the same split run without recompute.
    jobs = [PipelineJob(model=SPEC, batch_size=MICRO * schedule.microbatches, mapping=mapping_from_plan(plan),
                        recompute=recomputed, schedule=schedule.kind, microbatches=schedule.microbatches, steps=2,
                        lr=0.01, collect=("memory",)) for recomputed in (plan.recomputed(), ())]
    start = time.monotonic()
    results, _ = launch(pipeline_rank, 2, (jobs,), timeout_s=300, preload=["torch"])
    peaks = [[results[rank][j]["peak_memory_bytes"] for rank in range(2)] for j in range(2)]
    predicted = [m.total for m in predict(graph, _cpus(cap), plan, schedule).memory]
    print(f"cap {cap / 1e6:.1f} MB; recompute on stages {plan.recomputed()}: measured {[p / 1e6 for p in peaks[0]]}, "
          f"predicted {[p / 1e6 for p in predicted]} MB; the same split without recompute: measured "
          f"{[p / 1e6 for p in peaks[1]]} MB ({time.monotonic() - start:.0f} s)")
    assert max(peaks[0]) <= cap < max(peaks[1])
