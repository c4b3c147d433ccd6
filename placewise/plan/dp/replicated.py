"""The DP's problem under the replication rule (`plan.replicable`): the lattice is built on the graph
less its replicable nodes (with dead-end checks put with what they check), the copies a set needs are
charged to it, and the DP's split is completed with the replicable nodes for the plan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.plan.ideals import enumerate_ideals
from placewise.plan.replicable import (Replication, ReplicationRule, SharedCopies, attach_dead_ends, find_replicable,
                                       report, shared_copies, without_replicable)
from placewise.plan.units import Colocated, Units, simplify

# Ideals of the graph before replication are counted up to this many for the notes (counting more
# would cost what replication saves: their bit rows grow with the units).
COUNT_BEFORE = 20_000

# The DP's units or the programs' colocation classes: each has per-unit times and memory.
U = TypeVar("U", Units, Colocated)


@dataclass(frozen=True)
class Reduced:
    graph: OpGraph  # as given
    work: OpGraph  # what the lattice is built on: dead ends attached, replicable nodes removed
    kept: np.ndarray  # dense index in `graph` of each node of `work`
    replication: Replication

    @classmethod
    def of(cls, graph: OpGraph, replicate: bool) -> "Reduced":
        replication = find_replicable(graph, ReplicationRule(enabled=replicate))
        work, kept = without_replicable(attach_dead_ends(graph, replication), replication)
        return cls(graph, work, kept, replication)

    @property
    def changed(self) -> bool:
        return self.replication.any or bool(self.replication.attached)

    def units(self, cluster: Cluster) -> Units:
        """The units of `work`, each carrying the copies only it needs, and the shared copy groups."""
        units = simplify(self.work, cluster)
        if not self.replication.any:
            return units
        units, copies = self.with_copies(units, units.unit_of)
        return replace(units, copies=copies)

    def with_copies(self, units: U, unit_of: np.ndarray) -> tuple[U, SharedCopies]:
        """The shared copy groups of `units` (node k of `work` in unit `unit_of[k]`), and `units`
        with the copies only one unit needs folded into its time and memory (paid exactly when it
        is placed)."""
        copies = shared_copies(self.graph, self.replication, self.kept, unit_of, units.count)
        return replace(units, acc_time=units.acc_time + copies.unit_acc, cpu_time=units.cpu_time + copies.unit_cpu,
                       memory=units.memory + copies.unit_memory), copies

    def complete(self, assignment: dict[int, Device], order: list[Device]) -> dict[int, Device]:
        """The split of `work` (node ids) with every replicable node (and its backward mates) not yet
        placed on the first device, in pipeline order `order`, that needs it: where the runtime
        computes it first."""
        if not self.replication.any:
            return assignment
        rank = {d: k for k, d in enumerate(order)}
        first: dict[int, Device] = {}
        for v, needs in enumerate(self.replication.needs):
            device = assignment.get(self.graph.nodes[v].id)
            for r in needs:
                if device is not None and (r not in first or rank[device] < rank[first[r]]):
                    first[r] = device
        out = dict(assignment)
        for r, device in first.items():
            for i in self.replication.mates[r]:
                out.setdefault(self.graph.nodes[i].id, device)
        return out

    def colocated_like(self, work: OpGraph) -> OpGraph:
        """`graph` with the colocation classes a restriction gave `work` (matched by node id)."""
        classes = {n.id: n.colocate for n in work.nodes}
        fresh = max((n.colocate for n in self.graph.nodes if n.colocate is not None), default=-1) + 1
        return replace(self.graph, nodes=tuple(
            replace(n, colocate=fresh + classes[n.id]) if classes.get(n.id) is not None else n
            for n in self.graph.nodes))

    def notes(self, cluster: Cluster, units_after: int, ideals_after: int) -> dict:
        """What replication did, for the plan's notes (nothing when it did nothing)."""
        if not self.changed:
            return {}
        before = simplify(self.graph, cluster)
        ideals_before: int | None = None
        # n units have over n ideals (a topological order's prefixes): past the count, nothing to list.
        if before.count < COUNT_BEFORE:
            try:
                ideals_before = enumerate_ideals(before.pred_units, COUNT_BEFORE).count
            except PlacewiseError:
                pass
        notes = report(self.graph, self.replication, before.count, units_after, ideals_before, ideals_after,
                       COUNT_BEFORE).to_notes()
        notes["dead_end_checks_attached"] = len(self.replication.attached)
        return notes
