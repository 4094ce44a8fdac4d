"""TensorRT's log messages, collected: :class:`BuildLog` and the ``trt.ILogger`` feeding it.

Standard library only at import time (TensorRT is passed in or imported when a logger is made).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from .tensorrt_device import import_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt

#: TensorRT logger severities (``trt.ILogger.Severity`` values) by name
SEVERITIES: Mapping[int, str] = {0: "INTERNAL_ERROR", 1: "ERROR", 2: "WARNING", 3: "INFO", 4: "VERBOSE"}


@dataclass
class BuildLog:
    """Messages TensorRT logged (through :func:`make_trt_logger`), kept for the report.

    ``min_severity`` is the least severe level kept (2 = WARNING, 3 = INFO, 4 = VERBOSE).
    """

    min_severity: int = 2
    records: list[tuple[str, str]] = field(default_factory=list)
    echo: Callable[[str, str], None] | None = None

    def add(self, severity: int, message: str) -> None:
        """Record one message (called by TensorRT from its logger callback)."""
        level = int(severity)
        if level > self.min_severity:
            return
        name = SEVERITIES.get(level, str(level))
        text = str(message).rstrip()
        self.records.append((name, text))
        if self.echo is not None:
            self.echo(name, text)

    def counts(self) -> dict[str, int]:
        """Number of kept messages per severity name."""
        out: dict[str, int] = {}
        for name, _ in self.records:
            out[name] = out.get(name, 0) + 1
        return out

    def errors(self) -> list[str]:
        """Messages of severity ERROR or INTERNAL_ERROR."""
        return [m for s, m in self.records if s in ("ERROR", "INTERNAL_ERROR")]

    def text(self) -> str:
        """The log as text, one ``[SEVERITY] message`` per line."""
        return "".join(f"[{s}] {m}\n" for s, m in self.records)

    def mark(self, title: str) -> None:
        """Insert a section header (e.g. the segment being built) into the log."""
        self.records.append(("SECTION", title))


def make_trt_logger(log: BuildLog, *, module: Any = None) -> trt.ILogger:
    """A ``trt.ILogger`` subclass instance that forwards every message into ``log``.

    ``module`` is the tensorrt module (imported when None); any module with an ``ILogger``
    base class works, which is how this is tested without TensorRT.
    """
    if module is None:
        module = import_tensorrt()
    base: Any = module.ILogger

    def __init__(self: Any) -> None:
        # TensorRT requires the base initialiser on Python subclasses
        base.__init__(self)

    def log_message(self: Any, severity: Any, msg: str) -> None:
        log.add(int(severity), msg)

    cls = type("CollectingLogger", (base,), {"__init__": __init__, "log": log_message})
    return cast("trt.ILogger", cls())
