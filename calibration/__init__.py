"""Calibrate exit thresholds: held-out data, exit outputs, policies for a goal, reports."""

from __future__ import annotations

from .data import Dataset, load_dataset

__all__ = ["Dataset", "load_dataset"]
