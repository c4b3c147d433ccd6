"""A hand-edited plan whose fields hold the wrong types fails on load, in one line naming the field."""

from __future__ import annotations

import pytest

from placewise.errors import PlacewiseError
from placewise.plan.plan import Plan

STAGE = {"kind": "cpu", "index": 0, "accelerator": False, "nodes": [0, 1], "load": 1.0, "compute": 1.0,
         "transfer": 0.0, "memory": 0.0, "modules": ["fc1", "relu"]}
PLAN = {"max_load": 1.0, "latency": None, "solver": "dp", "seconds": 0.0}


@pytest.mark.parametrize("stages, words", [
    (5, "stages: 5 is not a list of stages"),
    ([1], "stages[0]: expected an object"),
    ([{**STAGE, "modules": 3}], "stages[0].modules: 3 is not a list of model node names"),
    ([{**STAGE, "modules": [1, 2]}], "stages[0].modules: [1, 2] is not a list of model node names"),
    ([{**STAGE, "nodes": "0-1"}], "stages[0].nodes: \"0-1\" is not a list of node ids"),
    ([{**STAGE, "nodes": [-1]}], "stages[0].nodes: [-1] is not a list of node ids"),
    ([{**STAGE, "index": True}], "stages[0].index: true is not a whole number"),
    ([{**STAGE, "load": "fast"}], "stages[0].load: \"fast\" is not a number"),
    ([{**STAGE, "accelerator": "no"}], "stages[0].accelerator: \"no\" is not true or false"),
    ([{**STAGE, "recompute": 1}], "stages[0].recompute: 1 is not true or false"),
    ([{**STAGE, "recompute_time": None}], "stages[0].recompute_time: null is not a number"),
])
def test_wrong_field_types_are_one_line(stages, words):
    with pytest.raises(PlacewiseError) as raised:
        Plan.from_json({**PLAN, "stages": stages}, "p.json")
    assert str(raised.value).startswith(f"p.json: {words}")


def test_a_valid_plan_still_loads():
    plan = Plan.from_json({**PLAN, "stages": [STAGE]}, "p.json")
    assert plan.stages[0].modules == ["fc1", "relu"] and plan.stages[0].nodes == [0, 1]
    # A stage written before recompute existed does not recompute.
    assert plan.stages[0].recompute is False and plan.stages[0].recompute_time == 0.0
