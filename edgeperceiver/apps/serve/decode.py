"""HTTP request bodies -> model input, and the 4xx errors for bodies that are not one.

A body is one encoded image (``image/png``, ``image/jpeg``, ... decoded and preprocessed
with the bundle's own pipeline), a JSON object ``{"inputs": [...]}`` holding preprocessed
arrays as nested lists, or one ``.npy`` array (``application/x-npy``, never unpickled).
Validation of shape, dtype and values is the runner's (:meth:`Runner.check_input`); this
module only turns bytes into an array and refuses what cannot be one.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeperceiver.bundle import Preprocess
from edgeperceiver.errors import InputError
from edgeperceiver.runtime.preprocess import decode_image

#: content types read as JSON and as a ``.npy`` array; every ``image/*`` type is decoded
JSON_TYPES = frozenset({"application/json"})
NPY_TYPES = frozenset({"application/x-npy", "application/npy"})


class RequestError(InputError):
    """A request the service refuses, with the HTTP status to answer and a short error kind."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_input") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    """A request's samples: ``x`` is (N, C, H, W) unless ``single`` (then (C, H, W), one answer)."""

    x: np.ndarray
    single: bool


def media_type(content_type: str | None) -> str:
    """``"image/png; charset=..."`` -> ``"image/png"`` (lower case, no parameters)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_body(body: bytes, content_type: str | None, pre: Preprocess, *, max_samples: int) -> Decoded:
    """Turn a request body into model input; a :class:`RequestError` says why it cannot."""
    kind = media_type(content_type)
    if not body:
        raise RequestError("empty request body: send an encoded image or JSON {\"inputs\": [...]}", kind="empty_body")
    if kind.startswith("image/"):
        try:
            return Decoded(decode_image(body, pre, name=f"{kind} body"), single=True)
        except InputError as exc:
            message = str(exc)
            if "cannot identify image file" in message:  # Pillow names the BytesIO, not the problem
                message = f"{kind} body: not an image in a format Pillow can decode"
            raise RequestError(message, kind="undecodable_image") from exc
    if kind in JSON_TYPES:
        arr = _json_array(body)
    elif kind in NPY_TYPES:
        arr = _npy_array(body)
    else:
        raise RequestError(
            f"unsupported Content-Type {content_type or '(none)'!r}: use image/png, image/jpeg, ..., "
            "application/json or application/x-npy",
            status=415,
            kind="unsupported_media_type",
        )
    if arr.ndim not in (3, 4):
        raise RequestError(
            f"inputs must be one sample (C, H, W) or a batch (N, C, H, W), got shape {arr.shape}", kind="wrong_shape"
        )
    n = 1 if arr.ndim == 3 else arr.shape[0]
    if n > max_samples:
        raise RequestError(
            f"{n} samples in one request, the limit is {max_samples}", status=413, kind="too_many_samples"
        )
    if n == 0:
        raise RequestError("inputs hold no samples", kind="wrong_shape")
    return Decoded(arr, single=arr.ndim == 3)


def _json_array(body: bytes) -> np.ndarray:
    try:
        doc: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"body is not valid JSON ({exc})", kind="invalid_json") from exc
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError('JSON body must be an object with "inputs": [...]', kind="invalid_json")
    try:
        arr = np.asarray(doc["inputs"])
    except ValueError as exc:  # ragged nesting
        raise RequestError(f'"inputs" is not a rectangular array ({exc})', kind="wrong_shape") from exc
    if arr.dtype == object:
        raise RequestError('"inputs" is not a rectangular array of numbers', kind="wrong_shape")
    if arr.dtype.kind not in "fiu":
        raise RequestError(f'"inputs" must hold numbers, got {arr.dtype} values', kind="wrong_dtype")
    # JSON has one number type: integers written without a fraction are still pixel values
    return arr.astype(np.float32)


def _npy_array(body: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise RequestError(f"body is not a .npy array ({type(exc).__name__}: {exc})", kind="invalid_npy") from exc
    if not isinstance(arr, np.ndarray):
        raise RequestError("body is not a single .npy array", kind="invalid_npy")
    if not np.issubdtype(arr.dtype, np.floating):
        raise RequestError(
            f"expected floating-point data (preprocessed images), got dtype {arr.dtype}", kind="wrong_dtype"
        )
    return arr
