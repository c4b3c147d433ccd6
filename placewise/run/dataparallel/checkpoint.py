"""Checkpoints of data-parallel runs: one file per server shard (or DDP rank 0), written atomically,
checked on resume against the settings of the run that wrote it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from placewise.errors import PlacewiseError

CHECKPOINT_FORMAT = "placewise-data-parallel-checkpoint/1"


def checkpoint_path(base: str | Path, shard: int, servers: int) -> Path:
    """Shard `shard`'s checkpoint file: `base` itself with one server, `base.shardI` with several."""
    return Path(base) if servers == 1 else Path(f"{base}.shard{shard}")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically, or raise a PlacewiseError that stops the run: a run that goes
    on without the checkpoints it was asked for could not be resumed or recovered as promised."""
    # Written beside, flushed to disk and renamed: a run killed (or a machine crashing) while saving
    # leaves the previous checkpoint intact, never a truncated one.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PlacewiseError(f"--checkpoint {path}: writing the checkpoint at update {state.get('version')} failed "
                             f"({e.strerror or type(e).__name__}); the run stopped: free space there or choose "
                             f"another path") from e


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's state, after checking it was written for the same model, mode and optimizer."""
    if not path.is_file():
        raise PlacewiseError(f"{path}: checkpoint not found; pass the file written by --checkpoint")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise PlacewiseError(f"{path}: not a readable checkpoint ({type(e).__name__}); pass a file written by "
                             f"placewise train --checkpoint") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PlacewiseError(f"{path}: not a placewise data-parallel checkpoint; pass a file written by "
                             f"placewise train --checkpoint")
    for key, value in fingerprint.items():
        if state["fingerprint"].get(key) != value:
            raise PlacewiseError(f"{path}: checkpoint was written with {key}={state['fingerprint'].get(key)!r}, "
                                 f"this run has {key}={value!r}; resume with the same settings")
    return state
