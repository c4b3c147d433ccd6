"""The one domain error of placewise.

Bad input, infeasible problems and untraceable models raise `PlacewiseError`; its message is a
single line that says what is wrong, where, and how to fix it. The CLI prints it and exits 2.
Anything else that escapes is a bug and may show a traceback.
"""

from __future__ import annotations


class PlacewiseError(Exception):
    """A domain error with a one-line, user-facing message."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))


def where(source: str | None, field: str | None = None) -> str:
    """Prefix `FILE: FIELD: ` for messages (either part may be missing)."""
    parts = [p for p in (source, field) if p]
    return ": ".join(parts) + ": " if parts else ""
