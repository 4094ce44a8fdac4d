"""load_checkpoint: official format, bare state_dicts, fp16, EMA, and every bad-input path."""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeperceiver.errors import CheckpointError, EdgePerceiverError, ModelError
from edgeperceiver.models import create_model, load_checkpoint

NAME = "mobilenetV3_0x5_perceiver_t128"
FLAGS: dict[str, Any] = {"num_classes": 3, "input_size": 64, "depth_factor": [1, 1, 1, 1]}


def _args(**extra: Any) -> argparse.Namespace:
    """An ``args`` Namespace shaped like the official parser's (booleans stored as strings)."""
    base: dict[str, Any] = {
        "model": NAME,
        "input_size": 64,
        "nb_classes": 3,
        "depth_factor": [1, 1, 1, 1],
        "spatial_reduction": "true",
        "with_last_CA": True,
        "SA_widening_factor": 4,
        "with_x2z": "True",
        "with_dwc": True,
        "with_z2x": "yes",
        "with_isc": True,
        "num_SA_heads": None,
        "num_latent_channels": None,
        "dropout": 0.0,
        "epochs": 300,
        "lr": 6e-4,
    }
    base.update(extra)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory, torch_threads: Any) -> Iterator[tuple[Path, Any]]:
    torch = torch_threads
    torch.manual_seed(0)
    model = create_model(NAME, **FLAGS).eval()
    d = tmp_path_factory.mktemp("ckpt")
    sd = model.state_dict()
    ema = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save({"model": sd, "model_ema": ema, "epoch": 7, "args": _args()}, d / "official.pth")
    yield d, model


def _outputs(model: Any, torch: Any) -> Any:
    torch.manual_seed(5)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        return model(x)


def test_official_format_round_trip(ckpt_dir: tuple[Path, Any], torch_threads: Any) -> None:
    d, ref = ckpt_dir
    model = load_checkpoint(d / "official.pth")
    assert model.model_name == NAME and not model.training
    assert model.config.depth_factor == (1, 1, 1, 1) and model.num_classes == 3
    for a, b in zip(_outputs(model, torch_threads), _outputs(ref, torch_threads), strict=True):
        assert torch_threads.equal(a, b)


def test_key_model_ema(ckpt_dir: tuple[Path, Any], torch_threads: Any) -> None:
    d, ref = ckpt_dir
    ema = load_checkpoint(d / "official.pth", key="model_ema")
    assert torch_threads.allclose(ema.latent, ref.latent + 1.0)
    with pytest.raises(CheckpointError, match="no state_dict under key 'optimizer'"):
        load_checkpoint(d / "official.pth", key="optimizer")


def test_fp16_and_bare_state_dict(ckpt_dir: tuple[Path, Any], torch_threads: Any) -> None:
    torch = torch_threads
    d, ref = ckpt_dir
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    torch.save(half, d / "bare16.pth")
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        load_checkpoint(d / "bare16.pth")
    model = load_checkpoint(d / "bare16.pth", name=NAME, input_size=64, depth_factor=[1, 1, 1, 1])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.num_classes == 3  # read from the weights
    for a, b in zip(_outputs(model, torch), _outputs(ref, torch), strict=True):
        assert float((a - b).abs().max()) < 0.05  # fp16 rounding of the weights only


def test_checkpoint_of_another_architecture(ckpt_dir: tuple[Path, Any]) -> None:
    d, _ = ckpt_dir
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d / "official.pth", name="reg400m_perceiver_t32")
    msg = str(err.value)
    assert "does not match the architecture" in msg and "'reg400m_perceiver_t32'" in msg
    assert "missing" in msg and "unexpected" in msg and "more)" in msg


def test_other_flags_give_shape_errors(ckpt_dir: tuple[Path, Any]) -> None:
    d, _ = ckpt_dir
    with pytest.raises(CheckpointError, match=r"wrongly shaped: .*latent"):
        load_checkpoint(d / "official.pth", num_latent_channels=24, strict=False)
    with pytest.raises(CheckpointError, match=r"missing: self_att4\.3\."):
        load_checkpoint(d / "official.pth", depth_factor=[1, 1, 1, 2])


def test_strict_false_ignores_extra_keys(ckpt_dir: tuple[Path, Any], torch_threads: Any) -> None:
    d, ref = ckpt_dir
    sd = dict(ref.state_dict())
    sd["extra.weight"] = torch_threads.zeros(3)
    torch_threads.save({"model": sd, "args": _args()}, d / "extra.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected: extra\.weight"):
        load_checkpoint(d / "extra.pth")
    load_checkpoint(d / "extra.pth", strict=False)


def test_truncated_file(ckpt_dir: tuple[Path, Any]) -> None:
    d, _ = ckpt_dir
    data = (d / "official.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(d / "truncated.pth")


def test_not_a_checkpoint(tmp_path: Path, torch_threads: Any) -> None:
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pth")
    torch_threads.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pth")


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch.save", "pickle-2", "pickle-4"])
def test_pickle_carrying_code_is_refused(tmp_path: Path, torch_threads: Any, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": {}, "args": _Payload(marker)}
    if container == "torch.save":
        torch_threads.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(container[-1])))
    with pytest.raises(CheckpointError, match="outside the allow-list") as err:
        load_checkpoint(path)
    if container != "pickle-4":  # protocol 4 is refused at its first opcode, before the global
        assert "system" in str(err.value)
    assert not marker.exists()


def test_unknown_model_name_in_args(ckpt_dir: tuple[Path, Any], torch_threads: Any) -> None:
    d, ref = ckpt_dir
    torch_threads.save({"model": ref.state_dict(), "args": _args(model="reg800m_perceiver_t1024")}, d / "u.pth")
    with pytest.raises(ModelError, match="unknown model 'reg800m_perceiver_t1024'") as err:
        load_checkpoint(d / "u.pth")
    assert isinstance(err.value, EdgePerceiverError)
    with pytest.raises(ModelError, match="unknown model flag 'depth'"):
        load_checkpoint(d / "official.pth", depth=[1, 1, 1, 1])
