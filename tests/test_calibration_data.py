"""Held-out data loading: ImageFolder, flat image dirs, .npz, unreadable files, subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeperceiver.bundle import Preprocess
from edgeperceiver.data import load_dataset, split_fit_check, stratified_subset
from edgeperceiver.errors import CalibrationError

PRE = Preprocess(size=(8, 8), mean=(0.5,), std=(0.25,), channels=1)


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12), value, dtype=np.uint8), mode="L").save(path)


def _image_folder(root: Path, per_class: dict[str, int]) -> None:
    for c, (name, count) in enumerate(per_class.items()):
        for i in range(count):
            _png(root / name / f"img{i:03d}.png", 40 * c + i)


def test_image_folder_labels_follow_sorted_class_names(tmp_path: Path) -> None:
    _image_folder(tmp_path, {"zebra": 2, "ant": 3, "moth": 1})
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path, PRE)
    assert ds.classes == ("ant", "moth", "zebra")
    assert ds.x.shape == (6, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.y is not None and ds.y.tolist() == [0, 0, 0, 1, 2, 2]
    # "ant" was written second (pixel value 40 + i): ant/img001.png is 41 -> (41/255 - 0.5) / 0.25
    np.testing.assert_allclose(ds.x[1], (41 / 255 - 0.5) / 0.25, rtol=1e-6)
    assert ds.skipped == ()


def test_flat_directory_is_unlabeled(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / f"{i}.png", i)
    ds = load_dataset(tmp_path, PRE, limit=3)
    assert ds.y is None and ds.classes == () and len(ds) == 3


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    _image_folder(tmp_path, {"a": 20, "b": 20})
    (tmp_path / "a" / "broken.png").write_bytes(b"definitely not a png")
    ds = load_dataset(tmp_path, PRE)
    assert len(ds) == 40
    assert len(ds.skipped) == 1 and ds.skipped[0].endswith("broken.png")


def test_too_many_unreadable_images_fail(tmp_path: Path) -> None:
    _image_folder(tmp_path, {"a": 5, "b": 5})
    for i in range(2):
        (tmp_path / "b" / f"bad{i}.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(CalibrationError, match=r"2 of 12 images .* unreadable"):
        load_dataset(tmp_path, PRE, max_unreadable=0.05)
    assert len(load_dataset(tmp_path, PRE, max_unreadable=0.2).skipped) == 2


def test_npz_roundtrip_limit_is_stratified(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    x = rng.normal(size=(100, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "d.npz", PRE, limit=20, seed=3)
    assert ds.y is not None
    assert np.bincount(ds.y).tolist() == [10, 6, 3, 1]
    # rows are the original rows of the chosen samples
    rows = [int(np.flatnonzero((x == row).all(axis=(1, 2, 3)))[0]) for row in ds.x]
    assert (y[rows] == ds.y).all()
    again = load_dataset(tmp_path / "d.npz", PRE, limit=20, seed=3)
    np.testing.assert_array_equal(ds.x, again.x)


def test_npz_errors_are_precise(tmp_path: Path) -> None:
    np.savez(tmp_path / "shape.npz", x=np.zeros((3, 3, 8, 8), np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(CalibrationError, match="bundle expects"):
        load_dataset(tmp_path / "shape.npz", PRE)
    np.savez(tmp_path / "nox.npz", images=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match="needs 'x'"):
        load_dataset(tmp_path / "nox.npz", PRE)
    np.savez(tmp_path / "nan.npz", x=np.full((2, 1, 8, 8), np.nan, np.float32))
    with pytest.raises(CalibrationError, match="NaN"):
        load_dataset(tmp_path / "nan.npz", PRE)
    with pytest.raises(CalibrationError, match="no such"):
        load_dataset(tmp_path / "missing", PRE)


def test_batches_and_input_dicts_cover_every_sample(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.arange(7 * 64, dtype=np.float32).reshape(7, 1, 8, 8))
    ds = load_dataset(tmp_path / "d.npz", PRE)
    assert ds.y is None
    feeds = list(ds.input_dicts("image", batch_size=3))
    assert [f["image"].shape[0] for f in feeds] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([f["image"] for f in feeds]), ds.x)


def test_split_is_stratified_disjoint_and_seeded() -> None:
    y = np.repeat(np.arange(3), [40, 40, 20])
    fit, check = split_fit_check(y, len(y), 0.5, seed=1)
    assert len(np.intersect1d(fit, check)) == 0 and len(fit) + len(check) == 100
    assert np.bincount(y[fit]).tolist() == [20, 20, 10]
    fit2, _ = split_fit_check(y, len(y), 0.5, seed=2)
    assert not np.array_equal(fit, fit2)
    assert len(stratified_subset(None, 10, 4, 0)) == 4
