"""A small sparse MILP builder, and one silent HiGHS run with an optional progress line."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from placewise.plan.progress import progress_line


@dataclass
class Milp:
    """Columns and rows collected as numpy blocks, handed to HiGHS in one `passModel`."""

    lower: list[np.ndarray] = field(default_factory=list)
    upper: list[np.ndarray] = field(default_factory=list)
    cost: list[np.ndarray] = field(default_factory=list)
    integer: list[np.ndarray] = field(default_factory=list)
    n_cols: int = 0
    entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # (row, col, value)
    row_lower: list[np.ndarray] = field(default_factory=list)
    row_upper: list[np.ndarray] = field(default_factory=list)
    n_rows: int = 0

    def var(self, shape: int | tuple[int, ...], lb=0.0, ub=1.0, integer: bool = False, cost: float = 0.0) -> np.ndarray:
        """A block of columns; returns their indices in `shape`. `lb`/`ub` broadcast to `shape`."""
        shape = (shape,) if isinstance(shape, int) else shape
        size = int(np.prod(shape))
        idx = np.arange(self.n_cols, self.n_cols + size).reshape(shape)
        self.lower.append(np.broadcast_to(np.asarray(lb, float), shape).ravel())
        self.upper.append(np.broadcast_to(np.asarray(ub, float), shape).ravel())
        self.cost.append(np.full(size, float(cost)))
        self.integer.append(np.full(size, integer))
        self.n_cols += size
        return idx

    def add(self, terms: Sequence[tuple[np.ndarray, object]], lb=-np.inf, ub=np.inf) -> None:
        """Rows `lb <= sum of terms <= ub`, one row per entry of the terms' first axis.

        A term is (columns, coefficients): columns of shape (R,) or (R, m) (m columns summed into each
        row), coefficients broadcastable to that shape. Columns < 0 are absent and skipped.
        """
        n_rows = len(terms[0][0])
        if n_rows == 0:
            return
        rows = np.arange(self.n_rows, self.n_rows + n_rows)
        for cols, coef in terms:
            cols = np.asarray(cols).reshape(n_rows, -1)
            coef = np.asarray(coef, float)
            # A 1-D coefficient is one value per row.
            vals = np.broadcast_to(coef.reshape(n_rows, 1) if coef.ndim == 1 else coef, cols.shape)
            keep = (cols >= 0) & (vals != 0)
            self.entries.append((np.broadcast_to(rows[:, None], cols.shape)[keep], cols[keep], vals[keep]))
        self.row_lower.append(np.broadcast_to(np.asarray(lb, float), (n_rows,)).copy())
        self.row_upper.append(np.broadcast_to(np.asarray(ub, float), (n_rows,)).copy())
        self.n_rows += n_rows

    def lp(self):
        """The model as a HiGHS LP with integrality (built once, solved possibly several times)."""
        import highspy

        rows = np.concatenate([e[0] for e in self.entries])
        cols = np.concatenate([e[1] for e in self.entries])
        vals = np.concatenate([e[2] for e in self.entries])
        # Column-wise matrix with duplicate (row, col) entries summed.
        stride = max(self.n_rows, 1)
        key, inverse = np.unique(cols.astype(np.int64) * stride + rows, return_inverse=True)
        summed = np.bincount(inverse, weights=vals, minlength=len(key))
        keep = summed != 0
        key, summed = key[keep], summed[keep]
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self.n_cols, self.n_rows
        lp.col_cost_ = np.concatenate(self.cost)
        lp.col_lower_, lp.col_upper_ = np.concatenate(self.lower), np.concatenate(self.upper)
        lp.row_lower_, lp.row_upper_ = np.concatenate(self.row_lower), np.concatenate(self.row_upper)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.searchsorted(key // stride, np.arange(self.n_cols + 1)).astype(np.int32)
        lp.a_matrix_.index_ = (key % stride).astype(np.int32)
        lp.a_matrix_.value_ = summed
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in np.concatenate(self.integer)]
        return lp


def quiet_highs():
    """A silent Highs. HiGHS 1.16 prints its banner on the C-level stdout when the first Highs of a
    process is made, before any option can stop it; `plan --json` must print only JSON there, so
    file descriptor 1 points at /dev/null meanwhile (HiGHS flushes each log line it writes)."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.silent()
    return h


def run(lp, *, time_limit: float | None, gap: float, seed: int, start: np.ndarray | None, progress: bool,
         what: str, fix: tuple[int, float] | None = None) -> "Result":
    """One HiGHS run on `lp`; `fix` = (column, value) pins a column (the objective, for a target test)."""
    import highspy

    h = quiet_highs()
    h.setOptionValue("mip_rel_gap", float(gap))
    h.setOptionValue("random_seed", int(seed))
    if time_limit is not None:
        h.setOptionValue("time_limit", max(float(time_limit), 0.01))
    h.passModel(lp)
    if fix is not None:
        h.changeColBounds(fix[0], fix[1], fix[1])
    if start is not None:
        # A partial solution (integer columns only): HiGHS completes the continuous ones.
        cols = np.flatnonzero(np.asarray(lp.integrality_) == highspy.HighsVarType.kInteger).astype(np.int32)
        h.setSolution(len(cols), cols, start[cols].astype(float))
    with _HighsProgress(h, what, time_limit, enabled=progress):
        h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
    return Result(h.modelStatusToString(status), status == highspy.HighsModelStatus.kInfeasible,
                   np.asarray(h.getSolution().col_value) if has_solution else None,
                   float(info.objective_function_value) if has_solution else math.inf,
                   float(info.mip_dual_bound))


@dataclass
class Result:
    status: str
    infeasible: bool
    x: np.ndarray | None
    objective: float
    bound: float


class _HighsProgress:
    """The progress line with HiGHS's incumbent, bound and gap while it runs."""

    def __init__(self, highs, what: str, time_limit: float | None, enabled: bool) -> None:
        self.highs, self.what, self.limit, self.enabled = highs, what, time_limit, enabled
        self.last = 0.0
        self.line = None

    def __enter__(self) -> "_HighsProgress":
        self.line = progress_line(self.enabled, "ip", f"{self.what}: starting HiGHS")
        if self.line is not None:
            self.highs.cbMipInterrupt += self._update
        return self

    def _update(self, event) -> None:
        out = event.data_out
        if out.running_time - self.last < 0.25:
            return
        self.last = out.running_time
        limit = f" of {self.limit:g}" if self.limit else ""
        self.line.update(description=f"{self.what}: {out.running_time:.1f}{limit} s, best {out.mip_primal_bound:.6g}, "
                                     f"bound {out.mip_dual_bound:.6g}, gap {100 * out.mip_gap:.2f}%, "
                                     f"{out.mip_node_count} nodes")

    def __exit__(self, *exc) -> None:
        if self.line is not None:
            self.highs.cbMipInterrupt -= self._update
            self.line.close()
