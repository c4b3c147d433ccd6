"""Pictures of plans and runs (matplotlib, written to files). The backend is chosen by the caller:
the CLI selects Agg, so no display is needed."""

from __future__ import annotations

import math
from pathlib import Path

from placewise.errors import PlacewiseError
from placewise.graph import OpGraph
from placewise.plan import Plan
from placewise.plan.compare import Comparison


def _pyplot():
    # The backend is the caller's choice (the CLI picks Agg); imported late, as only pictures need it.
    import matplotlib.pyplot as plt
    return plt


def _colours(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def draw_graph(graph: OpGraph, plan: Plan, path: str | Path, title: str = "") -> Path:
    """The forward operator graph laid out by depth, each node coloured by its stage's device."""
    plt = _pyplot()
    forward = [i for i in graph.topological_order if not graph.is_backward[i]]
    depth: dict[int, int] = {}
    for i in forward:
        depth[i] = 1 + max((depth[p] for p in graph.pred[i] if p in depth), default=-1)
    rows: dict[int, int] = {}
    for i in forward:
        rows[i] = sum(1 for j in rows if depth[j] == depth[i])
    # Long chains wrap onto several bands, like lines of text, so the picture stays readable.
    per_band = 40
    band_height = max(rows.values()) + 2
    bands = max(depth.values()) // per_band + 1
    x = {i: depth[i] % per_band for i in forward}
    y = {i: -(depth[i] // per_band) * band_height - rows[i] for i in forward}
    stage_of = {n: k for k, s in enumerate(plan.stages) for n in s.nodes}
    colours = _colours(len(plan.stages))
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.35 * bands * band_height + 1.5)))
    for i in forward:
        for j in graph.succ[i]:
            if j in depth and depth[j] // per_band == depth[i] // per_band:
                ax.plot([x[i], x[j]], [y[i], y[j]], color="0.7", lw=0.6, zorder=1)
    for k, stage in enumerate(plan.stages):
        members = [i for i in forward if stage_of.get(graph.nodes[i].id) == k]
        ax.scatter([x[i] for i in members], [y[i] for i in members], s=36, color=colours[k], zorder=2,
                   edgecolors="black", linewidths=0.4, label=f"stage {k}: {stage.kind}:{stage.index}")
    ax.set_xlabel(f"operators in data-flow order, left to right, {per_band} per band, bands top to bottom")
    ax.set_yticks([])
    ax.set_title(title or f"{graph.name}: operators coloured by device ({plan.solver})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def draw_loads(plan: Plan, path: str | Path, lower_bound: float | None = None, title: str = "") -> Path:
    """Per-device load (compute and transfer stacked) against the max-load and a lower bound."""
    plt = _pyplot()
    labels = [f"{s.kind}:{s.index}" for s in plan.stages]
    compute = [s.compute for s in plan.stages]
    transfer = [s.transfer for s in plan.stages]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2) + 3, 4))
    ax.bar(labels, compute, color="#4c72b0", label="compute")
    ax.bar(labels, transfer, bottom=compute, color="#dd8452", label="transfer")
    ax.axhline(plan.max_load, color="black", ls="--", lw=1, label=f"max-load {plan.max_load:.4g}")
    if lower_bound is not None:
        ax.axhline(lower_bound, color="green", ls=":", lw=1.2, label=f"perfect balance (a lower bound) {lower_bound:.4g}")
    ax.set_ylabel("load (the graph's time unit)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    ax.set_title(title or f"{plan.graph}: per-device load ({plan.solver})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def draw_training_curves(history: list[dict], curve: list[tuple[int, float, float]], path: str | Path,
                         title: str = "") -> Path:
    """Training loss of each update (by worker) and test accuracy of the snapshots, against the update count."""
    plt = _pyplot()
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    workers = sorted({u["worker"] for u in history if u.get("worker", -1) >= 0})
    colours = _colours(max(1, len(workers)))
    for k, w in enumerate(workers):
        points = [(u["version"], u["loss"]) for u in history if u.get("worker") == w]
        loss_ax.plot(*zip(*points), ".", ms=3, alpha=0.6, color=colours[k], label=f"loss, pushes of worker {w}")
    loss_ax.set_xlabel("server update")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    acc_ax = loss_ax.twinx()
    if curve:
        acc_ax.plot([c[0] for c in curve], [c[2] for c in curve], "-", color="black", lw=1.5, label="test accuracy")
    acc_ax.set_ylabel("test accuracy")
    acc_ax.set_ylim(0, 1.02)
    lines = loss_ax.get_legend_handles_labels()
    more = acc_ax.get_legend_handles_labels()
    loss_ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    loss_ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# Bars of a timeline: (stage, kind, microbatch, start ms, end ms).
Bar = tuple[int, str, int, float, float]
TIMELINE_COLOURS = {"forward": "#4c72b0", "backward": "#dd8452", "update": "#55a868", "allreduce": "#8172b3",
                    "send-forward": "#c6d4ea",
                    "send-backward": "#f4d6c2"}


def _measured_bars(stage_reports: list[dict]) -> list[Bar]:
    """The last timed step of a measured run, in ms from its start (the machine's monotonic clock,
    shared by all local processes)."""
    t0 = min(r["step_starts"][-1] for r in stage_reports)
    return [(r["stage"], kind, chunk, 1e3 * (start - t0), 1e3 * (end - t0))
            for r in stage_reports for kind, chunk, start, end in r["events"] if start >= r["step_starts"][-1]]


def _simulated_bars(simulation, scale: float) -> list[Bar]:
    """A steady step of a simulation (the second to last: the pipeline has settled), from its start."""
    step = max(e.step for e in simulation.events) - 1
    events = simulation.step_events(step)
    t0 = min(e.start for e in events)
    return [(e.stage, e.kind, e.microbatch, scale * (e.start - t0), scale * (e.end - t0)) for e in events]


def _gantt(ax, bars: list[Bar], title: str) -> None:
    for stage, kind, chunk, start, end in bars:
        # A transfer is drawn as a thin bar under its sender's row.
        row, height = (stage + 0.4, 0.15) if kind.startswith("send") else (stage, 0.6)
        ax.barh(row, end - start, left=start, height=height, color=TIMELINE_COLOURS[kind], edgecolor="black",
                linewidth=0.3)
        if chunk >= 0 and not kind.startswith("send"):
            ax.text((start + end) / 2, stage, str(chunk), ha="center", va="center", fontsize=7, color="white")
    stages = sorted({b[0] for b in bars})
    ax.set_yticks(stages)
    ax.set_yticklabels([f"stage {s}" for s in stages])
    ax.set_ylim(max(stages) + 0.7 if stages else 1, -0.6)
    ax.set_title(title, fontsize=10)
    kinds = [k for k in TIMELINE_COLOURS if any(b[1] == k and b[4] > b[3] for b in bars)]
    ax.legend([_pyplot().Rectangle((0, 0), 1, 1, color=TIMELINE_COLOURS[k]) for k in kinds], kinds,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)


def draw_timeline(stage_reports: list[dict] | None, path: str | Path, title: str = "", *, predicted=None,
                  predicted_scale: float = 1.0) -> Path:
    """A Gantt chart of one training step: each stage's forward and backward chunk per microbatch.

    `stage_reports` are the per-stage results of a pipelined run (measured); `predicted` a
    `plan.simulate.Simulation` of the plan (its times times `predicted_scale` give ms). With both,
    the prediction is drawn above the measurement on one time axis.
    """
    plt = _pyplot()
    panels = []
    if predicted is not None:
        panels.append((_simulated_bars(predicted, predicted_scale), "predicted (simulated schedule)"))
    if stage_reports:
        panels.append((_measured_bars(stage_reports), "measured"))
    rows = sum(len({b[0] for b in bars}) for bars, _ in panels)
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, figsize=(11, 0.7 * rows + 1.2 * len(panels) + 0.6))
    for ax, (bars, label) in zip(axes[:, 0], panels):
        _gantt(ax, bars, label)
    axes[-1, 0].set_xlim(0, max((b[4] for bars, _ in panels for b in bars), default=1.0))
    axes[-1, 0].set_xlabel("milliseconds since the step began (numbers: microbatch)")
    fig.suptitle(title or "pipeline timeline of one training step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_staleness(runs: dict[str, list[int]], path: str | Path) -> Path:
    """A histogram of push staleness per run (label -> staleness values), written as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    top = max((max(v, default=0) for v in runs.values()), default=0)
    bins = [b - 0.5 for b in range(top + 2)]
    for label, values in runs.items():
        mean = sum(values) / max(1, len(values))
        # Shares, not counts: runs of different lengths compare on one scale.
        ax.hist(values, bins=bins, alpha=0.6, weights=[1 / max(1, len(values))] * len(values),
                label=f"{label} (mean {mean:.2f}, {len(values)} pushes)")
    ax.set_xlabel("staleness (server updates since the worker fetched)")
    ax.set_ylabel("share of pushes")
    ax.set_ylim(0, 1.35)  # room for the legend above the bars
    ax.set_xticks(range(top + 1))
    ax.set_title("Staleness of asynchronous pushes")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(result: Comparison, path: str | Path, title: str | None = None) -> None:
    """A horizontal bar chart of each method's value (PNG)."""
    plt = _pyplot()

    rows = [r for r in result.rows if r.value is not None and math.isfinite(r.value)]
    failed = [r.method for r in result.rows if r not in rows]
    if not rows:
        raise PlacewiseError("no method produced a plan, so there is nothing to plot; see the table for why")
    best = result.best
    label = "max-load (time per sample)" if result.objective == "throughput" else "latency"
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    names = [r.method + ("" if r.contiguous else "*") + ("" if r.feasible else " (infeasible)") for r in rows]
    colors = ["#2a9d8f" if best is not None and r is best else ("#457b9d" if r.feasible else "#bbbbbb") for r in rows]
    bars = ax.barh(range(len(rows)), [r.value for r in rows], color=colors)
    for bar, r in zip(bars, rows):
        if not r.feasible:
            bar.set_hatch("//")
        text = f" {r.value:.4g}" + (f"  ({r.ratio:.3f}x)" if r.ratio is not None else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), names, fontsize=9)
    ax.invert_yaxis()
    starred = "; * not contiguous" if any(not r.contiguous for r in rows) else ""
    ax.set_xlabel(f"{label}, lower is better (x: over the best feasible){starred}")
    ax.set_xlim(0, max(r.value for r in rows) * 1.3)
    note = f"; not shown (no plan or no value): {', '.join(failed)}" if failed else ""
    ax.set_title(title or f"{result.graph}: {label} by method{note}", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
