"""The Mooncake-compatible client, unchanged, with ``protocol="rdma", device_name=<device>``.

A master process, two segment-holding client processes and this process as a pure client
(``global_segment_size=0``): every byte of a put or get crosses RDMA between processes. Values are
checked byte for byte; the RDMA counters are read from the client's metrics HTTP port
(``client_http_port``).
"""

from __future__ import annotations

import socket
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from rdma_helpers import verbs  # noqa: F401 - skips this module when pyverbs is missing

from store.client import Client, ReplicateConfig
from store.transfer.memory import MemoryRegion

pytestmark = [pytest.mark.rdma, pytest.mark.timeout(600)]

MiB = 1 << 20
SIZES = [1, 4095, 65536, MiB + 3, 16 * MiB]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def value(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


@pytest.fixture(scope="module")
def rdma_cluster(rdma_target):
    tests_dir = str(Path(__file__).resolve().parents[1])  # client_helpers lives in tests/
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from client_helpers import cluster

    with cluster(holders=0) as c:
        for _ in range(2):
            c.add_holder(segment_size="64mb", protocol="rdma", device_name=rdma_target.device)
        port = _free_port()
        client = Client()
        rc = client.setup("127.0.0.1", "P2PHANDSHAKE", 0, 48 * MiB, "rdma", rdma_target.device, c.address,
                          enable_client_http_server=True, client_http_port=port)
        assert rc == 0
        c.clients.append(client)
        yield c, client, port


def test_put_get_every_size_over_rdma(rdma_cluster):
    _, client, _ = rdma_cluster
    assert client.engine is not None and client.engine.protocol == "rdma"
    for i, n in enumerate(SIZES):
        v = value(100 + i, n)
        key = f"rdma-{n}"
        assert client.put(key, v) == 0, n
        assert client.get(key) == v, n
        assert client.remove(key, force=True) == 0
    t = client.engine.transport("rdma")
    assert t.stats()["connected"] >= 1
    assert t.metrics.value("umbra_rdma_completions", device=t.device, status="IBV_WC_SUCCESS") > 0


def test_batches_and_zero_copy_over_rdma(rdma_cluster):
    _, client, _ = rdma_cluster
    keys = [f"rb-{i}" for i in range(8)]
    values = [value(200 + i, 1 + 91_000 * i) for i in range(8)]
    assert client.put_batch(keys, values) == 0
    assert client.get_batch(keys) == values
    region = MemoryRegion(8 * MiB)
    try:
        assert client.register_buffer(region.addr, region.length) == 0
        arr = region.numpy()
        sizes = [4096, 65536, MiB, 3 * MiB]
        offs = [0, 4096, 4096 + 65536, 4096 + 65536 + MiB]
        blob = np.frombuffer(value(299, sum(sizes)), np.uint8)
        arr[: sum(sizes)] = blob
        bkeys = [f"rbz-{i}" for i in range(4)]
        assert client.batch_put_from(bkeys, [region.addr + o for o in offs], sizes) == [0] * 4
        arr[: sum(sizes)] = 0
        assert client.batch_get_into(bkeys, [region.addr + o for o in offs], sizes) == sizes
        assert bytes(arr[: sum(sizes)]) == blob.tobytes()
        del arr
        assert client.unregister_buffer(region.addr) == 0
    finally:
        region.close()
    for k in keys + [f"rbz-{i}" for i in range(4)]:
        client.remove(k, force=True)


def test_two_replicas_over_rdma_and_metrics_on_the_client_port(rdma_cluster):
    c, client, port = rdma_cluster
    v = value(7, 2 * MiB + 5)
    assert client.put("rdma-rep2", v, ReplicateConfig(replica_num=2)) == 0
    reps = client.get_replica_desc("rdma-rep2")
    assert {r["segment_name"] for r in reps} == {h.segment_name for h in c.holders}
    assert client.get("rdma-rep2") == v
    assert client.remove("rdma-rep2", force=True) == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    assert "umbra_rdma_completions_total" in text and 'status="IBV_WC_SUCCESS"' in text
    assert "umbra_rdma_handshakes_total" in text
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).read() == b"OK"
