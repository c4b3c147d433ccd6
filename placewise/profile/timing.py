"""Timing a traced model node by node, forward and backward, on CPU or CUDA.

Forward: the graph is run whole, several times, with a clock around each node's call only (no
interpreter bookkeeping inside the timed region), so a node is timed in its real context (caches,
allocator, in-place semantics) and the per-node sum can be checked against an untimed whole run.
Backward: each node is re-run on its recorded inputs and `torch.autograd.grad` of its outputs is
timed (the graph kept between repeats), which never touches any parameter's `.grad`.
CPU is timed by process CPU time (one thread) or wall time; CUDA with events, read after one
synchronisation per run. On CUDA a node costs the larger of two times: the host's, launching its
kernels, and the GPU's, running them. The GPU's is measured with the GPU kept busy (a sleep kernel
queued ahead of the node), so that it does not count the GPU idling while the host launches: in a
real run the host launches one node while the GPU still runs the one before.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from placewise.profile.trace import CALL_OPS, attribute
from placewise.run.choices import DEFAULT_MOMENTUM, MOMENTUM
from placewise.run.optim import make_optimizer

Tick = Callable[[], None]
# The sleep queued ahead of a timed CUDA node: longer than the host takes to launch most nodes, so
# the GPU never waits on the host inside the timed region.
COVER_MS = 0.5
_cycles_per_ms: dict[int, float] = {}


def _sleep_cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles per millisecond of `torch.cuda._sleep`, measured once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cycles_per_ms:
        cycles = 10_000_000
        torch.cuda._sleep(cycles // 10)  # warm up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _cycles_per_ms[index] = cycles / max(start.elapsed_time(end), 1e-3)
    return _cycles_per_ms[index]


@contextlib.contextmanager
def model_preserved(model: nn.Module) -> Iterator[None]:
    """Leave the model as it was: values of parameters and buffers (batch-norm statistics move
    when a training-mode forward runs), train/eval flags, requires_grad and `.grad`. (The profiler
    adds no hooks: it times calls from its own loop.)"""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    state = [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, saved in state:
                t.copy_(saved)
        for m, mode in modes:
            m.training = mode
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


CLOCKS = ("cpu", "wall")


class Clock:
    """Times regions on one device. On CPU either the process's CPU time (`cpu`: what the work
    costs a core, unaffected by other processes taking the core away; right for one thread) or
    wall time (`wall`: right for several threads, which CPU time would add up). CUDA uses events."""

    def __init__(self, device: torch.device, kind: str = "cpu") -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda" if self.cuda else kind
        self._now = time.process_time if kind == "cpu" else time.perf_counter
        self._cover = int(_sleep_cycles_per_ms(device) * COVER_MS) if self.cuda else 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self, cover: bool = False) -> Any:
        """A point in time; `cover` (CUDA, at the start of a node) first queues the sleep that keeps
        the GPU busy while the host launches the node."""
        if self.cuda:
            if cover:
                torch.cuda._sleep(self._cover)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event, time.perf_counter()
        return self._now()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks (after `sync` on CUDA: the larger of GPU and host time)."""
        if self.cuda:
            return max(float(start[0].elapsed_time(end[0])), (end[1] - start[1]) * 1000.0)
        return (end - start) * 1000.0


def _call(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> Callable[..., Any]:
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_function":
        return node.target
    return lambda obj, *a, **k: getattr(obj, node.target)(*a, **k)


@dataclass
class GraphRunner:
    """Runs a GraphModule node by node, timing each call node; optionally keeps every value."""

    gm: fx.GraphModule
    clock: Clock
    nodes: list[fx.Node] = field(init=False)
    calls: dict[str, Callable[..., Any]] = field(init=False)
    last_use: dict[fx.Node, list[fx.Node]] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.gm.graph.nodes)
        modules = dict(self.gm.named_modules())
        self.calls = {n.name: _call(self.gm, n, modules) for n in self.nodes if n.op in CALL_OPS}
        # Free each value after its last reader, as the compiled forward does.
        last: dict[fx.Node, fx.Node] = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                last[a] = n
        self.last_use = {}
        for value, reader in last.items():
            self.last_use.setdefault(reader, []).append(value)

    def run(self, inputs: tuple, *, times: dict[str, list[float]] | None = None, keep: bool = False,
            around: Callable[[fx.Node], contextlib.AbstractContextManager] | None = None) -> dict[fx.Node, Any]:
        """One run of the graph; `around(node)`, if given, is entered around each call node's
        call (outside the timed region), so a caller can watch what one node does."""
        env: dict[fx.Node, Any] = {}
        args = iter(self.gm.graph.process_inputs(*inputs))
        marks: list[tuple[str, Any, Any]] = []
        load = lambda a: env[a]  # noqa: E731
        for n in self.nodes:
            if n.op == "placeholder":
                env[n] = next(args, n.args[0] if n.args else None)
            elif n.op == "get_attr":
                env[n] = attribute(self.gm, n.target)
            elif n.op == "output":
                env[n] = fx.node.map_arg(n.args[0], load)
            else:
                fn = self.calls[n.name]
                a, k = fx.node.map_arg(n.args, load), fx.node.map_arg(n.kwargs, load)
                with around(n) if around else contextlib.nullcontext():
                    start = self.clock.mark(cover=True)
                    env[n] = fn(*a, **k)
                    end = self.clock.mark()
                marks.append((n.name, start, end))
            if not keep:
                for dead in self.last_use.get(n, ()):
                    if dead.op != "output":
                        env.pop(dead, None)
        self.clock.sync()
        if times is not None:
            for name, start, end in marks:
                times.setdefault(name, []).append(self.clock.ms(start, end))
        return env


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _detached(x: Any) -> Any:
    """A value without its autograd history; a tensor keeps requires_grad where autograd tracked it,
    so backward timing knows which inputs carry gradients."""
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_(x.requires_grad and x.is_floating_point())
    return x


def time_forward(gm: fx.GraphModule, model: nn.Module, inputs: tuple, clock: Clock, *, repeats: int,
                 warmup: int, grad: bool, tick: Tick = lambda: None) -> tuple[dict[str, float], float, dict[str, Any]]:
    """Median forward milliseconds per call node and of the whole model, and every node's value
    (detached) from the last run.

    Whole-model and node-by-node runs alternate so that load from other processes hits both alike.
    """
    runner = GraphRunner(gm, clock)
    per_node: dict[str, list[float]] = {}
    whole: list[float] = []
    env: dict[fx.Node, Any] = {}
    with torch.set_grad_enabled(grad):
        for i in range(warmup + repeats):
            start = clock.mark()
            model(*inputs)
            end = clock.mark()
            clock.sync()
            last = i == warmup + repeats - 1
            env = runner.run(inputs, times=per_node if i >= warmup else None, keep=last)
            if i >= warmup:
                whole.append(clock.ms(start, end))
            tick()
    values = {n.name: tree_map(_detached, v) for n, v in env.items()}
    return {k: median(v) for k, v in per_node.items()}, median(whole), values


def _differentiable(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def time_backward(gm: fx.GraphModule, values: dict[str, Any], clock: Clock, *, repeats: int, warmup: int,
                  tick: Tick = lambda: None) -> dict[str, float]:
    """Median backward milliseconds per call node: gradients of its inputs and parameters from its
    outputs' gradients. Nodes whose outputs carry no gradient take 0."""
    modules = dict(gm.named_modules())
    out: dict[str, float] = {}
    for n in gm.graph.nodes:
        if n.op not in CALL_OPS:
            continue
        out[n.name] = _node_backward(n, _call(gm, n, modules), modules, values, clock, repeats, warmup)
        tick()
    return out


def _node_backward(n: fx.Node, fn: Callable[..., Any], modules: dict[str, nn.Module], values: dict[str, Any],
                   clock: Clock, repeats: int, warmup: int) -> float:
    wrt: list[torch.Tensor] = []

    def prepare(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            leaf = x.detach().requires_grad_(x.requires_grad)
            if leaf.requires_grad:
                wrt.append(leaf)
            # A clone keeps in-place operators off the recorded values and off the leaf itself.
            return leaf.clone()
        return x

    load = lambda a: tree_map(prepare, values[a.name])  # noqa: E731
    args, kwargs = fx.node.map_arg(n.args, load), fx.node.map_arg(n.kwargs, load)
    if n.op == "call_module":
        wrt += [p for p in modules[n.target].parameters() if p.requires_grad]
    with torch.enable_grad():
        result = fn(*args, **kwargs)
    outputs = [t for t in tree_leaves(result) if _differentiable(t) and t.grad_fn is not None]
    if not outputs or not wrt:
        return 0.0
    grad_outputs = [torch.ones_like(t) for t in outputs]
    samples = []
    for i in range(warmup + repeats):
        start = clock.mark(cover=True)
        torch.autograd.grad(outputs, wrt, grad_outputs, retain_graph=True, allow_unused=True)
        end = clock.mark()
        clock.sync()
        if i >= warmup:
            samples.append(clock.ms(start, end))
    return median(samples)


def time_whole_backward(gm: fx.GraphModule, inputs: tuple, clock: Clock, *, repeats: int, warmup: int) -> float:
    """Median milliseconds of one backward pass of the whole graph, gradients for its parameters."""
    params = [p for p in gm.parameters() if p.requires_grad]
    if not params:
        return 0.0
    samples = []
    for i in range(warmup + repeats):
        with torch.enable_grad():
            outputs = [t for t in tree_leaves(gm(*inputs)) if _differentiable(t)]
        if not outputs:
            return 0.0
        grad_outputs = [torch.ones_like(t) for t in outputs]
        start = clock.mark()
        torch.autograd.grad(outputs, params, grad_outputs, allow_unused=True)
        end = clock.mark()
        clock.sync()
        if i >= warmup:
            samples.append(clock.ms(start, end))
    return median(samples)


def time_update(gm: fx.GraphModule, optimizer: str, clock: Clock, *, repeats: int, warmup: int) -> float:
    """Median milliseconds of one optimizer step and zero_grad over the graph's trainable parameters,
    as a training step ends; run on copies, so the model's parameters never change. `optimizer` is a
    profile's (`OPTIMIZER_STATES`), built as the trainers build it."""
    params = [p.detach().clone().requires_grad_() for p in gm.parameters() if p.requires_grad]
    if not params:
        return 0.0
    name, momentum = ("sgd", DEFAULT_MOMENTUM) if optimizer == MOMENTUM else (optimizer, 0.0)
    opt = make_optimizer(name, params, 1e-3, momentum)
    samples = []
    for i in range(warmup + repeats):
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        start = clock.mark()
        opt.step()
        opt.zero_grad()
        end = clock.mark()
        clock.sync()
        if i >= warmup:
            samples.append(clock.ms(start, end))
    return median(samples)
