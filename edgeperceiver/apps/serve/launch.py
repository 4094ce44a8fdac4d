"""Start (or join) a Ray cluster, deploy a bundle on Ray Serve, and keep it up."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from edgeperceiver._optional import require
from edgeperceiver.errors import EdgePerceiverError

from .client import Client
from .config import ServeConfig

Echo = Callable[[str], None]

#: Ray Serve's switch for its HAProxy ingress (read by the controller when it starts)
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


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
    haproxy: bool = True,
    proxy_location: str = "EveryNode",
    metrics_port: int | None = None,
    ready_timeout: float = 120.0,
) -> str:
    """Deploy ``config`` and return the service URL once a replica answers ``/readyz``.

    ``address`` joins a running cluster (``"auto"``: the one ``ray start`` made on this
    machine); without it a one-machine Ray instance starts in this process (``num_cpus``
    logical CPUs, default: all) on the loopback address. Ray's dashboard is not started. The HTTP proxy listens on
    ``host:port`` (Ray Serve keeps the first proxy options a cluster was started with).

    ``haproxy``: a Ray instance started here takes HTTP through Ray Serve's HAProxy
    ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``), which forwards straight to the replicas; the
    Python proxy costs several times more CPU per request. A joined cluster keeps the
    ingress its ``ray start`` chose (set the variable there). ``metrics_port``: where
    this machine's Ray metrics agent serves Prometheus text (``/metrics``), for a Ray
    instance started here (``ray start --metrics-export-port`` for a cluster).
    """
    if haproxy and address is None:
        os.environ.setdefault(HAPROXY_ENV, "1")
    ray = _ray()
    from ray import serve

    from .deployment import build_app

    if not ray.is_initialized():
        if address is None:
            # "local": a new instance of our own, even beside one that `ray start` made or
            # RAY_ADDRESS names (joining those is what --address is for)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                     configure_logging=True, _node_ip_address="127.0.0.1",
                     _metrics_export_port=metrics_port)  # fmt: skip
        else:
            ray.init(address=address, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
    try:
        serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix, blocking=False)
    except Exception as exc:  # a replica that cannot start: Ray wraps the cause in its own error
        raise EdgePerceiverError(f"deploying {config.bundle} on Ray Serve failed: {exc}") from exc
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}{config.route_prefix.rstrip('/')}"
    Client(url, timeout=10.0).wait_ready(ready_timeout)
    return url


def stop(config: ServeConfig | None = None, *, shutdown: bool = True) -> None:
    """Leave Ray: with ``shutdown`` end the Ray instance this process started (every actor,
    the ingress with them); else delete only ``config``'s application from the cluster."""
    ray = _ray()
    from ray import serve

    if not ray.is_initialized():
        return
    if not shutdown and config is not None:
        serve.delete(config.name)
    # Serve's own shutdown waits up to 30 s for its controller; ending the instance is immediate
    ray.shutdown()


def serve_bundle(
    config: ServeConfig,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    haproxy: bool = True,
    echo: Echo = print,
    wait: Callable[[], None] | None = None,
) -> None:
    """Serve until ``wait`` returns (default: until Ctrl-C or SIGTERM), then clean up.

    Joining a cluster (``address``), only this application is deleted on exit; a Ray
    instance started here is shut down with it.
    """
    url = start(config, address=address, host=host, port=port, haproxy=haproxy)
    # SIGTERM (how process managers and Kubernetes stop a process) stops like Ctrl-C; Ray's
    # own handler, set by ray.init, would exit without cleaning up
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        info = Client(url).ready()
        th = "none" if info["thresholds"] is None else ",".join(
            "off" if v is None else f"{v:.4g}" for v in info["thresholds"]
        )
        echo(f"serving {config.bundle} ({info['entry']}, {info['exits']} exits, thresholds {th}) "
             f"with {config.replicas} replica(s), batches of up to {config.max_batch} "
             f"(wait {config.batch_wait_ms:g} ms)")  # fmt: skip
        echo(f"POST {url}/predict  (image bytes, JSON {{\"inputs\": [...]}} or .npy)   "
             f"GET {url}/healthz /readyz /stats")  # fmt: skip
        echo("Ctrl-C to stop")
        if wait is not None:
            wait()
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        stop(config, shutdown=address is None)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
