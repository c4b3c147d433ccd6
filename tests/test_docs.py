"""Every example in the README and docs/ runs as written.

Shell blocks (```bash) are run line by line from the repository root with .venv/bin on PATH; a block
preceded by `<!-- not run in tests: REASON -->` is skipped (the set-up commands themselves, multi-machine
torchrun). Python blocks (```python) are executed.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- not run in tests: [^>]*-->\s*)?```(bash|python)\n(.*?)```", re.S)


def _examples():
    for doc in DOCS:
        for m in BLOCK.finditer(doc.read_text()):
            if m.group(1):
                continue
            line = doc.read_text()[: m.start()].count("\n") + 1
            yield pytest.param(m.group(2), m.group(3), id=f"{doc.name}:{line}")


@pytest.mark.parametrize("language,code", list(_examples()))
def test_example_runs(language, code, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", MPLBACKEND="Agg")
    if language == "python":
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
    else:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
    assert result.returncode == 0, f"{code}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-2000:]}"
