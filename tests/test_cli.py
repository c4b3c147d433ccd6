"""The command line: every subcommand has --help with an example; the demo runs in a reduced mode."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from placewise.cli import EXAMPLES, build_parser

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_every_subcommand_is_listed():
    assert set(SUBCOMMANDS) == {"compare", "demo", "devices", "evaluate", "export", "plan", "profile", "serve-bench",
                                "simulate", "train"}


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
    assert [s["name"] for s in summary] == ["profile", "plan", "pipeline", "what-if", "async"]
    pictures = [p for s in summary for p in s["pictures"] if p.endswith(".png")]
    assert len(pictures) >= 5
    for name in pictures:
        # a real picture: a PNG header and more than a blank canvas's bytes
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    plan = json.loads((out / "plan.json").read_text())
    assert plan["feasible"] and plan["solver"] == "dp" and all(s["modules"] for s in plan["stages"])


def test_parsing_imports_no_torch():
    # The CLI's choices come from torch-free modules, so `placewise --help` and bad flags answer fast.
    code = "import sys, placewise.cli; placewise.cli.build_parser(); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_run_flags_offer_the_names_run_defines():
    from placewise.plan.schedule import SCHEDULES
    from placewise.run.choices import DATASETS, FUSE_MODES, OPTIMIZERS, TRAIN_MODES, TRANSPORTS
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    offered = {a.dest: tuple(a.choices) for a in train._actions if a.choices}
    assert offered == {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "fuse": FUSE_MODES, "mode": TRAIN_MODES,
                       "transport": TRANSPORTS, "dataset": DATASETS}


def _imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The placewise modules `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [f"{node.module}.{a.name}" for a in node.names] + [node.module]
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
                break
    return found


def test_placewise_has_no_import_cycles():
    root = Path(__file__).resolve().parents[1]
    files = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (root / "placewise").rglob("*.py")}
    graph = {m: _imports(f, root, set(files)) - {m} for m, f in files.items()}
    # Depth-first search for a back edge; the path to it is the cycle.
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m, [m])
            assert cycle is None, " -> ".join(cycle)
