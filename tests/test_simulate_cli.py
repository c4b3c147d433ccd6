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


def test_train_report_gives_the_simulated_step_and_the_core_share(graph_file, tmp_path):
    from placewise.run.report import pipeline_report
    out = tmp_path / "plan.json"
    assert main(["plan", str(graph_file), "--cpus", "2", "--accelerators", "0", "--microbatches", "4",
                 "--out", str(out), "--json"]) == 0
    plan = load_plan(out)
    results = [{"stage": i, "nodes": s.nodes, "forward_seconds": 0.1, "backward_seconds": 0.3, "cpu_seconds": 0.2,
                "samples": 8, "step_seconds": [0.5], "losses": [1.0]} for i, s in enumerate(plan.stages)]
    report = pipeline_report(results, plan=plan, batch_size=8, mode="train", schedule="1f1b", microbatches=4)
    assert report["predicted_step_ms"] == pytest.approx(plan.notes["prediction"]["step_time"])  # graph in ms
    assert report["predicted_step_ms_per_sample"] == pytest.approx(report["predicted_step_ms"] / 8)
    assert report["core_share"] == pytest.approx(0.5)


def test_dp_schedule_recomputes_where_memory_binds_unless_told_not_to(tmp_path, capsys):
    from test_schedule_dp import _graph
    path = tmp_path / "random.json"
    save_graph(_graph(5), path)  # a graph whose memory binds on 2 accelerators
    base = ["plan", str(path), "--accelerators", "2", "--cpus", "0", "--solver", "dp-schedule", "--microbatches", "4"]
    assert main(base + ["--json"]) == 0
    need = max(m["total"] for m in json.loads(capsys.readouterr().out)["notes"]["prediction"]["stage_memory"])
    capped = base + ["--memory", str(0.97 * need)]
    assert main(capped + ["--no-recompute"]) == 2
    assert "drop --no-recompute" in capsys.readouterr().err
    out = tmp_path / "plan.json"
    assert main(capped + ["--out", str(out), "--explain"]) == 0
    printed = capsys.readouterr().out
    assert "recompute" in printed and "run their forward again" in printed
    plan = load_plan(out)
    assert plan.recomputed() and plan.feasible
    assert all(m["total"] <= 0.97 * need * (1 + 1e-9) for m in plan.notes["prediction"]["stage_memory"])
    # `evaluate` scores the plan's recomputed stages as planned.
    assert main(["evaluate", str(path), str(out), "--accelerators", "2", "--cpus", "0", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["max_load"] == pytest.approx(plan.max_load)
    assert [s["recompute"] for s in evaluated["stages"]] == [s.recompute for s in plan.stages]
    assert main(["plan", str(path), "--accelerators", "2", "--no-recompute"]) == 2
    assert "only --solver dp-schedule" in capsys.readouterr().err
