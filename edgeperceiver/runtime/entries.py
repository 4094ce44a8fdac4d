"""Which target entry runs when none is named: the one calibrated last, else compiled last.

Every command that runs a bundle (``run``, ``bench``, ``python bundle/run.py``, ``serve``)
and :func:`edgeperceiver.runtime.load` choose through :func:`choose_entry`, so an
unqualified run uses the thresholds the user calibrated last. The manifest stamps each
entry with the edit number of its last compile and calibration
(:meth:`edgeperceiver.bundle.Manifest.with_target`).

Standard library only: ships inside standalone bundles.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bundle import Manifest, TargetEntry
from ..types import Precision, TargetName


class NoThresholdsWarning(UserWarning):
    """The entry that runs has no thresholds: every sample takes the last exit."""


@dataclass(frozen=True)
class EntryChoice:
    """The entry chosen, and why (``"named"``, ``"calibrated last"``, ``"compiled last"``)."""

    entry: TargetEntry
    reason: str

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def warning(self) -> str | None:
        """A one-line warning when the entry has no thresholds, else ``None``."""
        if self.entry.thresholds is not None:
            return None
        return (
            f"entry {self.key} has no thresholds: every sample takes the last exit "
            f"(set them with 'edgeperceiver calibrate BUNDLE --entry {self.key} --data HELD_OUT')"
        )

    def describe(self) -> str:
        """``entry openvino-int8 (calibrated last; thresholds max_drop=0.5)``."""
        th = self.entry.thresholds
        detail = "no thresholds" if th is None else f"thresholds {th.goal}, criterion {th.criterion.value}"
        return f"entry {self.key} ({self.reason}; {detail})"

    def to_dict(self) -> dict[str, object]:
        th = self.entry.thresholds
        return {
            "entry": self.key,
            "reason": self.reason,
            "thresholds": None if th is None else list(th.values),
            "criterion": None if th is None else th.criterion.value,
            "goal": None if th is None else th.goal,
        }


def last_compiled(manifest: Manifest) -> TargetEntry:
    """The entry compiled last (export's ONNX Runtime fp32 reference when nothing was compiled)."""
    ref = f"{TargetName.ONNXRUNTIME.value}-{Precision.FP32.value}"
    entries = list(manifest.targets.values())
    if not entries:
        return manifest.target(None)  # raises the bundle's own "no target" error
    return max(entries, key=lambda e: (e.compiled, e.key == ref))


def choose_entry(manifest: Manifest, name: str | TargetName | None = None) -> EntryChoice:
    """The entry named ``name``, else the one calibrated last, else the one compiled last."""
    if name is not None:
        return EntryChoice(manifest.target(name), "named")
    calibrated = [e for e in manifest.targets.values() if e.thresholds is not None]
    if calibrated:
        return EntryChoice(max(calibrated, key=lambda e: (e.calibrated, e.compiled)), "calibrated last")
    return EntryChoice(last_compiled(manifest), "compiled last")
