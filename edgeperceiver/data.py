"""Held-out data: the one calibration-data contract (thresholds and INT8 quantization).

:func:`load_dataset` reads either

* a directory in the torchvision ImageFolder layout (one subfolder per class, classes
  sorted by folder name, images anywhere below their class folder), or a flat directory
  of images (no class subfolders: ``y`` is ``None``, enough for INT8 calibration), or
* a ``.npz`` with ``x`` (N, C, H, W) float32, already preprocessed, and optionally ``y``
  (N,) integer labels (and ``classes``, an array of names).

Images are decoded with the bundle's :class:`~edgeperceiver.bundle.Preprocess` by the
runtime's own :func:`~edgeperceiver.runtime.preprocess.load_image`, so calibration sees
exactly what deployment sees. Unreadable images are skipped, listed in ``skipped`` and
named in a :class:`DataWarning` (so is an empty class folder); more than ``max_unreadable``
of them fails with a :class:`CalibrationError`. A corrupt ``.npz`` is a
:class:`CalibrationError` naming the file.

A :class:`Dataset` is also an iterable of input batches (``batches``) and of input dicts
(``input_dicts``), the shape ONNX Runtime's and NNCF's calibration readers consume.
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Preprocess
from .errors import CalibrationError, InputError
from .progress import Progress

#: file suffixes read as images in a held-out directory
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class DataWarning(UserWarning):
    """Held-out data was read, but not all of it: unreadable images skipped, empty class folders."""


@dataclass(frozen=True)
class Dataset:
    """Preprocessed held-out samples.

    ``x`` is (N, C, H, W) float32; ``y`` the (N,) int64 labels or ``None`` when unlabeled;
    ``classes`` the class names (index = label; empty when unknown); ``skipped`` the files
    that could not be read; ``source`` where the data came from.
    """

    x: np.ndarray
    y: np.ndarray | None
    classes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labeled(self) -> bool:
        return self.y is not None

    def batches(self, batch_size: int = 32) -> Iterator[np.ndarray]:
        """Consecutive (B, C, H, W) slices of ``x``."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size]

    def input_dicts(self, name: str, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """``{name: batch}`` per batch: a calibration data reader for INT8 quantizers."""
        for batch in self.batches(batch_size):
            yield {name: batch}

    def subset(self, index: np.ndarray) -> Dataset:
        """The samples at ``index`` (same classes, same skipped list)."""
        index = np.asarray(index, dtype=np.int64)
        return Dataset(
            x=self.x[index],
            y=None if self.y is None else self.y[index],
            classes=self.classes,
            skipped=self.skipped,
            source=self.source,
        )


# --------------------------------------------------------------------------- sampling


def stratified_subset(y: np.ndarray | None, n: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of ``count`` of ``n`` samples, stratified by ``y`` (random when ``None``).

    Each class gets its share of ``count`` by largest remainder (ties broken by the seed).
    """
    if count >= n:
        return np.arange(n, dtype=np.int64)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if y is None:
        return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)
    labels, inverse = np.unique(np.asarray(y), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(labels))
    exact = sizes * (count / n)
    quota = np.floor(exact).astype(np.int64)
    remainder = exact - quota
    short = count - int(quota.sum())
    if short > 0:
        order = np.lexsort((rng.random(len(labels)), -remainder))
        quota[order[:short]] += 1
    chosen = []
    for c in range(len(labels)):
        members = np.flatnonzero(inverse == c)
        chosen.append(rng.choice(members, size=int(quota[c]), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_fit_check(y: np.ndarray | None, n: int, fit_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n`` samples into a fitting part and a checking part (stratified by ``y``)."""
    if not 0.0 < fit_fraction < 1.0:
        raise InputError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    n_fit = round(n * fit_fraction)
    if n_fit < 1 or n_fit > n - 1:
        raise CalibrationError(
            f"{n} held-out samples cannot be split {fit_fraction:.2f}/{1 - fit_fraction:.2f} into "
            "non-empty fitting and checking parts; use more data"
        )
    fit = stratified_subset(y, n, n_fit, seed)
    mask = np.ones(n, dtype=bool)
    mask[fit] = False
    return fit, np.flatnonzero(mask).astype(np.int64)


# --------------------------------------------------------------------------- loading


def load_dataset(
    path: str | os.PathLike[str],
    pre: Preprocess,
    *,
    limit: int | None = None,
    seed: int = 0,
    max_unreadable: float = 0.05,
    progress: Progress | None = None,
) -> Dataset:
    """Read held-out data from an ImageFolder / image directory or an ``.npz`` (see module doc).

    ``limit`` keeps a seeded, class-stratified subset (random when unlabeled) of that many
    samples, chosen before any image is decoded. Unreadable images are skipped; more than
    ``max_unreadable`` (a share) of them is a :class:`CalibrationError`.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    if not 0.0 <= max_unreadable <= 1.0:
        raise InputError(f"max_unreadable must be a share in [0, 1], got {max_unreadable}")
    if path.is_dir():
        return _load_directory(path, pre, limit, seed, max_unreadable, progress)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise CalibrationError(f"{path}: held-out data must be an image directory or a .npz with x (and y)")
        return _load_npz(path, pre, limit, seed, progress)
    raise CalibrationError(f"{path}: no such held-out data (expected an image directory or a .npz)")


def _load_npz(path: Path, pre: Preprocess, limit: int | None, seed: int, progress: Progress | None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise CalibrationError(f"{path}: .npz has {sorted(z.files)}, needs 'x' (N,C,H,W) and 'y' (N,)")
            x = np.asarray(z["x"])
            y = np.asarray(z["y"]) if "y" in z.files else None
            classes = tuple(str(c) for c in z["classes"]) if "classes" in z.files else ()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CalibrationError(f"{path}: cannot read .npz ({type(exc).__name__}: {exc})") from exc
    if x.ndim != 4:
        raise CalibrationError(f"{path}: x must be (N, C, H, W), got shape {x.shape}")
    expected = (pre.channels, *pre.size)
    if tuple(x.shape[1:]) != expected:
        raise CalibrationError(f"{path}: x has samples of shape {tuple(x.shape[1:])}, the bundle expects {expected}")
    if not np.issubdtype(x.dtype, np.floating):
        raise CalibrationError(f"{path}: x must be preprocessed floats, got dtype {x.dtype}")
    if y is not None:
        if y.shape != (x.shape[0],):
            raise CalibrationError(f"{path}: y must have shape ({x.shape[0]},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise CalibrationError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
        if y.size and y.min() < 0:
            raise CalibrationError(f"{path}: y holds negative labels")
        y = y.astype(np.int64)
    n = int(x.shape[0])
    if n == 0:
        raise CalibrationError(f"{path}: x holds no samples")
    index = stratified_subset(y, n, n if limit is None else limit, seed)
    x = np.ascontiguousarray(x[index], dtype=np.float32)
    if not np.isfinite(x).all():
        raise CalibrationError(f"{path}: x contains NaN or infinite values")
    if progress is not None:
        progress(len(index), len(index))
    return Dataset(x=x, y=None if y is None else y[index], classes=classes, source=str(path))


def _is_visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _images_below(folder: Path, root: Path) -> list[Path]:
    return sorted(
        f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and _is_visible(f, root)
    )


def _load_directory(
    root: Path, pre: Preprocess, limit: int | None, seed: int, max_unreadable: float, progress: Progress | None
) -> Dataset:
    from edgeperceiver.runtime.preprocess import load_image

    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    files: list[Path] = []
    labels: list[int] = []
    classes: tuple[str, ...] = ()
    if class_dirs:
        classes = tuple(d.name for d in class_dirs)
        for label, d in enumerate(class_dirs):
            found = _images_below(d, root)
            if not found:
                warnings.warn(
                    DataWarning(
                        f"{d}: class folder {d.name!r} (label {label}) holds no images; "
                        "that class has no held-out samples"
                    ),
                    stacklevel=3,
                )
            files.extend(found)
            labels.extend([label] * len(found))
    else:
        files = _images_below(root, root)
    if not files:
        layout = "class subfolders hold" if class_dirs else "directory holds"
        raise CalibrationError(f"{root}: no images found (the {layout} no {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    y_all = np.asarray(labels, dtype=np.int64) if class_dirs else None
    index = stratified_subset(y_all, len(files), len(files) if limit is None else limit, seed)
    xs: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[str] = []
    for done, i in enumerate(index, start=1):
        try:
            xs.append(load_image(files[i], pre))
            kept.append(int(i))
        except InputError:
            skipped.append(str(files[i]))
        if progress is not None:
            progress(done, len(index))
    share = len(skipped) / len(index)
    if share > max_unreadable:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        raise CalibrationError(
            f"{root}: {len(skipped)} of {len(index)} images ({share:.1%}) are unreadable, more than the "
            f"{max_unreadable:.0%} allowed: {shown}"
        )
    if not xs:
        raise CalibrationError(f"{root}: none of the {len(index)} images could be read")
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(DataWarning(f"{root}: skipped {len(skipped)} unreadable image(s): {shown}"), stacklevel=3)
    x = np.stack(xs).astype(np.float32, copy=False)
    y = None if y_all is None else y_all[np.asarray(kept, dtype=np.int64)]
    return Dataset(x=x, y=y, classes=classes, skipped=tuple(skipped), source=str(root))
