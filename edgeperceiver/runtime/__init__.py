"""The on-device runtime: numpy + one backend, nothing else.

>>> runner = load("bundle/", "onnxruntime-fp32")          # doctest: +SKIP
>>> pred = runner.predict(x)                               # doctest: +SKIP
>>> pred.labels, pred.exits, pred.confidences              # doctest: +SKIP

Importing this package imports only the standard library and numpy; the backend's
engine (onnxruntime, openvino, tensorrt) is imported when a bundle is loaded.
"""

from __future__ import annotations

from .criteria import resolve_thresholds, scores, softmax
from .preprocess import load_image, load_images
from .runner import Prediction, Runner, load

__all__ = [
    "Prediction",
    "Runner",
    "load",
    "load_image",
    "load_images",
    "resolve_thresholds",
    "scores",
    "softmax",
]
