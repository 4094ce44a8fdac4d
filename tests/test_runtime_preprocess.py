"""Image decoding and preprocessing (resize shorter side, centre crop, normalise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeperceiver.bundle import Preprocess
from edgeperceiver.errors import InputError
from edgeperceiver.runtime.preprocess import expand_paths, iter_input_batches, load_array_file, load_image, load_images

Image = pytest.importorskip("PIL.Image")

PRE = Preprocess(size=(224, 224), resize=256)


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def test_constant_image_is_normalised(tmp_path: Path) -> None:
    p = _save(tmp_path / "c.png", np.full((300, 400, 3), (255, 128, 0), np.uint8))
    x = load_image(p, PRE)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    want = (np.array([255, 128, 0]) / 255.0 - np.array(PRE.mean)) / np.array(PRE.std)
    np.testing.assert_allclose(x.reshape(3, -1).mean(1), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(x.reshape(3, -1).std(1), 0, atol=1e-5)


def test_geometry_resize_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    # 256 x 512 (h x w): shorter side already 256, so only the crop acts: columns 144..368
    img = np.zeros((256, 512, 3), np.uint8)
    img[:, 144:148] = 255  # the crop's first four columns
    img[:, 364:368] = 255  # its last four
    img[16:20, 200:300] = 128  # rows 16..19 of the image = rows 0..3 of the crop (offset (256-224)/2)
    x = load_image(_save(tmp_path / "g.png", img), Preprocess(size=(224, 224), resize=256, mean=(0,), std=(1,)))
    assert np.allclose(x[:, :, :4], 1.0) and np.allclose(x[:, 20:, 4], 0.0)
    assert np.allclose(x[:, :, -4:], 1.0)
    assert np.allclose(x[:, :4, 56:156], 128 / 255) and np.allclose(x[:, 4, 56:156], 0.0)


def test_portrait_and_small_images_are_resized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for h, w in [(500, 240), (40, 30), (224, 224)]:
        x = load_image(_save(tmp_path / f"{h}x{w}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), PRE)
        assert x.shape == (3, 224, 224) and np.isfinite(x).all()
    # resize=None: straight to the size, aspect ratio not kept; a gradient keeps its direction
    grad = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1))[..., None].repeat(3, 2)
    x = load_image(_save(tmp_path / "grad.png", grad), Preprocess(size=(16, 24), resize=None, mean=(0,), std=(1,)))
    assert x.shape == (3, 16, 24)
    assert np.all(np.diff(x[0, 8]) >= 0) and x[0, 8, 0] < 0.05 and x[0, 8, -1] > 0.95


def test_grayscale_rgba_and_palette_inputs(tmp_path: Path) -> None:
    pre1 = Preprocess(size=(8, 8), resize=None, mean=(0.5,), std=(0.5,), channels=1)
    g = load_image(_save(tmp_path / "rgb.png", np.full((10, 10, 3), 255, np.uint8)), pre1)
    assert g.shape == (1, 8, 8) and np.allclose(g, 1.0)
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    x = load_image(_save(tmp_path / "rgba.png", rgba), Preprocess(size=(8, 8), mean=(0,), std=(1,)))
    assert x.shape == (3, 8, 8) and np.allclose(x[0], 1) and np.allclose(x[1:], 0)
    Image.fromarray(np.full((10, 10), 200, np.uint8)).convert("P").save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif", PRE).shape == (3, 224, 224)
    batch = load_images([tmp_path / "rgb.png", tmp_path / "rgba.png"], PRE)
    assert batch.shape == (2, 3, 224, 224)


def test_unreadable_images_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match=r"junk\.jpg"):
        load_image(tmp_path / "junk.jpg", PRE)
    good = _save(tmp_path / "t.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match=r"trunc\.jpg"):
        load_image(tmp_path / "trunc.jpg", PRE)
    with pytest.raises(InputError, match="no such image"):
        load_image(tmp_path / "missing.png", PRE)
    with pytest.raises(InputError, match="no images"):
        load_images([], PRE)
    with pytest.raises(InputError, match="interpolation"):
        load_image(good, Preprocess(size=(8, 8), interpolation="fancy"))
    with pytest.raises(InputError, match="mean"):
        load_image(good, Preprocess(size=(8, 8), mean=(0.1, 0.2)))


def test_arrays_and_directories(tmp_path: Path) -> None:
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", input=x, other=x)
    np.savez(tmp_path / "c.npz", p=x, q=x)
    np.testing.assert_array_equal(load_array_file(tmp_path / "a.npy"), x)
    np.testing.assert_array_equal(load_array_file(tmp_path / "b.npz"), x)
    with pytest.raises(InputError, match="npz"):
        load_array_file(tmp_path / "c.npz")
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(InputError, match=r"bad\.npy"):
        load_array_file(tmp_path / "bad.npy")
    sub = tmp_path / "d"
    (sub / "inner").mkdir(parents=True)
    np.save(sub / "inner" / "z.npy", x[:1])
    np.save(sub / "y.npy", x)
    (sub / "notes.txt").write_text("ignored")
    (sub / ".hidden.npy").write_bytes(b"ignored")
    assert [p.name for p in expand_paths([sub])] == ["z.npy", "y.npy"]
    batches = list(iter_input_batches([sub], PRE, batch_size=2))
    assert [len(b.names) for b in batches] == [2, 1]
    assert batches[0].names == (f"{sub / 'inner' / 'z.npy'}[0]", f"{sub / 'y.npy'}[0]")
    with pytest.raises(InputError, match="batch_size"):
        list(iter_input_batches([sub], PRE, batch_size=0))
