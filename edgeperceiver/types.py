"""Enums shared by the library, the runtime and the CLI (standard library only)."""

from __future__ import annotations

from enum import Enum


class TargetName(str, Enum):
    """A backend that compiles and runs bundle segments."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"


class Precision(str, Enum):
    """Numeric precision a target runs at (what is deployed is what is calibrated)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    #: measured on the target: per segment the fastest precision that keeps every exit's
    #: agreement with FP32 within the accuracy gate (OpenVINO)
    AUTO = "auto"


class Criterion(str, Enum):
    """Exit criterion: how confident a sample must be to leave at an exit.

    Every criterion is a score where *higher means more confident*; a sample leaves at
    exit k when ``score >= threshold[k]``. Entropy is therefore negated
    (``score = -entropy``).
    """

    MAX_SOFTMAX = "max_softmax"
    ENTROPY = "entropy"
    MARGIN = "margin"
