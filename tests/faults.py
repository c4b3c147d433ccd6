"""A fault harness in the spirit of torchft's `fail_at(rank, step)`: run `placewise` with a chosen rank
(worker, server, stage) killed at a chosen step, or the launching process itself signalled or killed,
then check the outcome and that nothing was left behind: no process of the run, no new /dev/shm entry,
no run folder in the temporary directory.

The rank faults go through `PLACEWISE_FAIL_AT` (see `placewise.run.faults`). Every process of a run
carries a marker in its environment, so one that outlived the run is found even after it was
re-parented to init. `conftest.py` checks the whole test session the same way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
RUN_MARKER = "PLACEWISE_FAULT_RUN"
# What the issue allows a stopped run for every process to go and every file to be removed.
CLEAN_WITHIN = 5.0


def marked_processes(name: str, value: str, spare_helpers_of: int | None = None) -> dict[int, str]:
    """pid -> command line of every process but this one whose environment has `name=value`; with
    `spare_helpers_of`, not that process's multiprocessing fork server and resource tracker (they live
    as long as their launching process may reuse them)."""
    found = {}
    needle = f"{name}={value}".encode()
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
        if ppid == spare_helpers_of and ("multiprocessing.forkserver" in cmdline
                                         or "multiprocessing.resource_tracker" in cmdline):
            continue
        if cmdline:  # zombies have none: they are gone but for their exit status
            found[int(proc.name)] = cmdline
    return found


def shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


def run_folders() -> set[str]:
    """The launcher's run folders (rendezvous store) in the temporary directory."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("placewise-run-*")}


def shm_in_use() -> set[str]:
    """/dev/shm entries that a live process maps or holds open (any session's: other test sessions on
    this machine make their own; what nobody holds any more is what was left behind)."""
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
    # Some name their creator (joblib's `sem.loky-PID-...`, placewise's `placewise-server-PID-...`), which
    # may hold them closed a while and removes them when it ends.
    # This process's own are not spared: its runs have ended when it asks.
    used.update(name for name in shm_entries() if (m := re.search(r"-(\d+)-", name)) and
                int(m.group(1)) != os.getpid() and Path(f"/proc/{m.group(1)}").exists())
    return used


@dataclass
class Snapshot:
    """What exists before a run: anything new afterwards that no live process holds was left behind."""
    shm: set[str]
    runs: set[str]

    @staticmethod
    def take() -> "Snapshot":
        return Snapshot(shm_entries(), run_folders())

    def leftovers(self, marker: tuple[str, str] | None, within: float,
                  spare_helpers_of: int | None = None) -> list[str]:
        """What remains after waiting up to `within` seconds for it to go: processes carrying `marker`,
        new /dev/shm entries nobody holds, new run folders."""
        deadline = time.monotonic() + within
        while True:
            left = [f"process {pid}: {cmd[:160]}" for pid, cmd in
                    (marked_processes(*marker, spare_helpers_of) if marker else {}).items()]
            left += [f"/dev/shm/{n}" for n in sorted(shm_entries() - self.shm - shm_in_use())]
            left += [f"{tempfile.gettempdir()}/{n}" for n in sorted(run_folders() - self.runs)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float                 # from the fault (or the start, without a launcher fault) to the exit
    left: list[str]                # what outlived the run (see Snapshot.leftovers)


def run_placewise(argv: list[str], *, fail_at: str = "", launcher_signal: int | None = None,
                  when: Callable[[int], bool] | None = None, timeout: float = 240.0,
                  cwd: Path | None = None) -> Outcome:
    """Run `placewise ARGV` in a child process. `fail_at` ("RANK@STEP,...") kills ranks at steps;
    `launcher_signal` is sent to the launching process once `when(pid)` holds (polled), e.g. once its
    ranks are running. The run must end within `timeout` seconds, or it is killed and the test fails."""
    marker = uuid.uuid4().hex
    env = {**os.environ, RUN_MARKER: marker, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    if fail_at:
        env["PLACEWISE_FAIL_AT"] = fail_at
    before = Snapshot.take()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "placewise.cli", *argv], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if launcher_signal is not None:
            while proc.poll() is None and not (when or (lambda pid: True))(proc.pid):
                assert time.monotonic() - started < timeout, "the run never reached the moment of the fault"
                time.sleep(0.2)
            assert proc.poll() is None, f"the run ended before the fault: {proc.communicate()}"
            proc.send_signal(launcher_signal)
            started = time.monotonic()
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
            _kill_marked(marker)
    seconds = time.monotonic() - started
    left = before.leftovers((RUN_MARKER, marker), CLEAN_WITHIN)
    _kill_marked(marker)  # the test fails on `left`; the session must not inherit them too
    return Outcome(proc.returncode, out, err, seconds, left)


def ranks_running(count: int) -> Callable[[int], bool]:
    """`when` for `run_placewise`: true once `count` ranks of the launcher `pid` exist (spawned or forked)."""
    def check(pid: int) -> bool:
        return len(_rank_processes(pid)) >= count
    return check


def _rank_processes(pid: int) -> list[int]:
    ranks = []
    for child in _children(pid):
        cmd = _cmdline(child)
        if "spawn_main" in cmd:
            ranks.append(child)
        elif "multiprocessing.forkserver" in cmd:
            ranks += _children(child)
    return ranks


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(proc.name))
            except (OSError, ValueError):
                continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline")).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_marked(marker: str) -> None:
    for pid in marked_processes(RUN_MARKER, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
