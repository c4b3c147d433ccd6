"""One pipeline stage at run time: this process's part of a cut model as a torch
`PipelineStage` with static shapes (taken from one example microbatch run on every rank), driven by
`ScheduleGPipe` or `Schedule1F1B`: training (loss on the last stage) or forward-only inference
(`schedule.eval`)."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from placewise.plan.schedule import GPIPE, ONE_F_ONE_B
from placewise.run.cut import Prepared, output_tensor, pack
from placewise.run.faults import maybe_fail
from placewise.run.job import PipelineJob, prepare
from placewise.run.optim import module_optimizer
from placewise.run.replicas import ReplicatedModule, Replicas, StageGroup, follow
from placewise.run.timing import StageClock
from placewise.run.workload import loss_fn


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


def stage_schedule(prepared: Prepared, stage_index: int, *, schedule: str, microbatches: int, training: bool,
                   group=None, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   replicas: StageGroup | None = None) -> tuple[nn.Module, Any, Any]:
    """This process's stage of a cut model as a `PipelineStage` with static shapes, on this rank's device, and
    its GPipe or 1F1B schedule (training: the loss of each microbatch, `loss` or the workload's, divided by
    `microbatches`). Every rank of `group` (rank i runs stage i) calls this with its own `stage_index`.
    With `replicas` (a replicated stage; this process its lead), the stage's submodule is spread over them
    (`placewise.run.replicas`; `stage.submod.replicas` then says what the followers should do)."""
    loss = loss or loss_fn
    gm, micro, values = prepared.gm, prepared.micro, prepared.values
    part = prepared.parts[stage_index]
    n_stages = len(prepared.parts)
    device = _device(dist.get_rank())
    module = part.module.to(device)
    module.train(training)

    def example(value: Any) -> torch.Tensor:
        # Static shapes for the stage; floats between stages carry gradients when training.
        t = value if isinstance(value, torch.Tensor) else pack(value)
        return t.detach().contiguous().to(device).requires_grad_(training and t.is_floating_point())

    first, last = stage_index == 0, stage_index == n_stages - 1
    input_args = tuple(t.to(device) for t in micro) if first else tuple(example(values[n]) for n in part.inputs)
    output_args = (example(output_tensor(values, gm)),) if last else tuple(example(values[n]) for n in part.outputs)
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    submod = module if replicas is None else ReplicatedModule(
        Replicas(module, replicas.group, replicas.ranks, device, len(input_args)))
    stage = PipelineStage(submod, stage_index, n_stages, device, input_args=input_args, output_args=output_args,
                          group=group)
    schedule_cls = {GPIPE: ScheduleGPipe, ONE_F_ONE_B: Schedule1F1B}[schedule]
    # Each microbatch's loss is divided by M, so the gradients are the batch mean as soon as the last
    # backward ends, with nothing to rescale afterwards (fused updates happen inside that backward).
    runner = schedule_cls(stage, microbatches, scale_grads=False,
                          loss_fn=(lambda out, target: loss(out, target) / microbatches) if training else None)
    return module, stage, runner


def _clocked(stage: Any, optimizer: torch.optim.Optimizer | None, fuse: str) -> StageClock:
    """Time `stage`'s forward and backward chunks; a fused backward update fires on the last microbatch only."""
    backward = stage.backward_one_chunk
    if fuse.startswith("backward") and optimizer is not None:
        # A fused update fires when a gradient is final: only in the last microbatch's backward.
        def backward(*args, last_backward: bool = False, _backward=stage.backward_one_chunk, **kwargs):
            with contextlib.nullcontext() if last_backward else optimizer.accumulate():
                return _backward(*args, last_backward=last_backward, **kwargs)
    clock = StageClock()
    stage.forward_one_chunk = clock.wrap(stage.forward_one_chunk, "forward")
    stage.backward_one_chunk = clock.wrap(backward, "backward")
    return clock


@contextlib.contextmanager
def _outside_timed(clock: StageClock, runner: Any):
    """Time what the schedule does between chunks (`timing.OUTSIDE`): torch's schedules post their
    sends and receives and wait for them through module-level helpers, patched here for the run."""
    from torch.distributed.pipelining import schedules
    names = {"_batch_p2p": "post", "_sorted_batch_p2p": "post", "_wait_batch_p2p": "wait"}
    saved = {name: getattr(schedules, name) for name in names}
    for name, part in names.items():
        setattr(schedules, name, clock.wrap_outside(saved[name], part))
    runner._maybe_compute_loss = clock.wrap_outside(runner._maybe_compute_loss, "loss")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(schedules, name, fn)


def _memory_counter(job: PipelineJob, module: nn.Module):
    """With "memory" in `job.collect`: a live tensor counter, started, that holds the stage's own
    parameters and buffers (counting slows every operator, so timed runs leave it out)."""
    if "memory" not in job.collect:
        return None
    from placewise.run.tensor_memory import LiveTensorBytes
    counter = LiveTensorBytes()
    counter.__enter__()
    counter.hold(module.parameters())
    counter.hold(module.buffers())
    return counter


def run_stage(job: PipelineJob, stage_index: int, group=None, replicas: StageGroup | None = None) -> dict[str, Any]:
    """Run this process's stage of `job` (all ranks of `group` call this); a report of what it measured.
    With `replicas`, this process leads a replicated stage (its followers run `run_replica`)."""
    prepared = prepare(job)
    part = prepared.parts[stage_index]
    module, stage, schedule = stage_schedule(prepared, stage_index, schedule=job.schedule,
                                             microbatches=job.microbatches, training=job.training, group=group,
                                             replicas=replicas)
    shared = stage.submod.replicas if replicas is not None else None
    optimizer = module_optimizer(module, job.optimizer, job.lr, job.momentum, job.fuse,
                                 keep_grads="grads" in job.collect) if job.training else None
    clock = _clocked(stage, optimizer, job.fuse)
    report: dict[str, Any] = {"stage": stage_index, "nodes": part.nodes, "losses": [], "step_seconds": []}
    progress = _progress(job, dist.get_rank())
    memory = _memory_counter(job, module)
    # The targets' shape and dtype: the same on every step, so looked up once.
    output_like = output_tensor(prepared.values, prepared.gm)
    try:
        with _outside_timed(clock, schedule):
            for step in range(job.warmup + job.steps):
                _step(job, prepared, output_like, stage_index, step, stage.device, module, schedule, optimizer,
                      clock, memory, report, shared)
                if progress:
                    progress[0].advance(progress[1])
    finally:
        if progress:
            progress[0].stop()
        if memory:
            memory.__exit__(None, None, None)
            report["peak_memory_bytes"] = memory.peak
    report.update(replicas=1 if replicas is None else len(replicas.ranks), forward_seconds=clock.forward,
                  backward_seconds=clock.backward, cpu_seconds=clock.cpu, outside_seconds=dict(clock.outside),
                  outside_cpu_seconds=dict(clock.outside_cpu), events=clock.events,
                  samples=job.batch_size * job.steps, microbatches=job.microbatches)
    return report


def follower(prepared: Prepared, stage_index: int, replicas: StageGroup,
             training: bool) -> tuple[Replicas, list[torch.Tensor]]:
    """This process's copy of a replicated stage, as one of its followers (on this rank's device, in training
    mode or not), and a share of each value the stage receives: what `follow` gets from the lead."""
    part = prepared.parts[stage_index]
    device = _device(dist.get_rank())
    module = part.module.to(device)
    module.train(training)
    received = prepared.micro if stage_index == 0 else tuple(prepared.values[n] for n in part.inputs)
    # A share of each received value: what the lead scatters (`check_shardable` made them tensors).
    likes = [t[: t.shape[0] // len(replicas.ranks)].to(device) for t in received]
    return Replicas(module, replicas.group, replicas.ranks, device, len(likes)), likes


def run_replica(job: PipelineJob, stage_index: int, replicas: StageGroup) -> dict[str, Any]:
    """A follower of a replicated stage: its share of every microbatch, as the stage's lead commands, then
    the replicas' gradients summed and this copy's optimizer step (the same update on every replica)."""
    prepared = prepare(job)
    part = prepared.parts[stage_index]
    shared, likes = follower(prepared, stage_index, replicas, job.training)
    module = shared.module
    optimizer = module_optimizer(module, job.optimizer, job.lr, job.momentum, job.fuse,
                                 keep_grads="grads" in job.collect) if job.training else None
    report: dict[str, Any] = {"stage": stage_index, "replica": replicas.ranks.index(dist.get_rank()),
                              "nodes": part.nodes}
    for step in range(job.warmup + job.steps):
        maybe_fail(dist.get_rank(), step)
        follow(shared, likes)
        if job.training:
            shared.sum_gradients()
            if step == 0 and "grads" in job.collect:
                report["grads"] = {k: p.grad.detach().cpu().clone() for k, p in module.named_parameters()
                                   if p.grad is not None}
            if optimizer is not None:
                _update(optimizer)
    return report


def _step(job: PipelineJob, prepared: Prepared, output_like: torch.Tensor, stage_index: int, step: int,
          device: torch.device, module: nn.Module, schedule: Any, optimizer: torch.optim.Optimizer | None,
          clock: StageClock, memory: Any, report: dict[str, Any], shared: Replicas | None = None) -> None:
    """One step of this stage (timed after the warm-up), its results added to `report`; `output_like`: the
    model's output (`output_tensor`), which the targets are shaped after; `shared`: this process leads a
    replicated stage."""
    first, last = stage_index == 0, stage_index == job.n_stages - 1
    if job.fail_at_step == (stage_index, step):
        raise RuntimeError(f"stage {stage_index} failed on purpose at step {step}")
    maybe_fail(dist.get_rank(), step)
    with memory.paused() if memory else contextlib.nullcontext():
        inputs, target = job.batch(prepared.example_inputs, output_like, step)
    args = tuple(t.to(device) for t in inputs) if first else ()
    kwargs = {"target": target.to(device)} if last and job.training else {}
    clock.on = step >= job.warmup
    start, start_cpu = time.perf_counter(), time.thread_time()
    if job.training:
        losses: list[torch.Tensor] = []
        out = schedule.step(*args, losses=losses, **kwargs)
        if shared is not None:
            clock.wrap_outside(shared.end_step, "allreduce")()
        if last:
            report["losses"].append(float(torch.stack(losses).sum().detach()))
        if step == 0 and "grads" in job.collect:
            report["grads"] = {k: p.grad.detach().cpu().clone() for k, p in module.named_parameters()
                               if p.grad is not None}
        if optimizer is not None:
            clock.wrap_outside(_update, "update")(optimizer)
    else:
        with torch.no_grad():
            out = schedule.eval(*args)
        if shared is not None:
            shared.command()
    if step >= job.warmup:
        report["step_seconds"].append(time.perf_counter() - start)
        report["step_cpu_seconds"] = report.get("step_cpu_seconds", 0.0) + time.thread_time() - start_cpu
        report.setdefault("step_starts", []).append(start)
    if last and step == 0 and "outputs" in job.collect:
        report["outputs"] = out.detach().cpu()


def _update(optimizer: torch.optim.Optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad()
