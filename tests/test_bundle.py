"""The bundle manifest: round trip, atomic writes and edits, and every way to corrupt one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeperceiver.bundle import (
    BATCH,
    MANIFEST,
    Bundle,
    Manifest,
    Preprocess,
    SegmentSpec,
    TargetEntry,
    TensorSpec,
    Thresholds,
    edit_bundle,
    write_bundle,
)
from edgeperceiver.errors import BundleError
from edgeperceiver.types import Criterion, Precision, TargetName


def _manifest() -> Manifest:
    image = TensorSpec("image", "float32", (BATCH, 3, 8, 8))
    feat = TensorSpec("feat", "float32", (BATCH, 4, 4, 4))
    seg1 = SegmentSpec(
        1, "segments/seg1.onnx", "exit1", (image,), (TensorSpec("exit1", "float32", (BATCH, 10)), feat), ("feat",)
    )
    seg2 = SegmentSpec(2, "segments/seg2.onnx", "exit2", (feat,), (TensorSpec("exit2", "float32", (BATCH, 10)),), ())
    ort = TargetEntry(TargetName.ONNXRUNTIME, Precision.FP32, (seg1.path, seg2.path), monolithic="model.onnx")
    return Manifest(
        model_name="toy",
        source="module",
        opset=17,
        input=image,
        num_classes=10,
        preprocess=Preprocess(size=(8, 8)),
        segments=(seg1, seg2),
        targets={ort.key: ort},
    )


def _write(dest: Path) -> Bundle:
    with write_bundle(dest) as w:
        for rel, data in (("model.onnx", b"m"), ("segments/seg1.onnx", b"s1"), ("segments/seg2.onnx", b"s2")):
            w.path(rel).write_bytes(data)
        w.manifest = _manifest()
    return Bundle.open(dest)


def test_round_trip_and_checksums(tmp_path: Path) -> None:
    b = _write(tmp_path / "b")
    assert b.manifest.exits == ("exit1", "exit2")
    assert set(b.manifest.files) == {"model.onnx", "segments/seg1.onnx", "segments/seg2.onnx"}
    assert b.manifest.target("onnxruntime").key == "onnxruntime-fp32"
    assert b.manifest.target(None).monolithic == "model.onnx"
    assert b.manifest.segments[0].outputs[1].per_sample_bytes() == 4 * 4 * 4 * 4
    assert not list(tmp_path.glob(".*staging"))


def test_existing_destination_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    with pytest.raises(BundleError, match="already exists"):
        _write(tmp_path / "b")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), write_bundle(tmp_path / "b") as w:
        w.path("model.onnx").write_bytes(b"m")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_edit_is_atomic(tmp_path: Path) -> None:
    b = _write(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError), edit_bundle(b.root) as w:
        w.replace_file("segments/seg1.onnx", b"changed")
        raise RuntimeError("interrupted compile")
    after = {p.name: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert after == before
    assert not list(tmp_path.glob(".*staging"))


def test_edit_adds_target_and_thresholds(tmp_path: Path) -> None:
    b = _write(tmp_path / "b")
    with edit_bundle(b.root) as w:
        w.path("openvino-int8/seg1.xml").write_bytes(b"x1")
        w.path("openvino-int8/seg2.xml").write_bytes(b"x2")
        th = Thresholds(Criterion.MAX_SOFTMAX, (0.9, None), goal="manual")
        entry = TargetEntry(
            TargetName.OPENVINO, Precision.INT8, ("openvino-int8/seg1.xml", "openvino-int8/seg2.xml"), thresholds=th
        )
        assert w.manifest is not None
        w.manifest = w.manifest.with_target(entry)
    again = Bundle.open(b.root)
    assert again.manifest.target("openvino").thresholds == th
    assert again.manifest.target("openvino-int8").precision is Precision.INT8
    # the source files were hard-linked, not rewritten: still valid
    assert again.path("segments/seg1.onnx").read_bytes() == b"s1"


def test_tampered_file_fails_checksum(tmp_path: Path) -> None:
    b = _write(tmp_path / "b")
    b.path("segments/seg2.onnx").write_bytes(b"evil")
    with pytest.raises(BundleError, match=r"seg2\.onnx fails its checksum"):
        Bundle.open(b.root)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    b = _write(tmp_path / "b")
    b.path("segments/seg1.onnx").unlink()
    with pytest.raises(BundleError, match=r"seg1\.onnx is missing"):
        Bundle.open(b.root)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "segments/../../x.onnx", "a\\..\\b"])
def test_paths_leaving_the_bundle_are_refused(tmp_path: Path, bad: str) -> None:
    b = _write(tmp_path / "b")
    data = json.loads((b.root / MANIFEST).read_text())
    data["segments"][0]["path"] = bad
    data["files"][bad] = "0" * 64
    (b.root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="leaves the bundle"):
        Bundle.open(b.root)


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    b = _write(tmp_path / "b")
    (tmp_path / "secret.onnx").write_bytes(b"s2")
    target = b.path("segments/seg2.onnx")
    target.unlink()
    target.symlink_to(tmp_path / "secret.onnx")
    with pytest.raises(BundleError, match="leaves the bundle"):
        Bundle.open(b.root)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema="edgeperceiver.bundle/99"), "schema"),
        (lambda d: d.pop("segments"), "malformed"),
        (lambda d: d["segments"][0].update(index=5), "malformed"),
        (lambda d: d["input"].update(shape=[True, 3]), "malformed"),
        (lambda d: d["targets"]["onnxruntime-fp32"].update(precision="int4"), "malformed"),
        (lambda d: d["files"].pop("segments/seg1.onnx"), "no checksum"),
    ],
)
def test_malformed_manifests(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    b = _write(tmp_path / "b")
    data = json.loads((b.root / MANIFEST).read_text())
    mutate(data)
    (b.root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        Bundle.open(b.root)


def test_truncated_manifest_and_non_bundle(tmp_path: Path) -> None:
    b = _write(tmp_path / "b")
    text = (b.root / MANIFEST).read_text()
    (b.root / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="unreadable manifest"):
        Bundle.open(b.root)
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.open(tmp_path)


def test_unknown_and_ambiguous_targets(tmp_path: Path) -> None:
    m = _manifest()
    with pytest.raises(BundleError, match="edgeperceiver compile BUNDLE --target openvino"):
        m.target("openvino")
    segs = tuple(s.path for s in m.segments)
    m = m.with_target(TargetEntry(TargetName.OPENVINO, Precision.FP32, segs))
    m = m.with_target(TargetEntry(TargetName.OPENVINO, Precision.INT8, segs))
    with pytest.raises(BundleError, match="ambiguous"):
        m.target("openvino")
    assert m.target("openvino-int8").precision is Precision.INT8
