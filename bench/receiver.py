"""A do-nothing OTLP/HTTP trace receiver that only counts spans, per service.name.

Standard library only: the protobuf is walked just enough to find each
ResourceSpans' ``service.name`` and count the spans under it, so the runner
needs none of the benchmarked packages. It answers ``200`` with an empty
``ExportTraceServiceResponse`` (HTTP/1.1 keep-alive), accepts gzip/deflate bodies.

    with SpanCounter() as rx:
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = rx.endpoint
        ...
        rx.count("bench-svc-1")    # spans received for that service.name
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, Tuple


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def fields(buf: bytes) -> Iterator[Tuple[int, int, object]]:
    """Yield (field number, wire type, value); LEN values are ``bytes`` slices."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i : i + length], i + length
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _service_name(resource: bytes) -> str:
    for number, wire, kv in fields(resource):
        if number != 1 or wire != 2:  # Resource.attributes
            continue
        key = value = None
        for n2, w2, v2 in fields(kv):  # KeyValue
            if n2 == 1:
                key = bytes(v2).decode("utf-8", "replace")
            elif n2 == 2:
                value = v2
        if key == "service.name" and value is not None:
            for n3, w3, v3 in fields(value):  # AnyValue.string_value
                if n3 == 1 and w3 == 2:
                    return bytes(v3).decode("utf-8", "replace")
    return ""


def count_spans(body: bytes) -> Dict[str, int]:
    """{service.name: spans} in one ExportTraceServiceRequest."""
    counts: Dict[str, int] = defaultdict(int)
    for number, wire, resource_spans in fields(body):
        if number != 1 or wire != 2:
            continue
        service, spans = "", 0
        for n2, w2, v2 in fields(resource_spans):
            if n2 == 1 and w2 == 2:
                service = _service_name(v2)
            elif n2 == 2 and w2 == 2:  # ScopeSpans
                spans += sum(1 for n3, w3, _ in fields(v2) if n3 == 2 and w3 == 2)
        counts[service] += spans
    return counts


class SpanCounter:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self.spans: Dict[str, int] = defaultdict(int)
        self.requests = 0
        self.errors = 0
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    counts = count_spans(body)
                except Exception:
                    with counter._lock:
                        counter.errors += 1
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with counter._lock:
                    counter.requests += 1
                    for service, n in counts.items():
                        counter.spans[service] += n
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://{host}:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, name="span-counter", daemon=True)

    def __enter__(self) -> "SpanCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, service: str) -> int:
        with self._lock:
            return self.spans.get(service, 0)


if __name__ == "__main__":  # manual use: python bench/receiver.py [port]
    import sys
    import time

    with SpanCounter(port=int(sys.argv[1]) if len(sys.argv) > 1 else 4318) as rx:
        print("listening on", rx.endpoint)
        try:
            while True:
                time.sleep(5)
                print(dict(rx.spans), "requests:", rx.requests, "errors:", rx.errors)
        except KeyboardInterrupt:
            pass
