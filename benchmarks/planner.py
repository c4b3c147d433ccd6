"""The exact DP planner on every shared input: nodes, ideals, max-load, seconds, peak memory, and the
paper's C++ reference time from the workloads README with the ratio.

Inputs: every file in `../shared/workloads/dnn-partitioning/throughput-inputs/` (with the devices it
carries) and every PipeDream profile in `../shared/workloads/pipedream/` on 4 and on 8 accelerators
and no CPU. Each input runs in a fresh process (so its peak resident memory is its own): one cold
solve, which includes loading the compiled kernels from numba's cache, then --repeat more solves;
"seconds" is their median, "cold" the first. The sum line compares the sum of medians over the
inputs that have a reference time against the sum of the reference times (40.1 s). A solve that
passes --time-limit returns the DP's upper-bound split and is shown as stopped, with its gap.

    .venv/bin/python benchmarks/planner.py [--repeat 3] [--time-limit 60] [--only gnmt inception] [--json out.json]

Real models (`--models DIR`): every graph `placewise profile` wrote into DIR, on 4 and on 8
accelerators, with units and ideals before and after replication (`plan.replicable`), seconds,
peak memory and gap. The scale row (`--scale GRAPH --nodes 50000`): a graph of about that many
nodes made by repeating a profiled model (its copies joined output to input), on 8 accelerators.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKLOADS = ROOT.parent / "shared" / "workloads"
THROUGHPUT = WORKLOADS / "dnn-partitioning" / "throughput-inputs"
PIPEDREAM = WORKLOADS / "pipedream"
# A planner run per input may not take more than this (the DP's target is 10 s).
PER_INPUT_TIMEOUT = 600


def reference_times() -> dict[str, tuple[float | None, float | None]]:
    """README rows `| LayerGraphs/x | optimum | time |` -> (optimum, seconds); '< 0.01 s' counts as 0.01."""
    out = {}
    for name, value, spent in re.findall(r"^\| ((?:Layer|Operator)Graphs/\S+) \| ([^|]+) \| ([^|]+) \|",
                                         (WORKLOADS / "README.md").read_text(), re.M):
        optimum = re.match(r"\s*([0-9.]+)\s*$", value)
        seconds = re.search(r"([0-9.]+) s", spent)
        out[name] = (float(optimum.group(1)) if optimum else None, float(seconds.group(1)) if seconds else None)
    return out


def inputs() -> list[tuple[str, Path, int | None]]:
    """(label, file, accelerators or None for the file's own devices)."""
    out = [(f"{p.parent.name}/{p.stem}", p, None) for p in sorted(THROUGHPUT.glob("*/*.json"))]
    for k in (4, 8):
        out += [(f"pipedream/{p.parent.name} k={k}", p, k) for p in sorted(PIPEDREAM.glob("*/graph.txt"))]
    return out


def repeated(path: Path, nodes: int):
    """About `nodes` nodes: copies of a profiled graph in series, each copy's last forward node
    feeding every operator of the next copy that reads only replicable nodes (its sizes and
    constants stay replicable roots), with ids and colocation classes offset per copy."""
    from dataclasses import replace

    from placewise.graph import Edge, OpGraph, load_graph
    from placewise.plan.replicable import find_replicable
    block = load_graph(path)
    copies = max(1, round(nodes / len(block.nodes)))
    span = max(n.id for n in block.nodes) + 1
    classes = max((n.colocate for n in block.nodes if n.colocate is not None), default=-1) + 1
    replicable = find_replicable(block).replicable
    forward = [i for i in block.topological_order if not block.nodes[i].backward]
    last = block.nodes[forward[-1]]
    # Every operator of a copy that reads nothing but replicable nodes starts that copy.
    firsts = [block.nodes[i] for i in forward if not replicable[i] and all(replicable[p] for p in block.pred[i])]
    cost = float(block.out_cost[block.index[last.id]])
    out_nodes, out_edges = [], []
    for c in range(copies):
        out_nodes += [replace(n, id=n.id + c * span, colocate=None if n.colocate is None else n.colocate + c * classes)
                      for n in block.nodes]
        out_edges += [replace(e, src=e.src + c * span, dst=e.dst + c * span) for e in block.edges]
        if c:
            out_edges += [Edge(last.id + (c - 1) * span, first.id + c * span, cost, None) for first in firsts]
    return OpGraph.build(out_nodes, out_edges, name=f"{block.name} x{copies}", meta=block.meta_dict)


def measure(path: Path, accelerators: int | None, repeat: int, time_limit: float, nodes: int | None = None) -> dict:
    """Runs inside the fresh process: solve 1 + repeat times, report times and this process's peak memory."""
    from placewise.errors import PlacewiseError
    from placewise.graph import Cluster, load_graph
    from placewise.plan import SolveOptions, solve

    graph = repeated(path, nodes) if nodes else load_graph(path)
    cluster = graph.cluster if accelerators is None else Cluster.simple(accelerators, 0, None)
    row: dict = {"nodes": len(graph.nodes), "accelerators": cluster.accelerators, "cpus": cluster.cpus}
    times, cpu = [], []
    try:
        for _ in range(1 + repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            plan = solve(graph, cluster, "dp", SolveOptions(time_limit=time_limit))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            if not plan.notes["exact"]:
                break  # stopped at the time limit: repeating would time the limit again
    except PlacewiseError as e:
        row["error"] = str(e)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    else:
        row.update(max_load=plan.max_load, ideals=plan.notes["ideals"], units=plan.notes["units"],
                   pairs=plan.notes.get("ideal_pairs", 0), exact=plan.notes["exact"], gap=plan.gap,
                   nodes=len(graph.nodes), replicated=plan.notes.get("replicated_nodes", 0),
                   units_before=plan.notes.get("units_before_replication", plan.notes["units"]),
                   ideals_before=plan.notes.get("ideals_before_replication", plan.notes["ideals"]))
    row.update(cold=times[0], seconds=statistics.median(times[1:] or times), cpu=statistics.median(cpu[1:] or cpu),
               peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return row


def run_one(label: str, path: Path, accelerators: int | None, repeat: int, time_limit: float,
            nodes: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--repeat", str(repeat), "--time-limit", str(time_limit)]
    if accelerators is not None:
        cmd += ["--accelerators", str(accelerators)]
    if nodes:
        cmd += ["--repeat-to", str(nodes)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PER_INPUT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"input": label, "error": f"over {PER_INPUT_TIMEOUT} s"}
    if done.returncode != 0:
        return {"input": label, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return {"input": label, **json.loads(done.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed solves after the cold one (median)")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="inputs whose label contains one of these")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="S",
                        help="per solve; past it the DP returns its upper-bound split, marked not exact")
    parser.add_argument("--models", metavar="DIR", help="also plan every profiled graph (*.json) in DIR")
    parser.add_argument("--scale", metavar="GRAPH", help="also plan copies of this profiled graph, --nodes in all")
    parser.add_argument("--nodes", type=int, default=50_000, help="nodes of the --scale graph")
    parser.add_argument("--skip-shared", action="store_true", help="leave out the shared inputs")
    parser.add_argument("--child", metavar="GRAPH", help=argparse.SUPPRESS)
    parser.add_argument("--accelerators", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeat-to", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child), args.accelerators, args.repeat, args.time_limit, args.repeat_to)))
        return
    if args.models or args.scale:
        models_table(args)
        if args.skip_shared:
            return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    references = reference_times()
    rows = []
    for label, path, k in inputs():
        if args.only and not any(text in label for text in args.only):
            continue
        row = run_one(label, path, k, args.repeat, args.time_limit)
        optimum, ref_seconds = references.get(label, (None, None))
        row.update(reference_optimum=optimum, reference_seconds=ref_seconds)
        rows.append(row)
        console.print(f"[dim]{label}: {row.get('max_load', row.get('error'))} in {row.get('seconds', float('nan')):.3f} s[/dim]")

    table = Table(title="exact DP planner (seconds: median of warm solves; cold: first solve in a fresh process)")
    for col in ("input", "k", "l", "nodes", "units", "ideals", "pairs", "max-load", "reference", "seconds", "cold",
                "cpu s", "peak MB", "ref. s", "ref/ours"):
        table.add_column(col, justify="left" if col == "input" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["input"], str(r.get("accelerators", "")), str(r.get("cpus", "")), str(r.get("nodes", "")),
                          "", "", "", f"[red]{r['error'][:70]}[/red]", "", f"{r.get('seconds', 0):.3f}", "", "",
                          f"{r.get('peak_bytes', 0) / 2**20:.0f}", "", "")
            continue
        ref_s = r["reference_seconds"]
        match = ""
        if r["reference_optimum"] is not None:
            same = abs(r["max_load"] - r["reference_optimum"]) <= 1e-6 * r["reference_optimum"]
            match = f"{r['reference_optimum']:.10g}" + (" [green]=[/green]" if same else " [red]≠[/red]")
        table.add_row(r["input"], str(r["accelerators"]), str(r["cpus"]), str(r["nodes"]), str(r["units"]),
                      f"{r['ideals']:,}", f"{r['pairs']:,}",
                      f"{r['max_load']:.10g}" + ("" if r["exact"] else f" [yellow](stopped, gap {100 * r['gap']:.1f}%)[/yellow]"),
                      match, f"{r['seconds']:.3f}",
                      f"{r['cold']:.3f}", f"{r['cpu']:.3f}", f"{r['peak_bytes'] / 2**20:.0f}",
                      "" if ref_s is None else f"{ref_s:g}", "" if ref_s is None else f"{ref_s / r['seconds']:.1f}x")
    console.print(table)
    timed = [r for r in rows if r.get("reference_seconds") is not None and r.get("exact")]
    if timed:
        ours = sum(r["seconds"] for r in timed)
        cold = sum(r["cold"] for r in timed)
        theirs = sum(r["reference_seconds"] for r in timed)
        console.print(f"inputs with a reference time: {len(timed)}; sum of our times {ours:.3f} s (cold {cold:.3f} s) "
                      f"against the reference's {theirs:.2f} s: [bold]{theirs / ours:.1f}x[/bold] faster "
                      f"({theirs / cold:.1f}x cold)")
    worst = max((r for r in rows if "seconds" in r), key=lambda r: r["seconds"], default=None)
    if worst:
        console.print(f"slowest: {worst['input']} {worst['seconds']:.3f} s; largest peak memory "
                      f"{max(r.get('peak_bytes', 0) for r in rows) / 2**30:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


def models_table(args) -> None:
    """Real models: units and ideals before and after replication, seconds, peak memory, gap."""
    from rich.console import Console
    from rich.table import Table

    jobs = [(p.stem, p, k, None) for p in sorted(Path(args.models).glob("*.json")) for k in (4, 8)] if args.models else []
    if args.scale:
        jobs.append((f"{Path(args.scale).stem} x ~{args.nodes:,} nodes", Path(args.scale), 8, args.nodes))
    table = Table(title="real models (replication on; seconds: median of warm solves)")
    for col in ("model", "k", "nodes", "replicated", "units before", "units", "ideals before", "ideals", "max-load",
                "gap", "seconds", "cold", "peak MB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = []
    for label, path, k, nodes in jobs:
        row = run_one(label, path, k, args.repeat, args.time_limit, nodes)
        rows.append(row)
        if "error" in row:
            table.add_row(label, str(k), "", "", "", "", "", "", f"[red]{row['error'][:60]}[/red]", "", "", "", "")
            continue
        table.add_row(label, str(k), f"{row['nodes']:,}", str(row["replicated"]), str(row["units_before"]),
                      str(row["units"]), f"{row['ideals_before']}", f"{row['ideals']}", f"{row['max_load']:.8g}",
                      f"{row['gap']:.2g}", f"{row['seconds']:.2f}", f"{row['cold']:.2f}",
                      f"{row['peak_bytes'] / 2**20:.0f}")
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if args.json:
        Path(args.json).with_suffix(".models.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
