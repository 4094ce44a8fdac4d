"""Progress bars for the command line: rich bars on a terminal, silence everywhere else.

The library reports progress through callbacks (:mod:`edgeperceiver.progress`); this
module draws them. :func:`progress_bars` yields a ``progress(stage, done, total)``
callback, or ``None`` when bars would get in the way: with ``--json`` (one document on
stdout and nothing else) or when stdout or stderr is not a terminal (a pipe, a log file,
CI). Bars go to stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any, TextIO

from edgeperceiver.progress import Message

#: readable names for the library's stage keys
LABELS = {
    "read": "reading held-out data",
    "run": "running every exit",
    "bench": "timing (interleaved)",
}


def label(stage: str) -> str:
    """The readable name of a stage key; ``"prefix: key"`` keeps its prefix."""
    prefix, sep, key = stage.rpartition(": ")
    return f"{prefix}{sep}{LABELS.get(key, key)}"


def interactive(stream: TextIO | None = None) -> bool:
    """Whether bars should be drawn: stdout and stderr are both terminals."""
    streams = (sys.stdout, sys.stderr) if stream is None else (stream,)
    return all(getattr(s, "isatty", lambda: False)() for s in streams)


class RichStages:
    """A ``progress(stage, done, total)`` callback: one rich bar per stage, on stderr."""

    def __init__(self, bars: Any) -> None:
        self._bars = bars
        self._tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        task = self._tasks.get(stage)
        if task is None:
            task = self._tasks[stage] = self._bars.add_task(label(stage), total=max(total, 1))
        self._bars.update(task, completed=min(done, total), total=max(total, 1))

    def stage(self, name: str) -> Any:
        """A ``progress(done, total)`` callback for one stage."""
        return lambda done, total: self(name, done, total)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[RichStages | None]:
    """Yield a stage callback drawing bars while the block runs, or ``None`` when quiet."""
    if not enabled or not interactive():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(
        TextColumn("{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with bars:
        yield RichStages(bars)


@contextmanager
def status(message: str, enabled: bool = True) -> Iterator[Message]:
    """A spinner on stderr while a step with no countable progress runs (quiet like the bars).

    Yields a ``sink(line)`` that shows the step's latest line beside the spinner (a no-op
    when quiet): pass it to :func:`edgeperceiver.progress.messages_to`.
    """
    if not enabled or not interactive():
        yield _drop
        return
    from rich.console import Console
    from rich.markup import escape

    with Console(stderr=True).status(escape(message)) as spinner:

        def show(line: str) -> None:
            first = next((x.strip() for x in line.splitlines() if x.strip()), "")
            if first:
                spinner.update(escape(f"{message}: {first[:100]}"))

        yield show


def _drop(line: str) -> None:
    """A message sink that shows nothing."""


@contextmanager
def stdout_to_stderr(enabled: bool = True) -> Iterator[None]:
    """Send everything written to stdout while the block runs to stderr.

    Third-party libraries print to stdout (NNCF's progress bars, some engines' logs); a
    command's stdout holds its result alone (the JSON document with ``--json``), so the
    library calls run inside this. File descriptor 1 is pointed at stderr too, for writers
    that bypass ``sys.stdout``.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    try:
        saved: int | None = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no real file descriptors (an embedding host): Python-level only
        saved = None
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
