"""The model zoo: every registry name builds, runs, round-trips its state_dict; flags; ONNX export."""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeperceiver.errors import ModelError
from edgeperceiver.models import (
    EXIT_NAMES,
    FLAG_NAMES,
    count_flops,
    create_model,
    get_spec,
    list_models,
    model_info,
)

OFFICIAL_PREFIXES = {
    "reg400m": (32, 64, 128, 256, 512),
    "reg800m": (32, 64, 128, 256, 512),
    "reg1x6g": (128, 256, 512),
    "reg3x2g": (128, 256, 512),
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (64, 128, 256, 512),
    "resnet50_050": (64, 128, 256),
    "resnet50_0375": (64, 128, 256),
    "resnet50_0625": (128, 160, 192, 256),
    "resnet50_075": (128, 256),
    "mobilenetV3": (128, 256, 512),
    "mobilenetV3_0x5": (128, 256, 512),
    "mobilenetV3_0x75": (128, 256, 512),
    "mobilenetV3_1x25": (128, 256, 512),
    "mobilenetV3_1x5": (128, 256, 512),
    "mobilenetV3_2x0": (128, 256, 512),
}


def test_registry_has_every_official_name() -> None:
    expected = {f"{p}_perceiver_t{t}" for p, ts in OFFICIAL_PREFIXES.items() for t in ts}
    assert expected == set(list_models(official_only=True))
    assert len(expected) == 56


def test_import_does_not_pull_torch() -> None:
    code = "import sys, edgeperceiver.models as m; m.list_models(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_runs_and_round_trips(torch_threads: Any, name: str) -> None:
    torch = torch_threads
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, input_size=32).eval()
    assert model.exit_names == EXIT_NAMES
    assert model.input_size == 32 and model.num_classes == 7
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        outs = model(x)
    assert isinstance(outs, tuple) and len(outs) == 4
    for y in outs:
        assert y.shape == (2, 7) and y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    torch.manual_seed(1)  # a different random init, then load the first model's weights strictly
    twin = create_model(name, num_classes=7, input_size=32)
    twin.load_state_dict(model.state_dict(), strict=True)
    twin.eval()
    with torch.no_grad():
        again = twin(x)
    for a, b in zip(outs, again, strict=True):
        assert torch.equal(a, b)


def test_construction_has_no_side_effects(torch_threads: Any, capsys: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        before = set(Path(d).iterdir())
        create_model("reg400m_perceiver_t32", num_classes=3, input_size=32)
        assert set(Path(d).iterdir()) == before
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_defaults_are_the_official_readme_flags() -> None:
    reg = get_spec("reg800m_perceiver_t128").config()
    assert reg.depth_factor == (1, 1, 1, 2) and reg.spatial_reduction and reg.with_last_CA
    assert reg.SA_widening_factor == 4 and reg.num_SA_heads == (1, 2, 4, 8)
    assert get_spec("resnet50_0375_perceiver_t128").config().depth_factor == (1, 1, 1, 1)
    assert get_spec("mobilenetV3_0x75_perceiver_t128").config().depth_factor == (1, 1, 1, 3)


def test_flags_change_the_architecture(torch_threads: Any) -> None:
    base = create_model("mobilenetV3_0x5_perceiver_t128", num_classes=5, input_size=64)
    keys = set(base.state_dict())
    lean = create_model(
        "mobilenetV3_0x5_perceiver_t128",
        num_classes=5,
        input_size=64,
        with_x2z="false",
        with_z2x=False,
        with_dwc="0",
        with_last_CA=False,
        with_isc=False,
        depth_factor=[1, 1, 1, 1],
        SA_widening_factor=1,
        spatial_reduction=False,
        num_SA_heads=["1", "1", "2", "2"],
        num_latent_channels=32,
        dropout=0.1,
    )
    lk = set(lean.state_dict())
    assert not any(k.startswith(("cross_att2_x2z", "dwc", "cross_att3_z2x", "last_cross_att", "isc3")) for k in lk)
    assert "self_att4.8.mlp.fc1.weight" in keys and "self_att4.3.mlp.fc1.weight" not in lk
    assert lean.latent.shape == (128, 32)
    # spatial_reduction=False: the position bias covers the full 16x16 stem grid at input 64
    assert lean.cross_att1_x2z.cross_attn.attention.relative_position_bias.shape[1] == 16 * 16
    assert keys > lk - {"latent"}
    lean.eval()
    with torch_threads.no_grad():
        outs = lean(torch_threads.rand(3, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(3, 5)] * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth_factr": [1, 1, 1, 1]}, "Did you mean: depth_factor"),
        ({"depth_factor": [1, 1, 1]}, "depth_factor needs 4"),
        ({"with_isc": "maybe"}, "with_isc must be a boolean"),
        ({"num_SA_heads": [1, 2, 4, 7]}, "not divisible by 7 heads"),
        ({"input_size": 16}, "input_size must be at least 32"),
        ({"dropout": 1.5}, "dropout must be in"),
    ],
)
def test_bad_flags(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        create_model("reg400m_perceiver_t32", **kwargs)


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'reg800m_perceiver_t12'.*reg800m_perceiver_t128"):
        create_model("reg800m_perceiver_t12")
    assert set(FLAG_NAMES) >= {"depth_factor", "spatial_reduction", "with_last_CA", "SA_widening_factor"}


def test_model_info() -> None:
    info = model_info("reg800m_perceiver_t128")
    assert info.input_size == 224 and info.num_classes == 1000
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert info.exit_names == EXIT_NAMES and info.crop_pct == 0.875
    assert model_info("digits_perceiver_t32").crop_pct == 1.0


def test_flops_are_cumulative_and_scale(torch_threads: Any) -> None:
    model = create_model("reg400m_perceiver_t32", num_classes=10)
    f224 = count_flops(model)
    f112 = count_flops(model, input_size=112)
    assert len(f224) == 4 and all(a < b for a, b in itertools.pairwise(f224))
    assert 3.0 < f224[-1] / f112[-1] < 4.5  # convolutions scale with the pixel count
    assert model.training  # count_flops restores the mode


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size", "flags"),
    [
        ("reg400m_perceiver_t32", 112, {"num_classes": 10, "input_size": 112, "depth_factor": [1, 1, 1, 1]}),
        ("digits_perceiver_t32", 32, {}),
    ],
)
def test_onnx_export_dynamic_batch(torch_threads: Any, name: str, size: int, flags: dict[str, Any]) -> None:
    """TorchScript exporter, opset 17, dynamic batch: ONNX Runtime agrees at batch 1 and 3."""
    torch = torch_threads
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = create_model(name, **flags).eval()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        torch.onnx.export(
            model,
            (torch.rand(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=list(EXIT_NAMES),
            dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in EXIT_NAMES}},
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for b in (1, 3):
            x = torch.rand(b, 3, size, size)
            with torch.no_grad():
                ref = model(x)
            got = sess.run(None, {"image": x.numpy()})
            for r, g in zip(ref, got, strict=True):
                assert g.shape == (b, 10)
                assert float(np.abs(r.numpy() - g).max()) < 1e-4


def test_demo_checkpoint_reproduces_reported_accuracy(torch_threads: Any) -> None:
    """The shipped demo weights load and score what scripts/train_digits.py reported."""
    torch = torch_threads
    pytest.importorskip("sklearn")
    from edgeperceiver.datasets import load_digits_split, to_model_input
    from edgeperceiver.models import DEMO_MODEL, demo_checkpoint, load_checkpoint, read_checkpoint

    path = demo_checkpoint()
    assert path.stat().st_size < 5_000_000
    reported = read_checkpoint(path)["metrics"]
    model = load_checkpoint(path)
    assert model.model_name == DEMO_MODEL and model.input_size == 32 and model.num_classes == 10
    split = load_digits_split(model.input_size)
    x = torch.from_numpy(to_model_input(split.x_heldout, model.mean, model.std))
    y = torch.from_numpy(split.y_heldout)
    with torch.no_grad():
        outs = model(x)
    acc = {n: float((o.argmax(1) == y).float().mean()) for n, o in zip(EXIT_NAMES, outs, strict=True)}
    for n in EXIT_NAMES:
        assert abs(acc[n] - reported[n]) <= 0.005, f"{n}: {acc[n]:.4f} vs reported {reported[n]:.4f}"
    assert acc["y_early3"] > 0.85 and acc["y_merge"] > 0.97
    assert acc["y_merge"] >= acc["y_early3"]
    flops = count_flops(model)
    assert flops[0] < 0.5 * flops[-1]  # exit 1 is clearly cheaper than exit 4
