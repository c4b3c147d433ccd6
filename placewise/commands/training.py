"""`placewise train`, `serve-bench` and `demo`: running plans as pipelines and data-parallel workers."""

from __future__ import annotations

import sys
from pathlib import Path

from placewise.errors import PlacewiseError, dump_json
from placewise.plan.schedule import DEFAULT_SCHEDULE, GPIPE
from placewise.run.choices import ASYNC, PIPELINE


# Microbatches per step when neither the command line nor the plan says.
DEFAULT_MICROBATCHES = 4


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
    plan.check_made_for(args.model, args.plan, "model")
    job = PipelineJob(model=args.model, batch_size=args.batch_size, mapping=mapping_from_plan(plan),
                      recompute=plan.recomputed(),
                      replicas=tuple(stage.replicas for stage in plan.stages), plan_name=str(args.plan),
                      input_shape=tuple(args.input_shape) if args.input_shape else None, mode=mode,
                      schedule=train_schedule(args, plan), microbatches=train_microbatches(args, plan), steps=args.steps,
                      warmup=1, lr=getattr(args, "lr", 0.0), optimizer=getattr(args, "optimizer", "sgd"),
                      momentum=getattr(args, "momentum", 0.0), fuse=getattr(args, "fuse", "none"),
                      seed=getattr(args, "seed", 0), progress=not args.json and sys.stderr.isatty())
    return plan, job


def train_schedule(args, plan=None) -> str:
    """--schedule, else the schedule the plan was made for, else the default (serve-bench: GPipe, forward only)."""
    if not hasattr(args, "schedule"):
        return GPIPE
    return args.schedule or (plan.schedule.kind if plan is not None and plan.schedule else DEFAULT_SCHEDULE)


def train_microbatches(args, plan=None) -> int:
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
        plan.check_made_for(graph.name, args.plan)
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
            if not args.json:  # --json prints only the report
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
        plan = load_plan(args.plan)
        plan.check_made_for(args.model, args.plan, "model")
        replicated = next(((s, st.replicas) for s, st in enumerate(plan.stages) if st.replicas > 1), None)
        if replicated:
            raise PlacewiseError(f"--mode {mode} with --plan {args.plan}: its stage {replicated[0]} has "
                                 f"{replicated[1]} replicas, which only a single pipeline runs (data-parallel "
                                 "workers run each stage once); drop --workers/--mode, or plan without replicas")
        if plan.recomputed():
            raise PlacewiseError(f"--mode {mode} with --plan {args.plan}: its stages {list(plan.recomputed())} recompute "
                                 "their activations, which only a single pipeline runs; drop --workers/--mode, or plan "
                                 "with --no-recompute")
        mapping = mapping_from_plan(plan)
    checkpoint = args.checkpoint
    if checkpoint is None and args.checkpoint_every and args.out:
        checkpoint = str(Path(args.out) / "checkpoint.pt")
    cfg = TrainConfig(model=args.model, mode=mode, workers=2 if args.workers is None else args.workers,
                      servers=args.servers, n_push=args.n_push, n_fetch=args.n_fetch, staleness=args.staleness,
                      dataset=args.dataset, steps=None if args.epochs is not None else args.steps,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                      momentum=args.momentum, fuse=args.fuse, seed=args.seed, threads=args.threads,
                      checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
                      progress=not args.json and sys.stderr.isatty(), mapping=mapping, schedule=train_schedule(args),
                      microbatches=train_microbatches(args), transport=args.transport,
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


def cmd_serve_bench(args) -> int:
    return _run_pipeline_job(args, "infer")


def cmd_demo(args) -> int:
    from placewise.demo import DemoSettings, run_demo
    run_demo(DemoSettings(out=Path(args.out), quick=args.quick))
    return 0
