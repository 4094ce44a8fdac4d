"""The CLI end to end on a tiny multi-exit module: export, compile, calibrate, run, bench, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeperceiver.bundle import Bundle
from edgeperceiver.cli import main

FACTORY = """
import torch
from torch import nn


class TwoExits(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head1 = nn.Linear(8, 5)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head2 = nn.Linear(16, 5)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        y1 = self.head1(a.mean((2, 3)))
        b = torch.relu(self.body(a)).mean((2, 3))
        return y1, self.head2(torch.cat([b, a.mean((2, 3))], 1))


def make():
    return TwoExits()
"""


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # Typer's standalone mode exits itself on success / usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("factory") / "twoexits.py"
    path.write_text(FACTORY)
    return f"{path}:make"


@pytest.fixture
def bundle(tmp_path: Path, factory: str, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "bundle"
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(["cat", "dog", "fox", "owl", "eel"]) + "\n")
    code, text, err = _cli(
        capsys, "export", "--module", factory, "--input-shape", "3,16,16", "-o", out, "--labels", labels
    )
    assert code == 0, err
    assert "bundle written to" in text
    return out


def test_export_run_calibrate_bench(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = Bundle.open(bundle)
    assert b.manifest.exits and len(b.manifest.segments) == 2
    assert b.manifest.classes == ("cat", "dog", "fox", "owl", "eel")

    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, text, err = _cli(capsys, "run", bundle, tmp_path / "x.npy", "--json")
    assert code == 0, err
    doc = json.loads(text)
    rows = doc["rows"]
    assert len(rows) == 6 and {r["exit"] for r in rows} == {2}  # no thresholds yet: last exit
    assert doc["entry"] == "onnxruntime-fp32" and doc["thresholds"] is None and "no thresholds" in doc["warning"]
    assert all(r["class_name"] in b.manifest.classes for r in rows)

    code, text, err = _cli(capsys, "run", bundle, tmp_path / "x.npy")  # the table says on stderr what ran
    assert code == 0 and "running entry onnxruntime-fp32" in err and "warning: entry onnxruntime-fp32" in err

    code, text, err = _cli(capsys, "calibrate", bundle, "--set", "0,off", "--json")  # everything leaves at exit 1
    assert code == 0, err
    assert json.loads(text)["thresholds"] == [0.0, None]
    code, text, err = _cli(capsys, "run", bundle, tmp_path / "x.npy", "--json")
    doc = json.loads(text)
    assert {r["exit"] for r in doc["rows"]} == {1} and doc["exit_counts"] == [6, 0]
    assert doc["reason"] == "calibrated last" and doc["warning"] is None

    code, text, err = _cli(capsys, "bench", bundle, "--batch-sizes", "1", "--repeats", "3", "--json")
    assert code == 0, err
    doc = json.loads(text)
    assert doc["entry"] == doc["target"] == "onnxruntime-fp32" and doc["thresholds"] == [0.0, None]


def test_compile_and_run_onnxruntime(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text, err = _cli(capsys, "compile", bundle, "--target", "onnxruntime", "--precision", "fp32")
    assert code == 0, err
    assert "compiled onnxruntime-fp32" in text
    code, text, err = _cli(capsys, "compile", bundle, "--target", "onnxruntime", "--json")
    assert code == 0, err
    assert json.loads(text)["entry"] == "onnxruntime-fp32"


def test_errors_are_one_line_with_exit_codes(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "models", "no_such_model")
    assert code == 2 and err.startswith("error: unknown model") and "Traceback" not in err

    code, _, err = _cli(capsys, "run", tmp_path / "nowhere", tmp_path / "x.npy")
    assert code == 6 and "not a bundle" in err

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = _cli(capsys, "run", bundle, bad)
    assert code == 2 and "broken.png" in err and "Traceback" not in err

    code, _, err = _cli(capsys, "export", tmp_path / "m.onnx", "-o", tmp_path / "b2")
    assert code == 2 and "--onnx-exits" in err

    code, _, err = _cli(capsys, "compile", bundle, "--target", "openvino", "--precision", "fp16")
    assert code == 2 and "does not support precision fp16" in err

    (bundle / "segments" / "seg1.onnx").write_bytes(b"tampered")
    code, _, err = _cli(capsys, "run", bundle, tmp_path / "x.npy")
    assert code == 6 and "checksum" in err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, text, _ = _cli(capsys, "--help")
    assert code == 0
    for command in ("models", "export", "compile", "calibrate", "run", "bench", "demo", "pack", "serve"):
        assert command in text


def test_json_documents(bundle: Path, tmp_path: Path, factory: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command's --json prints one strict JSON document (parsed here) and nothing else on stdout."""
    from edgeperceiver.models import DEMO_MODEL

    code, text, err = _cli(capsys, "models", "--json")
    assert code == 0, err
    assert DEMO_MODEL in json.loads(text)["models"]
    code, text, err = _cli(capsys, "models", DEMO_MODEL, "--json")
    assert code == 0, err
    doc = json.loads(text)
    assert doc["model"] == DEMO_MODEL and doc["exits"][-1]["share"] == pytest.approx(1.0)

    code, text, err = _cli(
        capsys, "export", "--module", factory, "--input-shape", "3,16,16", "-o", tmp_path / "b2", "--json"
    )
    assert code == 0, err
    doc = json.loads(text)
    assert doc["bundle"] == str(tmp_path / "b2") and doc["report"]

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 16, 16)).astype(np.float32)
    from edgeperceiver.runtime import load

    y = load(bundle, "onnxruntime-fp32").all_exits(x)[-1].argmax(1)  # labels the last exit agrees with
    np.savez(tmp_path / "held.npz", x=x, y=y)
    code, text, err = _cli(capsys, "calibrate", bundle, "--data", tmp_path / "held.npz", "--max-drop", "100",
                           "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(text)
    assert doc["entry"] == "onnxruntime-fp32" and len(doc["thresholds"]) == 2 and "goal" in doc


def test_options_are_enums_and_entry_spellings(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _cli(capsys, "calibrate", bundle, "--data", tmp_path, "--latency", "sometimes")
    assert code == 2 and "sometimes" in err  # a closed set: Typer refuses other values
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 16, 16), np.float32))
    code, text, err = _cli(capsys, "run", bundle, tmp_path / "x.npy", "-t", "onnxruntime-fp32", "--json")
    assert code == 0, err  # the old spelling of --entry still works
    assert json.loads(text)["reason"] == "named"
    code, _, err = _cli(capsys, "run", bundle, tmp_path / "x.npy", "--entry", "openvino-int8")
    assert code == 6 and "no target 'openvino-int8'" in err


def _cli_process(*args: object, tty: bool) -> str:
    """Run the installed command in a subprocess, on a pseudo-terminal (``script``) or a pipe."""
    import shutil
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).parent / "edgeperceiver"), *map(str, args)]
    if tty:
        if shutil.which("script") is None:
            pytest.skip("util-linux 'script' (a pseudo-terminal) is not installed")
        import shlex

        cmd = ["script", "-qec", shlex.join(cmd), "/dev/null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (proc.stdout + proc.stderr).replace("\r", "")


def test_progress_bars_on_a_terminal_only(tmp_path: Path) -> None:
    from bundles import make_toy_bundle, toy_inputs

    from edgeperceiver.runtime import load

    root = make_toy_bundle(tmp_path / "b", logit_scale=4.0)
    x = toy_inputs(60, seed=2)
    np.savez(tmp_path / "held.npz", x=x, y=load(root, "onnxruntime-fp32").all_exits(x)[-1].argmax(1))
    args = ("calibrate", root, "--data", tmp_path / "held.npz", "--max-drop", "5")
    on_terminal = _cli_process(*args, tty=True)
    assert "running every exit" in on_terminal and "60/60" in on_terminal  # the collection's bar
    piped = _cli_process(*args, tty=False)
    assert "running every exit" not in piped and "calibrated onnxruntime-fp32" in piped
    doc = json.loads(_cli_process(*args, "--json", tty=True))  # --json: the document alone, even on a terminal
    assert doc["entry"] == "onnxruntime-fp32"


def test_json_mode_keeps_stdout_for_the_document(capfd: pytest.CaptureFixture[str]) -> None:
    """With --json, whatever a library prints (through sys.stdout or straight to fd 1) goes to stderr."""
    import os
    import sys

    from edgeperceiver.apps.progress_bar import stdout_to_stderr

    with stdout_to_stderr(True):
        print("library noise")
        sys.stdout.flush()
        os.write(1, b"fd noise\n")
    print('{"ok": true}')
    out, err = capfd.readouterr()
    assert json.loads(out) == {"ok": True}
    assert "library noise" in err and "fd noise" in err


def test_compile_reports_through_messages_and_never_prints(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The library's compile report goes to the caller's message sink, not to stdout/stderr."""
    from bundles import make_toy_bundle, toy_inputs

    from edgeperceiver.progress import messages_to
    from edgeperceiver.targets import compile_bundle
    from edgeperceiver.types import Precision, TargetName

    root = make_toy_bundle(tmp_path / "b")
    lines: list[str] = []
    with messages_to(lines.append):
        entry = compile_bundle(root, TargetName.ONNXRUNTIME, Precision.INT8, calib_data=toy_inputs(24))
    out, err = capfd.readouterr()
    ours = [line.strip() for line in lines if line.strip()]
    assert ours and ours[0] in entry.metadata["report"]
    assert not [line for line in ours if line in out or line in err]  # third-party tools (NNCF) may still talk
