"""A plan as DeepSpeed `PipelineModule` partition boundaries.

A `PipelineModule` runs a flat list of layers in order; it keeps the partition in `parts`, num_stages + 1
indices into that list: stage s runs layers[parts[s]:parts[s + 1]]. DeepSpeed computes `parts` itself
from `partition_method` ("uniform", "parameters", "type:REGEX"); to use placewise's, override
`PipelineModule._partition_layers` to set `self.parts` (docs/export.md shows how). The layer list is
the user's: give its module names in order, or take the default, the children of `root` with
ModuleList, ModuleDict and Sequential children expanded into their items (how a ResNet or a GPT is
usually flattened for DeepSpeed). Functions between layers (a flatten) are the user's to place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from placewise.errors import PlacewiseError
from placewise.export.utils import DICT, LIST, SEQUENTIAL, Outline, unit_cuts, unit_lookup, unit_stages

FORMAT = "deepspeed"


@dataclass(frozen=True)
class Partition:
    """`parts` for `PipelineModule`, and the layer names (in list order) its indices count."""
    parts: list[int]
    layers: list[str]

    def stage_layers(self) -> list[list[str]]:
        return [self.layers[a:b] for a, b in zip(self.parts, self.parts[1:])]


def partition(plan, outline: Outline, layers: Sequence[str] | None = None, root: str = "") -> Partition:
    """The plan's `parts` over `layers` (module names in PipelineModule order; default: see the module doc).

    Raises PlacewiseError when a layer's operations span two stages, a layer never runs, or the stages are
    not consecutive runs of the list."""
    names = _layers(outline, layers, root)
    split = unit_stages(plan, outline, unit_lookup(names), FORMAT, what="layer")
    stage = dict(split.units)
    idle = [name for name in names if name not in stage]
    if idle:
        raise PlacewiseError(f"{FORMAT}: layer(s) {', '.join(idle[:3])} run no operation in the traced model; "
                             "list only modules the forward pass calls")
    order = [stage[name] for name in names]
    for i in range(1, len(order)):
        if order[i] < order[i - 1]:
            raise PlacewiseError(f"{FORMAT}: layer {names[i]} (stage {order[i]}) comes after {names[i - 1]} "
                                 f"(stage {order[i - 1]}) in the layer list; list the layers in the order they run")
    parts = [order.index(s) for s in range(split.n_stages)] + [len(names)]
    return Partition(parts, names)


def cuts(outline: Outline, layers: Sequence[str] | None = None, root: str = "") -> Callable[[int], bool]:
    """Where a stage may start: anywhere but inside a layer."""
    return unit_cuts(outline, unit_lookup(_layers(outline, layers, root)))


def _layers(outline: Outline, layers: Sequence[str] | None, root: str) -> list[str]:
    return list(layers) if layers is not None else outline.units(root, expand=(LIST, DICT, SEQUENTIAL))
