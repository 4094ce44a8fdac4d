"""Calibrate exit thresholds: held-out data, exit outputs, policies for a goal, reports.

>>> import edgeperceiver.calibration as cal                                            # doctest: +SKIP
>>> result = cal.calibrate("bundle/", "heldout/", target="openvino-int8",
...                        goal=cal.MaxDrop(0.5))                           # doctest: +SKIP
>>> print(result.render())                                                 # doctest: +SKIP

Only numpy and the standard library are imported here; matplotlib (report plot) and the
runtime's engine are imported when needed.
"""

from __future__ import annotations

from edgeperceiver.data import Dataset, load_dataset, split_fit_check, stratified_subset
from edgeperceiver.progress import TextProgress

from .calibrate import CalibrationResult, ManualThresholds, calibrate, choose, set_thresholds
from .collect import ExitRecord, collect
from .goals import Budget, ExitCosts, Goal, MaxDrop, PaperMix, Risk, exit_costs, goal_from_options
from .policies import OperatingPoint, evaluate
from .risk import Bound, RiskLoss

__all__ = [
    "Bound",
    "Budget",
    "CalibrationResult",
    "Dataset",
    "ExitCosts",
    "ExitRecord",
    "Goal",
    "ManualThresholds",
    "MaxDrop",
    "OperatingPoint",
    "PaperMix",
    "Risk",
    "RiskLoss",
    "TextProgress",
    "calibrate",
    "choose",
    "collect",
    "evaluate",
    "exit_costs",
    "goal_from_options",
    "load_dataset",
    "set_thresholds",
    "split_fit_check",
    "stratified_subset",
]
