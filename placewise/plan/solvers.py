"""The solver registry: every exact solver and baseline is `solve(graph, cluster, options) -> Plan`.

Solvers are imported lazily by name so that `plan --solver NAME` and `compare` can loop over them
without importing every dependency up front.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph

# name -> "module:function". Each entry is one solver or baseline module of plan/.
SOLVERS: dict[str, str] = {
    "one-accelerator": "placewise.plan.baselines:one_accelerator",
    "expert": "placewise.plan.baselines.simple:expert",
    "greedy": "placewise.plan.baselines.greedy:greedy",
    "pipedream": "placewise.plan.baselines.pipedream:pipedream",
    "pipedream-nocomm": "placewise.plan.baselines.pipedream:pipedream_nocomm",
    "block-time": "placewise.plan.baselines.block:block_time",
    "block-params": "placewise.plan.baselines.block:block_params",
    "block-uniform": "placewise.plan.baselines.block:block_uniform",
    "metis": "placewise.plan.baselines.metis:metis",
    "local-search": "placewise.plan.baselines.local_search:local_search",
    "dp": "placewise.plan.dp:solve",
    "ip": "placewise.plan.ip:solve",
    "greedy-latency": "placewise.plan.latency_greedy:solve",
}


@dataclass
class SolveOptions:
    objective: str = "throughput"  # or "latency"
    contiguous: bool = True
    time_limit: float | None = None  # seconds
    gap: float = 1e-4  # relative MIP gap at which an integer program may stop
    seed: int = 0
    progress: bool = False  # show a rich progress bar on stderr
    warm_start: Any = None  # a Plan to start from, where the solver can use one
    extra: dict[str, Any] = field(default_factory=dict)  # solver-specific settings (e.g. a split file)


def get_solver(name: str) -> Callable:
    if name not in SOLVERS:
        raise PlacewiseError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
    module, func = SOLVERS[name].split(":")
    return getattr(importlib.import_module(module), func)


def solve(graph: OpGraph, cluster: Cluster, solver: str = "dp", options: SolveOptions | None = None):
    if not cluster.devices():
        raise PlacewiseError("the cluster has no devices; give --accelerators and/or --cpus of at least 1")
    return get_solver(solver)(graph, cluster, options or SolveOptions())
