"""`parallelize`: from a user's `nn.Module` and example inputs to a pipeline to train, in one call.

It profiles the module (cached by structure, input shapes and device), plans it for the cluster, cuts it
with run/'s cut and builds each stage with run/'s stage runtime, then hands back a `Parallel` whose
`step` runs one training step through torch's GPipe or 1F1B schedule. Two ways to run:

- embedded (default): this process starts one process per stage replica on this machine and drives them;
- under torchrun: every rank calls `parallelize` with the same arguments; rank 0 plans, the plan is
  broadcast, and each rank runs its own stage or stage replica.

A stage with `replicas` r > 1 (a plan's, or chosen by the planner with `max_replicas`) runs on r
processes as `placewise train` runs it (`placewise.run.replicas`): consecutive ranks, the first the
stage's lead in the pipeline, each replica taking a share of every microbatch, the gradients summed.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from placewise.errors import PlacewiseError
from placewise.graph import Cluster
from placewise.parallel.embedded import EmbeddedStages, RankSetup
from placewise.parallel.planning import as_cluster, plan_module
from placewise.parallel.runner import LossFn, OptimizerFactory, ReplicaRunner, StageRunner, merge_states, rank_runner
from placewise.plan import Plan
from placewise.plan.schedule import DEFAULT_SCHEDULE, Schedule
from placewise.run.job import check_microbatches, check_replicated
from placewise.run.replicas import check_replicas, stage_ranks

# Seconds to wait for the stages to answer one command (a step) before giving up.
REPLY_TIMEOUT = 600.0
# Seconds the embedded stage processes may live (the launcher's bound on a whole run).
SESSION_TIMEOUT = 7 * 24 * 3600.0


class Parallel:
    """A model cut into pipeline stages, ready to train. Use it as a context manager (or `close()` it)."""

    def __init__(self, plan: Plan, schedule: Schedule, keys: list[str], initial: dict[str, torch.Tensor],
                 backend: "EmbeddedStages | _TorchrunStage") -> None:
        self.plan, self.schedule = plan, schedule
        self._keys, self._initial, self._backend = keys, initial, backend
        self._ranks = stage_ranks([stage.replicas for stage in plan.stages])

    @property
    def n_stages(self) -> int:
        return len(self.plan.stages)

    def step(self, inputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor) -> float:
        """One training step on a batch shaped like the example inputs; the batch's mean loss."""
        inputs = _tuple(inputs)
        replies = self._call("step", [(inputs if r == 0 else None, targets if r == self.n_stages - 1 else None)
                                      for r in range(self.n_stages)])
        return replies[-1]

    def eval_step(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's output (eval mode, no gradients) for a batch shaped like the example inputs."""
        inputs = _tuple(inputs)
        return self._call("eval_step", [(inputs if r == 0 else None,) for r in range(self.n_stages)])[-1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained state under the unsplit model's keys (load it into the model you gave)."""
        return merge_states(self._call("state_dict", [()] * self.n_stages), self._keys, self._initial)

    def gradients(self) -> dict[str, torch.Tensor]:
        """The last step's gradients, under the unsplit model's parameter names."""
        merged: dict[str, torch.Tensor] = {}
        for part in self._call("gradients", [()] * self.n_stages):
            merged.update(part)
        return {k: merged[k] for k in self._keys if k in merged}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Give every stage its part of the unsplit model's `state`."""
        missing = [k for k in self._keys if k not in state]
        if missing:
            raise PlacewiseError(f"load_state_dict: the state lacks {len(missing)} key(s) of the model "
                                 f"({', '.join(missing[:3])}); give the unsplit model's state_dict()")
        self._call("load_state_dict", [(state,)] * self.n_stages)
        self._initial = {k: state[k] for k in self._keys}

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Parallel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, command: str, args: list[tuple]) -> list[Any]:
        """`command` on every rank, each with its stage's `args`; each stage's reply (its lead's)."""
        replies = self._backend.call(command, [args[s] for s, ranks in enumerate(self._ranks) for _ in ranks],
                                     REPLY_TIMEOUT)
        return [replies[ranks[0]] for ranks in self._ranks]


class _TorchrunStage:
    """This rank's stage (or replica) under torchrun: a command runs here, and every rank's reply is gathered."""

    def __init__(self, runner: StageRunner | ReplicaRunner, owns_group: bool) -> None:
        self.runner, self.owns_group = runner, owns_group

    def call(self, command: str, args: list[tuple], timeout_s: float) -> list[Any]:
        value = getattr(self.runner, command)(*args[dist.get_rank()])
        replies: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(replies, value)
        return replies

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def parallelize(module: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
                cluster: Cluster | int | str | Path = 2, schedule: str | Schedule = DEFAULT_SCHEDULE,
                microbatches: int | None = None, loss_fn: LossFn | None = None,
                optimizer: OptimizerFactory | None = None, solver: str = "dp", plan: Plan | None = None,
                max_replicas: int = 1, profile_device: str = "cpu", cache_dir: str | Path | None = None,
                threads: int = 1) -> Parallel:
    """Profile, plan and cut `module`, and start its pipeline (see the module doc for where it runs).

    `example_inputs`: one batch (the batch size and shapes every step uses). `cluster`: a Cluster, a device
    file, or n identical accelerators. `loss_fn(output, target)`: default cross-entropy for integer targets,
    mean squared error otherwise. `optimizer`: a factory `params -> Optimizer`, picklable in the embedded
    mode (e.g. `functools.partial(torch.optim.SGD, lr=0.1)`); None computes gradients only. `microbatches`:
    default one per stage. `plan`: skip profiling and planning. `max_replicas`: the planner may run a stage
    on up to that many devices of the cluster (solver "dp"). `cache_dir`: also keep profiles on disk.
    """
    from placewise.run.cut import cut_model, mapping_from_plan
    from placewise.run.launcher import is_torchrun
    inputs = _tuple(example_inputs)
    if microbatches is not None:  # bad input fails before the profile
        _schedule(schedule, microbatches, 1, inputs)
    devices = as_cluster(cluster) if plan is None else None
    module.train()  # traced in the mode it trains in: fx fixes branches on self.training
    keys = list(module.state_dict())
    initial = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def make_plan() -> Plan:
        return plan or plan_module(module, inputs, devices, solver=solver, device=profile_device, cache_dir=cache_dir,
                                   max_replicas=max_replicas)

    if is_torchrun():
        chosen, owns_group = _broadcast_plan(make_plan)
    else:
        chosen, owns_group = make_plan(), False
    replicas = tuple(stage.replicas for stage in chosen.stages)
    sched = _schedule(schedule, microbatches, len(replicas), inputs)
    check_replicas(replicas, len(replicas), inputs[0].shape[0], sched.microbatches, "none", "the plan", flags=False)
    chosen = replace(chosen, schedule=sched)  # what `pipe.plan` runs with
    prepared = cut_model(module, inputs, mapping_from_plan(chosen), sched.microbatches)
    check_replicated(prepared, replicas)
    n = sum(replicas)
    if is_torchrun():
        if dist.get_world_size() != n:
            what = f"{len(replicas)} stages" + (f" with {n} replicas in all" if n != len(replicas) else "")
            raise PlacewiseError(f"torchrun started {dist.get_world_size()} processes but the plan has {what}; "
                                 f"start {n} or give a cluster of {dist.get_world_size()} devices")
        runner = rank_runner(prepared, dist.get_rank(), n, replicas, sched, loss_fn, optimizer)
        return Parallel(chosen, sched, keys, initial, _TorchrunStage(runner, owns_group))
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "gloo"
    stages = EmbeddedStages(RankSetup(prepared, sched, loss_fn, optimizer, replicas), backend=backend,
                            threads=threads, timeout_s=SESSION_TIMEOUT)
    return Parallel(chosen, sched, keys, initial, stages)


def _broadcast_plan(make_plan) -> tuple[Plan, bool]:
    """Under torchrun: rank 0 plans, every rank gets the plan (or rank 0's error). Joins the process group
    first if the caller has not (then the Parallel leaves it on close)."""
    owns = not dist.is_initialized()
    if owns:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        nccl = torch.cuda.is_available() and local < torch.cuda.device_count()
        if nccl:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if nccl else "gloo")
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [make_plan().to_json()]
        except PlacewiseError as e:
            box = [str(e)]  # every rank raises it, not only rank 0
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise PlacewiseError(box[0])
    return Plan.from_json(box[0], "the broadcast plan"), owns


def _schedule(kind: str | Schedule, microbatches: int | None, n_stages: int,
              inputs: tuple[torch.Tensor, ...]) -> Schedule:
    if isinstance(kind, Schedule):
        kind, microbatches = kind.kind, microbatches or kind.microbatches
    sched = Schedule(kind, microbatches or n_stages)
    check_microbatches(inputs[0].shape[0], sched.microbatches, n_stages, flags=False)
    return sched


def _tuple(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


__all__ = ["Parallel", "parallelize"]
