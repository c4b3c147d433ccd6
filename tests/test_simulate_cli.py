"""`plan --schedule/--microbatches` records a prediction; `simulate PLAN` replays and draws it."""

import json
from dataclasses import replace

import pytest

from placewise.cli import main
from placewise.graph import save_graph
from placewise.plan import load_plan
from placewise.plan.schedule import Schedule

from test_predict import _chain


@pytest.fixture
def graph_file(tmp_path):
    graph = _chain()
    graph = replace(graph, meta=(("time_unit", "ms"),))
    path = tmp_path / "chain.json"
    save_graph(graph, path)
    return path


def test_plan_records_schedule_and_prediction(graph_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(graph_file), "--cpus", "2", "--accelerators", "0", "--schedule", "gpipe",
                 "--microbatches", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gpipe with 4 microbatches: predicted step" in printed
    plan = load_plan(out)
    assert plan.schedule == Schedule("gpipe", 4)
    prediction = plan.notes["prediction"]
    assert prediction["step_time"] >= 4 * prediction["max_load"]
    assert [m["in_flight"] for m in prediction["stage_memory"]] == [4] * len(plan.stages)


def test_simulate_replays_the_plan_and_draws(graph_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(graph_file), "--cpus", "2", "--accelerators", "0", "--microbatches", "2",
                 "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    picture = tmp_path / "timeline.png"
    assert main(["simulate", str(out), "--microbatches", "8", "--picture", str(picture), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["schedule"] == {"kind": "1f1b", "microbatches": 8}
    assert result["step_time"] >= max(result["busy"])
    assert picture.stat().st_size > 1000


def test_dp_schedule_from_the_command_line(graph_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(graph_file), "--cpus", "2", "--accelerators", "0", "--solver", "dp-schedule",
                 "--microbatches", "4", "--out", str(out)]) == 0
    assert load_plan(out).solver == "dp-schedule"
    assert main(["plan", str(graph_file), "--cpus", "2", "--solver", "dp-schedule"]) == 2
    assert "give --microbatches" in capsys.readouterr().err


def test_simulate_a_plan_without_prediction_is_one_line(graph_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(graph_file), "--cpus", "2", "--accelerators", "0", "--out", str(out)]) == 0
    assert main(["simulate", str(out)]) == 2
    assert "no prediction" in capsys.readouterr().err
