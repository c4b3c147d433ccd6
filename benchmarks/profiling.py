"""Profiling cost and fidelity on this CPU: resnet18 (batch 8, 224x224) and bert-base (batch 4,
sequence 128) at layer granularity.

For each model: the wall time of `profile_model` (tracing plus warm-up and timed runs) and its CPU
time (what it takes on an otherwise idle core: profiling runs one thread), and the per-node forward
sum over the whole-model forward (both medians of the same interleaved runs, by process CPU time).
Targets from issue 6: under 2 minutes each, ratio within 20%.

    .venv/bin/python benchmarks/profiling.py [--repeats 5] [--models resnet18 bert-base] [--json]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name shadows the standard
# library's `profile`, which torch imports (through cProfile); drop the folder from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from placewise.profile import build_model, profile_model  # noqa: E402

CASES = {"resnet18": (8, (3, 224, 224)), "bert-base": (4, (128,)), "gpt2": (4, (128,))}


def run(name: str, repeats: int, threads: int) -> dict:
    batch, shape = CASES[name]
    model, inputs = build_model(name, batch, shape)
    start, cpu_start = time.perf_counter(), time.process_time()
    graph = profile_model(model, inputs, name=name, repeats=repeats, threads=threads)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    meta = graph.meta_dict
    return {"model": name, "batch": batch, "input": list(shape), "nodes": len(graph.nodes), "tracer": meta["tracer"],
            "profile_s": round(seconds, 2), "profile_cpu_s": round(cpu_seconds, 2), "whole_forward_ms": float(meta["whole_forward_ms"]),
            "node_sum_ms": float(meta["node_forward_sum_ms"]), "ratio": float(meta["forward_ratio"]),
            "under_2_min": seconds < 120, "within_20pct": abs(float(meta["forward_ratio"]) - 1) <= 0.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "bert-base"], choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [run(name, args.repeats, args.threads) for name in args.models]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    cols = ["model", "batch", "input", "nodes", "tracer", "profile_s", "profile_cpu_s", "whole_forward_ms", "node_sum_ms", "ratio",
            "under_2_min", "within_20pct"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
