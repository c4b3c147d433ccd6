"""`placewise evaluate`, `plan`, `simulate` and `export`: a graph and a cluster in, a plan out (or a plan in)."""

from __future__ import annotations

import sys
from pathlib import Path

from placewise.commands.common import load_graph_from_args, cluster_from_args, check_time_limit, emit_plan
from placewise.errors import PlacewiseError, dump_json


def cmd_evaluate(args) -> int:
    from placewise.errors import read_json
    from placewise.plan import load_split
    from placewise.plan.recompute import split_recomputed
    from placewise.plan.replicas import replicated_plan, split_replicas
    graph = load_graph_from_args(args)
    cluster = cluster_from_args(args, graph)
    assignment = load_split(args.split, graph)
    # A placewise plan's replicated stages are scored as such (with the all-reduce model it records).
    data = read_json(args.split, "split file")
    replicas, allreduce = split_replicas(data)
    recomputed = split_recomputed(data)
    if replicas and recomputed:
        raise PlacewiseError(f"{args.split}: a plan with both replicated and recomputed stages cannot be scored yet; "
                             "plan with --no-recompute or without --max-replicas")
    if recomputed:  # a dp-schedule plan's recomputed stages pay their forward again, as planned
        from placewise.plan.plan import plan_from_assignment
        from placewise.plan.recompute import evaluate_recomputed
        ev = evaluate_recomputed(graph, cluster, assignment, recomputed, contiguous=not args.noncontiguous,
                                 replicate=not args.no_replicate)
        plan = plan_from_assignment(graph, cluster, assignment, solver=f"split:{Path(args.split).name}", seconds=0.0,
                                    objective=args.objective, contiguous=not args.noncontiguous,
                                    replicate=not args.no_replicate, evaluation=ev)
    else:
        plan = replicated_plan(graph, cluster, assignment, replicas, allreduce, solver=f"split:{Path(args.split).name}",
                               seconds=0.0, objective=args.objective, contiguous=not args.noncontiguous,
                               replicate=not args.no_replicate)
    emit_plan(plan, args, f"{graph.name}: {Path(args.split).name}")
    return 0 if plan.feasible else 1


def cmd_plan(args) -> int:
    from placewise.plan import SolveOptions, solve
    graph = load_graph_from_args(args)
    cluster = cluster_from_args(args, graph)
    check_time_limit(args)
    options = SolveOptions(objective=args.objective, contiguous=not args.noncontiguous, time_limit=args.time_limit,
                           gap=args.gap, seed=args.seed, progress=not args.json and sys.stderr.isatty(),
                           replicate=not args.no_replicate)
    schedule = schedule_from_args(args)
    scale = microbatch_scale(args, graph)
    if args.solver == "dp-schedule":
        from placewise.plan import get_entry
        if schedule is None:
            raise PlacewiseError("--solver dp-schedule plans for a schedule; give --microbatches M (and --schedule)")
        options = get_entry("dp-schedule").options(options, schedule=schedule, microbatch_scale=scale,
                                                   recompute=not args.no_recompute)
    elif args.no_recompute:
        raise PlacewiseError(f"--no-recompute: only --solver dp-schedule chooses recompute; --solver {args.solver} "
                             "never does, so drop the flag")
    options = replica_options(args, options, None if schedule is None else schedule.microbatches * scale)
    plan = solve(graph, cluster, args.solver, options)
    if schedule is not None:
        from placewise.plan.predict import with_prediction
        plan = with_prediction(graph, cluster, plan, schedule, microbatch_scale=scale)
    emit_plan(plan, args, f"{graph.name}: {plan.solver} plan on {cluster.accelerators} accelerator(s), {cluster.cpus} CPU(s)")
    if args.explain and not args.json:
        from placewise.console import print_explanation
        print_explanation(plan)
    if not args.json and schedule is not None:
        from placewise.predicted import print_prediction
        print_prediction(plan)
    return 0


def replica_options(args, options, step_units: float | None):
    """The solver's options with `--max-replicas`/`--allreduce`: the dp and the ip choose replicas,
    pipedream-hybrid takes the all-reduce model; any other solver refuses them. A step of the schedule
    holds `step_units` profiled batches (None: no schedule, one per replica)."""
    from placewise.plan import get_entry
    from placewise.plan.allreduce import PIPEDREAM, RING, AllReduce
    hybrid = args.solver == "pipedream-hybrid"
    from placewise.plan.options import ReplicaOptions
    chooses = issubclass(get_entry(args.solver).options_type, ReplicaOptions)
    if (args.max_replicas > 1 and not chooses) or (args.allreduce and not chooses and not hybrid):
        raise PlacewiseError(f"--max-replicas/--allreduce: --solver {args.solver} gives each stage one device; only "
                             "--solver dp or ip chooses replicated stages (pipedream-hybrid its own), so use "
                             "--solver dp")
    if args.max_replicas == 1 and not hybrid:
        return options
    allreduce = AllReduce(args.allreduce or (PIPEDREAM if hybrid else RING), step_units)
    specific = {"allreduce": allreduce} if hybrid else {"max_replicas": args.max_replicas, "allreduce": allreduce}
    return get_entry(args.solver).options(options, **specific)


def schedule_from_args(args):
    """The schedule `--schedule`/`--microbatches` ask for; None when neither is given."""
    if args.microbatches is None and args.schedule is None:
        return None
    from placewise.plan.schedule import DEFAULT_SCHEDULE, Schedule
    return Schedule(args.schedule or DEFAULT_SCHEDULE, args.microbatches or 1)


def microbatch_scale(args, graph) -> float:
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
