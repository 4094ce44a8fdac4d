"""The PyTorch side of export: user module factories, tracing to ONNX, checking exit outputs.

torch is never imported here: callers pass the module they imported (``torch``) where needed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._optional import require
from .bundle import BATCH
from .errors import EdgePerceiverError, ExportError, InputError
from .passes.shapes import make_batch_dynamic

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

#: the image input's name in every exported graph
INPUT_NAME = "input"


def load_module_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """Resolve ``"package.module:factory"`` (or ``"path/to/file.py:factory"``) to a zero-argument callable.

    The factory must return an ``nn.Module`` (or ``(module, input_shape)``, the shape then
    ignored: ``export_module`` takes it explicitly) whose forward returns exit logits in order.
    """
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"module factory {spec!r} must look like 'package.module:factory' or 'file.py:factory'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise InputError(f"{path}: no such Python file")
            mspec = importlib.util.spec_from_file_location(f"_edgeperceiver_factory_{path.stem}", path)
            if mspec is None or mspec.loader is None:
                raise InputError(f"{path}: cannot be imported")
            mod = importlib.util.module_from_spec(mspec)
            sys.modules[mspec.name] = mod
            mspec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
    except EdgePerceiverError:
        raise
    except Exception as exc:  # importing user code can raise anything
        raise InputError(f"cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"{mod_name!r} has no callable {attr!r}")

    def make() -> torch.nn.Module:
        got = factory()
        if isinstance(got, tuple) and len(got) == 2:
            got = got[0]
        return got

    return make


def torch_to_onnx(
    module: torch.nn.Module, x: torch.Tensor, names: Sequence[str], opset: int, torch: Any
) -> onnx.ModelProto:
    onnx = require("onnx", purpose="ONNX export")
    axes = {INPUT_NAME: {0: BATCH}, **{n: {0: BATCH} for n in names}}
    with tempfile.TemporaryDirectory(prefix="edgeperceiver-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings(), contextlib.ExitStack() as layouts:
                warnings.simplefilter("ignore")
                # modules may trace in an export-friendly layout (DynPerceiver: channels-first
                # z->x attention); verification then compares it with their normal forward
                for m in module.modules():
                    layout = getattr(m, "export_layout", None)
                    if callable(layout):
                        layouts.enter_context(layout())
                torch.onnx.export(
                    module, (x,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=list(names), dynamic_axes=axes, do_constant_folding=True,
                )
        except EdgePerceiverError:
            raise
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
        model = onnx.load(str(path))
    make_batch_dynamic(model)
    return model


def exit_tensors(outs: Any, torch: Any) -> list[Any]:
    if isinstance(outs, torch.Tensor):
        raise ExportError(
            "the module returns a single tensor; a multi-exit model must return a tuple/list of exit "
            "logits [batch, classes], in exit order"
        )
    if isinstance(outs, Mapping):
        outs = list(outs.values())
    if not isinstance(outs, (tuple, list)) or not outs:
        raise ExportError(f"the module returns {type(outs).__name__}; expected a tuple/list of exit logits")
    for k, t in enumerate(outs, 1):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            what = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ExportError(f"exit {k} of the module is {what}; exits must be logits of shape [batch, classes]")
    return list(outs)
