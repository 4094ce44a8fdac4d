"""A small client for the service, over plain HTTP (standard library + numpy only).

>>> c = Client("http://127.0.0.1:8000")                   # doctest: +SKIP
>>> c.predict("digit.png")                                # doctest: +SKIP
{'label': 3, 'class': '3', 'exit': 1, 'confidence': 0.98, 'score': 0.98, 'entry': '...'}

One keep-alive connection per thread; every call has a timeout. A non-2xx answer raises
:class:`ServiceError` with the service's status, error kind and message.
"""

from __future__ import annotations

import http.client
import io
import json
import mimetypes
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edgeperceiver.errors import EdgePerceiverError


class ServiceError(EdgePerceiverError):
    """The service answered an error (``status`` set) or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class Client:
    """Calls ``POST /predict``, ``GET /healthz``, ``/readyz`` and ``/stats`` of one service."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float = 30.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._local = threading.local()

    # ------------------------------------------------------------------ API
    def predict(self, image: bytes | str | os.PathLike[str], content_type: str | None = None) -> dict[str, Any]:
        """Classify one encoded image (bytes, or a file whose suffix gives the type)."""
        if isinstance(image, bytes):
            data = image
        else:
            path = Path(image)
            data = path.read_bytes()
            content_type = content_type or mimetypes.guess_type(path.name)[0]
        return self.request("POST", "/predict", data, content_type or "image/png")

    def predict_array(self, x: np.ndarray, *, as_json: bool = False) -> Any:
        """Classify preprocessed input: (C, H, W) -> one answer, (N, C, H, W) -> ``{"predictions": [...]}``.

        Sent as a ``.npy`` body (exact float32), or as JSON ``{"inputs": ...}`` with ``as_json``.
        """
        if as_json:
            return self.request("POST", "/predict", json.dumps({"inputs": np.asarray(x).tolist()}).encode(),
                                "application/json")  # fmt: skip
        buf = io.BytesIO()
        np.save(buf, np.asarray(x), allow_pickle=False)
        return self.request("POST", "/predict", buf.getvalue(), "application/x-npy")

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """The model a replica serves (entry, exits, thresholds, input shape, classes)."""
        return self.request("GET", "/readyz")

    def stats(self) -> dict[str, Any]:
        """One replica's counters (the replica that answers this call)."""
        return self.request("GET", "/stats")

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.25) -> dict[str, Any]:
        """Poll ``/readyz`` until a replica answers; :class:`ServiceError` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.ready()
            except ServiceError as exc:
                last = exc
                time.sleep(interval)
        raise ServiceError(f"{self.url} not ready after {timeout:g} s (last: {last})")

    # ------------------------------------------------------------------ transport
    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        """One HTTP call; the decoded JSON answer, or :class:`ServiceError`. Retries a stale connection once."""
        headers = {"Content-Type": content_type} if content_type else {}
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                status = resp.status
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._close()
                if attempt:
                    raise ServiceError(f"{method} {self.url}{path}: connection lost ({exc})") from exc
            except (OSError, http.client.HTTPException) as exc:
                self._close()
                raise ServiceError(f"{method} {self.url}{path}: {type(exc).__name__}: {exc}") from exc
        try:
            doc = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = None
        if 200 <= status < 300 and doc is not None:
            return doc
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            raise ServiceError(str(err.get("message")), status, err.get("kind"))
        text = raw[:300].decode("utf-8", "replace")
        raise ServiceError(f"{method} {self.url}{path}: HTTP {status}: {text}", status)

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Close this thread's connection."""
        self._close()
