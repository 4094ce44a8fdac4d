"""Serving a bundle on Ray Serve: request decoding, the HTTP API, batching, bad input, load.

The fast tests serve the toy bundle (tests/bundles.py) on a real one-machine Ray instance;
the slow ones serve the shipped digits model, exported and calibrated once per session,
with two replicas: 2,000 image requests at concurrency 16 against ``Runner.predict``,
bad input under load, and a replica killed under load.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundles import make_toy_bundle, toy_inputs

from edgeperceiver.errors import BundleError, InputError

pytest.importorskip("onnxruntime")
Image = pytest.importorskip("PIL.Image")

from edgeperceiver.apps.serve import Client, ServeConfig, ServiceError  # noqa: E402
from edgeperceiver.apps.serve.decode import RequestError, decode_body  # noqa: E402
from edgeperceiver.bundle import Preprocess  # noqa: E402
from edgeperceiver.runtime import load  # noqa: E402
from edgeperceiver.runtime.preprocess import load_image  # noqa: E402

TOY_PRE = Preprocess(size=(8, 8), resize=None, mean=(0.5,) * 3, std=(0.25,) * 3, channels=3)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_pngs(dest: Path, n: int, size: int = 8, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = dest / f"{i:03d}.png"
        p.write_bytes(png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        paths.append(p)
    return paths


def raw_post(url: str, path: str, body: bytes, content_type: str, timeout: float = 30.0) -> tuple[int, Any]:
    """POST without the client's conveniences: the status and the JSON answer."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    prefix = "/" + url.split("//", 1)[1].split("/", 1)[1] if url.count("/") > 2 else ""
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", prefix.rstrip("/") + path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def hammer(
    call: Callable[[int], Any], n: int, concurrency: int, time_limit: float
) -> tuple[list[Any], list[BaseException]]:
    """``call(i)`` for i < n on ``concurrency`` threads, stopping new calls after ``time_limit`` s.

    Returns the answers (None where not called or failed) and the exceptions raised.
    """
    out: list[Any] = [None] * n
    errors: list[BaseException] = []
    deadline = time.monotonic() + time_limit

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            errors.append(TimeoutError(f"request {i} not sent: over {time_limit} s"))
            return
        try:
            out[i] = call(i)
        except BaseException as exc:
            errors.append(exc)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return out, errors


def assert_same(answers: Sequence[dict[str, Any]], labels: np.ndarray, exits: np.ndarray) -> None:
    got_l = np.array([a["label"] for a in answers])
    got_e = np.array([a["exit"] for a in answers])
    bad = np.flatnonzero((got_l != labels) | (got_e != exits))
    assert bad.size == 0, f"{bad.size} answers differ from Runner.predict, first at {bad[:5]}"


def assert_png_load_matches(
    client: Any, want: Any, bodies: Sequence[bytes], n: int, concurrency: int, time_limit: float
) -> list[dict[str, Any]]:
    """``n`` PNG requests (the bodies in turn) on ``concurrency`` threads: none fails, each answer
    equals ``want`` (``Runner.predict`` on the same images); returns the answers."""
    answers, errors = hammer(lambda i: client.predict(bodies[i % len(bodies)], "image/png"), n, concurrency,
                             time_limit=time_limit)  # fmt: skip
    assert errors == [], errors[:3]
    idx = np.arange(n) % len(bodies)
    assert_same(answers, want.labels[idx], want.exits[idx])
    return answers


# --------------------------------------------------------------------------- decoding (no Ray)


def test_png_body_is_preprocessed_like_the_file(tmp_path: Path) -> None:
    (path,) = write_pngs(tmp_path, 1, size=11)
    d = decode_body(path.read_bytes(), "image/png", TOY_PRE, max_samples=4)
    assert d.single and d.x.shape == (3, 8, 8)
    np.testing.assert_array_equal(d.x, load_image(path, TOY_PRE))


def test_json_and_npy_bodies() -> None:
    x = toy_inputs(3)
    d = decode_body(json.dumps({"inputs": x.tolist()}).encode(), "application/json; charset=utf-8", TOY_PRE,
                    max_samples=4)  # fmt: skip
    assert not d.single and d.x.dtype == np.float32
    np.testing.assert_allclose(d.x, x, rtol=1e-6)
    buf = io.BytesIO()
    np.save(buf, x[0])
    d = decode_body(buf.getvalue(), "application/x-npy", TOY_PRE, max_samples=4)
    assert d.single
    np.testing.assert_array_equal(d.x, x[0])


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "ctype", "status", "kind", "words"),
    [
        (b"\x89PNG\r\n\x1a\nnot really", "image/png", 400, "undecodable_image", "image/png body"),
        (b"", "image/png", 400, "empty_body", "empty"),
        (b"hello", "text/plain", 415, "unsupported_media_type", "text/plain"),
        (b"{not json", "application/json", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "invalid_json", '"inputs"'),
        (b'{"inputs": [[1, 2], [3]]}', "application/json", 400, "wrong_shape", "rectangular"),
        (b'{"inputs": [["a", "b"]]}', "application/json", 400, "wrong_dtype", "numbers"),
        (b'{"inputs": [1, 2, 3]}', "application/json", 400, "wrong_shape", "(C, H, W)"),
        (json.dumps({"inputs": np.zeros((5, 3, 8, 8)).tolist()}).encode(), "application/json", 413,
         "too_many_samples", "limit is 4"),
        (_npy(np.zeros((3, 8, 8), np.uint8)), "application/x-npy", 400, "wrong_dtype", "uint8"),
        (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "application/x-npy", 400, "invalid_npy",
         "not a .npy"),
    ],
)  # fmt: skip
def test_bad_bodies_are_refused(body: bytes, ctype: str, status: int, kind: str, words: str) -> None:
    with pytest.raises(RequestError) as info:
        decode_body(body, ctype, TOY_PRE, max_samples=4)
    assert (info.value.status, info.value.kind) == (status, kind)
    assert words in str(info.value)


def test_config_is_checked_against_the_bundle(tmp_path: Path) -> None:
    bundle = make_toy_bundle(tmp_path / "b", thresholds=[0.5, 0.5, None])
    with pytest.raises(BundleError, match="not a bundle"):
        ServeConfig.for_bundle(tmp_path / "missing")
    with pytest.raises(BundleError, match="no target 'openvino'"):
        ServeConfig.for_bundle(bundle, entry="openvino")
    with pytest.raises(InputError, match="2 thresholds for a model with 3 exits"):
        ServeConfig.for_bundle(bundle, thresholds=(0.5, None))
    with pytest.raises(InputError, match="max_batch"):
        ServeConfig.for_bundle(bundle, max_batch=0)
    with pytest.raises(InputError, match="2 proportions for a model with 3 exits"):
        ServeConfig.for_bundle(bundle, exit_mix=(0.5, 0.5))
    with pytest.raises(InputError, match="sum to 1"):
        ServeConfig.for_bundle(bundle, exit_mix=(0.5, 0.6, 0.0))
    cfg = ServeConfig.for_bundle(bundle, replicas=2)
    assert Path(cfg.bundle).is_absolute() and cfg.replicas == 2


def test_client_reports_an_unreachable_service() -> None:
    c = Client(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    with pytest.raises(ServiceError, match="ConnectionRefused") as info:
        c.health()
    assert info.value.status is None
    with pytest.raises(ServiceError, match="not an http"):
        Client("ftp://127.0.0.1/x")


def test_cli_serve_refuses_a_missing_bundle_before_starting_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("edgeperceiver")
    proc = subprocess.run([str(exe), "serve", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == BundleError.exit_code
    assert "is not a bundle" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_serve_answers_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """``edgeperceiver serve`` in its own process: ready, answers like the runner, exits 0 on SIGTERM."""
    import subprocess
    import sys

    pytest.importorskip("ray.serve")
    bundle = make_toy_bundle(tmp_path / "b", thresholds=[0.4, 0.36, None])
    port = free_port()
    exe = Path(sys.executable).with_name("edgeperceiver")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(exe), "serve", str(bundle), "--port", str(port), "--max-batch", "4",
                             "--replica-cpus", "0.5"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        client = Client(f"http://127.0.0.1:{port}", timeout=30)
        info = client.wait_ready(timeout=150)
        assert info["entry"] == "onnxruntime-fp32" and info["max_batch"] == 4
        x = toy_inputs(5, seed=11)
        want = load(bundle).predict(x)
        assert_same(client.predict_array(x)["predictions"], want.labels, want.exits)
        deadline = time.monotonic() + 60  # the command says it serves once its own readiness check passed
        while "Ctrl-C to stop" not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert f"POST http://127.0.0.1:{port}/predict" in text and "stopping" in text


# --------------------------------------------------------------------------- one Ray instance per module


@pytest.fixture(scope="module")
def ray_port() -> Iterator[int]:
    """A one-machine Ray instance (no dashboard) whose Serve proxy listens on a free loopback port."""
    pytest.importorskip("ray.serve")
    from edgeperceiver.apps.serve import stop

    METRICS_PORT.append(free_port())
    yield free_port()
    stop()


#: the Prometheus port of the module's Ray instance (chosen by ``ray_port``)
METRICS_PORT: list[int] = []


def _deploy(config: ServeConfig, port: int) -> str:
    from edgeperceiver.apps.serve import start

    return start(config, port=port, num_cpus=4, metrics_port=METRICS_PORT[-1], ready_timeout=120)


@pytest.fixture(scope="module")
def toy(ray_port: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The toy bundle served at /toy (small body limit); the service URL and the bundle."""
    bundle = make_toy_bundle(tmp_path_factory.mktemp("serve-toy") / "b", thresholds=[0.4, 0.36, None],
                             classes=list("abcde"))  # fmt: skip
    cfg = ServeConfig.for_bundle(bundle, max_batch=8, batch_wait_ms=5, name="toy", route_prefix="/toy",
                                 max_body_bytes=256 << 10, max_samples=32, replica_cpus=0.5)  # fmt: skip
    return _deploy(cfg, ray_port), bundle


def test_answers_equal_the_runner(toy: tuple[str, Path], tmp_path: Path) -> None:
    url, bundle = toy
    runner = load(bundle)
    paths = write_pngs(tmp_path / "imgs", 48, seed=3)
    _, want = runner.predict_files(paths)
    assert len(set(want.exits.tolist())) > 1, "the toy thresholds should give an exit mix"
    client = Client(url, timeout=30)
    answers, errors = hammer(lambda i: client.predict(paths[i]), len(paths), concurrency=8, time_limit=60)
    assert errors == []
    assert_same(answers, want.labels, want.exits)
    for a, conf in zip(answers, want.confidences, strict=True):
        assert a["class"] == "abcde"[a["label"]] and a["entry"] == "onnxruntime-fp32"
        assert a["confidence"] == pytest.approx(float(conf), rel=1e-4, abs=1e-6)
    # batched arrays: one request, one answer per sample, as .npy and as JSON
    x = toy_inputs(20, seed=5)
    want = runner.predict(x)
    for as_json in (False, True):
        got = client.predict_array(x, as_json=as_json)
        assert got["entry"] == "onnxruntime-fp32"
        assert_same(got["predictions"], want.labels, want.exits)
    stats = client.stats()
    assert stats["batches"] >= 1 and sum(stats["exit_samples"].values()) >= 48 + 40
    assert max(int(k) for k in stats["batch_sizes"]) > 1, "concurrent requests should share batches"


def test_health_readiness_and_routes(toy: tuple[str, Path]) -> None:
    url, _ = toy
    client = Client(url, timeout=30)
    assert client.health() == {"status": "ok"}
    info = client.ready()
    assert info["entry"] == "onnxruntime-fp32" and info["exits"] == 3
    assert info["thresholds"] == [0.4, 0.36, None] and info["classes"] == list("abcde")
    assert info["input"]["shape"] == ["batch", 3, 8, 8]
    with pytest.raises(ServiceError) as nf:
        client.request("GET", "/nope")
    assert (nf.value.status, nf.value.kind) == (404, "not_found")
    with pytest.raises(ServiceError) as na:
        client.request("GET", "/predict")
    assert (na.value.status, na.value.kind) == (405, "method_not_allowed")


def test_bad_requests_get_a_4xx_json_error(toy: tuple[str, Path]) -> None:
    url, _ = toy
    x = toy_inputs(1)[0]
    nan = x.copy()
    nan[1, 2, 3] = np.nan
    cases = [
        (b"GIF89a broken", "image/gif", 400, "undecodable_image", "not an image"),
        (_npy(np.zeros((3, 4, 4), np.float32)), "application/x-npy", 400, "invalid_input", "expected shape"),
        (_npy(np.zeros((1, 8, 8), np.float32)), "application/x-npy", 400, "invalid_input", "channel"),
        (_npy(x.astype(np.int32)), "application/x-npy", 400, "wrong_dtype", "int32"),
        (_npy(nan), "application/x-npy", 400, "invalid_input", "NaN"),
        (b'{"inputs": ' + json.dumps(x.tolist()).replace("0.", "NaN, 0.", 1).encode() + b"}", "application/json",
         400, "wrong_shape", "rectangular"),
        (b"\0" * (257 << 10), "image/png", 413, "body_too_large", "limit of 262144 bytes"),
        (b"x", "application/xml", 415, "unsupported_media_type", "application/xml"),
    ]  # fmt: skip
    for body, ctype, status, kind, words in cases:
        got_status, doc = raw_post(url, "/predict", body, ctype)
        assert got_status == status, (kind, doc)
        assert doc["error"]["kind"] == kind and doc["error"]["status"] == status
        assert words in doc["error"]["message"], doc
    # NaN through JSON (Python's json reads the literal) is named by the runner
    status, doc = raw_post(url, "/predict", json.dumps({"inputs": nan.tolist()}).encode(), "application/json")
    assert status == 400 and "NaN or inf" in doc["error"]["message"]
    # the replica is still up and counted every refusal
    client = Client(url)
    assert client.predict_array(x)["exit"] in (1, 2, 3)
    errors = client.stats()["errors"]
    assert errors.get("body_too_large", 0) >= 1 and errors.get("undecodable_image", 0) >= 1


def test_a_forced_exit_mix_sends_samples_to_the_drawn_exits(toy: tuple[str, Path], ray_port: int) -> None:
    _, bundle = toy
    cfg = ServeConfig.for_bundle(bundle, name="toymix", route_prefix="/toymix", exit_mix=(0.0, 1.0, 0.0),
                                 replica_cpus=0.25)  # fmt: skip
    client = Client(_deploy(cfg, ray_port), timeout=30)
    assert client.ready()["exit_mix"] == [0.0, 1.0, 0.0]
    got = client.predict_array(toy_inputs(12, seed=4))["predictions"]
    assert {a["exit"] for a in got} == {2}


@pytest.mark.slow
def test_prometheus_metrics_show_requests_errors_batches_and_exits(toy: tuple[str, Path]) -> None:
    import re
    import urllib.request

    url, _ = toy
    client = Client(url)
    client.predict_array(toy_inputs(6, seed=9))
    with pytest.raises(ServiceError):
        client.predict(b"not an image", "image/png")
    want = ["ray_edgeperceiver_requests_total", "ray_edgeperceiver_errors_total", "ray_edgeperceiver_batch_size_bucket",
            "ray_edgeperceiver_batch_seconds_bucket", "ray_edgeperceiver_exit_samples_total"]  # fmt: skip
    found: set[str] = set()
    deadline = time.monotonic() + 60  # replicas push metrics to the node's agent every few seconds
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT[-1]}/metrics", timeout=10).read().decode()
        found = {name for name in want if re.search(rf'^{name}{{[^}}]*application="toy"', text, re.M)}
        if found == set(want):
            break
        time.sleep(2)
    assert found == set(want), f"missing: {sorted(set(want) - found)}"
    assert re.search(r'^ray_edgeperceiver_errors_total{[^}]*kind="undecodable_image"', text, re.M)
    assert re.search(r'^ray_edgeperceiver_exit_samples_total{[^}]*exit="\d"', text, re.M)


# --------------------------------------------------------------------------- the digits model (slow)


def digits_bundle(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shipped digits model exported and calibrated (ONNX Runtime, max-drop 0.5) with its
    held-out images; built once per test session (~30 s) and shared by the serving tests."""
    root = factory.getbasetemp() / "serve-digits"
    bundle, heldout = root / "bundle", root / "heldout"
    if (root / "ready").is_file():
        return bundle, heldout
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import edgeperceiver.calibration as cal
    from edgeperceiver.datasets.digits import load_digits_split, write_imagefolder
    from edgeperceiver.export import export_checkpoint
    from edgeperceiver.models import DEMO_MODEL, demo_checkpoint, model_info

    split = load_digits_split(model_info(DEMO_MODEL).input_size)
    write_imagefolder(split.x_heldout, split.y_heldout, split.classes, heldout)
    export_checkpoint(demo_checkpoint(), bundle, labels=list(split.classes), overwrite=True)
    cal.calibrate(bundle, heldout, target="onnxruntime-fp32", goal=cal.MaxDrop(0.5), seed=0)
    (root / "ready").touch()
    return bundle, heldout


def heldout_images(heldout: Path) -> list[Path]:
    return sorted(heldout.rglob("*.png"))


def heldout_case(bundle: Path, heldout: Path, n: int | None = None) -> tuple[Any, list[bytes]]:
    """``Runner.predict`` on the first ``n`` held-out images (the expected answers), and their bytes."""
    paths = heldout_images(heldout)[:n]
    _, want = load(bundle).predict_files(paths)
    return want, [p.read_bytes() for p in paths]


@pytest.fixture(scope="module")
def digits(ray_port: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """The digits bundle served at /digits by two replicas; URL, bundle, held-out images."""
    bundle, heldout = digits_bundle(tmp_path_factory)
    cfg = ServeConfig.for_bundle(bundle, replicas=2, max_batch=16, batch_wait_ms=2, name="digits",
                                 route_prefix="/digits", replica_cpus=1, max_body_bytes=1 << 20)  # fmt: skip
    return _deploy(cfg, ray_port), bundle, heldout


@pytest.mark.slow
def test_2000_requests_at_concurrency_16_all_equal_the_runner(digits: tuple[str, Path, Path]) -> None:
    url, bundle, heldout = digits
    want, bodies = heldout_case(bundle, heldout)
    assert set(want.exits.tolist()) >= {1, 2}, "the calibrated thresholds should let samples leave early"
    answers = assert_png_load_matches(Client(url, timeout=60), want, bodies, 2000, 16, time_limit=240)
    assert {a["entry"] for a in answers} == {"onnxruntime-fp32"}


def _replica_pids(client: Client, want: int, tries: int = 100) -> dict[int, str]:
    """pid -> node of ``want`` distinct replicas, from /stats answers (bounded tries)."""
    seen: dict[int, str] = {}
    for _ in range(tries):
        s = client.stats()
        seen[s["pid"]] = s["node_id"]
        if len(seen) >= want:
            break
    return seen


@pytest.mark.slow
def test_bad_input_under_load_gets_4xx_and_the_load_keeps_succeeding(digits: tuple[str, Path, Path]) -> None:
    url, bundle, heldout = digits
    want, bodies = heldout_case(bundle, heldout, 200)
    client = Client(url, timeout=60)
    result: dict[str, Any] = {}

    def load_thread() -> None:
        result["answers"], result["errors"] = hammer(
            lambda i: client.predict(bodies[i % len(bodies)], "image/png"), 600, 8, time_limit=120
        )

    bg = threading.Thread(target=load_thread)
    bg.start()
    x = np.zeros((3, 32, 32), np.float32)
    nan = x.copy()
    nan[0, 0, 0] = np.nan
    bad = [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png", 400, "undecodable_image"),
        (_npy(np.zeros((3, 28, 28), np.float32)), "application/x-npy", 400, "invalid_input"),
        (_npy(x.astype(np.float16).view(np.int16)), "application/x-npy", 400, "wrong_dtype"),
        (json.dumps({"inputs": nan.tolist()}).encode(), "application/json", 400, "invalid_input"),
        (b"\xff" * ((1 << 20) + 1), "image/jpeg", 413, "body_too_large"),
    ]
    try:
        for _ in range(5):
            for body, ctype, status, kind in bad:
                got, doc = raw_post(url, "/predict", body, ctype)
                assert (got, doc["error"]["kind"]) == (status, kind), doc
    finally:
        bg.join(timeout=180)
    assert not bg.is_alive(), "the load did not finish"
    assert result["errors"] == [], result["errors"][:3]
    idx = np.arange(600) % len(bodies)
    assert_same(result["answers"], want.labels[idx], want.exits[idx])


@pytest.mark.slow
def test_a_killed_replica_leaves_no_request_hanging_and_is_replaced(digits: tuple[str, Path, Path]) -> None:
    url, bundle, heldout = digits
    want, bodies = heldout_case(bundle, heldout, 200)
    client = Client(url, timeout=30)
    pids = _replica_pids(client, 2)
    assert len(pids) == 2, f"expected two replicas, saw {pids}"
    victim = min(pids)
    n = 800
    result: dict[str, Any] = {}

    def load_thread() -> None:
        result["answers"], result["errors"] = hammer(
            lambda i: client.predict(bodies[i % len(bodies)], "image/png"), n, 8, time_limit=120
        )

    t0 = time.monotonic()
    bg = threading.Thread(target=load_thread)
    bg.start()
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    bg.join(timeout=200)
    assert not bg.is_alive(), "requests hung after a replica was killed"
    answers, errors = result["answers"], result["errors"]
    answered = [i for i, a in enumerate(answers) if a is not None]
    # every request was answered or failed with an error; none was left waiting
    assert len(answered) + len(errors) == n
    assert all(isinstance(e, ServiceError) for e in errors), errors[:3]
    assert len(errors) < n // 4, f"{len(errors)} of {n} requests failed"
    idx = np.array(answered) % len(bodies)
    assert_same([answers[i] for i in answered], want.labels[idx], want.exits[idx])
    # the service recovers: 20 requests in a row succeed within seconds, and Ray replaces the replica
    deadline = time.monotonic() + 60
    streak = 0
    while streak < 20 and time.monotonic() < deadline:
        try:
            client.predict(bodies[streak], "image/png")
            streak += 1
        except ServiceError:
            streak = 0
            time.sleep(0.2)
    assert streak == 20, "the service did not recover"
    deadline = time.monotonic() + 90
    replaced: dict[int, str] = {}
    while time.monotonic() < deadline:
        replaced = _replica_pids(client, 2, tries=40)
        if len(replaced) == 2 and victim not in replaced:
            break
        time.sleep(1.0)
    assert len(replaced) == 2 and victim not in replaced, f"replica not replaced after {time.monotonic() - t0:.0f} s"
