"""A plan's prediction for the command line and the demo: printed, replayed, drawn over a measured run.

The numbers come from `plan.predict` (recorded in a plan by `with_prediction`) and `plan.simulate`;
this module only shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from placewise.console import console, fmt_bytes
from placewise.plan.plan import Plan
from placewise.plan.predict import TIME_UNITS, simulate_plan
from placewise.plan.schedule import Schedule


def _unit(plan: Plan) -> str:
    return (plan.notes.get("prediction") or {}).get("time_unit") or ""


def _ms_per_unit(plan: Plan) -> float:
    unit = _unit(plan)
    return 1e3 * TIME_UNITS[unit] if unit in TIME_UNITS else 1.0


def print_prediction(plan: Plan) -> None:
    """The plan's predicted step under its schedule against the steady state, and each stage's memory
    at its position."""
    pred = plan.notes.get("prediction")
    if not pred:
        return
    unit = f" {_unit(plan)}".rstrip()
    schedule = pred["schedule"]
    steady = pred["max_load"] * schedule["microbatches"]
    out = console()
    out.print(f"{schedule['kind']} with {schedule['microbatches']} microbatches: predicted step "
              f"[bold]{pred['step_time']:.6g}[/bold]{unit} (steady state {steady:.6g}{unit}, bubble "
              f"{100 * pred['bubble']:.0f}%; simulated: fill, drain, transfers)")
    if pred.get("stage_memory"):
        out.print("memory at each position: " + ", ".join(
            f"stage {i}: {fmt_bytes(mem['total'])} ({mem['in_flight']} in flight"
            f"{f', each of {stage.replicas} replicas at most' if stage.replicas > 1 else ''})"
            for i, (mem, stage) in enumerate(zip(pred["stage_memory"], plan.stages))))


def simulate_report(plan: Plan, name: str, kind: str | None = None, microbatches: int | None = None,
                    picture: str | Path | None = None) -> dict[str, Any]:
    """Replay the plan's prediction (another schedule kind or microbatch count if given), drawing one
    steady step to `picture`; the figures as plain data."""
    schedule = plan.schedule
    if kind or microbatches:
        base = schedule or Schedule()
        schedule = Schedule(kind or base.kind, microbatches or base.microbatches)
    sim = simulate_plan(plan, schedule)
    schedule = schedule or Schedule.from_json(plan.notes["prediction"]["schedule"])
    if picture:
        from placewise.pictures import draw_timeline
        draw_timeline(None, picture, f"{name}: {schedule.kind}, {schedule.microbatches} microbatches, predicted step "
                      f"{sim.step_time:.4g} {_unit(plan)}", predicted=sim, predicted_scale=_ms_per_unit(plan))
    return {"schedule": schedule.to_json(), "step_time": sim.step_time, "first_step": sim.first_step,
            "bubble": sim.bubble, "busy": list(sim.busy), "time_unit": _unit(plan)}


def draw_predicted_and_measured(plan: Plan, model: str, kind: str, microbatches: int, batch_size: int,
                                results: Sequence[dict], path: str | Path) -> Path:
    """The measured step's timeline, under the plan's predicted one where the plan has a prediction."""
    from placewise.pictures import draw_timeline
    predicted = simulate_plan(plan, Schedule(kind, microbatches)) if plan.notes.get("prediction") else None
    return draw_timeline(list(results), path, f"{model}: {kind}, {microbatches} microbatches of "
                         f"{batch_size // microbatches}", predicted=predicted, predicted_scale=_ms_per_unit(plan))
