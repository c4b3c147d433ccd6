"""`--json` of the commands that run models prints strict JSON: no NaN or Infinity tokens.

(plan, evaluate, compare, profile and devices: tests/test_validation.py.) Tiny runs of the MLP.
"""

import pytest

from placewise.plan.plan import Plan, Stage
from test_validation import run_cli, strict_json

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def mlp_plan(tmp_path_factory) -> str:
    """Two pipeline stages of the default MLP (Linear, ReLU | Linear)."""
    path = tmp_path_factory.mktemp("json-output") / "plan.json"
    stages = [Stage("cpu", s, False, [], 1.0, 1.0, 0.0, 0.0, names) for s, names in enumerate([["_0", "_1"], ["_2"]])]
    Plan(stages=stages, max_load=1.0, latency=None, solver="test", seconds=0.0).save(path)
    return str(path)


@pytest.mark.parametrize("argv", [
    ["train", "mlp", "--workers", "2", "--mode", "async", "--steps", "5"],
    ["train", "mlp", "--plan", "PLAN", "--steps", "2", "--batch-size", "8", "--microbatches", "2"],
    # With --out a pipeline run also draws its timeline; the note saying so must not reach stdout.
    ["train", "mlp", "--plan", "PLAN", "--steps", "2", "--batch-size", "8", "--microbatches", "2", "--out", "OUT"],
    ["serve-bench", "mlp", "--plan", "PLAN", "--steps", "2", "--batch-size", "8", "--microbatches", "2"],
], ids=["train-async", "train-pipeline", "train-pipeline-out", "serve-bench"])
def test_run_commands_print_strict_json(capsys, tmp_path, mlp_plan, argv):
    given = {"PLAN": mlp_plan, "OUT": str(tmp_path / "out")}
    code, out, err, _ = run_cli([given.get(a, a) for a in argv] + ["--json"], capsys)
    assert code == 0, err
    report = strict_json(out)
    assert isinstance(report, dict) and report
