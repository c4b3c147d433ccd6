"""A plan as torchtitan's module names per stage (`parallelism.module_fqns_per_model_part`).

torchtitan's `pipeline_module_split` builds stage i from a copy of the whole model, keeping the modules
named in list i and deleting the rest: a name is a child of the model ("tok_embeddings", "norm") or an
item of a child ModuleList/ModuleDict ("layers.3"); nested containers are not split. The model's
forward must step over the deleted modules. So a plan can be given to torchtitan when every such module
lies on one stage and the stages run in order; functions between modules run wherever the forward runs.
`root` names the submodule whose children are the units, for models wrapped one level deeper
(Hugging Face's "model.layers.3"); torchtitan's own models use the root.
"""

from __future__ import annotations

from typing import Callable

from placewise.export.utils import DICT, LIST, Outline, unit_cuts, unit_lookup, unit_stages

FORMAT = "torchtitan"


def module_names_per_stage(plan, outline: Outline, root: str = "") -> list[list[str]]:
    """For each stage, in pipeline order, the names of the modules it keeps, in the order they run.

    Raises PlacewiseError when the plan cuts inside one of those modules or is not a split of the
    forward pass in run order."""
    units = outline.units(root, expand=(LIST, DICT))
    return unit_stages(plan, outline, unit_lookup(units), FORMAT).per_stage()


def cuts(outline: Outline, root: str = "") -> Callable[[int], bool]:
    """Where a stage may start: anywhere but inside one of the named modules."""
    return unit_cuts(outline, unit_lookup(outline.units(root, expand=(LIST, DICT))))
