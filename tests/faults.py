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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

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


def shm_mapped(pids: Iterable[int]) -> set[str]:
    """/dev/shm entries that the processes `pids` map or hold open now."""
    used = set()
    prefix = f"{SHM}/"
    for pid in pids:
        proc = Path(f"/proc/{pid}")
        try:
            paths = [line.split(None, 5)[5] for line in (proc / "maps").read_text().splitlines()
                     if line.count(" ") >= 5 and prefix in line]
            paths += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except (OSError, IndexError):
            continue
        used.update(p[len(prefix):].split("/")[0] for p in paths if p.startswith(prefix))
    return used


def shm_in_use() -> set[str]:
    """/dev/shm entries that a live process maps or holds open (any session's: other test sessions on
    this machine make their own; what nobody holds any more is what was left behind)."""
    used = shm_mapped(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return used | {name for name in shm_entries() if _creator_lives(name)}


def _named_pid(name: str) -> int | None:
    """The creator's pid in joblib's `sem.loky-PID-...` and placewise's `placewise-server-PID-...` and
    `placewise-run-PID-...`."""
    m = re.search(r"-(\d+)-", name)
    return int(m.group(1)) if m else None


def _creator_lives(name: str) -> bool:
    """Whether `name` names a live creator other than this process: such entries may sit unheld a
    while and go when their creator ends. This process's own count: its runs have ended when it asks."""
    pid = _named_pid(name)
    return pid is not None and pid != os.getpid() and Path(f"/proc/{pid}").exists()


@dataclass
class Snapshot:
    """What exists before a run: anything new afterwards that no live process holds was left behind."""
    shm: set[str]
    runs: set[str]

    @staticmethod
    def take() -> "Snapshot":
        return Snapshot(shm_entries(), run_folders())

    def leftovers(self, marker: tuple[str, str] | None, within: float, spare_helpers_of: int | None = None,
                  ours: Callable[[str], bool] | None = None) -> list[str]:
        """What remains after waiting up to `within` seconds for it to go: processes carrying `marker`,
        new /dev/shm entries nobody holds, new run folders. With `ours`, only the /dev/shm entries it
        says are the run's: other sessions on this machine make and leak their own. Without it, only
        those that name their creator's pid (Python's anonymous `sem.mp-*` tell nothing apart)."""
        ours = ours or (lambda name: _named_pid(name) is not None)
        deadline = time.monotonic() + within
        while True:
            left = [f"process {pid}: {cmd[:160]}" for pid, cmd in
                    (marked_processes(*marker, spare_helpers_of) if marker else {}).items()]
            left += [f"/dev/shm/{n}" for n in sorted(shm_entries() - self.shm - shm_in_use()) if ours(n)]
            left += [f"{tempfile.gettempdir()}/{n}" for n in sorted(run_folders() - self.runs)
                     if not _creator_lives(n)]
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


def run_placewise(argv: list[str], *, fail_at: str = "", fault: Callable[[int], bool] | None = None,
                  timeout: float = 240.0) -> Outcome:
    """Run `placewise ARGV` in a child process. `fail_at` ("RANK@STEP,...") kills ranks at steps;
    `fault(launcher_pid)` is polled until it returns True, having done its deed (`signal_launcher`,
    `kill_rank`). The run must end within `timeout` seconds, or it is killed and the test fails."""
    marker = uuid.uuid4().hex
    # The run's own temporary folder: whatever the run makes there (run folders, multiprocessing's
    # pymp-* folder of the fork server) must be gone when it ends, however it ended.
    tmp = Path(tempfile.mkdtemp(prefix="faults-tmp-"))
    env = {**os.environ, RUN_MARKER: marker, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
           "TMPDIR": str(tmp)}
    if fail_at:
        env["PLACEWISE_FAIL_AT"] = fail_at
    before = Snapshot.take()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "placewise.cli", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, pids, running = set(), {proc.pid}, threading.Event()
    running.set()

    def watch() -> None:  # what the run's processes hold, so that what they leave is known to be theirs
        while running.is_set():
            found = marked_processes(RUN_MARKER, marker)
            pids.update(found)
            seen.update(shm_mapped(found))
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        if fault is not None:
            while proc.poll() is None and not fault(proc.pid):
                assert time.monotonic() - started < timeout, "the run never reached the moment of the fault"
                time.sleep(0.1)
            assert proc.poll() is None, f"the run ended before the fault: {proc.communicate()}"
            started = time.monotonic()
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - started)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
            _kill_marked(marker)
        running.clear()
        watcher.join()
    seconds = time.monotonic() - started
    left = before.leftovers((RUN_MARKER, marker), CLEAN_WITHIN,
                            ours=lambda name: name in seen or _named_pid(name) in pids)
    left += [str(p) for p in _left_in(tmp, CLEAN_WITHIN)]
    shutil.rmtree(tmp, ignore_errors=True)
    _kill_marked(marker)  # the test fails on `left`; the session must not inherit them too
    return Outcome(proc.returncode, out, err, seconds, left)


def _left_in(folder: Path, within: float) -> list[Path]:
    """What is still in `folder` after waiting up to `within` seconds for it to go; torch's compile
    cache (torchinductor_USER), which torch keeps across runs on purpose, does not count."""
    deadline = time.monotonic() + within
    while True:
        left = sorted(p for p in folder.iterdir() if not p.name.startswith("torchinductor_"))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def signal_launcher(signum: int, ranks: int, cpu_seconds: float = 0.0) -> Callable[[int], bool]:
    """A `fault`: send `signum` to the launching process once `ranks` ranks run and each has computed
    `cpu_seconds` (start-up done: imports and set-up take a few CPU seconds)."""
    def fault(pid: int) -> bool:
        found = _rank_processes(pid)
        if len(found) < ranks or min(_cpu_seconds(p) for p in found) < cpu_seconds:
            return False
        os.kill(pid, signum)
        return True
    return fault


def kill_rank(ranks: int, after: float) -> Callable[[int], bool]:
    """A `fault`: SIGKILL the newest of `ranks` ranks `after` seconds after it appeared (during start-up,
    for a small `after`)."""
    seen: dict[int, float] = {}

    def fault(pid: int) -> bool:
        found = sorted(_rank_processes(pid))
        for p in found:
            seen.setdefault(p, time.monotonic())
        if len(found) < ranks or time.monotonic() - seen[found[-1]] < after:
            return False
        os.kill(found[-1], signal.SIGKILL)
        return True
    return fault


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
