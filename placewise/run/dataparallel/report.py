"""What a data-parallel run reports: a `TrainReport`, its files and its table."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from placewise.errors import dump_json
from placewise.run.choices import ASYNC


@dataclass
class TrainReport:
    mode: str
    model: str
    parameters: int
    workers: int
    servers: int
    updates: int
    seconds: float
    updates_per_s: float
    final_loss: float
    test_accuracy: float
    mean_staleness: float
    max_staleness: int
    lost_workers: dict[int, str]
    resumed_from: int | None
    curve: list[tuple[int, float, float]] = field(default_factory=list)   # (update, seconds, test accuracy)
    history: list[dict[str, Any]] = field(default_factory=list)            # one entry per update (server 0's)
    stages: int = 1                                                        # processes per worker (pipelines)
    worker_ranks: list[list[int]] = field(default_factory=list)            # each worker's ranks, by stage
    # Pipeline workers: the staleness of every push that stage s's (first) server applied, per stage.
    stage_staleness: list[list[int]] = field(default_factory=list)
    dropped: int = 0   # sync with backup workers: pushes that came after their round closed, discarded
    final_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the trained model's
    # Each time the parameter server died and was restarted from its checkpoint: the update it died at,
    # the one it resumed from, and the updates lost between them (recovery.py).
    server_restarts: list[dict[str, int]] = field(default_factory=list)

    @property
    def lost_updates(self) -> int:
        return sum(r["lost_updates"] for r in self.server_restarts)

    def time_to_accuracy(self, target: float) -> float | None:
        """Seconds (since serving began) of the first snapshot at `target` test accuracy, if any."""
        return next((t for _, t, acc in self.curve if acc >= target), None)

    @property
    def staleness(self) -> list[int]:
        """Staleness of every push (of every stage's server, for pipeline workers)."""
        if self.stage_staleness:
            return [v for values in self.stage_staleness for v in values]
        return [u["staleness"] for u in self.history if u["worker"] >= 0]

    def to_dict(self, with_history: bool = False) -> dict[str, Any]:
        d = asdict(replace(self, final_state={}))
        d.pop("final_state")
        if not with_history:
            d.pop("history")
        return d


def write_outputs(report: TrainReport, out: str | Path) -> list[Path]:
    """`report.json` (with the per-update history) and, for async runs, `staleness.png` in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    written[0].write_text(dump_json(report.to_dict(with_history=True), indent=1))
    if report.mode == ASYNC and report.staleness:
        runs = ({f"stage {s} of {report.workers} pipelines": values for s, values in enumerate(report.stage_staleness)}
                if report.stage_staleness else {f"{report.workers} workers": report.staleness})
        from placewise.pictures import plot_staleness
        written.append(plot_staleness(runs, out / "staleness.png"))
    return written


def print_report(report: TrainReport) -> None:
    """The final report as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table
    workers = f"{report.workers} worker(s)" + (f" of {report.stages} pipeline stages each"
                                                if report.stage_staleness else "")
    table = Table(title=f"{report.mode} training of {report.model} ({report.parameters:,} parameters), "
                        f"{workers}" + (f", {report.servers} server(s)" if report.servers else ""))
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("updates" + (" (per stage server)" if report.stage_staleness else ""),
             f"{report.updates}" + (f" (resumed at {report.resumed_from})"
                                                  if report.resumed_from is not None else "")),
            ("seconds", f"{report.seconds:.2f}"), ("updates/s", f"{report.updates_per_s:.1f}"),
            ("final training loss", f"{report.final_loss:.4f}"), ("test accuracy", "none (regression targets)" if math.isnan(report.test_accuracy)
                                               else f"{report.test_accuracy:.2%}")]
    if report.mode == ASYNC:
        rows += [("mean staleness", f"{report.mean_staleness:.2f}"), ("max staleness", str(report.max_staleness))]
        for stage, values in enumerate(report.stage_staleness):
            rows.append((f"stage {stage}: pushes, mean / max staleness",
                         f"{len(values)}, {sum(values) / len(values):.2f} / {max(values)}" if values else "no server"))
    for target in (0.9, 0.95):
        t = report.time_to_accuracy(target)
        rows.append((f"seconds to {target:.0%} test accuracy", f"{t:.2f}" if t is not None else "not reached"))
    if report.dropped:
        rows.append(("late pushes dropped (backup workers)", str(report.dropped)))
    rows.append(("workers lost", "; ".join(f"rank {r}: {m}" for r, m in report.lost_workers.items()) or "none"))
    if report.server_restarts:
        rows.append(("server restarts (died at -> resumed from)",
                     ", ".join(f"{r['died_at']} -> {r['resumed_at']}" for r in report.server_restarts)
                     + f"; {report.lost_updates} update(s) lost"))
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 120).print(table)
