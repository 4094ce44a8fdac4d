"""Start (or join) a Ray cluster, deploy a bundle on Ray Serve, and keep it up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edgeperceiver._optional import require
from edgeperceiver.errors import EdgePerceiverError

from .client import Client
from .config import ServeConfig

Echo = Callable[[str], None]


def _ray() -> Any:
    require("ray.serve", purpose="serving a bundle (edgeperceiver serve)")
    import ray

    return ray


def start(
    config: ServeConfig,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    ready_timeout: float = 120.0,
) -> str:
    """Deploy ``config`` and return the service URL once a replica answers ``/readyz``.

    ``address`` joins a running cluster (``"auto"``: the one ``ray start`` made on this
    machine); without it a one-machine Ray instance starts in this process (``num_cpus``
    logical CPUs, default: all). Ray's dashboard is not started. The HTTP proxy listens on
    ``host:port`` (Ray Serve keeps the first proxy options a cluster was started with).
    """
    ray = _ray()
    from ray import serve

    from .deployment import build_app

    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", configure_logging=True)
        else:
            ray.init(address=address, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix, blocking=False)
    except Exception as exc:  # a replica that cannot start: Ray wraps the cause in its own error
        raise EdgePerceiverError(f"deploying {config.bundle} on Ray Serve failed: {exc}") from exc
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{config.route_prefix.rstrip('/')}"
    Client(url, timeout=10.0).wait_ready(ready_timeout)
    return url


def stop(config: ServeConfig | None = None, *, shutdown: bool = True) -> None:
    """Delete the application (or every application), then leave Ray."""
    ray = _ray()
    from ray import serve

    if not ray.is_initialized():
        return
    if config is not None and not shutdown:
        serve.delete(config.name)
    else:
        serve.shutdown()
    if shutdown:
        ray.shutdown()


def serve_bundle(
    config: ServeConfig,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    echo: Echo = print,
    wait: Callable[[], None] | None = None,
) -> None:
    """Serve until interrupted (``wait`` returns; default: sleep until Ctrl-C), then clean up.

    Joining a cluster (``address``), only this application is deleted on exit; a Ray
    instance started here is shut down with it.
    """
    url = start(config, address=address, host=host, port=port)
    info = Client(url).ready()
    th = info["thresholds"]
    echo(f"serving {config.bundle} ({info['entry']}, {info['exits']} exits, thresholds {th}) "
         f"with {config.replicas} replica(s), batches of up to {config.max_batch} "
         f"(wait {config.batch_wait_ms:g} ms)")  # fmt: skip
    echo(f"POST {url}/predict  (image bytes, JSON {{\"inputs\": [...]}} or .npy)   "
         f"GET {url}/healthz /readyz /stats")  # fmt: skip
    echo("Ctrl-C to stop")
    try:
        if wait is not None:
            wait()
        else:
            while True:
                time.sleep(3600)
    finally:
        stop(config, shutdown=address is None)
