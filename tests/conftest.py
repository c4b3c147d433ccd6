import os
import sys
import time
import uuid
from pathlib import Path

import pytest

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
SHM = Path("/dev/shm")
# Seconds for the last processes and files to go: a run that just ended may still be tearing down,
# and other sessions on the same machine create and remove their own /dev/shm entries meanwhile.
LEFTOVER_GRACE = 10.0


def _session_processes(marker: str) -> dict[int, str]:
    """pid -> command line of every process (but this one) whose environment carries `marker`, except
    this process's own multiprocessing helpers (the fork server and resource tracker live as long as
    the session's launches may reuse them, and end with it)."""
    found = {}
    needle = f"{SESSION_MARKER}={marker}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if ppid == os.getpid() and ("multiprocessing.forkserver" in cmdline
                                    or "multiprocessing.resource_tracker" in cmdline):
            continue
        if cmdline:
            found[int(proc.name)] = cmdline
    return found


def _shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


def _shm_in_use() -> set[str]:
    """/dev/shm entries that a live process maps or holds open (any session's: other test sessions on
    this machine create their own; what nobody holds any more is what was left behind)."""
    used = set()
    prefix = f"{SHM}/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            paths = [line.split(None, 5)[5] for line in (proc / "maps").read_text().splitlines()
                     if line.count(" ") >= 5 and prefix in line]
            paths += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except (OSError, IndexError):
            continue
        used.update(p[len(prefix):].split("/")[0] for p in paths if p.startswith(prefix))
    return used


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[SESSION_MARKER] = uuid.uuid4().hex
    session.config._placewise_shm = _shm_entries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    marker, before = os.environ.get(SESSION_MARKER), getattr(session.config, "_placewise_shm", None)
    if marker is None or before is None:
        return
    deadline = time.monotonic() + LEFTOVER_GRACE
    while True:
        processes, files = _session_processes(marker), sorted(_shm_entries() - before - _shm_in_use())
        if not (processes or files) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not (processes or files):
        return
    lines = [f"left behind by the test session: {len(processes)} process(es), {len(files)} new /dev/shm entries"]
    lines += [f"  process {pid}: {cmd[:200]}" for pid, cmd in sorted(processes.items())]
    lines += [f"  /dev/shm/{name}" for name in files]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
