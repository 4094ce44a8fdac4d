"""Dyn-Perceiver configuration: the constructor flags as a frozen dataclass (standard library only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError

EXIT_NAMES: tuple[str, str, str, str] = ("y_early3", "y_att", "y_cnn", "y_merge")
#: self-attention layers per stage before ``depth_factor`` (independent of the CNN depth)
BASE_SA_DEPTH: tuple[int, int, int, int] = (3, 3, 9, 3)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: official backbone names (``cnn_arch`` of the official constructors)
BACKBONE_NAMES: tuple[str, ...] = (
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_1_6gf",
    "regnet_y_3_2gf",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50_0375",
    "resnet50_050",
    "resnet50_0625",
    "resnet50_075",
    "mobilenet_v3_large",
    "mobilenet_v3_large_0x5",
    "mobilenet_v3_large_0x75",
    "mobilenet_v3_large_1x25",
    "mobilenet_v3_large_1x5",
    "mobilenet_v3_large_2x0",
)
CUSTOM_REGNET_PREFIX = "regnet_custom:"


@dataclass(frozen=True)
class DynPerceiverConfig:
    """Every constructor flag of the official Dyn-Perceiver (names kept as in the official CLI).

    ``backbone`` and ``num_latents`` are fixed by the registry name; the rest are flags that
    :func:`~edgeperceiver.models.create_model` accepts. ``spatial_reduction=False`` (no 7x7
    pooling before the x->z cross-attention) sizes the position bias to the real feature grid;
    the official code cannot run that setting, so no official checkpoint uses it.
    """

    backbone: str
    num_latents: int
    input_size: int = 224
    num_classes: int = 1000
    num_SA_heads: tuple[int, ...] = (1, 2, 4, 8)
    num_latent_channels: int | None = None
    dropout: float = 0.0
    SA_widening_factor: int = 4
    spatial_reduction: bool = True
    depth_factor: tuple[int, ...] = (1, 1, 1, 1)
    with_x2z: bool = True
    with_z2x: bool = True
    with_dwc: bool = True
    with_last_CA: bool = True
    with_isc: bool = True
    drop_rate: float = 0.0  #: ResNet family: dropout before the CNN classifier (training only)
    drop_path_rate: float = 0.0  #: ResNet family: stochastic depth (training only)

    def validate(self) -> None:
        """Raise :class:`ModelError` for flag values the architecture cannot take."""
        if self.backbone not in BACKBONE_NAMES and not self.backbone.startswith(CUSTOM_REGNET_PREFIX):
            raise ModelError(f"unknown backbone {self.backbone!r}")
        if len(self.depth_factor) != 4 or any(d < 1 for d in self.depth_factor):
            raise ModelError(f"depth_factor needs 4 integers >= 1, got {list(self.depth_factor)}")
        if len(self.num_SA_heads) != 4 or any(h < 1 for h in self.num_SA_heads):
            raise ModelError(f"num_SA_heads needs 4 integers >= 1, got {list(self.num_SA_heads)}")
        if self.num_latents < 8 or self.num_latents % 8:
            raise ModelError(f"num_latents must be a multiple of 8 (halved three times), got {self.num_latents}")
        if self.input_size < 32:
            raise ModelError(f"input_size must be at least 32, got {self.input_size}")
        if self.num_classes < 1:
            raise ModelError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.SA_widening_factor < 1:
            raise ModelError(f"SA_widening_factor must be >= 1, got {self.SA_widening_factor}")
        if self.num_latent_channels is not None and self.num_latent_channels < 1:
            raise ModelError(f"num_latent_channels must be >= 1 or None, got {self.num_latent_channels}")
        for name in ("dropout", "drop_rate", "drop_path_rate"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ModelError(f"{name} must be in [0, 1), got {p}")


#: the flags ``create_model`` accepts (every config field but the two fixed by the name)
FLAG_NAMES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DynPerceiverConfig) if f.name not in ("backbone", "num_latents")
)
_BOOL_FLAGS = {"spatial_reduction", "with_x2z", "with_z2x", "with_dwc", "with_last_CA", "with_isc"}
_INT_FLAGS = {"input_size", "num_classes", "SA_widening_factor"}
_FLOAT_FLAGS = {"dropout", "drop_rate", "drop_path_rate"}
_TUPLE_FLAGS = {"depth_factor", "num_SA_heads"}


def to_bool(value: Any, name: str = "flag") -> bool:
    """The official ``str2bool``: bools pass, 'true/yes/t/y/1' and 'false/no/f/n/0' convert."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("yes", "true", "t", "y", "1"):
            return True
        if v in ("no", "false", "f", "n", "0"):
            return False
    raise ModelError(f"{name} must be a boolean (or 'true'/'false'), got {value!r}")


def coerce_flag(name: str, value: Any) -> Any:
    """Convert one flag value to its config type (official checkpoints store strings/lists)."""
    try:
        if name in _BOOL_FLAGS:
            return to_bool(value, name)
        if name in _INT_FLAGS:
            if isinstance(value, bool) or int(value) != float(value):
                raise ValueError
            return int(value)
        if name in _FLOAT_FLAGS:
            return float(value)
        if name in _TUPLE_FLAGS:
            if value is None and name == "num_SA_heads":
                return (1, 2, 4, 8)
            if isinstance(value, str):
                value = value.replace(",", " ").split() if (" " in value or "," in value) else list(value)
            out = tuple(int(v) for v in value)
            return out
        if name == "num_latent_channels":
            return None if value is None else int(value)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid value for flag {name}: {value!r}") from exc
    return value


def make_config(backbone: str, num_latents: int, flags: Mapping[str, Any]) -> DynPerceiverConfig:
    """Build and validate a config from (already name-checked) flags."""
    cfg = DynPerceiverConfig(
        backbone=backbone, num_latents=num_latents, **{k: coerce_flag(k, v) for k, v in flags.items()}
    )
    cfg.validate()
    return cfg
