"""Which CPU an OpenVINO entry's measured choices hold on: its model name and kernel-selecting
instruction sets, recorded at compile time and compared where the entry is loaded."""

from __future__ import annotations

import os
import warnings
from typing import Any

from ..bundle import TargetEntry
from ..types import Precision

#: precisions whose entries hold choices measured on the CPU they were compiled on (the INT8
#: accuracy ladder, the float parts' precision, the per-segment precision of ``auto``)
_MEASURED = frozenset({Precision.INT8, Precision.AUTO})


class OtherCPUWarning(UserWarning):
    """An entry whose precision choices and accuracy gate were measured on another CPU model."""


#: the instruction-set extensions that pick OpenVINO's int8, bf16 and fp16 CPU kernels
_KERNEL_ISA = frozenset({"avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                         "amx_tile", "amx_int8", "amx_bf16", "amx_fp16"})


def cpu_isa(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> tuple[str, ...]:
    """The kernel-selecting instruction-set extensions of this CPU (Linux ``/proc/cpuinfo``
    flags, sorted), or ``()`` where they cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return tuple(sorted(_KERNEL_ISA & set(line.partition(":")[2].split())))
    except OSError:
        pass
    return ()


def cpu_name(core: Any) -> str:
    """OpenVINO's name for this machine's CPU (``FULL_DEVICE_NAME``), or ``"unknown"``."""
    try:
        return str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    except RuntimeError:
        return "unknown"


def check_cpu(entry: TargetEntry, core: Any) -> None:
    """Warn where ``entry``'s measured choices were made on another CPU model: INT8 and
    fused kernels differ per instruction set, so its accuracy gate holds there, not
    necessarily here."""
    if entry.precision not in _MEASURED:
        return
    made_on, here = str(entry.metadata.get("cpu", "unknown")), cpu_name(core)
    made_isa, here_isa = set(entry.metadata.get("cpu_isa") or ()), set(cpu_isa())
    differ = []
    if "unknown" not in (made_on, here) and made_on != here:
        differ.append(f"on {made_on!r}; this CPU is {here!r}")
    if made_isa and here_isa and made_isa != here_isa:
        differ.append("with instruction sets " + ", ".join(
            [f"+{f}" for f in sorted(made_isa - here_isa)] + [f"-{f}" for f in sorted(here_isa - made_isa)])
            + " compared with this CPU")
    if differ:
        warnings.warn(
            f"{entry.key} was compiled and checked against FP32 {'; '.join(differ)}. Its INT8 accuracy gate "
            "and precision choices were measured there, with that CPU's kernels: compile it on this CPU "
            "to check them here",
            OtherCPUWarning, stacklevel=5,
        )
