"""Golden parity: official-format checkpoints load strictly and reproduce the official exits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeperceiver.models import EXIT_NAMES, count_flops, create_model, load_checkpoint

CASES = [
    ("reg800m_perceiver_t128", "reg800m_perceiver_t128.fp16.pth", "reg800m_perceiver_t128.fp16.io.npz"),
    (
        "resnet50_0375_perceiver_t128",
        "resnet50_0375_perceiver_t128.fp16.pth",
        "resnet50_0375_perceiver_t128.fp16.io.npz",
    ),
    (
        "mobilenetV3_0x75_perceiver_t128",
        "mobilenetV3_0x75_perceiver_t128.pth",
        "mobilenetV3_0x75_perceiver_t128.io.npz",
    ),
]
TOL = 1e-4


@pytest.mark.parametrize(("name", "ckpt", "io"), CASES, ids=[c[0] for c in CASES])
def test_golden_outputs(golden_dir: Path, torch_threads: Any, name: str, ckpt: str, io: str) -> None:
    torch = torch_threads
    model = load_checkpoint(golden_dir / ckpt)  # strict=True by default
    assert model.model_name == name
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    keys = json.loads((golden_dir / f"{name}.keys.json").read_text())
    sd = model.state_dict()
    assert sorted(k for k, _, _ in keys) == sorted(sd), "state_dict keys differ from the official ones"
    assert all(list(sd[k].shape) == shape for k, shape, _ in keys)
    assert len(keys) == len(sd)
    data = np.load(golden_dir / io)
    with torch.no_grad():
        outs = model(torch.from_numpy(data["input"]))
    assert len(outs) == 4
    for exit_name, out in zip(EXIT_NAMES, outs, strict=True):
        ref = data[exit_name]
        assert out.shape == ref.shape
        diff = float(np.abs(out.numpy() - ref).max())
        assert diff <= TOL, f"{name}.{exit_name}: max abs diff {diff:.2e} > {TOL}"


@pytest.mark.parametrize("name", ["reg800m_perceiver_t128", "mobilenetV3_0x75_perceiver_t128"])
def test_flops_match_official_counter(golden_dir: Path, torch_threads: Any, name: str) -> None:
    summary = json.loads((golden_dir / "summary.json").read_text())
    official = summary["models"][name]["flops_g"]
    model = create_model(name, **_readme_flags(summary["models"][name]["readme_flags"]))
    ours = count_flops(model)
    assert len(ours) == 4
    assert list(ours) == sorted(ours), "cumulative FLOPs must not decrease"
    for k, (a, b) in enumerate(zip(ours, official, strict=True)):
        rel = abs(a / 1e9 - b) / b
        assert rel < 0.01, f"{name} exit {k + 1}: ours {a / 1e9:.4f} vs official {b:.4f} GMACs ({rel:.2%})"


def test_resnet_flops_near_fvcore(golden_dir: Path, torch_threads: Any) -> None:
    """The ResNet variant has no official counter; fvcore also counts BatchNorm, so allow 3%."""
    summary = json.loads((golden_dir / "summary.json").read_text())
    ref = summary["models"]["resnet50_0375_perceiver_t128"]["flops_g"]
    ours = count_flops(create_model("resnet50_0375_perceiver_t128"))
    for a, b in zip(ours, ref, strict=True):
        assert abs(a / 1e9 - b) / b < 0.03


def _readme_flags(argv: list[str]) -> dict[str, Any]:
    """``--depth_factor 1 1 1 2 --spatial_reduction true ...`` -> create_model flags."""
    flags: dict[str, Any] = {}
    key = None
    for tok in argv:
        if tok.startswith("--"):
            key = tok[2:]
            flags[key] = []
        elif key is not None:
            flags[key].append(tok)
    flags.pop("model", None)
    out: dict[str, Any] = {}
    for k, v in flags.items():
        if k == "depth_factor":
            out[k] = [int(x) for x in v]
        elif not v:
            out[k] = True
        else:
            out[k] = v[0]
    return out
