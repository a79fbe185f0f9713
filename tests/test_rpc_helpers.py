"""autotrace.rpc: the RPC domain helpers, without any RPC library."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional, Tuple

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace import config
from autotrace.kit import Instrumentor
from autotrace.rpc import (
    GRPC_SERVER_ERRORS,
    GRPC_STATUS_NAMES,
    METADATA_GETTER,
    CallEnd,
    Conventions,
    MetadataCarrier,
    RpcServer,
    as_text,
    done_value,
    registering,
    status_name,
    parse_grpc_peer,
    parse_grpc_target,
)
from autotrace.instrumentation import inject

tracer = trace.get_tracer("tests.rpc")


# --------------------------------------------------------------------------
# Targets and peers (the examples of semconv v1.44.0, docs/rpc/grpc.md)


@pytest.mark.parametrize("target, expected", [
    ("grpc.io:50051", ("grpc.io", 50051)),
    ("dns://1.2.3.4/grpc.io:50051", ("grpc.io", 50051)),
    ("dns:///grpc.io:50051", ("grpc.io", 50051)),
    ("dns:grpc.io:443", ("grpc.io", 443)),
    ("unix:///run/containerd/containerd.sock", ("/run/containerd/containerd.sock", None)),
    ("unix:relative.sock", ("relative.sock", None)),
    ("zk://zookeeper:2181/my-server", ("zk://zookeeper:2181/my-server", None)),
    ("ipv4:198.51.100.123:50051,198.51.100.124:50051", ("ipv4:198.51.100.123:50051,198.51.100.124:50051", None)),
    ("ipv4:198.51.100.123:50051", ("198.51.100.123", 50051)),
    ("ipv6:[2001:db8::1]:50051", ("2001:db8::1", 50051)),
    ("[::1]:50051", ("::1", 50051)),
    ("localhost", ("localhost", None)),
    ("xds:///my-service", ("xds:///my-service", None)),
    ("host:notaport", ("host:notaport", None)),
    (b"127.0.0.1:8080", ("127.0.0.1", 8080)),
])
def test_parse_grpc_target(target: Any, expected: Tuple[str, Optional[int]]) -> None:
    assert parse_grpc_target(target) == expected


@pytest.mark.parametrize("peer, expected", [
    ("ipv4:127.0.0.1:54321", ("127.0.0.1", 54321)),
    ("ipv6:[::1]:54321", ("::1", 54321)),
    ("unix:/tmp/socket", ("/tmp/socket", None)),
    ("unknown", None),
    (None, None),
])
def test_parse_grpc_peer(peer: Any, expected: Any) -> None:
    assert parse_grpc_peer(peer) == expected


def test_status_names() -> None:
    assert len(GRPC_STATUS_NAMES) == 17 and GRPC_STATUS_NAMES[4] == "DEADLINE_EXCEEDED"
    assert status_name(16) == "UNAUTHENTICATED" and status_name(99) == "UNKNOWN" and status_name(None) is None

    class Code:
        name = "NOT_FOUND"

    assert status_name(Code()) == "NOT_FOUND"
    assert as_text(b"caf\xc3\xa9") == "café" and as_text("x") == "x" and as_text(None) is None


def test_done_value() -> None:
    async def finished() -> int:
        return 7

    class NotYet:
        def __await__(self) -> Any:
            yield  # suspends: the value is not there yet
            return 8

    async def waiting() -> int:
        return await NotYet()

    assert done_value(finished()) == 7
    assert done_value(waiting()) is None  # closed, never awaited again


def test_registering_replaces_the_argument_and_never_fails_the_call() -> None:
    seen = []

    def add(handlers: Any, *more: Any) -> None:
        seen.append(handlers)

    def convert(value: Any, args: Any, kwargs: Any) -> Any:
        return [f"traced {v}" for v in value]

    wrapper = registering(0, "handlers", convert, "test.register")
    original = ["a"]
    wrapper(add, None, (original,), {})
    wrapper(add, None, (), {"handlers": ["b"]})
    assert seen == [["traced a"], ["traced b"]] and original == ["a"]
    broken = registering(0, "handlers", lambda value, args, kwargs: 1 / 0, "test.register")
    broken(add, None, (original,), {})
    assert seen[-1] is original  # our failure: the caller's own argument
    assert GRPC_SERVER_ERRORS == {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}


# --------------------------------------------------------------------------
# Attributes


def test_attributes_v1_44() -> None:
    conventions = Conventions("grpc", "rpc.grpc.status_code", GRPC_SERVER_ERRORS, dup=False)
    name, attrs = conventions.client(b"/pkg.Echo/Say", b"dns:///echo.internal:7000")
    assert name == "pkg.Echo/Say"
    assert attrs == {"rpc.system.name": "grpc", "rpc.method": "pkg.Echo/Say",
                     "server.address": "echo.internal", "server.port": 7000}
    assert conventions.client(b"/pkg.Echo/Say", b"dns:///echo.internal:7000")[1] is attrs  # cached
    assert conventions.server("/pkg.Echo/Say") == ("pkg.Echo/Say", {"rpc.system.name": "grpc", "rpc.method": "pkg.Echo/Say"})
    assert conventions.attributes("") == ("grpc", {"rpc.system.name": "grpc"})  # no method: named by the system


def test_old_names_with_rpc_dup(monkeypatch: Any) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http,rpc/dup")
    config.reset_settings()
    conventions = Conventions("grpc", "rpc.grpc.status_code", GRPC_SERVER_ERRORS)
    assert conventions.dup
    _, attrs = conventions.attributes("/pkg.Echo/Say", "h", 1)
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == "pkg.Echo"
    assert attrs["rpc.method"] == "pkg.Echo/Say" and attrs["rpc.system.name"] == "grpc"
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "rpc")
    config.reset_settings()
    assert not Conventions("grpc").dup


def test_the_caches_are_bounded() -> None:
    conventions = Conventions("grpc", dup=False)
    for i in range(3000):
        conventions.client(f"/s/m{i}".encode(), b"h:1")
        conventions.server(f"/s/m{i}")
    assert len(conventions._client) <= 1024 and len(conventions._server) <= 1024


# --------------------------------------------------------------------------
# Status -> span status


def _span(conventions: Conventions, kind: SpanKind, code: str, exc: Optional[BaseException] = None) -> Any:
    span = tracer.start_span("s", kind=kind)
    if kind == SpanKind.CLIENT:
        conventions.client_status(span, code, "details here", exc)
    else:
        conventions.server_status(span, code, "details here", exc)
    span.end()
    return span


@pytest.mark.parametrize("code", GRPC_STATUS_NAMES)
def test_client_status(code: str) -> None:
    span = _span(Conventions("grpc", "rpc.grpc.status_code", GRPC_SERVER_ERRORS, dup=False), SpanKind.CLIENT, code)
    assert span.attributes["rpc.response.status_code"] == code
    if code == "OK":
        assert span.status.status_code == StatusCode.UNSET and "error.type" not in span.attributes
    else:
        assert span.status.status_code == StatusCode.ERROR
        assert span.status.description == f"{code}: details here"
        assert span.attributes["error.type"] == code


@pytest.mark.parametrize("code", GRPC_STATUS_NAMES)
def test_server_status(code: str) -> None:
    span = _span(Conventions("grpc", "rpc.grpc.status_code", GRPC_SERVER_ERRORS, dup=True), SpanKind.SERVER, code)
    assert span.attributes["rpc.response.status_code"] == code
    assert span.attributes["rpc.grpc.status_code"] == GRPC_STATUS_NAMES.index(code)
    if code in ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"):
        assert span.status.status_code == StatusCode.ERROR and span.attributes["error.type"] == code
    else:
        assert span.status.status_code == StatusCode.UNSET and "error.type" not in span.attributes


def test_status_with_an_exception() -> None:
    conventions = Conventions("grpc", server_errors=GRPC_SERVER_ERRORS, dup=False)
    failed = _span(conventions, SpanKind.SERVER, "UNKNOWN", ValueError("boom"))
    assert failed.status.status_code == StatusCode.ERROR and failed.attributes["error.type"] == "UNKNOWN"
    assert [e.attributes["exception.type"] for e in failed.events] == ["ValueError"]
    quiet = _span(conventions, SpanKind.SERVER, "NOT_FOUND", KeyError("k"))
    assert quiet.status.status_code == StatusCode.UNSET
    assert [e.attributes["exception.type"] for e in quiet.events] == ["KeyError"]  # recorded, not an error


# --------------------------------------------------------------------------
# Metadata


def test_metadata_carrier_copies_and_replaces() -> None:
    original = (("a", "1"), ("traceparent", "stale"))
    carrier = MetadataCarrier(original)
    carrier["TraceParent"] = "fresh"
    carrier["b3"] = "x"
    assert carrier == [("a", "1"), ("traceparent", "fresh"), ("b3", "x")]
    assert original == (("a", "1"), ("traceparent", "stale"))
    assert MetadataCarrier(None) == [] and isinstance(MetadataCarrier(), list)
    carrier[0] = ("z", "0")  # list indexing still works
    assert carrier[0] == ("z", "0")


def test_inject_and_extract_round_trip() -> None:
    with tracer.start_as_current_span("client") as span:
        carrier = MetadataCarrier([("user", "v")])
        from opentelemetry import context

        inject(carrier, context.get_current())
    assert METADATA_GETTER.keys(carrier) == ["user", "traceparent"]
    assert METADATA_GETTER.get(carrier, "traceparent")[0].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    assert METADATA_GETTER.get(carrier, "missing") is None
    assert METADATA_GETTER.get([("k", b"binary")], "k") is None  # -bin values are bytes: not propagation headers


# --------------------------------------------------------------------------
# CallEnd


class _Pending:
    def __init__(self) -> None:
        self.span = tracer.start_span("pending", kind=SpanKind.CLIENT)
        self.ended = 0

    def end(self) -> None:
        self.ended += 1
        self.span.end()


def test_call_end_reads_the_status_then_ends() -> None:
    conventions = Conventions("grpc", dup=False)
    pending = _Pending()
    CallEnd(pending, {"code": "UNAVAILABLE"}, lambda source: (source["code"], "down"), conventions)()
    assert pending.ended == 1 and pending.span.attributes["error.type"] == "UNAVAILABLE"
    pending = _Pending()
    CallEnd(pending, None, lambda call: (call, None), conventions)("OK")  # read from the callback's argument
    assert pending.span.attributes["rpc.response.status_code"] == "OK"
    pending = _Pending()
    CallEnd(pending, None, lambda call: 1 / 0, conventions)("x")  # our failure: still ended
    assert pending.ended == 1


# --------------------------------------------------------------------------
# RpcServer


class _Plugin(Instrumentor):
    name = "rpc-test"
    modules = ("json",)

    def patch_module(self, module_name: str, module: Any) -> None:
        pass


class _Context:
    """A fake per-call server context: metadata, a code, a cancelled flag, a termination callback."""

    def __init__(self, metadata: Any = ()) -> None:
        self.metadata = list(metadata)
        self.code: Optional[str] = None
        self.is_cancelled = False
        self.callbacks: List[Any] = []

    def terminate(self) -> None:
        for callback in self.callbacks:
            callback()


class Abort(Exception):
    """What the fake framework raises for an abort with a status."""


@pytest.fixture
def server() -> Any:
    plugin = _Plugin().instrument()
    yield RpcServer(plugin, Conventions("grpc", server_errors=GRPC_SERVER_ERRORS, dup=False),
                    metadata=lambda c: c.metadata, code=lambda c: c.code, details=lambda c: b"some details",
                    cancelled=lambda c: c.is_cancelled, aborted=lambda exc: isinstance(exc, Abort),
                    watch=lambda c, cb: c.callbacks.append(cb), peer=lambda c: ("10.0.0.9", 4000))
    plugin.unpatch()


def _remote(span_id: int = 0xB7AD6B7169203331) -> List[Tuple[str, str]]:
    return [("traceparent", f"00-0af7651916cd43dd8448eb211c80319c-{span_id:016x}-01")]


def test_sync_handler(spans: Any, server: RpcServer) -> None:
    def handler(request: Any, context: Any) -> Any:
        with tracer.start_as_current_span("inside"):
            return request * 2

    handler.experimental_marker = True  # type: ignore[attr-defined]
    traced = server.handler(handler, "/pkg.S/M", streaming=False)
    assert traced.experimental_marker and traced.__name__ == "handler"
    assert server.handler(traced, "/pkg.S/M", False) is traced  # never wrapped twice
    assert traced(21, _Context(_remote())) == 42
    span = spans.one("pkg.S/M")
    assert span.kind == SpanKind.SERVER and span.parent.span_id == 0xB7AD6B7169203331
    assert span.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert span.attributes["network.peer.address"] == "10.0.0.9" and span.attributes["network.peer.port"] == 4000
    assert span.attributes["rpc.response.status_code"] == "OK"
    assert spans.one("inside").parent.span_id == span.context.span_id


def test_sync_handler_raises(spans: Any, server: RpcServer) -> None:
    def handler(request: Any, context: Any) -> Any:
        raise LookupError("nope")

    with pytest.raises(LookupError):
        server.handler(handler, "/pkg.S/M", False)(1, _Context())
    span = spans.one("pkg.S/M")
    assert span.status.status_code == StatusCode.ERROR and span.attributes["error.type"] == "UNKNOWN"
    assert span.parent is None  # no metadata: a new trace


def test_generator_handler_and_termination(spans: Any, server: RpcServer) -> None:
    def handler(request: Any, context: Any) -> Any:
        for i in range(request):
            with tracer.start_as_current_span("item"):
                pass
            yield i

    traced = server.handler(handler, "/pkg.S/Stream", streaming=True)
    context = _Context()
    assert list(traced(3, context)) == [0, 1, 2]
    span = spans.one("pkg.S/Stream")
    assert all(s.parent.span_id == span.context.span_id for s in spans.named("item"))
    context.terminate()  # after the end: nothing more
    assert len(spans.named("pkg.S/Stream")) == 1
    spans.clear()
    context = _Context()
    stream = traced(100, context)
    next(stream)
    context.terminate()  # cancelled mid-stream
    assert spans.one("pkg.S/Stream").attributes["rpc.response.status_code"] == "CANCELLED"
    next(stream)  # the framework stops reading; the span stays ended once
    assert len(spans.named("pkg.S/Stream")) == 1


def test_coroutine_and_async_generator_handlers(spans: Any, server: RpcServer) -> None:
    async def unary(request: Any, context: Any) -> Any:
        await asyncio.sleep(0)
        return request + 1

    async def stream(request: Any, context: Any) -> Any:
        for i in range(request):
            yield i

    async def failing(request: Any, context: Any) -> Any:
        yield 1
        raise RuntimeError("mid-stream")

    import inspect

    traced_unary = server.handler(unary, "/pkg.S/U", False)
    traced_stream = server.handler(stream, "/pkg.S/S", True)
    traced_failing = server.handler(failing, "/pkg.S/F", True)
    assert inspect.iscoroutinefunction(traced_unary) and inspect.isasyncgenfunction(traced_stream)

    async def main() -> None:
        assert await traced_unary(1, _Context()) == 2
        assert [i async for i in traced_stream(3, _Context())] == [0, 1, 2]
        with pytest.raises(RuntimeError):
            _ = [i async for i in traced_failing(0, _Context())]

    asyncio.run(main())
    assert spans.one("pkg.S/U").attributes["rpc.response.status_code"] == "OK"
    assert spans.one("pkg.S/S").attributes["rpc.response.status_code"] == "OK"
    failed = spans.one("pkg.S/F")
    assert failed.status.status_code == StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in failed.events] == ["RuntimeError"]


@pytest.mark.parametrize("exc, code, cancelled, expected", [
    (None, None, False, ("OK", "some details", False)),
    (None, "NOT_FOUND", False, ("NOT_FOUND", "some details", False)),
    (None, None, True, ("CANCELLED", "some details", False)),
    (Abort(), "INTERNAL", False, ("INTERNAL", "some details", False)),
    (Abort(), None, False, ("UNKNOWN", None, True)),  # not really an abort: no status was set
    (ValueError("x"), None, False, ("UNKNOWN", None, True)),
    (ValueError("x"), "NOT_FOUND", False, ("UNKNOWN", None, True)),  # set_code then raise: the framework sends UNKNOWN
    (ValueError("x"), None, True, ("CANCELLED", None, False)),
    (asyncio.CancelledError(), None, False, ("CANCELLED", None, False)),
    (GeneratorExit(), None, False, ("CANCELLED", None, False)),
])
def test_outcome(server: RpcServer, exc: Any, code: Any, cancelled: bool, expected: Tuple[str, Any, bool]) -> None:
    context = _Context()
    context.code, context.is_cancelled = code, cancelled
    status, message, failure = server.outcome(context, exc, False)
    assert (status, message, failure is exc and exc is not None) == expected


def test_outcome_when_the_framework_reports_the_end_first(server: RpcServer) -> None:
    context = _Context()
    assert server.outcome(context, None, True)[0] == "CANCELLED"
    context.code = "DEADLINE_EXCEEDED"
    assert server.outcome(context, None, True)[0] == "DEADLINE_EXCEEDED"


def test_handlers_stand_down_after_unpatch(spans: Any, server: RpcServer) -> None:
    traced = server.handler(lambda request, context: request, "/pkg.S/M", False)
    server.instrumentor.unpatch()
    assert traced(5, _Context()) == 5
    assert spans.get() == []


def test_our_failures_never_reach_the_handler(spans: Any, server: RpcServer) -> None:
    def broken_metadata(context: Any) -> Any:
        raise RuntimeError("ours")

    server.metadata = broken_metadata
    assert server.handler(lambda request, context: request, "/pkg.S/M", False)(7, _Context()) == 7
    assert spans.get() == []
    server.metadata = lambda c: c.metadata

    def broken_code(context: Any) -> Any:
        raise RuntimeError("ours")

    server.code = broken_code
    assert server.handler(lambda request, context: request, "/pkg.S/M", False)(8, _Context()) == 8
    assert len(spans.named("pkg.S/M")) == 1  # ended all the same
