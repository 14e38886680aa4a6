"""The master's HTTP endpoint (Mooncake's ``--metrics_port``, default 9003).

Routes: ``/metrics`` (Prometheus text), ``/metrics/summary``, ``/health``, ``/query_key?key=``,
``/batch_query_keys?keys=a,b``, ``/get_all_keys``, ``/get_all_segments``, ``/get_segments_detail``,
``/query_segment?segment=``, and Umbra's ``/inspect`` (one JSON snapshot for checkers).

``/query_key`` reads metadata without granting a lease. Mooncake v0.3.5 implemented it with
GetReplicaList, so looking at a key over HTTP pinned it for a lease TTL and made a Remove fail with
OBJECT_HAS_LEASE — a trap for anyone debugging an eviction problem. Nothing here changes state.

stdlib ``ThreadingHTTPServer`` in one daemon thread: scrapes are rare and read under the state
lock, which is never held across a failpoint, so a paused RPC cannot hang ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from store.errors import ErrorCode
from store.master.metrics import make_registry, summary_line
from store.master.service import MasterService

log = logging.getLogger("store.master.http")


def jsonable(value: Any) -> Any:
    """JSON has no infinity and no bytes: non-finite floats become null, bytes hex strings (an
    opaque ``transport`` dict may carry raw GIDs)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


class MasterHttpServer:
    def __init__(self, service: MasterService, host: str, port: int) -> None:
        self.service = service
        self.registry = make_registry(service)
        handler = type("Handler", (_Handler,), {"master": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="master-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    master: MasterHttpServer
    server_version = "umbra-master"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(jsonable(value)).encode(), "application/json")

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        svc = self.master.service
        route = url.path.rstrip("/") or "/"
        if route == "/metrics":
            self._send(200, generate_latest(self.master.registry), CONTENT_TYPE_LATEST)
        elif route == "/metrics/summary":
            self._text(200, summary_line(svc) + "\n")
        elif route == "/health":
            self._json(200, {"status": "ok", "role": "leader", "view_version": svc.view_version})
        elif route == "/query_key":
            key = q.get("key")
            if not key:
                self._json(400, {"error_code": int(ErrorCode.INVALID_PARAMS), "error": "missing ?key="})
                return
            info = svc.query_key(key)
            if info is None:
                self._json(404, {"error_code": int(ErrorCode.OBJECT_NOT_FOUND), "key": key})
            else:
                self._json(200, info)
        elif route == "/batch_query_keys":
            keys = [k for k in q.get("keys", "").split(",") if k]
            self._json(200, {k: svc.query_key(k) for k in keys})
        elif route == "/get_all_keys":
            self._text(200, "".join(k + "\n" for k in svc.all_keys()))
        elif route == "/get_all_segments":
            self._text(200, "".join(s["name"] + "\n" for s in svc.inspect_segments()))
        elif route == "/get_segments_detail":
            self._json(200, svc.inspect_segments())
        elif route == "/query_segment":
            name = q.get("segment", "")
            found = [s for s in svc.inspect_segments() if name in (s["name"], s["id"])]
            if found:
                self._json(200, found)
            else:
                self._json(404, {"error_code": int(ErrorCode.SEGMENT_NOT_FOUND), "segment": name})
        elif route == "/inspect":
            self._json(200, svc.snapshot())
        else:
            self._json(404, {"error": f"no route {url.path}"})
