"""Demo data sets (small, real, bundled with their libraries: no downloads)."""

from __future__ import annotations

from .digits import CLASSES, DigitsSplit, load_digits_split, to_model_input, write_imagefolder

__all__ = ["CLASSES", "DigitsSplit", "load_digits_split", "to_model_input", "write_imagefolder"]
