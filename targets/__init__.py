"""Compile a bundle's segments for a target: one build module per backend.

Each backend module (``targets.onnxruntime``, ``targets.openvino``, ``targets.tensorrt``)
exposes ``compile_target(writer, precision, *, calib, options) -> TargetEntry``: it writes its
artifacts under ``writer.dir / "<target>-<precision>/"`` and returns the entry. The runtime
side lives in ``edgeperceiver.runtime`` (one small session class per backend).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeperceiver.bundle import BundleWriter, TargetEntry, edit_bundle
from edgeperceiver.errors import InputError
from edgeperceiver.types import Precision, TargetName

#: precisions each target can build
SUPPORTED: Mapping[TargetName, tuple[Precision, ...]] = {
    TargetName.ONNXRUNTIME: (Precision.FP32, Precision.INT8),
    TargetName.OPENVINO: (Precision.FP32, Precision.BF16, Precision.INT8, Precision.AUTO),
    TargetName.TENSORRT: (Precision.FP32, Precision.FP16, Precision.INT8),
}

CompileFn = Callable[..., TargetEntry]


def _check_supported(target: TargetName, precision: Precision) -> None:
    if precision not in SUPPORTED[target]:
        have = ", ".join(p.value for p in SUPPORTED[target])
        raise InputError(f"target {target.value} does not support precision {precision.value} (supported: {have})")


def _compiler(target: TargetName) -> CompileFn:
    module = importlib.import_module(f"edgeperceiver.targets.{target.value}")
    fn: CompileFn = module.compile_target
    return fn


def compile_bundle(
    bundle: str | os.PathLike[str],
    target: TargetName,
    precision: Precision,
    *,
    calib_data: str | os.PathLike[str] | np.ndarray | None = None,
    calib_samples: int = 300,
    options: Mapping[str, Any] | None = None,
) -> TargetEntry:
    """Compile every segment of ``bundle`` for ``target`` at ``precision``, atomically.

    ``calib_data``: an ImageFolder/image directory, a ``.npz`` with ``x``, or an (N, C, H, W)
    float32 array of preprocessed images; ``calib_samples`` caps how many are used. Targets that
    quantize (OpenVINO and ONNX Runtime INT8) require it; TensorRT INT8 uses it to make the bundle's
    quantization stage, else reads the stage already recorded. The bundle is untouched unless
    compilation succeeds.
    """
    _check_supported(target, precision)
    compile_target = _compiler(target)
    with edit_bundle(bundle) as writer:
        calib = None if calib_data is None else _calibration_inputs(writer, calib_data, calib_samples)
        entry = compile_target(writer, precision, calib=calib, options=dict(options or {}))
        assert writer.manifest is not None
        writer.manifest = writer.manifest.with_target(entry)
    return entry


def check_bundle(
    bundle: str | os.PathLike[str],
    target: TargetName,
    precision: Precision,
    *,
    calib_data: str | os.PathLike[str] | np.ndarray | None = None,
    calib_samples: int = 300,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """Run every step before the engine build (no engine library needed); a report with ``ready``.

    Only TensorRT has such a check (its engines are built on the device). With
    ``calib_data`` an INT8 check also makes the bundle's quantization stage and keeps it
    (when the check passes), so the device build does not quantize again.
    """
    _check_supported(target, precision)
    if target is not TargetName.TENSORRT:
        raise InputError(f"--check is available for the tensorrt target only, not {target.value}")
    check_target = importlib.import_module(f"edgeperceiver.targets.{target.value}").check_target
    try:
        with edit_bundle(bundle) as writer:
            calib = None if calib_data is None else _calibration_inputs(writer, calib_data, calib_samples)
            report = check_target(writer, precision, calib=calib, options=dict(options or {}))
            if not report.ready:
                raise _Discard(report)
    except _Discard as stop:
        return stop.report
    return report


class _Discard(Exception):
    """Leaves the bundle edit without writing anything (a failed check)."""

    def __init__(self, report: Any) -> None:
        super().__init__("check failed")
        self.report = report


def _calibration_inputs(
    writer: BundleWriter, data: str | os.PathLike[str] | np.ndarray, limit: int
) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data[:limit], dtype=np.float32)
    from edgeperceiver.data import load_dataset

    assert writer.manifest is not None
    return load_dataset(Path(data), writer.manifest.preprocess, limit=limit).x
