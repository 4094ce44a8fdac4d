"""The one error family of edgeperceiver.

Every error a user can cause derives from :class:`EdgePerceiverError`; the CLI maps the
family to exit codes in one place (``cli.py``). Messages say what was wrong and what to
do about it. This module is standard-library only (it ships inside standalone bundles).
"""

from __future__ import annotations


class EdgePerceiverError(Exception):
    """Base class of every error edgeperceiver raises on purpose."""

    exit_code: int = 1


class MissingDependencyError(EdgePerceiverError, ImportError):
    """An optional dependency (a pip extra) is not installed."""

    exit_code = 3


class ModelError(EdgePerceiverError):
    """An unknown model name or invalid model flags."""

    exit_code = 2


class CheckpointError(EdgePerceiverError):
    """A checkpoint that cannot be read, is unsafe, or does not match the model."""

    exit_code = 4


class ExportError(EdgePerceiverError):
    """Exporting or cutting a model failed, or its verification disagreed."""

    exit_code = 5


class BundleError(EdgePerceiverError):
    """A bundle that is missing, truncated, tampered with, or of another schema."""

    exit_code = 6


class InputError(EdgePerceiverError, ValueError):
    """Bad user input: unreadable image, wrong shape, dtype, NaN/inf, bad option."""

    exit_code = 2


class TargetError(EdgePerceiverError):
    """Compiling for, or running on, a target (OpenVINO, TensorRT, ONNX Runtime) failed."""

    exit_code = 7


class CalibrationError(EdgePerceiverError):
    """Thresholds could not be chosen: bad held-out data or an infeasible goal."""

    exit_code = 8
