"""Recomputed stages: a stage that keeps less for its backward and pays its forward again.

A stage with recompute (activation checkpointing, as in Piper's and AdaPipe's planners) runs its
forward without saving activations, keeping only its input (and the output the schedule holds) per
microbatch in flight; its backward first runs the forward again. So its memory is
`plan.stage_memory` with `recompute=True`, and its time per profiled batch is its load plus its
forward time on its device: the stage's forward nodes (those not marked `backward`) on its kind, over
the kind's speed. A graph with no backward nodes is forward only: it saves nothing, so recompute
would cost time and save nothing, and the planner never chooses it there.

The scored split is the cost model's (`cost.evaluate`) with `cost.recomputed_load` on the chosen
stages; the latency stays the cost model's (forward order only, where recompute does not act).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Collection, Iterable, Mapping

from placewise.graph import Cluster, Device, DeviceKind, OpGraph
from placewise.plan.cost import Evaluation, evaluate, recomputed_load
from placewise.plan.plan import PLAN_FORMAT, Plan


def forward_time(graph: OpGraph, nodes: Iterable[int], kind: DeviceKind) -> float:
    """Time of the forward nodes among `nodes` (ids) on a device of `kind`: what a recomputed stage
    runs again in its backward."""
    total = 0.0
    for n in nodes:
        node = graph.node(n)
        if not node.backward:
            total += node.acc_time if kind.accelerator else node.cpu_time
    return total / kind.speed


def evaluate_recomputed(graph: OpGraph, cluster: Cluster, assignment: Mapping[int, Device],
                        recompute: Collection[Device], *, contiguous: bool = True,
                        replicate: bool = True) -> Evaluation:
    """`cost.evaluate`, with the stages on the devices in `recompute` recomputing their activations."""
    ev = evaluate(graph, cluster, assignment, contiguous=contiguous, replicate=replicate)
    wanted = {Device(*d) for d in recompute}
    if not wanted:
        return ev
    loads = tuple(recomputed_load(d, forward_time(graph, d.computed, cluster.kind(d.device.kind)))
                  if d.device in wanted else d for d in ev.devices)
    return replace(ev, devices=loads, max_load=max((d.load for d in loads), default=0.0))


def split_recomputed(data: object) -> tuple[Device, ...]:
    """The first devices of a split file's recomputed stages (only a placewise plan records them)."""
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        return ()
    return tuple(s.device for s in Plan.from_json(data).stages if s.recompute)
