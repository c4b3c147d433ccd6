"""Rich printing shared by the CLI and the demo: the console, byte sizes, and a plan's table."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from placewise.plan import Plan


def console(width: int = 140) -> "Console":
    """A rich console on stdout; a fixed width when piped, so tables do not wrap at 80 columns."""
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else width)


def fmt_bytes(b: float) -> str:
    """`b` bytes in B, KB, MB, GB or TB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1024 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def nodes_text(nodes: list[int]) -> str:
    """The first dozen node ids, and how many there are in all."""
    text = ", ".join(map(str, nodes[:12]))
    return text + (f", ... ({len(nodes)} in all)" if len(nodes) > 12 else "")


def print_plan(plan: Plan, title: str) -> None:
    """A plan as a table of its stages, then its objective's value, solver and bound."""
    from rich.table import Table
    table = Table(title=title)
    replicated = any(s.replicas > 1 for s in plan.stages)
    # A replicated plan also shows each stage's replicas and its share of the all-reduce (per device).
    # A plan with recomputed stages shows each one's forward run again in its backward (part of its load).
    recompute = any(s.recompute for s in plan.stages)
    columns = ("stage", "device", "load", "compute", "transfer") + (("all-reduce", "replicas") if replicated else ()) \
        + (("recompute",) if recompute else ()) + ("memory", "nodes")
    for col in columns:
        table.add_column(col, justify="left" if col in ("stage", "device", "nodes") else "right")
    for i, s in enumerate(plan.stages):
        device = f"{s.kind}:{s.index}" + (f"..{s.index + s.replicas - 1}" if s.replicas > 1 else "")
        shared = (f"{s.allreduce:.6g}", str(s.replicas)) if replicated else ()
        recomputed = (f"{s.recompute_time:.6g}" if s.recompute else "-",) if recompute else ()
        table.add_row(str(i), device, f"{s.load:.6g}", f"{s.compute:.6g}", f"{s.transfer:.6g}", *shared, *recomputed,
                      fmt_bytes(s.memory), nodes_text(s.nodes))
    out = console()
    out.print(table)
    # The objective's value in bold; a latency objective with no latency says why.
    on_latency = plan.objective == "latency"
    line = f"max-load {'' if on_latency else '[bold]'}{plan.max_load:.10g}{'' if on_latency else '[/bold]'}"
    if plan.latency is not None:
        line += f"   latency {'[bold]' if on_latency else ''}{plan.latency:.10g}{'[/bold]' if on_latency else ''}"
    elif on_latency:
        line += "   latency [red]none[/red] (accelerator blocks wait on each other in a cycle)"
    line += f"   solver {plan.solver}   {plan.seconds:.3f} s"
    if plan.lower_bound is not None:
        line += f"   lower bound {plan.lower_bound:.10g}"
    if plan.gap is not None:
        line += f"   gap {100 * plan.gap:.3g}%"
    out.print(line)
    if not plan.feasible:
        out.print(f"[red]infeasible:[/red] {'; '.join(plan.violations)}")


# Notes that say what the planner reduced and where its bound came from, in the order shown.
_EXPLAINED = ("replicated_nodes", "replicated", "replicated_time", "dead_end_checks_attached", "units_before_replication",
              "units_after_replication", "ideals_before_replication", "ideals_after_replication", "units", "ideals",
              "restricted", "work_lower_bound", "upper_bound", "beyond_ideal_limit", "stopped", "replication",
              "max_replicas", "allreduce")


def print_explanation(plan: Plan) -> None:
    """The plan's notes on replication, units, ideals and bounds, one per line (`plan --explain`)."""
    out = console()
    shown = [(k, plan.notes[k]) for k in _EXPLAINED if k in plan.notes]
    recomputed = [f"{i} ({s.kind}:{s.index})" for i, s in enumerate(plan.stages) if s.recompute]
    if recomputed:
        shown.append(("recompute", f"stage(s) {', '.join(recomputed)} do not fit their device at their position "
                      "without it: they keep only their input and output per microbatch in flight and run their "
                      "forward again in their backward"))
    if not shown:
        out.print("nothing to explain: no replication, restriction or bound notes")
    for key, value in shown:
        out.print(f"[bold]{key.replace('_', ' ')}[/bold]: {value}")
