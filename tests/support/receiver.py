"""A real OTLP receiver for tests: HTTP/protobuf and gRPC, decoded with opentelemetry-proto.

It can be switched between behaviours during a run (``ok``, ``down``-like
``fail`` with a status code, ``slow``) so fault-tolerance tests use the same
receiver as the happy path.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes(pairs: Any) -> Dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: Dict[str, Any]
    status: str
    status_message: str
    events: List[Dict[str, Any]]
    links: List[Dict[str, Any]]
    resource: Dict[str, Any]
    scope: str
    start_ns: int
    end_ns: int

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def decode_request(body: bytes) -> List[ReceivedSpan]:
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        kind=KINDS.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=attributes(span.attributes),
                        status=STATUS.get(span.status.code, str(span.status.code)),
                        status_message=span.status.message,
                        events=[{"name": e.name, "attributes": attributes(e.attributes)} for e in span.events],
                        links=[
                            {"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex(), "attributes": attributes(l.attributes)}
                            for l in span.links
                        ],
                        resource=resource,
                        scope=scope_spans.scope.name,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                    )
                )
    return spans


@dataclass
class Behaviour:
    status: int = 200  # HTTP status to answer with (gRPC: 200 = OK, else UNAVAILABLE)
    delay_s: float = 0.0
    retry_after: Optional[str] = None


class OTLPReceiver:
    """``with OTLPReceiver() as r:`` -- ``r.http_endpoint``, ``r.grpc_endpoint``, ``r.spans``."""

    def __init__(self, grpc: bool = False) -> None:
        self.spans: List[ReceivedSpan] = []
        self.requests = 0
        self.rejected = 0
        self.headers: List[Dict[str, str]] = []
        self.behaviour = Behaviour()
        self._lock = threading.Lock()
        self._want_grpc = grpc
        self._http: Optional[ThreadingHTTPServer] = None
        self._grpc: Any = None
        self.grpc_port: Optional[int] = None

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "OTLPReceiver":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver._handle_http(self, body)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        if self._want_grpc:
            self._start_grpc()

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(0)

    @property
    def http_port(self) -> int:
        assert self._http is not None
        return self._http.server_address[1]

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def env(self, protocol: str = "http/protobuf") -> Dict[str, str]:
        """Environment that points an autotrace process at this receiver, exporting quickly."""
        endpoint = self.grpc_endpoint if protocol == "grpc" else self.http_endpoint
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    # -- handling ------------------------------------------------------------
    def _record(self, body: bytes, headers: Dict[str, str]) -> None:
        spans = decode_request(body)
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)
            self.headers.append(headers)

    def _handle_http(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        behaviour = self.behaviour
        if behaviour.delay_s:
            time.sleep(behaviour.delay_s)
        if behaviour.status != 200:
            with self._lock:
                self.rejected += 1
            handler.send_response(behaviour.status)
            if behaviour.retry_after is not None:
                handler.send_header("Retry-After", behaviour.retry_after)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        encoding = handler.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        self._record(body, {k.lower(): v for k, v in handler.headers.items()})
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-protobuf")
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    def _start_grpc(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                behaviour = receiver.behaviour
                if behaviour.delay_s:
                    time.sleep(behaviour.delay_s)
                if behaviour.status != 200:
                    with receiver._lock:
                        receiver.rejected += 1
                    context.abort(grpc.StatusCode.UNAVAILABLE, "test receiver failing")
                receiver._record(request.SerializeToString(), dict(context.invocation_metadata()))
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
        self.grpc_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._grpc = server

    # -- queries ---------------------------------------------------------------
    def clear(self) -> None:
        with self._lock:
            self.spans.clear()
            self.requests = 0
            self.rejected = 0

    def wait_for(self, predicate: Callable[[List[ReceivedSpan]], bool], timeout: float = 15.0) -> List[ReceivedSpan]:
        """Wait until ``predicate(spans)`` holds; returns the spans (asserts on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted(f"{s.kind} {s.name}" for s in spans)
                raise AssertionError(f"condition not met within {timeout}s; received {len(spans)} spans: {names}")
            time.sleep(0.05)

    def wait_for_count(self, count: int, timeout: float = 15.0) -> List[ReceivedSpan]:
        return self.wait_for(lambda spans: len(spans) >= count, timeout)

    def named(self, name: str) -> List[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.name == name]
