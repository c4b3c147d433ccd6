"""Cut a traced model into one submodule per pipeline stage.

The cut works on a `torch.fx.GraphModule` and a map {fx node name: stage index} (what a plan's
`Stage.modules` lists, in pipeline order). Stage s receives, as positional tensors, every value made
before it that stage s or a later one still reads, and hands on every value that a later stage reads:
a residual that skips stages rides through the stages in between, because a pipeline stage talks only
to its neighbours. Non-tensor values crossing a cut (shapes, sizes) travel packed in small tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from placewise.errors import PlacewiseError
# {fx node name: stage} of a plan; the cut's callers know it by this name.
from placewise.plan.plan import module_stages as mapping_from_plan  # noqa: F401


def trace(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """The traced graph whose node names a profiled plan uses (the profiler's tracer when present).
    Trace in the mode the model will run in: fx fixes branches on `self.training`."""
    try:
        from placewise.profile import trace_model
    except ImportError:
        trace_model = None
    try:
        if trace_model is not None:
            return trace_model(model, example_inputs, granularity="layer")
        return fx.symbolic_trace(model)
    except PlacewiseError:
        raise
    except Exception as e:  # noqa: BLE001 - fx raises many kinds for untraceable code
        raise PlacewiseError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); remove data-dependent control flow") from None


def assign_stages(gm: fx.GraphModule, mapping: Mapping[str, int]) -> dict[str, int]:
    """Every fx node's stage. Placeholders go to stage 0, constants (get_attr) to their first user, other
    unplanned nodes to the latest stage among their inputs, the output to the last stage.
    Raises PlacewiseError when the plan names unknown nodes or is not contiguous (an edge going back)."""
    nodes = list(gm.graph.nodes)
    known = {n.name for n in nodes}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise PlacewiseError(f"the plan names {len(unknown)} node(s) the traced model lacks ({', '.join(unknown[:4])}); "
                             "profile and plan this same model")
    stages = sorted(set(mapping.values()))
    if stages != list(range(len(stages))):
        raise PlacewiseError(f"the plan's stage indices are {stages}; expected 0..{len(stages) - 1}")
    last = len(stages) - 1
    stage: dict[str, int] = {}
    for n in nodes:
        if n.op == "placeholder":
            stage[n.name] = 0
        elif n.op == "output":
            stage[n.name] = last
        elif n.name in mapping:
            stage[n.name] = mapping[n.name]
        elif n.all_input_nodes:
            stage[n.name] = max(stage[i.name] for i in n.all_input_nodes)
    # Input-free unplanned nodes (get_attr, constants) go where they are first used.
    for n in reversed(nodes):
        if n.name not in stage:
            stage[n.name] = min((stage[u.name] for u in n.users), default=last)
    for n in nodes:
        for i in n.all_input_nodes:
            if stage[i.name] > stage[n.name]:
                raise PlacewiseError(f"the plan is not contiguous: {i.name} on stage {stage[i.name]} feeds {n.name} "
                                     f"on earlier stage {stage[n.name]}; plan with contiguous stages")
    return stage


def record_values(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Each node's value on one example input, without touching parameters or buffers (eval, no grad)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = result = super().run_node(n)
            return result

    training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            Recorder(gm).run(*example_inputs)
    finally:
        gm.train(training)
    return values


# How a non-tensor value that crosses a cut is packed into a tensor and back.
def pack(value: Any) -> torch.Tensor:
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    return torch.tensor(list(value) if isinstance(value, (tuple, list)) else int(value), dtype=torch.int64)


def _unpack(packed: torch.Tensor, kind: str) -> Any:
    value = packed.tolist()
    return {"size": lambda: torch.Size(value), "tuple": lambda: tuple(value), "list": lambda: list(value),
            "bool": lambda: bool(value), "int": lambda: int(value), "float": lambda: float(value)}[kind]()


def _pack_kind(value: Any, name: str) -> str | None:
    """None for tensors (sent as they are), else how to pack the value; PlacewiseError if it cannot travel."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, torch.Size):
        return "size"
    for kind, types in (("bool", bool), ("int", int), ("float", float)):
        if isinstance(value, types):
            return kind
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "tuple" if isinstance(value, tuple) else "list"
    raise PlacewiseError(f"value {name} ({type(value).__name__}) crosses a stage boundary and is neither a tensor nor "
                         "a number or shape; move the cut so it stays inside one stage")


@dataclass
class StagePart:
    """One stage's submodule and the original values it takes and hands on, in order."""
    index: int
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    nodes: list[str] = field(default_factory=list)


def cut(gm: fx.GraphModule, mapping: Mapping[str, int], values: Mapping[str, Any]) -> list[StagePart]:
    """One submodule per stage. `values` (from `record_values`) says which crossing values are not tensors."""
    stage = assign_stages(gm, mapping)
    nodes = list(gm.graph.nodes)
    n_stages = max(stage.values()) + 1
    # live_in[s]: values made before stage s and read at stage s or later, in graph order.
    live_in: list[list[str]] = [[] for _ in range(n_stages)]
    for n in nodes:
        if n.op == "output":
            continue
        reader = max((stage[u.name] for u in n.users), default=stage[n.name])
        for s in range(stage[n.name] + 1, reader + 1):
            live_in[s].append(n.name)
    kinds = {name: _pack_kind(values[name], name) for s in range(1, n_stages) for name in live_in[s]}
    parts = []
    for s in range(n_stages):
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}       # a value in its usable form
        carried: dict[str, fx.Node] = {}   # a value in the form it travels in
        for n in nodes if s == 0 else ():
            if n.op == "placeholder":
                env[n.name] = graph.node_copy(n)
        for name in live_in[s] if s else ():
            carried[name] = graph.placeholder(name)

        def use(n: fx.Node) -> fx.Node:
            if n.name not in env:  # a value received: made usable where first needed
                if kinds[n.name] is None:
                    # The stage computes on its own copy: torch's pipelining hands it received tensors as
                    # leaves that require grad, which an in-place first op (ReLU(inplace=True)) may not modify.
                    env[n.name] = graph.call_method("clone", (carried[n.name],))
                else:
                    env[n.name] = graph.call_function(_unpack, (carried[n.name], kinds[n.name]))
            return env[n.name]

        members = []
        for n in nodes:
            if stage[n.name] != s or n.op == "placeholder":
                continue
            if n.op == "output":
                # An exported graph returns its flat outputs (one tensor is a 1-tuple); the stage
                # graph has plain codegen, so it returns the tensor itself, as the model does.
                out = n.args[0]
                graph.output(fx.map_arg(out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out, use))
                continue
            env[n.name] = graph.node_copy(n, use)
            members.append(n.name)
        outputs = live_in[s + 1] if s + 1 < n_stages else []
        if s + 1 < n_stages:
            if not outputs:
                raise PlacewiseError(f"stage {s + 1} takes nothing from stage {s}; a pipeline needs a chain of stages")
            sent = []
            for name in outputs:
                if name not in carried:  # made here: send it contiguous (what the transport needs)
                    carried[name] = (graph.call_method("contiguous", (env[name],)) if kinds[name] is None
                                     else graph.call_function(pack, (env[name],)))
                sent.append(carried[name])
            graph.output(tuple(sent))
        graph.lint()
        parts.append(StagePart(s, fx.GraphModule(gm, graph, f"Stage{s}"), list(live_in[s]), outputs, members))
    _check_unshared(parts)
    return parts


def _check_unshared(parts: list[StagePart]) -> None:
    """A parameter used on two stages would be trained as two copies; say so instead."""
    owner: dict[int, int] = {}
    for part in parts:
        for name, p in part.module.named_parameters():
            if owner.setdefault(id(p), part.index) != part.index:
                raise PlacewiseError(f"parameter {name} is used on stages {owner[id(p)]} and {part.index} (tied weights); "
                                     "keep its users on one stage")


def output_tensor(values: Mapping[str, Any], gm: fx.GraphModule) -> torch.Tensor:
    """The model's output in `values` (from `record_values`): one tensor, or a PlacewiseError."""
    out = values[next(n for n in gm.graph.nodes if n.op == "output").name]
    # An exported graph's output node holds the flat outputs: one tensor is a 1-tuple there.
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise PlacewiseError(f"the model returns {type(out).__name__}; a pipeline needs one tensor out (wrap the model)")
    return out


@dataclass
class Prepared:
    """A job's model, traced and cut, with each node's value on one example microbatch."""
    gm: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]  # a full batch
    micro: tuple[torch.Tensor, ...]  # its first microbatch
    values: dict[str, Any]
    parts: list[StagePart]


def cut_model(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], mapping: Mapping[str, int],
              microbatches: int) -> Prepared:
    """Trace `model` (in the mode it is in) and cut it by `mapping` ({} for no cut). The stages' modules
    share the model's parameters. Raises PlacewiseError when the mapping does not fit the model."""
    gm = trace(model, example_inputs)
    micro = tuple(t[: t.shape[0] // microbatches] for t in example_inputs)
    values = record_values(gm, micro)
    parts = cut(gm, mapping, values) if mapping else []
    output_tensor(values, gm)
    return Prepared(gm, example_inputs, micro, values, parts)
