"""The model registry: registry names -> (backbone, latent count, default flags).

Standard library only at import time (``list_models`` works without torch);
:func:`create_model` imports torch when it builds. Official names are those of the official
repository (LeapLabTHU/Dynamic_Perceiver); their defaults are the flags of its README training
commands (``--spatial_reduction true --with_last_CA true --SA_widening_factor 4 --with_x2z
true --with_dwc true --with_z2x true --with_isc true``, depth_factor 1 1 1 2 for RegNet,
1 1 1 1 for ResNet, 1 1 1 3 for MobileNet) — the official constructors' own defaults
(``spatial_reduction=False``) do not run.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._optional import require
from ..errors import ModelError
from .config import (
    EXIT_NAMES,
    FLAG_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DynPerceiverConfig,
    make_config,
)

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    backbone: str
    num_latents: int
    defaults: tuple[tuple[str, Any], ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    official: bool = True
    description: str = ""
    crop_pct: float = 0.875  #: evaluation transform: resize to input_size / crop_pct, centre-crop input_size

    def config(self, **flags: Any) -> DynPerceiverConfig:
        """The config for these flags over the entry's defaults (flags must be known)."""
        merged = dict(self.defaults)
        merged.update(flags)
        return make_config(self.backbone, self.num_latents, merged)


@dataclass(frozen=True)
class ModelInfo:
    """Facts an exporter needs about a model: input size, classes, exits, preprocessing."""

    name: str
    input_size: int
    num_classes: int
    exit_names: tuple[str, ...] = EXIT_NAMES
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    flags: Mapping[str, Any] = field(default_factory=dict)
    crop_pct: float = 0.875  #: resize the shorter side to input_size / crop_pct, then centre-crop


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add ``spec`` to the registry (a name can be registered once unless ``replace``)."""
    if spec.name in _REGISTRY and not replace:
        raise ModelError(f"model {spec.name!r} is already registered")
    unknown = [k for k, _ in spec.defaults if k not in FLAG_NAMES]
    if unknown:
        raise ModelError(f"model {spec.name!r}: unknown default flags {unknown}")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(pattern: str = "", *, official_only: bool = False) -> list[str]:
    """Registered names containing ``pattern`` (sorted)."""
    return sorted(n for n, s in _REGISTRY.items() if pattern in n and (s.official or not official_only))


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name`` or :class:`ModelError` naming close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}.{hint} ({len(_REGISTRY)} models: see edgeperceiver.models.list_models())"
        ) from None


def check_flags(flags: Mapping[str, Any]) -> None:
    """Raise :class:`ModelError` for flags that are not constructor flags."""
    for key in flags:
        if key not in FLAG_NAMES:
            close = difflib.get_close_matches(key, FLAG_NAMES, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ModelError(f"unknown model flag {key!r}.{hint} Valid flags: {', '.join(FLAG_NAMES)}")


def create_model(name: str, **flags: Any) -> nn.Module:
    """Build registry model ``name`` (random init, train mode), flags overriding its defaults.

    Raises :class:`ModelError` for an unknown name or flag (listing close matches) and for
    flag values the architecture cannot take.
    """
    spec = get_spec(name)
    check_flags(flags)
    cfg = spec.config(**flags)
    require("torch", purpose=f"building {name}")
    from .dynperceiver import DynPerceiver

    model = DynPerceiver(cfg, model_name=name)
    model.mean, model.std, model.crop_pct = spec.mean, spec.std, spec.crop_pct
    return model


def model_info(model: nn.Module | str) -> ModelInfo:
    """:class:`ModelInfo` of a built model or of a registry name (its defaults)."""
    if isinstance(model, str):
        spec = get_spec(model)
        cfg = spec.config()
        return ModelInfo(
            spec.name,
            cfg.input_size,
            cfg.num_classes,
            EXIT_NAMES,
            spec.mean,
            spec.std,
            dict(spec.defaults),
            spec.crop_pct,
        )
    mcfg = getattr(model, "config", None)
    name = str(getattr(model, "model_name", type(model).__name__))
    flags = {k: getattr(mcfg, k) for k in FLAG_NAMES} if mcfg is not None else {}
    return ModelInfo(
        name=name,
        input_size=int(getattr(model, "input_size", 224)),
        num_classes=int(getattr(model, "num_classes", 0)),
        exit_names=tuple(getattr(model, "exit_names", EXIT_NAMES)),
        mean=tuple(getattr(model, "mean", IMAGENET_MEAN)),
        std=tuple(getattr(model, "std", IMAGENET_STD)),
        flags=flags,
        crop_pct=float(getattr(model, "crop_pct", 0.875)),
    )


# --------------------------------------------------------------------------- official zoo

_COMMON: tuple[tuple[str, Any], ...] = (
    ("spatial_reduction", True),
    ("with_last_CA", True),
    ("SA_widening_factor", 4),
    ("with_x2z", True),
    ("with_dwc", True),
    ("with_z2x", True),
    ("with_isc", True),
)
_REGNET = (*_COMMON, ("depth_factor", (1, 1, 1, 2)))
_RESNET = (*_COMMON, ("depth_factor", (1, 1, 1, 1)), ("drop_rate", 0.2), ("drop_path_rate", 0.2))
_MOBILENET = (*_COMMON, ("depth_factor", (1, 1, 1, 3)))

_OFFICIAL: tuple[tuple[str, str, tuple[int, ...], tuple[tuple[str, Any], ...]], ...] = (
    ("reg400m", "regnet_y_400mf", (32, 64, 128, 256, 512), _REGNET),
    ("reg800m", "regnet_y_800mf", (32, 64, 128, 256, 512), _REGNET),
    ("reg1x6g", "regnet_y_1_6gf", (128, 256, 512), _REGNET),
    ("reg3x2g", "regnet_y_3_2gf", (128, 256, 512), _REGNET),
    ("resnet18", "resnet18", (128, 256, 512), _RESNET),
    ("resnet34", "resnet34", (128, 256, 512), _RESNET),
    ("resnet50", "resnet50", (64, 128, 256, 512), _RESNET),
    ("resnet50_050", "resnet50_050", (64, 128, 256), _RESNET),
    ("resnet50_0375", "resnet50_0375", (64, 128, 256), _RESNET),
    ("resnet50_0625", "resnet50_0625", (128, 160, 192, 256), _RESNET),
    ("resnet50_075", "resnet50_075", (128, 256), _RESNET),
    ("mobilenetV3", "mobilenet_v3_large", (128, 256, 512), _MOBILENET),
    ("mobilenetV3_0x5", "mobilenet_v3_large_0x5", (128, 256, 512), _MOBILENET),
    ("mobilenetV3_0x75", "mobilenet_v3_large_0x75", (128, 256, 512), _MOBILENET),
    ("mobilenetV3_1x25", "mobilenet_v3_large_1x25", (128, 256, 512), _MOBILENET),
    ("mobilenetV3_1x5", "mobilenet_v3_large_1x5", (128, 256, 512), _MOBILENET),
    ("mobilenetV3_2x0", "mobilenet_v3_large_2x0", (128, 256, 512), _MOBILENET),
)

for _prefix, _backbone, _latents, _defaults in _OFFICIAL:
    for _t in _latents:
        register_model(ModelSpec(f"{_prefix}_perceiver_t{_t}", _backbone, _t, _defaults))

# --------------------------------------------------------------------------- demo model (not official)

register_model(
    ModelSpec(
        "digits_perceiver_t32",
        "regnet_custom:16:1x16,1x32,3x128,2x384:16",
        32,
        (
            *_COMMON,
            ("SA_widening_factor", 2),
            ("spatial_reduction", False),
            ("depth_factor", (1, 1, 1, 1)),
            ("input_size", 32),
            ("num_classes", 10),
        ),
        official=False,
        description="demo: tiny RegNetY-style Dyn-Perceiver for 32x32 digits (scripts/train_digits.py)",
        crop_pct=1.0,  # trained on whole 32x32 images: resize straight to 32, no crop
    )
)
