"""The demo data: scikit-learn's bundled handwritten digits as small RGB images.

``sklearn.datasets.load_digits`` holds 1,797 real 8x8 scans (16 grey levels) of the digits
0-9 written by 43 people. Here each one becomes a uint8 RGB image (dark ink on white
paper, bilinear upsampling to ``size`` x ``size``) and the set is split once, stratified by
class with a fixed seed, into train (70%) and held-out (30%). The held-out part is what
calibration and the demo use; the training script never sees it.

Preprocessing for the model is the manifest's: ``(pixel / 255 - mean) / std`` per channel
with the ImageNet mean/std (:func:`to_model_input`), NCHW float32.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .._optional import require
from ..errors import InputError
from ..fsutil import make_dir, temp_name

CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
HELDOUT_FRACTION = 0.3
SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DigitsSplit:
    """Train and held-out images (uint8, N x size x size x 3) with integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_heldout: np.ndarray
    y_heldout: np.ndarray
    classes: tuple[str, ...] = CLASSES


def render(raw: np.ndarray, size: int) -> np.ndarray:
    """8x8 grey levels 0..16 (ink) -> ``size`` x ``size`` x 3 uint8, dark ink on white."""
    if raw.ndim != 3 or raw.shape[1:] != (8, 8):
        raise InputError(f"expected N x 8 x 8 digit scans, got shape {raw.shape}")
    paper = np.clip(255.0 - raw.astype(np.float64) * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    out = np.empty((raw.shape[0], size, size, 3), dtype=np.uint8)
    for i, img in enumerate(paper):
        big = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(big, dtype=np.uint8)[:, :, None]
    return out


def stratified_split(
    labels: np.ndarray, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out): per class, a seeded shuffle and ``round(n * fraction)`` held out."""
    if not 0.0 < heldout_fraction < 1.0:
        raise InputError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = round(len(idx) * heldout_fraction)
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load_digits_split(size: int = 32, *, heldout_fraction: float = HELDOUT_FRACTION, seed: int = SEED) -> DigitsSplit:
    """The demo split at ``size`` x ``size`` pixels (deterministic for a given seed)."""
    if size < 8:
        raise InputError(f"size must be at least 8 pixels, got {size}")
    datasets = require("sklearn.datasets", purpose="the handwritten-digits demo data")
    bunch = datasets.load_digits()
    raw = np.asarray(bunch.images)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images = render(raw, size)
    tr, ho = stratified_split(labels, heldout_fraction, seed)
    return DigitsSplit(images[tr], labels[tr], images[ho], labels[ho], CLASSES)


def to_model_input(
    images: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W, ``(x / 255 - mean) / std``."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(f"expected uint8 N x H x W x 3 images, got {images.dtype} {images.shape}")
    x: np.ndarray = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def write_imagefolder(
    images: np.ndarray, labels: np.ndarray, classes: Sequence[str], dest: str | os.PathLike[str]
) -> Path:
    """Write an ImageFolder tree (``dest/<class>/<index>.png``) atomically; returns ``dest``.

    ``dest`` must not exist or be an empty directory. Files are named by their index in
    ``images`` (``00042.png``), so the order is reproducible.
    """
    dest = Path(dest)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(f"expected uint8 N x H x W x 3 images, got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise InputError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise InputError(f"labels must be in [0, {len(classes)}), got {labels.min()}..{labels.max()}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest} exists and is not an empty directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = make_dir(temp_name(dest, "staging"))  # umask modes, unlike mkdtemp's 0700
    try:
        for name in classes:
            make_dir(stage / name)
        width = max(5, len(str(len(images))))
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(img).save(stage / classes[int(y)] / f"{i:0{width}d}.png")
        if dest.exists():
            dest.rmdir()
        os.replace(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dest
