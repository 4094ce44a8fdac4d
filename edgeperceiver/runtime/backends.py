"""Backend registry: :class:`TargetName` -> ``"module:Class"``, imported only when asked for.

Adding a backend = one module under ``edgeperceiver/runtime/`` with a class implementing
:class:`~edgeperceiver.runtime.backend.Backend`, plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .._optional import EXTRAS
from ..errors import MissingDependencyError, TargetError
from ..types import TargetName
from .backend import Backend

#: target -> "module:Class" (module relative to this package)
REGISTRY: Mapping[TargetName, str] = {
    TargetName.ONNXRUNTIME: "onnxruntime:OrtBackend",
    TargetName.OPENVINO: "openvino:OpenVINOBackend",
    TargetName.TENSORRT: "tensorrt:TensorRTBackend",
}

#: target -> the engine module its backend needs (named in errors)
ENGINES: Mapping[TargetName, str] = {
    TargetName.ONNXRUNTIME: "onnxruntime",
    TargetName.OPENVINO: "openvino",
    TargetName.TENSORRT: "tensorrt",
}


def backend_class(target: TargetName | str) -> type[Any]:
    """The backend class registered for ``target`` (its module imported now)."""
    try:
        name = TargetName(target)
    except ValueError:
        have = ", ".join(t.value for t in TargetName)
        raise TargetError(f"unknown target {target!r} (known: {have})") from None
    module_name, _, cls_name = REGISTRY[name].partition(":")
    engine = ENGINES[name]
    try:
        module = importlib.import_module(f".{module_name}", __package__)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {name.value} backend cannot be imported ({exc}); install it with: "
            f"pip install 'edgeperceiver[{EXTRAS.get(engine, engine)}]'"
        ) from exc
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise TargetError(f"backend module {module.__name__} has no class {cls_name}")
    return cls


def create_backend(target: TargetName | str, **options: Any) -> Backend:
    """Instantiate the backend of ``target`` with ``options`` (``threads=None`` is dropped).

    A missing engine (e.g. ``openvino`` not installed) raises
    :class:`~edgeperceiver.errors.MissingDependencyError` naming the pip extra.
    """
    cls = backend_class(target)
    if options.get("threads", 0) is None:
        options.pop("threads")
    try:
        backend: Backend = cls(**options)
    except TypeError as exc:
        raise TargetError(f"invalid options for the {TargetName(target).value} backend: {exc}") from exc
    return backend
