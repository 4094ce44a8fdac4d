"""bfloat16 on the host: OpenVINO tensors to numpy and back (numpy only; uint16 bit patterns)."""

from __future__ import annotations

from typing import Any

import numpy as np


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def tensor_to_host(tensor: Any) -> np.ndarray:
    """Copy an OpenVINO tensor out; bfloat16 comes back as its bit patterns (uint16).

    (OpenVINO's Python API labels bf16 data float16, which would silently misread it.)
    """
    data = tensor.data
    if str(tensor.get_element_type()) == "<Type: 'bfloat16'>":
        return np.array(data.view(np.uint16), copy=True)
    return np.array(data, copy=True)


def is_bf16(port: Any) -> bool:
    return str(port.get_element_type()) == "<Type: 'bfloat16'>"
