"""Staleness policies against each other on a CNN on the digits, and data-parallel throughput of larger models.

Part 1, time to accuracy: the `cnn` (two 3x3 convolutions of 32 and 64 channels, a hidden layer of
128; 150k parameters) on scikit-learn's 8x8 digits, the same number of epochs for each of: 1 worker
(through the server), 2 workers sync, 3 workers sync with 1 backup worker (each round takes the first
two gradients, as 2 workers sync, and drops the third), 2 workers async with each staleness policy (none, lr, dc-asgd, gap-aware),
and 2 workers DDP. Every variant runs at every learning rate and momentum of --lrs and --momenta (and
dc-asgd at every lambda of --dc-lambdas); a variant's "best" is its setting with the least median time
to --target test accuracy, measured from when serving begins to the first snapshot at the target.
Variants are rotated within each repetition, so load from other processes hits them alike.

Part 2, throughput: resnet18 (3x16x16 synthetic images) and the gpt2-tiny config (32 tokens of the
synthetic copy task) as 1 worker, 2 workers async and 2 workers DDP: updates/s and samples/s over
--throughput-steps updates.

    .venv/bin/python benchmarks/async_policies.py [--reps 3] [--epochs 5] [--out placewise-out/async_policies]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from placewise.errors import PlacewiseError
from placewise.run.compensation import DcAsgdOptions
from placewise.run.dataparallel.config import TrainConfig
from placewise.run.dataparallel.train import train_data_parallel

ACCURACY_VARIANTS: dict[str, dict[str, Any]] = {
    "1 worker": dict(mode="async", workers=1),
    "2 workers sync": dict(mode="sync", workers=2),
    "3 workers sync, 1 backup": dict(mode="sync", workers=3, backup_workers=1),
    "2 workers async": dict(mode="async", workers=2),
    "2 workers async, lr": dict(mode="async", workers=2, staleness="lr"),
    "2 workers async, dc-asgd": dict(mode="async", workers=2, staleness="dc-asgd"),
    "2 workers async, gap-aware": dict(mode="async", workers=2, staleness="gap-aware"),
    "2 workers DDP": dict(mode="ddp", workers=2),
}
THROUGHPUT_MODELS = {"resnet18": dict(dataset="synthetic", batch_size=32),
                     "gpt2-tiny": dict(dataset="synthetic", batch_size=16)}
THROUGHPUT_VARIANTS = {"1 worker": dict(mode="async", workers=1), "2 workers async": dict(mode="async", workers=2),
                       "2 workers DDP": dict(mode="ddp", workers=2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--lrs", default="0.05,0.1")
    ap.add_argument("--momenta", default="0.9,0.7")
    ap.add_argument("--dc-lambdas", default="0.04,1.0", help="dc-asgd's lambda values, each with every lr, momentum")
    ap.add_argument("--throughput-steps", type=int, default=24)
    ap.add_argument("--skip", choices=["accuracy", "throughput"], help="leave one part out")
    ap.add_argument("--variants", help="time-to-accuracy variants to run, separated by ';' (default: all)")
    ap.add_argument("--out", default="placewise-out/async_policies")
    args = ap.parse_args()
    console = Console(stderr=True)
    record: dict[str, Any] = {"args": vars(args), "cores": os.cpu_count(), "load_at_start": os.getloadavg()}
    if args.skip != "accuracy":
        record["accuracy"] = time_to_accuracy(args, console)
    if args.skip != "throughput":
        record["throughput"] = throughput(args, console)
    record["load_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "async_policies.json").write_text(json.dumps(record, indent=1))
    console.print(f"wrote {out / 'async_policies.json'}")


def _settings(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    base = [dict(lr=float(lr), momentum=float(m)) for lr in args.lrs.split(",") for m in args.momenta.split(",")]
    if ACCURACY_VARIANTS[name].get("staleness") == "dc-asgd":
        return [dict(s, dc_asgd=DcAsgdOptions(lam=float(lam))) for lam in args.dc_lambdas.split(",") for s in base]
    return base


def _label(setting: dict[str, Any]) -> str:
    text = f"lr {setting['lr']:g}, momentum {setting['momentum']:g}"
    return text + (f", lambda {setting['dc_asgd'].lam:g}" if "dc_asgd" in setting else "")


def time_to_accuracy(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    names = [n.strip() for n in args.variants.split(";")] if args.variants else list(ACCURACY_VARIANTS)
    unknown = sorted(set(names) - set(ACCURACY_VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(ACCURACY_VARIANTS)}")
    combos = [(name, s) for name in names for s in _settings(name, args)]
    runs: dict[int, list] = {i: [] for i in range(len(combos))}
    load = os.getloadavg()[0]
    for rep in range(args.reps):
        order = list(range(len(combos)))
        order = order[rep * 7 % len(order):] + order[:rep * 7 % len(order)]   # rotated per repetition
        for i in order:
            name, setting = combos[i]
            cfg = TrainConfig(model="cnn", dataset="digits", epochs=args.epochs, batch_size=32, seed=rep,
                              snapshot_every=5, **ACCURACY_VARIANTS[name], **setting)
            report = _train(cfg)
            runs[i].append(report)
            t = report.time_to_accuracy(args.target)
            console.print(f"rep {rep} {name}, {_label(setting)}: {report.updates_per_s:.1f} updates/s, "
                          f"{_fmt(t)} s to {args.target:.0%}, final {report.test_accuracy:.2%}")
    rows = []
    for i, (name, setting) in enumerate(combos):
        reports = runs[i]
        times = [r.time_to_accuracy(args.target) for r in reports]
        reached = [t for t in times if t is not None]
        updates = [next((v for v, _, acc in r.curve if acc >= args.target), None) for r in reports]
        rows.append({"variant": name, "setting": _label(setting), "reached": f"{len(reached)}/{len(times)}",
                     "seconds_to_target": statistics.median(reached) if len(reached) == len(times) else None,
                     "updates_to_target": statistics.median(u for u in updates if u is not None) if reached else None,
                     "updates_per_s": statistics.median(r.updates_per_s for r in reports),
                     "final_accuracy": statistics.median(r.test_accuracy for r in reports),
                     "mean_staleness": statistics.median(r.mean_staleness for r in reports)})
    best = {name: min((r for r in rows if r["variant"] == name),
                      key=lambda r: float("inf") if r["seconds_to_target"] is None else r["seconds_to_target"])
            for name in names}
    table = Table(title=f"cnn on digits, {args.epochs:g} epochs, batch 32 per worker, each variant at its best "
                        f"setting, medians of {args.reps} ({os.cpu_count()} cores, load {load:.2f} at the start)")
    for col in ("variant", "best setting", f"s to {args.target:.0%}", "reached", f"updates to {args.target:.0%}",
                "updates/s", "final acc", "staleness"):
        table.add_column(col, justify="left" if col in ("variant", "best setting") else "right")
    for name, r in best.items():
        r["best"] = True
        table.add_row(name, r["setting"], _fmt(r["seconds_to_target"]), r["reached"],
                      "-" if r["updates_to_target"] is None else f"{r['updates_to_target']:.0f}",
                      f"{r['updates_per_s']:.1f}", f"{r['final_accuracy']:.2%}", f"{r['mean_staleness']:.2f}")
    Console(width=160).print(table)
    return rows


def throughput(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    load = os.getloadavg()[0]
    combos = [(model, name) for model in THROUGHPUT_MODELS for name in THROUGHPUT_VARIANTS]
    runs: dict[tuple[str, str], list] = {c: [] for c in combos}
    for rep in range(args.reps):
        for model, name in combos[rep % len(combos):] + combos[:rep % len(combos)]:
            variant = THROUGHPUT_VARIANTS[name]
            # The same samples for every variant: a DDP round and a sync round take one batch per worker.
            steps = args.throughput_steps // (variant["workers"] if variant["mode"] == "ddp" else 1)
            cfg = TrainConfig(model=model, steps=steps, lr=0.01, momentum=0.9, seed=rep, snapshot_every=steps,
                              **THROUGHPUT_MODELS[model], **variant)
            report = _train(cfg)
            runs[model, name].append(report)
            console.print(f"rep {rep} {model} {name}: {report.updates_per_s:.2f} updates/s")
    table = Table(title=f"data-parallel throughput, medians of {args.reps} ({os.cpu_count()} cores, load {load:.2f} "
                        f"at the start)")
    for col in ("model", "variant", "parameters", "batch per worker", "updates/s", "samples/s"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    rows = []
    for (model, name), reports in runs.items():
        variant = THROUGHPUT_VARIANTS[name]
        per_update = THROUGHPUT_MODELS[model]["batch_size"] * (variant["workers"] if variant["mode"] == "ddp" else 1)
        rate = statistics.median(r.updates_per_s for r in reports)
        rows.append({"model": model, "variant": name, "parameters": reports[0].parameters, "updates_per_s": rate,
                     "samples_per_s": rate * per_update})
        table.add_row(model, name, f"{reports[0].parameters:,}", str(THROUGHPUT_MODELS[model]["batch_size"]),
                      f"{rate:.2f}", f"{rate * per_update:.1f}")
    Console(width=160).print(table)
    return rows


def _train(cfg: TrainConfig, tries: int = 3):
    """One run; again when another process on this shared machine took the port between its choice and use."""
    for attempt in range(tries):
        try:
            return train_data_parallel(cfg)
        except PlacewiseError as e:
            if "EADDRINUSE" not in str(e) or attempt == tries - 1:
                raise


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


if __name__ == "__main__":
    main()
