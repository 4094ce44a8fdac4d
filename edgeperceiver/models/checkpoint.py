"""Safe loading of Dyn-Perceiver checkpoints (official training format or a bare state_dict).

Files are read with ``torch.load(weights_only=True)`` and an explicit allow-list
(``argparse.Namespace``, which the official training script stores as ``'args'``); a pickle
that needs anything else — e.g. one that would call ``os.system`` — is refused, never run.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._optional import require
from ..errors import CheckpointError, EdgePerceiverError, ModelError
from .config import FLAG_NAMES
from .registry import check_flags, create_model, get_spec

if TYPE_CHECKING:
    from torch import Tensor, nn

#: globals a checkpoint may reference besides tensors and plain containers
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)
#: ``key="auto"`` looks for the weights under these keys, in order
AUTO_KEYS: tuple[str, ...] = ("model", "state_dict", "module", "model_ema", "state_dict_ema")
#: official ``args`` fields that map onto constructor flags (``nb_classes`` -> ``num_classes``)
_ARG_FLAGS: tuple[str, ...] = tuple(f for f in FLAG_NAMES if f not in ("num_classes", "drop_rate", "drop_path_rate"))
_SHOW = 5
#: the largest ``input_size`` a checkpoint may ask for (pixels per side)
MAX_INPUT_SIZE = 4096


def read_checkpoint(path: str | Path) -> Any:
    """Unpickle ``path`` with ``weights_only=True`` and the allow-list; errors -> CheckpointError."""
    torch = require("torch", purpose="loading checkpoints")
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            detail = _unsupported_global(msg)
            raise CheckpointError(
                f"refusing to load {p}: it uses pickle features or Python objects outside the allow-list"
                f"{detail}. A checkpoint should hold only tensors, containers and argparse.Namespace; "
                "this file may carry code that runs when unpickled. It was not executed."
            ) from None
        raise CheckpointError(
            f"{p} is not a readable PyTorch checkpoint (corrupt pickle: {_first_line(msg)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{p} is not a readable PyTorch checkpoint (truncated or corrupt: {_first_line(str(exc))})"
        ) from None


def _first_line(msg: str) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else "unknown error"
    return line[:200]


def _unsupported_global(msg: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"[Uu]nsupported global:? ([\w.]+)", msg)
    return f" (it needs {found.group(1)})" if found else ""


def select_state_dict(obj: Any, key: str = "auto") -> tuple[dict[str, Tensor], Any]:
    """The state_dict inside a loaded checkpoint and its ``args`` (or None)."""
    torch = require("torch", purpose="loading checkpoints")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a checkpoint dict or a state_dict, got {type(obj).__name__}")
    args = obj.get("args")
    if key == "auto":
        chosen = next((k for k in AUTO_KEYS if isinstance(obj.get(k), Mapping)), None)
        if chosen is None:
            if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
                return _clean(dict(obj)), None  # a bare state_dict
            raise CheckpointError(
                f"no weights found: the checkpoint has keys {sorted(map(str, obj))[:10]}, none of "
                f"{list(AUTO_KEYS)} holds a state_dict, and it is not a bare state_dict"
            )
        sd = obj[chosen]
    else:
        if not isinstance(obj.get(key), Mapping):
            raise CheckpointError(f"checkpoint has no state_dict under key {key!r}; keys: {sorted(map(str, obj))}")
        sd = obj[key]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"state_dict entries that are not tensors: {bad[:_SHOW]}")
    return _clean(dict(sd)), args


def _clean(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip a DistributedDataParallel ``module.`` prefix; cast floating tensors to float32."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def flags_from_args(args: Any) -> dict[str, Any]:
    """Constructor flags stored in an official ``args`` Namespace (or dict)."""
    src = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    flags = {k: src[k] for k in _ARG_FLAGS if k in src and src[k] is not None}
    if src.get("num_SA_heads") is None:
        flags.pop("num_SA_heads", None)
    if src.get("nb_classes") is not None:
        flags["num_classes"] = src["nb_classes"]
    return flags


def load_checkpoint(
    path: str | Path,
    *,
    name: str | None = None,
    key: str = "auto",
    strict: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build the model a checkpoint describes and load its weights; eval mode, float32.

    The architecture comes from ``name`` or else ``args.model``; flags from ``args``
    (``depth_factor``, ``spatial_reduction``, ``with_*``, ``SA_widening_factor``, ``input_size``
    ...) and then ``overrides``. The class count is read from the weights (the official
    script builds 1000-class models whatever ``nb_classes`` says). ``key="auto"`` takes
    ``'model'`` (then ``'state_dict'``, ``'module'``, ``'model_ema'``); pass
    ``key="model_ema"`` for the EMA weights. fp16/bf16 tensors are cast to float32.

    ``strict=False`` ignores missing and unexpected keys; wrongly shaped ones always raise.
    Raises :class:`CheckpointError` for unreadable/unsafe files and key or shape mismatches,
    :class:`ModelError` for unknown names or flags.
    """
    obj = read_checkpoint(path)
    sd, args = select_state_dict(obj, key)
    arch = name
    if arch is None and args is not None:
        arch = getattr(args, "model", None) if not isinstance(args, Mapping) else args.get("model")
    if not arch:
        raise CheckpointError(
            f"{path}: cannot tell the architecture (no args.model in the checkpoint); pass name=<registry name>"
        )
    get_spec(str(arch))
    check_flags(overrides)
    flags = flags_from_args(args) if args is not None else {}
    head = sd.get("early_classifier3.weight")
    if head is not None and head.dim() == 2:
        flags["num_classes"] = int(head.shape[0])
    flags.update(overrides)
    _check_input_size(flags.get("input_size"), path)
    try:
        model = create_model(str(arch), **flags)
    except ModelError as exc:
        raise CheckpointError(f"{path}: the checkpoint's settings do not build {arch!r}: {exc}") from exc
    _load_into(model, sd, strict=strict, what=f"{path} into {arch!r}")
    return model.float().eval()


def _check_input_size(size: Any, path: str | Path) -> None:
    """Refuse an absurd ``args.input_size`` before building a model that would allocate for it."""
    if size is None or isinstance(size, bool) or not isinstance(size, int):
        return  # the model's own flag checks name a wrong type
    if size > MAX_INPUT_SIZE:
        raise CheckpointError(
            f"{path}: args.input_size = {size} is beyond {MAX_INPUT_SIZE} pixels per side; a corrupt or "
            "hostile checkpoint? (pass input_size=... to override it)"
        )


def _load_into(model: nn.Module, sd: Mapping[str, Tensor], *, strict: bool, what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", shapes)):
            if items and (strict or label == "wrongly shaped"):
                more = f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
        raise CheckpointError(
            f"checkpoint does not match the architecture when loading {what}: "
            + "; ".join(parts)
            + ". Is it a checkpoint of another model or with other flags (depth_factor, with_* ...)?"
        )
    try:
        model.load_state_dict(dict(sd), strict=strict)
    except (RuntimeError, EdgePerceiverError) as exc:
        raise CheckpointError(f"loading {what} failed: {_first_line(str(exc))}") from exc
