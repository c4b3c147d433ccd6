"""Run a plan: cut a traced model into one submodule per stage and pipeline it on torch.distributed.

The cut works on a `torch.fx.GraphModule` and a map {fx node name: stage index} (what a plan's
`Stage.modules` lists, in pipeline order). Stage s receives, as positional tensors, every value made
before it that stage s or a later one still reads, and hands on every value that a later stage reads:
a residual that skips stages rides through the stages in between, because a pipeline stage talks only
to its neighbours. Non-tensor values crossing a cut (shapes, sizes) travel packed in small tensors.

Each process owns one stage, wrapped as a `torch.distributed.pipelining.PipelineStage` with static
shapes (taken from one example microbatch run on every rank), and drives it with `ScheduleGPipe` or
`Schedule1F1B`: training (loss on the last stage) or forward-only inference (`schedule.eval`).
`pipeline_rank` is the function the launcher runs on every rank; `run_single` is the same job in one
process without cutting: the reference for tests and the baseline for benchmarks.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from placewise.errors import PlacewiseError

SCHEDULES = ("gpipe", "1f1b")
# Distinct synthetic batches a run cycles through.
BATCHES = 4
OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
FUSE_MODES = ("none", "backward", "backward-overlap", "forward")


# ---- the model --------------------------------------------------------------------------------------
def build(spec: str, batch_size: int, input_shape: Sequence[int] | None = None,
          seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model and a full batch of example inputs, initialised from `seed` (same on every rank).

    `spec` is `package.module:factory` (the factory takes any of `batch_size`, `input_shape`, and returns
    a module or (module, example inputs)) or a model name known to `placewise.profile.models`.
    """
    torch.manual_seed(seed)
    if ":" in spec and spec.partition(":")[0] != "mlp":  # mlp:H1xH2 is a named model
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise PlacewiseError(f"model {spec!r}: cannot import it ({e}); give package.module:factory") from None
        accepted = inspect.signature(factory).parameters
        kwargs = {k: v for k, v in (("batch_size", batch_size), ("input_shape", input_shape))
                  if k in accepted and v is not None}
        made = factory(**kwargs)
    else:
        try:
            from placewise.profile.models import build_model
        except ImportError:
            raise PlacewiseError(f"model {spec!r}: named models need placewise.profile, which is not built yet; "
                                 "give package.module:factory") from None
        made = build_model(spec, batch_size=batch_size, input_shape=tuple(input_shape) if input_shape else None,
                           seed=seed)
    if isinstance(made, tuple):
        model, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    else:
        if not input_shape:
            raise PlacewiseError(f"model {spec!r} gives no example inputs; pass --input-shape")
        model, inputs = made, (torch.randn(batch_size, *input_shape),)
    if not isinstance(model, nn.Module):
        raise PlacewiseError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    if any(t.shape[0] != batch_size for t in inputs):
        raise PlacewiseError(f"model {spec!r}: example inputs have batch {[t.shape[0] for t in inputs]}, "
                             f"not --batch-size {batch_size}; make the factory honour batch_size")
    return model, inputs


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


# ---- the cut ----------------------------------------------------------------------------------------
def mapping_from_plan(plan) -> dict[str, int]:
    """{fx node name: stage index} from a plan's stages (pipeline order)."""
    mapping: dict[str, int] = {}
    for s, stage in enumerate(plan.stages):
        for name in stage.modules:
            mapping[name] = s
    if not mapping:
        raise PlacewiseError("the plan's stages name no model nodes; plan a graph made by `placewise profile` "
                             "of this model")
    return mapping


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
def _pack(value: Any) -> torch.Tensor:
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
                graph.output(fx.map_arg(n.args[0], use))
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
                                     else graph.call_function(_pack, (env[name],)))
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


# ---- the job a rank runs ----------------------------------------------------------------------------
@dataclass
class PipelineJob:
    """What every rank needs to rebuild the same model, cut it the same way and run its stage."""
    model: str
    batch_size: int
    mapping: dict[str, int] = field(default_factory=dict)  # empty: run the whole model in one process
    input_shape: tuple[int, ...] | None = None
    mode: str = "train"  # train | infer
    schedule: str = "1f1b"
    microbatches: int = 4
    steps: int = 1
    warmup: int = 0  # steps run before timing starts
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    fuse: str = "none"  # none | backward | backward-overlap | forward (see placewise.fuse)
    seed: int = 0
    collect: tuple[str, ...] = ()  # grads, outputs: also return these (tests)
    fail_at_step: tuple[int, int] | None = None  # (stage, step): raise there (tests of shutdown)
    progress: bool = False

    @property
    def n_stages(self) -> int:
        return max(self.mapping.values()) + 1 if self.mapping else 1

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise PlacewiseError(f"schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise PlacewiseError(f"optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.fuse not in FUSE_MODES:
            raise PlacewiseError(f"--fuse {self.fuse!r}: use one of {', '.join(FUSE_MODES)}")
        for name in ("batch_size", "microbatches", "steps"):
            if getattr(self, name) < 1:
                raise PlacewiseError(f"--{name.replace('_', '-')} is {getattr(self, name)}; use 1 or more")
        if self.batch_size % self.microbatches:
            raise PlacewiseError(f"--batch-size {self.batch_size} does not split into {self.microbatches} equal "
                                 "microbatches; make it a multiple of --microbatches")
        if self.mapping and self.microbatches < self.n_stages:
            raise PlacewiseError(f"--microbatches {self.microbatches} is fewer than the plan's {self.n_stages} stages; "
                                 "torch's pipeline schedules need at least one microbatch per stage")


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on class scores (last dim), mean squared error on anything else."""
    if target.dtype == torch.int64:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.mse_loss(output, target)


def _output_tensor(values: Mapping[str, Any], gm: fx.GraphModule) -> torch.Tensor:
    out = values[next(n for n in gm.graph.nodes if n.op == "output").name]
    if not isinstance(out, torch.Tensor):
        raise PlacewiseError(f"the model returns {type(out).__name__}; a pipeline needs one tensor out (wrap the model)")
    return out


def batch(job: PipelineJob, example_inputs: tuple[torch.Tensor, ...], output_like: torch.Tensor,
          step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Inputs and targets of one step, the same on every rank: synthetic data that cycles through
    BATCHES batches (so training has something to learn), float inputs drawn from the seed, integer
    inputs (token ids) kept; class targets for class scores, regression targets otherwise."""
    g = torch.Generator().manual_seed(job.seed * 1_000_003 + step % BATCHES)
    inputs = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t
                   for t in example_inputs)
    shape = (job.batch_size, *output_like.shape[1:])
    if output_like.dim() >= 2 and output_like.is_floating_point() and job.mode == "train":
        target = torch.randint(0, output_like.shape[-1], shape[:-1], generator=g)
    else:
        target = torch.randn(shape, generator=g)
    return inputs, target


def _optimizer(job: PipelineJob, module: nn.Module):
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return None
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "adagrad": torch.optim.Adagrad}[job.optimizer]
    kwargs = {"lr": job.lr, **({"momentum": job.momentum} if job.optimizer == "sgd" else {})}
    if job.fuse != "none":
        from placewise.fuse import fuse_optimizer
        mode, _, overlap = job.fuse.partition("-")  # "backward-overlap": backward mode on a worker thread
        return fuse_optimizer(module, cls, mode=mode, overlap=overlap == "overlap", **kwargs)
    return cls(params, **kwargs)


class _Clock:
    """Seconds a stage spends computing forward and backward chunks (not waiting for its neighbours):
    wall time, and the CPU time of the computing thread (what a one-thread profile measures; it does
    not grow when other processes share the cores). Each timed chunk is also kept as an event
    (forward/backward, microbatch, start, end) on the machine's monotonic clock, which all local
    ranks share, for the pipeline timeline picture."""

    def __init__(self) -> None:
        self.forward = self.backward = self.cpu = 0.0
        self.on = False
        self.events: list[tuple[str, int, float, float]] = []

    def wrap(self, fn: Callable, attr: str) -> Callable:
        def timed(*args, **kwargs):
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    end = time.perf_counter()
                    setattr(self, attr, getattr(self, attr) + end - start)
                    self.cpu += time.thread_time() - start_cpu
                    chunk = args[0] if args and isinstance(args[0], int) else -1
                    self.events.append((attr, chunk, start, end))
        return timed


def _progress(job: PipelineJob, rank: int):
    if not (job.progress and rank == 0):
        return None
    from rich.progress import Progress
    progress = Progress(transient=True)
    progress.start()
    return progress, progress.add_task(f"{job.mode} ({job.n_stages} stage(s))", total=job.warmup + job.steps)


def _device(rank: int) -> torch.device:
    """Each stage's process gets one device: its local GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class Prepared:
    """A job's model, traced and cut, with each node's value on one example microbatch."""
    gm: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]  # a full batch
    micro: tuple[torch.Tensor, ...]  # its first microbatch
    values: dict[str, Any]
    parts: list[StagePart]


def prepare(job: PipelineJob) -> Prepared:
    """Build, trace and cut the job's model; every rank does the same and gets the same cut."""
    job.check()
    model, example_inputs = build(job.model, job.batch_size, job.input_shape, job.seed)
    model.train(job.mode == "train")
    return cut_model(model, example_inputs, job.mapping, job.microbatches)


def cut_model(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], mapping: Mapping[str, int],
              microbatches: int) -> Prepared:
    """Trace `model` (in the mode it is in) and cut it by `mapping` ({} for no cut). The stages' modules
    share the model's parameters. Raises PlacewiseError when the mapping does not fit the model."""
    gm = trace(model, example_inputs)
    micro = tuple(t[: t.shape[0] // microbatches] for t in example_inputs)
    values = record_values(gm, micro)
    parts = cut(gm, mapping, values) if mapping else []
    _output_tensor(values, gm)
    return Prepared(gm, example_inputs, micro, values, parts)


def stage_schedule(prepared: Prepared, stage_index: int, *, schedule: str, microbatches: int, training: bool,
                   group=None) -> tuple[nn.Module, Any, Any]:
    """This process's stage of a cut model as a `PipelineStage` with static shapes, on this rank's device, and
    its GPipe or 1F1B schedule (training: the loss of each microbatch divided by `microbatches`).
    Every rank of `group` (rank i runs stage i) calls this with its own `stage_index`."""
    gm, micro, values = prepared.gm, prepared.micro, prepared.values
    part = prepared.parts[stage_index]
    n_stages = len(prepared.parts)
    device = _device(dist.get_rank())
    module = part.module.to(device)
    module.train(training)

    def example(value: Any) -> torch.Tensor:
        # Static shapes for the stage; floats between stages carry gradients when training.
        t = value if isinstance(value, torch.Tensor) else _pack(value)
        return t.detach().contiguous().to(device).requires_grad_(training and t.is_floating_point())

    first, last = stage_index == 0, stage_index == n_stages - 1
    input_args = tuple(t.to(device) for t in micro) if first else tuple(example(values[n]) for n in part.inputs)
    output_args = (example(_output_tensor(values, gm)),) if last else tuple(example(values[n]) for n in part.outputs)
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    stage = PipelineStage(module, stage_index, n_stages, device, input_args=input_args, output_args=output_args,
                          group=group)
    schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    # Each microbatch's loss is divided by M, so the gradients are the batch mean as soon as the last
    # backward ends, with nothing to rescale afterwards (fused updates happen inside that backward).
    runner = schedule_cls(stage, microbatches, scale_grads=False,
                          loss_fn=(lambda out, target: loss_fn(out, target) / microbatches) if training else None)
    return module, stage, runner


def run_stage(job: PipelineJob, stage_index: int, group=None) -> dict[str, Any]:
    """Run this process's stage of `job` (all ranks of `group` call this); a report of what it measured."""
    prepared = prepare(job)
    gm, example_inputs, values = prepared.gm, prepared.example_inputs, prepared.values
    part = prepared.parts[stage_index]
    training = job.mode == "train"
    module, stage, schedule = stage_schedule(prepared, stage_index, schedule=job.schedule,
                                             microbatches=job.microbatches, training=training, group=group)
    device = stage.device
    first, last = stage_index == 0, stage_index == job.n_stages - 1
    optimizer = _optimizer(job, module) if training else None
    backward = stage.backward_one_chunk
    if job.fuse.startswith("backward") and optimizer is not None:
        # A fused update fires when a gradient is final: only in the last microbatch's backward.
        def backward(*args, last_backward: bool = False, _backward=stage.backward_one_chunk, **kwargs):
            with contextlib.nullcontext() if last_backward else optimizer.accumulate():
                return _backward(*args, last_backward=last_backward, **kwargs)
    clock = _Clock()
    stage.forward_one_chunk = clock.wrap(stage.forward_one_chunk, "forward")
    stage.backward_one_chunk = clock.wrap(backward, "backward")
    output_like = _output_tensor(values, gm)
    report: dict[str, Any] = {"stage": stage_index, "nodes": part.nodes, "losses": [], "step_seconds": []}
    progress = _progress(job, dist.get_rank())
    try:
        for step in range(job.warmup + job.steps):
            if job.fail_at_step == (stage_index, step):
                raise RuntimeError(f"stage {stage_index} failed on purpose at step {step}")
            inputs, target = batch(job, example_inputs, output_like, step)
            args = tuple(t.to(device) for t in inputs) if first else ()
            kwargs = {"target": target.to(device)} if last and training else {}
            clock.on = step >= job.warmup
            start = time.perf_counter()
            if training:
                losses: list[torch.Tensor] = []
                out = schedule.step(*args, losses=losses, **kwargs)
                if last:
                    report["losses"].append(float(torch.stack(losses).sum().detach()))
                if step == 0 and "grads" in job.collect:
                    report["grads"] = {k: p.grad.detach().cpu().clone() for k, p in module.named_parameters()
                                       if p.grad is not None}
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad()
            else:
                with torch.no_grad():
                    out = schedule.eval(*args)
            if step >= job.warmup:
                report["step_seconds"].append(time.perf_counter() - start)
                report.setdefault("step_starts", []).append(start)
            if last and step == 0 and "outputs" in job.collect:
                report["outputs"] = out.detach().cpu()
            if progress:
                progress[0].advance(progress[1])
    finally:
        if progress:
            progress[0].stop()
    report.update(forward_seconds=clock.forward, backward_seconds=clock.backward, cpu_seconds=clock.cpu,
                  events=clock.events,
                  samples=job.batch_size * job.steps, microbatches=job.microbatches)
    return report


def run_single(job: PipelineJob) -> dict[str, Any]:
    """`job` in this process on the uncut model: the same microbatches, losses averaged over them."""
    prepared = prepare(replace(job, mapping={}))
    gm, example_inputs = prepared.gm, prepared.example_inputs
    training = job.mode == "train"
    output_like = _output_tensor(prepared.values, gm)
    gm.train(training)
    optimizer = _optimizer(job, gm) if training else None
    report: dict[str, Any] = {"stage": 0, "losses": [], "step_seconds": [], "cpu_seconds": 0.0}
    for step in range(job.warmup + job.steps):
        inputs, target = batch(job, example_inputs, output_like, step)
        start, start_cpu = time.perf_counter(), time.thread_time()
        if training:
            chunks = zip(*(t.chunk(job.microbatches) for t in inputs), target.chunk(job.microbatches))
            losses = [loss_fn(gm(*c[:-1]), c[-1]) for c in chunks]
            loss = torch.stack(losses).mean()
            loss.backward()
            report["losses"].append(float(loss.detach()))
            if step == 0 and "grads" in job.collect:
                report["grads"] = {k: p.grad.detach().clone() for k, p in gm.named_parameters() if p.grad is not None}
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()
        else:
            with torch.no_grad():
                out = torch.cat([gm(*chunk) for chunk in zip(*(t.chunk(job.microbatches) for t in inputs))])
            if step == 0 and "outputs" in job.collect:
                report["outputs"] = out
        if step >= job.warmup:
            report["step_seconds"].append(time.perf_counter() - start)
            report["cpu_seconds"] += time.thread_time() - start_cpu
    report.update(samples=job.batch_size * job.steps)
    return report


def pipeline_rank(rank: int, world_size: int, jobs: Sequence[PipelineJob]) -> list[dict[str, Any] | None]:
    """The launcher's rank function: run each job's stage on the first `n_stages` ranks (others sit it out).

    Several jobs share one process group (tests start processes once); a job with fewer stages than
    processes runs on a subgroup of the first ranks."""
    sizes = sorted({job.n_stages for job in jobs})
    for n in sizes:
        if n > world_size:
            raise PlacewiseError(f"a job needs {n} processes but only {world_size} were started")
    # new_group is collective: every rank creates every subgroup, in the same order.
    groups = {n: (None if n == world_size else dist.new_group(list(range(n)))) for n in sizes if n > 1}
    results: list[dict[str, Any] | None] = []
    for job in jobs:
        if job.n_stages == 1:
            results.append(run_single(job) if rank == 0 else None)
        elif rank < job.n_stages:
            results.append(run_stage(job, rank, groups[job.n_stages]))
        else:
            results.append(None)
    return results


def _gathered_rank(rank: int, world_size: int, job: PipelineJob) -> list[dict[str, Any]]:
    """Under torchrun: run this rank's stage, then gather every stage's report (all ranks get them)."""
    reports: list[Any] = [None] * world_size
    dist.all_gather_object(reports, pipeline_rank(rank, world_size, [job])[0])
    return reports


def run_pipeline(job: PipelineJob, *, threads: int = 1, timeout_s: float = 600.0) -> list[dict[str, Any]] | None:
    """Run `job` with one process per stage: started here on this machine (gloo over 127.0.0.1, or NCCL
    when there is a GPU per stage), or, inside `torchrun`, as this process's rank (several machines:
    `torchrun --nnodes H --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT
    -m placewise.cli train MODEL --plan PLAN.json`, H x P = the plan's stages, rank r runs stage r).
    Per-stage reports; under torchrun only rank 0 gets them (others None)."""
    from placewise.run.launcher import is_torchrun, launch, run_rank
    prepare(job)  # bad input fails here, in one line, before any process starts
    n = job.n_stages
    if is_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != n:
            raise PlacewiseError(f"torchrun started {world} processes but the plan has {n} stages; start {n}")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        nccl = torch.cuda.is_available() and local < torch.cuda.device_count()
        if nccl:
            torch.cuda.set_device(local)
        torch.set_num_threads(threads)
        reports = run_rank(_gathered_rank, (job,), backend="nccl" if nccl else "gloo", timeout_s=timeout_s)
        return reports if int(os.environ["RANK"]) == 0 else None
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "gloo"
    results, _ = launch(pipeline_rank, n, ([job],), backend=backend, threads=threads, timeout_s=timeout_s)
    return [r[0] for r in results]

