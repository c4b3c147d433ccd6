"""Predicted against measured: step time and per-stage peak memory of 2-stage CPU pipelines.

Three models that appear in no other benchmark (a CNN, a transformer, a branchy inception-style
net), each:

1. profiled for training at the microbatch size with one thread (`profile_model`): per-node forward
   and backward times in ms per microbatch, parameter, optimizer-state and activation bytes;
2. planned on 2 CPU stages with the exact DP;
3. predicted: the step time from `plan.simulate` (torch's GPipe or 1F1B order over the stages'
   profiled times, transfers over the link measured here by `run.links`), per-stage peak memory from
   `plan.stage_memory` (parameters, gradients, optimizer state, activations x microbatches in flight,
   torch's receive buffers);
4. measured: each configuration (GPipe and 1F1B; 2, 4 and 8 microbatches of a fixed size) run as
   a pipeline of two processes with one thread each, all configurations interleaved in shuffled
   order within a round, rounds repeated; the figure is the median over rounds of each run's
   median step. Peak memory is measured in separate runs by counting live tensor bytes per stage
   (`run.tensor_memory`).

The "sim(measured)" column replays the schedule over the stage times measured in the same run: it
separates the schedule model's error from the profile's.

    .venv/bin/python benchmarks/pipeline_accuracy.py [--rounds 3] [--steps 4] [--models cnn,transformer,branchy] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# Ranks import the model factories as `benchmarks.pipeline_accuracy:NAME`, so the root goes on the path.
sys.path.insert(0, str(ROOT))

from placewise.graph import Cluster, OpGraph
from placewise.plan import SolveOptions, solve
from placewise.plan.schedule import GPIPE, ONE_F_ONE_B, SCHEDULES, Schedule
from placewise.plan.simulate import LinkTimes, SimulateOptions, StageTimes, simulate
from placewise.profile import profile_model
from placewise.run.launcher import launch
from placewise.run.links import LinkMeasurement, measure_link
from placewise.run.pipeline import PipelineJob, build, mapping_from_plan, pipeline_rank

MICRO = 8  # samples per microbatch: the batch is MICRO x microbatches
MICROBATCHES = (2, 4, 8)
IMAGE = (3, 32, 32)
TOKENS, FEATURES = 32, 64


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
    graph: OpGraph
    plan: object
    crossing_bytes: list[float]  # per boundary: bytes per microbatch sent forward


def profile_and_plan(name: str) -> Planned:
    model, inputs = build(spec(name), MICRO)
    graph = profile_model(model, inputs, name=name, training=True, threads=1, repeats=5, warmup=2,
                          optimizer="momentum")
    plan = solve(graph, Cluster.simple(0, 2), "dp", SolveOptions())
    stage_of = {n: i for i, s in enumerate(plan.stages) for n in s.nodes}
    crossing = [0.0] * (len(plan.stages) - 1)
    sent: set[tuple[int, int]] = set()
    for e in graph.edges:
        a, b = stage_of[e.src], stage_of[e.dst]
        if b > a and not graph.node(e.src).backward and (e.src, b) not in sent:
            sent.add((e.src, b))
            for boundary in range(a, b):  # a value skipping stages rides through each boundary
                crossing[boundary] += e.bytes or 0.0
    return Planned(name, graph, plan, crossing)


def stage_times(planned: Planned) -> list[StageTimes]:
    """Per stage: profiled forward and backward ms per microbatch."""
    g = planned.graph
    out = []
    for s in planned.plan.stages:
        fwd = sum(g.node(n).cpu_time for n in s.nodes if not g.node(n).backward)
        bwd = sum(g.node(n).cpu_time for n in s.nodes if g.node(n).backward)
        out.append(StageTimes(fwd, bwd))
    return out


def predict(planned: Planned, schedule: Schedule, link: LinkMeasurement, options: SimulateOptions,
            share: float = 1.0) -> float:
    """Predicted ms per step, with the stages getting `share` of a core each (1: a core to itself)."""
    links = [LinkTimes(1e3 * link.transfer_seconds(b), 1e3 * link.transfer_seconds(b)) for b in planned.crossing_bytes]
    times = [StageTimes(t.forward / share, t.backward / share) for t in stage_times(planned)]
    return simulate(times, links, schedule, options).step_time


def core_share(reports: list[dict]) -> float:
    """The share of a core the stages' computing threads got in a run: their CPU time over their wall
    time while computing. On a machine shared with other work this is the cores' speed at the time."""
    return (sum(r["cpu_seconds"] for r in reports)
            / sum(r["forward_seconds"] + r["backward_seconds"] for r in reports))


def measured_stage_times(report: dict, m: int) -> StageTimes:
    """A stage's mean forward and backward ms per microbatch in a measured run."""
    chunks = m * len(report["step_seconds"])
    return StageTimes(1e3 * report["forward_seconds"] / chunks, 1e3 * report["backward_seconds"] / chunks)


# ---- measurement -------------------------------------------------------------------------------------
def jobs_for(planned: Planned, steps: int) -> dict[tuple[str, str, int], PipelineJob]:
    mapping = mapping_from_plan(planned.plan)
    return {(planned.name, kind, m): PipelineJob(model=spec(planned.name), batch_size=MICRO * m, mapping=mapping,
                                                 schedule=kind, microbatches=m, steps=steps, warmup=2, lr=0.01,
                                                 optimizer="sgd")
            for kind in SCHEDULES for m in MICROBATCHES}


def measure_round(jobs: dict, seed: int) -> dict:
    """Run every job once, in shuffled order, in one launch of two processes."""
    keys = list(jobs)
    random.Random(seed).shuffle(keys)
    results, _ = launch(pipeline_rank, 2, ([jobs[k] for k in keys],), threads=1, timeout_s=1800, preload=["torch"])
    return {k: [results[0][i], results[1][i]] for i, k in enumerate(keys)}


def memory_rank(rank: int, world_size: int, jobs: list[PipelineJob]) -> list[int]:
    """Each job's stage run for two steps with its live tensor bytes counted: the peak per job.
    The stage's parameters and buffers count from the start; the batches are made beforehand (the
    data loader's, not the stage's)."""
    import torch.distributed as dist
    from placewise.run.pipeline import _output_tensor, batch, prepare, stage_schedule
    from placewise.run.tensor_memory import LiveTensorBytes
    peaks = []
    for job in jobs:
        prepared = prepare(job)
        module, _, schedule = stage_schedule(prepared, rank, schedule=job.schedule, microbatches=job.microbatches,
                                             training=True)
        optimizer = torch.optim.SGD(module.parameters(), lr=job.lr, momentum=0.9)
        output_like = _output_tensor(prepared.values, prepared.gm)
        batches = [batch(job, prepared.example_inputs, output_like, step) for step in range(2)]
        with LiveTensorBytes() as live:
            live.hold(module.parameters())
            live.hold(module.buffers())
            for inputs, target in batches:
                schedule.step(*(inputs if rank == 0 else ()), **({"target": target} if rank == world_size - 1 else {}))
                optimizer.step()
                optimizer.zero_grad()
        peaks.append(live.peak)
        dist.barrier()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rendezvous", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.time()
    print(f"load before: {os.getloadavg()}", flush=True)
    link = measure_link(gpu=False)
    print(f"link: latency {link.latency * 1e6:.0f} us, bandwidth {link.bandwidth / 1e9:.2f} GB/s", flush=True)
    planned = {name: profile_and_plan(name) for name in args.models.split(",")}
    jobs = {k: v for p in planned.values() for k, v in jobs_for(p, args.steps).items()}
    rounds = [measure_round(jobs, seed) for seed in range(args.rounds)]
    options = SimulateOptions(rendezvous=args.rendezvous)
    rows = []
    for key in jobs:
        name, kind, m = key
        measured = statistics.median(1e3 * statistics.median(r[key][1]["step_seconds"]) for r in rounds)
        sim_measured = statistics.median(
            simulate([measured_stage_times(rep, m) for rep in r[key]], [LinkTimes()], Schedule(kind, m),
                     options).step_time for r in rounds)
        share = statistics.median(core_share(r[key]) for r in rounds)
        predicted = predict(planned[name], Schedule(kind, m), link, options)
        at_share = predict(planned[name], Schedule(kind, m), link, options, share)
        rows.append({"model": name, "schedule": kind, "microbatches": m, "measured_ms": measured,
                     "predicted_ms": predicted, "core_share": share, "predicted_at_share_ms": at_share,
                     "error": at_share / measured - 1, "sim_measured_ms": sim_measured})
    print(f"{'model':12} {'sched':6} {'m':>2} {'measured':>9} {'predicted':>9} {'share':>6} {'pred@share':>10} "
          f"{'error':>7} {'sim(meas)':>9}")
    for r in rows:
        print(f"{r['model']:12} {r['schedule']:6} {r['microbatches']:>2} {r['measured_ms']:9.1f} "
              f"{r['predicted_ms']:9.1f} {r['core_share']:6.2f} {r['predicted_at_share_ms']:10.1f} "
              f"{r['error']:+7.1%} {r['sim_measured_ms']:9.1f}")
    print(f"load after: {os.getloadavg()}; {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "link": link.to_json()}, indent=1))


if __name__ == "__main__":
    main()
