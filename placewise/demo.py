"""`placewise demo`: the whole system on this machine in a few minutes, with pictures.

profile a small real model -> plan it for THIS machine (its cores, the link between two processes
measured here), with the step time and per-stage memory the schedule will need -> run that plan as a
pipeline and show predicted and measured side by side -> as a labelled what-if, plan the same model
for a heterogeneous cluster (a shipped device file) and compare the baselines there -> a short
asynchronous data-parallel run on scikit-learn's bundled digits -> a summary table.
No GPU, no cluster, no downloads.
"""

from __future__ import annotations

import json
import statistics
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
    from placewise.profile import profile_model
    from placewise.profile.models import build_model

    _header(console, 1, f"measure this machine's link and profile {settings.model} ({settings.image}x{settings.image}, "
                        f"batch {settings.batch_size}, forward and backward, one CPU thread)")
    started = time.perf_counter()
    here = _this_machine()
    model, inputs = build_model(settings.model, settings.batch_size, (3, settings.image, settings.image))
    graph = profile_model(model, inputs, name=settings.model, training=True, repeats=settings.repeats,
                          cluster=here, optimizer="momentum", progress=True)
    save_graph(graph, out / "graph.json")
    meta = graph.meta_dict
    forward_nodes = sum(1 for n in graph.nodes if not n.backward)
    steps.append(Step("profile", f"{forward_nodes} layers x (forward, backward); link here: latency "
                      f"{1e6 * here.latency:.0f} us, {here.bandwidth / 1e9:.2f} GB/s; per-node forward sum / whole "
                      f"forward = {float(meta.get('forward_ratio', 'nan')):.2f}", time.perf_counter() - started,
                      ["graph.json"]))

    # 2. plan for this machine ------------------------------------------------------------------------
    plan, plan_step = _plan_here(settings, graph, here, console)
    steps.append(plan_step)

    # 3. run it: predicted against measured -----------------------------------------------------------
    steps.append(_pipeline_step(settings, plan, console))

    # 4. what-if: a heterogeneous cluster, and the baselines there ------------------------------------
    steps.append(_what_if_step(settings, graph, console))

    # 5. asynchronous data parallelism ----------------------------------------------------------------
    steps.append(_async_step(settings, console))

    # 6. summary ---------------------------------------------------------------------------------------
    _summary(steps, out)
    return steps


# The pipeline the demo runs here: 1F1B over this many microbatches, each of the profiled batch size.
MICROBATCHES = 4


def _this_machine():
    """This machine's cores (two stages' worth at most: one process per stage) with its measured link."""
    from dataclasses import replace
    from placewise.profile.machine import describe_machine, machine_cluster
    from placewise.run.links import measure_here
    info = describe_machine()
    info["link"] = measure_here()
    cluster = machine_cluster(info)
    return replace(cluster, kinds=tuple(replace(k, count=min(k.count, 2)) for k in cluster.kinds if not k.accelerator))


def _plan_here(settings: DemoSettings, graph, here, console: Console):
    """Step 2: the exact plan for this machine's cores, with its schedule's prediction."""
    from placewise.console import print_plan
    from placewise.predicted import print_prediction
    from placewise.pictures import draw_graph, draw_loads
    from placewise.plan import SolveOptions, solve
    from placewise.plan.predict import with_prediction
    from placewise.plan.schedule import ONE_F_ONE_B, Schedule

    _header(console, 2, f"plan it for this machine: {here.cpus} CPU core(s), one process each, the measured link")
    started = time.perf_counter()
    plan = with_prediction(graph, here, solve(graph, here, "dp", SolveOptions(progress=True)),
                           Schedule(ONE_F_ONE_B, MICROBATCHES))
    plan.save(settings.out / "plan.json")
    print_plan(plan, f"{settings.model}: optimal contiguous plan for this machine (ms per microbatch of "
                     f"{settings.batch_size})")
    print_prediction(plan)
    draw_graph(graph, plan, settings.out / "plan_graph.png",
               title=f"{settings.model}: layers coloured by the core the optimal plan puts them on")
    draw_loads(plan, settings.out / "plan_loads.png", plan.notes.get("work_lower_bound"),
               title=f"{settings.model}: load per core (ms per microbatch), optimal plan")
    step = plan.notes["prediction"]["step_time"]
    return plan, Step("plan", f"{len(plan.stages)} stages here, predicted 1F1B step {step:.1f} ms for "
                      f"{MICROBATCHES} x {settings.batch_size} samples", time.perf_counter() - started,
                      ["plan.json", "plan_graph.png", "plan_loads.png"])


def _what_if_step(settings: DemoSettings, graph, console: Console) -> Step:
    """Step 4: the same model planned for the heterogeneous example cluster, and the baselines there.
    Nothing here runs: this machine has no such devices."""
    from placewise.console import print_plan
    from placewise.graph.devicefile import load_device_file
    from placewise.plan import SolveOptions, solve

    cluster = load_device_file(DEVICE_FILE)
    kinds = ", ".join(f"{k.count} x {k.name} (speed {k.speed:g})" for k in cluster.kinds)
    _header(console, 4, f"what-if (planned, not run): {DEVICE_FILE.name}: {kinds}")
    plan = solve(graph, cluster, "dp", SolveOptions(progress=True))
    plan.save(settings.out / "what-if-plan.json")
    print_plan(plan, f"WHAT-IF {settings.model} on {DEVICE_FILE.name} (not this machine; max-load in ms per batch)")
    step = _compare_step(settings, graph, cluster, console)
    return Step("what-if", f"{DEVICE_FILE.name} (not run): {len(plan.stages)} stages, max-load {plan.max_load:.3f} ms; "
                f"{step.result}", step.seconds, ["what-if-plan.json", *step.pictures])


def _compare_step(settings: DemoSettings, graph, cluster, console: Console) -> Step:
    """Step 3: the baselines beside the exact DP, on the same cost model."""
    from placewise.plan import SolveOptions
    from placewise.pictures import plot_comparison
    from placewise.plan.compare import compare

    console.print("the baselines on the same cost model, for the what-if cluster:")
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
    """Step 3: run the plan here, one process per stage, and put the measurement beside the prediction."""
    import os
    from dataclasses import replace

    from placewise.predicted import draw_predicted_and_measured
    from placewise.run.cut import mapping_from_plan
    from placewise.run.job import PipelineJob
    from placewise.run.pipeline import run_pipeline

    n = len(plan.stages)
    steps = 3 if settings.quick else 6
    _header(console, 3, f"run the plan here: {steps} training steps, {n} stage process(es), 1F1B over {MICROBATCHES} "
                        f"microbatches of {settings.batch_size}; predicted beside measured")
    started = time.perf_counter()
    job = PipelineJob(model=settings.model, batch_size=MICROBATCHES * settings.batch_size,
                      input_shape=(3, settings.image, settings.image), mapping=mapping_from_plan(plan), mode="train",
                      schedule="1f1b", microbatches=MICROBATCHES, steps=steps, warmup=1, progress=True)
    load = os.getloadavg()[0]
    results = run_pipeline(job)
    # Counting live tensors slows every operator, so memory has a run of its own; two steps, since the
    # optimizer's state (momentum) exists only from the first update on, and the plan counts it.
    memory = run_pipeline(replace(job, steps=2, warmup=0, collect=("memory",), progress=False))
    prediction = plan.notes["prediction"]
    measured_ms = 1e3 * statistics.median(results[-1]["step_seconds"])  # the last stage ends each step
    share = sum(r["cpu_seconds"] for r in results) / sum(r["forward_seconds"] + r["backward_seconds"] for r in results)
    table = Table(title=f"predicted (plan) vs measured (this machine, load {load:.1f} on {os.cpu_count()} cores)")
    for col in ("", "predicted", "measured", "measured / predicted"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("step, ms", f"{prediction['step_time']:.1f}", f"{measured_ms:.1f}",
                  f"{measured_ms / prediction['step_time']:.2f}")
    for i, (mem, r) in enumerate(zip(prediction["stage_memory"] or [], memory)):
        table.add_row(f"stage {i} peak memory, MB", f"{mem['total'] / 1e6:.1f}", f"{r['peak_memory_bytes'] / 1e6:.1f}",
                      f"{r['peak_memory_bytes'] / mem['total']:.2f}")
    console.print(table)
    console.print(f"The stage processes got {share:.0%} of a core while computing (their CPU time over wall time): "
                  f"other work on this machine slows them by {1 / share:.2f}x, which no plan can know in advance.")
    draw_predicted_and_measured(plan, settings.model, job.schedule, job.microbatches, job.batch_size, results,
                                settings.out / "pipeline_timeline.png")
    losses = results[-1]["losses"]
    # The runner cycles through a few synthetic batches, so consecutive losses are of different batches.
    return Step("pipeline", f"step predicted {prediction['step_time']:.1f} ms, measured {measured_ms:.1f} ms "
                f"(core share {share:.0%}); losses {', '.join(f'{x:.2f}' for x in losses)}",
                time.perf_counter() - started, ["pipeline_timeline.png"])


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
