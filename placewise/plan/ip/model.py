"""What the integer programs share: the plainest infeasibility reasons, device kinds and limits,
symmetry breaking among identical devices, and the transfer indicators of the load rows."""

from __future__ import annotations

import math

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, DeviceKind, OpGraph
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.ip.milp import Milp
from placewise.plan.units import Colocated


def check_placeable(graph: OpGraph, cluster: Cluster, units: Colocated) -> None:
    """Name the plainest reasons no split exists before asking the solver."""
    if any(not k.accelerator and k.count > 0 for k in cluster.kinds):
        return
    accs = [k for k in cluster.kinds if k.accelerator and k.count > 0]
    bad = np.flatnonzero(~graph.supported)
    if len(bad):
        raise PlacewiseError(f"no split exists: node {graph.nodes[bad[0]].id} is not supported on an accelerator and the "
                             "cluster has no CPU; add a CPU (--cpus 1)")
    biggest = max((math.inf if k.memory is None else k.memory) for k in accs)
    too_big = np.flatnonzero(units.memory > biggest * (1 + MEMORY_TOLERANCE))
    if len(too_big):
        raise PlacewiseError(f"no split exists: {units.label[too_big[0]]} (with its colocation class) needs "
                             f"{units.memory[too_big[0]]:.6g} bytes, more than any accelerator's {biggest:.6g}, and the "
                             "cluster has no CPU; add a CPU or memory (--memory)")
    capacity = sum(math.inf if k.memory is None else k.memory * k.count for k in accs)
    if units.memory.sum() > capacity * (1 + MEMORY_TOLERANCE):
        raise PlacewiseError(f"no split exists: the graph needs {units.memory.sum():.6g} bytes, more than the "
                             f"{capacity:.6g} of all accelerators together, and the cluster has no CPU; add devices or memory")


def infeasible(what: str, cluster: Cluster, contiguous: bool) -> PlacewiseError:
    kinds = ", ".join(f"{k.count} x {k.name}" + (f" ({k.memory:.6g} bytes each)" if k.memory is not None else "")
                      for k in cluster.kinds)
    also = " and contiguity" if contiguous else ""
    fix = "add devices or memory" + (", or use --noncontiguous" if contiguous else "")
    return PlacewiseError(f"the {what} integer program is infeasible: no split of the graph onto {kinds} meets the memory, "
                          f"support, colocation{also} constraints; {fix}")


def kinds_of(cluster: Cluster) -> list[DeviceKind]:
    return [k for k in cluster.kinds if k.count > 0]


def memory_limit(kind: DeviceKind) -> float:
    return math.inf if kind.memory is None else kind.memory * (1 + MEMORY_TOLERANCE)


def order_identical(m: Milp, block: np.ndarray) -> None:
    """Identical devices are interchangeable: order them by their lowest unit.

    `block` (units x devices of one kind) holds assignment columns; unit g may go to device j only if
    device j-1 holds a unit below g. Every split has exactly one such numbering, so this is sound.
    """
    U, count = block.shape
    if count < 2:
        return
    prefix = m.var((U, count - 1), 0.0, U)  # prefix[g, j] = how many of units 0..g are on device j
    m.add([(prefix[0, :], 1.0), (block[0, :-1], -1.0)], lb=0.0, ub=0.0)
    m.add([(prefix[1:, :].ravel(), 1.0), (prefix[:-1, :].ravel(), -1.0), (block[1:, :-1].ravel(), -1.0)], lb=0.0, ub=0.0)
    m.add([(block[1:, 1:].ravel(), 1.0), (prefix[:-1, :].ravel(), -1.0)], ub=0.0)
    m.add([(block[0, 1:], 1.0)], ub=0.0)


def number_by_lowest_unit(unit_device: np.ndarray, first: int, count: int) -> np.ndarray:
    """Renumber devices first..first+count-1 in a split (device per unit) as `_order_identical` asks."""
    lowest = {d: (np.flatnonzero(unit_device == d)[:1].tolist() or [len(unit_device)])[0] for d in range(first, first + count)}
    remap = {old: first + j for j, old in enumerate(sorted(lowest, key=lowest.get))}
    return np.array([remap.get(int(d), int(d)) for d in unit_device])


# ---- throughput -----------------------------------------------------------------------------------
def transfer_rows(m: Milp, graph: OpGraph, units: Colocated, y_acc, y_all, n_slots: int):
    """Transfer indicators `into[s, slot]`, `out[s, slot]` for each node s whose output crosses between
    units, and their rows; returns them with each s's cost for the load rows. `y_acc(units, slot)` gives
    the columns placing those units on a device that pays transfers (`DeviceKind.pays_transfers`) in
    that slot, `y_all(units, slot)` on any device."""
    cross = units.cross
    sources = np.unique(cross[:, 0])
    cost = graph.out_cost[sources]
    # Sources with zero cost change no load; leave them out.
    keep = cost > 0
    sources, cost = sources[keep], cost[keep]
    cross = cross[np.isin(cross[:, 0], sources)]
    pos = np.searchsorted(sources, cross[:, 0])
    into = m.var((len(sources), n_slots), 0.0, 1.0)
    out = m.var((len(sources), n_slots), 0.0, 1.0)
    gs, gv = units.of_node[cross[:, 0]], units.of_node[cross[:, 1]]
    for slot in range(n_slots):
        a_v, all_s = y_acc(gv, slot), y_all(gs, slot)
        a_s, all_v = y_acc(gs, slot), y_all(gv, slot)
        m.add([(into[pos, slot], 1.0), (a_v, -1.0), (all_s, 1.0)], lb=0.0)
        m.add([(out[pos, slot], 1.0), (a_s, -1.0), (all_v, 1.0)], lb=0.0)
    return into, out, cost
