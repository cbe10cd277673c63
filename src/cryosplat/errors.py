"""The one error type a user sees: one line naming the file, the field or row, what was
expected and what was found. The command line prints it without a traceback."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad or unreadable user input."""

    def __init__(self, source: str | Path | None, message: str):
        self.source = str(source) if source is not None else None
        self.message = message
        super().__init__(f"{self.source}: {message}" if self.source else message)
