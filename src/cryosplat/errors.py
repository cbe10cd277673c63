"""The one error type a user sees: one line naming the file, the field or row, what was
expected and what was found. The command line prints it without a traceback."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class InputError(ValueError):
    """Bad or unreadable user input."""

    def __init__(self, source: str | Path | None, message: str):
        self.source = str(source) if source is not None else None
        self.message = " ".join(str(message).split())  # one line, whatever a library said
        super().__init__(f"{self.source}: {self.message}" if self.source else self.message)

    def __reduce__(self):  # survives pickling, e.g. from a DataLoader worker
        return (type(self), (self.source, self.message))


class StageError(RuntimeError):
    """A run that went wrong in one of its stages (NaN or Inf reaching a loss or a map, a
    device that is not there). The command line prints it as one line naming the stage."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        self.message = message
        super().__init__(f"{stage} stage: {message}")

    def __reduce__(self):
        return (type(self), (self.stage, self.message))


@contextmanager
def malformed(source: str | Path, what: str) -> Iterator[None]:
    """Turn a parsing failure deep inside a reader (a library's ValueError on a corrupted
    file, a field of the wrong type or shape) into an InputError naming the file and what the
    library said. Our own InputErrors pass through unchanged."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, UnicodeError, OverflowError,
            EOFError) as e:
        raise InputError(source, f"malformed {what} ({type(e).__name__}: {e})") from None


def refuse_out_of_range(checks: Iterable[tuple[str, object, bool]]) -> None:
    """An InputError ``OPTION VALUE: out of range`` for the first ``(option, value, ok)``
    that is not ok (settings objects' ``check()``)."""
    for option, value, ok in checks:
        if not ok:
            raise InputError(None, f"{option} {value}: out of range")


@contextmanager
def stage(doing: str, log: Callable[[str], None], then: str | None = None) -> Iterator[None]:
    """Log why a run stopped ``doing`` something, then let the exception go on: one line,
    ``stopped DOING: TYPE: MESSAGE`` and ``; THEN`` (what the user can do: ``--resume``)."""
    try:
        yield
    except BaseException as e:
        log(f"stopped {doing}: {type(e).__name__}: {e}" + (f"; {then}" if then else ""))
        raise


def exit_status(e: BaseException) -> tuple[int, str] | None:
    """How the command line ends on ``e``: (exit status, the one line it prints after
    "error:"). 2 for bad input; 1 for a failed stage or an OS error (a full disk says that the
    last checkpoint is intact). None for anything else."""
    if isinstance(e, InputError):
        return 2, str(e)
    if isinstance(e, StageError):
        return 1, str(e)
    if isinstance(e, OSError):  # a full disk, a folder we may not write, a file that went away
        msg = f"{e.filename}: " if e.filename else ""
        msg += f"{e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg += ("; files being written were left under temporary names and removed, and "
                    "what was written before (the last checkpoint) is intact")
        return 1, msg
    return None
