"""ONNX Runtime's intra-op thread pools: per segment session (default) or one per process (``pool="shared"``).

A process-wide pool must exist before ONNX Runtime's environment, so each shared-pool case
runs in a fresh Python process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from bundles import make_toy_bundle, toy_inputs

from edgeperceiver.errors import InputError
from edgeperceiver.runtime.onnxruntime import OrtBackend
from edgeperceiver.runtime.runner import load

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("pool") / "toy")


def test_shared_pool_runs_every_segment_and_gives_the_same_answers(toy: Path) -> None:
    x = toy_inputs(5)
    np.save(toy.parent / "x.npy", x)
    want = [z.tolist() for z in load(toy, "onnxruntime-fp32", threads=2).all_exits(x)]
    got = json.loads(_python(f"""
import json, numpy as np
from edgeperceiver.runtime.onnxruntime import OrtBackend, shared_pool_size
from edgeperceiver.runtime.runner import load
r = load({str(toy)!r}, "onnxruntime-fp32", threads=2, pool="shared")
out = [z.tolist() for z in r.all_exits(np.load({str(toy.parent / "x.npy")!r}))]
so = r.backend.session_options()
auto = OrtBackend(threads=2, pool="auto")  # the process has the pool: auto takes it
print(json.dumps({{"out": out, "size": shared_pool_size(), "per_session": so.use_per_session_threads,
                  "auto": auto.config.pool}}))
"""))
    assert got["size"] == 2 and got["per_session"] is False and got["auto"] == "shared"
    for a, b in zip(got["out"], want, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


def test_shared_pool_refuses_another_size_and_per_session_pools_after_it(toy: Path) -> None:
    other = _python("""
from edgeperceiver.errors import TargetError
from edgeperceiver.runtime.onnxruntime import OrtBackend
OrtBackend(threads=2, pool="shared")
try:
    OrtBackend(threads=1, pool="shared")
    print("no error")
except TargetError as exc:
    print(exc)
""")
    assert "already has 2" in other and "process of its own" in other
    late = _python(f"""
from edgeperceiver.errors import TargetError
from edgeperceiver.runtime.runner import load
load({str(toy)!r}, "onnxruntime-fp32", threads=1)  # per-session pools first: the shared pool still comes
r = load({str(toy)!r}, "onnxruntime-fp32", threads=2, pool="shared")
r.all_exits(__import__("numpy").zeros((2, 3, 8, 8), "float32"))
try:
    load({str(toy)!r}, "onnxruntime-fp32", threads=2, pool="session")
    print("no error")
except TargetError as exc:
    print(exc)
""")
    assert "shared thread pool" in late and "pool='shared'" in late


def test_per_session_pools_stay_the_default() -> None:
    assert OrtBackend(threads=2).config.pool == "session"
    assert OrtBackend(threads=2, pool="auto").config.pool in ("session", "shared")
    with pytest.raises(InputError, match="pool"):
        OrtBackend(pool="everyone")
