"""Tracing a model into a `torch.fx.GraphModule` whose node names the operator graph keeps.

Two tracers, tried in a fixed order so the same model always gives the same node names:
- layer granularity: `torch.fx.symbolic_trace` (leaf modules stay `call_module` nodes, the
  functions between them `call_function`/`call_method`). Models that fx cannot trace (most
  `transformers` models) go through `torch.export` instead, with the aten operators of each leaf
  module call folded back into one `call_module` node.
- operator granularity: `torch.export` and its aten operators, one node each.

The model is traced in its current mode (train or eval): Python branches on `self.training` are
fixed at trace time, so trace in the mode you will run. Tracing never changes the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from placewise.errors import PlacewiseError

GRANULARITIES = ("layer", "operator")
# fx node kinds that become operator-graph nodes; placeholders, attributes and outputs fold in.
CALL_OPS = ("call_module", "call_function", "call_method")
# The input-shape check torch.export inserts; it computes nothing the model needs.
_EXPORT_GUARD = "_guards_fn"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """When torch.export gives up it logs and prints the partial graph to stderr; the caller
    reports one line instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _flags_kept(model: nn.Module) -> Iterator[None]:
    """Restore train/eval flags and requires_grad, in case a tracer touches them."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def _fx_trace(model: nn.Module) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _export(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    # The batch dimension stays symbolic where the model allows, so pipeline stages can run
    # micro-batches of any size through the traced graph.
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                    for x in inputs)
    program = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
    return program.module()


def attribute(root: Any, target: str) -> Any:
    """The object at a dotted attribute path (an fx get_attr or call_module target)."""
    return operator.attrgetter(target)(root)


def _leaf_call(node: fx.Node, model: nn.Module) -> tuple[str, str] | None:
    """(stack key, module path) of the innermost module that ran `node`, if that module is a leaf."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key, (path, _) = list(stack.items())[-1]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return (key, path) if next(module.children(), None) is None else None


def _leaf_groups(graph: fx.Graph, model: nn.Module) -> dict[fx.Node, tuple[str, list[fx.Node]]]:
    """Runs of consecutive aten nodes from one leaf-module call that can become one call_module:
    a single tensor flows in (besides the module's own parameters and buffers) and a single value out.
    Maps each run's output node to (module path, the run's nodes)."""
    runs: list[tuple[tuple[str, str], list[fx.Node]]] = []
    for node in graph.nodes:
        call = _leaf_call(node, model) if node.op == "call_function" else None
        if call is not None and runs and runs[-1][0] == call and runs[-1][1][-1].next is node:
            runs[-1][1].append(node)
        elif call is not None:
            runs.append((call, [node]))
    groups = {}
    for (_, path), members in runs:
        inputs = _run_inputs(path, members)
        outputs = [n for n in members if any(u not in members for u in n.users)]
        if inputs is not None and len(inputs) == 1 and len(outputs) == 1:
            groups[outputs[0]] = (path, members)
    return groups


def _run_inputs(path: str, members: list[fx.Node]) -> list[fx.Node] | None:
    """The tensors a run of a leaf module's nodes reads from outside, besides the module's own
    parameters and buffers. Sizes (SymInts) are left out: export shares one size node across the
    graph, but the module computes its sizes from its own input again when called."""
    inside = set(members)
    found = []
    for n in members:
        for a in n.all_input_nodes:
            if a in inside or a in found or (a.op == "get_attr" and str(a.target).startswith(path + ".")):
                continue
            if isinstance(a.meta.get("val"), torch.Tensor):
                found.append(a)
            elif not _is_size(a):
                return None  # something else flows in: the run cannot become a one-input call
    return found


def _is_size(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)


def _rebuild(exported: fx.GraphModule, model: nn.Module, fold_leaves: bool) -> fx.GraphModule:
    """Copy the exported graph with the model's own modules and parameters as its attributes (so
    training the graph trains the model), dropping export's input guard and, for layer granularity,
    folding leaf-module runs into call_module nodes."""
    graph = fx.Graph()
    groups = _leaf_groups(exported.graph, model) if fold_leaves else {}
    grouped = {n: out for out, (_, members) in groups.items() for n in members}
    env: dict[fx.Node, fx.Node] = {}
    for node in exported.graph.nodes:
        if node.op == "call_module" and node.target == _EXPORT_GUARD:
            continue
        if node in grouped:
            if node in groups:
                path, members = groups[node]
                (source,) = _run_inputs(path, members) or ()
                env[node] = graph.call_module(path, (env[source],))
                env[node].meta = dict(node.meta)
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph._codegen = exported.graph._codegen
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            try:
                root[node.target] = attribute(model, node.target)
            except AttributeError:  # constants export lifted out of forward()
                root[node.target] = attribute(exported, node.target)
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__ + "Traced")
    # Dead code (outputs the model computes but does not return) is dropped; purity checks need
    # the owning module, so this runs after the GraphModule exists.
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _outputs_match(a: Any, b: Any) -> bool:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        (torch.allclose(x, y, rtol=1e-4, atol=1e-5) if x.is_floating_point() else torch.equal(x, y))
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y for x, y in zip(la, lb))


def _same_function(reference: fx.GraphModule, folded: fx.GraphModule, inputs: tuple) -> bool:
    """Run both graphs under the same random stream; folding must not change what is computed."""
    outs = []
    state = {k: v.detach().clone() for k, v in reference.state_dict(keep_vars=True).items()}
    for gm in (reference, folded):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            outs.append(gm(*inputs))
        with torch.no_grad():  # running stats (batch norm in train mode) are restored between runs
            for k, v in reference.state_dict(keep_vars=True).items():
                v.copy_(state[k])
    return _outputs_match(*outs)


def trace_model(model: nn.Module, example_inputs: Sequence[Any], granularity: str = "layer") -> fx.GraphModule:
    """Trace `model` into a GraphModule; deterministic: the same model gives the same node names.

    The GraphModule shares the model's modules and parameters. Trace in the mode the graph will
    run in (a profile records it as meta `mode`): export-traced models can differ between train and
    eval (a transformer's attention gains a `contiguous` node in train mode), fx-traced ones don't.
    Raises PlacewiseError (one line) when the model cannot be traced, e.g. for control flow on
    tensor values.
    """
    if granularity not in GRANULARITIES:
        raise PlacewiseError(f"granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    inputs = tuple(example_inputs)
    name = type(model).__name__
    fx_reason = None
    with _flags_kept(model):
        if granularity == "layer":
            try:
                gm = _fx_trace(model)
                gm.meta["placewise_tracer"] = "fx"
                return gm
            except Exception as e:  # noqa: BLE001 - any tracing failure sends the model to torch.export
                fx_reason = _first_line(e)
        try:
            with _quiet_export():
                exported = _export(model, inputs)
        except Exception as e:  # noqa: BLE001 - reported as one line with both tracers' reasons
            reasons = (f"torch.fx: {fx_reason}; " if fx_reason else "") + f"torch.export: {_first_line(e)}"
            raise PlacewiseError(f"cannot trace {name}: {reasons}; remove control flow that depends on tensor values "
                                 "(if/while on a tensor) from forward(), or move it into a leaf module") from None
        plain = _rebuild(exported, model, fold_leaves=False)
        gm = plain
        if granularity == "layer":
            folded = _rebuild(exported, model, fold_leaves=True)
            if _same_function(plain, folded, inputs):
                gm = folded
        gm.meta["placewise_tracer"] = "export"
    return gm
