"""The machine a measurement ran on, for the header of every timing table."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from functools import cache


@cache
def cpu_model() -> str:
    """The CPU's model name (``lscpu``, else ``/proc/cpuinfo``, else ``platform.processor()``)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """``CPU: <model> (<n> logical CPUs)``."""
    return f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)"
