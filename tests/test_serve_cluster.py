"""A two-node Ray cluster on this machine (Ray's local test cluster) serves the same answers.

Each node offers one CPU and each replica reserves one, so the two replicas land on
different nodes; HAProxy on the head node sends requests to both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve import assert_png_load_matches, digits_bundle, free_port, heldout_case

pytest.importorskip("onnxruntime")
pytest.importorskip("PIL.Image")

from edgeperceiver.apps.serve import Client, ServeConfig
from edgeperceiver.apps.serve.launch import HAPROXY_ENV

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """The digits bundle served by two replicas on a two-node local cluster; URL, bundle, images."""
    pytest.importorskip("ray.serve")
    import ray
    from ray.cluster_utils import Cluster

    from edgeperceiver.apps.serve import start, stop

    bundle, heldout = digits_bundle(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HAPROXY_ENV, "1")  # the nodes' processes read it when they start
        # everything on the loopback address: Ray otherwise turns "127.0.0.1" in an address
        # into this machine's network address (the variable for the nodes, the constant here)
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": LOOPBACK, "include_dashboard": False,
        })  # fmt: skip
        try:
            cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            cfg = ServeConfig.for_bundle(bundle, replicas=2, replica_cpus=1, max_batch=16, name="digits2",
                                         route_prefix="/digits2")  # fmt: skip
            url = start(cfg, address=cluster.address, port=free_port(), proxy_location="HeadOnly", ready_timeout=180)
            yield url, bundle, heldout
        finally:
            stop()
            cluster.shutdown()


@pytest.mark.slow
def test_replicas_on_both_nodes_serve_the_same_answers(two_nodes: tuple[str, Path, Path]) -> None:
    import ray

    url, bundle, heldout = two_nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    want, bodies = heldout_case(bundle, heldout, 300)
    client = Client(url, timeout=60)
    assert_png_load_matches(client, want, bodies, 600, 8, time_limit=180)
    # both replicas, one per node, answered part of the load
    latest: dict[int, dict[str, object]] = {}
    for _ in range(60):
        s = client.stats()
        latest[int(s["pid"])] = s
        if len(latest) == 2:
            break
    assert len(latest) == 2, f"saw replicas {sorted(latest)}"
    assert len({s["node_id"] for s in latest.values()}) == 2, "both replicas run on one node"
    served = [sum(s["exit_samples"].values()) for s in latest.values()]  # type: ignore[attr-defined]
    assert all(k > 0 for k in served), f"samples per replica: {served}"
