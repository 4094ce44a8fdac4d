"""Image files and arrays -> model input, as the bundle's :class:`Preprocess` says; arrays checked.

Decoding uses Pillow, imported lazily: a bundle fed ``.npy``/``.npz`` arrays runs without
it. The pipeline is the usual ImageNet evaluation transform: resize the shorter side to
``pre.resize`` (or straight to ``pre.size`` when it is ``None``), centre crop to
``pre.size``, convert to RGB (or L for one channel), scale to [0, 1], normalise by
mean/std, lay out as (C, H, W) float32.

Standard library + numpy only at import time (this module ships inside standalone bundles).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import BATCH, Preprocess, TensorSpec
from ..errors import InputError, MissingDependencyError

#: file suffixes treated as images when a directory is expanded
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
#: the only formats Pillow may decode (by content, whatever the suffix): no EPS/PostScript
#: (Ghostscript), no PDF, no exotic plugins
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
#: file suffixes read as arrays of already-preprocessed inputs
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
#: keys tried, in order, in an ``.npz`` file (else its only array)
NPZ_KEYS = ("x", "input", "inputs", "images")

_INTERPOLATION = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "'PIL' is not installed (needed to decode image files; .npy/.npz arrays work without it). "
            "Install it with: pip install pillow"
        ) from exc
    return Image


def _resample(image_mod: Any, name: str) -> Any:
    if name not in _INTERPOLATION:
        raise InputError(f"unknown interpolation {name!r} in the bundle's preprocess (use one of {_INTERPOLATION})")
    return getattr(image_mod.Resampling, name.upper())


def _resized_size(width: int, height: int, pre: Preprocess) -> tuple[int, int]:
    """(width, height) after the resize step (shorter side -> ``pre.resize``)."""
    if pre.resize is None:
        return pre.size[1], pre.size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = pre.resize, int(pre.resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _normalise_stats(values: tuple[float, ...], channels: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise InputError(f"the bundle's preprocess {what} has {arr.size} values for {channels} channel(s)")
    return arr.reshape(channels, 1, 1)


def load_image(path: str | os.PathLike[str], pre: Preprocess) -> np.ndarray:
    """Decode and preprocess one image file into a (C, H, W) float32 array.

    Raises :class:`InputError` naming the file when it is missing, unreadable or corrupt.
    """
    image_mod = _pil()
    path = Path(path)
    if pre.channels not in (1, 3):
        raise InputError(f"preprocess.channels must be 1 or 3, the bundle says {pre.channels}")
    try:
        with image_mod.open(path, formats=IMAGE_FORMATS) as img:
            img.load()
            img = img.convert("L" if pre.channels == 1 else "RGB")
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such image file") from exc
    except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as exc:
        raise InputError(
            f"{path}: cannot read image ({type(exc).__name__}: {exc}; accepted formats: {', '.join(IMAGE_FORMATS)})"
        ) from exc
    return _transform(image_mod, img, pre, str(path))


def decode_image(data: bytes, pre: Preprocess, name: str = "image") -> np.ndarray:
    """Decode and preprocess one encoded image (PNG, JPEG, ... bytes) into (C, H, W) float32.

    The same pipeline as :func:`load_image`; errors are :class:`InputError` naming ``name``.
    """
    image_mod = _pil()
    if pre.channels not in (1, 3):
        raise InputError(f"preprocess.channels must be 1 or 3, the bundle says {pre.channels}")
    try:
        with image_mod.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            img.load()
            img = img.convert("L" if pre.channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as exc:
        raise InputError(f"{name}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return _transform(image_mod, img, pre, name)


def _transform(image_mod: Any, img: Any, pre: Preprocess, path: str) -> np.ndarray:
    """Resize, centre crop, scale and normalise a decoded PIL image (``path`` names it in errors)."""
    resample = _resample(image_mod, pre.interpolation)
    width, height = img.size
    if width < 1 or height < 1:
        raise InputError(f"{path}: image has no pixels ({width}x{height})")
    new_size = _resized_size(width, height, pre)
    if new_size != img.size:
        img = img.resize(new_size, resample=resample)
    crop_h, crop_w = pre.size
    width, height = img.size
    if crop_h > height or crop_w > width:
        # Same as torchvision's centre crop: pad (with zeros) what the image lacks.
        canvas = image_mod.new(img.mode, (max(width, crop_w), max(height, crop_h)))
        canvas.paste(img, ((canvas.size[0] - width) // 2, (canvas.size[1] - height) // 2))
        img, (width, height) = canvas, canvas.size
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    img = img.crop((left, top, left + crop_w, top + crop_h))
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = _normalise_stats(pre.mean, pre.channels, "mean")
    std = _normalise_stats(pre.std, pre.channels, "std")
    if np.any(std == 0):
        raise InputError("the bundle's preprocess std contains a zero")
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def load_images(paths: Sequence[str | os.PathLike[str]], pre: Preprocess) -> np.ndarray:
    """Decode and preprocess image files into one (N, C, H, W) float32 batch."""
    if len(paths) == 0:
        raise InputError("no images given")
    return np.stack([load_image(p, pre) for p in paths])


# --------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class InputBatch:
    """Preprocessed inputs with one display name per sample (``file`` or ``file[i]``)."""

    names: tuple[str, ...]
    x: np.ndarray  #: (N, C, H, W)


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named directly, plus the images and arrays in named directories (sorted, recursive).

    A missing path, or a directory without a single image/array, is an :class:`InputError`.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise InputError(f"{p}: directory contains no images or .npy/.npz arrays")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    if not out:
        raise InputError("no inputs given")
    return out


def load_array_file(path: str | os.PathLike[str]) -> np.ndarray:
    """The array in a ``.npy`` file, or in an ``.npz`` (key ``x``/``input``/... or its only array)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            return np.asarray(np.load(path, allow_pickle=False))
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            for k in NPZ_KEYS:
                if k in keys:
                    return np.asarray(z[k])
            if len(keys) == 1:
                return np.asarray(z[keys[0]])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{path}: cannot read array file ({type(exc).__name__}: {exc})") from exc
    raise InputError(
        f"{path}: .npz holds {sorted(keys)}; name the input array one of {list(NPZ_KEYS)} or store only one"
    )


def iter_input_batches(
    paths: Iterable[str | os.PathLike[str]], pre: Preprocess, batch_size: int
) -> Iterator[InputBatch]:
    """Read image files, directories and ``.npy``/``.npz`` arrays in batches of ``batch_size``.

    Images are decoded lazily, one batch at a time; every array sample is named
    ``file[i]``. Validation of shapes/values is the runner's job (it names the input).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    names: list[str] = []
    rows: list[np.ndarray] = []
    for f in expand_paths(paths):
        if f.suffix.lower() in ARRAY_SUFFIXES:
            arr = load_array_file(f)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4:
                raise InputError(f"{f}: expected an (N, C, H, W) or (C, H, W) array, got shape {arr.shape}")
            for i in range(arr.shape[0]):
                names.append(f"{f}[{i}]")
                rows.append(arr[i])
                if len(rows) == batch_size:
                    yield _batch(names, rows)
                    names, rows = [], []
        else:
            names.append(str(f))
            rows.append(load_image(f, pre))
            if len(rows) == batch_size:
                yield _batch(names, rows)
                names, rows = [], []
    if rows:
        yield _batch(names, rows)


def _batch(names: list[str], rows: list[np.ndarray]) -> InputBatch:
    shapes = {r.shape for r in rows}
    if len(shapes) != 1:
        detail = ", ".join(f"{n}: {r.shape}" for n, r in zip(names, rows, strict=True))
        raise InputError(f"inputs have different shapes ({detail})")
    return InputBatch(tuple(names), np.stack(rows))


def check_batch(spec: TensorSpec, x: Any, names: Sequence[str] | None = None) -> np.ndarray:
    """Validate ``x`` against the model input ``spec`` and return it as contiguous (N, C, H, W).

    A (C, H, W) array is one sample. Float arrays of any width are cast to the model
    dtype; anything else, a wrong shape or channel count, NaN or inf is an
    :class:`InputError` naming the offending input (``names[i]`` when given).
    """
    if not isinstance(x, np.ndarray):
        raise InputError(f"expected a numpy array, got {type(x).__name__}")
    if x.ndim == len(spec.shape) - 1:
        x = x[None]
    what = _describe(names)
    if x.ndim != len(spec.shape):
        raise InputError(
            f"{what}: expected shape {_shape_str(spec.shape)} (or one sample without the batch axis), "
            f"got {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{what}: expected floating-point data (preprocessed images), got dtype {x.dtype}")
    for axis, (got, want) in enumerate(zip(x.shape[1:], spec.shape[1:], strict=True), start=1):
        if isinstance(want, int) and got != want:
            if axis == 1:
                raise InputError(
                    f"{what}: has {got} channel(s), the model expects {want} (shape {_shape_str(spec.shape)}, "
                    f"got {x.shape})"
                )
            raise InputError(f"{what}: expected shape {_shape_str(spec.shape)}, got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.dtype(spec.dtype))
    # fast path over the whole array; the per-sample reduction only to name the culprits
    if x.size and not np.isfinite(x).all():
        finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    else:
        finite = np.ones(x.shape[0], bool)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        label = [names[i] for i in bad[:5]] if names is not None else [f"sample {i}" for i in bad[:5]]
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(f"NaN or inf in {', '.join(label)}{more}")
    return x


def _describe(names: Sequence[str] | None) -> str:
    if not names:
        return "input"
    if len(names) == 1:
        return f"input {names[0]!r}"
    return f"inputs {names[0]!r}..{names[-1]!r}"


def _shape_str(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join("N" if d == BATCH else str(d) for d in shape) + ")"
