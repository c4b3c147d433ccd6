import os
import sys
import uuid
from pathlib import Path

import pytest

from faults import Snapshot

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ROOT.parent / "shared" / "workloads"
PAPER = WORKLOADS / "dnn-partitioning"
THROUGHPUT_LAYER = PAPER / "throughput-inputs" / "LayerGraphs"
EXPERTS = PAPER / "human-experts"


@pytest.fixture(scope="session")
def workloads() -> Path:
    assert WORKLOADS.is_dir(), f"shared workloads missing at {WORKLOADS}"
    return WORKLOADS


# ---- session-end check: nothing left behind --------------------------------------------------------
# Every process a test starts inherits this marker in its environment, so one that outlived its test
# is found even after it was re-parented to init.
SESSION_MARKER = "PLACEWISE_TEST_SESSION"
# Seconds for the last processes and files to go: a run that just ended may still be tearing down.
LEFTOVER_GRACE = 10.0


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[SESSION_MARKER] = uuid.uuid4().hex
    session.config._placewise_before = Snapshot.take()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    marker, before = os.environ.get(SESSION_MARKER), getattr(session.config, "_placewise_before", None)
    if marker is None or before is None:
        return
    # This process's own fork server and resource tracker end with it.
    left = before.leftovers((SESSION_MARKER, marker), LEFTOVER_GRACE, spare_helpers_of=os.getpid())
    if not left:
        return
    lines = [f"left behind by the test session ({len(left)}):", *(f"  {item}" for item in left)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
