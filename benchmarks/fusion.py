"""Step time of optimizer fusion against the unfused torch optimizers, on this machine's CPU (or GPU).

For each model, seven variants train copies of the same model on the same batch in ONE process:

  fwd+bwd      forward and backward only (no optimizer): the floor
  for-loop     torch optimizer, foreach=False (the classic per-parameter loop)
  foreach      torch optimizer, foreach=True
  fused        torch optimizer, fused=True
  pw-backward  placewise backward-fusion on top of fused=True (the fastest kernel here)
  pw-backward+overlap  the same, each update run on a worker thread beside the rest of backward
  pw-forward   placewise forward-fusion on top of fused=True

Variants are interleaved in rounds, in a new random order each round, a few steps each; the
reported time is the median over all timed steps, so load from other processes hits every variant
alike. "vs for-loop" is the step-time saving over the for-loop baseline, "rounds faster than
fused" a paired check of "vs fused" (in how many rounds the variant's median step beat fused's),
"opt overhead" the step time above fwd+bwd as a percentage of fwd+bwd. The header says how many
cores other processes kept busy meanwhile (/proc/stat), and a second table splits each step into
its backward() and step() time.

    .venv/bin/python benchmarks/fusion.py [--threads 2] [--rounds 15] [--models mlp,resnet18,transformer]
        [--variants fwd+bwd,fused,pw-backward+overlap] [--min-bucket-numel 262144] [--device cuda]

Use the wall clock (the default) for overlap: it saves elapsed time, not CPU time.

Measured 2026-11-23 on the shared 2-core AMD EPYC (8 MiB L3), AdamW, wall clock, 15 rounds x 3
steps per variant. The machine was quiet: other processes kept under 0.03 cores busy on average;
the 1-minute load average (this benchmark's own threads included) was 0.84-1.00 during the
1-thread run and 1.00-1.91 during the 2-thread run. Median step, ms:

    --threads   model        fwd+bwd  for-loop  foreach  fused  pw-backward  +overlap  pw-forward
    1           mlp 20.9M       94.4     226.7    228.5  125.1        129.8     109.5       128.0
    1           resnet18       258.9     357.2    343.1  268.6        277.2     265.9       275.3
    1           transformer    285.4     325.2    321.9  296.5        297.4     293.6       292.9
    2           mlp 20.9M       70.5     164.9    157.7   96.8         98.9     106.0        98.1
    2           resnet18       183.6     241.9    243.5  194.5        197.1     202.3       202.3
    2           transformer    158.2     183.8    180.0  168.6        169.5     175.3       171.4

pw-backward+overlap, step time saved against for-loop / against fused (rounds faster than fused):

    --threads 1:  mlp +51.7% / +12.5% (15/15)   resnet18 +25.6% / +1.0% (8/15)   transformer +9.7% / +1.0% (9/15)
    --threads 2:  mlp +35.7% / -9.5% (1/15)     resnet18 +16.3% / -4.0% (2/15)   transformer +4.6% / -4.0% (4/15)

30 rounds of fwd+bwd, fused and overlap alone (1 thread, quiet): resnet18 +3.1% against fused
(20/30 rounds), transformer +1.2% (22/30); with --min-bucket-numel 0, +0.9% (20/30) and +0.9% (22/30).

With one intra-op thread the second core is idle during backward and overlap hides part of the
update there: the MLP's backward() takes 74.8 ms with its updates inside, against fused's 59.0 ms
backward plus a 31.4 ms step(), which meets both targets for it (52% below for-loop, 12.5% below
fused). For resnet18 and the transformer the fused AdamW step is only 17 and 11 ms (4-6% of the
step), so overlap can gain little over fused (1-3%, consistent only over 30 rounds), and the
transformer cannot be 20% below the for-loop at all: even its fwd+bwd floor is only 12% below.
Even that is only partly hidden (resnet18's backward() grows from 193.4 to 208.4 ms): the first
layers' buckets complete only as backward ends, so their updates stay in the critical path
(smaller buckets do not change that), and the two threads' kernels slow each other (in a traced
run the worker took 22-35 ms for updates that take 17 ms inline). With two intra-op threads
backward already uses both cores and the worker competes with it: overlap is 4-10% slower than
fused, so keep it for one intra-op thread per core (e.g. one pipeline stage per core).

On an H100 (torch 2.11, `--device cuda --rounds 8 --steps-per-round 5`), steps take 2-12 ms and
both fusions lose to fused=True (mlp 2.0 ms fused, 2.5 pw-backward, 2.3 overlap; resnet18 9.7,
12.3, 12.6; transformer 3.3, 4.2, 4.3): per-bucket optimizer calls cost launches and Python time
that one fused call over all parameters does not.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from placewise.fuse import fuse_optimizer

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-4, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 1e-4}),
    "sgd": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-3}),
}
VARIANTS = ("fwd+bwd", "for-loop", "foreach", "fused", "pw-backward", "pw-backward+overlap", "pw-forward")


def mlp_20m() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """~20M parameters: 1024 -> 4 x 2048 hidden -> 1000 classes, batch 16."""
    widths = [1024, 2048, 2048, 2048, 2048, 2048]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 1000))
    return nn.Sequential(*layers), torch.randn(16, widths[0]), torch.randint(0, 1000, (16,))


def resnet18_small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """torchvision resnet18 (11.7M parameters, 10 classes) on 32x32 images, batch 16."""
    import torchvision

    return torchvision.models.resnet18(num_classes=10), torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))


class TransformerBlock(nn.Module):
    """One nn.TransformerEncoderLayer (d_model 768, ff 3072: 7.1M parameters) plus a classifier head."""

    def __init__(self, d_model: int = 768) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model, 12, 4 * d_model, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=1))


def transformer_block() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return TransformerBlock(), torch.randn(8, 32, 768), torch.randint(0, 10, (8,))


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "mlp": mlp_20m,
    "resnet18": resnet18_small,
    "transformer": transformer_block,
}


def make_step(
    variant: str,
    model: nn.Module,
    opt_name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    min_bucket_numel: int = 1 << 18,
    split: list[float] | None = None,
) -> Callable[[], None]:
    """One training step of `variant` as a closure (optimizer built once, outside the timing).

    `split`, if given, receives the last step's wall time in ``backward()`` and in ``step()``.
    """
    cls, kwargs = OPTIMIZERS[opt_name]
    loss_fn = nn.CrossEntropyLoss()
    if variant == "fwd+bwd":
        optimizer: Any = None
    elif variant == "for-loop":
        optimizer = cls(model.parameters(), foreach=False, **kwargs)
    elif variant == "foreach":
        optimizer = cls(model.parameters(), foreach=True, **kwargs)
    elif variant == "fused":
        optimizer = cls(model.parameters(), fused=True, **kwargs)
    else:
        mode, _, extra = variant.removeprefix("pw-").partition("+")
        optimizer = fuse_optimizer(
            model, cls, mode, fused=True, overlap=extra == "overlap", min_bucket_numel=min_bucket_numel, **kwargs
        )

    def step() -> None:
        if optimizer is None:
            model.zero_grad(set_to_none=True)
        else:
            optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        if optimizer is not None:
            optimizer.step()
        if split is not None:
            split[:] = [t1 - t0, time.perf_counter() - t1]

    return step


def bench_model(
    name: str,
    opt_name: str,
    rounds: int,
    steps_per_round: int,
    warmup: int,
    seed: int,
    clock: Callable[[], float],
    variants: tuple[str, ...] = VARIANTS,
    min_bucket_numel: int = 1 << 18,
    device: str = "cpu",
) -> dict[str, Any]:
    torch.manual_seed(seed)
    base, x, y = MODELS[name]()
    base, x, y = base.to(device), x.to(device), y.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n_params = sum(p.numel() for p in base.parameters())
    last = {v: [0.0, 0.0] for v in variants}
    steps = {v: _synced(make_step(v, copy.deepcopy(base), opt_name, x, y, min_bucket_numel, last[v]), sync) for v in variants}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[list[float]]] = {v: [] for v in variants}  # per round, per step
    splits: dict[str, list[list[float]]] = {v: [] for v in variants}  # per timed step: backward(), step()
    others = _OtherLoad()
    order = list(variants)
    rng = random.Random(seed)
    round_others: list[float | None] = []
    for r in range(rounds):
        rng.shuffle(order)
        in_round = _OtherLoad()
        for v in order:
            steps[v]()  # one untimed step: the variant's tensors back into cache after the others ran
            times[v].append([])
            for _ in range(steps_per_round):
                t0 = clock()
                steps[v]()
                times[v][-1].append(clock() - t0)
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
        "other_cores": others.cores(),
        "round_other_cores": round_others,
    }


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
    results: list[dict[str, Any]], opt_name: str, threads: int, clock: str, min_bucket_numel: int = 1 << 18, device: str = "cpu"
) -> str:
    lines = [
        f"optimizer {opt_name}, torch {torch.__version__}, {device}, {threads} intra-op threads, min_bucket_numel {min_bucket_numel}; "
        f"median step time (ms, {clock} clock); load average (1/5/15 min) at start {results[0].get('load_before', '?')}, "
        f"at end {results[-1].get('load_after', '?')}",
        "",
        "other processes kept busy, on average (cores): "
        + ", ".join(f"{r['model']} {r['other_cores']:.2f}" for r in results if r.get("other_cores") is not None),
        "",
        "| model | params | variant | step ms | vs for-loop | vs fused | rounds faster than fused | opt overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        med = res["median_s"]
        floor, loop, fused = med.get("fwd+bwd"), med.get("for-loop"), med.get("fused")
        per_round = res["round_median_s"]
        for v, t in med.items():
            vs_loop, vs_fused = _saving(loop, t, v), _saving(fused, t, v)
            wins = ""
            if v not in ("fwd+bwd", "fused") and "fused" in per_round:
                pairs = list(zip(per_round[v], per_round["fused"]))
                wins = f"{sum(a < b for a, b in pairs)}/{len(pairs)}"
            overhead = "" if v == "fwd+bwd" or floor is None else f"{100 * (t - floor) / floor:.1f}%"
            lines.append(
                f"| {res['model']} | {res['params'] / 1e6:.1f}M | {v} | {1000 * t:.1f} | {vs_loop} | {vs_fused} | {wins} | {overhead} |"
            )
    lines.append("")
    lines.append("vs for-loop / vs fused: step time saved relative to that variant (positive = faster); rounds faster")
    lines.append("than fused: rounds whose median step beat fused's in the same round (interleaved, so a paired test).")
    if device == "cpu":
        lines += ["", "Where the time goes (wall-clock medians, ms; the rest of a step is forward and zero_grad):", "",
                  "| model | variant | backward() | step() |", "|---|---|---|---|"]
        for res in results:
            for v, (bwd, stp) in res["split_median_s"].items():
                lines.append(f"| {res['model']} | {v} | {1000 * bwd:.1f} | {1000 * stp:.1f} |")
    return "\n".join(lines)


def _saving(base: float | None, t: float, variant: str) -> str:
    """Step time saved relative to `base` (blank for the floor, or when `base` was not measured)."""
    return "" if variant == "fwd+bwd" or base is None else f"{100 * (base - t) / base:+.1f}%"


def _load() -> str:
    """The 1/5/15-minute load averages (other jobs on a shared machine inflate wall-clock times)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, which other processes' load cannot "
        "inflate (meaningful with --threads 1, where no thread spins waiting for another)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--min-bucket-numel", type=int, default=1 << 18, help="placewise bucket size floor (elements)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models train")
    parser.add_argument("--json", help="also write the raw medians here")
    args = parser.parse_args(argv)
    variants = tuple(args.variants.split(","))
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; pick from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    results = []
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; pick from {', '.join(MODELS)}")
        load = _load()
        results.append(bench_model(
            name, args.optimizer, args.rounds, args.steps_per_round, args.warmup, args.seed, clock, variants, args.min_bucket_numel,
            args.device,
        ))
        results[-1]["load_before"], results[-1]["load_after"] = load, _load()
        partial = report(results[-1:], args.optimizer, args.threads, args.clock, args.min_bucket_numel, args.device)
        print(partial, file=sys.stderr, flush=True)
    print(report(results, args.optimizer, args.threads, args.clock, args.min_bucket_numel, args.device))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"optimizer": args.optimizer, "threads": args.threads, "clock": args.clock, "device": args.device,
                       "min_bucket_numel": args.min_bucket_numel, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
