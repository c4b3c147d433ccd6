"""The `placewise` command: parses arguments and calls the layers. Domain errors print one line, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from placewise.console import console as _console
from placewise.console import fmt_bytes as _fmt_bytes
from placewise.console import print_plan
from placewise.errors import PlacewiseError, dump_json
from placewise.export import FORMATS as EXPORT_FORMATS
from placewise.plan.options import OBJECTIVES
from placewise.plan.schedule import DEFAULT_SCHEDULE, GPIPE, SCHEDULES
from placewise.run.choices import (ASYNC, DATASETS, FUSE_MODES, OPTIMIZERS, PIPELINE, STALENESS_HELP,
                                   TRAIN_MODES, TRANSPORTS)
from placewise.validate import (OneLineParser, device_count, finite_non_negative, finite_positive, input_file,
                                learning_rate, momentum, non_negative_int, output_file, output_file_in_new_folder,
                                output_folder, positive_int, seed)


# Microbatches per step when neither the command line nor the plan says.
DEFAULT_MICROBATCHES = 4


# ---- shared helpers -------------------------------------------------------------------------------
def _cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (override what the graph file carries)")
    g.add_argument("--accelerators", "-k", type=device_count, metavar="K", help="number of accelerators")
    g.add_argument("--cpus", "-l", type=device_count, metavar="L", help="number of CPU cores")
    g.add_argument("--memory", type=finite_positive, metavar="BYTES", help="memory of one accelerator, bytes")
    g.add_argument("--devices", metavar="FILE", help="a device file (YAML or JSON) describing the cluster")


def _graph_command(p: argparse.ArgumentParser) -> None:
    """What every command that reads a graph takes: the graph file, the objective, the devices."""
    p.add_argument("graph", help="graph file (paper JSON, placewise JSON or PipeDream graph.txt)")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput")
    _cluster_flags(p)
    _graph_flags(p)


def _graph_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bandwidth", type=finite_positive, default=None, metavar="BYTES_PER_S",
                   help="link bandwidth for PipeDream graphs (bytes/s; default 10e9)")


def _load_graph(args):
    from placewise.graph import load_graph
    opts = {}
    if getattr(args, "bandwidth", None) is not None:
        opts["bandwidth"] = args.bandwidth
    return load_graph(args.graph, **opts)


def _cluster(args, graph):
    from placewise.graph import Cluster
    for flag in ("accelerators", "cpus"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise PlacewiseError(f"--{flag} is {value}; use 0 or more")
    if getattr(args, "memory", None) is not None and args.memory < 0:
        raise PlacewiseError(f"--memory is {args.memory}; use a non-negative number of bytes")
    if getattr(args, "devices", None):
        from placewise.graph.devicefile import load_device_file
        cluster = load_device_file(args.devices)
    else:
        cluster = graph.cluster or Cluster.simple(4, 0, None)
    return cluster.with_overrides(args.accelerators, args.cpus, args.memory)


def _check_time_limit(args) -> None:
    if args.time_limit is not None and args.time_limit <= 0:
        raise PlacewiseError(f"--time-limit is {args.time_limit}; use a positive number of seconds")


def _emit(plan, args, title: str) -> None:
    if getattr(args, "out", None):
        plan.save(args.out)
    if args.json:
        print(dump_json(plan.to_json()))
    else:
        print_plan(plan, title)
        if getattr(args, "out", None):
            print(f"plan written to {args.out}")


# ---- subcommands ----------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from placewise.plan import load_split, plan_from_assignment
    graph = _load_graph(args)
    cluster = _cluster(args, graph)
    assignment = load_split(args.split, graph)
    plan = plan_from_assignment(graph, cluster, assignment, solver=f"split:{Path(args.split).name}", seconds=0.0,
                                objective=args.objective, contiguous=not args.noncontiguous,
                                replicate=not args.no_replicate)
    _emit(plan, args, f"{graph.name}: {Path(args.split).name}")
    return 0 if plan.feasible else 1


def cmd_plan(args) -> int:
    from placewise.plan import SolveOptions, solve
    graph = _load_graph(args)
    cluster = _cluster(args, graph)
    _check_time_limit(args)
    options = SolveOptions(objective=args.objective, contiguous=not args.noncontiguous, time_limit=args.time_limit,
                           gap=args.gap, seed=args.seed, progress=not args.json and sys.stderr.isatty(),
                           replicate=not args.no_replicate)
    schedule = _schedule(args)
    scale = _microbatch_scale(args, graph)
    if args.solver == "dp-schedule":
        from placewise.plan import get_entry
        if schedule is None:
            raise PlacewiseError("--solver dp-schedule plans for a schedule; give --microbatches M (and --schedule)")
        options = get_entry("dp-schedule").options(options, schedule=schedule, microbatch_scale=scale)
    plan = solve(graph, cluster, args.solver, options)
    if schedule is not None:
        from placewise.plan.predict import with_prediction
        plan = with_prediction(graph, cluster, plan, schedule, microbatch_scale=scale)
    _emit(plan, args, f"{graph.name}: {plan.solver} plan on {cluster.accelerators} accelerator(s), {cluster.cpus} CPU(s)")
    if args.explain and not args.json:
        from placewise.console import print_explanation
        print_explanation(plan)
    if not args.json and schedule is not None:
        from placewise.predicted import print_prediction
        print_prediction(plan)
    return 0


def _schedule(args):
    """The schedule `--schedule`/`--microbatches` ask for; None when neither is given."""
    if args.microbatches is None and args.schedule is None:
        return None
    from placewise.plan.schedule import DEFAULT_SCHEDULE, Schedule
    return Schedule(args.schedule or DEFAULT_SCHEDULE, args.microbatches or 1)


def _microbatch_scale(args, graph) -> float:
    """Microbatch size over the profiled batch size (times and activations scale with it)."""
    if args.batch_size is None:
        return 1.0
    from placewise.run.report import profiled_batch
    profiled = profiled_batch(graph)
    if profiled is None:
        raise PlacewiseError("--batch-size needs a graph made by `placewise profile` (its batch size is recorded)")
    if args.batch_size % (args.microbatches or 1):
        raise PlacewiseError(f"--batch-size {args.batch_size} does not split into {args.microbatches} equal microbatches")
    return args.batch_size / (args.microbatches or 1) / profiled


# ---- compare (baselines issue) --------------------------------------------------------------------
COMPARE_TIME_LIMIT = 60.0  # seconds per method, for those that take a limit (ip, local-search)


def cmd_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from placewise.plan import SolveOptions, get_entry
    from placewise.pictures import plot_comparison
    from placewise.plan.compare import compare
    graph = _load_graph(args)
    cluster = _cluster(args, graph)
    _check_time_limit(args)
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise PlacewiseError(f"--plot {args.plot}: the chart is a PNG; give a file name ending in .png")
    methods = args.methods
    if methods is not None and args.expert and "expert" not in methods:
        methods = [*methods, "expert"]
    # Without a limit an integer program may run for hours on a large graph; a comparison should end.
    time_limit = COMPARE_TIME_LIMIT if args.time_limit is None else args.time_limit
    options = SolveOptions(objective=args.objective, time_limit=time_limit, seed=args.seed,
                           replicate=not args.no_replicate)
    specific = {"expert": get_entry("expert").options(options, split=args.expert)} if args.expert else {}
    err = Console(stderr=True)
    show = not args.json and sys.stderr.isatty()
    with err.status("comparing...", spinner="dots") if show else contextlib.nullcontext() as status:
        result = compare(graph, cluster, methods, options, specific,
                         on_start=(lambda m: status.update(f"running {m}...")) if show else None)
    if args.plot:
        plot_comparison(result, args.plot)
    if args.json:
        print(dump_json(result.to_json()))
        return 0
    what = "max-load" if args.objective == "throughput" else "latency"
    table = Table(title=f"{graph.name}: {cluster.accelerators} accelerator(s), {cluster.cpus} CPU(s), {what} by method "
                        "(lower is better)")
    for col in ("method", what, "max-load" if args.objective == "latency" else "latency", "x best", "feasible",
                "contiguous", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    best = result.best
    for r in result.rows:
        if r.error:
            table.add_row(r.method, "-", "-", "-", "[red]cannot run[/red]", "-", f"{r.seconds:.2f}")
            continue
        other = r.max_load if args.objective == "latency" else r.latency
        name = f"[bold green]{r.method}[/bold green]" if r is best else r.method
        defined = math.isfinite(r.value)  # latency is undefined when devices wait on each other in a cycle
        table.add_row(name, f"{r.value:.6g}" if defined else "-", "-" if other is None else f"{other:.6g}",
                      f"{r.ratio:.3f}" if defined and r.ratio is not None else "-",
                      "yes" if r.feasible else "[red]no[/red]", "yes" if r.contiguous else "no", f"{r.seconds:.2f}")
    console = _console()
    console.print(table)
    for r in result.rows:
        if r.error:
            console.print(f"[red]{r.method}[/red] could not run: {r.error}")
        elif not r.feasible:
            console.print(f"[yellow]{r.method}[/yellow] is infeasible: {r.violations[0]}")
        elif not math.isfinite(r.value):
            console.print(f"[yellow]{r.method}[/yellow] has no latency: its devices' sets wait on each other in a cycle")
    if args.plot:
        console.print(f"chart written to {args.plot}")
    return 0


# ---- profile and devices (profile issue) ----------------------------------------------------------
def cmd_profile(args) -> int:
    from placewise.graph import save_graph
    from placewise.graph.devicefile import load_device_file
    from placewise.profile import build_model, export_paper, profile_model
    from placewise.profile.report import print_summary, summary
    cluster = load_device_file(args.devices) if args.devices else None
    model, inputs = build_model(args.model, args.batch_size, args.input_shape, layers=args.layers, hidden=args.hidden,
                                heads=args.heads, seed=args.seed)
    graph = profile_model(model, inputs, name=args.model, granularity=args.granularity, device=args.device,
                          training=args.training, repeats=args.repeats, warmup=args.warmup, cluster=cluster,
                          optimizer=args.optimizer, threads=args.threads, clock=args.clock,
                          progress=not args.json and sys.stderr.isatty())
    written = []
    if args.out:
        save_graph(graph, args.out)
        written.append(f"graph written to {args.out}")
    if args.export_paper:
        export_paper(graph, args.export_paper)
        written.append(f"paper JSON written to {args.export_paper}")
    if args.json:
        print(dump_json(summary(graph)))
    else:
        print_summary(graph, written)
    return 0


def cmd_devices(args) -> int:
    from placewise.profile.machine import describe_machine, machine_device_file
    info = describe_machine()
    if args.measure:
        from placewise.run.links import measure_link
        info["link"] = measure_link().to_json()
    if args.out:
        Path(args.out).write_text(machine_device_file(info))
    if args.json:
        print(dump_json(info))
        return 0
    from rich.table import Table
    table = Table(title="this machine")
    for col in ("device", "count", "memory", "details"):
        table.add_column(col)
    cpu = info["cpu"]
    table.add_row("cpu", f"{cpu['usable_cores']} of {cpu['cores']} cores", _fmt_bytes(info["memory"] or 0), cpu["model"])
    for gpu in info["cuda"]:
        table.add_row(f"cuda:{gpu['index']}", "1", _fmt_bytes(gpu["memory"]),
                      f"{gpu['name']} (compute {gpu['capability']}, {gpu['multiprocessors']} SMs)")
    _console(120).print(table)
    if info["torch"]:
        print(f"torch {info['torch']['version']}, {info['torch']['threads']} intra-op thread(s)"
              + ("" if info["cuda"] else "; no CUDA device"))
    if info.get("link"):
        link = info["link"]
        print(f"link between two processes ({link['backend']}): latency {1e6 * link['latency']:.0f} us, "
              f"bandwidth {link['bandwidth'] / 1e9:.2f} GB/s")
    if args.out:
        print(f"device file written to {args.out}")
    return 0


def cmd_export(args) -> int:
    from placewise.export import ExportOptions, export_plan, outline_model, render
    from placewise.plan import load_plan
    from placewise.profile import build_model
    plan = load_plan(args.plan)
    name = args.model or plan.graph
    if not name:
        raise PlacewiseError(f"{args.plan}: the plan does not name its model; give --model")
    model, inputs = build_model(name, args.batch_size, args.input_shape, layers=args.layers, seed=args.seed)
    model.train(args.training)
    data = export_plan(plan, outline_model(model, inputs), args.format,
                       ExportOptions(root=args.root, layers=args.transformer_layers))
    print(dump_json(data) if args.json else render(args.format, data))
    return 0


# ---- train and serve-bench (run issue: pipelines; async issue: data parallel) ----------------------
def cmd_train(args) -> int:
    if args.workers is not None or args.mode != PIPELINE:
        return _train_data_parallel(args)
    return _train_pipeline(args)


def _pipeline_job(args, mode: str):
    from placewise.plan import load_plan
    from placewise.run.cut import mapping_from_plan
    from placewise.run.job import PipelineJob
    if not args.plan:
        raise PlacewiseError(f"{mode} of a pipeline needs --plan PLAN.json; make one with `placewise profile MODEL "
                             "--out G.json` then `placewise plan G.json --out PLAN.json`")
    if args.threads < 1:
        raise PlacewiseError(f"--threads is {args.threads}; use 1 or more")
    plan = load_plan(args.plan)
    job = PipelineJob(model=args.model, batch_size=args.batch_size, mapping=mapping_from_plan(plan),
                      input_shape=tuple(args.input_shape) if args.input_shape else None, mode=mode,
                      schedule=_train_schedule(args, plan), microbatches=_train_microbatches(args, plan), steps=args.steps,
                      warmup=1, lr=getattr(args, "lr", 0.0), optimizer=getattr(args, "optimizer", "sgd"),
                      momentum=getattr(args, "momentum", 0.0), fuse=getattr(args, "fuse", "none"),
                      seed=getattr(args, "seed", 0), progress=not args.json and sys.stderr.isatty())
    return plan, job


def _train_schedule(args, plan=None) -> str:
    """--schedule, else the schedule the plan was made for, else the default (serve-bench: GPipe, forward only)."""
    if not hasattr(args, "schedule"):
        return GPIPE
    return args.schedule or (plan.schedule.kind if plan is not None and plan.schedule else DEFAULT_SCHEDULE)


def _train_microbatches(args, plan=None) -> int:
    """--microbatches, else the plan's schedule's, else 4."""
    if args.microbatches is not None:
        return args.microbatches
    return plan.schedule.microbatches if plan is not None and plan.schedule else DEFAULT_MICROBATCHES


def _run_pipeline_job(args, mode: str) -> int:
    from placewise.run.pipeline import run_pipeline
    from placewise.run.report import pipeline_report, print_report, profiled_batch
    plan, job = _pipeline_job(args, mode)
    batch, unit, profiled_mode = None, None, None
    if getattr(args, "graph", None):
        from placewise.graph import load_graph
        graph = load_graph(args.graph)
        batch, unit, profiled_mode = profiled_batch(graph), graph.meta_dict.get("time_unit"), graph.meta_dict.get("mode")
    results = run_pipeline(job, threads=args.threads)
    if results is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    report = pipeline_report(results, plan=plan, batch_size=job.batch_size, mode=mode, schedule=job.schedule,
                             microbatches=job.microbatches, profiled_batch=batch, time_unit=unit,
                             profiled_mode=profiled_mode)
    report.update(model=args.model, plan=str(args.plan), threads_per_process=args.threads)
    if getattr(args, "out", None):
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{mode}-report.json").write_text(dump_json(report) + "\n")
        if mode == "train" and len(results) > 1:
            from placewise.predicted import draw_predicted_and_measured
            draw_predicted_and_measured(plan, job.model, job.schedule, job.microbatches, job.batch_size, results,
                                        Path(args.out) / "timeline.png")
            print(f"timeline written to {Path(args.out) / 'timeline.png'}")
    if args.json:
        print(dump_json(report))
    else:
        print_report(report, f"{args.model}: {mode} on {len(results)} pipeline stage(s), {args.threads} thread(s) each")
    return 0


def _train_pipeline(args) -> int:
    return _run_pipeline_job(args, "train")


def _train_data_parallel(args) -> int:
    from placewise.run.dataparallel.config import TrainConfig
    from placewise.run.dataparallel.report import print_report, write_outputs
    from placewise.run.dataparallel.train import train_data_parallel
    mode = ASYNC if args.mode == PIPELINE else args.mode
    mapping = {}
    if args.plan:  # every worker is a pipeline of the plan's stages
        from placewise.plan import load_plan
        from placewise.run.cut import mapping_from_plan
        mapping = mapping_from_plan(load_plan(args.plan))
    checkpoint = args.checkpoint
    if checkpoint is None and args.checkpoint_every and args.out:
        checkpoint = str(Path(args.out) / "checkpoint.pt")
    cfg = TrainConfig(model=args.model, mode=mode, workers=2 if args.workers is None else args.workers,
                      servers=args.servers, n_push=args.n_push, n_fetch=args.n_fetch, staleness=args.staleness,
                      dataset=args.dataset, steps=None if args.epochs is not None else args.steps,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                      momentum=args.momentum, fuse=args.fuse, seed=args.seed, threads=args.threads,
                      checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
                      progress=not args.json and sys.stderr.isatty(), mapping=mapping, schedule=_train_schedule(args),
                      microbatches=_train_microbatches(args), transport=args.transport,
                      input_shape=tuple(args.input_shape) if args.input_shape else None,
                      backup_workers=args.backup_workers, **_compensation_options(args))
    report = train_data_parallel(cfg)
    if report is None:
        return 0  # a rank other than 0 under torchrun: rank 0 reports
    if args.out:
        write_outputs(report, args.out)
    if args.json:
        print(dump_json(report.to_dict()))
    else:
        print_report(report)
    return 0


def _compensation_options(args) -> dict:
    """The staleness policies' options from the flags given (the others keep their defaults)."""
    from placewise.run.compensation import DcAsgdOptions, GapAwareOptions
    dc = {k: v for k, v in (("lam", args.dc_lambda), ("meansquare", args.dc_meansquare)) if v is not None}
    gap = {"decay": args.gap_decay} if args.gap_decay is not None else {}
    return {"dc_asgd": DcAsgdOptions(**dc), "gap_aware": GapAwareOptions(**gap)}


def cmd_simulate(args) -> int:
    from placewise.plan import load_plan
    from placewise.predicted import simulate_report
    result = simulate_report(load_plan(args.plan), Path(args.plan).name, args.schedule, args.microbatches, args.picture)
    if args.json:
        print(dump_json(result))
        return 0
    unit = result["time_unit"]
    print(f"{result['schedule']['kind']} with {result['schedule']['microbatches']} microbatches: predicted step "
          f"{result['step_time']:.6g} {unit} (first step from empty {result['first_step']:.6g}; busiest stage "
          f"{max(result['busy']):.6g}; bubble {100 * result['bubble']:.0f}%)")
    if args.picture:
        print(f"timeline written to {args.picture}")
    return 0


def cmd_serve_bench(args) -> int:
    return _run_pipeline_job(args, "infer")


def cmd_demo(args) -> int:
    from placewise.demo import DemoSettings, run_demo
    run_demo(DemoSettings(out=Path(args.out), quick=args.quick))
    return 0


EXAMPLES = {
    "evaluate": "placewise evaluate ../shared/workloads/dnn-partitioning/throughput-inputs/LayerGraphs/bert24_inference.json "
                "../shared/workloads/dnn-partitioning/human-experts/bert24_inference_expert.json",
    "plan": "placewise plan ../shared/workloads/dnn-partitioning/throughput-inputs/LayerGraphs/resnet50_inference.json -k 4 --out plan.json"
            "\n  placewise plan resnet18.json --devices here.yaml --solver dp-schedule --schedule gpipe --microbatches 8",
    "compare": "placewise compare ../shared/workloads/dnn-partitioning/throughput-inputs/LayerGraphs/bert24_inference.json "
               "--plot compare.png",
    "profile": "placewise profile resnet18 --input-shape 3 64 64 --batch-size 8 --training --out resnet18.json",
    "devices": "placewise devices --json\n  placewise devices --measure --out here.yaml  # with the link measured",
    "export": "placewise export plan.json --format megatron --model gpt2 --input-shape 128 --training",
    "simulate": "placewise simulate plan.json --microbatches 8 --picture timeline.png  # a plan made with:"
                "\n  placewise plan resnet18.json --devices here.yaml --schedule 1f1b --microbatches 4 --out plan.json",
    "train": "placewise train resnet18 --plan plan.json --graph resnet18.json --input-shape 3 64 64 --batch-size 8 "
             "--microbatches 4 --steps 3 --fuse backward\n  placewise train mlp --workers 2 --mode async --epochs 5"
             "\n  placewise train cnn --workers 2 --mode async --staleness dc-asgd --epochs 5  # any model"
             "\n  placewise train mlp:256x256 --plan mlp-plan.json --workers 2 --mode async --epochs 5  "
             "# pipelines as workers",
    "serve-bench": "placewise serve-bench resnet18 --plan plan.json --graph resnet18.json --input-shape 3 64 64 "
                   "--batch-size 8 --microbatches 4",
    "demo": "placewise demo --out placewise-out",
}


def _replicate_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-replicate", action="store_true",
                   help="place every node once (default: cheap input-derived nodes such as sizes, masks and position "
                        "ids are recomputed by each stage that needs them)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="placewise", description="Optimal device placement of DNN operator graphs, "
                            "pipelined and asynchronous training, and optimizer fusion.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func):
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {EXAMPLES[name]}" if name in EXAMPLES else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("evaluate", "score a split of a graph with the cost model", cmd_evaluate)
    _graph_command(p)
    p.add_argument("split", help="split file (reference {fpgas, cpus} format or a placewise plan)")
    p.add_argument("--noncontiguous", action="store_true", help="do not require contiguous sets")
    p.add_argument("--json", action="store_true", help="print the plan JSON on stdout")
    p.add_argument("--out", type=output_file, metavar="PLAN.json", help="also write the scored plan")
    _replicate_flag(p)

    p = add("plan", "find a split of a graph across devices", cmd_plan)
    _graph_command(p)
    p.add_argument("--solver", default="dp", help="dp (exact, default), ip, or a baseline")
    p.add_argument("--noncontiguous", action="store_true", help="allow non-contiguous sets (integer program)")
    p.add_argument("--time-limit", type=finite_positive, metavar="S", help="stop after S seconds with the best plan found")
    p.add_argument("--gap", type=finite_non_negative, default=1e-4, metavar="G", help="relative optimality gap to stop at (ip)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--schedule", choices=SCHEDULES, help="plan for this pipeline schedule: per-position memory, "
                   "predicted step time (default 1f1b when --microbatches is given)")
    p.add_argument("--microbatches", type=positive_int, metavar="M", help="microbatches per step of the schedule")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="training batch (default: M x the profiled "
                   "batch, so one microbatch is what was profiled)")
    p.add_argument("--out", type=output_file, metavar="PLAN.json", help="write the plan")
    p.add_argument("--json", action="store_true", help="print the plan JSON on stdout")
    _replicate_flag(p)
    p.add_argument("--explain", action="store_true",
                   help="also say what was replicated, units and ideals before and after, and where the bound came from")

    p = add("compare", "run the exact planner and the baselines side by side", cmd_compare)
    _graph_command(p)
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="solvers/baselines to run (default: all)")
    p.add_argument("--expert", type=input_file, metavar="SPLIT", help="an expert split file to include as a row")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--time-limit", type=finite_positive, metavar="S", help="per-method time limit (ip, local-search; default 60)")
    p.add_argument("--plot", type=output_file, metavar="FILE.png", help="write a bar chart")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    _replicate_flag(p)

    p = add("profile", "trace and time a PyTorch model into an operator graph", cmd_profile)
    p.add_argument("model", help="torchvision name (resnet18), transformers config (bert-base, gpt2) or package.module:factory")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N")
    p.add_argument("--input-shape", type=positive_int, nargs="+", metavar="D", help="input shape without the batch (e.g. 3 224 224, or a sequence length)")
    p.add_argument("--granularity", choices=["layer", "operator"], default="layer")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--training", action="store_true", help="also time backward passes (training graph)")
    p.add_argument("--repeats", type=positive_int, default=5, metavar="R", help="timed runs per node (median)")
    p.add_argument("--devices", metavar="FILE", help="device file: cluster to store with the graph")
    p.add_argument("--out", type=output_file, metavar="GRAPH.json", help="write the graph (placewise JSON)")
    p.add_argument("--export-paper", type=output_file, metavar="FILE.json", help="also write the paper's JSON format")
    p.add_argument("--json", action="store_true", help="print a summary as JSON on stdout")
    p.add_argument("--layers", type=positive_int, metavar="N", help="transformer blocks (transformers models only)")
    p.add_argument("--hidden", type=positive_int, metavar="H", help="transformer hidden width (transformers models only)")
    p.add_argument("--heads", type=positive_int, metavar="N", help="attention heads (transformers models only)")
    p.add_argument("--warmup", type=non_negative_int, default=1, metavar="W", help="untimed runs before timing (after one check run)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="T", help="torch threads while profiling (1: one core)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="CPU timing: process CPU time, wall time, or auto (CPU time for one thread)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adagrad", "adam", "adamw"], default="adam",
                   help="optimizer whose state a training graph's memory counts")
    p.add_argument("--seed", type=seed, default=0, help="seed of the random weights and inputs")

    p = add("export", "write a plan as torch's split_spec, torchtitan's module names, Megatron's layout or "
                      "DeepSpeed's partition", cmd_export)
    p.add_argument("plan", type=input_file, metavar="PLAN.json", help="a plan of a profiled model (placewise plan --out)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--model", help="the model the plan is for (default: the name the plan's graph was profiled as)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N")
    p.add_argument("--input-shape", type=positive_int, nargs="+", metavar="D", help="as given to profile")
    p.add_argument("--layers", type=positive_int, metavar="N", help="transformer blocks, as given to profile")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--training", action="store_true", help="the graph was profiled with --training (traced in train mode)")
    p.add_argument("--root", default="", metavar="MODULE", help="torchtitan/deepspeed: name the children of this submodule "
                   "(e.g. model for a wrapped Hugging Face model)")
    p.add_argument("--transformer-layers", metavar="MODULE", help="megatron: the list of transformer layers (default: found)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")

    p = add("devices", "show the devices of this machine", cmd_devices)
    p.add_argument("--json", action="store_true", help="print as JSON on stdout")
    p.add_argument("--out", type=output_file, metavar="FILE.yaml", help="write a device file describing this machine")
    p.add_argument("--measure", action="store_true", help="time send/receive between two processes here (gloo, or "
                   "NCCL between two GPUs) and write the measured latency and bandwidth into the device file")

    p = add("train", "train a model as a pipeline (from a plan) and/or with data-parallel workers", cmd_train)
    p.add_argument("model", help="model name (as for profile) or package.module:factory")
    p.add_argument("--plan", metavar="PLAN.json", help="plan to cut the model into pipeline stages (with --mode "
                   "async|sync: every worker is such a pipeline)")
    p.add_argument("--graph", metavar="GRAPH.json", help="the profiled graph the plan came from (per-sample prediction)")
    p.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule (with --plan; default: the plan's, "
                   f"else {DEFAULT_SCHEDULE})")
    p.add_argument("--microbatches", type=int, metavar="M", help="microbatches per batch (with --plan; default: the "
                   f"plan's, else {DEFAULT_MICROBATCHES})")
    p.add_argument("--steps", type=int, default=10, metavar="N")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="D")
    p.add_argument("--lr", type=learning_rate, default=0.05)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--momentum", type=momentum, default=0.9)
    p.add_argument("--fuse", choices=FUSE_MODES, default="none",
                   help="optimizer fusion: each update inside backward (backward-overlap: on a second thread, "
                        "for runs with fewer torch threads than cores) or just before the next forward")
    p.add_argument("--threads", type=int, default=1, metavar="T", help="torch threads per process")
    p.add_argument("--workers", type=int, metavar="W", help="data-parallel workers (async/sync/ddp); with --plan, each a pipeline")
    p.add_argument("--mode", choices=TRAIN_MODES, default=PIPELINE)
    p.add_argument("--n-push", type=int, default=1, metavar="N", help="push gradients every N steps")
    p.add_argument("--n-fetch", type=int, default=1, metavar="N", help="fetch parameters every N steps")
    p.add_argument("--staleness", default="none", metavar="POLICY", help=STALENESS_HELP)
    p.add_argument("--dc-lambda", type=float, metavar="L",
                   help="dc-asgd: lambda_0 of the compensated gradient g + lambda*g*g*(w_now - w_stale)")
    p.add_argument("--dc-meansquare", type=float, metavar="M",
                   help="dc-asgd: 0 keeps lambda constant; M in (0, 1) divides it by the root of a moving mean "
                        "square of g (DC-ASGD-a)")
    p.add_argument("--gap-decay", type=float, metavar="D",
                   help="gap-aware: momentum of the moving average of update sizes the gap is measured in")
    p.add_argument("--backup-workers", type=int, default=0, metavar="B",
                   help="--mode sync: each round takes the first W - B gradients and drops the rest")
    p.add_argument("--servers", type=int, default=1, metavar="S",
                   help="parameter-server shards (per stage with --plan)")
    p.add_argument("--transport", choices=TRANSPORTS, default="auto",
                   help="how gradients and parameters reach the servers: shared memory (processes placewise starts "
                        "on this machine), gloo messages, or auto (shared when possible)")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--epochs", type=int, default=None, metavar="E")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K", help="server checkpoint every K updates")
    p.add_argument("--checkpoint", type=output_file_in_new_folder, metavar="PATH", help="checkpoint file")
    p.add_argument("--resume", metavar="CHECKPOINT", help="resume from a checkpoint")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", type=output_folder, metavar="DIR", help="folder for reports and pictures")
    p.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")

    p = add("simulate", "simulate a plan's pipeline schedule: predicted step time and timeline", cmd_simulate)
    p.add_argument("plan", type=input_file, metavar="PLAN.json", help="a plan made with --schedule/--microbatches")
    p.add_argument("--schedule", choices=SCHEDULES, help="another schedule than the plan's")
    p.add_argument("--microbatches", type=positive_int, metavar="M", help="another microbatch count than the plan's")
    p.add_argument("--picture", type=output_file, metavar="FILE.png", help="draw the predicted timeline of one step")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")

    p = add("serve-bench", "measure pipelined inference throughput of a plan", cmd_serve_bench)
    p.add_argument("model", help="model name (as for profile) or package.module:factory")
    p.add_argument("--plan", metavar="PLAN.json", required=True)
    p.add_argument("--microbatches", type=int, default=4, metavar="M")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--input-shape", type=int, nargs="+", metavar="D")
    p.add_argument("--steps", type=int, default=10, metavar="N")
    p.add_argument("--threads", type=int, default=1, metavar="T")
    p.add_argument("--graph", metavar="GRAPH.json", help="the profiled graph the plan came from (per-sample prediction)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    p = add("demo", "profile, plan, compare, pipeline-train and async-train a small model, with pictures", cmd_demo)
    p.add_argument("--out", type=output_folder, default="placewise-out", metavar="DIR", help="folder for pictures and files")
    p.add_argument("--quick", action="store_true", help="a reduced run (fewer repeats, steps and epochs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Pictures go to files: matplotlib's file-only backend, chosen here, before anything imports it.
    os.environ["MPLBACKEND"] = "Agg"
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PlacewiseError as e:
        print(f"placewise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("placewise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
