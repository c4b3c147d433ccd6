"""The planner's one progress display: a transient rich line on stderr (stdout stays for results)."""

from __future__ import annotations


class ProgressLine:
    """`label: description`, a bar with done/total when the total is known, and the elapsed time."""

    def __init__(self, label: str, description: str, total: int | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        columns = [TextColumn(f"[bold]{label}[/bold] {{task.description}}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        self._progress = Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def update(self, *, completed: int | None = None, description: str | None = None) -> None:
        self._progress.update(self._task, completed=completed, description=description)

    def close(self) -> None:
        self._progress.stop()


def progress_line(enabled: bool, label: str, description: str, total: int | None = None) -> ProgressLine | None:
    """A progress line, or None when progress is off (the callers skip their updates then)."""
    return ProgressLine(label, description, total) if enabled else None
