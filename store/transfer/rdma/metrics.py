"""Prometheus counters of the RDMA transport and the client's optional metrics HTTP port.

Each :class:`RdmaMetrics` owns its own ``CollectorRegistry`` (never the global default one), so two
transports in one test process do not share or clash on counters. The client exposes whichever
registries it holds on Mooncake's ``client_http_port`` with :func:`serve_metrics`.

Counters (all labelled with ``device``):

- ``umbra_rdma_completions_total{status}``: work completions by libibverbs status name
- ``umbra_rdma_async_events_total{event,source}``: async events by type; source real/injected
- ``umbra_rdma_endpoint_errors_total{peer,status}``: endpoint faults (one per faulted QP burst)
- ``umbra_rdma_device_errors_total{status}``: the same, summed per device
- ``umbra_rdma_reconnects_total{peer}``, ``umbra_rdma_slice_retries_total{peer}``,
  ``umbra_rdma_paths_paused_total{peer}``, ``umbra_rdma_handshakes_total{role,result}``,
  ``umbra_rdma_slices_failed_total{reason}``, ``umbra_rdma_bytes_total{opcode}``
- gauges ``umbra_rdma_outstanding_wrs``, ``umbra_rdma_endpoints{role}``, ``umbra_rdma_paused_paths``
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)


class RdmaMetrics:
    """The transport's counters in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.completions = Counter("umbra_rdma_completions", "Work completions by status",
                                   ["device", "status"], registry=r)
        self.async_events = Counter("umbra_rdma_async_events", "Async events by type",
                                    ["device", "event", "source"], registry=r)
        self.endpoint_errors = Counter("umbra_rdma_endpoint_errors", "Endpoint faults by status",
                                       ["device", "peer", "status"], registry=r)
        self.device_errors = Counter("umbra_rdma_device_errors", "Endpoint faults per device by status",
                                     ["device", "status"], registry=r)
        self.reconnects = Counter("umbra_rdma_reconnects", "Endpoint (re)connections after a fault",
                                  ["device", "peer"], registry=r)
        self.retries = Counter("umbra_rdma_slice_retries", "Slices retried on a fresh QP",
                               ["device", "peer"], registry=r)
        self.paused = Counter("umbra_rdma_paths_paused", "Times a failing path was paused",
                              ["device", "peer"], registry=r)
        self.handshakes = Counter("umbra_rdma_handshakes", "QP handshakes by role and result",
                                  ["device", "role", "result"], registry=r)
        self.slices_failed = Counter("umbra_rdma_slices_failed", "Slices failed by reason",
                                     ["device", "reason"], registry=r)
        self.bytes = Counter("umbra_rdma_bytes", "Bytes moved by completed slices",
                             ["device", "opcode"], registry=r)
        self.outstanding = Gauge("umbra_rdma_outstanding_wrs", "Signaled WRs awaiting completion",
                                 ["device"], registry=r)
        self.endpoints = Gauge("umbra_rdma_endpoints", "Connected endpoints", ["device", "role"],
                               registry=r)
        self.paused_paths = Gauge("umbra_rdma_paused_paths", "Paths paused now", ["device"], registry=r)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (0 when absent); ``name`` with or without ``_total``."""
        for candidate in (name, name + "_total"):
            v = self.registry.get_sample_value(candidate, labels)
            if v is not None:
                return v
        return 0.0

    def snapshot(self) -> dict[str, float]:
        """Every sample as ``{'name{label="v",...}': value}`` (for stats() and checkers)."""
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name.endswith("_created"):
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


class _Merged:
    """A collector that yields the metrics of several registries (one scrape for the client)."""

    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self.registries = list(registries)

    def collect(self) -> Iterator[Metric]:
        for reg in self.registries:
            yield from reg.collect()


class MetricsServer:
    """A running ``/metrics`` + ``/health`` HTTP server; ``close()`` stops it."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(port: int, registries: Iterable[CollectorRegistry], host: str = "0.0.0.0",
                  health: Any = None) -> MetricsServer:
    """Serve the given registries on ``host:port`` (port 0 = any free port); Mooncake's
    ``client_http_port``. ``health`` is an optional callable returning a short status string."""
    merged = CollectorRegistry(auto_describe=False)
    merged.register(_Merged(registries))  # type: ignore[arg-type]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body = generate_latest(merged)
                ctype = CONTENT_TYPE_LATEST
            elif path == "/health":
                body = (str(health()) if callable(health) else "OK").encode()
                ctype = "text/plain; charset=utf-8"
            else:
                self.send_error(404, "only /metrics and /health")
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics http: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"metrics-http-{port}", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
