"""What a plan will do when run under a schedule: step time (simulated) and per-stage peak memory.

From a graph, a contiguous plan and a `Schedule`: each stage's forward and backward time per
microbatch (its nodes' times on its kind, over the kind's speed), the bytes each boundary carries
per microbatch (every value made before it and read after it, once, as `run/`'s cut sends it), the
link time of those bytes, and each stage's memory parts. `simulate` then replays the schedule, and
`stage_memory` puts each stage's memory at its position. As in the cost model, a boundary between
two stages whose kinds share memory (`DeviceKind.shared_memory`, the paper's CPU cores in one
process) costs no link time and such stages hold no receive buffers; a stage whose kind pays
transfers holds them, and a boundary costs the link whenever either side pays.
A stage that recomputes (`Stage.recompute`) runs its forward again at the start of each
backward and keeps less (`plan.recompute`).

Times are in the graph's unit per profiled batch; `microbatch_scale` (microbatch size over the
profiled batch size) scales times and bytes linearly to one microbatch (1: profiled at the
microbatch size, the accurate way). Each stage's optimizer update is the profile's one step over all
parameters (`cpu_update_ms` / `acc_update_ms` in the graph's meta; none in older graphs) shared out by
parameter bytes; `overhead` is the runtime's per-microbatch work beyond the chunks (`simulate`).

Replicated stages (`Stage.replicas` r > 1), as `run/replicas.py` runs them: the stage's lead takes
part in torch's schedule and, for each chunk, broadcasts a command to its replicas, scatters the
microbatch's samples over them, every replica computes its share at once and the lead gathers the
shares' results. So a replicated stage's chunk time is
- forward: its compute / r, plus one link latency (the command), plus the scatter of its inputs and
  the gather of its outputs, each `Link.time` of bytes x (r-1)/r (the lead keeps its own share and
  sends or receives the rest, one collective per direction);
- backward: its compute / r (with recompute, the forward again / r), plus the command, the scatter
  of the output gradients and the gather of the input gradients, sized as the forward's.
At the step's end, after torch's schedule and before the optimizer update, the lead ends the step
with a command and the replicas all-reduce the stage's parameter bytes: one latency plus the ring
all-reduce over the link (`plan.allreduce`, `RING`: gloo's collective, whatever model `--allreduce`
planned with), the stage's `allreduce` action. The update is the whole stage's on every replica.
The scatter and gather follow the boundaries' rule (no link time between cores that share memory);
the all-reduce is always paid, as the cost model pays it. Memory: `plan.stage_memory` (the lead's).
Not modelled: one latency per tensor beyond the first in a scatter or gather, the first stage's data
and the last stage's outputs (the graph gives no bytes for them; the gathered loss-side output is
small for the models tested), contention of the r transfers on one link beyond the bytes' share, and
the followers' own per-microbatch overhead (they run beside the lead).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
from placewise.plan.allreduce import RING, AllReduce
from placewise.plan.cost import MEMORY_TOLERANCE
from placewise.plan.plan import Plan, Stage
from placewise.plan.schedule import Schedule
from placewise.plan.simulate import LinkTimes, Simulation, SimulateOptions, StageTimes, simulate
from placewise.plan.stage_memory import StageBytes, StageMemory, backward_workspace, pipeline_memory


@dataclass(frozen=True)
class Link:
    """A link between neighbouring stages: one-way latency (graph time units) and bytes per time unit."""
    latency: float = 0.0
    bandwidth: float = float("inf")

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth if nbytes > 0 else 0.0


@dataclass(frozen=True)
class Prediction:
    schedule: Schedule
    step_time: float  # simulated, graph time units per step (m microbatches)
    max_load: float  # steady state: the busiest stage's work per microbatch
    stage_times: tuple[StageTimes, ...]
    boundary_bytes: tuple[float, ...]  # per boundary, per microbatch
    links: tuple[LinkTimes, ...]  # per boundary: forward and backward transfer time of one microbatch
    memory: tuple[StageMemory, ...] | None  # None: the graph does not split its memory
    simulation: Simulation

    def to_json(self) -> dict:
        return {"schedule": self.schedule.to_json(), "step_time": self.step_time, "max_load": self.max_load,
                "bubble": self.simulation.bubble,
                "stage_times": [{"forward": t.forward, "backward": t.backward, "update": t.update,
                                 "overhead": t.overhead, "allreduce": t.allreduce} for t in self.stage_times],
                "boundary_bytes": list(self.boundary_bytes),
                "links": [{"forward": link.forward, "backward": link.backward, "late_answer": link.late_answer}
                          for link in self.links],
                "stage_memory": None if self.memory is None else [
                    {"total": m.total, "in_flight": m.in_flight, "parameters": m.parameters, "gradients": m.gradients,
                     "optimizer_state": m.optimizer_state, "activations": m.activations, "buffers": m.buffers,
                     "workspace": m.workspace, "replica_copies": m.replica_copies}
                    for m in self.memory]}


def boundary_bytes(graph: OpGraph, stage_of: dict[int, int], stages: int) -> list[float]:
    """Per boundary: bytes of the forward values that cross it (a value read several stages on rides
    through every boundary in between, once)."""
    crossing = [0.0] * max(stages - 1, 0)
    last_reader: dict[int, int] = {}
    for e in graph.edges:
        if graph.node(e.src).backward or graph.node(e.dst).backward:
            continue
        if stage_of[e.dst] > stage_of[e.src]:
            last_reader[e.src] = max(last_reader.get(e.src, 0), stage_of[e.dst])
    nbytes = {e.src: e.bytes for e in graph.edges}
    for src, reader in last_reader.items():
        if nbytes[src] is None:
            raise PlacewiseError(f"node {src}'s output crosses a stage boundary but the graph gives no bytes for it; "
                                 "profile the model with `placewise profile` to predict transfers")
        for boundary in range(stage_of[src], reader):
            crossing[boundary] += nbytes[src]
    return crossing


def _stage_bytes(graph: OpGraph, cluster: Cluster, plan: Plan, inputs: list[float], outputs: list[float], scale: float,
                 training: bool) -> list[StageBytes] | None:
    out = []
    for i, s in enumerate(plan.stages):
        b = s.memory_breakdown
        if b is None or None in (b.parameters, b.optimizer_state, b.activations):
            return None
        largest = max((graph.node(n).output or 0.0 for n in s.nodes if not graph.node(n).backward), default=0.0)
        buffered = 1.0 if cluster.kind(s.kind).pays_transfers else 0.0
        out.append(StageBytes(b.parameters, b.optimizer_state, b.activations * scale, buffered * inputs[i],
                              buffered * outputs[i], b.gradients, backward_workspace(largest * scale) if training else 0.0,
                              s.replicas))
    return out


def predict(graph: OpGraph, cluster: Cluster, plan: Plan, schedule: Schedule, *, link: Link | None = None,
            microbatch_scale: float = 1.0, options: SimulateOptions | None = None, overhead: float = 0.0) -> Prediction:
    """Simulate `plan` (stages in pipeline order) under `schedule`; `link` defaults to the cluster's
    bandwidth (graph time units: the graph's transfer cost per byte) with no latency. `overhead`: the
    runtime's time per microbatch on each stage beyond its chunks (graph time units, one core)."""
    if not plan.stages:
        raise PlacewiseError("the plan has no stages; plan a graph first")
    stage_of = {n: i for i, s in enumerate(plan.stages) for n in s.nodes}
    missing = [n.id for n in graph.nodes if n.id not in stage_of]
    if missing:
        raise PlacewiseError(f"the plan leaves out node(s) {missing[:4]} of graph {graph.name!r}; "
                             "predict with the graph the plan was made for")
    options = options or SimulateOptions(training=graph.is_training)
    crossing = [b * microbatch_scale for b in boundary_bytes(graph, stage_of, len(plan.stages))]
    link = link or _graph_link(graph)
    kinds = [cluster.kind(s.kind) for s in plan.stages]
    pays = [k.pays_transfers for k in kinds]
    # The measured late answer is that of two CPU processes (gloo); NCCL's transfers run on the GPUs.
    late = [(cluster.late_answer or 0.0) if pays[i] and pays[i + 1] and not kinds[i].accelerator
            and not kinds[i + 1].accelerator else 0.0 for i in range(len(kinds) - 1)]
    times = [_stage_times(graph, cluster, s, i, ([0.0] + crossing)[i], (crossing + [0.0])[i], link, options.training,
                          microbatch_scale, overhead) for i, s in enumerate(plan.stages)]
    # Gradients flow back over a boundary with the bytes of the values that crossed it forward.
    links = [LinkTimes(link.time(b), link.time(b) if options.training else 0.0, late[i]) if pays[i] or pays[i + 1]
             else LinkTimes() for i, b in enumerate(crossing)]
    sim = simulate(times, links, schedule, options)
    stage_bytes = _stage_bytes(graph, cluster, plan, [0.0] + crossing, crossing + [0.0], microbatch_scale,
                               options.training)
    memory = None if stage_bytes is None else tuple(pipeline_memory(
        stage_bytes, schedule, training=options.training, recompute=[s.recompute for s in plan.stages]))
    per_microbatch = max(t.forward + t.backward for t in times)
    return Prediction(schedule, sim.step_time, per_microbatch, tuple(times), tuple(crossing), tuple(links), memory, sim)


def _stage_times(graph: OpGraph, cluster: Cluster, stage: Stage, position: int, inputs: float, outputs: float,
                 link: Link, training: bool, microbatch_scale: float, overhead: float) -> StageTimes:
    """One stage's chunk, update and all-reduce times; `inputs`/`outputs`: the bytes it receives and
    sends per microbatch. A replicated stage's as the module's docstring says."""
    kind = cluster.kind(stage.kind)
    per_node = graph.acc_time if kind.accelerator else graph.cpu_time
    fwd = sum(per_node[graph.index[n]] for n in stage.nodes if not graph.node(n).backward)
    bwd = sum(per_node[graph.index[n]] for n in stage.nodes if graph.node(n).backward) + (fwd if stage.recompute else 0.0)
    r = stage.replicas
    fwd, bwd = fwd * microbatch_scale / kind.speed / r, bwd * microbatch_scale / kind.speed / r
    update = _update_time(graph, stage.nodes, kind.accelerator) / kind.speed if training else 0.0
    if r == 1:
        return StageTimes(fwd, bwd, update, overhead / kind.speed)
    if kind.pays_transfers:
        share = (r - 1) / r
        spread = link.latency + link.time(inputs * share) + link.time(outputs * share)  # command, scatter, gather
        fwd, bwd = fwd + spread, bwd + spread
    allreduce = 0.0
    if training:
        parameters = [graph.node(n).parameters for n in stage.nodes]
        if None in parameters:
            raise PlacewiseError(f"stage {position} is replicated {r} times but not all of its nodes say their parameter "
                                 "bytes, so its all-reduce cannot be predicted; profile with `placewise profile`")
        allreduce = link.latency + AllReduce(RING).time(float(sum(parameters)), r, link.bandwidth, link.latency)
    return StageTimes(fwd, bwd, update, overhead / kind.speed, allreduce)


def _update_time(graph: OpGraph, nodes: list[int], accelerator: bool) -> float:
    """A stage's share of the profile's optimizer step: its nodes' parameter bytes over all of them."""
    meta = graph.meta_dict
    whole = meta.get("acc_update_ms" if accelerator else "cpu_update_ms")
    total = sum(n.parameters or 0.0 for n in graph.nodes)
    if whole is None or not total > 0:
        return 0.0
    return float(whole) * sum(graph.node(n).parameters or 0.0 for n in nodes) / total


def _graph_link(graph: OpGraph) -> Link:
    """The link the graph's transfer costs imply: its cost per byte (no latency)."""
    rates = [e.transfer_cost / e.bytes for e in graph.edges if e.bytes]
    return Link(0.0, 1.0 / max(rates)) if rates and max(rates) > 0 else Link()


# Seconds per unit of the time units graphs declare (`time_unit` in their meta).
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def cluster_link(graph: OpGraph, cluster: Cluster) -> Link:
    """The cluster's link (bandwidth, latency) in the graph's time unit; the graph's own transfer
    costs where the cluster has no bandwidth or the graph does not say its unit."""
    unit = TIME_UNITS.get(graph.meta_dict.get("time_unit", ""))
    if cluster.bandwidth is None or unit is None:
        return _graph_link(graph)
    return Link((cluster.latency or 0.0) / unit, cluster.bandwidth * unit)


def with_prediction(graph: OpGraph, cluster: Cluster, plan: Plan, schedule: Schedule, *,
                    microbatch_scale: float = 1.0) -> Plan:
    """The plan for `schedule`: the schedule recorded, the prediction in `notes["prediction"]`, and
    every stage whose memory at its position exceeds its device's memory listed as a violation."""
    unit = TIME_UNITS.get(graph.meta_dict.get("time_unit", ""))
    overhead = (cluster.overhead or 0.0) / unit if unit else 0.0
    pred = predict(graph, cluster, plan, schedule, link=cluster_link(graph, cluster), microbatch_scale=microbatch_scale,
                   overhead=overhead)
    violations = list(plan.violations)
    for i, (stage, mem) in enumerate(zip(plan.stages, pred.memory or ())):
        limit = cluster.kind(stage.kind).memory
        if limit is not None and mem.total > limit * (1 + MEMORY_TOLERANCE):
            violations.append(f"stage {i} ({stage.kind}:{stage.index}) needs {mem.total:.6g} bytes under {schedule.kind} "
                              f"({mem.in_flight} of {schedule.microbatches} microbatches in flight), over its "
                              f"{limit:.6g}; plan with --solver dp-schedule, fewer microbatches or 1F1B")
    recorded = {**pred.to_json(), "time_unit": graph.meta_dict.get("time_unit")}
    return replace(plan, schedule=schedule, notes={**plan.notes, "prediction": recorded},
                   violations=violations, feasible=not violations)


def simulate_plan(plan: Plan, schedule: Schedule | None = None, options: SimulateOptions | None = None) -> Simulation:
    """Replay a plan's recorded prediction (`with_prediction`), under its own schedule or another one."""
    recorded = plan.notes.get("prediction")
    if not isinstance(recorded, dict) or "stage_times" not in recorded or "links" not in recorded:
        raise PlacewiseError("the plan has no prediction to simulate; plan with --schedule and --microbatches")
    times = [StageTimes(t["forward"], t["backward"], t.get("update", 0.0), t.get("overhead", 0.0),
                        t.get("allreduce", 0.0)) for t in recorded["stage_times"]]
    links = [LinkTimes(link["forward"], link["backward"], float(link.get("late_answer", 0.0)))
             for link in recorded["links"]]
    training = any(t.backward > 0 for t in times)
    return simulate(times, links, schedule or plan.schedule or Schedule.from_json(recorded["schedule"]),
                    options or SimulateOptions(training=training))
