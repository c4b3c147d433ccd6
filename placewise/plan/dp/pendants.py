"""The side-branch restriction: a problem with every side branch that ends the graph kept on the unit
it hangs off. Its splits are splits of the full problem, on far fewer ideals."""

from __future__ import annotations

from dataclasses import replace

from placewise.graph import OpGraph
from placewise.plan.ideals import pendants
from placewise.plan.units import Units


def merged_pendants(graph: OpGraph, units: Units) -> OpGraph | None:
    """The graph with every side branch that ends it (an auxiliary classifier) colocated with the
    unit it hangs off: a restricted problem with far fewer ideals whose splits are splits here too."""
    found = pendants(units.pred_units, units.acc_time)
    if not found:
        return None
    fresh = max((n.colocate for n in graph.nodes if n.colocate is not None), default=-1) + 1
    colocate: dict[int, int] = {}
    for k, (v, branch) in enumerate(found):
        for u in (v, *branch):
            for i in units.members[u]:
                colocate[i] = fresh + k
    return replace(graph, nodes=tuple(replace(n, colocate=colocate.get(i, n.colocate))
                                      for i, n in enumerate(graph.nodes)))
