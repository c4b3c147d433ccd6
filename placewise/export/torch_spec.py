"""A plan as torch's `split_spec` for `torch.distributed.pipelining.pipeline(module, mb_args, split_spec=...)`.

torch traces the module with torch.export and cuts its graph where a `pipe_split()` ran: before the
forward of each module marked `SplitPoint.BEGINNING`, after each marked `SplitPoint.END`. So a plan can
be given to torch when each stage is one run of consecutive operations of the forward pass and each
cut falls where a module's forward begins or ends; a module whose forward runs twice (a shared ReLU)
would cut twice and is never used. The outermost such module is chosen ("layer2" over "layer2.0.conv1").
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from placewise.errors import PlacewiseError
from placewise.export.utils import Outline, check_in_order, stage_of_calls

FORMAT = "torch"
BEGINNING, END = "BEGINNING", "END"


def _bounds(outline: Outline) -> tuple[dict[str, int], dict[str, int]]:
    """The first and last call of each module, by position in the outline."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, call in enumerate(outline.calls):
        for scope in call.scopes:
            first.setdefault(scope, i)
            last[scope] = i
    return first, last


def _marks(outline: Outline, p: int, first: dict[str, int], last: dict[str, int], taken) -> list[tuple[str, str]]:
    """The split points that start a stage at call p, best first: a module beginning there, else one ending
    right before; never a module run twice (it would cut twice) nor one marked already."""
    def usable(scope: str) -> bool:
        return outline.calls_of.get(scope, 1) == 1 and scope not in taken
    return ([(s, BEGINNING) for s in outline.calls[p].scopes if first[s] == p and usable(s)]
            + [(s, END) for s in outline.calls[p - 1].scopes if last[s] == p - 1 and usable(s)])


def cuts(outline: Outline) -> Callable[[int], bool]:
    """Where a stage may start: where a module's forward begins or ends."""
    first, last = _bounds(outline)
    return lambda p: bool(_marks(outline, p, first, last, ()))


def split_points(plan, outline: Outline) -> dict[str, str]:
    """{module name: "BEGINNING" | "END"}, one per cut, in pipeline order (torch-free form of the spec)."""
    stages = stage_of_calls(plan, outline)
    check_in_order(outline, stages, FORMAT)
    first, last = _bounds(outline)
    spec: dict[str, str] = {}
    for p in range(1, len(stages)):
        if stages[p] == stages[p - 1]:
            continue
        if stages[p] != stages[p - 1] + 1:
            raise PlacewiseError(f"{FORMAT}: stage {stages[p - 1] + 1} holds no operation of the traced model; "
                                 "drop the empty stage")
        marks = _marks(outline, p, first, last, spec)
        if not marks:
            raise PlacewiseError(f"{FORMAT}: stage {stages[p]} starts at {outline.calls[p].name}, where no module's "
                                 "forward (run once) begins or ends; torch cuts only at module boundaries: move the "
                                 f"cut before or after a module ({outline.calls[p - 1].name} ends stage {stages[p - 1]})")
        spec[marks[0][0]] = marks[0][1]
    return spec


def to_torch_split_spec(plan, model: Any = None, example_inputs: Sequence[Any] = (), *,
                        outline: Outline | None = None) -> dict[str, Any]:
    """{module name: torch.distributed.pipelining.SplitPoint} for `pipeline(model, mb_args, split_spec=...)`.

    Give the model and example inputs (traced as the profile traced them) or an `outline` of it. Raises
    PlacewiseError when the plan's cuts are not at module boundaries of the forward pass in run order.
    """
    from torch.distributed.pipelining import SplitPoint
    if outline is None:
        if model is None:
            raise PlacewiseError(f"{FORMAT}: give the model and example inputs (or an outline of it)")
        from placewise.export.outline import outline_model
        outline = outline_model(model, example_inputs)
    return {name: SplitPoint[point] for name, point in split_points(plan, outline).items()}
