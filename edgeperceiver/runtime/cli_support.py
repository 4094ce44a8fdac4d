"""What ``edgeperceiver run`` and the standalone ``run.py`` print: rows and their rendering.

Standard library + numpy only (ships inside standalone bundles).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import PurePath
from typing import Any

from .criteria import ThresholdsLike
from .entries import EntryChoice
from .runner import Prediction, Runner


@dataclass(frozen=True)
class ResultRow:
    """One classified sample."""

    file: str  #: the input file, or ``file[i]`` for row i of an array file
    label: int
    class_name: str  #: from the bundle's class names, else the label as text
    exit: int  #: 1-based exit taken
    confidence: float  #: top-1 softmax probability at that exit


def to_rows(names: Sequence[str], pred: Prediction, classes: Sequence[str] | None = None) -> list[ResultRow]:
    """Pair names with predictions (one row per sample, input order)."""
    rows = []
    for i, name in enumerate(names):
        label = int(pred.labels[i])
        cname = classes[label] if classes is not None and 0 <= label < len(classes) else str(label)
        rows.append(ResultRow(name, label, cname, int(pred.exits[i]), float(pred.confidences[i])))
    return rows


def run_inputs(
    runner: Runner,
    inputs: Iterable[str | os.PathLike[str]],
    *,
    batch_size: int | None = None,
    thresholds: ThresholdsLike | None = None,
) -> list[ResultRow]:
    """Classify image files, directories and ``.npy``/``.npz`` files; one row per sample."""
    names, pred = runner.predict_files(list(inputs), thresholds=thresholds, batch_size=batch_size)
    return to_rows(names, pred, runner.classes)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters, newlines and escape sequences shown as ``\\xNN``.

    Class names come from the manifest and file names from the user's disk; neither may
    move the cursor, recolour the terminal or forge table rows.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in text)


def render_rows(rows: Sequence[ResultRow], *, as_json: bool = False) -> str:
    """JSON lines (one object per row), or an aligned text table with an exit summary."""
    if as_json:
        return "\n".join(json.dumps(asdict(r)) for r in rows)
    header = ("file", "label", "class", "exit", "confidence")
    body = [
        (printable(r.file), str(r.label), printable(r.class_name), str(r.exit), f"{r.confidence:.4f}") for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    right = {1, 3, 4}

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs)

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    if rows:
        counts: dict[int, int] = {}
        for r in rows:
            counts[r.exit] = counts.get(r.exit, 0) + 1
        mix = ", ".join(f"exit {k}: {v}" for k, v in sorted(counts.items()))
        out.append(f"{len(rows)} sample(s); {mix}")
    return "\n".join(line.rstrip() for line in out)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: dataclasses, enums, paths, numpy values; NaN and inf -> ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return jsonable(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return jsonable(tolist())
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def dumps_json(obj: Any) -> str:
    """One JSON document a script can rely on: strict JSON (no NaN/inf; those become null)."""
    return json.dumps(jsonable(obj), indent=1, allow_nan=False)


def exit_counts(rows: Sequence[ResultRow], num_exits: int) -> list[int]:
    """How many rows left at each exit (index 0 = exit 1)."""
    counts = [0] * num_exits
    for r in rows:
        counts[r.exit - 1] += 1
    return counts


def run_document(rows: Sequence[ResultRow], choice: EntryChoice, num_exits: int) -> dict[str, Any]:
    """What ``run --json`` prints: the entry that ran, its thresholds, the exit counts and every row."""
    counts = exit_counts(rows, num_exits)
    n = len(rows)
    return {
        **choice.to_dict(),
        "warning": choice.warning,
        "samples": n,
        "exit_counts": counts,
        "exit_share": [c / n if n else None for c in counts],
        "rows": [asdict(r) for r in rows],
    }
