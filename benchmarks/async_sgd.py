"""Asynchronous vs synchronous data parallelism on this machine: updates/s and time to 95% test accuracy.

For a ~1.1M-parameter MLP (64-1024-1024-10) on scikit-learn's digits, the same number of epochs in
each of: 1 worker (through the parameter server), 2 workers sync (server), 2 workers async (server)
and 2 workers DDP. Variants are rotated within each repetition and the table shows medians, so load
from other processes on the machine hits them alike. Time to accuracy is measured from when serving
begins (process start-up excluded) to the first parameter snapshot at >= 95% test accuracy.
Writes a JSON record and a staleness histogram (PNG) to --out.

    .venv/bin/python benchmarks/async_sgd.py [--reps 3] [--epochs 6] [--out placewise-out/async_sgd]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from placewise.run.async_sgd import TrainConfig, plot_staleness, train_data_parallel

TARGET = 0.95
VARIANTS = {
    "1 worker": dict(mode="async", workers=1),
    "2 workers sync": dict(mode="sync", workers=2),
    "2 workers async": dict(mode="async", workers=2),
    "2 workers DDP": dict(mode="ddp", workers=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp:1024x1024")
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--snapshot-every", type=int, default=10, help="updates between accuracy snapshots")
    ap.add_argument("--out", default="placewise-out/async_sgd")
    args = ap.parse_args()
    console = Console(stderr=True)
    runs: dict[str, list] = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        names = list(VARIANTS)
        names = names[rep % len(names):] + names[:rep % len(names)]  # rotate the order per repetition
        for name in names:
            cfg = TrainConfig(model=args.model, dataset="digits", epochs=args.epochs, batch_size=32, lr=args.lr,
                              momentum=0.9, seed=rep, snapshot_every=args.snapshot_every, **VARIANTS[name])
            report = train_data_parallel(cfg)
            runs[name].append(report)
            console.print(f"rep {rep} {name}: {report.updates_per_s:.1f} updates/s, "
                          f"{_fmt(report.time_to_accuracy(TARGET))} s to {TARGET:.0%}, "
                          f"final accuracy {report.test_accuracy:.2%}")
    base = statistics.median(r.updates_per_s for r in runs["1 worker"])
    rows = []
    for name, reports in runs.items():
        per_update = 32 * (1 if VARIANTS[name]["mode"] == "async" else VARIANTS[name]["workers"])
        times = [r.time_to_accuracy(TARGET) for r in reports]
        reached = [t for t in times if t is not None]
        rows.append({
            "variant": name, "parameters": reports[0].parameters, "updates": reports[0].updates,
            "updates_per_s": statistics.median(r.updates_per_s for r in reports),
            "samples_per_s": statistics.median(r.updates_per_s * per_update for r in reports),
            "x_1_worker": statistics.median(r.updates_per_s for r in reports) / base,
            "seconds_to_95": statistics.median(reached) if len(reached) == len(times) else None,
            "reached_95": f"{len(reached)}/{len(times)}",
            "final_accuracy": statistics.median(r.test_accuracy for r in reports),
            "mean_staleness": statistics.median(r.mean_staleness for r in reports)})
    table = Table(title=f"{args.model} on digits, {args.epochs:g} epochs, medians of {args.reps} (2-core CPU)")
    for col in ("variant", "updates/s", "x 1 worker", "samples/s", f"s to {TARGET:.0%}", "reached",
                "final acc", "staleness"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], f"{r['updates_per_s']:.1f}", f"{r['x_1_worker']:.2f}", f"{r['samples_per_s']:.0f}",
                      _fmt(r["seconds_to_95"]), r["reached_95"], f"{r['final_accuracy']:.2%}",
                      f"{r['mean_staleness']:.2f}")
    Console(width=130).print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "async_sgd.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    picture = plot_staleness({"2 workers async": [s for r in runs["2 workers async"] for s in r.staleness]},
                             out / "staleness.png")
    console.print(f"wrote {out / 'async_sgd.json'} and {picture}")


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


if __name__ == "__main__":
    main()
