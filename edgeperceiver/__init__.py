"""edgeperceiver: ship early-exit image classifiers (Dynamic Perceiver) to CPUs and GPUs.

``import edgeperceiver`` is light: it imports neither torch, onnx, openvino nor tensorrt.
"""

from __future__ import annotations

from .errors import EdgePerceiverError

__version__ = "0.1.0"
__all__ = ["EdgePerceiverError", "__version__"]
