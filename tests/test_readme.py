"""The README opens with exactly two commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_match_ci() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    demo, tests = (b.strip() for b in blocks[:2])
    assert "\n" not in demo and "\n" not in tests, "each of the first two blocks is one command"
    assert demo.endswith("edgeperceiver demo")
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert "-c constraints.txt" in demo and "-c constraints.txt" in tests  # CPU torch, pinned
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
