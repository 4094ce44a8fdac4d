"""The Dyn-Perceiver model zoo: registry, safe checkpoint loading, per-exit FLOPs.

Importing this package does not import torch; building a model does.

    >>> from edgeperceiver.models import create_model, load_checkpoint, count_flops
    >>> model = create_model("reg800m_perceiver_t128")            # official README flags
    >>> model = load_checkpoint("checkpoint-best.pth")             # arch + flags from args
    >>> y_early3, y_att, y_cnn, y_merge = model(images)            # four exits, in order
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .checkpoint import load_checkpoint, read_checkpoint
from .config import EXIT_NAMES, FLAG_NAMES, IMAGENET_MEAN, IMAGENET_STD, DynPerceiverConfig
from .flops import count_flops
from .registry import (
    ModelInfo,
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    model_info,
    register_model,
)

DEMO_MODEL = "digits_perceiver_t32"


def demo_checkpoint() -> Path:
    """Path of the shipped demo weights (``digits_perceiver_t32``, trained by scripts/train_digits.py)."""
    path = Path(__file__).resolve().parent / "weights" / f"{DEMO_MODEL}.pth"
    if not path.is_file():
        raise CheckpointError(f"the demo weights are missing from this installation: {path}")
    return path


__all__ = [
    "DEMO_MODEL",
    "EXIT_NAMES",
    "FLAG_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DynPerceiverConfig",
    "ModelInfo",
    "ModelSpec",
    "count_flops",
    "create_model",
    "demo_checkpoint",
    "get_spec",
    "list_models",
    "load_checkpoint",
    "model_info",
    "read_checkpoint",
    "register_model",
]
