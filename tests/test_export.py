"""Export of generic multi-exit PyTorch modules and ONNX files into verified bundles."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from edgeperceiver.bundle import Bundle  # noqa: E402
from edgeperceiver.cut import run_chain  # noqa: E402
from edgeperceiver.errors import BundleError, ExportError, InputError  # noqa: E402
from edgeperceiver.export import ExportReport, export_module, export_onnx, load_module_factory  # noqa: E402
from edgeperceiver.types import Precision, TargetName  # noqa: E402

SHAPE = (3, 16, 16)
CLASSES = 5


class TinyMultiExit(nn.Module):
    """Conv stem + latent cross-attention; exit 3 reads CNN features, the latent and exit 1."""

    exit_names = ("e_early", "e_mid", "e_last")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.latent = nn.Parameter(torch.randn(4, 8))
        self.norm = nn.LayerNorm(8)
        self.head1 = nn.Linear(8, CLASSES)
        self.head2 = nn.Linear(8, CLASSES)
        self.head3 = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = torch.relu(self.stem(x))
        b = f.shape[0]
        tokens = f.flatten(2).transpose(1, 2)  # [b, 256, 8]
        z = self.norm(self.latent.unsqueeze(0).expand(b, -1, -1))
        z = z + torch.softmax(z @ tokens.transpose(1, 2) / 8**0.5, -1) @ tokens
        e1 = self.head1(z.mean(1))
        g = torch.relu(self.block(f))  # only the later exits need this block
        e2 = self.head2(g.mean((2, 3))) + e1
        e3 = self.head3(torch.cat([g.mean((2, 3)), z.mean(1)], 1)) + e2
        return e1, e2, e3


def _export(tmp_path: Path, **kw: Any) -> tuple[ExportReport, Bundle]:
    report = export_module(TinyMultiExit(), SHAPE, tmp_path / "bundle", threads=1, **kw)
    return report, Bundle.open(tmp_path / "bundle")


def test_export_module_writes_a_verified_bundle(tmp_path: Path, torch_threads: Any) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(CLASSES)) + "\n")
    report, bundle = _export(tmp_path, labels=labels)
    m = bundle.manifest
    assert report.ok and m.exits == TinyMultiExit.exit_names
    assert m.classes == tuple(f"class {i}" for i in range(CLASSES)) and m.num_classes == CLASSES
    assert m.input.shape == ("batch", *SHAPE) and m.preprocess.size == (16, 16)
    assert m.opset == 17 and m.source == "module"
    entry = m.target(None)
    assert entry.target is TargetName.ONNXRUNTIME and entry.precision is Precision.FP32
    assert entry.segments == ("segments/seg1.onnx", "segments/seg2.onnx", "segments/seg3.onnx")
    assert entry.monolithic == "model.onnx"
    assert {"model.onnx", "segments/seg1.onnx"} <= set(m.files)
    # the cut: block is not needed by exit 1, so segment 2 starts from the stem features
    s1, s2, s3 = m.segments
    # (exit 1's logits are read by exit 2, the pooled latent by exit 3)
    assert {t.shape for t in s1.outputs} == {("batch", CLASSES), ("batch", 8, 16, 16), ("batch", 8)}
    assert s1.outputs[0].name == "e_early" and "e_early" in s1.live_after
    assert [t.name for t in s3.inputs] and all(t.shape[0] == "batch" for s in m.segments for t in s.inputs)
    assert s3.live_after == ()
    # the segments chained from the bundle files reproduce PyTorch on fresh data
    x = np.random.default_rng(5).standard_normal((3, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in TinyMultiExit().eval()(torch.from_numpy(x))]
    got = run_chain([bundle.path(s.path) for s in m.segments], {m.input.name: x}, threads=1)
    for name, r in zip(m.exits, ref, strict=True):
        np.testing.assert_allclose(got[name], r, atol=1e-5)
    # FLOPs (MACs per sample) counted on the ONNX graph match the layer arithmetic
    stem, block, latent_attn = 16 * 16 * 8 * 27, 8 * 8 * 8 * 72, 2 * 4 * 256 * 8
    assert s1.flops == stem + latent_attn + 8 * CLASSES
    assert s2.flops == block + 8 * CLASSES
    assert s3.flops == 16 * CLASSES
    assert sum(s.params for s in m.segments) == sum(p.numel() for p in TinyMultiExit().parameters())
    text = report.render()
    assert "e_early" in text and "MMACs" in text and "yes" in text


def test_subset_of_exits(tmp_path: Path, torch_threads: Any) -> None:
    report, bundle = _export(tmp_path, exits=[1, 3])
    assert bundle.manifest.exits == ("e_early", "e_last")
    seg2 = bundle.manifest.segments[1]
    full_report, _ = _export(tmp_path / "full")
    # the dropped exit's work (e_last adds e_mid) is folded into the next kept segment
    assert seg2.flops == full_report.segments[1].flops + full_report.segments[2].flops
    assert report.ok and len(bundle.manifest.target(None).segments) == 2
    with pytest.raises(InputError, match="strictly increasing"):
        _export(tmp_path / "bad", exits=[3, 1])
    with pytest.raises(InputError, match="out of range"):
        _export(tmp_path / "bad", exits=[1, 4])


def test_simplify_is_verified_too(tmp_path: Path, torch_threads: Any) -> None:
    report, bundle = _export(tmp_path, simplify=True)
    assert report.ok and report.simplified
    assert bundle.manifest.extra["export"]["simplified"] == report.simplified


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_onnx_source(tmp_path: Path, torch_threads: Any) -> None:
    path = tmp_path / "src.onnx"
    torch.onnx.export(  # a static batch of 1: export makes the batch axis dynamic
        TinyMultiExit().eval(), (torch.zeros(1, *SHAPE),), str(path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["a", "b", "c"],
    )
    report = export_onnx(path, tmp_path / "b", exits=["a", "c"], threads=1)
    m = Bundle.open(tmp_path / "b").manifest
    assert report.ok and m.exits == ("a", "c") and m.input.name == "image" and m.source == "onnx"
    with pytest.raises(InputError, match="nope"):
        export_onnx(path, tmp_path / "b2", exits=["a", "nope"])
    assert not (tmp_path / "b2").exists()


def test_module_returning_one_tensor_is_refused(tmp_path: Path, torch_threads: Any) -> None:
    with pytest.raises(ExportError, match="single tensor"):
        export_module(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), (3, 4, 4), tmp_path / "b")
    with pytest.raises(ExportError, match="logits of shape"):
        export_module(_TupleOfMaps(), (3, 4, 4), tmp_path / "b")
    assert not (tmp_path / "b").exists()


class _TupleOfMaps(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean((2, 3)), x


class _Drifting(nn.Module):
    """Traced once, then its eager output changes: verification must catch the disagreement."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        y = self.lin(x.flatten(1))
        return y, y * float(self.calls)


def test_verification_failure_writes_nothing(tmp_path: Path, torch_threads: Any) -> None:
    with pytest.raises(ExportError, match="verification failed"):
        export_module(_Drifting(), (3, 2, 2), tmp_path / "b", threads=1)
    assert not (tmp_path / "b").exists()


def test_bad_labels_and_existing_output(tmp_path: Path, torch_threads: Any) -> None:
    with pytest.raises(InputError, match="2 class names"):
        _export(tmp_path, labels=["a", "b"])
    _export(tmp_path)
    with pytest.raises(ExportError, match="already exists"):
        _export(tmp_path)
    report, _ = _export(tmp_path, overwrite=True)
    assert report.ok


def test_tampered_segment_and_escaping_path_are_rejected(tmp_path: Path, torch_threads: Any) -> None:
    _, bundle = _export(tmp_path)
    root = bundle.root
    seg = root / "segments" / "seg2.onnx"
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"seg2\.onnx fails its checksum"):
        Bundle.open(root)
    seg.unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.open(root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["segments"][0]["path"] = "../outside.onnx"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="leaves the bundle"):
        Bundle.open(root)


def test_load_module_factory(tmp_path: Path, torch_threads: Any) -> None:
    src = tmp_path / "my_models.py"
    src.write_text(textwrap.dedent("""
        from torch import nn

        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(12, 3)
                self.b = nn.Linear(3, 3)

            def forward(self, x):
                y = self.a(x.flatten(1))
                return y, self.b(y)

        def make():
            return Two()
    """))
    module = load_module_factory(f"{src}:make")()
    report = export_module(module, (3, 2, 2), tmp_path / "b", threads=1)
    assert report.ok and report.exits == ("exit1", "exit2")
    with pytest.raises(InputError, match=r"package\.module:factory"):
        load_module_factory("no_colon")
    with pytest.raises(InputError, match="no callable"):
        load_module_factory(f"{src}:missing")
    with pytest.raises(InputError, match="cannot import"):
        load_module_factory("edgeperceiver_no_such_module:make")


@pytest.mark.slow
def test_export_checkpoint_of_a_small_dyn_perceiver(tmp_path: Path, torch_threads: Any) -> None:
    """The checkpoint path without the golden fixtures: an official-format checkpoint of the demo arch."""
    import argparse

    models = pytest.importorskip("edgeperceiver.models")
    model = models.create_model("digits_perceiver_t32").eval()
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="digits_perceiver_t32")}, ckpt)
    from edgeperceiver.export import export_checkpoint

    report = export_checkpoint(ckpt, tmp_path / "b", exits=[1, 2, 4], threads=2)
    m = Bundle.open(tmp_path / "b").manifest
    assert report.ok and m.exits == ("y_early3", "y_att", "y_merge") and m.model_name == "digits_perceiver_t32"
    assert m.preprocess.size == (32, 32) and m.num_classes == 10 and m.source == "checkpoint"
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        outs = [t.numpy() for t in model(torch.from_numpy(x))]
    ref = dict(zip(("y_early3", "y_att", "y_cnn", "y_merge"), outs, strict=True))
    got = run_chain([Bundle.open(tmp_path / "b").path(s.path) for s in m.segments], {m.input.name: x}, threads=2)
    for e in m.exits:
        np.testing.assert_allclose(got[e], ref[e], atol=1e-4 * max(1.0, float(np.abs(ref[e]).max())))
