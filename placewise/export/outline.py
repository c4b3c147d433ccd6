"""The outline of an `nn.Module`: its traced operations in run order, with the modules that ran each one.

Traced by the profiler's tracer (`placewise.profile.trace_model`, layer granularity), so the operation
names are those a profiled plan lists. The module scopes come from the `nn_module_stack` that torch.fx
and torch.export record on every node.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import fx, nn

from placewise.export.utils import DICT, LIST, SEQUENTIAL, Call, Outline

# fx node kinds that are operations of the plan's graph (placeholders, attributes and outputs are not).
_CALL_OPS = ("call_module", "call_function", "call_method")


def outline_model(model: nn.Module, example_inputs: Sequence[Any]) -> Outline:
    """Trace `model` (in the mode it is in, as the profile did) and outline it. The model is left unchanged."""
    from placewise.profile import trace_model
    return outline_traced(model, trace_model(model, tuple(example_inputs), granularity="layer"))


def outline_traced(model: nn.Module, gm: fx.GraphModule) -> Outline:
    """The outline of `model` from its traced graph `gm` (for callers that traced it already)."""
    modules = dict(model.named_modules())
    calls: list[Call] = []
    call_keys: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op not in _CALL_OPS:
            continue
        scopes = []
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            path = value[0] if isinstance(value, tuple) else value
            # The root ("") and entries that name no module (tracer bookkeeping) are not scopes.
            if path and path in modules and path not in scopes:
                scopes.append(path)
                call_keys.setdefault(path, set()).add(key)
        calls.append(Call(node.name, tuple(scopes)))
    children = {name: tuple(f"{name}.{child}" if name else child for child, _ in module.named_children())
                for name, module in modules.items()}
    containers = {name: kind for name, module in modules.items()
                  for kind in [_container_kind(module)] if kind is not None}
    return Outline(tuple(calls), children, containers, {name: type(m).__name__ for name, m in modules.items()},
                   {path: len(keys) for path, keys in call_keys.items()})


def _container_kind(module: nn.Module) -> str | None:
    for kind, cls in ((LIST, nn.ModuleList), (DICT, nn.ModuleDict), (SEQUENTIAL, nn.Sequential)):
        if isinstance(module, cls):
            return kind
    return None
