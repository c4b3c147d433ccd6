"""The one domain error of placewise, and the shared readers and writer that turn bad files into it.

Bad input, infeasible problems and untraceable models raise `PlacewiseError`; its message is a
single line that says what is wrong, where, and how to fix it. The CLI prints it and exits 2.
Anything else that escapes is a bug and may show a traceback.

Every file a user hands placewise (graph, split, plan, device file) is read by `read_text`, which
bounds its size and its nesting before any parser sees it, so that `/dev/zero` or a file of
100,000 nested brackets gives one line instead of a hang or a RecursionError.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

# The largest graphs placewise reads (operator-level profiles of big models) are a few MB; a file
# many times larger is a mistake, and parsing it would take gigabytes.
MAX_FILE_BYTES = 64 * 2**20
# Graphs, plans, splits and device files nest at most a handful of levels; Python's JSON and YAML
# parsers recurse per level and fail at about a thousand.
MAX_NESTING = 200
_STRUCTURE = re.compile(r'[\[\]{}"\\]')


class PlacewiseError(Exception):
    """A domain error with a one-line, user-facing message."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))


def where(source: str | None, field: str | None = None) -> str:
    """Prefix `FILE: FIELD: ` for messages (either part may be missing)."""
    parts = [p for p in (source, field) if p]
    return ": ".join(parts) + ": " if parts else ""


def nesting_depth(text: str, limit: int = MAX_NESTING) -> int:
    """How deep `[` and `{` nest outside double-quoted strings, counting no further than `limit + 1`."""
    depth = deepest = 0
    in_string = False
    escaped_at = -1
    # Only the structural characters are visited, so a large file costs little Python work.
    for m in _STRUCTURE.finditer(text):
        i, c = m.start(), m.group()
        if i == escaped_at:
            continue
        if in_string:
            if c == "\\":
                escaped_at = i + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif c in "]}":
            depth -= 1
    return deepest


def read_text(path: "str | os.PathLike[str]", what: str) -> str:
    """Read a user's file; any failure is a one-line PlacewiseError naming the file and saying what to give.

    The size is checked before reading (and the read is bounded, for devices and pipes that report
    no size), and the nesting before any parser recurses into it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > MAX_FILE_BYTES:
                raise _too_large(path, what)
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise PlacewiseError(f"{path}: no such {what}; check the path") from None
    except IsADirectoryError:
        raise PlacewiseError(f"{path}: is a folder; give a {what}") from None
    except OSError as e:
        raise PlacewiseError(f"{path}: cannot read ({e.strerror}); give a readable {what}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _too_large(path, what)
    try:
        if b"\0" in data:
            raise UnicodeError
        # Universal newlines, as Path.read_text gives.
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeError:
        raise PlacewiseError(f"{path}: not a text file; give a {what}") from None
    if nesting_depth(text) > MAX_NESTING:
        raise _too_deep(path, what)
    return text


def _too_large(path: Path, what: str) -> PlacewiseError:
    return PlacewiseError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB, more than any {what.split(' (')[0]} "
                          f"placewise reads; give a {what}")


def _too_deep(path: Path, what: str) -> PlacewiseError:
    return PlacewiseError(f"{path}: nests more than {MAX_NESTING} levels deep, which no {what.split(' (')[0]} does; "
                          f"give a {what}")


def read_json(path: "str | os.PathLike[str]", what: str) -> Any:
    """`read_text` then JSON, with the same one-line errors."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlacewiseError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); give a {what}") from None
    except RecursionError:  # nesting the bracket count cannot see; read_text bounds the usual kind
        raise _too_deep(Path(path), what) from None


def finite_json(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None (JSON's null)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(value) for value in data]
    return data


def dump_json(data: Any, indent: int | None = 1) -> str:
    """Strict JSON for output (`--json`, reports): no NaN or Infinity tokens, which strict parsers reject;
    a value that is not a finite number is written as null."""
    return json.dumps(finite_json(data), indent=indent, allow_nan=False)
