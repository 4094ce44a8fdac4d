"""``edgeperceiver pack``: one archive of plain, verified files that runs where it is unpacked."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from bundles import make_toy_bundle, toy_inputs

from edgeperceiver import pack as pack_module
from edgeperceiver.bundle import Bundle
from edgeperceiver.cli import main
from edgeperceiver.errors import BundleError, InputError
from edgeperceiver.pack import pack_bundle
from edgeperceiver.runtime import load
from edgeperceiver.targets import compile_bundle
from edgeperceiver.types import Precision, TargetName

FAST = {"latency_runs": 3, "report_samples": 16, "threads": 1}


@pytest.fixture(scope="module")
def two_entries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy bundle (a versioned link) with onnxruntime-fp32 and onnxruntime-int8 entries."""
    root = make_toy_bundle(tmp_path_factory.mktemp("pack") / "toy", thresholds=[0.6, 0.5, None], standalone=True)
    compile_bundle(root, TargetName.ONNXRUNTIME, Precision.INT8, calib_data=toy_inputs(32, seed=3), options=FAST)
    return root


def _unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        assert all(m.isfile() for m in tar.getmembers())  # plain files: no links, no directories to trust
        tar.extractall(dest, filter="data")
    return dest / "toy"


def test_the_unpacked_bundle_is_the_bundle(two_entries: Path, tmp_path: Path) -> None:
    assert two_entries.is_symlink()
    report = pack_bundle(two_entries, tmp_path / "toy.tar.gz")
    assert report.top == "toy" and set(report.entries) == {"onnxruntime-fp32", "onnxruntime-int8"}
    out = _unpack(report.archive, tmp_path / "device")
    assert not out.is_symlink()
    original = Bundle.open(two_entries)
    assert (out / "manifest.json").read_bytes() == (original.location / "manifest.json").read_bytes()
    Bundle.open(out)  # every file present with its sha256, nothing unlisted
    x = toy_inputs(12, seed=5)
    for key in report.entries:
        a, b = load(two_entries, key, threads=1).predict(x), load(out, key, threads=1).predict(x)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.exits, b.exits)
        np.testing.assert_array_equal(a.scores, b.scores)
    assert (out / "run.py").stat().st_mode & 0o111


def test_entries_trim_the_others_files(two_entries: Path, tmp_path: Path) -> None:
    full = Bundle.open(two_entries).manifest
    int8_files = {rel for rel in full.files if rel.startswith(("onnxruntime-int8/", "reports/onnxruntime-int8/"))}
    int8_files |= set(full.target("onnxruntime-int8").segments)
    assert int8_files - set(full.target("onnxruntime-fp32").segments)  # the INT8 entry has files of its own
    report = pack_bundle(two_entries, tmp_path / "fp32.tgz", entries=["onnxruntime-fp32"])
    assert report.entries == ("onnxruntime-fp32",)
    out = _unpack(report.archive, tmp_path / "device")
    m = Bundle.open(out).manifest
    assert list(m.targets) == ["onnxruntime-fp32"]
    assert not (set(m.files) & (int8_files - set(full.target("onnxruntime-fp32").segments)))
    assert set(m.files) < set(full.files)
    assert full.quantization is not None and m.quantization is None  # only compiles read it
    x = toy_inputs(6, seed=6)
    a, b = load(two_entries, "onnxruntime-fp32", threads=1).predict(x), load(out, threads=1).predict(x)
    assert np.array_equal(a.exits, b.exits) and np.array_equal(a.labels, b.labels)
    # the INT8 entry runs the shared quantized graph: kept with it
    report = pack_bundle(two_entries, tmp_path / "int8.tgz", entries=["onnxruntime-int8"])
    m = Bundle.open(_unpack(report.archive, tmp_path / "device8")).manifest
    assert list(m.targets) == ["onnxruntime-int8"] and m.quantization == full.quantization


def test_bad_requests_are_refused_and_nothing_is_left(two_entries: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no entry 'nope'.*onnxruntime-fp32, onnxruntime-int8"):
        pack_bundle(two_entries, tmp_path / "a.tgz", entries=["nope"])
    with pytest.raises(InputError, match="must end in"):
        pack_bundle(two_entries, tmp_path / "a.zip")
    with pytest.raises(InputError, match="inside the bundle"):
        pack_bundle(two_entries, Bundle.open(two_entries).location / "self.tar")
    with pytest.raises(InputError, match="is a directory"):
        (tmp_path / "d.tar").mkdir()
        pack_bundle(two_entries, tmp_path / "d.tar")
    (tmp_path / "old.tar").write_bytes(b"keep me")
    with pytest.raises(InputError, match="exists; pass --force"):
        pack_bundle(two_entries, tmp_path / "old.tar")
    assert (tmp_path / "old.tar").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.tar", "old.tar"]


def test_a_failed_pack_keeps_the_old_archive(
    two_entries: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "toy.tar"
    out.write_bytes(b"previous archive")

    def corrupt(path: Path, top: str, manifest: object) -> None:
        raise BundleError("read-back failed")

    monkeypatch.setattr(pack_module, "_check_archive", corrupt)
    with pytest.raises(BundleError, match="read-back failed"):
        pack_bundle(two_entries, out, overwrite=True)
    assert out.read_bytes() == b"previous archive"
    assert [p.name for p in tmp_path.iterdir()] == ["toy.tar"]  # no temporary file left


def test_a_file_changed_after_the_bundle_was_opened_is_caught(
    two_entries: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = Bundle.open(two_entries)
    files = {**opened.manifest.files, "model.onnx": "0" * 64}  # as if model.onnx changed since
    stale = Bundle(opened.root, dataclasses.replace(opened.manifest, files=files), opened.dir)
    monkeypatch.setattr(pack_module.Bundle, "open", classmethod(lambda cls, root, **kw: stale))
    with pytest.raises(BundleError, match=r"model\.onnx fails its checksum"):
        pack_bundle(two_entries, tmp_path / "t.tgz", entries=["onnxruntime-fp32"])
    assert list(tmp_path.iterdir()) == []


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # Typer's standalone mode exits itself on success
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(two_entries: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "toy.tar.xz"
    code, text, _ = _cli(capsys, "pack", str(two_entries), "-o", str(out), "-e", "onnxruntime-int8", "--json")
    doc = json.loads(text)
    assert code == 0 and doc["entries"] == ["onnxruntime-int8"] and doc["archive"] == str(out) and out.is_file()
    code, _, err = _cli(capsys, "pack", str(two_entries), "-o", str(out))
    assert code == 2 and "exists; pass --force" in err and "Traceback" not in err
    code, text, _ = _cli(capsys, "pack", str(two_entries), "-o", str(out), "--force")
    assert code == 0 and "tar xf toy.tar.xz" in text
