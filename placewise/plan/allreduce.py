"""The gradient all-reduce of a replicated stage: how its time is costed (torch-free, pure arithmetic).

A stage replicated on r devices of one kind spreads a step's microbatches over its replicas and
all-reduces its parameters' gradients once per step. Units: `parameter_bytes` in bytes, the link's
`bandwidth` in bytes per graph time unit and `latency` in graph time units (`plan.predict.cluster_link`
converts a device file's bytes/s and seconds), so the result is in the graph's time unit.

Two models (`ALLREDUCE_MODELS`):
- `ring`: a ring all-reduce, 2(r-1) steps each moving P/r bytes over one link: 2(r-1)/r x P /
  bandwidth + 2(r-1) x latency;
- `pipedream`: PipeDream's optimizer (`optimizer/optimizer_graph_hierarchical.py`,
  `data_parallel_communication_time = 4 m P / (B (m+1))` with m + 1 = r replicas): 4(r-1)/r x P /
  bandwidth, no latency (it counts the bytes each worker both sends and receives).

How a step's samples enter: a graph's times are per profiled batch (its "unit of work"), so a step
holding `step_units` profiled batches pays the all-reduce once for all of them; per unit of work
each replica then carries all-reduce / step_units. `step_units` None means r: every replica does one
profiled batch per step, PipeDream's model, whose stage time is (compute + all-reduce) / r.
"""

from __future__ import annotations

from dataclasses import dataclass

from placewise.errors import PlacewiseError

RING = "ring"
PIPEDREAM = "pipedream"
ALLREDUCE_MODELS: tuple[str, ...] = (RING, PIPEDREAM)


@dataclass(frozen=True)
class AllReduce:
    """How replicated stages are costed (see the module's docstring)."""

    model: str = RING
    step_units: float | None = None  # profiled batches per optimizer step; None: one per replica

    def __post_init__(self) -> None:
        if self.model not in ALLREDUCE_MODELS:
            raise PlacewiseError(f"--allreduce {self.model!r}: use one of {', '.join(ALLREDUCE_MODELS)}")
        if self.step_units is not None and not self.step_units > 0:
            raise PlacewiseError(f"all-reduce step units {self.step_units!r}: use a positive number of profiled batches")

    def time(self, parameter_bytes: float, replicas: int, bandwidth: float, latency: float = 0.0) -> float:
        """One all-reduce of `parameter_bytes` over `replicas` devices, in graph time units."""
        if replicas <= 1:
            return 0.0
        if self.model == PIPEDREAM:
            return 4.0 * (replicas - 1) / replicas * parameter_bytes / bandwidth
        return 2.0 * (replicas - 1) * (parameter_bytes / replicas / bandwidth + latency)

    def linear(self, replicas: int, bandwidth: float, latency: float = 0.0) -> tuple[float, float]:
        """(coef, const) with `per_unit(P, replicas, ...) = coef * P + const`: the all-reduce is linear
        in the bytes (the constant is the link's latency), so planners can cost a set's bytes by it."""
        const = self.per_unit(0.0, replicas, bandwidth, latency)
        return self.per_unit(1.0, replicas, bandwidth, latency) - const, const

    def per_unit(self, parameter_bytes: float, replicas: int, bandwidth: float, latency: float = 0.0) -> float:
        """The all-reduce's share per profiled batch on each replica: once per step of `step_units`."""
        if replicas <= 1:
            return 0.0
        return self.time(parameter_bytes, replicas, bandwidth, latency) / (
            replicas if self.step_units is None else self.step_units)
