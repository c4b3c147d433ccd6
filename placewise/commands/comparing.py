"""`placewise compare`: the exact planner and every baseline on one graph, as a table or a chart."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

from placewise.commands.common import load_graph_from_args, cluster_from_args, check_time_limit
from placewise.console import console as rich_console
from placewise.errors import PlacewiseError, dump_json


COMPARE_TIME_LIMIT = 60.0  # seconds per method, for those that take a limit (ip, local-search)


def cmd_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from placewise.plan import SolveOptions, get_entry
    from placewise.pictures import plot_comparison
    from placewise.plan.compare import compare
    graph = load_graph_from_args(args)
    cluster = cluster_from_args(args, graph)
    check_time_limit(args)
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise PlacewiseError(f"--plot {args.plot}: the chart is a PNG; give a file name ending in .png")
    if args.expert:
        from placewise.plan import load_split
        load_split(args.expert, graph)  # a bad file is one line now, not a table row after every solver ran
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
    console = rich_console()
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
