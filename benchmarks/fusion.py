"""Optimizer fusion against the unfused torch optimizers: step time, and peak memory in a fresh process.

Step time (default): each model trains copies of itself under several variants in ONE process:

  fwd+bwd      forward and backward only (no optimizer): the floor
  for-loop     torch optimizer, foreach=False (torch's default kernel on a CPU)
  foreach      torch optimizer, foreach=True (torch's default on a GPU)
  fused        torch optimizer, fused=True
  pw-backward  placewise backward-fusion on top of fused=True (the fastest kernel here)
  pw-backward+release          the same, each bucket's gradients freed once its update is applied
  pw-backward+overlap(+release)  each update run on a worker thread beside the rest of backward
  pw-forward   placewise forward-fusion on top of fused=True

Variants are interleaved in rounds (A B ... then ... B A), a few steps each; the reported time is
the median over all timed steps, so load from other processes hits every variant alike. "vs for-loop"
/ "vs fused" are step-time savings, "per-round vs fused" the same saving paired within each round
with its quartiles and extremes (the run's noise), "rounds faster than fused" in how many rounds
the variant's median step beat fused's, "page faults" the fresh pages a step took from the kernel,
"opt overhead" the step time above fwd+bwd as a percentage of fwd+bwd. A second table splits each
step into backward() and step(). The load averages and the cores other processes kept busy are printed.

``--quick``: the step-time check of issue 19 in a few minutes: fused=True against
pw-backward+release on GPT-2, resnet50 and the MLP, AdamW, one thread, CPU-time clock.
``--malloc caching`` restarts the timed process with glibc tunables that make it a caching
allocator (no fresh pages per step for any variant); the default is glibc's default.

Memory (``--memory``): each (model, optimizer, variant) runs in a fresh process; the peak of one
steady-state step, both as RSS (``torch.cuda.max_memory_allocated`` on a GPU) and as live tensor
bytes with what they are at the peak. benchmarks/fusion_memory.py says how.

    .venv/bin/python benchmarks/fusion.py [--threads 2] [--rounds 15] [--models mlp,resnet50,gpt2]
        [--variants fused,pw-backward+release] [--min-bucket-numel auto] [--device cuda] [--clock cpu]
    .venv/bin/python benchmarks/fusion.py --quick
    .venv/bin/python benchmarks/fusion.py --memory [--optimizers adamw,sgd] [--models gpt2,resnet50,mlp] [--device cuda]

Use the wall clock (the default) for overlap: it saves elapsed time, not CPU time. docs/fusion.md
has the figures measured with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from placewise.fuse import fuse_optimizer

from fusion_models import MODELS
from fusion_memory import MALLOC, WARM_STEPS, live_peak, mark_gradients, persistent_bytes, phase, step_peak, vm

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-4, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 1e-4}),
    "sgd": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-3}),
}
VARIANTS = (
    "fwd+bwd", "default", "for-loop", "foreach", "fused", "pw-backward", "pw-backward+release", "pw-backward+overlap",
    "pw-backward+overlap+release", "pw-forward",
)
MEMORY_VARIANTS = ("default", "foreach", "fused", "pw-backward", "pw-backward+release", "pw-backward+overlap+release")


def make_step(
    variant: str,
    model: nn.Module,
    opt_name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    min_bucket_numel: int | str = "auto",
    split: list[float] | None = None,
    notes: dict[str, Callable[[], str]] | None = None,
) -> tuple[Callable[[], None], Any]:
    """One training step of `variant` as a closure, and its optimizer (built once, outside the timing).

    `split`, if given, receives the last step's wall time in ``backward()`` and in ``step()``;
    `notes`, how to ask a placewise variant which bucketing it uses (auto sizing revises it after a few steps).
    """
    cls, kwargs = OPTIMIZERS[opt_name]
    loss_fn = nn.CrossEntropyLoss()
    if variant == "fwd+bwd":
        optimizer: Any = None
    elif variant == "default":
        optimizer = cls(model.parameters(), **kwargs)
    elif variant == "for-loop":
        optimizer = cls(model.parameters(), foreach=False, **kwargs)
    elif variant == "foreach":
        optimizer = cls(model.parameters(), foreach=True, **kwargs)
    elif variant == "fused":
        optimizer = cls(model.parameters(), fused=True, **kwargs)
    else:
        mode, *extras = variant.removeprefix("pw-").split("+")
        optimizer = fuse_optimizer(
            model, cls, mode, fused=True, overlap="overlap" in extras, release_grads="release" in extras,
            min_bucket_numel=min_bucket_numel, **kwargs,
        )
        if notes is not None:
            notes[variant] = optimizer.bucketing

    def step() -> None:
        with phase("zero_grad"):
            if optimizer is None:
                model.zero_grad(set_to_none=True)
            else:
                optimizer.zero_grad(set_to_none=True)
        with phase("forward"):
            loss = loss_fn(model(x), y)
        t0 = time.perf_counter()
        with phase("backward"):
            loss.backward()
        t1 = time.perf_counter()
        if optimizer is not None:
            with phase("step"):
                optimizer.step()
        if split is not None:
            split[:] = [t1 - t0, time.perf_counter() - t1]

    return step, optimizer


def bench_model(
    name: str,
    opt_name: str,
    rounds: int,
    steps_per_round: int,
    warmup: int,
    seed: int,
    clock: Callable[[], float],
    variants: tuple[str, ...] = VARIANTS,
    min_bucket_numel: int | str = "auto",
    device: str = "cpu",
) -> dict[str, Any]:
    torch.manual_seed(seed)
    base, x, y = MODELS[name]()
    base, x, y = base.to(device), x.to(device), y.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n_params = sum(p.numel() for p in base.parameters())
    last = {v: [0.0, 0.0] for v in variants}
    notes: dict[str, Callable[[], str]] = {}
    steps = {v: _synced(make_step(v, copy.deepcopy(base), opt_name, x, y, min_bucket_numel, last[v], notes)[0], sync) for v in variants}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[list[float]]] = {v: [] for v in variants}  # per round, per step
    splits: dict[str, list[list[float]]] = {v: [] for v in variants}  # per timed step: backward(), step()
    faults: dict[str, list[int]] = {v: [] for v in variants}  # minor page faults per timed step
    others = _OtherLoad()
    round_others: list[float | None] = []
    for r in range(rounds):
        in_round = _OtherLoad()
        # A B ... then ... B A: interleaved, and a load that drifts within a round hits each variant alike.
        for v in variants if r % 2 == 0 else variants[::-1]:
            steps[v]()  # one untimed step: the variant's tensors back into cache after the others ran
            times[v].append([])
            for _ in range(steps_per_round):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = clock()
                steps[v]()
                times[v][-1].append(clock() - t0)
                faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                splits[v].append(list(last[v]))
        round_others.append(in_round.cores())
        print(f"  {name}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    median = {v: statistics.median(t for ts in rs for t in ts) for v, rs in times.items()}
    return {
        "model": name,
        "params": n_params,
        "median_s": median,
        "samples": {v: sum(len(ts) for ts in rs) for v, rs in times.items()},
        "round_median_s": {v: [statistics.median(ts) for ts in rs] for v, rs in times.items()},
        "split_median_s": {v: [statistics.median(s[i] for s in ss) for i in (0, 1)] for v, ss in splits.items()},
        "faults_per_step": {v: statistics.median(f) for v, f in faults.items()},
        "other_cores": others.cores(),
        "round_other_cores": round_others,
        "bucketing": {v: how() for v, how in notes.items()},
    }


def memory_child(model_name: str, opt_name: str, variant: str, device: str, min_bucket_numel: int | str) -> dict[str, Any]:
    """In this fresh process: `WARM_STEPS` steps, then the peak of a steady-state step (RSS, then live tensor bytes)."""
    torch.manual_seed(0)
    model, x, y = MODELS[model_name]()
    model, x, y = model.to(device), x.to(device), y.to(device)
    mark_gradients(model)  # before the optimizer's hooks: sees each gradient before a release
    notes: dict[str, Callable[[], str]] = {}
    step, optimizer = make_step(variant, model, opt_name, x, y, min_bucket_numel, notes=notes)
    if device != "cpu":
        step = _synced(step, torch.cuda.synchronize)
    for _ in range(WARM_STEPS):
        step()
    warm_peak = vm("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated()
    start, peak = step_peak(step, device)
    return {
        "model": model_name, "optimizer": opt_name, "variant": variant,
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "peak_bytes": peak, "start_bytes": start, "warm_peak_bytes": warm_peak,
        "persistent_bytes": persistent_bytes(model, optimizer, (x, y)), # The profiler does not see the overlap worker's thread, where gradients are freed: no live count there.
        "live": None if "overlap" in variant else live_peak(step, device),
        "bucketing": notes[variant]() if variant in notes else "",
    }


def bench_memory(models: list[str], optimizers: list[str], variants: tuple[str, ...], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each (model, optimizer, variant) in its own fresh process, one after another, all with the same malloc settings."""
    env = dict(os.environ, **MALLOC[args.malloc])
    results = []
    for name in models:
        for opt_name in optimizers:
            for variant in variants:
                cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", f"{name},{opt_name},{variant}",
                       "--threads", str(args.threads), "--device", args.device, "--min-bucket-numel", str(args.min_bucket_numel)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
                if done.returncode != 0:
                    raise RuntimeError(f"{name} {opt_name} {variant} failed:\n{done.stderr[-2000:]}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"  {name} {opt_name} {variant}: step peak {results[-1]['peak_bytes'] / 2**20:.0f} MiB, live "
                      f"{_mib(_live_total(results[-1]))} MiB", file=sys.stderr, flush=True)
    return results


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _live_total(r: dict[str, Any]) -> int | None:
    """Live tensor bytes at the step's peak: what outlives steps plus what the profiler saw alive (None: not counted)."""
    return None if r["live"] is None else r["persistent_bytes"] + sum(r["live"]["held"].values())


def _savings(r: dict[str, Any], by: dict[tuple[str, str, str], dict[str, Any]], value: Callable[[dict[str, Any]], int | None]) -> str:
    """Two table cells: `value` saved against the default-kernel and the fused=True optimizer (MiB, % of gradient bytes)."""
    cells = []
    for base in ("default", "fused"):
        other = by.get((r["model"], r["optimizer"], base))
        mine, theirs = value(r), None if other is None or base == r["variant"] else value(other)
        saved = None if mine is None or theirs is None else theirs - mine
        cells.append("" if saved is None else f"{saved / 2**20:+.0f} ({100 * saved / r['grad_bytes']:.0f}%)")
    return " | ".join(cells)


def memory_report(results: list[dict[str, Any]], device: str, threads: int, malloc: str) -> str:
    what = "peak resident set (VmHWM)" if device == "cpu" else "torch.cuda.max_memory_allocated"
    lines = [
        f"Peak memory of training step {WARM_STEPS + 1} (steady state: the state exists, auto sizing has settled), MiB; "
        f"fresh process per row; torch {torch.__version__}, {device}, {threads} intra-op threads, glibc malloc {malloc}.",
        f"'{what}': that step's peak. 'live': tensor bytes alive at the peak of step {WARM_STEPS + 3} (torch profiler's "
        "allocation records; parameters, optimizer state and inputs counted directly). Savings are below the plain "
        "optimizer with torch's default kernel ('default': the for-loop on a CPU, foreach on a GPU), and as a share "
        "of the gradient bytes; 'vs fused' is below torch's fused=True.",
        "",
        "| model | optimizer | gradients | variant | step peak | saved (% grads) | vs fused | live peak | saved (% grads) "
        "| vs fused | peak during | held at peak: grads / backward bufs / forward / opt temps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["model"], r["optimizer"], r["variant"]): r for r in results}
    for r in results:
        grads = r["grad_bytes"]
        rss = _savings(r, by, lambda q: q["peak_bytes"])
        live = _savings(r, by, _live_total)
        held = r["live"]["held"] if r["live"] else {}
        parts = " / ".join(_mib(held.get(k)) for k in ("gradients", "backward buffers", "forward tensors", "optimizer temporaries"))
        where = f"{r['live']['phase']}: {r['live']['at']}" if r["live"] else "n/a"
        lines.append(f"| {r['model']} | {r['optimizer']} | {grads / 2**20:.0f} | {r['variant']} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{rss} | {_mib(_live_total(r))} | {live} | {where} | {parts} |")
    lines += ["", "Bucketing: " + "; ".join(f"{r['model']} {r['optimizer']} {r['variant']}: {r['bucketing']}" for r in results if r["bucketing"])]
    return "\n".join(lines)


class _OtherLoad:
    """How many cores other processes kept busy since this was made (Linux /proc/stat; None elsewhere).

    The machine's busy CPU time minus this process's own (all its threads), over the elapsed time.
    Overlap needs an idle core, so this says whether the run had one.
    """

    def __init__(self) -> None:
        self._start = (self._busy(), time.process_time(), time.perf_counter())

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def cores(self) -> float | None:
        busy0, own0, wall0 = self._start
        busy1 = self._busy()
        if busy0 is None or busy1 is None:
            return None
        own, wall = time.process_time() - own0, time.perf_counter() - wall0
        return max(0.0, (busy1 - busy0 - own) / wall)


def _synced(step: Callable[[], None], sync: Callable[[], None]) -> Callable[[], None]:
    """The step, returning only when the device has finished it (a no-op on the CPU)."""

    def run() -> None:
        step()
        sync()

    return run


def report(
    results: list[dict[str, Any]], opt_name: str, threads: int, clock: str, min_bucket_numel: int | str = "auto", device: str = "cpu"
) -> str:
    lines = [
        f"optimizer {opt_name}, torch {torch.__version__}, {device}, {threads} intra-op threads, min_bucket_numel {min_bucket_numel}; "
        f"median step time (ms, {clock} clock); load average (1/5/15 min) at start {results[0].get('load_before', '?')}, "
        f"at end {results[-1].get('load_after', '?')}",
        "",
        "other processes kept busy, on average (cores): "
        + ", ".join(f"{r['model']} {r['other_cores']:.2f}" for r in results if r.get("other_cores") is not None),
        "",
        "| model | params | variant | step ms | vs for-loop | vs fused | per-round vs fused: median [25%, 75%] (min, max) "
        "| rounds faster than fused | page faults / step | opt overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        med = res["median_s"]
        floor, loop, fused = med.get("fwd+bwd"), med.get("for-loop"), med.get("fused")
        per_round = res["round_median_s"]
        for v, t in med.items():
            vs_loop, vs_fused = _saving(loop, t, v), _saving(fused, t, v)
            wins = spread = ""
            if v not in ("fwd+bwd", "fused") and "fused" in per_round:
                pairs = list(zip(per_round[v], per_round["fused"]))
                wins = f"{sum(a < b for a, b in pairs)}/{len(pairs)}"
                spread = _spread([100 * (b - a) / b for a, b in pairs])
            overhead = "" if v == "fwd+bwd" or floor is None else f"{100 * (t - floor) / floor:.1f}%"
            lines.append(
                f"| {res['model']} | {res['params'] / 1e6:.1f}M | {v} | {1000 * t:.1f} | {vs_loop} | {vs_fused} | {spread} | {wins} "
                f"| {res['faults_per_step'][v]:.0f} | {overhead} |"
            )
    lines.append("")
    lines += [f"- {res['model']} {v}: {how}" for res in results for v, how in res.get("bucketing", {}).items()]
    lines.append("")
    lines.append("vs for-loop / vs fused: step time saved relative to that variant (positive = faster); rounds faster")
    lines.append("than fused: rounds whose median step beat fused's in the same round (interleaved, so a paired test); per-round")
    lines.append("vs fused: the same saving per round (positive = faster), its quartiles and extremes: the noise of this run.")
    lines.append("Page faults: minor faults per step (fresh pages from the kernel: glibc returned freed blocks; each costs time).")
    if device == "cpu":
        lines += ["", "Where the time goes (wall-clock medians, ms; the rest of a step is forward and zero_grad):", "",
                  "| model | variant | backward() | step() |", "|---|---|---|---|"]
        for res in results:
            for v, (bwd, stp) in res["split_median_s"].items():
                lines.append(f"| {res['model']} | {v} | {1000 * bwd:.1f} | {1000 * stp:.1f} |")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    """Median, quartiles and extremes of per-round savings (%)."""
    if len(values) < 2:
        return ""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{q2:+.1f}% [{q1:+.1f}, {q3:+.1f}] ({min(values):+.1f}, {max(values):+.1f})"


def _saving(base: float | None, t: float, variant: str) -> str:
    """Step time saved relative to `base` (blank for the floor, or when `base` was not measured)."""
    return "" if variant == "fwd+bwd" or base is None else f"{100 * (base - t) / base:+.1f}%"


def _load() -> str:
    """The 1/5/15-minute load averages (other jobs on a shared machine inflate wall-clock times)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _bucket_floor(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw", help="the optimizer of the step-time run")
    parser.add_argument("--models", default="mlp,resnet50,gpt2", help="comma list of " + ", ".join(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (auto sizing settles after 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, which other processes' load cannot "
        "inflate (meaningful with --threads 1, where no thread spins waiting for another)",
    )
    parser.add_argument("--variants", help="comma list of " + ", ".join(VARIANTS) + " (default: all; with --memory: "
                        + ",".join(MEMORY_VARIANTS) + ")")
    parser.add_argument("--min-bucket-numel", type=_bucket_floor, default="auto", help="placewise bucket size floor (elements, or auto)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models train")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--memory", action="store_true", help="peak memory per variant, each in a fresh process")
    parser.add_argument("--optimizers", default="adamw,sgd", help="with --memory: comma list of " + ", ".join(OPTIMIZERS))
    parser.add_argument("--malloc", choices=sorted(MALLOC),
                        help="glibc tunables (see fusion_memory): of every --memory child (default there: neutral, large "
                        "blocks mapped alone), or of the step-time process, which then restarts itself with them (default: default)")
    parser.add_argument("--quick", action="store_true", help="the step-time check only: fused vs pw-backward+release, AdamW, "
                        "gpt2,resnet50,mlp, 1 thread, CPU clock, 8 rounds of 2 steps (a few minutes)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # model,optimizer,variant: one memory process
    args = parser.parse_args(argv)
    args.malloc = args.malloc or ("neutral" if args.memory else "default")
    if args.quick:
        args.variants, args.optimizer, args.models = "fused,pw-backward+release", "adamw", "gpt2,resnet50,mlp"
        args.threads, args.clock, args.rounds, args.steps_per_round, args.warmup = 1, "cpu", 8, 2, 6
    args.variants = tuple(args.variants.split(",")) if args.variants else (MEMORY_VARIANTS if args.memory else VARIANTS)
    for kind, names, known in (("variant", args.variants, VARIANTS), ("model", args.models.split(","), MODELS),
                               ("optimizer", args.optimizers.split(","), OPTIMIZERS)):
        for name in names:
            if name not in known:
                parser.error(f"unknown {kind} {name!r}; pick from {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, opt_name, variant = args.memory_child.split(",")
        print(json.dumps(memory_child(name, opt_name, variant, args.device, args.min_bucket_numel)))
        return 0
    tunables = MALLOC[args.malloc]
    if not args.memory and any(os.environ.get(k) != v for k, v in tunables.items()):
        # glibc reads its tunables at start: run again with them (the timed process itself).
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)],
                  dict(os.environ, **tunables))
    load = _load()
    if args.memory:
        results = bench_memory(args.models.split(","), args.optimizers.split(","), args.variants, args)
        print(memory_report(results, args.device, args.threads, args.malloc))
        print(f"\nload average (1/5/15 min) at start {load}, at end {_load()}")
    else:
        results = []
        for name in args.models.split(","):
            results.append(bench_model(
                name, args.optimizer, args.rounds, args.steps_per_round, args.warmup, args.seed,
                time.perf_counter if args.clock == "wall" else time.process_time, args.variants, args.min_bucket_numel, args.device,
            ))
            results[-1]["load_before"], results[-1]["load_after"] = load, _load()
            load = results[-1]["load_after"]
            print(report(results[-1:], args.optimizer, args.threads, args.clock, args.min_bucket_numel, args.device), file=sys.stderr, flush=True)
        print(report(results, args.optimizer, args.threads, args.clock, args.min_bucket_numel, args.device))
        print(f"\nglibc malloc: {args.malloc} ({' '.join(f'{k}={v}' for k, v in tunables.items()) or 'no tunables'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
