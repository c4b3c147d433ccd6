"""The one domain error of placewise.

Bad input, infeasible problems and untraceable models raise `PlacewiseError`; its message is a
single line that says what is wrong, where, and how to fix it. The CLI prints it and exits 2.
Anything else that escapes is a bug and may show a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class PlacewiseError(Exception):
    """A domain error with a one-line, user-facing message."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))


def where(source: str | None, field: str | None = None) -> str:
    """Prefix `FILE: FIELD: ` for messages (either part may be missing)."""
    parts = [p for p in (source, field) if p]
    return ": ".join(parts) + ": " if parts else ""


def read_text(path: "str | os.PathLike[str]", what: str) -> str:
    """Read a user's file; any failure is a one-line PlacewiseError naming the file and saying what to give."""
    path = Path(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise PlacewiseError(f"{path}: no such {what}; check the path") from None
    except IsADirectoryError:
        raise PlacewiseError(f"{path}: is a folder; give a {what}") from None
    except UnicodeDecodeError:
        raise PlacewiseError(f"{path}: not a text file; give a {what}") from None
    except OSError as e:
        raise PlacewiseError(f"{path}: cannot read ({e.strerror}); give a readable {what}") from None


def read_json(path: "str | os.PathLike[str]", what: str) -> Any:
    """`read_text` then JSON, with the same one-line errors."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlacewiseError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); give a {what}") from None
