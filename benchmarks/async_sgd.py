"""Asynchronous vs synchronous data parallelism on this machine: updates/s and time to 95% test accuracy.

For a ~1.1M-parameter MLP (64-1024-1024-10) on scikit-learn's digits, the same number of epochs in
each of: 1 worker (through the parameter server), 2 workers sync (server), 2 workers async (server)
and 2 workers DDP; the server's variants move gradients and parameters through shared memory (the
default transport on one machine), and two more rows repeat 1 worker and 2 async workers over gloo
messages. Every variant runs at each learning rate of --lrs with each momentum of --momenta (stale
gradients tolerate less momentum, larger rounds more learning rate: one setting does not suit every
method); "best" picks each variant's setting with the least median time to 95%. Variants are rotated within each repetition and the table shows medians, so load from
other processes on the machine hits them alike. Time to accuracy is measured from when serving
begins (process start-up excluded) to the first parameter snapshot at >= 95% test accuracy.
Writes a JSON record and a staleness histogram (PNG) to --out.

The staleness policies (none, lr, dc-asgd, dc-asgd-a, gap-aware) and sync with backup workers, each at
a setting tuned on a seed of its own, are compared on this MLP and on a CNN by
`benchmarks/async_policies.py`, which also measures larger models (resnet18, a GPT-2 config).

    .venv/bin/python benchmarks/async_sgd.py [--reps 3] [--epochs 6] [--lrs 0.05,0.1] [--momenta 0.9,0.7,0.5] [--out placewise-out/async_sgd]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from placewise.pictures import plot_staleness
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.train import train_data_parallel

TARGET = 0.95
BASE, ASYNC, DDP = "1 worker", "2 workers async", "2 workers DDP"
VARIANTS = {
    BASE: dict(mode="async", workers=1),
    "2 workers sync": dict(mode="sync", workers=2),
    ASYNC: dict(mode="async", workers=2),
    DDP: dict(mode="ddp", workers=2),
    "1 worker, gloo transport": dict(mode="async", workers=1, transport="gloo"),
    "2 workers async, gloo transport": dict(mode="async", workers=2, transport="gloo"),
}
GLOO_ROWS = tuple(name for name, v in VARIANTS.items() if v.get("transport") == "gloo")
ASYNC_ROWS = tuple(name for name, v in VARIANTS.items() if v["mode"] == "async" and v["workers"] > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp:1024x1024")
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lrs", default="0.05,0.1", help="comma-separated learning rates, each run by every variant")
    ap.add_argument("--momenta", default="0.9,0.7,0.5", help="comma-separated momentum values, each run by every variant")
    ap.add_argument("--snapshot-every", type=int, default=10, help="updates between accuracy snapshots")
    ap.add_argument("--out", default="placewise-out/async_sgd")
    args = ap.parse_args()
    settings = [(float(lr), float(m)) for lr in args.lrs.split(",") for m in args.momenta.split(",")]
    console = Console(stderr=True)
    # The gloo rows only show what the transport costs in updates/s: they run at the first setting.
    combos = [(name, st) for name in VARIANTS for st in (settings if name not in GLOO_ROWS else settings[:1])]
    runs: dict[tuple[str, tuple[float, float]], list] = {combo: [] for combo in combos}
    load = os.getloadavg()[0]
    for rep in range(args.reps):
        order = combos[rep % len(combos):] + combos[:rep % len(combos)]  # rotate the order per repetition
        for name, (lr, momentum) in order:
            cfg = TrainConfig(model=args.model, dataset="digits", epochs=args.epochs, batch_size=32, lr=lr,
                              momentum=momentum, seed=rep, snapshot_every=args.snapshot_every, **VARIANTS[name])
            report = train_data_parallel(cfg)
            runs[name, (lr, momentum)].append(report)
            console.print(f"rep {rep} {name}, lr {lr:g}, momentum {momentum:g}: {report.updates_per_s:.1f} updates/s, "
                          f"{_fmt(report.time_to_accuracy(TARGET))} s to {TARGET:.0%}, "
                          f"final accuracy {report.test_accuracy:.2%}")
    rows = [_row(name, setting, reports) for (name, setting), reports in runs.items()]
    base_rate = {(r["lr"], r["momentum"]): r["updates_per_s"] for r in rows if r["variant"] == BASE}
    for r in rows:
        r["x_1_worker"] = r["updates_per_s"] / base_rate[r["lr"], r["momentum"]]
    best = {name: min((r for r in rows if r["variant"] == name), key=_time_key) for name in VARIANTS}
    table = Table(title=f"{args.model} on digits, {args.epochs:g} epochs, batch 32, medians of {args.reps} "
                        f"({os.cpu_count()} CPU cores, load {load:.2f} at the start); * = the variant's best setting")
    for col in ("variant", "lr", "momentum", "updates/s", "x 1 worker", "samples/s", f"s to {TARGET:.0%}", "reached",
                "final acc", "staleness"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], f"{r['lr']:g}", f"{r['momentum']:g}{' *' if best[r['variant']] is r else ''}",
                      f"{r['updates_per_s']:.1f}", f"{r['x_1_worker']:.2f}", f"{r['samples_per_s']:.0f}",
                      _fmt(r["seconds_to_95"]), r["reached_95"], f"{r['final_accuracy']:.2%}",
                      f"{r['mean_staleness']:.2f}")
    Console(width=150).print(table)
    # The targets: update rate over all settings (it does not depend on them), time to 95% at each best.
    rate = {name: statistics.median(rep.updates_per_s for (n, _), reps in runs.items() if n == name for rep in reps)
            for name in VARIANTS}
    speedup = rate[ASYNC] / rate[BASE]
    t_async, t_ddp = best[ASYNC]["seconds_to_95"], best[DDP]["seconds_to_95"]
    summary = {"updates_per_s_all_settings": rate, "async_update_rate_x_1_worker": speedup, "async_best_seconds_to_95": t_async,
               "ddp_best_seconds_to_95": t_ddp, "load_at_start": load}
    Console(width=150).print(
        f"2 async workers: {speedup:.2f}x the updates/s of 1 worker (target >= 1.50: "
        f"{'met' if speedup >= 1.5 else 'NOT met'}); best time to {TARGET:.0%}: async {_fmt(t_async)} s "
        f"({_setting(best[ASYNC])}) vs DDP {_fmt(t_ddp)} s ({_setting(best[DDP])}) "
        f"(target: no later: {'met' if t_async is not None and (t_ddp is None or t_async <= t_ddp) else 'NOT met'})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "async_sgd.json").write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=1))
    import matplotlib
    matplotlib.use("Agg")  # a script writing files; placewise's library leaves the backend to its caller
    picture = plot_staleness({f"{name}, every setting": [v for (n, _), reports in runs.items() if n == name
                                                         for r in reports for v in r.staleness]
                              for name in ASYNC_ROWS},
                             out / "staleness.png")
    console.print(f"wrote {out / 'async_sgd.json'} and {picture}")


def _row(name: str, setting: tuple[float, float], reports: list) -> dict:
    per_update = 32 * (1 if VARIANTS[name]["mode"] == "async" else VARIANTS[name]["workers"])
    times = [r.time_to_accuracy(TARGET) for r in reports]
    reached = [t for t in times if t is not None]
    return {"variant": name, "lr": setting[0], "momentum": setting[1], "parameters": reports[0].parameters,
            "updates": reports[0].updates,
            "updates_per_s": statistics.median(r.updates_per_s for r in reports),
            "samples_per_s": statistics.median(r.updates_per_s * per_update for r in reports),
            "seconds_to_95": statistics.median(reached) if len(reached) == len(times) else None,
            "reached_95": f"{len(reached)}/{len(times)}",
            "final_accuracy": statistics.median(r.test_accuracy for r in reports),
            "mean_staleness": statistics.median(r.mean_staleness for r in reports)}


def _setting(row: dict) -> str:
    return f"lr {row['lr']:g}, momentum {row['momentum']:g}"


def _time_key(row: dict) -> float:
    return float("inf") if row["seconds_to_95"] is None else row["seconds_to_95"]


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


if __name__ == "__main__":
    main()
