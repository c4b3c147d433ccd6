"""Pipelined inference throughput of a balanced 2-stage plan against one process, and the planner's prediction.

1. Profile a model (a chain of wide linear layers) at the microbatch size with one thread
   (`placewise.profile.profile_model`): node times in ms per microbatch.
2. Plan it on two CPU cores with the exact DP (the planner's max-load = predicted time per microbatch).
3. In rounds, alternately run the whole model in ONE process with one thread (full batch per step)
   and the 2-stage pipeline (one process per stage, one thread each, GPipe forward-only over M
   microbatches), each with warm-up steps and then timed steps; a run's time is the median step.
   The speed-up is the median over rounds of (one-process time / pipeline time), so load from other
   processes on the machine hits both sides of each ratio alike.

Reports the speed-up (target >= 1.6x) and measured vs predicted ms per sample (target within 15%).
Microbatches of 256 samples by default: at 64 a one-thread matrix product costs about 20% more per
sample than at the full batch, which the pipeline would have to win back first.

    .venv/bin/python benchmarks/pipeline.py [--rounds 3] [--steps 8] [--batch 4096] [--microbatches 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# Ranks import the model factory as `benchmarks.pipeline:wide_mlp`, so the repository root goes on the path.
sys.path.insert(0, str(ROOT))

from placewise.graph import Cluster
from placewise.plan import SolveOptions, solve
from placewise.profile import profile_model
from placewise.run.cut import mapping_from_plan
from placewise.run.job import PipelineJob
from placewise.run.launcher import launch
from placewise.run.pipeline import pipeline_rank
from placewise.run.workload import build

WIDTH, DEPTH, CLASSES = 1024, 8, 10


def wide_mlp(batch_size: int = 16):
    """A chain of equal wide layers: easy to balance, compute-heavy next to its activations (64 KB/sample-row)."""
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES)), (torch.randn(batch_size, WIDTH),)


SPEC = "benchmarks.pipeline:wide_mlp"


def profile_and_plan(micro: int):
    model, inputs = build(SPEC, micro)
    model.eval()
    graph = profile_model(model, inputs, name="wide_mlp", threads=1, repeats=7, warmup=3)
    plan = solve(graph, Cluster.simple(0, 2), "dp", SolveOptions())
    return graph, plan


def median_step(results: list[dict]) -> float:
    return statistics.median(results[-1]["step_seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    micro = args.batch // args.microbatches
    torch.set_num_threads(1)
    graph, plan = profile_and_plan(micro)
    mapping = mapping_from_plan(plan)
    common = dict(model=SPEC, batch_size=args.batch, mode="infer", steps=args.steps, warmup=args.warmup)
    single = PipelineJob(**common, microbatches=1)
    # The same microbatches in one process: what pipelining adds, apart from batch-size efficiency.
    single_micro = PipelineJob(**common, microbatches=args.microbatches)
    piped = PipelineJob(**common, mapping=mapping, schedule="gpipe", microbatches=args.microbatches)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rounds = []
    for r in range(args.rounds):
        one, one_micro = launch(pipeline_rank, 1, ([single, single_micro],), threads=1, env=env)[0][0]
        two = [ranks[0] for ranks in launch(pipeline_rank, 2, ([piped],), threads=1, env=env)[0]]
        one_s, two_s = median_step([one]), median_step(two)
        stage_ms = [1e3 * x["forward_seconds"] / x["samples"] for x in two]
        stage_cpu_ms = [1e3 * x["cpu_seconds"] / x["samples"] for x in two]
        rounds.append({"one_process_ms_per_sample": 1e3 * one_s / args.batch,
                       "one_process_cpu_ms_per_sample": 1e3 * one["cpu_seconds"] / one["samples"],
                       "speedup_over_same_microbatches": median_step([one_micro]) / two_s,
                       "pipeline_ms_per_sample": 1e3 * two_s / args.batch,
                       "stage_compute_ms_per_sample": stage_ms, "stage_cpu_ms_per_sample": stage_cpu_ms,
                       "speedup": one_s / two_s, "load_average": os.getloadavg()[0]})
        print(f"round {r + 1}: one process {rounds[-1]['one_process_ms_per_sample']:.4f} ms/sample, "
              f"pipeline {rounds[-1]['pipeline_ms_per_sample']:.4f} ms/sample "
              f"(stages compute {', '.join(f'{x:.4f}' for x in stage_ms)}, CPU "
              f"{', '.join(f'{x:.4f}' for x in stage_cpu_ms)}), speed-up {rounds[-1]['speedup']:.2f}x, "
              f"load {rounds[-1]['load_average']:.1f}", file=sys.stderr)
    predicted = plan.max_load / micro
    measured = statistics.median(x["pipeline_ms_per_sample"] for x in rounds)
    result = {
        "model": f"wide_mlp ({DEPTH} x Linear({WIDTH},{WIDTH}) + ReLU, then Linear({WIDTH},{CLASSES}))",
        "batch": args.batch, "microbatches": args.microbatches, "threads_per_process": 1,
        "plan_stage_loads_ms_per_microbatch": [s.load for s in plan.stages],
        "plan_stage_nodes": [len(s.modules) for s in plan.stages],
        "predicted_ms_per_sample": predicted,
        "measured_pipeline_ms_per_sample": measured,
        "measured_over_predicted": measured / predicted,
        "one_process_ms_per_sample": statistics.median(x["one_process_ms_per_sample"] for x in rounds),
        "one_process_cpu_ms_per_sample": statistics.median(x["one_process_cpu_ms_per_sample"] for x in rounds),
        "stage_cpu_ms_per_sample": [statistics.median(x["stage_cpu_ms_per_sample"][i] for x in rounds) for i in (0, 1)],
        "predicted_stage_ms_per_sample": [s.load / micro for s in plan.stages],
        "speedup_median": statistics.median(x["speedup"] for x in rounds),
        "speedup_over_same_microbatches_median": statistics.median(x["speedup_over_same_microbatches"] for x in rounds),
        "load_average": os.getloadavg(),
        "rounds": rounds,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['model']}, batch {args.batch} in {args.microbatches} microbatches, 1 thread per process")
    print(f"plan: stage loads {', '.join(f'{x:.3f}' for x in result['plan_stage_loads_ms_per_microbatch'])} "
          f"ms/microbatch (profiled at {micro} samples, 1 thread)")
    print(f"speed-up of the 2-stage pipeline over one process: {result['speedup_median']:.2f}x (target >= 1.6x); "
          f"over one process running the same microbatches: {result['speedup_over_same_microbatches_median']:.2f}x")
    print(f"time per sample: measured {measured:.4f} ms, predicted {predicted:.4f} ms "
          f"({100 * (measured / predicted - 1):+.1f}%; target within 15%)")
    print(f"per stage, CPU time of the computing thread: {', '.join(f'{x:.4f}' for x in result['stage_cpu_ms_per_sample'])} "
          f"ms/sample; predicted {', '.join(f'{x:.4f}' for x in result['predicted_stage_ms_per_sample'])}; "
          f"one process {result['one_process_cpu_ms_per_sample']:.4f} ms/sample")
    print(f"load average during the run: {', '.join(f'{x:.1f}' for x in result['load_average'])} "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
