"""TensorRT and CUDA on this machine: the lazy imports, what an engine is tied to, Jetson facts.

- :func:`import_tensorrt` / :func:`import_cuda`: the real libraries or a
  :class:`~edgeperceiver.errors.MissingDependencyError` naming the pip extra.
- :class:`DeviceFacts`: the TensorRT version, GPU model, compute capability, platform
  (L4T release on a Jetson) and Jetson module an engine was built for;
  :func:`check_engine_compatible` compares them with this device before anything is
  deserialized.
- :func:`strongly_typed_default`: which network typing a TensorRT version builds
  (strong from 10.12, where weak typing is deprecated, and on 11, where it is gone).

Standard library and numpy only at import time.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

import numpy as np

from .._optional import require
from ..bundle import TargetEntry
from ..errors import InputError, MissingDependencyError, TargetError
from ..types import TargetName

REBUILD = "edgeperceiver compile BUNDLE --target tensorrt --precision {precision}"

#: first TensorRT version that builds strongly typed networks by default here
STRONG_TYPING_FROM = (10, 12)


def import_tensorrt() -> ModuleType:
    """Import the real ``tensorrt`` module or raise :class:`MissingDependencyError`.

    Type stubs alone (the ``tensorrt-stubs`` package installs a bare ``tensorrt/`` folder
    that imports as an empty namespace package) count as missing.
    """
    mod = require("tensorrt", purpose="building or running TensorRT engines")
    if not hasattr(mod, "Builder") or not hasattr(mod, "__version__"):
        raise MissingDependencyError(
            "'tensorrt' is installed only as type stubs (no TensorRT library) (needed for building or "
            "running TensorRT engines). Install it with: pip install 'edgeperceiver[tensorrt]' "
            "(on Jetson, TensorRT comes with JetPack: see docs/tensorrt.md)"
        )
    return mod


class CudaDriver(Protocol):
    """The part of ``pycuda.driver`` the TensorRT code uses (pycuda ships no type information).

    Tests pass an in-memory stand-in with the same methods.
    """

    def init(self) -> None: ...
    def Device(self, ordinal: int) -> Any: ...  # pycuda's names
    def Stream(self) -> Any: ...
    def Event(self) -> Any: ...
    def mem_alloc(self, nbytes: int) -> Any: ...
    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray: ...
    def memcpy_htod_async(self, dest: int, src: np.ndarray, stream: Any) -> None: ...
    def memcpy_dtoh_async(self, dest: np.ndarray, src: int, stream: Any) -> None: ...
    def memcpy_dtod_async(self, dest: int, src: int, size: int, stream: Any) -> None: ...


def import_cuda() -> CudaDriver:
    """``pycuda.driver``, initialised, or :class:`MissingDependencyError` naming the extra."""
    drv = cast(CudaDriver, require("pycuda.driver", purpose="GPU memory for TensorRT engines"))
    try:
        drv.init()
    except Exception as exc:  # pycuda raises its own error types (no common base to name)
        raise TargetError(f"CUDA could not be initialised (no NVIDIA GPU or driver?): {exc}") from exc
    return drv


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)`` (non-numeric tails ignored)."""
    parts = []
    for p in str(version).split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise TargetError(f"cannot read the TensorRT version {version!r}")
    return tuple(parts)


def strongly_typed_default(version: str, requested: bool | None = None) -> bool:
    """Whether to build strongly typed networks with TensorRT ``version``.

    ``requested`` (the ``strongly_typed`` build option) wins where the version allows it;
    ``None`` picks strong typing from 10.12 on (weak typing is deprecated there and gone in
    11), weak typing with precision constraints before (JetPack 6's 10.3).
    """
    v = version_tuple(version)
    if v[0] >= 11 and requested is False:
        raise InputError("TensorRT 11 builds strongly typed networks only; drop --option strongly_typed=false")
    if requested is not None:
        return requested
    return v[:2] >= STRONG_TYPING_FROM


# --------------------------------------------------------------------------- engine facts


@dataclass(frozen=True)
class DeviceFacts:
    """What a TensorRT engine is tied to: TensorRT version, GPU model, compute capability."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    platform: str = ""  #: "L4T R36.3.0" on Jetson, else the machine architecture
    module: str = ""  #: Jetson module ("NVIDIA Jetson AGX Orin Developer Kit"); "" elsewhere

    def to_metadata(self) -> dict[str, Any]:
        meta = {
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "platform": self.platform,
        }
        if self.module:
            meta["module"] = self.module
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> DeviceFacts:
        """Read the facts a build recorded; :class:`TargetError` if they are missing."""
        missing = [k for k in ("tensorrt_version", "gpu_name", "compute_capability") if not meta.get(k)]
        if missing:
            raise TargetError(
                f"the TensorRT target entry does not record {', '.join(missing)}; the engines cannot be "
                "checked against this device. Rebuild them here: "
                + REBUILD.format(precision=meta.get("precision", "fp16"))
            )
        return cls(
            tensorrt_version=str(meta["tensorrt_version"]),
            gpu_name=str(meta["gpu_name"]),
            compute_capability=parse_compute_capability(meta["compute_capability"]),
            platform=str(meta.get("platform", "")),
            module=str(meta.get("module", "")),
        )


def parse_compute_capability(value: Any) -> tuple[int, int]:
    """``"8.7"``, ``(8, 7)`` or ``[8, 7]`` -> ``(8, 7)``."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", value)
        if m:
            return int(m.group(1)), int(m.group(2))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise TargetError(f"bad compute capability {value!r} in the manifest (expected 'MAJOR.MINOR')")


def engine_incompatibilities(built: DeviceFacts, here: DeviceFacts, *, strict_device: bool = True) -> list[str]:
    """Why engines built on ``built`` cannot be deserialized on ``here`` (empty if they can).

    A plan is only valid for the exact TensorRT version and GPU compute capability it was
    built with; with ``strict_device`` a different GPU model of the same capability is
    refused too (TensorRT's tactics are tuned per model and it only warns). Every Orin
    module reports compute capability 8.7 and the GPU name "Orin", so on Jetson the
    module name (when both sides recorded one) tells an AGX Orin from an Orin Nano.
    """
    problems = []
    if built.tensorrt_version != here.tensorrt_version:
        problems.append(f"built with TensorRT {built.tensorrt_version}, this machine has {here.tensorrt_version}")
    if built.compute_capability != here.compute_capability:
        b, h = built.compute_capability, here.compute_capability
        problems.append(
            f"built for compute capability {b[0]}.{b[1]} ({built.gpu_name}), "
            f"this GPU is {h[0]}.{h[1]} ({here.gpu_name})"
        )
    elif strict_device and built.gpu_name != here.gpu_name:
        problems.append(f"built on a {built.gpu_name}, this GPU is a {here.gpu_name}")
    elif strict_device and built.module and here.module and built.module != here.module:
        problems.append(f"built on a {built.module}, this GPU is a {here.module}")
    return problems


def check_engine_compatible(entry: TargetEntry, here: DeviceFacts, *, strict_device: bool = True) -> DeviceFacts:
    """Raise :class:`TargetError` (with the rebuild command) unless ``entry`` runs on ``here``."""
    if entry.target is not TargetName.TENSORRT:
        raise TargetError(f"target entry {entry.key!r} is not a TensorRT entry")
    built = DeviceFacts.from_metadata({**entry.metadata, "precision": entry.precision.value})
    problems = engine_incompatibilities(built, here, strict_device=strict_device)
    if problems:
        raise TargetError(
            f"the bundle's TensorRT {entry.precision.value} engines do not fit this machine: "
            + "; ".join(problems)
            + ". TensorRT engines are tied to one GPU and TensorRT version; rebuild them on this device "
            "from the bundle's ONNX segments: " + REBUILD.format(precision=entry.precision.value)
            + (" (or open the backend with strict_device=False to accept another GPU model of the same "
               "compute capability)" if strict_device and all("this GPU is a" in p for p in problems) else "")
        )
    return built


# --------------------------------------------------------------------------- Jetson


def parse_tegra_release(text: str) -> str | None:
    """``/etc/nv_tegra_release`` -> ``"L4T R36.3.0"`` (the JetPack's L4T release), else None."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return None
    return f"L4T R{m.group(1)}.{m.group(2)}"


#: L4T major.minor -> JetPack release (NVIDIA's JetPack archive)
JETPACK_OF_L4T: Mapping[tuple[int, int], str] = {
    (35, 1): "5.0.2", (35, 2): "5.1", (35, 3): "5.1.1", (35, 4): "5.1.2", (35, 5): "5.1.3", (35, 6): "5.1.4",
    (36, 2): "6.0 DP", (36, 3): "6.0", (36, 4): "6.1/6.2",
}


def jetpack_of(l4t: str) -> str | None:
    """JetPack release of an ``"L4T R36.3.0"`` string (None when unknown)."""
    m = re.fullmatch(r"L4T R(\d+)\.(\d+)(?:\.\d+)*", l4t.strip())
    return JETPACK_OF_L4T.get((int(m.group(1)), int(m.group(2)))) if m else None


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace").rstrip("\x00\n ")
    except OSError:
        return None


def host_platform(root: Path = Path("/")) -> str:
    """The L4T release on a Jetson, else the machine architecture (e.g. ``x86_64``)."""
    text = _read(root / "etc/nv_tegra_release")
    found = parse_tegra_release(text) if text else None
    return found or platform.machine()


def jetson_module(root: Path = Path("/")) -> str:
    """The Jetson module/board name from the device tree ("" when this is not a Jetson)."""
    if _read(root / "etc/nv_tegra_release") is None:
        return ""
    return _read(root / "proc/device-tree/model") or ""


def current_device_facts(device: int = 0, *, cuda: CudaDriver | None = None, trt_module: Any = None) -> DeviceFacts:
    """The facts of GPU ``device`` and the installed TensorRT (needs tensorrt and pycuda)."""
    trt_mod = trt_module if trt_module is not None else import_tensorrt()
    drv = cuda if cuda is not None else import_cuda()
    try:
        dev = drv.Device(device)
        name = str(dev.name())
        cc = tuple(int(v) for v in dev.compute_capability())
    except Exception as exc:  # pycuda's LogicError / RuntimeError for a bad ordinal
        raise InputError(f"CUDA device {device} is not available: {exc}") from exc
    return DeviceFacts(str(trt_mod.__version__), name, (cc[0], cc[1]), host_platform(), jetson_module())
