"""Shared pytest fixtures.

``golden_dir``: the official Dyn-Perceiver golden fixtures in the repository's sibling
``shared/`` directory (skips cleanly when absent). ``torch_threads``: torch with 2 threads.
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
    """The torch module, limited to a few threads (the CI machine has 2 cores)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("EDGEPERCEIVER_TEST_THREADS", "2")))
    yield torch
    torch.set_num_threads(before)
