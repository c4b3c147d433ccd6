"""`placewise demo`: the whole system on this machine in a few minutes, with pictures.

profile a small real model -> plan it for a heterogeneous cluster (a shipped device file) ->
compare with the baselines -> train a few steps as a pipeline with optimizer fusion -> a short
asynchronous data-parallel run on scikit-learn's bundled digits -> a summary table.
No GPU, no cluster, no downloads: every device of the plan runs as one CPU process here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEVICE_FILE = Path(__file__).parent / "data" / "demo-cluster.yaml"
# Methods shown beside the exact DP; the integer program is left to `placewise compare` (it can take minutes).
BASELINES = ["dp", "pipedream", "block-time", "block-params", "block-uniform", "metis", "local-search", "greedy",
             "one-accelerator"]


@dataclass
class DemoSettings:
    out: Path = Path("placewise-out")
    quick: bool = False  # a reduced run for tests: fewer repeats, steps and epochs
    model: str = "resnet18"
    image: int = 64
    batch_size: int = 8

    @property
    def repeats(self) -> int:
        return 1 if self.quick else 3


@dataclass
class Step:
    name: str
    result: str
    seconds: float
    pictures: list[str] = field(default_factory=list)


def _header(console: Console, number: int, text: str) -> None:
    console.rule(f"[bold]{number}. {text}")


def run_demo(settings: DemoSettings, console: Console | None = None) -> list[Step]:
    console = console or Console(stderr=True)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []

    # 1. profile --------------------------------------------------------------------------------------
    from placewise.graph import save_graph
    from placewise.graph.devicefile import load_device_file
    from placewise.profile import profile_model
    from placewise.profile.models import build_model

    _header(console, 1, f"profile {settings.model} ({settings.image}x{settings.image}, batch {settings.batch_size}, "
                        "forward and backward, one CPU thread)")
    started = time.perf_counter()
    cluster = load_device_file(DEVICE_FILE)
    model, inputs = build_model(settings.model, settings.batch_size, (3, settings.image, settings.image))
    graph = profile_model(model, inputs, name=settings.model, training=True, repeats=settings.repeats,
                          cluster=cluster, progress=True)
    save_graph(graph, out / "graph.json")
    meta = graph.meta_dict
    forward_nodes = sum(1 for n in graph.nodes if not n.backward)
    steps.append(Step("profile", f"{forward_nodes} layers x (forward, backward); per-node forward sum / whole "
                      f"forward = {float(meta.get('forward_ratio', 'nan')):.2f}", time.perf_counter() - started,
                      ["graph.json"]))

    # 2. plan ------------------------------------------------------------------------------------------
    from placewise.console import print_plan
    from placewise.pictures import draw_graph, draw_loads
    from placewise.plan import SolveOptions, solve

    kinds = ", ".join(f"{k.count} x {k.name} (speed {k.speed:g})" for k in cluster.kinds)
    _header(console, 2, f"plan it on {DEVICE_FILE.name}: {kinds}")
    started = time.perf_counter()
    plan = solve(graph, cluster, "dp", SolveOptions(progress=True))
    plan.save(out / "plan.json")
    print_plan(plan, f"{settings.model}: optimal contiguous plan (max-load in ms per batch of {settings.batch_size})")
    draw_graph(graph, plan, out / "plan_graph.png",
               title=f"{settings.model}: layers coloured by the device the optimal plan puts them on")
    # The DP notes the perfect-balance bound: every node at its cheapest kind, spread over all devices.
    draw_loads(plan, out / "plan_loads.png", plan.notes.get("work_lower_bound"),
               title=f"{settings.model}: load per device (ms per batch), optimal plan")
    steps.append(Step("plan", f"{len(plan.stages)} stages, max-load {plan.max_load:.3f} ms per batch (optimal, "
                      f"{plan.seconds:.1f} s)", time.perf_counter() - started,
                      ["plan.json", "plan_graph.png", "plan_loads.png"]))

    # 3. compare ---------------------------------------------------------------------------------------
    steps.append(_compare_step(settings, graph, cluster, console))

    # 4. pipeline training with optimizer fusion -------------------------------------------------------
    steps.append(_pipeline_step(settings, plan, console))

    # 5. asynchronous data parallelism ----------------------------------------------------------------
    steps.append(_async_step(settings, console))

    # 6. summary ---------------------------------------------------------------------------------------
    _summary(steps, out)
    return steps


def _compare_step(settings: DemoSettings, graph, cluster, console: Console) -> Step:
    """Step 3: the baselines beside the exact DP, on the same cost model."""
    from placewise.plan import SolveOptions
    from placewise.pictures import plot_comparison
    from placewise.plan.compare import compare

    _header(console, 3, "compare with the baselines on the same cost model")
    started = time.perf_counter()
    out = settings.out
    comparison = compare(graph, cluster, BASELINES, SolveOptions(seed=0, time_limit=30.0),
                         on_start=lambda m: console.print(f"  running {m} ..."))
    plot_comparison(comparison, out / "baselines.png", title=f"{settings.model} on {DEVICE_FILE.name}: max-load per method")
    (out / "compare.json").write_text(json.dumps(comparison.to_json(), indent=1))
    table = Table(title="baselines (max-load, lower is better)")
    for col in ("method", "max-load", "x best", "feasible", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in comparison.rows:
        table.add_row(r.method, "-" if r.max_load is None else f"{r.max_load:.4g}",
                      "-" if r.ratio is None else f"{r.ratio:.2f}", "-" if r.feasible is None else str(r.feasible),
                      f"{r.seconds:.2f}")
    console.print(table)
    feasible = [r for r in comparison.rows if r.ratio is not None and r.feasible]
    worst = max(feasible, key=lambda r: r.ratio)
    return Step("compare", f"best: {comparison.best.method} ({comparison.best.max_load:.3f}); baselines up to "
                f"{worst.ratio:.2f}x worse ({worst.method})",
                time.perf_counter() - started, ["baselines.png", "compare.json"])


def _summary(steps: list[Step], out: Path) -> None:
    """Step 6: one table of every step, also written as summary.json."""
    table = Table(title=f"placewise demo: summary (pictures and files in {out}/)")
    for col in ("step", "result", "seconds", "files"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in steps:
        table.add_row(s.name, s.result, f"{s.seconds:.1f}", ", ".join(s.pictures))
    Console().print(table)
    (out / "summary.json").write_text(json.dumps([s.__dict__ for s in steps], indent=1))


def _pipeline_step(settings: DemoSettings, plan, console: Console) -> Step:
    from placewise.run.cut import mapping_from_plan
    from placewise.run.job import PipelineJob
    from placewise.run.pipeline import run_pipeline
    from placewise.run.report import pipeline_report, print_report

    n = len(plan.stages)
    # One microbatch per stage at least (torch's schedules need it), two samples or more in each.
    microbatches = n
    batch_size = n * max(2, settings.batch_size // n)
    _header(console, 4, f"train {3 if settings.quick else 6} steps as a {n}-stage pipeline (1F1B, {microbatches} "
                        "microbatches, SGD fused into the backward pass), one process per stage")
    started = time.perf_counter()
    job = PipelineJob(model=settings.model, batch_size=batch_size, input_shape=(3, settings.image,
                      settings.image), mapping=mapping_from_plan(plan), mode="train", schedule="1f1b",
                      microbatches=microbatches, steps=3 if settings.quick else 6, warmup=1, fuse="backward",
                      progress=True)
    results = run_pipeline(job)
    report = pipeline_report(results, plan=plan, batch_size=job.batch_size, mode="train", schedule="1f1b",
                             microbatches=microbatches, profiled_batch=settings.batch_size, time_unit="ms")
    print_report(report, "pipeline stages: measured here (each stage one CPU process) vs planned for the cluster")
    from placewise.pictures import draw_timeline
    draw_timeline(results, settings.out / "pipeline_timeline.png",
                  title=f"{settings.model}: one 1F1B training step over {n} stage processes (measured)")
    losses = report["losses"]
    # The runner cycles through a few synthetic batches, so consecutive losses are of different batches.
    return Step("pipeline", f"{n} stages, {report['samples_per_second']:.1f} samples/s on this machine, "
                f"losses {', '.join(f'{x:.2f}' for x in losses)}", time.perf_counter() - started,
                ["pipeline_timeline.png"])


def _async_step(settings: DemoSettings, console: Console) -> Step:
    from placewise.pictures import draw_training_curves, plot_staleness
    from placewise.run.dataparallel.config import TrainConfig
    from placewise.run.dataparallel.train import train_data_parallel

    epochs = 2 if settings.quick else 10
    _header(console, 5, f"asynchronous SGD: 2 workers and a parameter server on the digits data, {epochs} epochs")
    started = time.perf_counter()
    report = train_data_parallel(TrainConfig(model="mlp", mode="async", workers=2, dataset="digits", epochs=epochs,
                                             batch_size=32, lr=0.05, progress=True))
    out = settings.out
    plot_staleness({"2 async workers": report.staleness}, out / "async_staleness.png")
    draw_training_curves(report.history, report.curve, out / "async_training.png",
                         title="asynchronous SGD on digits: training loss per update, test accuracy")
    return Step("async", f"{report.updates} updates at {report.updates_per_s:.0f}/s, test accuracy "
                f"{report.test_accuracy:.1%}, mean staleness {report.mean_staleness:.2f}",
                time.perf_counter() - started, ["async_training.png", "async_staleness.png"])
