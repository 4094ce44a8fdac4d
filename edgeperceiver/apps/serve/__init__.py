"""Serve a bundle on Ray Serve: HTTP, dynamic batching, per-sample early exit, many machines.

``start`` / ``serve_bundle`` deploy a :class:`ServeConfig`; :class:`Client` calls the
service over plain HTTP. Ray is imported only when a deployment starts (the ``serve``
extra); the client needs the standard library and numpy only.
"""

from __future__ import annotations

from .client import Client, ServiceError
from .config import ServeConfig
from .launch import serve_bundle, start, stop

__all__ = ["Client", "ServeConfig", "ServiceError", "serve_bundle", "start", "stop"]
