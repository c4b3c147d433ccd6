"""Predicted against measured: step time and per-stage peak memory of 2-stage CPU pipelines.

Three models that appear in no other benchmark (a CNN, a transformer, a branchy inception-style
net), each:

1. profiled for training at the microbatch size with one thread (`profile_model`): per-node forward
   and backward times in ms per microbatch (scaled to the whole model's run), parameter,
   optimizer-state and activation bytes;
2. planned with the exact DP on 2 CPU cores that run as separate processes and so pay transfers
   over the link measured here by `run.links` (`shared_memory: false`, as `placewise devices --out`
   describes this machine), the graph's transfer costs taken at the measured bandwidth;
3. predicted: the step time from `plan.simulate` (torch's GPipe or 1F1B order over the stages'
   profiled times, transfers over the measured link and answered as late as measured here
   (`Cluster.late_answer`), each stage's share of the profiled optimizer step, and the runtime's
   per-microbatch overhead beyond the chunks measured on a null pipeline), per-stage peak memory
   from `plan.stage_memory` (parameters, gradients, optimizer state, activations x microbatches in
   flight, torch's receive buffers). The machine's speed drifts by several percent within a
   minute, so each round is profiled again just before it runs (the plan stays the first round's),
   and "predicted" is the median over rounds of each round's prediction ("spread": their range);
4. measured: each configuration (GPipe and 1F1B; 2, 4 and 8 microbatches of a fixed size) run as
   a pipeline of two processes with one thread each, all configurations interleaved in shuffled
   order within a round, rounds repeated; the figure is the median over rounds of each run's
   median step ("run spread": the range of the rounds' steps over their median). Peak memory is
   measured in separate runs by counting live tensor bytes per stage (`run.tensor_memory`).

"error" compares "predicted" (a core per stage) with "measured". The "sim(meas)" column replays the
schedule over the stage times measured in the same run: it separates the schedule model's error
from the profile's. "cpu/step" is each stage's thread CPU ms per step, measured and predicted.
"share" is the share of a core the stages got (their chunks' CPU time over wall time);
"pred@share" is the prediction with the cores slowed to it, and "err@share" its error, which is
not a prediction: it only tells the load's part of the error apart. "post blk" is the wall ms per
step each stage spent inside posting sends and receives beyond its CPU time there (see
docs/schedules.md). The load is printed before and after.

    .venv/bin/python benchmarks/pipeline_accuracy.py [--quick] [--rounds 3] [--steps 4] [--models cnn,transformer,branchy] [--json OUT]

`--quick` (one round of two timed steps) is for a check; the figures for the record come from the
default rounds on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# Ranks import the model factories as `benchmarks.pipeline_accuracy:NAME`, so the root goes on the path.
sys.path.insert(0, str(ROOT))

from placewise.graph import Cluster, DeviceKind, OpGraph
from placewise.plan import SolveOptions, solve
from placewise.plan.plan import Plan
from placewise.plan.predict import Link, Prediction, predict
from placewise.plan.schedule import SCHEDULES, Schedule
from placewise.plan.simulate import SimulateOptions, StageTimes, simulate
from placewise.profile import profile_model
from placewise.run.launcher import launch
from placewise.run.links import LinkMeasurement, measure_late_answer, measure_link, measure_stage_overhead
from placewise.run.cut import mapping_from_plan
from placewise.run.job import PipelineJob
from placewise.run.pipeline import pipeline_rank
from placewise.run.workload import build

MICRO = 8  # samples per microbatch: the batch is MICRO x microbatches
MICROBATCHES = (2, 4, 8)
IMAGE = (3, 32, 32)
TOKENS, FEATURES = 32, 64
# Two cores in separate processes: each stage pays its transfers (the link is filled in when measured).
CORES = DeviceKind("cpu", 2, False, shared_memory=False)


# ---- three held-out models ---------------------------------------------------------------------------
def small_cnn(batch_size: int = MICRO):
    """A plain CNN: conv-BN-ReLU blocks, two poolings, a linear head."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    model = nn.Sequential(*block(3, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 96), *block(96, 96),
                          nn.MaxPool2d(2), *block(96, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    return model, (torch.randn(batch_size, *IMAGE),)


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        # Indexing, not unpacking: torch.fx cannot iterate over a traced value.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).flatten(2))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.att, self.ln2 = nn.LayerNorm(d), _Attention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.att(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _Transformer(nn.Module):
    def __init__(self, d: int = 128, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, d)
        self.blocks = nn.Sequential(*(_Block(d, heads) for _ in range(layers)))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(dim=1))


def tiny_transformer(batch_size: int = MICRO):
    """A pre-norm transformer encoder (4 blocks, width 128, 4 heads) over 32 tokens of 64 features."""
    return _Transformer(), (torch.randn(batch_size, TOKENS, FEATURES),)


class _Inception(nn.Module):
    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.one = nn.Conv2d(cin, width, 1)
        self.three = nn.Sequential(nn.Conv2d(cin, width // 2, 1), nn.ReLU(), nn.Conv2d(width // 2, width, 3, padding=1))
        self.five = nn.Sequential(nn.Conv2d(cin, width // 4, 1), nn.ReLU(), nn.Conv2d(width // 4, width // 2, 5, padding=2))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(cin, width // 2, 1))
        self.skip = nn.Conv2d(cin, 3 * width, 1)

    def forward(self, x):
        branches = torch.cat([self.one(x), self.three(x), self.five(x), self.pool(x)], dim=1)
        return torch.relu(branches + self.skip(x))


def branchy_net(batch_size: int = MICRO):
    """Inception-style blocks: four parallel branches concatenated, plus a projected skip."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), _Inception(32, 32), nn.MaxPool2d(2),
                          _Inception(96, 48), nn.MaxPool2d(2), _Inception(144, 64), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(192, 10))
    return model, (torch.randn(batch_size, *IMAGE),)


MODELS = {"cnn": "small_cnn", "transformer": "tiny_transformer", "branchy": "branchy_net"}


def spec(model: str) -> str:
    return f"benchmarks.pipeline_accuracy:{MODELS.get(model, model)}"


# ---- prediction --------------------------------------------------------------------------------------
@dataclass
class Planned:
    name: str
    graph: OpGraph  # the profile the plan was made from
    plan: Plan
    # One profile per round, each taken just before that round's runs: the machine's speed drifts by
    # several percent over a minute (a fixed matmul's CPU time moved 7.3-8.6 ms within 40 s here), so
    # a prediction is compared with runs made around the same time, as medians over rounds.
    profiles: list[OpGraph] = field(default_factory=list)


@dataclass(frozen=True)
class Here:
    """What `placewise devices --measure` measures of this machine, measured before planning: the link,
    the runtime's seconds per microbatch beyond the chunks, and the late answer (`Cluster.late_answer`)."""
    link: LinkMeasurement
    overhead: float
    late_answer: float

    @property
    def cluster(self) -> Cluster:
        return Cluster((CORES,), self.link.bandwidth, self.link.latency, self.overhead, self.late_answer)


def profile(name: str, here: Here) -> OpGraph:
    model, inputs = build(spec(name), MICRO)
    return profile_model(model, inputs, name=name, training=True, threads=1, repeats=5, warmup=2,
                         optimizer="momentum", cluster=here.cluster)


def profile_and_plan(name: str, here: Here) -> Planned:
    graph = profile(name, here)
    return Planned(name, graph, solve(graph, here.cluster, "dp", SolveOptions()))


def predict_ms(planned: Planned, schedule: Schedule, here: Here, options: SimulateOptions,
               share: float = 1.0) -> Prediction:
    """The plan's prediction (ms, bytes) with each stage getting `share` of a core (1: a core to itself)."""
    ms_link = Link(1e3 * here.link.latency, here.link.bandwidth / 1e3)
    cluster = here.cluster
    cluster = replace(cluster, kinds=tuple(replace(k, speed=k.speed * share) for k in cluster.kinds))
    return predict(planned.graph, cluster, planned.plan, schedule, link=ms_link, options=options,
                   overhead=1e3 * here.overhead)


def core_share(reports: list[dict]) -> float:
    """The share of a core the stages' computing threads got in a run: their CPU time over their wall
    time while computing. On a machine shared with other work this is the cores' speed at the time."""
    return (sum(r["cpu_seconds"] for r in reports)
            / sum(r["forward_seconds"] + r["backward_seconds"] for r in reports))


def measured_stage_times(report: dict, m: int) -> StageTimes:
    """A stage's mean forward and backward ms per microbatch in a measured run, and its update per step."""
    steps = len(report["step_seconds"])
    return StageTimes(1e3 * report["forward_seconds"] / (m * steps), 1e3 * report["backward_seconds"] / (m * steps),
                      1e3 * report["outside_seconds"]["update"] / steps)


def blocked_in_post_ms(report: dict) -> float:
    """Wall ms per step the stage spent posting sends and receives beyond its CPU time there: time its
    thread was off the core inside gloo's isend/irecv (waiting for the transport, which runs on threads
    that share the busy cores), which no link measurement between idle processes shows."""
    part = "post"
    return 1e3 * (report["outside_seconds"][part] - report["outside_cpu_seconds"][part]) / len(report["step_seconds"])


def step_cpu_ms(report: dict) -> float:
    """The stage's thread CPU ms per step: its work whatever the load (compared with the predicted busy time)."""
    return 1e3 * report["step_cpu_seconds"] / len(report["step_seconds"])


# ---- measurement -------------------------------------------------------------------------------------
def jobs_for(planned: Planned, steps: int, warmup: int) -> dict[tuple[str, str, int], PipelineJob]:
    mapping = mapping_from_plan(planned.plan)
    return {(planned.name, kind, m): PipelineJob(model=spec(planned.name), batch_size=MICRO * m, mapping=mapping,
                                                 schedule=kind, microbatches=m, steps=steps, warmup=warmup, lr=0.01,
                                                 optimizer="sgd")
            for kind in SCHEDULES for m in MICROBATCHES}


def measure_round(jobs: dict, seed: int) -> dict:
    """Run every job once, in shuffled order, in one launch of two processes."""
    keys = list(jobs)
    random.Random(seed).shuffle(keys)
    results, _ = launch(pipeline_rank, 2, ([jobs[k] for k in keys],), threads=1, timeout_s=1800, preload=["torch"])
    return {k: [results[0][i], results[1][i]] for i, k in enumerate(keys)}


def measure_memory(jobs: dict) -> dict:
    """Each job's per-stage peak live tensor bytes over two steps (one launch, every job in turn)."""
    keys = list(jobs)
    counted = [replace(jobs[k], steps=2, warmup=0, collect=("memory",)) for k in keys]
    results, _ = launch(pipeline_rank, 2, (counted,), threads=1, timeout_s=1800, preload=["torch"])
    return {k: [results[0][i]["peak_memory_bytes"], results[1][i]["peak_memory_bytes"]] for i, k in enumerate(keys)}


def rows_for(jobs: dict, planned: dict, rounds: list[dict], memory: dict | None, here: Here,
             options: SimulateOptions) -> list[dict]:
    rows = []
    for key in jobs:
        name, kind, m = key
        schedule = Schedule(kind, m)
        steps = [1e3 * statistics.median(r[key][1]["step_seconds"]) for r in rounds]
        measured = statistics.median(steps)
        share = statistics.median(core_share(r[key]) for r in rounds)
        profiles = [replace(planned[name], graph=g) for g in planned[name].profiles or [planned[name].graph]]
        alone = [predict_ms(p, schedule, here, options) for p in profiles]
        predicted = statistics.median(p.step_time for p in alone)
        at_share = statistics.median(predict_ms(p, schedule, here, options, share).step_time for p in profiles)
        sim_measured = statistics.median(simulate([measured_stage_times(rep, m) for rep in r[key]], alone[0].links,
                                                  schedule, options).step_time for r in rounds)
        row = {"model": name, "schedule": kind, "microbatches": m, "measured_ms": measured,
               "predicted_ms": predicted, "core_share": share, "predicted_at_share_ms": at_share,
               "time_error": predicted / measured - 1, "time_error_at_share": at_share / measured - 1,
               "profile_spread": (max(p.step_time for p in alone) - min(p.step_time for p in alone)) / predicted,
               "run_spread": (max(steps) - min(steps)) / measured,
               "sim_measured_ms": sim_measured,
               "cpu_ms_measured": [statistics.median(step_cpu_ms(r[key][i]) for r in rounds) for i in range(2)],
               "cpu_ms_predicted": [statistics.median(p.simulation.busy[i] for p in alone) for i in range(2)],
               "blocked_in_post_ms": [statistics.median(blocked_in_post_ms(r[key][i]) for r in rounds) for i in range(2)]}
        planned_memory = predict_ms(planned[name], schedule, here, options).memory
        if memory is not None and planned_memory is not None:
            row["measured_mb"] = [b / 1e6 for b in memory[key]]
            row["predicted_mb"] = [mem.total / 1e6 for mem in planned_memory]
            row["memory_error"] = max(abs(p / q - 1) for p, q in zip(row["predicted_mb"], row["measured_mb"]))
        rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'model':12} {'sched':6} {'m':>2} {'measured':>9} {'predicted':>9} {'error':>7} {'share':>6} "
          f"{'pred@share':>10} {'err@share':>9} {'spread':>6} {'run spread':>10} {'sim(meas)':>9} {'cpu/step meas':>13} {'cpu/step pred':>13} "
          f"{'post blk':>9} {'mem MB meas':>13} {'mem MB pred':>13} {'mem err':>7}")
    for r in rows:
        mem = ""
        if "measured_mb" in r:
            mem = (f" {'/'.join(f'{x:.1f}' for x in r['measured_mb']):>13} "
                   f"{'/'.join(f'{x:.1f}' for x in r['predicted_mb']):>13} {r['memory_error']:7.1%}")
        cpu = (f" {'/'.join(f'{x:.0f}' for x in r['cpu_ms_measured']):>13}"
               f" {'/'.join(f'{x:.0f}' for x in r['cpu_ms_predicted']):>13}"
               f" {'/'.join(f'{x:.0f}' for x in r['blocked_in_post_ms']):>9}")
        print(f"{r['model']:12} {r['schedule']:6} {r['microbatches']:>2} {r['measured_ms']:9.1f} "
              f"{r['predicted_ms']:9.1f} {r['time_error']:+7.1%} {r['core_share']:6.2f} "
              f"{r['predicted_at_share_ms']:10.1f} {r['time_error_at_share']:+9.1%} {r['profile_spread']:6.1%} {r['run_spread']:10.1%} {r['sim_measured_ms']:9.1f}{cpu}{mem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of two timed steps after one warm-up step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rendezvous", action="store_true", help="simulate transfers as rendezvous (see plan.simulate)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rounds_n, steps, warmup = (1, 2, 1) if args.quick else (args.rounds, args.steps, 2)
    started = time.time()
    print(f"load before: {os.getloadavg()}", flush=True)
    # As `placewise devices --measure` records this machine.
    here = Here(measure_link(gpu=False), statistics.mean(measure_stage_overhead()), measure_late_answer())
    print(f"link: latency {here.link.latency * 1e6:.0f} us, bandwidth {here.link.bandwidth / 1e9:.2f} GB/s; "
          f"runtime overhead {here.overhead * 1e3:.2f} ms per microbatch per stage; late answer "
          f"{here.late_answer:.0%} of the sender's chunk", flush=True)
    planned = {name: profile_and_plan(name, here) for name in args.models.split(",")}
    jobs = {k: v for p in planned.values() for k, v in jobs_for(p, steps, warmup).items()}
    rounds = []
    for seed in range(rounds_n):
        for p in planned.values():  # the plan's own profile serves the first round
            p.profiles.append(p.graph if seed == 0 else profile(p.name, here))
        rounds.append(measure_round(jobs, seed))
    memory = None if args.no_memory else measure_memory(jobs)
    rows = rows_for(jobs, planned, rounds, memory, here, SimulateOptions(rendezvous=args.rendezvous))
    print_rows(rows)
    within = sum(abs(r["time_error"]) <= 0.10 for r in rows)
    memory = [r["memory_error"] <= 0.15 for r in rows if "memory_error" in r]
    print(f"within 10% on time: {within} of {len(rows)} rows"
          + (f"; within 15% on memory: {sum(memory)} of {len(memory)}" if memory else ""))
    print(f"load after: {os.getloadavg()}; {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "link": here.link.to_json(), "overhead_seconds": here.overhead,
                                         "late_answer": here.late_answer,
                                         "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
