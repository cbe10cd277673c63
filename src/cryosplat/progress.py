"""How long work reports its progress: a :data:`ProgressFactory` is passed in by the caller
(the command line's rich bars, :func:`cryosplat.terminal.progress_bar`; a library caller's
:func:`no_progress`), so no computing module draws anything itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

Advance = Callable[..., None]  # advance(n, info="")
ProgressFactory = Callable[[str, int, int], AbstractContextManager[Advance]]
"""``factory(description, total, completed)``: a context that yields ``advance(n, info="")``."""


@contextmanager
def no_progress(description: str, total: int, completed: int = 0) -> Iterator[Advance]:
    """A :data:`ProgressFactory` that shows nothing."""
    yield lambda n, info="": None


def bar(progress: ProgressFactory | None, description: str, total: int,
        completed: int = 0) -> AbstractContextManager[Advance]:
    """A bar of ``progress``, or of :func:`no_progress` when it is None."""
    return (progress or no_progress)(description, total, completed)
