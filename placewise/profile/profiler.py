"""From an `nn.Module` and example inputs to placewise's operator graph with measured costs.

One graph node per call node of the traced GraphModule (`Node.module` is the fx node's name, so a
plan can cut the model by it). Times are milliseconds measured on the profiling device:
`acc_time` is the time on the accelerator kind (measured on CUDA, or the CPU time when profiling
on CPU, to be divided by the device file's relative `speed` by the cost model), `cpu_time` the
time on this CPU. An edge carries its source's output bytes, and its transfer cost is those bytes
over the link bandwidth. A node's memory is its parameters and buffers (counted once, at their
first user) plus its output activation; in a training graph each node also has a backward node,
in its colocation class, holding the gradient and optimizer-state bytes, with edges reversed.

The memory split (`placewise.graph.model.MEMORY_PARTS`) is filled on every node, so
`memory` = parameters + output on a forward node and gradients + optimizer_state on a backward
node: `parameters` are the weights (parameters, buffers, constants) first used by the node;
`activations` the bytes autograd saves for the backward pass during the node's forward, for one
batch of the profiled size (see `placewise.profile.memory`; 0 in an inference graph); `output`
the bytes of the node's output (a backward node's: the gradients it sends). On the backward node,
`gradients` are the trainable parameters' bytes and `optimizer_state` that many bytes times the
state tensors of the optimizer the profile assumes (`--optimizer`, default Adam: 2).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from placewise.errors import PlacewiseError
from placewise.graph import Cluster, Edge, Node, OpGraph, write_paper
from placewise.graph.formats import DEFAULT_BANDWIDTH
from placewise.profile.memory import saved_activation_bytes
from placewise.profile.timing import (CLOCKS, Clock, model_preserved, time_backward, time_forward, time_update,
                                      time_whole_backward)
from placewise.profile.trace import CALL_OPS, attribute, trace_model
from placewise.run.choices import OPTIMIZER_STATES


@dataclass
class Measurement:
    """What one device measured: medians in milliseconds, per node and whole."""

    forward: dict[str, float]
    backward: dict[str, float]
    whole_forward: float
    whole_backward: float | None
    update: float | None = None  # one optimizer step over all trainable parameters (training only)


def scaled_to_whole(measured: Measurement) -> Measurement:
    """CPU node times scaled, per pass, so that they add up to the whole model's run.

    Each node is timed alone, re-run on warm inputs; the model run whole does the same work one node
    after another, with each node's inputs fresh from the one before and autograd's own work between
    nodes. On one CPU thread the whole run is the truth for the sum, and the sum came out 2-7% short of
    it (torchvision-style CNN, a small transformer encoder and an inception-style net, forward and
    backward), so that each stage's chunk was predicted short by as much. Accelerators keep their node
    times: there the whole run overlaps the host's launches with the device's work, which node times
    do not, so the two are not the same work."""
    def scaled(times: dict[str, float], whole: float | None) -> dict[str, float]:
        total = sum(times.values())
        if not whole or not total > 0:
            return times
        return {k: v * whole / total for k, v in times.items()}
    return replace(measured, forward=scaled(measured.forward, measured.whole_forward),
                   backward=scaled(measured.backward, measured.whole_backward))


class _Progress:
    """A rich progress bar on stderr when enabled; otherwise it does nothing."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=False)

    @contextlib.contextmanager
    def running(self) -> Iterator["_Progress"]:
        if self.bar is None:
            yield self
            return
        with self.bar:
            yield self

    def task(self, description: str, total: int) -> Callable[[], None]:
        if self.bar is None:
            return lambda: None
        task_id = self.bar.add_task(description, total=total)
        return lambda: self.bar.advance(task_id)


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def _shapes(inputs: tuple) -> str:
    return ", ".join(str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)


def check_runs(model: nn.Module, inputs: tuple, name: str) -> None:
    """Run once before tracing, so bad input shapes get a clear message instead of a trace error."""
    try:
        with torch.no_grad():
            model(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlacewiseError(f"{name}: a forward pass on inputs of shape {_shapes(inputs)} fails ({first}); "
                             "check --input-shape and --batch-size") from None


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _moved(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of `gm` on `device`, including what `.to` leaves behind: tensors the trace stored as
    plain attributes and factory calls (positions, masks) that the trace pinned to the CPU. (Tracing
    again on the device would be simpler but torch.export picks other operators there.)"""
    gm = copy.deepcopy(gm).to(device)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = attribute(gm, node.target)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.device != device:
                owner, _, leaf = node.target.rpartition(".")
                setattr(attribute(gm, owner) if owner else gm, leaf, value.to(device))
        pinned = node.kwargs.get("device")
        if pinned is not None and torch.device(pinned).type == "cpu":
            node.kwargs = {**node.kwargs, "device": device}
    gm.recompile()
    return gm


def _measure(gm: fx.GraphModule, model: nn.Module, inputs: tuple, device: torch.device, *, training: bool,
             repeats: int, warmup: int, clock: str, progress: _Progress,
             optimizer: str) -> tuple[Measurement, dict[str, Any]]:
    if device.type != "cpu":  # measure copies, so the caller's model never moves
        gm, model = _moved(gm, device), copy.deepcopy(model).to(device)
        inputs = tuple(_to(x, device) for x in inputs)
    clock = Clock(device, clock)
    tick = progress.task(f"forward on {device.type}", warmup + repeats)
    forward, whole, values = time_forward(gm, model, inputs, clock, repeats=repeats, warmup=warmup, grad=training,
                                          tick=tick)
    backward: dict[str, float] = {}
    whole_backward = update = None
    if training:
        tick = progress.task(f"backward on {device.type}", len(forward))
        backward = time_backward(gm, values, clock, repeats=repeats, warmup=warmup, tick=tick)
        whole_backward = time_whole_backward(gm, inputs, clock, repeats=repeats, warmup=warmup)
        update = time_update(gm, optimizer, clock, repeats=repeats, warmup=warmup)
    if device.type != "cpu":
        values = {k: torch.utils._pytree.tree_map(lambda x: _to(x, torch.device("cpu")), v) for k, v in values.items()}
    return Measurement(forward, backward, whole, whole_backward, update), values


def _resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PlacewiseError(f"--device {device!r}: use cpu or cuda (or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PlacewiseError("--device cuda: this machine has no CUDA device; profile with --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise PlacewiseError(f"--device {device!r}: use cpu or cuda (or cuda:N)")
    return dev


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Compute with `count` torch threads inside (None: leave them); a busy machine punishes more threads
    than cores hard (resnet18 on 128 images: 0.2 s with one thread, 3-4 s with two at load 10 on 2 cores)."""
    before = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise PlacewiseError(f"--threads is {count}; use 1 or more")
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile_model(model: nn.Module, example_inputs: Sequence[Any], *, name: str = "", granularity: str = "layer",
                  device: str = "cpu", training: bool = False, repeats: int = 5, warmup: int = 1,
                  bandwidth: float | None = None, cluster: Cluster | None = None, optimizer: str = "adam",
                  threads: int | None = 1, clock: str = "auto", progress: bool = False) -> OpGraph:
    """Trace and time `model` into an OpGraph (milliseconds, bytes). The model is left unchanged.

    `threads` sets torch's intra-op threads while profiling (None: leave as is); one thread times
    what one CPU core does, the unit of the planner's CPU kinds. `clock` on CPU: `cpu` (process CPU
    time), `wall`, or `auto` (CPU time with one thread, else wall time).
    """
    if repeats < 1:
        raise PlacewiseError(f"--repeats is {repeats}; use 1 or more")
    if warmup < 0:
        raise PlacewiseError(f"--warmup is {warmup}; use 0 or more")
    if optimizer not in OPTIMIZER_STATES:
        raise PlacewiseError(f"optimizer {optimizer!r}: use one of {', '.join(OPTIMIZER_STATES)}")
    bandwidth = bandwidth or (cluster.bandwidth if cluster and cluster.bandwidth else DEFAULT_BANDWIDTH)
    if not bandwidth > 0:
        raise PlacewiseError(f"bandwidth is {bandwidth}; use a positive number of bytes per second")
    dev = _resolve_device(device)
    if clock not in ("auto",) + CLOCKS:
        raise PlacewiseError(f"--clock {clock!r}: use auto, {' or '.join(CLOCKS)}")
    name = name or type(model).__name__
    inputs = tuple(example_inputs)
    started = time.perf_counter()
    bar = _Progress(progress)
    with model_preserved(model), torch_threads(threads), bar.running():
        if clock == "auto":
            clock = "cpu" if torch.get_num_threads() == 1 else "wall"
        model.train(training)
        check_runs(model, inputs, name)
        tick = bar.task("tracing", 1)
        gm = trace_model(model, inputs, granularity)
        tick()
        settings = dict(training=training, repeats=repeats, warmup=warmup, clock=clock, progress=bar, optimizer=optimizer)
        raw, values = _measure(gm, model, inputs, dev, **settings)
        # Without a warm-up the whole runs include first-call costs the nodes' medians do not (node sums
        # came out at 2x the whole backward), so they are no truth to scale to.
        to_whole = scaled_to_whole if warmup >= 1 else (lambda m: m)
        measured = to_whole(raw) if dev.type == "cpu" else raw
        on_cpu = measured if dev.type == "cpu" else to_whole(
            _measure(gm, model, inputs, torch.device("cpu"), **settings)[0])
        saved = saved_activation_bytes(gm, inputs) if training else {}
        graph = _build_graph(gm, values, measured, on_cpu, saved, name=name, training=training,
                             bandwidth=bandwidth, optimizer=optimizer, cluster=cluster)
    meta = graph.meta_dict
    meta.update(_whole_run_check(raw, training))
    meta.update(model=name, granularity=granularity, tracer=gm.meta.get("placewise_tracer", "fx"),
                mode="train" if training else "eval", device=str(dev), clock=clock if dev.type == "cpu" else "cuda-events", repeats=repeats, warmup=warmup,
                threads=threads or torch.get_num_threads(), inputs=_shapes(inputs),
                profile_seconds=f"{time.perf_counter() - started:.3f}")
    return replace(graph, meta=tuple(sorted((k, str(v)) for k, v in meta.items())))


def _build_graph(gm: fx.GraphModule, values: dict[str, Any], measured: Measurement, on_cpu: Measurement,
                 saved: dict[str, int], *, name: str, training: bool, bandwidth: float, optimizer: str,
                 cluster: Cluster | None) -> OpGraph:
    calls = [n for n in gm.graph.nodes if n.op in CALL_OPS]
    ids = {n.name: i for i, n in enumerate(calls)}
    out_bytes = {n.name: _nbytes(values[n.name]) for n in calls}
    ms_per_byte = 1000.0 / bandwidth
    modules = dict(gm.named_modules())
    # A backward node sends the gradients of all of its inputs that carry one.
    grad_in = {n.name: sum(out_bytes[a.name] for a in n.all_input_nodes
                           if a.name in ids and _carries_grad(values[a.name])) for n in calls}
    seen: set[int] = set()
    count = len(calls)
    nodes: list[Node] = []
    backward_nodes: list[Node] = []
    for n in calls:
        tensors = []
        if n.op == "call_module":
            tensors += list(modules[n.target].parameters()) + list(modules[n.target].buffers())
        for a in n.all_input_nodes:
            if a.op == "get_attr" and isinstance(attribute(gm, a.target), torch.Tensor):
                tensors.append(attribute(gm, a.target))
        own = [t for t in tensors if id(t) not in seen]
        seen.update(id(t) for t in own)
        state_bytes = sum(_nbytes(t) for t in own)
        grad_bytes = sum(_nbytes(t) for t in own if isinstance(t, nn.Parameter) and t.requires_grad)
        i = ids[n.name]
        nodes.append(Node(i, n.name, measured.forward[n.name], on_cpu.forward[n.name],
                          float(state_bytes + out_bytes[n.name]), True, False, i if training else None, None, n.name,
                          parameters=float(state_bytes), gradients=0.0, optimizer_state=0.0,
                          activations=float(saved.get(n.name, 0)), output=float(out_bytes[n.name])))
        if training:
            state = float(grad_bytes * OPTIMIZER_STATES[optimizer])
            backward_nodes.append(Node(count + i, f"{n.name}.backward", measured.backward[n.name],
                                       on_cpu.backward[n.name], float(grad_bytes) + state, True, True, i, None, n.name,
                                       parameters=0.0, gradients=float(grad_bytes), optimizer_state=state,
                                       activations=0.0, output=float(grad_in[n.name])))
    edges = []
    for n in calls:
        producers = [a for a in n.all_input_nodes if a.name in ids]
        edges += [Edge(ids[a.name], ids[n.name], out_bytes[a.name] * ms_per_byte, float(out_bytes[a.name]))
                  for a in producers]
    if training:
        for n in calls:
            for a in n.all_input_nodes:
                if a.name in ids and _carries_grad(values[a.name]):
                    edges.append(Edge(count + ids[n.name], count + ids[a.name], grad_in[n.name] * ms_per_byte,
                                      float(grad_in[n.name])))
    meta = {"format": "profile", "time_unit": "ms", "bandwidth": repr(bandwidth), "optimizer": optimizer,
            "acc_forward_ms": f"{measured.whole_forward:.6g}", "cpu_forward_ms": f"{on_cpu.whole_forward:.6g}"}
    if training and measured.update is not None and on_cpu.update is not None:
        # One optimizer step over all parameters (`plan.predict` shares it out by parameter bytes).
        meta.update(acc_update_ms=f"{measured.update:.6g}", cpu_update_ms=f"{on_cpu.update:.6g}")
    return OpGraph.build(nodes + backward_nodes, edges, cluster=cluster, name=name, meta=meta,
                         source=f"profile of {name}")


def _whole_run_check(raw: Measurement, training: bool) -> dict[str, str]:
    """The node times as measured against the whole runs (a ratio under 1: the nodes add up to less; on
    CPU the graph's times are scaled to the whole runs, `scaled_to_whole`)."""
    forward_sum = sum(raw.forward.values())
    check = {"whole_forward_ms": f"{raw.whole_forward:.6g}", "node_forward_sum_ms": f"{forward_sum:.6g}",
             "forward_ratio": f"{forward_sum / raw.whole_forward:.4f}" if raw.whole_forward > 0 else "nan"}
    if training and raw.whole_backward:
        backward_sum = sum(raw.backward.values())
        check.update(whole_backward_ms=f"{raw.whole_backward:.6g}", node_backward_sum_ms=f"{backward_sum:.6g}",
                     backward_ratio=f"{backward_sum / raw.whole_backward:.4f}")
    return check


def _carries_grad(value: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(value))


def paper_graph(graph: OpGraph, cluster: Cluster | None = None) -> dict:
    """The paper's JSON for a profiled graph: its format has no speeds, so times are divided by the
    accelerator kind's and the CPU kind's speed first (at most one of each)."""
    cluster = cluster or graph.cluster or Cluster.simple(1, 0, None)
    acc = [k for k in cluster.kinds if k.accelerator and k.count > 0]
    cpu = [k for k in cluster.kinds if not k.accelerator and k.count > 0]
    if len(acc) > 1 or len(cpu) > 1:
        raise PlacewiseError("the paper's JSON holds one accelerator kind and one CPU kind; export with a device file "
                             f"of at most one of each (this one has {', '.join(k.name for k in cluster.kinds)})")
    acc_speed = acc[0].speed if acc else 1.0
    cpu_speed = cpu[0].speed if cpu else 1.0
    scaled = replace(graph, nodes=tuple(replace(n, acc_time=n.acc_time / acc_speed, cpu_time=n.cpu_time / cpu_speed)
                                        for n in graph.nodes), cluster=None)
    flat = Cluster(tuple(replace(k, speed=1.0) for k in (acc + cpu)), cluster.bandwidth)
    return write_paper(scaled, flat)


def export_paper(graph: OpGraph, path: str | os.PathLike, cluster: Cluster | None = None) -> None:
    Path(path).write_text(json.dumps(paper_graph(graph, cluster), indent=1) + "\n")
