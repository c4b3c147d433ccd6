"""What a pipelined run measured, per stage and in total, next to what the planner predicted.

Measured stage time is the time a stage spent computing its chunks (forward, and backward when
training), not waiting for its neighbours, as wall time and as the computing thread's CPU time (what
a one-thread profile measures, unaffected by other processes on the cores); the total is wall time
per step. Both are given per
sample in milliseconds. The planner's loads are in the graph's time unit (profiled graphs: ms per
profiled batch); with the profiled batch size known they are also given per sample.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence


def pipeline_report(results: Sequence[dict[str, Any]], *, plan=None, batch_size: int, mode: str, schedule: str,
                    microbatches: int, profiled_batch: int | None = None, time_unit: str | None = None,
                    profiled_mode: str | None = None) -> dict:
    """A plain-data report (JSON-ready) from the per-rank results of `run_stage`/`run_single`."""
    stages = []
    for r in results:
        compute = r.get("forward_seconds", 0.0) + r.get("backward_seconds", 0.0)
        timed = "forward_seconds" in r
        # A replicated stage reports through its lead: its time includes waiting for the other replicas.
        row = {"stage": r["stage"], "replicas": r.get("replicas", 1), "nodes": len(r.get("nodes", [])),
               "measured_ms_per_sample": 1e3 * compute / r["samples"] if timed else None,
               "measured_cpu_ms_per_sample": 1e3 * r["cpu_seconds"] / r["samples"] if timed else None}
        if plan is not None:
            s = plan.stages[r["stage"]]
            row.update(device=f"{s.kind}:{s.index}" + (f" x{s.replicas}" if s.replicas > 1 else ""), predicted_load=s.load)
            if profiled_batch:
                row["predicted_ms_per_sample"] = s.load / profiled_batch
        stages.append(row)
    # Every rank steps in lockstep; the last stage's step ends last.
    step_seconds = statistics.median(results[-1]["step_seconds"])
    report: dict[str, Any] = {
        "mode": mode, "schedule": schedule if len(results) > 1 else "none (one process)", "stages": stages,
        "batch_size": batch_size, "microbatches": microbatches, "steps": len(results[-1]["step_seconds"]),
        "median_step_seconds": step_seconds,
        "measured_ms_per_sample": 1e3 * step_seconds / batch_size,
        "samples_per_second": batch_size / step_seconds,
        "losses": results[-1].get("losses", []),
    }
    measured = [row["measured_ms_per_sample"] for row in stages if row["measured_ms_per_sample"] is not None]
    if measured:
        report["measured_max_stage_ms_per_sample"] = max(measured)
    if plan is not None:
        report.update(predicted_max_load=plan.max_load, time_unit=time_unit or "the graph's time unit",
                      profiled_batch=profiled_batch, profiled_mode=profiled_mode)
        if profiled_batch:
            report["predicted_ms_per_sample"] = plan.max_load / profiled_batch
        report.update(_predicted_step(plan, schedule, microbatches, batch_size, len(results)))
    share = _core_share(results)
    if share is not None:
        report["core_share"] = share
    return report


def _predicted_step(plan, schedule: str, microbatches: int, batch_size: int, stages: int) -> dict[str, Any]:
    """The plan's simulated step (`plan --schedule`) for the schedule run, in ms, where the plan has one."""
    from placewise.plan.predict import TIME_UNITS, simulate_plan
    from placewise.plan.schedule import Schedule
    recorded = plan.notes.get("prediction") or {}
    unit = recorded.get("time_unit")
    if not recorded or unit not in TIME_UNITS or stages != len(plan.stages):
        return {}
    step_ms = 1e3 * TIME_UNITS[unit] * simulate_plan(plan, Schedule(schedule, microbatches)).step_time
    return {"predicted_step_ms": step_ms, "predicted_step_ms_per_sample": step_ms / batch_size}


def _core_share(results: Sequence[dict[str, Any]]) -> float | None:
    """The share of a core the stages' computing threads got: their CPU time over their wall time while
    computing (below 1 when other work shares the cores)."""
    wall = sum(r.get("forward_seconds", 0.0) + r.get("backward_seconds", 0.0) for r in results)
    return sum(r.get("cpu_seconds", 0.0) for r in results) / wall if wall > 0 else None


def print_report(report: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in ("stage", "device", "nodes", "measured ms/sample", "cpu ms/sample", "predicted load",
                "predicted ms/sample"):
        table.add_column(col, justify="left" if col == "device" else "right")

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.4g}"

    for row in report["stages"]:
        table.add_row(str(row["stage"]), row.get("device", "-"), str(row["nodes"]), fmt(row["measured_ms_per_sample"]),
                      fmt(row["measured_cpu_ms_per_sample"]), fmt(row.get("predicted_load")),
                      fmt(row.get("predicted_ms_per_sample")))
    console = Console(stderr=False)
    console.print(table)
    line = (f"{report['mode']}, schedule {report['schedule']}, batch {report['batch_size']} in "
            f"{report['microbatches']} microbatch(es), {report['steps']} timed step(s): "
            f"[bold]{report['measured_ms_per_sample']:.4g} ms/sample[/bold] "
            f"({report['samples_per_second']:.4g} samples/s)")
    if "measured_max_stage_ms_per_sample" in report:
        line += f"; busiest stage {report['measured_max_stage_ms_per_sample']:.4g} ms/sample"
    console.print(line)
    if "predicted_max_load" in report:
        pred = f"planner's max-load {report['predicted_max_load']:.6g} ({report['time_unit']}"
        pred += f" per batch of {report['profiled_batch']})" if report.get("profiled_batch") else ")"
        if "predicted_ms_per_sample" in report:
            pred += f" = [bold]{report['predicted_ms_per_sample']:.4g} ms/sample[/bold]"
        if report.get("profiled_mode") == "eval" and report["mode"] == "train":
            pred += " [yellow](the graph times forward only; profile with --training to predict training)[/yellow]"
        console.print(pred)
    if "predicted_step_ms" in report:
        console.print(f"predicted step (simulated {report['schedule']}: fill, drain, transfers) "
                      f"[bold]{report['predicted_step_ms_per_sample']:.4g} ms/sample[/bold]; the stages got "
                      f"{report.get('core_share', 1.0):.0%} of a core while computing")
    if report["losses"]:
        console.print(f"loss: first {report['losses'][0]:.5g}, last {report['losses'][-1]:.5g}")


def profiled_batch(graph) -> int | None:
    """The batch size a profiled graph was timed at (its first input's leading size), if it says."""
    import re
    found = re.match(r"\s*\[(\d+)", graph.meta_dict.get("inputs", ""))
    return int(found.group(1)) if found else None
