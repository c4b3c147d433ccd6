"""Plans in the forms other pipeline frameworks take, for users who keep their own runtime.

- torch: `split_spec` for `torch.distributed.pipelining.pipeline` (`to_torch_split_spec`);
- torchtitan: module names per stage (`module_names_per_stage`);
- megatron: `--pipeline-model-parallel-layout` (`megatron_layout`);
- deepspeed: `PipelineModule` partition boundaries (`deepspeed_partition`).

Each takes the plan and the `Outline` of the model it was made for (`outline_model(model, inputs)`,
which needs torch); everything but `to_torch_split_spec` and `outline_model` imports no torch. A plan
the format cannot express raises PlacewiseError with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from placewise.errors import PlacewiseError
from placewise.export import deepspeed, megatron, torch_spec, torchtitan
from placewise.export.deepspeed import Partition
from placewise.export.deepspeed import partition as deepspeed_partition
from placewise.export.megatron import layout as megatron_layout
from placewise.export.torch_spec import split_points, to_torch_split_spec
from placewise.export.torchtitan import module_names_per_stage
from placewise.export.utils import Call, Outline, colocate_runs

FORMATS: tuple[str, ...] = (torch_spec.FORMAT, torchtitan.FORMAT, megatron.FORMAT, deepspeed.FORMAT)


@dataclass(frozen=True)
class ExportOptions:
    """`root`: the module whose children torchtitan and DeepSpeed name ("" the model; "model" for a wrapped
    Hugging Face model); `layers`: the dotted name of Megatron's transformer layers (default: found)."""
    root: str = ""
    layers: str | None = None


def outline_model(model: Any, example_inputs: Any) -> Outline:
    """The outline of an `nn.Module` (imports torch; traced as `placewise profile` traces)."""
    from placewise.export.outline import outline_model as outline
    return outline(model, example_inputs)


def export_plan(plan, outline: Outline, fmt: str, options: ExportOptions = ExportOptions()) -> Any:
    """The plan in format `fmt` as plain JSON-able data (what `placewise export` prints)."""
    if fmt == torch_spec.FORMAT:
        return split_points(plan, outline)
    if fmt == torchtitan.FORMAT:
        return module_names_per_stage(plan, outline, options.root)
    if fmt == megatron.FORMAT:
        return {"pipeline_model_parallel_size": len(plan.stages),
                "pipeline_model_parallel_layout": megatron_layout(plan, outline, options.layers)}
    if fmt == deepspeed.FORMAT:
        part = deepspeed_partition(plan, outline, root=options.root)
        return {"parts": part.parts, "layers": part.layers}
    raise _unknown(fmt)


def render(fmt: str, data: Any) -> str:
    """`export_plan`'s result as the text the framework takes (what `placewise export` prints)."""
    import json
    if fmt == torch_spec.FORMAT:
        return "{" + ", ".join(f"{json.dumps(name)}: SplitPoint.{point}" for name, point in data.items()) + "}"
    if fmt == torchtitan.FORMAT:
        return f"module_fqns_per_model_part = {json.dumps(data)}"
    if fmt == megatron.FORMAT:
        return (f"--pipeline-model-parallel-size {data['pipeline_model_parallel_size']} "
                f"--pipeline-model-parallel-layout \"{data['pipeline_model_parallel_layout']}\"")
    if fmt == deepspeed.FORMAT:
        return f"parts = {json.dumps(data['parts'])}  # over layers {json.dumps(data['layers'])}"
    raise _unknown(fmt)


def colocate_for(graph, outline: Outline, fmt: str, options: ExportOptions = ExportOptions()):
    """A copy of `graph` (profiled from the outlined model) whose colocation classes keep together what format
    `fmt` cannot cut apart, so that the planner's plans can always be exported to it (given the planner
    keeps stages in run order, as it does for chains of blocks)."""
    rules: dict[str, Callable[[], Callable[[int], bool]]] = {
        torch_spec.FORMAT: lambda: torch_spec.cuts(outline),
        torchtitan.FORMAT: lambda: torchtitan.cuts(outline, options.root),
        megatron.FORMAT: lambda: megatron.cuts(outline, options.layers),
        deepspeed.FORMAT: lambda: deepspeed.cuts(outline, root=options.root)}
    if fmt not in rules:
        raise _unknown(fmt)
    return colocate_runs(graph, outline, rules[fmt]())


def _unknown(fmt: str) -> PlacewiseError:
    return PlacewiseError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "Call", "ExportOptions", "Outline", "Partition", "colocate_for", "deepspeed_partition",
           "export_plan", "megatron_layout", "module_names_per_stage", "outline_model", "render", "split_points",
           "to_torch_split_spec"]
