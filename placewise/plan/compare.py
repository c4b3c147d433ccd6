"""Run several solvers and baselines on one graph and collect comparable rows (plain data).

Each method is a registered solver, run with the same options and re-scored by the one cost model.
A method that cannot handle the input (it raises `PlacewiseError`: memory, unsupported operators,
too many ideals...) becomes a row that says why instead of stopping the comparison.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.plan import Plan
from placewise.plan.options import ExpertOptions, SolveOptions
from placewise.plan.solvers import SOLVERS, get_entry, run

# Rows come in this order (the exact planners first); other registered methods follow by name.
PREFERRED_ORDER = ("dp", "ip", "pipedream", "pipedream-nocomm", "block-time", "block-params", "block-uniform",
                   "metis", "local-search", "greedy", "one-accelerator", "expert")


@dataclass
class Row:
    method: str
    value: float | None  # the objective's value (max-load or latency); None when the method failed
    max_load: float | None
    latency: float | None
    ratio: float | None  # value over the best feasible value
    feasible: bool | None
    contiguous: bool | None
    seconds: float
    error: str | None = None  # why the method could not handle the input
    violations: list[str] = field(default_factory=list)
    plan: Plan | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("plan")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}


@dataclass
class Comparison:
    graph: str
    objective: str
    cluster: dict
    rows: list[Row]

    @property
    def best(self) -> Row | None:
        ok = [r for r in self.rows if r.feasible and r.value is not None and math.isfinite(r.value)]
        return min(ok, key=lambda r: r.value) if ok else None

    def to_json(self) -> dict:
        best = self.best
        return {"graph": self.graph, "objective": self.objective, "cluster": self.cluster,
                "best": best.method if best else None, "rows": [r.to_json() for r in self.rows]}


def default_methods(objective: str = "throughput", with_expert: bool = False) -> list[str]:
    """Every registered method for the objective (latency-only ones skipped for throughput);
    `expert` only when a split file is given; methods that replicate stages only when named."""
    names = [n for n in SOLVERS if (n != "expert" or with_expert) and not SOLVERS[n].replicates
             and not (objective == "throughput" and "latency" in n)]
    rank = {n: i for i, n in enumerate(PREFERRED_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def run_method(graph: OpGraph, cluster: Cluster, method: str, options: SolveOptions) -> Row:
    start = time.perf_counter()
    try:
        plan = run(graph, cluster, method, options)
    except PlacewiseError as e:
        return Row(method, None, None, None, None, None, None, time.perf_counter() - start, error=str(e))
    seconds = time.perf_counter() - start
    return Row(method, plan.value, plan.max_load, plan.latency, None, plan.feasible, plan.contiguous, seconds,
               violations=list(plan.violations), plan=plan)


def compare(graph: OpGraph, cluster: Cluster, methods: list[str] | None = None, options: SolveOptions | None = None,
            specific: Mapping[str, SolveOptions] | None = None,
            on_start: Callable[[str], None] | None = None) -> Comparison:
    """Run `methods` (default: `default_methods`) and give each row its ratio to the best feasible one.

    Every method gets the shared `options`, as its own options type; `specific` gives a method its own
    options instead (e.g. `expert`'s split file, `local-search`'s restarts).
    """
    options = options or SolveOptions()
    specific = dict(specific or {})
    if methods is None:
        expert = specific.get("expert")
        methods = default_methods(options.objective, isinstance(expert, ExpertOptions) and bool(expert.split))
    unknown = [m for m in methods if m not in SOLVERS]
    if unknown:
        raise PlacewiseError(f"unknown method {unknown[0]!r}; choose from {', '.join(default_methods(options.objective, True))}")
    if not cluster.devices():
        raise PlacewiseError("the cluster has no devices; give --accelerators and/or --cpus of at least 1")
    rows = []
    for method in methods:
        if on_start:
            on_start(method)
        own = get_entry(method).coerce(specific.get(method, options))
        rows.append(run_method(graph, cluster, method, own))
    result = Comparison(graph.name, options.objective, cluster.to_json(), rows)
    best = result.best
    for r in rows:
        if best is not None and r.value is not None and best.value > 0:
            r.ratio = r.value / best.value
    return result
