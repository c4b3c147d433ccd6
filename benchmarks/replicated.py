"""Replicated stages against PipeDream's replicated planner on PipeDream's own profiles.

Every profile in `../shared/workloads/pipedream/*/graph.txt` on 4, 8 and 16 accelerators, all plans
scored by the one cost model with PipeDream's all-reduce model (`plan.allreduce`, `pipedream`):
- `dp R=k`: the exact DP choosing replicas per stage (`dp --max-replicas k`; on chains of a few
  topological orders where the lattice is too large, marked `*`);
- `pipedream-hybrid`: PipeDream's hierarchical recurrence with replication on the linearized units,
  stage time with the cost model's transfers; `... nocomm`: its default objective (compute only);
- the replicas per stage of each.

    .venv/bin/python benchmarks/replicated.py [--devices 4 8 16] [--only vgg16 gnmt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from placewise.graph import Cluster  # noqa: E402
from placewise.graph.formats import parse_graph  # noqa: E402
from placewise.plan import solve  # noqa: E402
from placewise.plan.allreduce import PIPEDREAM, AllReduce  # noqa: E402
from placewise.plan.options import DPOptions, PipeDreamOptions  # noqa: E402

PIPEDREAM_PROFILES = ROOT.parent / "shared" / "workloads" / "pipedream"


def _replicas(plan) -> str:
    return "-".join(str(s.replicas) for s in plan.stages)


def rows(devices: list[int], only: list[str] | None) -> list[dict]:
    out = []
    for path in sorted(PIPEDREAM_PROFILES.glob("*/graph.txt")):
        name = path.parent.name
        if only and name not in only:
            continue
        graph = parse_graph(path.read_text(), str(path))
        for k in devices:
            cluster = Cluster.simple(k)
            begin = time.perf_counter()
            ours = solve(graph, cluster, "dp", DPOptions(max_replicas=k, allreduce=AllReduce(PIPEDREAM)))
            seconds = time.perf_counter() - begin
            hybrid = solve(graph, cluster, "pipedream-hybrid", PipeDreamOptions())
            nocomm = solve(graph, cluster, "pipedream-hybrid", PipeDreamOptions(transfers=False))
            out.append({"model": name, "devices": k, "dp": ours.max_load, "dp_exact": ours.notes["exact"],
                        "dp_replicas": _replicas(ours), "dp_seconds": seconds, "pipedream": hybrid.max_load,
                        "pipedream_replicas": _replicas(hybrid), "pipedream_nocomm": nocomm.max_load,
                        "pipedream_nocomm_replicas": _replicas(nocomm)})
            row = out[-1]
            print(f"| {name} | {k} | {row['dp']:.4f}{'' if row['dp_exact'] else '*'} ({row['dp_replicas']}) | "
                  f"{row['pipedream']:.4f} ({row['pipedream_replicas']}) | {row['pipedream_nocomm']:.4f} "
                  f"({row['pipedream_nocomm_replicas']}) | {seconds:.2f} |", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--only", nargs="+", metavar="MODEL")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print("| model | k | dp R=k (replicas) | pipedream-hybrid | pipedream-hybrid nocomm | dp s |")
    print("| --- | --- | --- | --- | --- | --- |")
    result = rows(args.devices, args.only)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
