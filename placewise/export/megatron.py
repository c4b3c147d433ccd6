"""A plan as Megatron-LM's `--pipeline-model-parallel-layout` string, for layer-granular transformer plans.

The layout lists every pipeline stage's layers, stages split by "|": "E" the embedding, "t" a transformer
(decoder) layer, "L" the output layer and loss; "t*4" repeats a layer, commas are cosmetic, an empty
stage is legal. Megatron requires the embedding first and the loss last, and keeps the final layer norm
on the last stage. So a plan can be given to Megatron when each transformer layer lies on one stage, the
stages run in order, everything before the first layer (the embedding) is on the first stage and
everything after the last layer (final norm, head) on the last. The transformer layers are the items of
`layers` (a ModuleList's dotted name), by default the model's largest container of same-class modules.
"""

from __future__ import annotations

from typing import Callable

from placewise.errors import PlacewiseError
from placewise.export.utils import DICT, LIST, SEQUENTIAL, Outline, stage_of_calls, unit_cuts, unit_lookup, unit_stages

FORMAT = "megatron"
EMBEDDING, LAYER, LOSS = "E", "t", "L"


def find_layers(outline: Outline) -> str:
    """The dotted name of the model's transformer layers: the container of the most same-class modules."""
    candidates = []
    for name, kind in outline.containers.items():
        items = outline.children.get(name, ())
        if kind in (LIST, DICT, SEQUENTIAL) and len(items) >= 2 and len({outline.classes[i] for i in items}) == 1:
            candidates.append((len(items), name))
    if not candidates:
        raise PlacewiseError(f"{FORMAT}: the model has no list of same-class layers; name the transformer layers' "
                             "container (layers=... or --transformer-layers, e.g. model.h)")
    candidates.sort(reverse=True)
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        raise PlacewiseError(f"{FORMAT}: {candidates[0][1]} and {candidates[1][1]} both hold {candidates[0][0]} "
                             "layers; say which are the transformer layers (layers=NAME)")
    return candidates[0][1]


def layout(plan, outline: Outline, layers: str | None = None) -> str:
    """The layout string, e.g. "E,t*4|t*4|t*4,L" (one stage per pipeline rank, no virtual stages).

    Raises PlacewiseError when the plan cuts inside a transformer layer, keeps part of the embedding off
    the first stage or part of the head off the last, or is not a split of the forward pass in run order."""
    items = _items(outline, layers)
    last = len(plan.stages) - 1
    # The first stage may hold only the embedding, the last only the head: "E|t*12|L" is a layout.
    split = unit_stages(plan, outline, unit_lookup(items), FORMAT, what="transformer layer", empty_ok=(0, last))
    idle = [name for name in items if name not in dict(split.units)]
    if idle:
        raise PlacewiseError(f"{FORMAT}: transformer layer(s) {', '.join(idle[:3])} run no operation in the traced "
                             "model; Megatron builds every layer")
    _check_ends(outline, stage_of_calls(plan, outline), set(items), last)
    stages = []
    for s, names in enumerate(split.per_stage()):
        parts = [EMBEDDING] if s == 0 else []
        if names:
            parts.append(LAYER if len(names) == 1 else f"{LAYER}*{len(names)}")
        if s == last:
            parts.append(LOSS)
        stages.append(",".join(parts))
    return "|".join(stages)


def cuts(outline: Outline, layers: str | None = None) -> Callable[[int], bool]:
    """Where a stage may start: where a transformer layer starts, or right after the last one (the head)."""
    items = _items(outline, layers)
    layer_starts = unit_cuts(outline, unit_lookup(items))
    inside = [i for i, call in enumerate(outline.calls) if set(items).intersection(call.scopes)]
    return lambda p: p == inside[-1] + 1 or (inside[0] <= p <= inside[-1] and layer_starts(p))


def _items(outline: Outline, layers: str | None) -> list[str]:
    container = layers or find_layers(outline)
    if container not in outline.children:
        raise PlacewiseError(f"{FORMAT}: the model has no module {container!r}; give the layers' container")
    return list(outline.children[container])


def _check_ends(outline: Outline, stages: list[int], items: set[str], last: int) -> None:
    """What runs before the first layer is Megatron's embedding (first stage); after the last, its head (last)."""
    inside = [i for i, call in enumerate(outline.calls) if items.intersection(call.scopes)]
    for i, (call, s) in enumerate(zip(outline.calls, stages)):
        if i < inside[0] and s != 0:
            raise PlacewiseError(f"{FORMAT}: {call.name} runs before the first transformer layer (the embedding) but "
                                 f"is on stage {s}; Megatron keeps the embedding on the first stage")
        if i > inside[-1] and s != last:
            raise PlacewiseError(f"{FORMAT}: {call.name} runs after the last transformer layer (final norm, head) but "
                                 f"is on stage {s}; Megatron keeps them on the last stage")
