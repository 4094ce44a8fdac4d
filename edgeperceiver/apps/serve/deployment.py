"""The Ray Serve deployment: one runner per replica, requests batched by ``@serve.batch``.

Each request is read (size-bounded), decoded and validated on its own, so a bad one is
answered 4xx without touching a batch. Valid requests wait in Ray Serve's batch queue; the
batch handler concatenates them, runs :meth:`Runner.predict` once in a worker thread (the
event loop keeps reading requests and answering health checks), and inside that batch every
confident sample leaves at its exit. Routes (under the route prefix):

``POST /predict``   one image / JSON ``{"inputs": [...]}`` / ``.npy`` -> prediction(s)
``GET /healthz``    liveness of this replica
``GET /readyz``     the loaded model: entry, exits, thresholds, input shape, classes
``GET /stats``      this replica's request, error, batch and exit counts, pid, node
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from ray import serve

from edgeperceiver.errors import EdgePerceiverError, InputError
from edgeperceiver.runtime import Prediction, Runner, load

from .config import ServeConfig
from .decode import RequestError, decode_body
from .metrics import ServeMetrics

#: the deployment's name inside its Ray Serve application
DEPLOYMENT_NAME = "EdgePerceiver"


def prediction_rows(pred: Prediction, classes: tuple[str, ...] | None, entry: str) -> list[dict[str, Any]]:
    """One JSON object per sample: label, class (or null), exit (1-based), confidence, score, entry."""
    rows = []
    for label, ex, conf, score in zip(
        pred.labels.tolist(), pred.exits.tolist(), pred.confidences.tolist(), pred.scores.tolist(), strict=True
    ):
        rows.append({
            "label": int(label),
            "class": classes[label] if classes is not None and 0 <= label < len(classes) else None,
            "exit": int(ex),
            "confidence": float(conf),
            "score": float(score),
            "entry": entry,
        })  # fmt: skip
    return rows


def _json(payload: Any, status: int = 200) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(payload, status_code=status)


def _error(status: int, kind: str, message: str) -> Any:
    return _json({"error": {"status": status, "kind": kind, "message": message}}, status)


class EdgePerceiverModel:
    """A bundle's early-exit model behind HTTP (the class Ray Serve turns into replicas)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.runner: Runner = load(
            config.bundle, config.entry, thresholds=config.thresholds, threads=config.threads,
            batch_size=config.max_batch,
        )  # fmt: skip
        self.entry = self.runner.entry.key
        self.metrics = ServeMetrics(self.entry)
        batcher: Any = self._predict_batch
        batcher.set_max_batch_size(config.max_batch)
        batcher.set_batch_wait_timeout_s(config.batch_wait_ms / 1000.0)
        self._prefix = config.route_prefix.rstrip("/")
        self._started = time.time()
        # one thread runs every batch: engines that keep per-thread state (OpenVINO's infer
        # requests) set it up once, and batches never compete with each other for the cores
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgeperceiver-runner")
        self._rng = np.random.default_rng(0)  # draws forced exits (config.exit_mix) on the runner thread
        self._warm_up()
        self._replica: str | None
        try:
            self._replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # outside a replica (direct use in tests)
            self._replica = None

    def _warm_up(self) -> None:
        """Every batch size 1..max_batch through every segment, on the runner's thread.

        Engines set up per batch size (OpenVINO compiles a static-shape model for each one
        it meets, and compaction meets them all); without this the first minutes of traffic
        pay those compilations. The replica is ready only after it.
        """
        dims = self.runner.manifest.input.shape[1:]
        if not all(isinstance(d, int) for d in dims):
            return
        x = np.zeros((self.config.max_batch, *(int(d) for d in dims)), dtype=np.dtype(self.runner.manifest.input.dtype))
        off = [None] * self.runner.num_exits
        for b in range(1, self.config.max_batch + 1):
            self._pool.submit(self.runner.predict, x[:b], thresholds=off).result()

    # ------------------------------------------------------------------ health
    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica without a runner is restarted."""
        if self.runner is None or not self.runner.sessions:
            raise RuntimeError("the runner is not loaded")

    def info(self) -> dict[str, Any]:
        th = self.runner.thresholds
        return {
            "status": "ready",
            "entry": self.entry,
            "model": self.runner.manifest.model_name,
            "exits": self.runner.num_exits,
            "criterion": self.runner.criterion.value,
            "thresholds": None if th is None else list(th.values),
            "input": {"shape": list(self.runner.manifest.input.shape), "dtype": self.runner.manifest.input.dtype},
            "classes": None if self.runner.classes is None else list(self.runner.classes),
            "exit_mix": None if self.config.exit_mix is None else list(self.config.exit_mix),
            "max_batch": self.config.max_batch,
            "max_body_bytes": self.config.max_body_bytes,
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.metrics.summary(),
            "entry": self.entry,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "replica": self._replica,
            "uptime_s": round(time.time() - self._started, 3),
        }

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Any) -> Any:
        path = request.url.path
        if self._prefix and path.startswith(self._prefix):
            path = path[len(self._prefix):]
        path = path.rstrip("/") or "/"
        method = request.method
        routes = {"/predict": "POST", "/": "POST", "/healthz": "GET", "/readyz": "GET", "/stats": "GET"}
        if path not in routes:
            return _error(404, "not_found", f"no route {request.url.path!r}: use POST /predict, GET /healthz, "
                          "GET /readyz or GET /stats")  # fmt: skip
        if method != routes[path]:
            return _error(405, "method_not_allowed", f"{path} takes {routes[path]}, not {method}")
        if path == "/healthz":
            return _json({"status": "ok"})
        if path == "/readyz":
            return _json(self.info())
        if path == "/stats":
            return _json(self.stats())
        return await self._predict(request)

    async def _predict(self, request: Any) -> Any:
        try:
            body = await self._read_body(request)
            decoded = decode_body(
                body, request.headers.get("content-type"), self.runner.manifest.preprocess,
                max_samples=self.config.max_samples,
            )  # fmt: skip
            x = self.runner.check_input(decoded.x)
            rows = await self._predict_batch(x)
        except RequestError as exc:
            self.metrics.request(exc.status, exc.kind)
            return _error(exc.status, exc.kind, str(exc))
        except InputError as exc:
            self.metrics.request(400, "invalid_input")
            return _error(400, "invalid_input", str(exc))
        except EdgePerceiverError as exc:
            self.metrics.request(500, "model_error")
            return _error(500, "model_error", str(exc))
        except Exception as exc:
            self.metrics.request(500, "internal")
            return _error(500, "internal", f"{type(exc).__name__}: {exc}")
        self.metrics.request(200)
        if decoded.single:
            return _json(rows[0])
        return _json({"entry": self.entry, "predictions": rows})

    async def _read_body(self, request: Any) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(f"bad Content-Length {declared!r}") from None
            if size > limit:
                raise RequestError(
                    f"body of {size} bytes is over the limit of {limit} bytes", status=413, kind="body_too_large"
                )
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise RequestError(f"body is over the limit of {limit} bytes", status=413, kind="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ batching
    def _run(self, xs: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        sizes = [x.shape[0] for x in xs]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        forced: np.ndarray | None = None
        if self.config.exit_mix is not None:
            draws = self._rng.choice(len(self.config.exit_mix), size=x.shape[0], p=self.config.exit_mix)
            forced = np.asarray(draws, dtype=np.int64) + 1
        t0 = time.perf_counter()
        pred = self.runner.predict(x, force_exits=forced)
        self.metrics.batch(pred.exits, time.perf_counter() - t0)
        rows = prediction_rows(pred, self.runner.classes, self.entry)
        out, start = [], 0
        for n in sizes:
            out.append(rows[start : start + n])
            start += n
        return out

    # the sizes here are replaced per replica from the config (set_max_batch_size ...)
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _predict_batch(self, xs: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, xs)


def build_app(config: ServeConfig) -> Any:
    """The Ray Serve application (``serve.run`` it) for ``config``."""
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=config.replicas,
        max_ongoing_requests=max(2 * config.max_batch, 32),
        ray_actor_options={"num_cpus": config.replica_cpus},
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        logging_config={"log_level": "WARNING", "enable_access_log": config.access_log},
    )(EdgePerceiverModel)
    return deployment.bind(config)


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files and KubeRay (``import_path: ...:app_builder``).

    ``args`` holds :class:`ServeConfig` fields (``bundle`` required; ``thresholds`` a list
    with ``null`` for an exit turned off).
    """
    options = dict(args)
    if "bundle" not in options:
        raise InputError("the application's args need 'bundle': the bundle directory on every node")
    if options.get("thresholds") is not None:
        options["thresholds"] = tuple(options["thresholds"])
    return build_app(ServeConfig.for_bundle(options.pop("bundle"), **options))
