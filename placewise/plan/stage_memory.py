"""Per-stage memory at a pipeline position under a schedule: what a stage holds at its peak.

A stage keeps its parameters, their gradients and the optimizer's state all step long, and the
activations its forward saved for backward for every microbatch whose backward has not yet run: all
m under GPipe, min(m, p - i) at position i under 1F1B (`Schedule.in_flight`). So under 1F1B the
first stage of a "balanced" pipeline needs the most. torch's `PipelineStage` also keeps one receive
buffer per microbatch for each tensor it takes in (and, training, one for the gradient of each tensor
it sends on), allocated on the first step and kept: `buffers` counts those. On top, a backward
needs transient room for the gradients it is passing (`backward_workspace`).

The planner's older one-figure rule (each node's `memory` summed over a stage: parameters, gradients,
optimizer state and one profiled batch's outputs) knows neither the schedule nor the position.

Recompute (activation checkpointing, as in Piper and AdaPipe; the runtime's `torch.utils.checkpoint`,
non-reentrant): a stage that recomputes keeps, per microbatch in flight, only what the checkpoint
saves, its input (the receive buffer, already counted in `buffers`; the first stage's input is the
data) and the output the schedule holds for the backward (`outputs`); during one microbatch's
backward its forward runs again and its full activations live once. It pays its forward time again
in the backward (`plan.recompute`). Forward only there is nothing to keep, so recompute changes nothing.

Replicated stages (`replicas` r > 1, `run/replicas.py`): the figure is the stage's lead's, the
replica that holds most. Every replica holds the stage's parameters, gradients and optimizer state
whole; the saved activations (and with recompute the held outputs) and the backward's transient
room are those of its share, 1/r of each microbatch's samples. The lead's torch receive buffers are
whole microbatches (its `PipelineStage` receives them before scattering), and per microbatch in
flight it keeps the copies the scatter and gather make (`replica_copies`): its input share (inputs
/ r) and the gathered whole output beside its own share's (outputs x (r-1)/r). The other replicas
hold no torch buffers and no gathered outputs, so they need less; they are not reported.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from placewise.errors import PlacewiseError
from placewise.plan.schedule import Schedule


@dataclass(frozen=True)
class StageBytes:
    """A stage's memory inputs in bytes: held once (parameters, optimizer state) or per microbatch."""
    parameters: float
    optimizer_state: float = 0.0
    activations: float = 0.0  # saved for backward, per microbatch
    inputs: float = 0.0  # tensors received from the previous stage, per microbatch
    outputs: float = 0.0  # tensors sent to the next stage, per microbatch
    gradients: float | None = None  # None: as many bytes as the parameters (buffers get none)
    workspace: float = 0.0  # transient bytes of one microbatch's backward (see `backward_workspace`)
    replicas: int = 1  # devices sharing each microbatch's samples (see the module's docstring)

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise PlacewiseError(f"stage memory: replicas is {self.replicas!r}; give a whole number of at least 1")
        for name in ("parameters", "optimizer_state", "activations", "inputs", "outputs", "gradients", "workspace"):
            value = getattr(self, name)
            if value is None and name == "gradients":
                continue
            if not (value >= 0):
                raise PlacewiseError(f"stage memory: {name} is {value!r}; give bytes >= 0")


@dataclass(frozen=True)
class StageMemory:
    parameters: float
    gradients: float
    optimizer_state: float
    activations: float  # saved activations of the microbatches in flight
    buffers: float  # torch's per-microbatch receive buffers
    in_flight: int
    workspace: float = 0.0  # transient backward bytes on top of the held ones
    replica_copies: float = 0.0  # a replicated stage's lead: scattered input and gathered output copies

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer_state + self.activations + self.buffers
                + self.workspace + self.replica_copies)


def stage_memory(stage: StageBytes, position: int, stages: int, schedule: Schedule, *,
                 training: bool = True, recompute: bool = False) -> StageMemory:
    """Peak bytes of the stage at `position` (0-based) of `stages` under `schedule`; with `recompute`,
    the stage's activations are recomputed in its backward (see the module's docstring)."""
    if not 0 <= position < stages:
        raise PlacewiseError(f"stage memory: position {position} is outside a pipeline of {stages} stage(s)")
    m, r = schedule.microbatches, stage.replicas
    if not training:
        # Forward only: activations are freed as soon as the next operator has read them; the peak is
        # about one microbatch's worth, and no gradients or optimizer state exist.
        buffers = m * stage.inputs if position > 0 else 0.0
        return StageMemory(stage.parameters, 0.0, 0.0, stage.activations / r, buffers, 1)
    in_flight = schedule.in_flight(position, stages)
    buffers = (m * stage.inputs if position > 0 else 0.0) + (m * stage.outputs if position < stages - 1 else 0.0)
    gradients = stage.parameters if stage.gradients is None else stage.gradients
    held = (in_flight * stage.outputs + stage.activations if recompute else in_flight * stage.activations) / r
    copies = in_flight * (stage.inputs / r + stage.outputs * (r - 1) / r) if r > 1 else 0.0
    return StageMemory(stage.parameters, gradients, stage.optimizer_state, held, buffers, in_flight,
                       stage.workspace / r, copies)


def backward_workspace(largest_output: float) -> float:
    """Transient bytes while one microbatch's backward runs: the gradient arriving at the operator
    with the largest output and the gradient it makes for its input (about as large) are alive at
    once, beside everything held."""
    return 2.0 * largest_output


def pipeline_memory(stages: list[StageBytes], schedule: Schedule, *, training: bool = True,
                    recompute: list[bool] | None = None) -> list[StageMemory]:
    """`stage_memory` for every stage of a pipeline, in pipeline order; `recompute`: per stage (None: none)."""
    flags = recompute or [False] * len(stages)
    return [stage_memory(s, i, len(stages), schedule, training=training, recompute=flags[i])
            for i, s in enumerate(stages)]

