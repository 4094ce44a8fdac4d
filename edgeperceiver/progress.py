"""Progress reporting: the library reports through callbacks and never prints.

Long steps take a ``progress(done, total)`` callback (:data:`Progress`) or, where a command
has several stages, a ``progress(stage, done, total)`` one (:data:`StageProgress`). The
command line draws them; :class:`TextProgress` is a dependency-free drawer for scripts.
Lines saying what a step is doing (a compile's report as it goes) go through
:func:`message` to the sink the caller set with :func:`messages_to`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar, TextIO

#: ``progress(done, total)``, called as items are processed
Progress = Callable[[int, int], None]
#: ``progress(stage, done, total)``: the same for a step with named stages
StageProgress = Callable[[str, int, int], None]
#: ``sink(line)``: one line saying what a long step is doing now (e.g. a compile report line)
Message = Callable[[str], None]

_MESSAGES: ContextVar[Message | None] = ContextVar("edgeperceiver_messages", default=None)


def message(line: str) -> None:
    """Report what a long step is doing to the sink :func:`messages_to` set; without one, nowhere."""
    sink = _MESSAGES.get()
    if sink is not None:
        sink(line)


@contextmanager
def messages_to(sink: Message | None) -> Iterator[None]:
    """Send :func:`message` lines to ``sink`` while the block runs (``None``: drop them)."""
    token = _MESSAGES.set(sink)
    try:
        yield
    finally:
        _MESSAGES.reset(token)


class TextProgress:
    """A ``progress(stage, done, total)`` callback drawing one-line bars on a terminal stream."""

    LABELS: ClassVar[dict[str, str]] = {"read": "reading held-out data", "run": "running every exit"}

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self._stage: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage and self._stage is not None:
            self.stream.write("\n")
        self._stage = stage
        filled = self.width if total <= 0 else int(self.width * min(done, total) / total)
        label = self.LABELS.get(stage, stage)
        self.stream.write(f"\r{label:<24} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
            self._stage = None
        self.stream.flush()
