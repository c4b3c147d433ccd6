"""What a plan will do when run under a schedule: step time (simulated) and per-stage peak memory.

From a graph, a contiguous plan and a `Schedule`: each stage's forward and backward time per
microbatch (its nodes' times on its kind, over the kind's speed), the bytes each boundary carries
per microbatch (every value made before it and read after it, once, as `run/`'s cut sends it), the
link time of those bytes, and each stage's memory parts. `simulate` then replays the schedule, and
`stage_memory` puts each stage's memory at its position.

Times are in the graph's unit per profiled batch; `microbatch_scale` (microbatch size over the
profiled batch size) scales times and bytes linearly to one microbatch (1: profiled at the
microbatch size, the accurate way). The optimizer's update is not in a graph and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, OpGraph
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
    memory: tuple[StageMemory, ...] | None  # None: the graph does not split its memory
    simulation: Simulation

    def to_json(self) -> dict:
        return {"schedule": self.schedule.to_json(), "step_time": self.step_time, "max_load": self.max_load,
                "bubble": self.simulation.bubble,
                "stage_times": [{"forward": t.forward, "backward": t.backward} for t in self.stage_times],
                "boundary_bytes": list(self.boundary_bytes),
                "stage_memory": None if self.memory is None else [
                    {"total": m.total, "in_flight": m.in_flight, "parameters": m.parameters, "gradients": m.gradients,
                     "optimizer_state": m.optimizer_state, "activations": m.activations, "buffers": m.buffers,
                     "workspace": m.workspace}
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


def _stage_bytes(graph: OpGraph, plan, inputs: list[float], outputs: list[float], scale: float,
                 training: bool) -> list[StageBytes] | None:
    out = []
    for i, s in enumerate(plan.stages):
        b = s.memory_breakdown
        if b is None or None in (b.parameters, b.optimizer_state, b.activations):
            return None
        largest = max((graph.node(n).output or 0.0 for n in s.nodes if not graph.node(n).backward), default=0.0)
        out.append(StageBytes(b.parameters, b.optimizer_state, b.activations * scale, inputs[i], outputs[i],
                              b.gradients, backward_workspace(largest * scale) if training else 0.0))
    return out


def predict(graph: OpGraph, cluster: Cluster, plan, schedule: Schedule, *, link: Link | None = None,
            microbatch_scale: float = 1.0, options: SimulateOptions | None = None) -> Prediction:
    """Simulate `plan` (stages in pipeline order) under `schedule`; `link` defaults to the cluster's
    bandwidth (graph time units: the graph's transfer cost per byte) with no latency."""
    if not plan.stages:
        raise PlacewiseError("the plan has no stages; plan a graph first")
    stage_of = {n: i for i, s in enumerate(plan.stages) for n in s.nodes}
    missing = [n.id for n in graph.nodes if n.id not in stage_of]
    if missing:
        raise PlacewiseError(f"the plan leaves out node(s) {missing[:4]} of graph {graph.name!r}; "
                             "predict with the graph the plan was made for")
    options = options or SimulateOptions(training=graph.is_training)
    times = []
    for s in plan.stages:
        kind = cluster.kind(s.kind)
        per_node = graph.acc_time if kind.accelerator else graph.cpu_time
        fwd = sum(per_node[graph.index[n]] for n in s.nodes if not graph.node(n).backward)
        bwd = sum(per_node[graph.index[n]] for n in s.nodes if graph.node(n).backward)
        times.append(StageTimes(fwd * microbatch_scale / kind.speed, bwd * microbatch_scale / kind.speed))
    crossing = [b * microbatch_scale for b in boundary_bytes(graph, stage_of, len(plan.stages))]
    link = link or _graph_link(graph)
    # Gradients flow back over a boundary with the bytes of the values that crossed it forward.
    links = [LinkTimes(link.time(b), link.time(b) if options.training else 0.0) for b in crossing]
    sim = simulate(times, links, schedule, options)
    stage_bytes = _stage_bytes(graph, plan, [0.0] + crossing, crossing + [0.0], microbatch_scale, options.training)
    memory = None if stage_bytes is None else tuple(pipeline_memory(stage_bytes, schedule, training=options.training))
    per_microbatch = max(t.forward + t.backward for t in times)
    return Prediction(schedule, sim.step_time, per_microbatch, tuple(times), tuple(crossing), memory, sim)


def _graph_link(graph: OpGraph) -> Link:
    """The link the graph's transfer costs imply: its cost per byte (no latency)."""
    rates = [e.transfer_cost / e.bytes for e in graph.edges if e.bytes]
    return Link(0.0, 1.0 / max(rates)) if rates and max(rates) > 0 else Link()
