"""Brute force over every split of a small graph, scored by the cost model: the independent check
that exact solvers are tested against.

Colocation groups (and single nodes) are placed as wholes onto every device. Devices of one kind
are identical, so a group goes to an already used device of the kind or to the next unused one;
that skips splits that only rename devices, and keeps every distinct one.
"""

from __future__ import annotations

from collections import defaultdict

from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE, evaluate


def _groups(graph: OpGraph) -> list[list[int]]:
    """Node ids that must share a device: colocation classes and singletons."""
    by_class: dict[object, list[int]] = defaultdict(list)
    for n in graph.nodes:
        by_class[("class", n.colocate) if n.colocate is not None else ("node", n.id)].append(n.id)
    return list(by_class.values())


def best_split(graph: OpGraph, cluster: Cluster, contiguous: bool) -> tuple[float, dict] | None:
    """Least max-load over all feasible splits (contiguous ones, or any), with one split that has it;
    None when no split is feasible."""
    groups = _groups(graph)
    kinds = [k for k in cluster.kinds if k.count > 0]
    memory = [sum(graph.node(i).memory for i in g) for g in groups]
    supported = [all(graph.node(i).on_accelerator for i in g) for g in groups]
    best: tuple[float, dict] | None = None
    choice: list[tuple[int, int]] = []
    used = [0] * len(kinds)  # devices of each kind opened so far
    held = defaultdict(float)  # memory per (kind, index)

    def place(g: int) -> None:
        nonlocal best
        if g == len(groups):
            assignment = {node: Device(kinds[t].name, d) for (t, d), group in zip(choice, groups) for node in group}
            ev = evaluate(graph, cluster, assignment, contiguous=contiguous)
            if ev.feasible and (best is None or ev.max_load < best[0]):
                best = (ev.max_load, assignment)
            return
        for t, kind in enumerate(kinds):
            if kind.accelerator and not supported[g]:
                continue
            for d in range(min(used[t] + 1, kind.count)):
                # Memory only grows as groups are added, so an overfull device ends the branch early.
                if kind.memory is not None and held[t, d] + memory[g] > kind.memory * (1 + MEMORY_TOLERANCE):
                    continue
                opened = d == used[t]
                used[t] += opened
                held[t, d] += memory[g]
                choice.append((t, d))
                place(g + 1)
                choice.pop()
                held[t, d] -= memory[g]
                used[t] -= opened

    place(0)
    return best
