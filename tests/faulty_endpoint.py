"""An S3 endpoint on 127.0.0.1 that breaks on cue: an HTTP proxy in front of moto that, after a trigger
request, refuses connections (endpoint down) or answers every request with 503 SlowDown.

Moto keeps its objects in memory, so stopping moto itself would also wipe the evidence; breaking the
proxy instead leaves moto's state intact for the test to inspect and for a resumed run to finish.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)


@dataclass
class Seen:
    """One request that reached the proxy."""

    at: float
    method: str
    path: str
    status: int


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _relay(self) -> None:
        endpoint = self.server.endpoint
        body = self._body()
        if endpoint.broken:
            if endpoint.fault == "refused":  # an established keep-alive connection dies with the endpoint
                self.close_connection = True
                return
            self._answer(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(endpoint.upstream.hostname, endpoint.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            reply = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
        finally:
            upstream.close()
        self._answer(response.status, reply, payload)
        if endpoint.trigger(self.command, self.path):
            endpoint.break_now()

    def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.server.endpoint.seen.append(Seen(time.monotonic(), self.command, self.path, status))
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() != "content-length" or self.command == "HEAD":
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    endpoint: FaultyEndpoint


class FaultyEndpoint:
    """Relays to upstream until trigger(method, path) matches a request, then fails as `fault` says."""

    def __init__(self, upstream: str, trigger: Callable[[str, str], bool], fault: str) -> None:
        assert fault in ("refused", "503"), fault
        self.upstream = urlsplit(upstream)
        self.trigger = trigger
        self.fault = fault
        self.broken = False
        self.broke_at: float | None = None
        self.seen: list[Seen] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.endpoint = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_listening()

    def break_now(self) -> None:
        self.broken, self.broke_at = True, time.monotonic()
        if self.fault == "refused":
            # shutdown() waits for serve_forever, which waits for this handler: close from another thread
            threading.Thread(target=self._stop_listening, daemon=True).start()

    def _stop_listening(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def after_break(self) -> list[Seen]:
        """The requests answered after the fault began."""
        return [s for s in self.seen if self.broke_at is not None and s.at >= self.broke_at]
