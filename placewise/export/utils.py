"""What every export format shares: the model's outline, each operation's stage, and the units a format names.

A plan names the operations of a traced model (fx node names, `Stage.modules`); the other frameworks
name modules. The `Outline` bridges the two: every operation of the traced model in the order it runs,
with the modules whose `forward` ran it, and the module tree. `placewise.export.outline` builds it from
an `nn.Module`; everything here is plain data, so the torch-free formats import no torch.

Each format splits a model into consecutive *units* (a module it can name: a block, a layer) and cannot
cut inside one. `unit_stages` checks that a plan is such a split and says in one line why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

from placewise.errors import PlacewiseError
from placewise.plan.plan import module_stages

# How a module holds its children, for the formats that name a container's items ("layers.3").
LIST, DICT, SEQUENTIAL = "list", "dict", "sequential"


@dataclass(frozen=True)
class Call:
    """One operation of the traced model: its fx node name and the modules that ran it, outermost first."""
    name: str
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outline:
    """A traced model's operations in the order they run, and its module tree.

    `children` maps a module's dotted name ("" for the root) to its children's names in registration
    order; `containers` the ModuleList/ModuleDict/Sequential among them to LIST/DICT/SEQUENTIAL;
    `classes` every module to its class name; `calls_of` every module whose forward ran to how often.
    """
    calls: tuple[Call, ...]
    children: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    containers: Mapping[str, str] = field(default_factory=dict)
    classes: Mapping[str, str] = field(default_factory=dict)
    calls_of: Mapping[str, int] = field(default_factory=dict)

    def units(self, root: str = "", expand: Sequence[str] = (LIST, DICT)) -> list[str]:
        """The children of module `root`, with each container of a kind in `expand` replaced by its items."""
        if root not in self.children:
            raise PlacewiseError(f"module {root!r}: the model has no such module; give the dotted name of one "
                                 f"(e.g. {', '.join(list(self.children.get('', ()))[:3])})")
        out: list[str] = []
        for child in self.children[root]:
            if self.containers.get(child) in expand:
                out += self.children.get(child, ())
            else:
                out.append(child)
        return out


def stage_of_calls(plan, outline: Outline) -> list[int]:
    """The stage (position in `plan.stages`, the pipeline order) of each call of `outline`, in order.

    Raises PlacewiseError when the plan is not contiguous or does not cover the traced model's operations."""
    if not getattr(plan, "contiguous", True):
        raise PlacewiseError("the plan is not contiguous (a stage feeds an earlier one); a pipeline framework runs "
                             "stages in order: plan without --noncontiguous")
    replicas = {getattr(st, "replicas", 1) for st in plan.stages}
    if len(replicas) > 1:
        raise PlacewiseError(f"the plan's stages have {sorted(replicas)} replicas; pipeline frameworks replicate "
                             "every stage alike (one data-parallel degree): plan with one replica count")
    stage = module_stages(plan)
    missing = [c.name for c in outline.calls if c.name not in stage]
    if missing:
        raise PlacewiseError(f"the plan does not place {len(missing)} operation(s) of the traced model "
                             f"({', '.join(missing[:4])}); profile and plan this same model, traced in the same mode "
                             "(a model profiled with training=True is outlined in train mode)")
    return [stage[c.name] for c in outline.calls]


def check_in_order(outline: Outline, stages: Sequence[int], fmt: str) -> None:
    """Every stage is one run of consecutive operations, in pipeline order (what a split of the forward is)."""
    for i in range(1, len(stages)):
        if stages[i] < stages[i - 1]:
            before, after = outline.calls[i - 1].name, outline.calls[i].name
            raise PlacewiseError(f"{fmt}: the plan is not a split of the forward pass in the order it runs: {after} "
                                 f"(stage {stages[i]}) runs after {before} (stage {stages[i - 1]}); {fmt} cuts the "
                                 "model's code at one point per stage")


@dataclass(frozen=True)
class UnitSplit:
    """The units of a format in the order they run, each with its stage; `glue` are the operations outside
    any unit (functions between modules), with their stages."""
    units: list[tuple[str, int]]
    glue: list[tuple[str, int]]
    n_stages: int

    def per_stage(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(self.n_stages)]
        for unit, s in self.units:
            out[s].append(unit)
        return out


def unit_stages(plan, outline: Outline, unit_of: Callable[[Call], str | None], fmt: str,
                what: str = "module", empty_ok: Collection[int] = ()) -> UnitSplit:
    """Split the plan into the format's units. Raises PlacewiseError (one line) when a unit's operations sit
    on two stages (a cut inside a block the format cannot name), the stages are not consecutive runs of the
    forward pass, or a stage (other than those in `empty_ok`) holds no whole unit."""
    stages = stage_of_calls(plan, outline)
    check_in_order(outline, stages, fmt)
    unit_stage: dict[str, int] = {}
    glue: list[tuple[str, int]] = []
    for call, s in zip(outline.calls, stages):
        unit = unit_of(call)
        if unit is None:
            glue.append((call.name, s))
        elif unit_stage.setdefault(unit, s) != s:
            raise PlacewiseError(f"{fmt}: the plan cuts inside {what} {unit} (its operations are on stages "
                                 f"{unit_stage[unit]} and {s}, e.g. {call.name}); {fmt} places whole {what}s: "
                                 f"plan at {what} granularity or keep {unit} on one stage")
    split = UnitSplit(list(unit_stage.items()), glue, len(plan.stages))
    for s, units in enumerate(split.per_stage()):
        if not units and s not in empty_ok:
            ops = [name for name, g in glue if g == s]
            raise PlacewiseError(f"{fmt}: stage {s} holds no whole {what} ({len(ops)} operation(s) between "
                                 f"{what}s: {', '.join(ops[:3]) or 'none'}); merge it into a neighbouring stage")
    return split


def unit_lookup(units: Sequence[str]) -> Callable[[Call], str | None]:
    """`unit_of` for a set of unit names: the outermost module that ran a call and is one of them."""
    wanted = set(units)
    return lambda call: next((scope for scope in call.scopes if scope in wanted), None)


def unit_cuts(outline: Outline, unit_of: Callable[[Call], str | None]) -> Callable[[int], bool]:
    """`cut_allowed` for a unit format: a stage starts where a unit starts, so no cut falls inside a unit
    and functions between units go with the unit after them (every stage then holds a unit)."""
    units = [unit_of(call) for call in outline.calls]
    return lambda p: units[p] is not None and units[p] != units[p - 1]


def colocate_runs(graph, outline: Outline, cut_allowed: Callable[[int], bool]):
    """A copy of `graph` (an OpGraph profiled from the outlined model) in which the operations between two
    allowed cuts share one colocation class, so a planner keeps each run on one stage and makes only plans
    that a format can say. `cut_allowed(p)`: may a stage start at call p of the outline (p >= 1)?"""
    from dataclasses import replace
    run_of: dict[str, int] = {}
    run = 0
    for p, call in enumerate(outline.calls):
        if p and cut_allowed(p):
            run += 1
        run_of[call.name] = run
    if not any(node.module in run_of for node in graph.nodes):
        raise PlacewiseError("the graph's operations are not the outlined model's; profile this same model")
    # Classes already in the graph (a backward beside its forward) move above the runs' numbers.
    offset = run + 1
    nodes = [replace(node, colocate=run_of[node.module] if node.module in run_of
                     else None if node.colocate is None else node.colocate + offset)
             for node in graph.nodes]
    return type(graph).build(nodes, graph.edges, cluster=graph.cluster, name=graph.name, split=graph.split,
                             meta=dict(graph.meta), source=graph.name or "graph")
