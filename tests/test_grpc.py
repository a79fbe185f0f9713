"""grpcio instrumentor: real in-process servers (sync and grpc.aio) on free loopback ports.

The test service is defined without protoc: generic handlers with bytes in and
out. Requests are commands: ``abort:CODE``, ``raise``, ``sleep:SECONDS``,
``count:N``, ``forever``, ``set_code``; anything else is echoed.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading
import time
from concurrent import futures
from typing import Any, Callable, Dict, Iterator, List

import pytest

grpc = pytest.importorskip("grpc")
import grpc.aio  # noqa: E402

from opentelemetry import propagate, trace  # noqa: E402
from opentelemetry.propagators.b3 import B3MultiFormat  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from autotrace import config  # noqa: E402
from autotrace.instrumentation import is_wrapped, suppressed  # noqa: E402
from autotrace.instrumentors.grpc import GrpcInstrumentor  # noqa: E402

SERVICE = "autotrace.test.Echo"
UNARY, STREAM, COLLECT, CHAT, WRITES = (f"{SERVICE}/{m}" for m in ("Unary", "Stream", "Collect", "Chat", "Writes"))
tracer = trace.get_tracer("tests.grpc")
_ident = lambda value: value  # noqa: E731

#: What the servers saw (invocation metadata of the last calls).
seen_metadata: List[Dict[str, str]] = []


def _command(request: bytes) -> str:
    return request.decode()


# --------------------------------------------------------------------------
# Sync service


def unary(request: bytes, context: Any) -> bytes:
    seen_metadata.append({k: v for k, v in context.invocation_metadata()})
    with tracer.start_as_current_span("handler-work"):
        pass
    command = _command(request)
    if command.startswith("abort:"):
        context.abort(getattr(grpc.StatusCode, command[6:]), "aborted on purpose")
    if command == "raise":
        raise ValueError("handler failed")
    if command.startswith("sleep:"):
        time.sleep(float(command[6:]))
    if command == "set_code":
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("absent")
        return b""
    return request


def stream(request: bytes, context: Any) -> Iterator[bytes]:
    command = _command(request)
    if command == "forever":
        while context.is_active():
            yield b"tick"
            time.sleep(0.01)
        return
    if command == "raise":
        yield b"one"
        raise RuntimeError("stream failed")
    for i in range(int(command.split(":")[1])):
        with tracer.start_as_current_span("item-work"):
            pass
        yield b"%d" % i


def collect(requests: Iterator[bytes], context: Any) -> bytes:
    return b"+".join(requests)


def chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    for request in requests:
        if request == b"forever":
            while context.is_active():
                yield b"tick"
                time.sleep(0.01)
            return
        yield request.upper()


def sync_handlers() -> Dict[str, Any]:
    return {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _ident, _ident),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, _ident, _ident),
        "Collect": grpc.stream_unary_rpc_method_handler(collect, _ident, _ident),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, _ident, _ident),
    }


# --------------------------------------------------------------------------
# Helpers


def wait_for(spans: Any, predicate: Callable[[List[Any]], bool], timeout: float = 5.0) -> List[Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = spans.get()
        if predicate(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not met; spans: {[(s.kind, s.name) for s in found]}")
        time.sleep(0.02)


def pair(spans: Any, name: str, count: int = 1) -> Any:
    """The CLIENT and SERVER spans of the (single) call of ``name``, once both ended."""
    found = wait_for(spans, lambda got: sum(s.name == name and s.kind in (SpanKind.CLIENT, SpanKind.SERVER) for s in got) >= 2 * count)
    client = [s for s in found if s.name == name and s.kind == SpanKind.CLIENT]
    server = [s for s in found if s.name == name and s.kind == SpanKind.SERVER]
    assert len(client) == count and len(server) == count, [(s.kind, s.name) for s in found]
    return (client[0], server[0]) if count == 1 else (client, server)


def check_pair(client: Any, server: Any, method: str, port: int, code: str = "OK") -> None:
    assert client.kind == SpanKind.CLIENT and server.kind == SpanKind.SERVER
    assert client.name == server.name == method
    assert server.context.trace_id == client.context.trace_id
    assert server.parent.span_id == client.context.span_id and server.parent.is_remote
    assert client.attributes["rpc.system.name"] == server.attributes["rpc.system.name"] == "grpc"
    assert client.attributes["rpc.method"] == server.attributes["rpc.method"] == method
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == port
    assert server.attributes["network.peer.address"] == "127.0.0.1"
    assert isinstance(server.attributes["network.peer.port"], int)
    assert client.attributes["rpc.response.status_code"] == code
    for old in ("rpc.system", "rpc.service", "rpc.grpc.status_code"):
        assert old not in client.attributes and old not in server.attributes
    if code == "OK":
        assert client.status.status_code == server.status.status_code == StatusCode.UNSET
        assert "error.type" not in client.attributes and "error.type" not in server.attributes
    else:
        assert client.status.status_code == StatusCode.ERROR
        assert client.attributes["error.type"] == code


@pytest.fixture
def grpc_instrumentor(instrument: Any) -> Any:
    seen_metadata.clear()
    return instrument(GrpcInstrumentor)


@pytest.fixture
def server_port(grpc_instrumentor: Any) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, sync_handlers()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture
def channel(server_port: int) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{server_port}") as chan:
        yield chan


def call(chan: Any, kind: str, method: str) -> Any:
    return getattr(chan, kind)(f"/{method}", request_serializer=_ident, response_deserializer=_ident)


# --------------------------------------------------------------------------
# Sync: the four call types


def test_unary_unary_one_trace_right_parent(spans: Any, channel: Any, server_port: int) -> None:
    metadata = [("user-key", "user-value")]
    with tracer.start_as_current_span("caller") as caller:
        assert call(channel, "unary_unary", UNARY)(b"hello", metadata=metadata) == b"hello"
    client, server = pair(spans, UNARY)
    check_pair(client, server, UNARY, server_port)
    assert client.parent.span_id == caller.get_span_context().span_id
    assert metadata == [("user-key", "user-value")]  # the caller's metadata is not modified
    assert seen_metadata[-1]["user-key"] == "user-value"
    assert seen_metadata[-1]["traceparent"].split("-")[2] == format(client.context.span_id, "016x")
    work = spans.one("handler-work")
    assert work.parent.span_id == server.context.span_id  # the handler runs in the SERVER span


def test_with_call_and_future(spans: Any, channel: Any, server_port: int) -> None:
    stub = call(channel, "unary_unary", UNARY)
    response, rpc = stub.with_call(b"a", metadata=(("k", "v"),))
    assert response == b"a" and rpc.code() == grpc.StatusCode.OK
    check_pair(*pair(spans, UNARY), UNARY, server_port)
    spans.clear()
    future = stub.future(b"b")
    assert future.result(timeout=5) == b"b"
    check_pair(*pair(spans, UNARY), UNARY, server_port)


def test_unary_stream(spans: Any, channel: Any, server_port: int) -> None:
    responses = call(channel, "unary_stream", STREAM)(b"count:3")
    assert isinstance(responses, grpc.Call) and isinstance(responses, grpc.Future)  # the library's own object
    assert list(responses) == [b"0", b"1", b"2"]
    client, server = pair(spans, STREAM)
    check_pair(client, server, STREAM, server_port)
    items = spans.named("item-work")
    assert len(items) == 3 and all(s.parent.span_id == server.context.span_id for s in items)


def test_stream_unary_and_future(spans: Any, channel: Any, server_port: int) -> None:
    stub = call(channel, "stream_unary", COLLECT)
    assert stub(iter([b"a", b"b"])) == b"a+b"
    check_pair(*pair(spans, COLLECT), COLLECT, server_port)
    spans.clear()
    assert stub.future(iter([b"c"])).result(timeout=5) == b"c"
    check_pair(*pair(spans, COLLECT), COLLECT, server_port)


def test_stream_stream(spans: Any, channel: Any, server_port: int) -> None:
    assert list(call(channel, "stream_stream", CHAT)(iter([b"x", b"y"]))) == [b"X", b"Y"]
    check_pair(*pair(spans, CHAT), CHAT, server_port)


def test_single_threaded_unary_stream(spans: Any, server_port: int, grpc_instrumentor: Any) -> None:
    options = [("grpc.experimental.SingleThreadedUnaryStream", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{server_port}", options=options) as chan:
        assert list(call(chan, "unary_stream", STREAM)(b"count:2")) == [b"0", b"1"]
    check_pair(*pair(spans, STREAM), STREAM, server_port)


def test_registered_method_handlers(spans: Any, grpc_instrumentor: Any) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    if not hasattr(server, "add_registered_method_handlers"):
        pytest.skip(f"grpcio {grpc.__version__} has no add_registered_method_handlers")
    server.add_registered_method_handlers(SERVICE, {"Unary": sync_handlers()["Unary"]})
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            stub = chan.unary_unary(f"/{UNARY}", _registered_method=True)
            assert stub(b"registered") == b"registered"
    finally:
        server.stop(0)
    check_pair(*pair(spans, UNARY), UNARY, port)


def test_handlers_passed_to_the_server_constructor(spans: Any, grpc_instrumentor: Any) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         handlers=[grpc.method_handlers_generic_handler(SERVICE, sync_handlers())])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"localhost:{port}") as chan:
            assert call(chan, "unary_unary", UNARY)(b"x") == b"x"
    finally:
        server.stop(0)
    client, server_span = pair(spans, UNARY)
    assert client.attributes["server.address"] == "localhost" and client.attributes["server.port"] == port
    assert server_span.parent.span_id == client.context.span_id


# --------------------------------------------------------------------------
# Sync: errors, deadlines, cancellation


@pytest.mark.parametrize("code, server_error", [("NOT_FOUND", False), ("INVALID_ARGUMENT", False), ("INTERNAL", True),
                                                ("UNAVAILABLE", True), ("DATA_LOSS", True)])
def test_abort_with_a_status(spans: Any, channel: Any, server_port: int, code: str, server_error: bool) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        call(channel, "unary_unary", UNARY)(f"abort:{code}".encode())
    assert raised.value.code() == getattr(grpc.StatusCode, code)
    client, server = pair(spans, UNARY)
    check_pair(client, server, UNARY, server_port, code)
    assert server.attributes["rpc.response.status_code"] == code
    assert not [e for e in server.events if e.name == "exception"]  # abort() is a status, not a handler failure
    if server_error:
        assert server.status.status_code == StatusCode.ERROR and server.attributes["error.type"] == code
        assert server.status.description == f"{code}: aborted on purpose"
    else:
        assert server.status.status_code == StatusCode.UNSET and "error.type" not in server.attributes


def test_set_code_without_raising(spans: Any, channel: Any, server_port: int) -> None:
    with pytest.raises(grpc.RpcError):
        call(channel, "unary_unary", UNARY)(b"set_code")
    client, server = pair(spans, UNARY)
    check_pair(client, server, UNARY, server_port, "NOT_FOUND")
    assert server.attributes["rpc.response.status_code"] == "NOT_FOUND"
    assert server.status.status_code == StatusCode.UNSET


def test_handler_exception_is_recorded(spans: Any, channel: Any, server_port: int) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        call(channel, "unary_unary", UNARY)(b"raise")
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    client, server = pair(spans, UNARY)
    check_pair(client, server, UNARY, server_port, "UNKNOWN")
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes["error.type"] == "UNKNOWN"
    event = [e for e in server.events if e.name == "exception"][0]
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "handler failed"


def test_stream_handler_exception_is_recorded(spans: Any, channel: Any, server_port: int) -> None:
    responses = call(channel, "unary_stream", STREAM)(b"raise")
    with pytest.raises(grpc.RpcError):
        list(responses)
    client, server = pair(spans, STREAM)
    check_pair(client, server, STREAM, server_port, "UNKNOWN")
    assert server.status.status_code == StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in server.events if e.name == "exception"] == ["RuntimeError"]


def test_deadline_exceeded(spans: Any, channel: Any, server_port: int) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        call(channel, "unary_unary", UNARY)(b"sleep:0.5", timeout=0.1)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client, server = pair(spans, UNARY)
    assert client.attributes["rpc.response.status_code"] == "DEADLINE_EXCEEDED"
    assert client.attributes["error.type"] == "DEADLINE_EXCEEDED" and client.status.status_code == StatusCode.ERROR
    # the server only sees the call cancelled when the deadline passes: its span ends then
    assert server.attributes["rpc.response.status_code"] == "CANCELLED"
    assert server.end_time - server.start_time < 0.45e9
    assert server.parent.span_id == client.context.span_id


def test_cancelled_stream_ends_both_spans(spans: Any, channel: Any, server_port: int) -> None:
    responses = call(channel, "unary_stream", STREAM)(b"forever")
    assert next(responses) == b"tick"
    responses.cancel()
    client, server = pair(spans, STREAM)
    check_pair(client, server, STREAM, server_port, "CANCELLED")
    assert server.attributes["rpc.response.status_code"] == "CANCELLED"
    assert server.status.status_code == StatusCode.UNSET  # CANCELLED is not a server error


def test_cancelled_bidi_stream(spans: Any, channel: Any, server_port: int) -> None:
    responses = call(channel, "stream_stream", CHAT)(iter([b"a", b"forever"]))
    assert next(responses) == b"A" and next(responses) == b"tick"
    responses.cancel()
    client, server = pair(spans, CHAT)
    check_pair(client, server, CHAT, server_port, "CANCELLED")
    assert server.attributes["rpc.response.status_code"] == "CANCELLED"


def test_a_dropped_stream_is_still_cancelled_and_ended(spans: Any, channel: Any) -> None:
    """The completion callback must not keep the call alive: grpc cancels a call nobody holds."""
    gc.disable()  # refcounting alone must free it, as without autotrace
    try:
        responses = call(channel, "unary_stream", STREAM)(b"forever")
        assert next(responses) == b"tick"
        del responses
        client, _ = pair(spans, STREAM)
    finally:
        gc.enable()
    assert client.attributes["rpc.response.status_code"] == "CANCELLED"


def test_unimplemented_method(spans: Any, channel: Any) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(f"/{SERVICE}/Missing")(b"")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    client = spans.one(f"{SERVICE}/Missing")
    assert client.kind == SpanKind.CLIENT and client.attributes["error.type"] == "UNIMPLEMENTED"


def test_connection_failure(spans: Any, grpc_instrumentor: Any) -> None:
    from tests.support.processes import free_port

    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as chan:
        with pytest.raises(grpc.RpcError) as raised:
            call(chan, "unary_unary", UNARY)(b"x", timeout=2)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    client = spans.one(UNARY)
    assert client.status.status_code == StatusCode.ERROR and client.attributes["error.type"] == "UNAVAILABLE"


# --------------------------------------------------------------------------
# Propagation, interceptors, suppression, conventions


def test_b3_propagator(spans: Any, channel: Any, server_port: int) -> None:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(B3MultiFormat())
    try:
        call(channel, "unary_unary", UNARY)(b"b3")
    finally:
        propagate.set_global_textmap(previous)
    client, server = pair(spans, UNARY)
    check_pair(client, server, UNARY, server_port)
    headers = seen_metadata[-1]
    assert "traceparent" not in headers
    assert headers["x-b3-traceid"] == format(client.context.trace_id, "032x")
    assert headers["x-b3-spanid"] == format(client.context.span_id, "016x")


def test_a_stale_traceparent_in_the_callers_metadata_is_replaced(spans: Any, channel: Any) -> None:
    stale = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    metadata = (("traceparent", stale), ("other", "kept"))
    call(channel, "unary_unary", UNARY)(b"x", metadata=metadata)
    client, server = pair(spans, UNARY)
    assert server.context.trace_id == client.context.trace_id != int("1" * 32, 16)
    assert seen_metadata[-1]["other"] == "kept"
    assert metadata[0] == ("traceparent", stale)


def test_client_interceptor_metadata_and_one_span(spans: Any, channel: Any, server_port: int) -> None:
    class AddHeader(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            details = details._replace(metadata=list(details.metadata or ()) + [("x-added", "1")])
            return continuation(details, request)

    intercepted = grpc.intercept_channel(channel, AddHeader())
    assert call(intercepted, "unary_unary", UNARY)(b"i") == b"i"
    check_pair(*pair(spans, UNARY), UNARY, server_port)
    assert seen_metadata[-1]["x-added"] == "1" and "traceparent" in seen_metadata[-1]


def test_suppressed_calls_are_not_traced(spans: Any, channel: Any) -> None:
    with suppressed():
        call(channel, "unary_unary", UNARY)(b"quiet")
    server = wait_for(spans, lambda got: any(s.kind == SpanKind.SERVER for s in got))
    assert [s.kind for s in server if s.name == UNARY] == [SpanKind.SERVER]
    assert "traceparent" not in seen_metadata[-1]


def test_old_names_with_rpc_dup(spans: Any, instrument: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "rpc/dup")
    config.reset_settings()
    instrument(GrpcInstrumentor)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, sync_handlers()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            with pytest.raises(grpc.RpcError):
                call(chan, "unary_unary", UNARY)(b"abort:NOT_FOUND")
    finally:
        server.stop(0)
    client, server_span = pair(spans, UNARY)
    for span in (client, server_span):
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == SERVICE
        assert span.attributes["rpc.method"] == UNARY  # the new, fully-qualified value
        assert span.attributes["rpc.grpc.status_code"] == 5
        assert span.attributes["rpc.response.status_code"] == "NOT_FOUND"


# --------------------------------------------------------------------------
# Contract


def _targets() -> List[Any]:
    import grpc._channel
    import grpc._server
    import grpc.aio._channel
    import grpc.aio._server

    found = []
    for module, classes in (
        (grpc._channel, {"_UnaryUnaryMultiCallable": ("__call__", "with_call", "future"),
                         "_StreamUnaryMultiCallable": ("__call__", "with_call", "future"),
                         "_UnaryStreamMultiCallable": ("__call__",), "_SingleThreadedUnaryStreamMultiCallable": ("__call__",),
                         "_StreamStreamMultiCallable": ("__call__",)}),
        (grpc.aio._channel, {"Channel": ("__init__",), **{f"{k}MultiCallable": ("__call__",)
                                                         for k in ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream")}}),
        (grpc._server, {"_Server": ("__init__", "add_generic_rpc_handlers", "add_registered_method_handlers")}),
        (grpc.aio._server, {"Server": ("__init__", "add_generic_rpc_handlers", "add_registered_method_handlers")}),
    ):
        for cls, names in classes.items():
            found.extend((getattr(module, cls), name) for name in names if name in vars(getattr(module, cls)))
    return found


def test_unpatch_restores_the_originals(spans: Any) -> None:
    targets = _targets()
    originals = [inspect.getattr_static(cls, name) for cls, name in targets]
    instrumentor = GrpcInstrumentor().instrument()
    try:
        assert all(is_wrapped(cls, name) for cls, name in targets)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, sync_handlers()),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    finally:
        instrumentor.unpatch()
    try:
        assert [inspect.getattr_static(cls, name) for cls, name in targets] == originals
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            assert call(chan, "unary_unary", UNARY)(b"after") == b"after"
            assert list(call(chan, "unary_stream", STREAM)(b"count:1")) == [b"0"]
        time.sleep(0.1)
        assert [s.name for s in spans.get() if s.kind != SpanKind.INTERNAL] == []  # handlers registered earlier stand down
    finally:
        server.stop(0)
    instrumentor.unpatch()  # twice is safe


def test_the_wrappers_keep_signatures(grpc_instrumentor: Any) -> None:
    import grpc._channel

    original = inspect.signature(grpc._channel._UnaryUnaryMultiCallable.__call__.__wrapped__)
    assert inspect.signature(grpc._channel._UnaryUnaryMultiCallable.__call__) == original


# --------------------------------------------------------------------------
# grpc.aio


async def a_unary(request: bytes, context: Any) -> bytes:
    seen_metadata.append({k: v for k, v in context.invocation_metadata()})
    with tracer.start_as_current_span("handler-work"):
        pass
    command = _command(request)
    if command.startswith("abort:"):
        await context.abort(getattr(grpc.StatusCode, command[6:]), "aborted on purpose")
    if command == "raise":
        raise ValueError("handler failed")
    if command.startswith("sleep:"):
        await asyncio.sleep(float(command[6:]))
    return request


async def a_stream(request: bytes, context: Any) -> Any:
    command = _command(request)
    if command == "forever":
        while True:
            yield b"tick"
            await asyncio.sleep(0.01)
    if command == "raise":
        yield b"one"
        raise RuntimeError("stream failed")
    for i in range(int(command.split(":")[1])):
        with tracer.start_as_current_span("item-work"):
            pass
        yield b"%d" % i


async def a_collect(requests: Any, context: Any) -> bytes:
    return b"+".join([request async for request in requests])


async def a_chat(requests: Any, context: Any) -> Any:
    async for request in requests:
        yield request.upper()


async def a_writes(request: bytes, context: Any) -> None:
    """A coroutine streaming through context.write (the reader/writer API)."""
    with tracer.start_as_current_span("handler-work"):
        pass
    await context.write(b"w1")
    await context.write(b"w2")


def sync_unary_in_aio(request: bytes, context: Any) -> bytes:
    return request + b"!"


def aio_handlers() -> Dict[str, Any]:
    return {
        "Unary": grpc.unary_unary_rpc_method_handler(a_unary, _ident, _ident),
        "Stream": grpc.unary_stream_rpc_method_handler(a_stream, _ident, _ident),
        "Collect": grpc.stream_unary_rpc_method_handler(a_collect, _ident, _ident),
        "Chat": grpc.stream_stream_rpc_method_handler(a_chat, _ident, _ident),
        "Writes": grpc.unary_stream_rpc_method_handler(a_writes, _ident, _ident),
        "Sync": grpc.unary_unary_rpc_method_handler(sync_unary_in_aio, _ident, _ident),
    }


def run_aio(body: Callable[[Any, int], Any], interceptors: Any = None) -> None:
    async def main() -> None:
        server = grpc.aio.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, aio_handlers()),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as chan:
                await body(chan, port)
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_aio_four_call_types(spans: Any, grpc_instrumentor: Any) -> None:
    ports = []

    async def body(chan: Any, port: int) -> None:
        ports.append(port)
        with tracer.start_as_current_span("caller"):
            assert await call(chan, "unary_unary", UNARY)(b"hi", metadata=grpc.aio.Metadata(("user-key", "v"))) == b"hi"
        assert [r async for r in call(chan, "unary_stream", STREAM)(b"count:2")] == [b"0", b"1"]

        async def requests() -> Any:
            yield b"a"
            yield b"b"

        assert await call(chan, "stream_unary", COLLECT)(requests()) == b"a+b"
        assert [r async for r in call(chan, "stream_stream", CHAT)(requests())] == [b"A", b"B"]

    run_aio(body)
    port = ports[0]
    for method in (UNARY, STREAM, COLLECT, CHAT):
        check_pair(*pair(spans, method), method, port)
    client, server = pair(spans, UNARY)
    assert client.parent.span_id == spans.one("caller").context.span_id
    assert seen_metadata[-1]["user-key"] == "v"
    assert spans.one("handler-work").parent.span_id == server.context.span_id
    _, stream_server = pair(spans, STREAM)
    assert all(s.parent.span_id == stream_server.context.span_id for s in spans.named("item-work"))


def test_aio_writer_api_and_sync_handler(spans: Any, grpc_instrumentor: Any) -> None:
    ports = []

    async def body(chan: Any, port: int) -> None:
        ports.append(port)
        assert [r async for r in call(chan, "unary_stream", WRITES)(b"")] == [b"w1", b"w2"]
        assert await call(chan, "unary_unary", f"{SERVICE}/Sync")(b"s") == b"s!"

    run_aio(body)
    client, server = pair(spans, WRITES)
    check_pair(client, server, WRITES, ports[0])
    assert spans.one("handler-work").parent.span_id == server.context.span_id
    check_pair(*pair(spans, f"{SERVICE}/Sync"), f"{SERVICE}/Sync", ports[0])


def test_aio_errors(spans: Any, grpc_instrumentor: Any) -> None:
    async def body(chan: Any, port: int) -> None:
        stub = call(chan, "unary_unary", UNARY)
        for request, code in ((b"abort:INTERNAL", grpc.StatusCode.INTERNAL), (b"abort:NOT_FOUND", grpc.StatusCode.NOT_FOUND),
                              (b"raise", grpc.StatusCode.UNKNOWN)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub(request)
            assert raised.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub(b"sleep:0.5", timeout=0.1)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [r async for r in call(chan, "unary_stream", STREAM)(b"raise")]

    run_aio(body)
    clients, servers = pair(spans, UNARY, count=4)
    by_code = {s.attributes["rpc.response.status_code"]: s for s in servers}
    assert by_code["INTERNAL"].status.status_code == StatusCode.ERROR
    assert not by_code["INTERNAL"].events  # abort: a status, not a handler failure
    assert by_code["NOT_FOUND"].status.status_code == StatusCode.UNSET
    failed = by_code["UNKNOWN"]
    assert failed.status.status_code == StatusCode.ERROR and failed.attributes["error.type"] == "UNKNOWN"
    assert [e.attributes["exception.type"] for e in failed.events] == ["ValueError"]
    assert by_code["CANCELLED"].status.status_code == StatusCode.UNSET  # the deadline, seen by the server
    assert sorted(c.attributes["error.type"] for c in clients) == ["DEADLINE_EXCEEDED", "INTERNAL", "NOT_FOUND", "UNKNOWN"]
    for client in clients:
        assert client.status.status_code == StatusCode.ERROR
    stream_client, stream_server = pair(spans, STREAM)
    assert stream_client.attributes["error.type"] == "UNKNOWN"
    assert [e.attributes["exception.type"] for e in stream_server.events] == ["RuntimeError"]


def test_aio_cancelled_and_dropped_streams(spans: Any, grpc_instrumentor: Any) -> None:
    async def body(chan: Any, port: int) -> None:
        responses = call(chan, "unary_stream", STREAM)(b"forever")
        assert await responses.read() == b"tick"
        responses.cancel()
        dropped = call(chan, "unary_stream", STREAM)(b"forever")
        assert await dropped.read() == b"tick"
        del dropped  # grpc.aio keeps it running (bare too) until the channel closes: then it ends

    run_aio(body)
    clients, servers = pair(spans, STREAM, count=2)
    assert [c.attributes["rpc.response.status_code"] for c in clients] == ["CANCELLED", "CANCELLED"]
    assert [s.attributes["rpc.response.status_code"] for s in servers] == ["CANCELLED", "CANCELLED"]
    assert all(s.status.status_code == StatusCode.UNSET for s in servers)


def test_aio_client_interceptors(spans: Any, grpc_instrumentor: Any) -> None:
    class AddHeader(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            metadata = grpc.aio.Metadata(*(details.metadata or ()), ("x-added", "1"))
            return await continuation(details._replace(metadata=metadata), request)

    ports = []

    async def body(chan: Any, port: int) -> None:
        ports.append(port)
        assert await call(chan, "unary_unary", UNARY)(b"i") == b"i"
        with pytest.raises(grpc.aio.AioRpcError):
            await call(chan, "unary_unary", UNARY)(b"abort:NOT_FOUND")

    run_aio(body, interceptors=[AddHeader()])
    clients, servers = pair(spans, UNARY, count=2)
    assert sorted(c.attributes["rpc.response.status_code"] for c in clients) == ["NOT_FOUND", "OK"]
    assert all(s.parent.span_id in {c.context.span_id for c in clients} for s in servers)
    assert seen_metadata[-1]["x-added"] == "1" and "traceparent" in seen_metadata[-1]


def test_aio_b3_propagator(spans: Any, grpc_instrumentor: Any) -> None:
    async def body(chan: Any, port: int) -> None:
        await call(chan, "unary_unary", UNARY)(b"b3")

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(B3MultiFormat())
    try:
        run_aio(body)
    finally:
        propagate.set_global_textmap(previous)
    client, server = pair(spans, UNARY)
    assert server.parent.span_id == client.context.span_id
    assert seen_metadata[-1]["x-b3-spanid"] == format(client.context.span_id, "016x")


def test_the_otlp_grpc_exporter_is_not_traced(spans: Any, instrument: Any) -> None:
    """The exporter runs under the SDK's suppression key: its Export calls make no spans."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    from tests.support.receiver import OTLPReceiver

    with OTLPReceiver(grpc=True) as receiver:  # a collector: not ours to trace (registered before patching)
        instrument(GrpcInstrumentor)
        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{receiver.grpc_port}", insecure=True)
        with tracer.start_as_current_span("to-export"):
            pass
        finished = spans.get()
        with suppressed():  # what the span processors do around export()
            assert exporter.export(finished) == SpanExportResult.SUCCESS
        exporter.shutdown()
        receiver.wait_for_count(1)
    assert [s.name for s in spans.get()] == ["to-export"]


def test_threads_do_not_mix_contexts(spans: Any, channel: Any) -> None:
    stub = call(channel, "unary_unary", UNARY)

    def work(i: int) -> None:
        with tracer.start_as_current_span(f"caller-{i}"):
            stub(b"x")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    clients, servers = pair(spans, UNARY, count=4)
    callers = {s.context.span_id: s for s in spans.get() if s.name.startswith("caller-")}
    for client in clients:
        assert client.parent.span_id in callers
    assert {s.parent.span_id for s in servers} == {c.context.span_id for c in clients}


# --------------------------------------------------------------------------
# The instrumentor contract (tests/support/contract.py)

from tests.support.contract import Contract  # noqa: E402

_contract: Dict[str, Any] = {}


def _plain_unary(request: bytes, context: Any) -> bytes:
    if request == b"abort":
        context.abort(grpc.StatusCode.NOT_FOUND, "not here")
    return request


def _contract_target() -> str:
    """A server of our own, never traced (registered through the library's unwrapped method)."""
    if "port" not in _contract:
        import grpc._server

        register = inspect.getattr_static(grpc._server._Server, "add_generic_rpc_handlers")
        register = getattr(register, "__wrapped__", register)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handlers = dict(sync_handlers(), Unary=grpc.unary_unary_rpc_method_handler(_plain_unary, _ident, _ident))
        register(server, (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        _contract["port"] = server.add_insecure_port("127.0.0.1:0")
        server.start()
        _contract["server"] = server
    return f"127.0.0.1:{_contract['port']}"


def _channel() -> Any:
    if "channel" not in _contract:
        _contract["channel"] = grpc.insecure_channel(_contract_target())
    return _contract["channel"]


def contract_unary() -> Any:
    return call(_channel(), "unary_unary", UNARY)(b"contract", metadata=(("k", "v"),))


def contract_with_call() -> Any:
    return call(_channel(), "stream_unary", COLLECT).with_call(iter([b"a", b"b"]))[0]


async def contract_aio_unary() -> Any:
    async with grpc.aio.insecure_channel(_contract_target()) as chan:
        return await call(chan, "unary_unary", UNARY)(b"aio")


def contract_error() -> Any:
    try:
        return call(_channel(), "unary_unary", UNARY)(b"abort")
    except grpc.RpcError as error:  # the library's message carries a timestamp: compare what is stable
        raise RuntimeError(f"{type(error).__name__} {error.code()} {error.details()}") from None


_GRPC_CONTRACT = Contract(
    instrumentor="autotrace.instrumentors.grpc:GrpcInstrumentor",
    module="grpc",
    targets=[f"{cls.__module__}:{cls.__qualname__}.{name}" for cls, name in _targets()],
    calls=[contract_unary, contract_with_call, contract_aio_unary],
    error_call=contract_error,
    spans_per_call=1,
).install(globals())


def _entry_point_registered() -> bool:
    from importlib.metadata import entry_points

    try:
        found = entry_points(group="autotrace.instrumentors")
    except TypeError:  # Python 3.9
        found = entry_points().get("autotrace.instrumentors", [])
    return any(e.name == "grpc" for e in found)


if not _entry_point_registered():
    def _needs_entry_point(self: Any) -> None:
        from tests.support.services import in_ci

        message = "the grpc entry point is not in pyproject.toml (autotrace.instrumentors)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)

    _GRPC_CONTRACT.test_patched_lazily_under_autotrace_run = _needs_entry_point  # type: ignore[attr-defined]
