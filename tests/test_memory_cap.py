"""Under a per-device memory cap the schedule-aware plan runs within it; the one-figure memory rule
admits a plan that does not fit (both measured: peak live tensor bytes per stage process)."""

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stage processes import this module's model

from placewise.graph import Cluster, DeviceKind  # noqa: E402
from placewise.plan import SolveOptions, solve  # noqa: E402
from placewise.plan.predict import predict  # noqa: E402
from placewise.plan.schedule import GPIPE, Schedule  # noqa: E402
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
MICRO = 256
SCHEDULE = Schedule(GPIPE, 4)


def activation_heavy(batch_size: int = MICRO):
    """Wide cheap elementwise layers that save large activations, then narrow layers that do most of
    the work: where a split balanced for time leaves the activations matters for memory."""
    model = nn.Sequential(nn.Linear(64, 4096), nn.GELU(), nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.Linear(4096, 256),
                          *[m for _ in range(8) for m in (nn.Linear(256, 256), nn.ReLU())], nn.Linear(256, 10))
    return model, (torch.randn(batch_size, 64),)


def _cpus(memory: float | None) -> Cluster:
    return Cluster((DeviceKind("cpu", 2, False, memory),))


@pytest.mark.timeout(400)
def test_schedule_aware_plan_fits_the_cap_the_one_figure_plan_exceeds():
    model, inputs = build(SPEC, MICRO)
    graph = profile_model(model, inputs, name="heavy", training=True, threads=1, repeats=1, warmup=0,
                          optimizer="momentum")
    free = solve(graph, _cpus(None), "dp", SolveOptions())
    need = max(m.total for m in predict(graph, _cpus(None), free, SCHEDULE).memory)
    cap = 0.8 * need
    one_figure = solve(graph, _cpus(cap), "dp", SolveOptions())
    assert one_figure.feasible and max(s.memory for s in one_figure.stages) <= cap  # the old rule admits it
    aware = solve_schedule_aware(graph, _cpus(cap), ScheduleDPOptions(schedule=SCHEDULE))
    jobs = [PipelineJob(model=SPEC, batch_size=MICRO * SCHEDULE.microbatches, mapping=mapping_from_plan(plan),
                        schedule=SCHEDULE.kind, microbatches=SCHEDULE.microbatches, steps=2, lr=0.01,
                        collect=("memory",)) for plan in (one_figure, aware)]
    start = time.monotonic()
    results, _ = launch(pipeline_rank, 2, (jobs,), timeout_s=300, preload=["torch"])
    peaks = [[results[rank][j]["peak_memory_bytes"] for rank in range(2)] for j in range(2)]
    print(f"cap {cap / 1e6:.1f} MB; measured peaks one-figure {[p / 1e6 for p in peaks[0]]}, "
          f"schedule-aware {[p / 1e6 for p in peaks[1]]} MB ({time.monotonic() - start:.0f} s)")
    assert max(peaks[0]) > cap
    assert max(peaks[1]) <= cap
