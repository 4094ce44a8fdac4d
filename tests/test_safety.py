"""Hostile and careless inputs: clear errors naming the file, never a traceback, nothing dropped silently.

Each test reproduces one finding of a battery of hostile inputs (corrupt arrays and caches,
unlisted external data, forged class names, too few samples, out-of-range manifests,
non-finite JSON, awkward paths, skipped images, tampered standalone code, files that are
not the image they claim to be).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, toy_inputs

from edgeperceiver import versioned
from edgeperceiver.bundle import MANIFEST, Bundle, edit_bundle
from edgeperceiver.data import DataWarning, load_dataset
from edgeperceiver.errors import BundleError, CalibrationError, CheckpointError, InputError
from edgeperceiver.runtime import load
from edgeperceiver.runtime.cli_support import ResultRow, render_rows
from edgeperceiver.runtime.preprocess import load_array_file, load_image


def _truncated_npz(path: Path, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    code = "import sys; from edgeperceiver.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


# --------------------------------------------------------------------------- 6: corrupt arrays and caches


def test_a_corrupt_npz_is_named_everywhere(tmp_path: Path) -> None:
    bundle = make_toy_bundle(tmp_path / "b")
    bad = _truncated_npz(tmp_path / "bad.npz", x=toy_inputs(40), y=np.zeros(40, np.int64))
    with pytest.raises(InputError, match=r"bad\.npz: cannot read array file"):
        load_array_file(bad)
    pre = Bundle.open(bundle).manifest.preprocess
    with pytest.raises(CalibrationError, match=r"bad\.npz: cannot read \.npz"):
        load_dataset(bad, pre)  # calibrate --data
    from edgeperceiver.targets import compile_bundle
    from edgeperceiver.types import Precision, TargetName

    with pytest.raises(CalibrationError, match=r"bad\.npz: cannot read \.npz"):
        compile_bundle(bundle, TargetName.ONNXRUNTIME, Precision.INT8, calib_data=bad)  # compile --calib-data
    proc = _cli("run", bundle, bad)
    assert proc.returncode == 2 and "bad.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_a_truncated_calibration_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeperceiver.calibration.collect import cache_dir, collect
    from edgeperceiver.data import Dataset

    monkeypatch.setenv("EDGEPERCEIVER_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" / "calibration"
    b = Bundle.open(make_toy_bundle(tmp_path / "b"))
    data = Dataset(x=toy_inputs(24), y=np.arange(24) % 5)
    first = collect(b, data)
    (cached,) = cache_dir().glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])  # a crash or a full disk
    again = collect(b, data)
    np.testing.assert_array_equal(again.preds, first.preds)
    with np.load(cached) as z:  # written back whole
        assert "preds" in z.files


def test_one_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from edgeperceiver.calibration.collect import cache_dir
    from edgeperceiver.fsutil import cache_root

    monkeypatch.delenv("EDGEPERCEIVER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "edgeperceiver"
    assert cache_dir() == cache_root() / "calibration"  # every cache lives under the one root
    monkeypatch.setenv("EDGEPERCEIVER_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"
    assert cache_dir() == tmp_path / "own" / "calibration"


# --------------------------------------------------------------------------- 7: external data


def test_external_data_is_checksummed(tmp_path: Path) -> None:
    import onnx

    root = make_toy_bundle(tmp_path / "b")
    x = toy_inputs(4)
    want = load(root, "onnxruntime-fp32").all_exits(x)
    with edit_bundle(root) as w:  # segment 3 keeps its weights beside it, as large models do
        seg = w.path("segments/seg3.onnx")
        model = onnx.load(str(seg))
        seg.unlink()
        onnx.save(model, str(seg), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="seg3.weights", size_threshold=0)  # fmt: skip
    b = Bundle.open(root)
    assert "segments/seg3.weights" in b.manifest.files
    np.testing.assert_allclose(load(b, "onnxruntime-fp32").all_exits(x)[2], want[2], rtol=1e-5, atol=1e-6)
    # a forged manifest that no longer lists the weights: the weights are still read, so refuse
    data = json.loads((root / MANIFEST).read_text())
    del data["files"]["segments/seg3.weights"]
    (root / MANIFEST).write_text(json.dumps(data))
    weights = b.path("segments/seg3.weights")
    weights.write_bytes(bytes(len(weights.read_bytes())))
    with pytest.raises(BundleError, match=r"segments/seg3\.weights is not listed in the manifest"):
        Bundle.open(root)


# --------------------------------------------------------------------------- 8: class names on a terminal


def test_class_names_cannot_forge_rows(tmp_path: Path) -> None:
    forged = "cat\x1b[2J\n/etc/passwd        0  root  1  1.0000"
    rows = [ResultRow("a.png", 0, forged, 1, 0.9), ResultRow("b\rc.png", 1, "dog\u202e", 2, 0.8)]
    text = render_rows(rows)
    assert len(text.splitlines()) == 2 + len(rows) + 1  # header, rule, rows, summary
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "cat\\x1b[2J\\x0a/etc/passwd" in text
    root = make_toy_bundle(tmp_path / "b", classes=[f"c{i}\n forged" for i in range(5)])
    np.save(tmp_path / "x.npy", toy_inputs(3))
    proc = _cli("run", root, tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr
    assert "\\x0a forged" in proc.stdout and "\n forged" not in proc.stdout


# --------------------------------------------------------------------------- 9: too few samples


def test_calibrate_refuses_too_few_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeperceiver.calibration as cal

    monkeypatch.setenv("EDGEPERCEIVER_CACHE", str(tmp_path / "cache"))
    root = make_toy_bundle(tmp_path / "b")
    x = toy_inputs(3)
    np.savez(tmp_path / "three.npz", x=x, y=load(root).all_exits(x)[-1].argmax(1))
    with pytest.raises(CalibrationError, match=r"3 held-out samples are too few.*at least 20"):
        cal.calibrate(root, tmp_path / "three.npz", goal=cal.MaxDrop(0.5))
    assert Bundle.open(root).manifest.target("onnxruntime-fp32").thresholds is None


# --------------------------------------------------------------------------- 10: manifest ranges


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["preprocess"].update(size=[0, 8]), r"preprocess\.size\[0\].*out of range"),
        (lambda d: d["preprocess"].update(size=[8, -3]), r"preprocess\.size\[1\].*out of range"),
        (lambda d: d["preprocess"].update(size=[10**9, 8]), r"preprocess\.size\[0\].*out of range"),
        (lambda d: d["preprocess"].update(resize=10**9), r"preprocess\.resize.*out of range"),
        (lambda d: d["preprocess"].update(channels=7), r"preprocess\.channels"),
        (lambda d: d["preprocess"].update(std=[0.0, 0.2, 0.2]), r"preprocess\.std.*zero"),
        (lambda d: d.update(num_classes=-5), r"num_classes = -5 is out of range"),
        (lambda d: d["input"].update(shape=["batch", 3, 10**12, 8]), r"dimension of tensor.*out of range"),
        (lambda d: d.update(extra={"x": _deep(100_000)}), r"nests too deeply"),
    ],
)
def test_manifest_numbers_are_range_checked(tmp_path: Path, mutate: Any, message: str) -> None:
    root = make_toy_bundle(tmp_path / "b")
    data = json.loads((root / MANIFEST).read_text())
    mutate(data)
    (root / MANIFEST).write_text(json.dumps(data) if "extra" not in data or not data["extra"] else _dump_deep(data))
    with pytest.raises(BundleError, match=message) as info:
        Bundle.open(root)
    assert "manifest.json" in str(info.value)  # the manifest is blamed, not the input


def _dump_deep(data: dict[str, Any]) -> str:
    """json.dumps recurses too; write the deep value by hand."""
    depth = 0
    value = data["extra"]["x"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    data["extra"] = {"x": "@@"}
    return json.dumps(data).replace('"@@"', "[" * depth + "0" + "]" * depth)


# --------------------------------------------------------------------------- 11: strict JSON


def test_infinite_thresholds_are_written_as_valid_json(tmp_path: Path) -> None:
    import edgeperceiver.calibration as cal

    root = make_toy_bundle(tmp_path / "b")
    cal.set_thresholds(root, "inf,-inf,0")

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    json.loads((root / MANIFEST).read_text(), parse_constant=refuse)  # no Infinity / NaN tokens
    pred = load(root, threads=1).predict(toy_inputs(16))
    assert set(pred.exits.tolist()) == {2}  # exit 1 never fires, exit 2 always does
    with pytest.raises(InputError, match="NaN"):
        cal.set_thresholds(root, "nan,0.5,0")
    proc = _cli("calibrate", root, "--set", "inf,0.5,0")
    assert proc.returncode == 0, proc.stderr
    json.loads((root / MANIFEST).read_text(), parse_constant=refuse)


def test_run_json_is_valid_json_when_the_model_overflows(tmp_path: Path) -> None:
    root = make_toy_bundle(tmp_path / "b")
    np.save(tmp_path / "x.npy", np.full((2, 3, 8, 8), 3e38, np.float32))  # finite, but the logits overflow

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    proc = _cli("run", root, tmp_path / "x.npy", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout, parse_constant=refuse)["rows"]
    assert [r["confidence"] for r in rows] == [None, None]  # NaN is written as null


# --------------------------------------------------------------------------- 12: no tracebacks


@pytest.mark.slow
def test_awkward_destinations_are_clear_errors(tmp_path: Path) -> None:
    factory = tmp_path / "f.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.a = nn.Linear(3, 4)\n"
        "        self.b = nn.Linear(4, 4)\n\n"
        "    def forward(self, x):\n        h = self.a(x.mean((2, 3)))\n        return h, self.b(h)\n\n"
        "def make():\n    return M()\n"
    )
    export = ("export", "--module", f"{factory}:make", "--input-shape", "3,8,8")
    folder, other = tmp_path / "work", tmp_path / "other"
    for d in (folder, other):
        d.mkdir()
        (d / "notes.txt").write_text("keep me")
    for args, message in (
        (("-o", "."), "already exists"),
        (("-o", ".", "--force"), "current directory"),
        (("-o", other, "--force"), "not an edgeperceiver bundle"),
        (("-o", tmp_path / ("n" * 300)), "over 255 bytes"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from edgeperceiver.cli import main; sys.exit(main(sys.argv[1:]))",
             *export, *map(str, args)], cwd=folder, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert (folder / "notes.txt").read_text() == (other / "notes.txt").read_text() == "keep me"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = _cli(*export, "-o", locked / "b")
    finally:
        locked.chmod(0o755)
    assert proc.returncode != 0 and "not writable" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(*export, "-o", tmp_path / ("n" * 240))
    assert proc.returncode == 0, proc.stderr


def test_an_absurd_checkpoint_input_size_is_refused_before_building(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edgeperceiver.models import create_model, load_checkpoint

    name = "mobilenetV3_0x5_perceiver_t128"
    model = create_model(name, num_classes=3, input_size=64, depth_factor=[1, 1, 1, 1])
    args = argparse.Namespace(model=name, input_size=400_000, nb_classes=3, depth_factor=[1, 1, 1, 1])
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "huge.pth")
    with pytest.raises(CheckpointError, match=r"huge\.pth: args\.input_size = 400000"):
        load_checkpoint(tmp_path / "huge.pth")


# --------------------------------------------------------------------------- 13: nothing dropped silently


def test_skipped_images_and_empty_classes_are_named(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "held"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not a png")
    (root / "empty").mkdir()
    pre = Bundle.open(make_toy_bundle(tmp_path / "b")).manifest.preprocess
    with pytest.warns(DataWarning) as caught:
        data = load_dataset(root, pre, max_unreadable=0.1)
    text = " | ".join(str(w.message) for w in caught)
    assert "broken.png" in text and "'empty'" in text
    assert len(data) == 24 and data.skipped == (str(root / "a" / "broken.png"),)


def test_compile_names_the_calibration_images_it_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from edgeperceiver.cli import main

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    (calib / "broken.png").write_bytes(b"\x89PNG truncated")
    root = make_toy_bundle(tmp_path / "b")
    try:
        code = main(["compile", str(root), "--target", "onnxruntime", "--precision", "int8", "--calib-data",
                     str(calib), "-O", "latency_runs=0", "-O", "report_samples=0"])  # fmt: skip
    except SystemExit as exc:  # Typer's standalone mode exits itself on success
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning:" in err and "skipped 1 unreadable image(s)" in err and "broken.png" in err


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("option", ["latency_runs", "report_samples"])
def test_negative_counts_are_refused_not_dropped(tmp_path: Path, target: str, option: str) -> None:
    pytest.importorskip(target)
    from edgeperceiver.targets import compile_bundle
    from edgeperceiver.types import Precision, TargetName

    root = make_toy_bundle(tmp_path / "b")
    with pytest.raises(InputError, match=rf"{option} must be an integer >= 0, not '-5'"):
        compile_bundle(root, TargetName(target), Precision.FP32, options={option: "-5"})
    assert set(Bundle.open(root).manifest.targets) == {"onnxruntime-fp32"}


# --------------------------------------------------------------------------- 14: standalone code and image formats


def test_run_py_refuses_tampered_code_before_running_it(tmp_path: Path) -> None:
    built = make_toy_bundle(tmp_path / "built", standalone=True)
    np.save(tmp_path / "x.npy", toy_inputs(2))
    copy = tmp_path / "copy"
    shutil.copytree(versioned.current(built), copy)

    def run_py() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-I", str(copy / "run.py"), str(tmp_path / "x.npy")],
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip

    assert run_py().returncode == 0
    command = copy / "edgeperceiver" / "runtime" / "command.py"
    original = command.read_text()
    command.write_text("print('TAMPERED CODE RAN')\n" + original)
    proc = run_py()
    assert proc.returncode == 6 and "command.py fails its checksum" in proc.stderr
    assert "TAMPERED" not in proc.stdout + proc.stderr
    command.write_text(original)
    (copy / "numpy.py").write_text("print('SHADOWED NUMPY RAN')\n")  # would be imported first
    proc = run_py()
    assert proc.returncode == 6 and "numpy.py is not listed" in proc.stderr and "SHADOWED" not in proc.stdout
    (copy / "numpy.py").unlink()
    assert run_py().returncode == 0
    assert not list(copy.rglob("__pycache__"))  # no bytecode written into the bundle


def test_only_expected_image_formats_are_decoded(tmp_path: Path) -> None:
    from PIL import Image

    pre = Bundle.open(make_toy_bundle(tmp_path / "b")).manifest.preprocess
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM"):
        img.save(tmp_path / f"ok.{fmt.lower()}", fmt)
        assert load_image(tmp_path / f"ok.{fmt.lower()}", pre).shape == (3, 8, 8)
    (tmp_path / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    img.save(tmp_path / "pdf.png", "PDF")
    for name in ("eps.jpg", "pdf.png"):
        with pytest.raises(InputError, match=rf"{name}: cannot read image.*accepted formats: PNG"):
            load_image(tmp_path / name, pre)
