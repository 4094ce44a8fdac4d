"""The digits demo data: deterministic stratified split, rendering, ImageFolder writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeperceiver.errors import InputError

pytest.importorskip("sklearn")

from edgeperceiver.datasets import CLASSES, load_digits_split, to_model_input, write_imagefolder


def test_split_is_deterministic_stratified_and_complete() -> None:
    a = load_digits_split(32)
    b = load_digits_split(32)
    assert a.x_train.shape == (1258, 32, 32, 3) and a.x_heldout.shape == (539, 32, 32, 3)
    assert a.x_train.dtype == np.uint8 and a.y_train.dtype == np.int64
    assert np.array_equal(a.x_heldout, b.x_heldout) and np.array_equal(a.y_train, b.y_train)
    counts = np.bincount(np.concatenate([a.y_train, a.y_heldout]), minlength=10)
    assert counts.sum() == 1797
    held = np.bincount(a.y_heldout, minlength=10)
    assert np.all(np.abs(held - np.round(counts * 0.3)) <= 0)
    assert a.classes == CLASSES == tuple("0123456789")
    other = load_digits_split(32, seed=1)
    assert not np.array_equal(other.y_heldout, a.y_heldout) or not np.array_equal(other.x_heldout, a.x_heldout)


def test_rendering_is_dark_ink_on_white() -> None:
    s = load_digits_split(16)
    assert s.x_train.shape[1:] == (16, 16, 3)
    img = s.x_train[0]
    assert np.array_equal(img[..., 0], img[..., 2])  # grey
    assert img[0, 0, 0] == 255 and img.min() < 64  # white corner, dark strokes


def test_to_model_input() -> None:
    imgs = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    x = to_model_input(imgs, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    assert np.allclose(x, 2.0)
    with pytest.raises(InputError):
        to_model_input(imgs.astype(np.float32))


def test_write_imagefolder(tmp_path: Path) -> None:
    s = load_digits_split(32)
    x, y = s.x_heldout[:25], s.y_heldout[:25]
    dest = write_imagefolder(x, y, s.classes, tmp_path / "held")
    assert sorted(p.name for p in dest.iterdir()) == list(CLASSES)
    files = sorted(dest.rglob("*.png"))
    assert len(files) == 25
    for f in files:
        i = int(f.stem)
        assert f.parent.name == str(y[i])
        assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), x[i])
    with pytest.raises(InputError, match="not an empty directory"):
        write_imagefolder(x, y, s.classes, dest)
    with pytest.raises(InputError, match="labels"):
        write_imagefolder(x, y + 10, s.classes, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_write_imagefolder_follows_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o027)
    try:
        dest = write_imagefolder(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), ("a", "b"), tmp_path / "held")
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert stat.S_IMODE((dest / "a").stat().st_mode) == 0o750
    assert [p.name for p in tmp_path.iterdir()] == ["held"]  # no staging left beside it
