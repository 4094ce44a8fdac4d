"""Shared pytest fixtures.

``golden_dir``: the official Dyn-Perceiver golden fixtures in the repository's sibling
``shared/`` directory (skips cleanly when absent). ``torch_threads``: torch with 1 thread
(override with ``EDGEPERCEIVER_TEST_THREADS``): on a busy 2-core machine two threads per test
process spin against each other and run these small models several times slower.
Torch is imported only by the fixtures that need it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "dynperceiver"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Directory of the official golden fixtures; skips the test when it is not there."""
    if not (GOLDEN_DIR / "README.md").is_file():
        pytest.skip(f"golden fixtures not found at {GOLDEN_DIR}")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def torch_threads() -> Iterator[Any]:
    """The torch module, limited to one thread by default (the CI machine has 2 cores)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("EDGEPERCEIVER_TEST_THREADS", "1")))
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def golden_mobilenet_bundle(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory, torch_threads: Any) -> Path:
    """The official MobileNetV3 Dyn-Perceiver golden checkpoint exported once per session (read-only use).

    Exporting costs ~40 s on 2 cores; slow tests that only read the bundle can share this one.
    """
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from edgeperceiver.export import export_checkpoint

    out = tmp_path_factory.mktemp("golden-mobilenet") / "bundle"
    export_checkpoint(golden_dir / "mobilenetV3_0x75_perceiver_t128.pth", out, threads=2, verify_batch=2)
    return out
