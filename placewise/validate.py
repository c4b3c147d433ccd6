"""Checks of command-line values, run by argparse (`type=`) before any work starts.

Each function takes the flag's text and returns its value, or raises `argparse.ArgumentTypeError`
with the fix; `OneLineParser` prints that as one line and exits 2, like a `PlacewiseError`.
Output paths are checked here too, so that a bad `--out` fails at once instead of after a long
run whose report it would then lose.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

# Steps larger than this diverge for every model and optimizer placewise trains; a typo (1e6)
# would otherwise train for minutes and report nonsense.
MAX_LEARNING_RATE = 10.0
# numpy's legacy generators and torch accept seeds below 2**32.
MAX_SEED = 2**32 - 1


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"placewise: error: {' '.join(message.split())}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number; give a number such as 1.5")
    return value


def finite_positive(text: str) -> float:
    """A finite number above 0 (sizes, time limits, bandwidths)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive; give a number above 0")
    return value


def finite_non_negative(text: str) -> float:
    """A finite number, 0 or more (optimality gaps)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
    return value


def learning_rate(text: str) -> float:
    """A step size above 0 and at most MAX_LEARNING_RATE."""
    value = finite_positive(text)
    if value > MAX_LEARNING_RATE:
        raise argparse.ArgumentTypeError(f"{text} is more than {MAX_LEARNING_RATE:g}, a step that diverges; "
                                         "give a learning rate such as 0.05")
    return value


def momentum(text: str) -> float:
    """A momentum factor in [0, 1): at 1 or more the velocity never decays."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1); give a momentum such as 0.9 (0 for none)")
    return value


def _whole(text: str, minimum: int, maximum: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f"{minimum} or more"
        raise argparse.ArgumentTypeError(f"{text} is outside {bounds}; give {what}")
    return value


def positive_int(text: str) -> int:
    """A whole number, 1 or more."""
    return _whole(text, 1, None, "a whole number, 1 or more")


def non_negative_int(text: str) -> int:
    """A whole number, 0 or more."""
    return _whole(text, 0, None, "a whole number, 0 or more")


def seed(text: str) -> int:
    """A random seed, 0..2**32-1."""
    return _whole(text, 0, MAX_SEED, "a seed such as 0")


def device_count(text: str) -> int:
    """A number of devices, bounded before any list of devices is built."""
    from placewise.graph.devices import MAX_DEVICES
    return _whole(text, 0, MAX_DEVICES, "a number of devices")


def check_output(path: str, *, folder: bool = False, make_parents: bool = False) -> str:
    """Fail now, with the fix, if `path` cannot be written as a file (or, with `folder`, created as a folder).

    `make_parents`: the command creates missing parent folders itself, so only the nearest existing
    one must be a writable folder. A folder is always created with its parents.
    """
    target = Path(path)
    if not path:
        raise argparse.ArgumentTypeError("is empty; give a path")
    if folder:
        if target.exists() and not target.is_dir():
            raise argparse.ArgumentTypeError(f"{path} is a file, not a folder; give a folder (it is created if missing)")
        if target.is_dir():
            _writable(target, path)
            return path
    elif target.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name inside it")
    elif target.exists() and not os.access(target, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} exists and cannot be written; give another file name")
    parent = target.parent
    if folder or make_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise argparse.ArgumentTypeError(f"folder {parent} of {path} does not exist; create it or give another path")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent} in {path} is a file, not a folder; give another path")
    _writable(parent, path)
    return path


def _writable(folder: Path, path: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {folder} of {path} is not writable; give another path")


def output_file(text: str) -> str:
    """A file the command writes; its folder must exist."""
    return check_output(text)


def output_file_in_new_folder(text: str) -> str:
    """A file the command writes, creating missing folders (checkpoints)."""
    return check_output(text, make_parents=True)


def output_folder(text: str) -> str:
    """A folder the command writes into, created if missing."""
    return check_output(text, folder=True)


def input_file(text: str) -> str:
    """A file that must exist now (read later, after other work)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: " + ("is a folder; give a file" if Path(text).is_dir()
                                                       else "no such file; check the path"))
    return text

