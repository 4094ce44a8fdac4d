"""What ``edgeperceiver run`` and the standalone ``run.py`` print: rows and their rendering.

Standard library + numpy only (ships inside standalone bundles).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from .runner import Prediction, Runner, ThresholdsLike


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


def render_rows(rows: Sequence[ResultRow], *, as_json: bool = False) -> str:
    """JSON lines (one object per row), or an aligned text table with an exit summary."""
    if as_json:
        return "\n".join(json.dumps(asdict(r)) for r in rows)
    header = ("file", "label", "class", "exit", "confidence")
    body = [(r.file, str(r.label), r.class_name, str(r.exit), f"{r.confidence:.4f}") for r in rows]
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
