"""The command line: every subcommand has --help with an example; the demo runs in a reduced mode."""

import json
import subprocess
import sys

import pytest

from placewise.cli import EXAMPLES, build_parser

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_every_subcommand_is_listed():
    assert set(SUBCOMMANDS) == {"compare", "demo", "devices", "evaluate", "plan", "profile", "serve-bench", "train"}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_an_example(command):
    result = subprocess.run([sys.executable, "-m", "placewise.cli", command, "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "example:" in result.stdout and EXAMPLES[command].split()[1] == command, result.stdout


def test_demo_runs_in_reduced_mode(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "placewise.cli", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary] == ["profile", "plan", "compare", "pipeline", "async"]
    pictures = [p for s in summary for p in s["pictures"] if p.endswith(".png")]
    assert len(pictures) >= 5
    for name in pictures:
        # a real picture: a PNG header and more than a blank canvas's bytes
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    plan = json.loads((out / "plan.json").read_text())
    assert plan["feasible"] and plan["solver"] == "dp" and all(s["modules"] for s in plan["stages"])
