"""The replication rule (`plan.replicable`) in the throughput programs, as the cost model scores it.

Replicable nodes (sizes, masks, position ids, constants) get no assignment columns: the programs
place the units of the graph less them (`dp.replicated.Reduced.work`, where each dead-end check
sits in its anchor's unit, so it follows its anchor), and their out-edges carry no transfer. A copy
needed by one unit only is folded into that unit's time and memory (paid exactly when the unit is
on a device). The others are grouped by the set of units that need them (`SharedCopies`); group g
gets a column `w[g, slot]` per device slot with `w[g, slot] >= y[u, slot]` for each unit u needing
it, and its time and memory enter the slot's load and memory rows. The columns are continuous: they
only appear with positive coefficients in rows bounded above, so at 0/1 `y` the least feasible `w`
is the indicator "some needer is on the slot", and a larger one never lowers a load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placewise.graph import Device, OpGraph
from placewise.plan.dp.replicated import Reduced
from placewise.plan.ip.milp import Milp
from placewise.plan.replicable import SharedCopies
from placewise.plan.units import Colocated


@dataclass(frozen=True)
class Placed:
    """What a throughput program places: `units` of `reduced.work` (each with the copies only it
    needs folded in) and the shared copy groups (None when nothing is replicated)."""

    reduced: Reduced
    units: Colocated
    copies: SharedCopies | None

    @classmethod
    def of(cls, graph: OpGraph, replicate: bool) -> "Placed":
        reduced = Reduced.of(graph, replicate)
        units = Colocated.of(reduced.work)
        if not reduced.replication.any:
            return cls(reduced, units, None)
        units, copies = reduced.with_copies(units, units.of_node)
        return cls(reduced, units, copies if copies.count else None)

    @property
    def work(self) -> OpGraph:
        return self.reduced.work

    def total_time(self) -> tuple[float, float]:
        """(accelerator, CPU) time of every unit and every shared copy once: at least one device's load."""
        acc, cpu = float(self.units.acc_time.sum()), float(self.units.cpu_time.sum())
        if self.copies is not None:
            acc, cpu = acc + float(self.copies.acc.sum()), cpu + float(self.copies.cpu.sum())
        return acc, cpu

    def unit_devices(self, assignment: dict[int, Device]) -> dict[int, Device]:
        """Each unit's device in a split of the whole graph, as the cost model counts it: a dead-end
        check counts with its anchor wherever the split puts it."""
        graph, work = self.reduced.graph, self.work
        anchor = dict(self.reduced.replication.attached)
        out: dict[int, Device] = {}
        for k, node in enumerate(work.nodes):
            source = graph.nodes[anchor.get(int(self.reduced.kept[k]), int(self.reduced.kept[k]))].id
            out.setdefault(int(self.units.of_node[k]), Device(*assignment[source]))
        return out

    def assignment(self, unit_device: list[Device], order: list[Device]) -> dict[int, Device]:
        """The split of the whole graph from each unit's device: replicable nodes go to the first
        device in pipeline order `order` that needs them (where the runtime computes them first)."""
        work = {n.id: unit_device[self.units.of_node[k]] for k, n in enumerate(self.work.nodes)}
        return self.reduced.complete(work, order)

    def copy_columns(self, m: Milp, slot_columns: np.ndarray) -> np.ndarray | None:
        """`w[g, slot]` for each shared group and slot, with `w[g, slot] >= y[u, slot]` for each unit u
        needing g; `slot_columns` (units x slots) holds the assignment columns. None without groups."""
        if self.copies is None:
            return None
        copies = self.copies
        n_slots = slot_columns.shape[1]
        w = m.var((copies.count, n_slots), 0.0, 1.0)
        group = np.repeat(np.arange(copies.count), np.diff(copies.needer_ptr))
        m.add([(w[group].ravel(), 1.0), (slot_columns[copies.needers].ravel(), -1.0)], lb=0.0)
        return w
