"""A plan: which device runs which operators, in pipeline order, with its score and provenance.

Plain data with a JSON round trip, shared by every layer. Also reads and writes the reference
split format of the paper's code (`{"fpgas": [{"load", "nodes"}], "cpus": [...]}`).

Plan JSON version 2 added a stage's `replicas` and `memory_breakdown` and the plan's `schedule`;
version-1 files still load (one replica per stage, no breakdown, no schedule). A stage's `recompute`
and `recompute_time` came later in version 2; files without them load with no recompute.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from placewise.errors import PlacewiseError, read_json
from placewise.graph import ACCELERATOR, CPU, Cluster, Device, OpGraph
from placewise.plan.cost import Evaluation, MemoryBreakdown, complete_by_colocation, evaluate, memory_breakdown
from placewise.plan.schedule import Schedule

PLAN_FORMAT = "placewise-plan"
PLAN_VERSION = 2


@dataclass
class Stage:
    """One pipeline stage: `replicas` devices of kind `kind`, numbered from `index`, each holding
    the stage's nodes (gradients all-reduced between them). Loads and `memory` are per device:
    `compute` and `transfer` a replica's share, `allreduce` its share of the gradient all-reduce
    (`placewise.plan.cost.replicated_load`); `--max-replicas R` lets the dp and the ip choose replicas."""

    kind: str
    index: int
    accelerator: bool
    nodes: list[int]
    load: float
    compute: float
    transfer: float
    memory: float
    # Model names (fx nodes / modules) of the stage's operators, for profiled graphs.
    modules: list[str] = field(default_factory=list)
    replicas: int = 1
    allreduce: float = 0.0
    # `memory` split by what it holds, where the graph knows (see cost.memory_breakdown).
    memory_breakdown: MemoryBreakdown | None = None
    # The stage recomputes its activations in its backward (`plan.recompute`; the runtime runs it under
    # torch.utils.checkpoint); `recompute_time` is its forward run again, included in `load`.
    recompute: bool = False
    recompute_time: float = 0.0

    @property
    def device(self) -> Device:
        """The stage's first device (its only one unless replicated)."""
        return Device(self.kind, self.index)

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(Device(self.kind, self.index + r) for r in range(self.replicas))


@dataclass
class Plan:
    stages: list[Stage]
    max_load: float
    latency: float | None
    solver: str
    seconds: float
    objective: str = "throughput"
    lower_bound: float | None = None
    gap: float | None = None
    feasible: bool = True
    violations: list[str] = field(default_factory=list)
    graph: str = ""
    contiguous: bool = True
    cluster: dict | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    # The pipeline schedule the plan is for; None: not chosen (the steady-state max-load only).
    schedule: Schedule | None = None

    @property
    def value(self) -> float:
        """The objective's value: max-load for throughput, latency for latency."""
        if self.objective == "latency":
            return float("inf") if self.latency is None else self.latency
        return self.max_load

    def assignment(self) -> dict[int, Device]:
        """Node id -> the first device of its stage."""
        return {n: s.device for s in self.stages for n in s.nodes}

    def replicas(self) -> dict[Device, int]:
        """The first device of each replicated stage -> its replica count (stages with one are left out)."""
        return {s.device: s.replicas for s in self.stages if s.replicas > 1}

    def recomputed(self) -> tuple[int, ...]:
        """Positions (in pipeline order) of the stages that recompute their activations."""
        return tuple(i for i, s in enumerate(self.stages) if s.recompute)

    def to_json(self) -> dict:
        # asdict writes the schedule and breakdowns as their to_json() objects.
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "plan") -> "Plan":
        version = data.get("version", 1)
        if isinstance(version, bool) or version not in range(1, PLAN_VERSION + 1):
            raise PlacewiseError(f"{source}: version: {version!r} is not supported; this placewise reads plan versions "
                                 f"1 to {PLAN_VERSION} (plan again with this placewise)")
        if "stages" in data and not isinstance(data["stages"], list):
            raise PlacewiseError(f"{source}: stages: {_short(data['stages'])} is not a list of stages; write the plan "
                                 f"with `placewise plan --out`")
        try:
            stages = [_stage_from_json(s, f"{source}: stages[{i}]") for i, s in enumerate(data["stages"])]
            kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k not in ("stages", "schedule")}
            schedule = data.get("schedule")
            return cls(stages=stages, schedule=None if schedule is None else Schedule.from_json(schedule, f"{source}: schedule"),
                       **kwargs)
        except (KeyError, TypeError, AttributeError) as e:
            raise PlacewiseError(f"{source}: not a valid placewise plan ({type(e).__name__}: {e}); "
                                 "write it with `placewise plan --out`") from None

    def check_made_for(self, name: str, source: str, what: str = "graph") -> None:
        """One line when the plan was made for another graph (named after its model) than `name`: its node
        ids and module names would then point at the wrong operators, or at none."""
        if self.graph and name and self.graph != name:
            raise PlacewiseError(f"{source}: the plan was made for {self.graph!r}, not for the {what} {name!r}; "
                                 f"plan {name} itself (`placewise profile {name} --out G.json`, then `placewise "
                                 f"plan G.json --out PLAN.json`)")

    def to_reference(self) -> dict:
        """The paper code's split format (accelerators as 'fpgas')."""
        out: dict[str, Any] = {"fpgas": [], "cpus": []}
        for s in sorted(self.stages, key=lambda s: (s.kind, s.index)):
            (out["fpgas"] if s.accelerator else out["cpus"]).append({"load": s.load, "nodes": list(s.nodes)})
        out["maxLoad"] = self.max_load
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# What each stage field must hold: (check, words for the message). Checked on load, so that a hand-edited
# plan fails here in one line instead of deep inside the runtime (an int where a list of names belongs).
_STAGE_FIELDS: dict[str, tuple[Any, str]] = {
    "kind": (lambda v: isinstance(v, str) and v != "", "a device kind name"),
    "index": (_is_whole, "a whole number of at least 0"),
    **{name: (lambda v: isinstance(v, bool), "true or false") for name in ("accelerator", "recompute")},
    "nodes": (lambda v: isinstance(v, list) and all(map(_is_whole, v)), "a list of node ids"),
    "modules": (lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v), "a list of model node names"),
    **{name: (_is_number, "a number") for name in ("load", "compute", "transfer", "memory", "allreduce",
                                                     "recompute_time")},
}


def _stage_from_json(data: Any, source: str) -> Stage:
    if not isinstance(data, dict):
        raise PlacewiseError(f"{source}: expected an object; write the plan with `placewise plan --out`")
    kwargs = {k: v for k, v in data.items() if k in Stage.__dataclass_fields__ and k != "memory_breakdown"}
    for name, (valid, words) in _STAGE_FIELDS.items():
        if name in kwargs and not valid(kwargs[name]):
            raise PlacewiseError(f"{source}.{name}: {_short(kwargs[name])} is not {words}; write the plan with "
                                 f"`placewise plan --out`")
    replicas = kwargs.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise PlacewiseError(f"{source}.replicas: {replicas!r}; use a whole number of at least 1")
    breakdown = data.get("memory_breakdown")
    return Stage(**kwargs, memory_breakdown=None if breakdown is None else
                 MemoryBreakdown.from_json(breakdown, f"{source}.memory_breakdown"))


def module_stages(plan: Plan) -> dict[str, int]:
    """{model operation name (fx node): stage index} from a profiled plan's stages, in pipeline order."""
    mapping = {name: s for s, stage in enumerate(plan.stages) for name in stage.modules}
    if not mapping:
        raise PlacewiseError("the plan's stages name no model nodes; plan a graph made by `placewise profile` "
                             "of this model")
    return mapping


def _short(value: Any) -> str:
    """A value for a one-line message, cut short."""
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def plan_from_assignment(graph: OpGraph, cluster: Cluster, assignment: Mapping[int, Device], *, solver: str,
                         seconds: float, objective: str = "throughput", contiguous: bool = True,
                         lower_bound: float | None = None, gap: float | None = None,
                         notes: dict | None = None, schedule: Schedule | None = None, replicate: bool = True,
                         evaluation: Evaluation | None = None) -> Plan:
    """Score a split with the cost model and wrap it as a Plan (stages in pipeline order), with each
    stage's memory broken down where the graph knows it. `replicate`: the cost model's replication
    rule (`plan.replicable`), recorded in the notes when off. `evaluation`: the split's score when
    the caller has it (a split with replicated stages, `plan.replicas.evaluate_replicated`);
    otherwise every stage has one replica."""
    ev = evaluation if evaluation is not None else evaluate(graph, cluster, assignment, contiguous=contiguous,
                                                            replicate=replicate)
    notes = dict(notes or {})
    if not replicate:
        notes["replication"] = "off"
    stages = [Stage(d.device.kind, d.device.index, d.accelerator, list(d.nodes), d.load, d.compute, d.transfer,
                    d.memory, [graph.node(n).module for n in d.nodes if graph.node(n).module],
                    replicas=d.replicas, allreduce=d.allreduce, memory_breakdown=memory_breakdown(graph, d.computed),
                    recompute=d.recompute, recompute_time=d.recompute_time)
              for d in ev.devices]
    return Plan(stages=stages, max_load=ev.max_load, latency=ev.latency, solver=solver, seconds=seconds,
                objective=objective, lower_bound=lower_bound, gap=gap, feasible=ev.feasible,
                violations=[v.message for v in ev.violations], graph=graph.name, contiguous=contiguous,
                cluster=cluster.to_json(), notes=notes, schedule=schedule)


def read_split(data: Any, graph: OpGraph, source: str = "split") -> dict[int, Device]:
    """A split from the reference format or a placewise plan; training graphs may give forward nodes only."""
    if not isinstance(data, dict):
        raise PlacewiseError(f"{source}: top level is a {type(data).__name__}; write a split as "
                             "{\"fpgas\": [{\"nodes\": [...]}], \"cpus\": [...]} or give a placewise plan")
    if data.get("format") == PLAN_FORMAT:
        plan = Plan.from_json(data, source)
        plan.check_made_for(graph.name, source)
        assignment = plan.assignment()
    elif "fpgas" in data or "cpus" in data:
        assignment = {}
        for key, kind in (("fpgas", ACCELERATOR), ("cpus", CPU)):
            groups = data.get(key, [])
            if not isinstance(groups, list):
                raise PlacewiseError(f"{source}: {key}: expected a list of {{\"nodes\": [...]}}; fix it")
            for i, group in enumerate(groups):
                nodes = group.get("nodes") if isinstance(group, dict) else None
                if not isinstance(nodes, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in nodes):
                    raise PlacewiseError(f"{source}: {key}[{i}].nodes: expected a list of node ids; fix it")
                for node_id in nodes:
                    if node_id in assignment:
                        raise PlacewiseError(f"{source}: {key}[{i}].nodes: node {node_id} is placed twice; keep one")
                    if node_id not in graph.index:
                        raise PlacewiseError(f"{source}: {key}[{i}].nodes: unknown node id {node_id}; "
                                             f"the graph {graph.name or ''} has no such node")
                    assignment[node_id] = Device(kind, i)
    else:
        raise PlacewiseError(f"{source}: not a split; expected 'fpgas'/'cpus' lists or a placewise plan")
    assignment = complete_by_colocation(graph, assignment)
    missing = [n.id for n in graph.nodes if n.id not in assignment]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise PlacewiseError(f"{source}: the split leaves out {len(missing)} node(s) ({shown}); place every node")
    return assignment


def load_split(path: str | Path, graph: OpGraph) -> dict[int, Device]:
    return read_split(read_json(path, "split file (fpgas/cpus lists or a placewise plan)"), graph, str(path))


def load_plan(path: str | Path) -> Plan:
    data = read_json(path, "plan file (written by `placewise plan --out`)")
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlacewiseError(f"{path}: not a placewise plan; write one with `placewise plan --out PLAN.json`")
    return Plan.from_json(data, str(path))
