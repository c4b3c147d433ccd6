"""Run-time settings that used to mislead: each now gives one line naming the cause, before any process
starts (so these tests start none)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")

from conftest import THROUGHPUT_LAYER  # noqa: E402
from placewise.cli import main  # noqa: E402
from placewise.errors import PlacewiseError  # noqa: E402
from placewise.plan.plan import Plan, Stage  # noqa: E402
from placewise.run.dataparallel.checkpoint import save_checkpoint  # noqa: E402
from placewise.run.dataparallel.config import TrainConfig  # noqa: E402
from placewise.run.dataparallel.report import TrainReport, write_outputs  # noqa: E402
from placewise.run.dataparallel.train import train_data_parallel  # noqa: E402


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, words", [
    (["--servers", "100"], "--servers 100: use 1..63"),
    (["--batch-size", "5000"], "batch size 5000 does not fit a training set of 1347 samples; use 1..1347"),
])
def test_async_settings_name_the_real_cause(capsys, argv, words):
    assert words in _error(capsys, ["train", "mlp", "--workers", "2", "--mode", "async", "--steps", "5", *argv])


def _plan_for(tmp_path, graph: str, modules: list[str]):
    path = tmp_path / "plan.json"
    Plan(stages=[Stage("cpu", 0, False, [0], 1.0, 1.0, 0.0, 0.0, modules)], max_load=1.0, latency=None,
         solver="test", seconds=0.0, graph=graph).save(path)
    return path


@pytest.mark.parametrize("mode", [["--mode", "pipeline"], ["--workers", "2", "--mode", "async"]])
def test_plan_for_another_model_names_it(capsys, tmp_path, mode):
    plan = _plan_for(tmp_path, "resnet18", ["conv1", "fc"])
    line = _error(capsys, ["train", "resnet50", "--plan", str(plan), "--steps", "1", *mode])
    assert f"{plan}: the plan was made for 'resnet18', not for the model 'resnet50'; plan resnet50 itself" in line


def test_evaluate_with_a_plan_for_another_graph_is_one_line(capsys, tmp_path):
    plan = tmp_path / "gnmt-plan.json"
    assert main(["plan", str(THROUGHPUT_LAYER / "gnmt_inference.json"), "--solver", "greedy", "--out", str(plan),
                 "--json"]) == 0
    capsys.readouterr()
    line = _error(capsys, ["evaluate", str(THROUGHPUT_LAYER / "bert24_inference.json"), str(plan)])
    assert "the plan was made for 'gnmt_inference', not for the graph 'bert24_inference'" in line


def test_resuming_past_the_end_says_so(tmp_path):
    cfg = TrainConfig(mode="async", workers=1, steps=10, checkpoint_every=0)
    ckpt = tmp_path / "done.pt"
    save_checkpoint(ckpt, {"version": 10, "fingerprint": cfg.fingerprint(64, 10)})
    with pytest.raises(PlacewiseError, match=r"^--resume .*done.pt: the checkpoint is at update 10, where this run "
                                             r"would already end \(10 updates\); ask for more --epochs or --steps"):
        train_data_parallel(TrainConfig(mode="async", workers=1, steps=10, resume=str(ckpt)))


def test_failed_checkpoint_write_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PlacewiseError, match=r"^--checkpoint .*a-file/ck.pt: writing the checkpoint at update 7 "
                                             r"failed \(.*\); the run stopped"):
        save_checkpoint(blocker / "ck.pt", {"version": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # no partial file left


def test_report_file_is_strict_json(tmp_path):
    report = TrainReport(mode="async", model="mlp", parameters=1, workers=1, servers=1, updates=1, seconds=0.0,
                         updates_per_s=0.0, final_loss=math.nan, test_accuracy=math.inf, mean_staleness=0.0,
                         max_staleness=0, lost_workers={}, resumed_from=None)
    path = write_outputs(report, tmp_path)[0]
    data = json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"{token} in {path}"))
    assert data["final_loss"] is None and data["test_accuracy"] is None


def test_input_shape_that_does_not_fit_the_model_is_one_line(capsys, tmp_path):
    plan = _plan_for(tmp_path, "", ["conv1", "fc"])
    line = _error(capsys, ["serve-bench", "resnet18", "--plan", str(plan), "--input-shape", "5"])
    assert "a forward pass on inputs of shape [32, 5] fails" in line and "check --input-shape" in line


def test_compare_with_a_malformed_expert_split_is_one_line(capsys, tmp_path):
    split = tmp_path / "expert.json"
    split.write_text('{"fpgas": 5}')
    line = _error(capsys, ["compare", str(THROUGHPUT_LAYER / "bert24_inference.json"), "--expert", str(split),
                           "--methods", "greedy"])
    assert line == f'placewise: error: {split}: fpgas: expected a list of {{"nodes": [...]}}; fix it'


def test_plan_missing_layers_is_one_line(capsys, tmp_path):
    # Only the first of the MLP's two linear layers (fx nodes _0, _2) is placed: a hand-edited plan.
    plan = _plan_for(tmp_path, "", ["_0", "_1"])
    line = _error(capsys, ["serve-bench", "mlp", "--plan", str(plan), "--batch-size", "8"])
    assert "the plan leaves out 1 of the model's layers with weights" in line
