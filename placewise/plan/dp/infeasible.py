"""What the DP says when no contiguous split exists: which unit or how much memory is to blame."""

from __future__ import annotations

from placewise.errors import PlacewiseError
from placewise.graph import OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.dp.problem import Problem
from placewise.plan.units import Units


def check_units_fit(graph: OpGraph, units: Units, problem: Problem) -> None:
    """A unit that fits on no kind of device makes every split infeasible: say which and why."""
    for u in range(units.count):
        fits = False
        for t, kind in enumerate(problem.kinds):
            if units.memory[u] > problem.memory_limit[t]:
                continue
            if kind.accelerator and not units.supported[u]:
                continue
            fits = True
            break
        if fits:
            continue
        members = units.members[u]
        unsupported = [graph.nodes[i].id for i in members if not graph.supported[i]]
        has_cpu = any(not k.accelerator for k in problem.kinds)
        limits = ", ".join(f"{k.name} {k.memory:.6g}" for k in problem.kinds if k.memory is not None)
        heaviest = max(members, key=lambda i: graph.memory[i])
        if unsupported and not has_cpu:
            raise PlacewiseError(
                f"node {unsupported[0]} cannot run on an accelerator (not supported there) and the cluster has no "
                "CPU cores; give --cpus 1 or more")
        # One node too big for every device says it most precisely; otherwise the group is to blame.
        if all(graph.memory[heaviest] > problem.memory_limit[t] for t in range(len(problem.kinds))):
            raise PlacewiseError(
                f"node {graph.nodes[heaviest].id} needs {graph.memory[heaviest]:.6g} bytes, more than any device that "
                f"could run it holds ({limits}); raise --memory or add CPU cores")
        shown = ", ".join(str(graph.nodes[i].id) for i in members[:6]) + (" ..." if len(members) > 6 else "")
        raise PlacewiseError(
            f"nodes {shown} must share one device in a contiguous split (a colocation class, or a cycle through "
            f"colocation classes) and together need {units.memory[u]:.6g} bytes, more than any device that could run "
            f"them holds ({limits}); raise --memory or add CPU cores")


def raise_infeasible(graph: OpGraph, units: Units, problem: Problem) -> None:
    devices = ", ".join(f"{k.count} x {k.name}" + (f" ({k.memory:.6g} bytes each)" if k.memory is not None else "")
                        for k in problem.kinds)
    total = float(units.memory.sum())
    if all(k.memory is not None for k in problem.kinds):
        capacity = sum(k.count * k.memory for k in problem.kinds)
        if total > capacity * (1 + MEMORY_TOLERANCE):
            raise PlacewiseError(f"graph {graph.name or ''} needs {total:.6g} bytes, more than all devices together hold "
                                 f"({devices}: {capacity:.6g} bytes); raise --memory or add devices")
    raise PlacewiseError(f"no contiguous split of graph {graph.name or ''} onto {devices} fits memory and support; "
                         "raise --memory, add devices or CPU cores")
