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

from typing import Any

from placewise.errors import PlacewiseError
from placewise.export.deepspeed import Partition
from placewise.export.deepspeed import partition as deepspeed_partition
from placewise.export.megatron import layout as megatron_layout
from placewise.export.torch_spec import split_points, to_torch_split_spec
from placewise.export.torchtitan import module_names_per_stage
from placewise.export.utils import Call, Outline

FORMATS: tuple[str, ...] = ("torch", "torchtitan", "megatron", "deepspeed")


def outline_model(model: Any, example_inputs: Any) -> Outline:
    """The outline of an `nn.Module` (imports torch; traced as `placewise profile` traces)."""
    from placewise.export.outline import outline_model as outline
    return outline(model, example_inputs)


def export_plan(plan, outline: Outline, fmt: str, *, root: str = "", layers: str | None = None) -> Any:
    """The plan in format `fmt` as plain data (what `placewise export --json` prints)."""
    if fmt == "torch":
        return split_points(plan, outline)
    if fmt == "torchtitan":
        return module_names_per_stage(plan, outline, root)
    if fmt == "megatron":
        return {"pipeline_model_parallel_size": len(plan.stages),
                "pipeline_model_parallel_layout": megatron_layout(plan, outline, layers)}
    if fmt == "deepspeed":
        part = deepspeed_partition(plan, outline, root=root)
        return {"parts": part.parts, "layers": part.layers}
    raise PlacewiseError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")



__all__ = ["FORMATS", "Call", "Outline", "Partition", "deepspeed_partition", "export_plan", "megatron_layout",
           "module_names_per_stage", "outline_model", "split_points", "to_torch_split_spec"]
