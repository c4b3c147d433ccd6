"""The integer programs on the paper's layer graphs: value, proven bound, gap and seconds.

For each layer-graph input (`../shared/workloads/dnn-partitioning/`), runs the contiguous and the
non-contiguous throughput IP on `throughput-inputs/LayerGraphs/` and the latency IP on
`latency-inputs/LayerGraphs/`, each under --time-limit seconds, with the devices each file carries.
Every value is the cost model's score of the IP's plan; the bound is what HiGHS proved (its dual
bound, or a target it proved infeasible), so value/bound certifies how far the plan can be from
optimal. The reference column is the exact figure the workloads README quotes, where there is one.
One run per cell: these are anytime searches under a limit, so the time is the limit or the time to
close the gap, on whatever machine runs it.

    .venv/bin/python benchmarks/ip.py [--time-limit 60] [--gap 1e-4] [--graphs bert24 resnet50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from placewise.errors import PlacewiseError  # noqa: E402
from placewise.graph import load_graph  # noqa: E402
from placewise.plan import SolveOptions, solve  # noqa: E402

PAPER = ROOT.parent / "shared" / "workloads" / "dnn-partitioning"
GRAPHS = ["bert24", "resnet50", "gnmt", "inceptionv3"]
# Exact figures quoted by the workloads README (paper's DP and IPs).
REFERENCE = {
    ("bert24_inference", "contiguous"): 17.78990625, ("bert24_training", "contiguous"): 41.7458125,
    ("gnmt_inference", "contiguous"): 32.910658203125, ("resnet50_inference", "contiguous"): 33.774666015625,
    ("resnet50_training", "contiguous"): 78.6318125, ("bert24_inference", "non-contiguous"): 17.7147,
    ("bert24_inference", "latency"): 100.2185,
}


def cases(graphs: list[str]) -> list[tuple[str, str, Path]]:
    out = []
    for path in sorted((PAPER / "throughput-inputs" / "LayerGraphs").glob("*.json")):
        if any(path.stem.startswith(g) for g in graphs):
            out += [(path.stem, "contiguous", path), (path.stem, "non-contiguous", path)]
    for path in sorted((PAPER / "latency-inputs" / "LayerGraphs").glob("*.json")):
        if any(path.stem.startswith(g) for g in graphs):
            out.append((path.stem, "latency", path))
    return out


def run(name: str, mode: str, path: Path, time_limit: float, gap: float) -> dict:
    graph = load_graph(path)
    options = SolveOptions(objective="latency" if mode == "latency" else "throughput", contiguous=mode == "contiguous",
                           time_limit=time_limit, gap=gap, progress=sys.stderr.isatty())
    row = {"graph": name, "mode": mode, "nodes": len(graph.nodes), "reference": REFERENCE.get((name, mode))}
    try:
        plan = solve(graph, graph.cluster, "ip", options)
    except PlacewiseError as e:
        return {**row, "error": str(e)}
    return {**row, "value": plan.value, "bound": plan.lower_bound, "gap": plan.gap, "seconds": plan.seconds,
            "feasible": plan.feasible, "warm_start": plan.notes.get("warm_start"), "runs": plan.notes.get("runs")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="S", help="seconds per IP run")
    parser.add_argument("--gap", type=float, default=1e-4, metavar="G", help="relative gap at which a run may stop")
    parser.add_argument("--graphs", nargs="+", default=GRAPHS, choices=GRAPHS)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = []
    for name, mode, path in cases(args.graphs):
        rows.append(run(name, mode, path, args.time_limit, args.gap))
        print(f"{name} {mode}: done", file=sys.stderr)
    table = Table(title=f"integer programs on HiGHS ({args.time_limit:g} s limit, gap {args.gap:g})")
    for col in ("graph", "mode", "nodes", "value", "bound", "gap", "seconds", "reference", "start"):
        table.add_column(col, justify="left" if col in ("graph", "mode", "start") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["graph"], r["mode"], str(r["nodes"]), f"[red]{r['error']}[/red]", "", "", "", "", "")
            continue
        fmt = lambda v: "—" if v is None else f"{v:.6f}"  # noqa: E731
        table.add_row(r["graph"], r["mode"], str(r["nodes"]), fmt(r["value"]), fmt(r["bound"]),
                      "—" if r["gap"] is None else f"{100 * r['gap']:.3f}%", f"{r['seconds']:.1f}",
                      fmt(r["reference"]), str(r["warm_start"]))
    Console(width=160).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
