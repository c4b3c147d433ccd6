"""The one cost model: every solver and baseline scores its split here.

A split maps each node to a device. A device's load is its nodes' time on its kind (accelerator or
CPU time, over the kind's speed) plus, when the kind pays transfers (`DeviceKind.pays_transfers`:
accelerators, and CPU cores in separate processes), the transfer cost of every node whose output
crosses into or out of its set, each such node counted once per direction. The paper's CPU cores
share host memory and pay no transfers (`shared_memory`, a CPU kind's default). The max-load is the
pipeline's time per sample. The latency follows the paper's model: shared-memory CPU nodes start
when their inputs are done; a device that pays transfers runs its whole set as one block once all
of its inputs have arrived and pays its transfers inside that block.

Memory checked here is each device's sum of node `memory`. `memory_breakdown` gives the same
stage's bytes split by what they hold (parameters, gradients, optimizer state, activations saved
for backward, output) where the graph knows them. Schedule-aware memory needs the stages' pipeline
order, which a split alone does not fix (independent stages may go in either order): it is checked
on a plan, in its stage order, by `plan.predict.with_prediction` (and planned for exactly by
`plan.schedule_dp`), both through `plan.stage_memory`. A stage replicated on r devices
(`Stage.replicas`) is costed by `replicated_load` (see its docstring and `plan.allreduce`); its
split, devices and memory are checked by `plan.replicas.evaluate_replicated`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import numpy as np

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Device, OpGraph
from placewise.graph.model import MEMORY_PARTS
from placewise.plan.replicable import device_copies, replication_of

# Memory checks allow rounding in byte sums.
MEMORY_TOLERANCE = 1e-9


@dataclass(frozen=True)
class DeviceLoad:
    device: Device
    accelerator: bool
    nodes: tuple[int, ...]  # the split's: what the plan records and the runtime is given
    # What it computes (ids): the split's nodes that count here (not its replicable ones; a dead-end
    # check goes with what it checks) and its copies of replicable nodes. Its compute and memory are
    # theirs, so its memory breakdown and recomputed forward are too.
    computed: tuple[int, ...]
    compute: float
    transfer: float
    memory: float
    memory_limit: float | None
    # A replicated stage (`replicated_load`): compute and transfer are per replica, plus its all-reduce.
    replicas: int = 1
    allreduce: float = 0.0
    # A stage that recomputes its activations in its backward (`recomputed_load`): its forward again.
    recompute: bool = False
    recompute_time: float = 0.0

    @property
    def load(self) -> float:
        return self.compute + self.transfer + self.allreduce + self.recompute_time


@dataclass(frozen=True)
class Violation:
    kind: str  # unknown-node, missing-node, unknown-device, support, memory, colocation, contiguity, replicas
    message: str


@dataclass(frozen=True)
class Evaluation:
    devices: tuple[DeviceLoad, ...]  # devices that hold nodes, in pipeline order when contiguous
    max_load: float
    latency: float | None  # None when the split's stages depend on each other cyclically
    violations: tuple[Violation, ...]

    @property
    def feasible(self) -> bool:
        return not self.violations

    def raise_if_infeasible(self, what: str = "the split") -> None:
        if self.violations:
            more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
            raise PlacewiseError(f"{what} is infeasible: {self.violations[0].message}{more}")


@dataclass(frozen=True)
class MemoryBreakdown:
    """A stage's memory per device, in bytes, split by what it holds (the fields are
    `placewise.graph.model.MEMORY_PARTS`). None: some node of the stage does not say, so the total
    for that part is unknown. `activations` is for one microbatch; the schedule multiplies it."""

    parameters: float | None = None
    gradients: float | None = None
    optimizer_state: float | None = None
    activations: float | None = None
    output: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {part: getattr(self, part) for part in MEMORY_PARTS}

    @classmethod
    def from_json(cls, data: Any, source: str = "memory_breakdown") -> "MemoryBreakdown":
        if not isinstance(data, dict) or not set(data) <= set(MEMORY_PARTS) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in data.values()):
            raise PlacewiseError(f"{source}: expected an object of byte counts (or null) under keys among "
                                 f"{', '.join(MEMORY_PARTS)}; fix or remove it")
        return cls(**{k: None if v is None else float(v) for k, v in data.items()})


def memory_breakdown(graph: OpGraph, nodes: Iterable[int]) -> MemoryBreakdown:
    """Per-part memory totals of the nodes (ids) of one stage; a part is None if any node lacks it."""
    members = [graph.node(n) for n in nodes]
    totals = {}
    for part in MEMORY_PARTS:
        values = [getattr(n, part) for n in members]
        totals[part] = None if any(v is None for v in values) else float(sum(values))
    return MemoryBreakdown(**totals)


def _dense(graph: OpGraph, cluster: Cluster, assignment: Mapping[int, Device]):
    """Map the split to arrays: device number per node (-1 = unassigned) and the device list."""
    violations: list[Violation] = []
    devices = cluster.devices()
    number = {d: i for i, d in enumerate(devices)}
    device_of = np.full(len(graph.nodes), -1, dtype=np.int64)
    for node_id, dev in assignment.items():
        i = graph.index.get(node_id)
        if i is None:
            violations.append(Violation("unknown-node", f"node {node_id} is not in the graph; remove it from the split"))
            continue
        dev = Device(*dev)
        if dev not in number:
            violations.append(Violation(
                "unknown-device", f"node {node_id} is on {dev}, which the cluster does not have "
                f"({', '.join(f'{k.count} x {k.name}' for k in cluster.kinds)}); raise the device count or move it"))
            continue
        device_of[i] = number[dev]
    missing = [graph.nodes[i].id for i in np.flatnonzero(device_of < 0) if graph.nodes[i].id not in assignment]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        violations.append(Violation("missing-node", f"{len(missing)} node(s) have no device ({shown}); add them to the split"))
    return devices, device_of, violations


def transfer_costs(graph: OpGraph, device_of: np.ndarray, n_devices: int) -> np.ndarray:
    """Per device: the summed cost of nodes whose output crosses its boundary (once per node and direction)."""
    edges = graph.edge_array
    transfer = np.zeros(n_devices)
    if len(edges) == 0:
        return transfer
    src, dst = edges[:, 0], edges[:, 1]
    ds, dd = device_of[src], device_of[dst]
    cut = (ds != dd) & (ds >= 0) & (dd >= 0)
    # A node pays once on its own device (out) and once on each other device reading it (in).
    keys = np.unique(np.concatenate([src[cut] * n_devices + ds[cut], src[cut] * n_devices + dd[cut]]))
    np.add.at(transfer, keys % n_devices, graph.out_cost[keys // n_devices])
    return transfer


def stage_order(graph: OpGraph, device_of: np.ndarray, used: list[int]) -> list[int] | None:
    """Order the used devices so every forward edge goes forward; None if their sets form a cycle."""
    forward = ~graph.is_backward
    after: dict[int, set[int]] = defaultdict(set)
    for u, v in graph.edge_array:
        a, b = device_of[u], device_of[v]
        if a != b and a >= 0 and b >= 0 and forward[u] and forward[v]:
            after[a].add(b)
    indeg = {d: 0 for d in used}
    for a in used:
        for b in after[a]:
            indeg[b] += 1
    # Stable: among ready devices take the one holding the earliest node in topological order.
    first = {}
    for pos, i in enumerate(graph.topological_order):
        first.setdefault(int(device_of[i]), pos)
    ready = sorted((d for d in used if indeg[d] == 0), key=lambda d: first.get(d, 0))
    order = []
    while ready:
        d = ready.pop(0)
        order.append(d)
        for b in after[d]:
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
                ready.sort(key=lambda x: first.get(x, 0))
    return order if len(order) == len(used) else None


def latency(graph: OpGraph, cluster: Cluster, devices: list[Device], device_of: np.ndarray,
            loads: Mapping[int, DeviceLoad]) -> float | None:
    """Single-sample latency (paper's model); None when accelerator blocks depend on each other cyclically."""
    n = len(graph.nodes)
    accel = {d for d, dl in loads.items() if cluster.kind(dl.device.kind).pays_transfers}
    # Unit of scheduling: one block (a device that pays transfers), or one node on a shared-memory core.
    unit = np.where(np.isin(device_of, list(accel)), -1 - device_of, np.arange(n))
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[int(unit[i])].append(i)
    preds: dict[int, set[int]] = defaultdict(set)
    for u, v in graph.edge_array:
        if unit[u] != unit[v]:
            preds[int(unit[v])].add(int(unit[u]))
    finish: dict[int, float] = {}
    indeg = {x: len(preds[x]) for x in members}
    succs: dict[int, list[int]] = defaultdict(list)
    for x, ps in preds.items():
        for p in ps:
            succs[p].append(x)
    ready = [x for x, d in indeg.items() if d == 0]
    while ready:
        x = ready.pop()
        start = max((finish[p] for p in preds[x]), default=0.0)
        if x < 0:
            dl = loads[-1 - x]
            finish[x] = start + dl.load
        else:
            kind = cluster.kind(devices[device_of[x]].kind)
            finish[x] = start + graph.cpu_time[x] / kind.speed
        for s in succs[x]:
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
    if len(finish) != len(members):
        return None
    return max(finish.values(), default=0.0)


def evaluate(graph: OpGraph, cluster: Cluster, assignment: Mapping[int, Device], *,
             contiguous: bool = True, replicate: bool = True) -> Evaluation:
    """Score a split and list everything it violates (memory, support, colocation, contiguity, coverage).

    With `replicate` (the default), replicable nodes (`plan.replicable`: sizes, masks, position ids,
    constants) are recomputed by every device that needs them: each such device pays their time
    and memory once, their outputs are never sent, and where the split puts them does not matter.
    """
    devices, device_of, violations = _dense(graph, cluster, assignment)
    kinds = [cluster.kind(d.kind) for d in devices]
    replication = replication_of(graph) if replicate else None
    # Where a node counts: replicated nodes count on no device of their own.
    counted = device_of.copy()
    if replication is not None and replication.any:
        counted[replication.replicable] = -1
    if replication is not None:
        # A dead-end check (a shape assert, an unused size read) runs with the node it checks, as the
        # DP's units and the pipeline cut keep it: where the split puts it does not matter.
        for check, anchor in replication.attached:
            counted[check] = counted[anchor]
        copy_acc, copy_cpu, copy_mem, copied = device_copies(graph, replication, counted, len(devices))
    else:
        copy_acc = copy_cpu = copy_mem = np.zeros(len(devices))
        copied = [[] for _ in devices]
    transfer = transfer_costs(graph, counted, len(devices))
    used = sorted({int(d) for d in device_of if d >= 0})
    loads: dict[int, DeviceLoad] = {}
    for d in used:
        members = np.flatnonzero(counted == d)
        kind = kinds[d]
        times = graph.acc_time if kind.accelerator else graph.cpu_time
        copies = copy_acc[d] if kind.accelerator else copy_cpu[d]
        mem = float(graph.memory[members].sum() + copy_mem[d])
        computed = tuple(graph.nodes[i].id for i in sorted({*members.tolist(), *copied[d]}))
        loads[d] = DeviceLoad(devices[d], kind.accelerator, tuple(graph.nodes[i].id for i in np.flatnonzero(device_of == d)),
                              computed, float(times[members].sum() + copies) / kind.speed,
                              float(transfer[d]) if kind.pays_transfers else 0.0, mem, kind.memory)
        if kind.accelerator:
            bad = [graph.nodes[i].id for i in members if not graph.supported[i]]
            if bad:
                violations.append(Violation("support", f"node {bad[0]} is not supported on an accelerator but is on {devices[d]}; move it to a CPU"))
        if kind.memory is not None and mem > kind.memory * (1 + MEMORY_TOLERANCE):
            violations.append(Violation("memory", f"{devices[d]} holds {mem:.6g} bytes, over its {kind.memory:.6g}; move nodes off it or give it more memory"))
    violations += _colocation_violations(graph, counted, devices)
    order = stage_order(graph, counted, used)
    if order is None:
        order = used
        if contiguous:
            violations.append(Violation("contiguity", "the devices' sets depend on each other in a cycle, so they are not contiguous "
                                        "(not differences of ideals in one chain); use a contiguous split or --noncontiguous"))
    # Latency schedules CPU nodes one by one, so CPU cores in a cycle of device sets still have one;
    # latency() itself gives None when accelerator blocks wait on each other in a cycle.
    lat = latency(graph, cluster, devices, device_of, loads)
    ordered = tuple(loads[d] for d in order)
    max_load = max((dl.load for dl in ordered), default=0.0)
    return Evaluation(ordered, max_load, lat, tuple(violations))


def _colocation_violations(graph: OpGraph, device_of: np.ndarray, devices: list[Device]) -> list[Violation]:
    out = []
    for group in graph.colocation_groups:
        placed = {int(device_of[i]) for i in group if device_of[i] >= 0}
        if len(placed) > 1:
            ids = [graph.nodes[i].id for i in group]
            out.append(Violation("colocation", f"nodes {ids[:4]} share colocation class {graph.nodes[group[0]].colocate} but sit on "
                                 f"{', '.join(str(devices[d]) for d in sorted(placed))}; put them on one device"))
    return out


def complete_by_colocation(graph: OpGraph, assignment: Mapping[int, Device]) -> dict[int, Device]:
    """Give each unplaced node the device of a placed node in its colocation class.

    This turns a forward-only split of a training graph into a full one: backward nodes follow
    their forward nodes.
    """
    out = {k: Device(*v) for k, v in assignment.items()}
    by_class: dict[int, Device] = {}
    for n in graph.nodes:
        if n.id in out and n.colocate is not None:
            by_class.setdefault(n.colocate, out[n.id])
    for n in graph.nodes:
        if n.id not in out and n.colocate is not None and n.colocate in by_class:
            out[n.id] = by_class[n.colocate]
    return out


# ---- Replicated stages ------------------------------------------------------------------------------
def replicated_load(load: DeviceLoad, replicas: int, allreduce_per_unit: float) -> DeviceLoad:
    """One stage's load on `replicas` devices of its kind, per device and per unit of work (profiled
    batch): the microbatches are spread over the replicas, so each one computes, sends and receives
    1/r of them, and pays its share of the gradient all-reduce (`plan.allreduce.AllReduce.per_unit`).
    Memory per replica is the stage's own (every replica holds all of its parameters)."""
    if replicas == 1:
        return load
    return replace(load, compute=load.compute / replicas, transfer=load.transfer / replicas,
                   allreduce=allreduce_per_unit, replicas=replicas)


# ---- Recomputed stages ------------------------------------------------------------------------------
def recomputed_load(load: DeviceLoad, forward_time: float) -> DeviceLoad:
    """One stage's load when it recomputes its activations in its backward (`plan.recompute`): it runs
    its forward (`forward_time`, on its device, per profiled batch) a second time."""
    return replace(load, recompute=True, recompute_time=forward_time)
