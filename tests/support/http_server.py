"""A real threaded HTTP/1.1 server on 127.0.0.1 for the tests of HTTP *client* instrumentors.

One server serves the requests, httpx, aiohttp, urllib3 and http.client tests
alike: it answers over a real socket (keep-alive, real status lines, real
redirects, a body that really arrives late) and records what each request
carried, so a test can check the ``traceparent`` a client injected.

    from tests.support.http_server import HTTPTestServer

    with HTTPTestServer() as server:
        requests.get(server.url("/status/404"))
        assert "traceparent" in server.headers_for("/status/404")[-1]

or, as a pytest fixture (module scope)::

    from tests.support.http_server import http_server  # noqa: F401  (the fixture)

    def test_x(http_server): ...

``server.url`` is the base URL (``http://127.0.0.1:<port>``) and also a
callable: ``server.url("/ok")`` == ``server.url + "/ok"``.

Routes (any method; routing ignores the query string; a request body is read
-- ``Content-Length`` or chunked -- and discarded):

=========================  =====================================================
``/status/<code>``         reply ``<code>`` (body ``ok``, none for HEAD/1xx/204/304)
``/redirect/<n>``          302 to ``/redirect/<n-1>``; ``/redirect/1`` goes to ``/ok``
``/flaky/<key>/<n>``       503 for the first ``<n>`` requests with this ``<key>``, then 200
``/slow[/<seconds>]``      wait (default 1 s), then 200
``/stream``                200, ``abcdef`` in 3 chunks 0.15 s apart (``Content-Length: 6``)
``/chunked``               the same with ``Transfer-Encoding: chunked``
``/headers``               200 with ``X-Resp: r1`` and ``Set-Cookie: sid=secret``
``/echo``                  200, the received headers as a JSON object (names lower-cased)
anything else              200, body ``hello``
=========================  =====================================================

Every request is recorded in :attr:`HTTPTestServer.seen` as ``(path with query,
{lower-cased header name: value})``; :meth:`HTTPTestServer.headers_for` filters it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

__all__ = ["HTTPTestServer", "http_server"]

#: The chunks of ``/stream`` and ``/chunked`` and the pause before each.
STREAM_CHUNKS = (b"ab", b"cd", b"ef")
STREAM_PAUSE_S = 0.15


class BaseURL(str):
    """The server's base URL; ``base("/path")`` is ``base + "/path"``."""

    def __call__(self, path: str = "") -> str:
        return str(self) + path


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # A client that gave up (timeouts, closed streams) is part of the tests, not an error.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class HTTPTestServer:
    """The server; started on construction, stopped by :meth:`stop` or on leaving ``with``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.seen: List[Tuple[str, Dict[str, str]]] = []
        self.counts: Dict[str, int] = {}
        self.lock = threading.Lock()
        self.httpd = _QuietServer((host, port), _handler_for(self))
        threading.Thread(target=self.httpd.serve_forever, name="http-test-server", daemon=True).start()
        self.host = host
        self.port: int = self.httpd.server_address[1]
        self.url = BaseURL(f"http://{host}:{self.port}")

    def headers_for(self, path: str) -> List[Dict[str, str]]:
        """Headers of each request received for ``path`` (with its query string), oldest first."""
        with self.lock:
            return [headers for seen_path, headers in self.seen if seen_path == path]

    def clear(self) -> None:
        """Forget the requests seen and the ``/flaky`` counters."""
        with self.lock:
            self.seen.clear()
            self.counts.clear()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "HTTPTestServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@pytest.fixture(scope="module")
def http_server() -> Iterator[HTTPTestServer]:
    """One :class:`HTTPTestServer` per test module."""
    with HTTPTestServer() as server:
        yield server


def _handler_for(server: HTTPTestServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, status: int, body: bytes = b"ok", headers: Optional[Dict[str, str]] = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            bodiless = self.command == "HEAD" or status < 200 or status in (204, 304)
            if status >= 200 and status not in (204, 304):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not bodiless:
                self.wfile.write(body)

        def read_body(self) -> None:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    self.rfile.read(size + 2)  # the chunk and its CRLF
                    if size == 0:
                        break
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)

        def handle_one(self) -> None:
            self.read_body()
            with server.lock:
                server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            parts = self.path.split("?")[0].strip("/").split("/")
            route = parts[0]
            if route == "status":
                self.reply(int(parts[1]))
            elif route == "redirect":
                left = int(parts[1])
                self.reply(302, b"", {"Location": f"/redirect/{left - 1}" if left > 1 else "/ok"})
            elif route == "flaky":
                with server.lock:
                    count = server.counts[parts[1]] = server.counts.get(parts[1], 0) + 1
                self.reply(503 if count <= int(parts[2]) else 200)
            elif route == "slow":
                time.sleep(float(parts[1]) if len(parts) > 1 else 1.0)
                self.reply(200)
            elif route in ("stream", "chunked"):
                self.stream(chunked=route == "chunked")
            elif route == "headers":
                self.reply(200, b"ok", {"X-Resp": "r1", "Set-Cookie": "sid=secret"})
            elif route == "echo":
                body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
                self.reply(200, body, {"Content-Type": "application/json"})
            else:
                self.reply(200, b"hello")

        def stream(self, chunked: bool) -> None:
            self.send_response(200)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(sum(len(c) for c in STREAM_CHUNKS)))
            self.end_headers()
            if self.command == "HEAD":
                return
            for chunk in STREAM_CHUNKS:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                self.wfile.flush()
                time.sleep(STREAM_PAUSE_S)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_PURGE = handle_one

    return Handler
