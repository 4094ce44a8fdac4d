"""Lazy imports of optional heavy dependencies, with an error that names the pip extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

#: module name -> the pip extra that installs it
EXTRAS: dict[str, str] = {
    "torch": "export",
    "onnx": "export",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "nncf": "openvino",
    "tensorrt": "tensorrt",
    "pycuda": "tensorrt",
    "cupy": "tensorrt",
    "typer": "cli",
    "rich": "cli",
    "matplotlib": "calibrate",
    "sklearn": "demo",
    "ray": "serve",
    "PIL": "core",
}


def require(module: str, *, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming its pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top, top)
        why = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"'{module}' is not installed{why}. Install it with: "
            f"pip install 'edgeperceiver[{extra}]'"
        ) from exc
