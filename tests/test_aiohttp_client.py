"""The aiohttp client instrumentor against real HTTP servers on 127.0.0.1.

The shared threaded test server (tests/support/http_server.py) for the HTTP
routes; a raw asyncio server for what it cannot do (a body cut short, a
keep-alive connection dropped) and a listening socket whose backlog is full
(a connect that never completes).
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
import weakref
from importlib.metadata import entry_points
from typing import Any, Awaitable, Callable, Iterator, List, Tuple

import aiohttp
import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from packaging.version import Version

if Version(aiohttp.__version__) < Version("3.12"):
    pytest.skip("the instrumentor needs aiohttp >= 3.12 (client middlewares)", allow_module_level=True)

from autotrace.instrumentors.aiohttp_client import AiohttpClientInstrumentor  # noqa: E402
from autotrace.kit import error_type  # noqa: E402
from tests.support.contract import Contract  # noqa: E402
from tests.support.http_server import HTTPTestServer as Server  # noqa: E402
from tests.support.services import in_ci  # noqa: E402

PayloadError = "aiohttp.client_exceptions.ClientPayloadError"
TIMEOUT = error_type(asyncio.TimeoutError())  # "TimeoutError" (3.11+: the built-in) or "asyncio.TimeoutError"
TIMEOUT_EVENT = "TimeoutError" if asyncio.TimeoutError is TimeoutError else "asyncio.exceptions.TimeoutError"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


@pytest.fixture
def traced(instrument: Any) -> AiohttpClientInstrumentor:
    return instrument(AiohttpClientInstrumentor)


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(test())


async def fetch(url: str, **kwargs: Any) -> Tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(kwargs.pop("method", "GET"), url, **kwargs) as response:
            return response.status, await response.read()


def client_spans(spans: Any) -> List[Any]:
    return sorted((s for s in spans.get() if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)


def parse_traceparent(value: str) -> Tuple[int, int]:
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RawServer:
    """An asyncio server answering each request with ``reply(n)`` bytes (n: requests on that connection), then
    closing the connection if ``close`` says so."""

    def __init__(self, reply: Callable[[int], bytes], close: Callable[[int], bool]) -> None:
        self.reply, self.close, self.connections = reply, close, 0

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        count = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                count += 1
                writer.write(self.reply(count))
                await writer.drain()
                if self.close(count):
                    await asyncio.sleep(0.05)
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


CUT_SHORT = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab"  # then the connection closes: 2 of 10 bytes


# -- requests and their attributes ----------------------------------------------------------


def test_success_attributes_and_injection(server: Server, traced: Any, spans: Any) -> None:
    assert run(lambda: fetch(server.url("/ok?x=1"))) == (200, b"hello")
    span = spans.one()
    assert span.name == "GET" and span.kind == SpanKind.CLIENT
    assert span.status.status_code == StatusCode.UNSET
    assert span.instrumentation_scope.name == "autotrace.instrumentors.aiohttp_client"
    attrs = dict(span.attributes)
    assert attrs == {
        "http.request.method": "GET",
        "url.full": server.url("/ok?x=1"),
        "server.address": "127.0.0.1",
        "server.port": server.port,
        "user_agent.original": attrs["user_agent.original"],
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
    }
    assert attrs["user_agent.original"].startswith("Python/") and "aiohttp/" in attrs["user_agent.original"]
    trace_id, span_id = parse_traceparent(server.headers_for("/ok?x=1")[-1]["traceparent"])
    assert (trace_id, span_id) == (span.context.trace_id, span.context.span_id)


def test_parent_and_span_current_in_flight(server: Server, traced: Any, spans: Any) -> None:
    seen: List[Any] = []

    async def body() -> Any:  # sent by aiohttp's writer task, while the request is in flight
        seen.append(trace.get_current_span())
        yield b"payload"

    async def test() -> Any:
        with trace.get_tracer("test").start_as_current_span("parent") as parent:
            await fetch(server.url("/ok?posted"), method="POST", data=body())
            after = trace.get_current_span()
        return parent, after

    parent, after = run(test)
    client = spans.one("POST")
    assert client.parent.span_id == parent.get_span_context().span_id
    assert client.context.trace_id == parent.get_span_context().trace_id
    assert seen[0].get_span_context().span_id == client.context.span_id
    assert after is parent  # detached again once the response headers are in


@pytest.mark.filterwarnings("ignore:Inheritance class MySession")
def test_every_way_of_calling(server: Server, instrument: Any, spans: Any) -> None:
    class MySession(aiohttp.ClientSession):
        pass

    async def test() -> None:
        early = aiohttp.ClientSession()  # created before patching
        instrument(AiohttpClientInstrumentor)
        async with early.get(server.url("/ok")) as response:
            await response.read()
        await early.close()
        async with MySession() as session:
            await (await session.post(server.url("/ok"), data=b"x")).read()
            await (await session.put(server.url("/ok"), json={"a": 1})).read()
            async with session.delete(server.url("/ok")):
                pass
            await session.head(server.url("/ok"))
        async with aiohttp.request("PATCH", server.url("/ok")) as response:
            await response.read()

    run(test)
    assert [s.name for s in client_spans(spans)] == ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]
    assert all(s.end_time is not None for s in spans.get())


@pytest.mark.parametrize("code", [404, 500])
def test_error_status(server: Server, traced: Any, spans: Any, code: int) -> None:
    assert run(lambda: fetch(server.url(f"/status/{code}")))[0] == code
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == code
    assert span.attributes["error.type"] == str(code)
    assert [e.name for e in span.events] == []


def test_raise_for_status_keeps_the_status_as_error_type(server: Server, traced: Any, spans: Any) -> None:
    async def test() -> None:
        async with aiohttp.ClientSession(raise_for_status=True) as session:
            await session.get(server.url("/status/404"))

    with pytest.raises(aiohttp.ClientResponseError):
        run(test)
    assert spans.one().attributes["error.type"] == "404"


def test_nonstandard_method(server: Server, traced: Any, spans: Any) -> None:
    run(lambda: fetch(server.url("/ok"), method="PURGE"))
    span = spans.one()
    assert span.name == "_OTHER"
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "PURGE"


def test_redirects_each_hop_a_span(server: Server, traced: Any, spans: Any) -> None:
    async def test() -> Any:
        with trace.get_tracer("test").start_as_current_span("parent") as parent:
            async with aiohttp.ClientSession() as session:
                async with session.get(server.url("/redirect/3")) as response:
                    assert len(response.history) == 3
                    assert await response.read() == b"hello"
        return parent

    parent = run(test)
    hops = client_spans(spans)
    assert [s.attributes["url.full"] for s in hops] == [
        server.url("/redirect/3"), server.url("/redirect/2"), server.url("/redirect/1"), server.url("/ok"),
    ]
    assert [s.attributes["http.response.status_code"] for s in hops] == [302, 302, 302, 200]
    assert [s.attributes.get("http.request.resend_count") for s in hops] == [None, 1, 2, 3]
    assert {s.parent.span_id for s in hops} == {parent.get_span_context().span_id}  # siblings
    assert all(a.end_time <= b.start_time for a, b in zip(hops, hops[1:]))
    paths = ("/redirect/3", "/redirect/2", "/redirect/1", "/ok")
    sent = [parse_traceparent(server.headers_for(p)[-1]["traceparent"])[1] for p in paths]
    assert sent == [s.context.span_id for s in hops]  # each hop carried its own traceparent
    assert all(s.status.status_code == StatusCode.UNSET for s in hops)


def test_no_redirect_follow_is_one_span(server: Server, traced: Any, spans: Any) -> None:
    assert run(lambda: fetch(server.url("/redirect/2"), allow_redirects=False))[0] == 302
    assert spans.one().attributes["http.response.status_code"] == 302


def test_each_session_call_counts_its_own_hops(server: Server, traced: Any, spans: Any) -> None:
    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            await (await session.get(server.url("/redirect/1"))).read()
            await (await session.get(server.url("/ok"))).read()

    run(test)
    assert [s.attributes.get("http.request.resend_count") for s in client_spans(spans)] == [None, 1, None]


def test_keep_alive_retry_is_a_resend(traced: Any, spans: Any) -> None:
    """aiohttp sends an idempotent request once more when a reused keep-alive connection turns out dropped."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def test() -> None:
        # first connection: answers once, then drops the second request; the second connection answers
        async with RawServer(lambda n: ok if n == 1 else b"", close=lambda n: n == 2) as raw:
            async with aiohttp.ClientSession() as session:
                assert await (await session.get(raw.url + "/a")).read() == b"ok"
                assert await (await session.get(raw.url + "/b")).read() == b"ok"
            assert raw.connections == 2

    run(test)
    first, dropped, resent = client_spans(spans)
    assert first.attributes["http.response.status_code"] == 200
    assert dropped.attributes["error.type"] == "aiohttp.client_exceptions.ServerDisconnectedError"
    assert "http.request.resend_count" not in dropped.attributes
    assert resent.attributes["http.request.resend_count"] == 1
    assert resent.attributes["http.response.status_code"] == 200
    assert dropped.parent == resent.parent


def test_user_middlewares_run_and_their_resends_are_spans(server: Server, traced: Any, spans: Any) -> None:
    calls: List[str] = []

    async def session_level(request: Any, handler: Any) -> Any:
        calls.append("session")
        request.headers["X-Mine"] = "1"
        return await handler(request)

    async def twice(request: Any, handler: Any) -> Any:  # a user retry: two physical requests
        calls.append("call")
        (await handler(request)).release()
        return await handler(request)

    async def test() -> None:
        async with aiohttp.ClientSession(middlewares=(session_level,)) as session:
            await (await session.get(server.url("/ok?mw1"))).read()
            await (await session.get(server.url("/ok?mw2"), middlewares=(twice,))).read()

    run(test)
    assert calls == ["session", "call"]
    assert server.headers_for("/ok?mw1")[-1]["x-mine"] == "1"
    assert [s.attributes.get("http.request.resend_count") for s in client_spans(spans)] == [None, None, 1]
    sent = [parse_traceparent(h["traceparent"])[1] for h in server.headers_for("/ok?mw2")[-2:]]
    assert sent == [s.context.span_id for s in client_spans(spans)[1:]]


# -- response bodies --------------------------------------------------------------------------


def test_streaming_span_ends_when_fully_read(server: Server, traced: Any, spans: Any) -> None:
    async def test() -> Tuple[List[Any], int]:
        async with aiohttp.ClientSession() as session:
            response = await session.get(server.url("/stream"))
            before = spans.get()  # headers are in, the body is not
            assert [c async for c in response.content.iter_chunked(2)] == [b"ab", b"cd", b"ef"]
            ended = time.time_ns()
            await asyncio.sleep(0.1)
            response.release()
            return before, ended

    before, ended = run(test)
    assert before == []
    span = spans.one()
    assert span.attributes["http.response.status_code"] == 200
    assert span.end_time <= ended  # at the end of the body, not at the release
    assert span.end_time - span.start_time >= 0.25e9  # covers the slow body
    assert span.status.status_code == StatusCode.UNSET


def test_span_covers_a_body_read_inside_async_with(server: Server, traced: Any, spans: Any) -> None:
    assert run(lambda: fetch(server.url("/chunked"))) == (200, b"abcdef")
    span = spans.one()
    assert span.end_time - span.start_time >= 0.25e9
    assert span.status.status_code == StatusCode.UNSET


@pytest.mark.parametrize("how", ["release", "close", "async with"])
def test_released_early_ends_the_span_without_error(server: Server, traced: Any, spans: Any, how: str) -> None:
    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            if how == "async with":
                async with session.get(server.url("/stream")) as response:
                    assert await response.content.read(2) == b"ab"
                    assert spans.get() == []
                return
            response = await session.get(server.url("/stream"))
            assert await response.content.read(2) == b"ab"
            assert spans.get() == []
            response.release() if how == "release" else response.close()
            assert len(spans.get()) == 1  # at once

    run(test)
    span = spans.one()
    assert span.status.status_code == StatusCode.UNSET and "error.type" not in span.attributes
    assert span.end_time - span.start_time < 0.25e9  # not the whole body


@pytest.mark.parametrize("how", ["read", "iter_chunked"])
def test_error_mid_body_is_recorded(traced: Any, spans: Any, how: str) -> None:
    async def test() -> None:
        async with RawServer(lambda n: CUT_SHORT, close=lambda n: True) as raw:
            async with aiohttp.ClientSession() as session:
                async with session.get(raw.url + "/cut") as response:
                    if how == "read":
                        await response.read()
                    else:
                        async for _ in response.content.iter_chunked(1):
                            pass

    with pytest.raises(aiohttp.ClientPayloadError):
        run(test)
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["error.type"] == PayloadError
    assert [e.attributes["exception.type"] for e in span.events] == [PayloadError]


def test_user_error_inside_async_with_is_not_the_requests(server: Server, traced: Any, spans: Any) -> None:
    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url("/stream")):
                raise KeyError("the program's own")

    with pytest.raises(KeyError):
        run(test)
    assert "error.type" not in spans.one().attributes


def test_abandoned_response_ends_when_collected(server: Server, traced: Any, spans: Any) -> None:
    async def test() -> Any:
        async with aiohttp.ClientSession() as session:
            response = await session.get(server.url("/stream"))
            assert spans.get() == []
            gone = weakref.ref(response)
            del response
        gc.collect()  # (the open connection referred to the response until the session closed)
        return gone

    gone = run(test)
    assert gone() is None  # the held span does not keep the response alive
    assert len(spans.get()) == 1


def test_empty_bodies_end_at_once(server: Server, traced: Any, spans: Any) -> None:
    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            head = await session.head(server.url("/ok"))  # kept: neither released nor collected
            assert len(spans.get()) == 1
            empty = await session.get(server.url("/status/204"))
            assert len(spans.get()) == 2
            assert (head.status, empty.status) == (200, 204)

    run(test)


def test_websocket_span_ends_with_the_handshake(traced: Any, spans: Any) -> None:
    from aiohttp import web

    async def echo(request: Any) -> Any:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str("echo:" + message.data)
        return ws

    async def test() -> Any:
        app = web.Application()
        app.router.add_get("/ws", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect("http://127.0.0.1:%d/ws" % runner.addresses[0][1]) as ws:
                    during = len(spans.get())
                    await ws.send_str("hi")
                    return during, await ws.receive_str()
        finally:
            await runner.cleanup()

    assert run(test) == (1, "echo:hi")
    span = spans.one()
    assert span.attributes["http.response.status_code"] == 101
    assert span.status.status_code == StatusCode.UNSET


# -- failures ---------------------------------------------------------------------------------------


def test_connection_refused(traced: Any, spans: Any) -> None:
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        run(lambda: fetch(f"http://127.0.0.1:{closed_port()}/x"))
    assert type(caught.value) is aiohttp.ClientConnectorError  # unchanged
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "aiohttp.client_exceptions.ClientConnectorError"
    assert "http.response.status_code" not in span.attributes
    assert [e.attributes["exception.type"] for e in span.events] == ["aiohttp.client_exceptions.ClientConnectorError"]


@pytest.mark.parametrize("timeout, error", [
    (aiohttp.ClientTimeout(total=0.2), TIMEOUT),
    (aiohttp.ClientTimeout(sock_read=0.2), "aiohttp.client_exceptions.SocketTimeoutError"),
])
def test_timeout_waiting_for_headers(server: Server, traced: Any, spans: Any, timeout: Any, error: str) -> None:
    with pytest.raises(asyncio.TimeoutError):
        run(lambda: fetch(server.url("/slow/1"), timeout=timeout))
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == error
    assert [e.name for e in span.events] == ["exception"]


def test_total_timeout_while_connecting_is_a_timeout(traced: Any, spans: Any) -> None:
    """The total timeout cancels the connect; aiohttp's timer turns that into the caller's TimeoutError."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]  # fill the accept queue: the next connect hangs
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        time.sleep(0.1)
        try:
            with pytest.raises(asyncio.TimeoutError) as caught:
                run(lambda: fetch(f"http://127.0.0.1:{port}/x", timeout=aiohttp.ClientTimeout(total=0.3)))
        finally:
            for filler in fillers:
                filler.close()
    assert not isinstance(caught.value, aiohttp.ClientError)  # the total timeout, not a connect one
    span = spans.one()
    assert span.attributes["error.type"] == TIMEOUT
    assert [e.attributes["exception.type"] for e in span.events] == [TIMEOUT_EVENT]


def test_total_timeout_mid_body(server: Server, traced: Any, spans: Any) -> None:
    with pytest.raises(asyncio.TimeoutError):
        run(lambda: fetch(server.url("/stream"), timeout=aiohttp.ClientTimeout(total=0.2)))
    span = spans.one()
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["error.type"] == TIMEOUT
    assert span.status.status_code == StatusCode.ERROR


@pytest.mark.parametrize("while_", ["waiting for headers", "reading the body"])
def test_cancellation(server: Server, traced: Any, spans: Any, while_: str) -> None:
    async def test() -> None:
        async with aiohttp.ClientSession() as session:
            if while_ == "waiting for headers":
                task = asyncio.ensure_future(session.get(server.url("/slow/1")))
            else:
                response = await session.get(server.url("/stream"))  # the headers are in
                task = asyncio.ensure_future(response.read())
            await asyncio.sleep(0.1)
            task.cancel()
            await task

    with pytest.raises(asyncio.CancelledError):
        run(test)
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "asyncio.CancelledError"
    assert ("http.response.status_code" in span.attributes) == (while_ == "reading the body")


# -- privacy, propagation, configuration ---------------------------------------------------------------


def test_secrets_in_userinfo_and_query_never_exported(
    server: Server, monkeypatch: Any, instrument: Any, spans: Any
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", "Authorization")
    instrument(AiohttpClientInstrumentor)
    url = f"http://alice:s3cret@127.0.0.1:{server.port}/ok?token=abc123&x=1&api_key=k9k9"
    assert run(lambda: fetch(url))[0] == 200
    span = spans.one()
    assert span.attributes["url.full"] == f"http://127.0.0.1:{server.port}/ok?token=REDACTED&x=1&api_key=REDACTED"
    assert tuple(span.attributes["http.request.header.authorization"]) == ("REDACTED",)
    exported = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in span.attributes.items()})
    for secret in ("alice", "s3cret", "abc123", "k9k9", "YWxpY2U6czNjcmV0"):  # the last: base64 of alice:s3cret
        assert secret not in exported and secret not in span.name
    assert server.headers_for("/ok?token=abc123&x=1&api_key=k9k9")[-1]["authorization"] == "Basic YWxpY2U6czNjcmV0"


def test_callers_headers_untouched(server: Server, traced: Any, spans: Any) -> None:
    headers = {"X-Mine": "1"}
    options = {"headers": headers}

    async def test() -> None:
        async with aiohttp.ClientSession(headers={"X-Session": "s"}) as session:
            await (await session.get(server.url("/ok?own"), **options)).read()
            await (await session.get(server.url("/redirect/1"), headers=headers)).read()
            assert dict(session.headers) == {"X-Session": "s"}

    run(test)
    assert headers == {"X-Mine": "1"} and options == {"headers": headers}
    seen = server.headers_for("/ok?own")[-1]
    assert seen["x-mine"] == "1" and seen["x-session"] == "s" and "traceparent" in seen


def test_b3_when_configured(server: Server, traced: Any, spans: Any) -> None:
    from opentelemetry.propagators.b3 import B3MultiFormat

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(B3MultiFormat())
    try:
        run(lambda: fetch(server.url("/ok?b3")))
    finally:
        propagate.set_global_textmap(previous)
    assert int(server.headers_for("/ok?b3")[-1]["x-b3-spanid"], 16) == spans.one().context.span_id


def test_baggage_propagated(server: Server, traced: Any, spans: Any) -> None:
    from opentelemetry import baggage

    token = context.attach(baggage.set_baggage("tenant", "t1"))
    try:
        run(lambda: fetch(server.url("/ok?baggage")))
    finally:
        context.detach(token)
    assert server.headers_for("/ok?baggage")[-1]["baggage"] == "tenant=t1"


@pytest.mark.parametrize("variable", ["OTEL_PYTHON_AIOHTTP_CLIENT_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS"])
def test_excluded_urls(server: Server, monkeypatch: Any, instrument: Any, spans: Any, variable: str) -> None:
    monkeypatch.setenv(variable, "/health,status/4")
    instrument(AiohttpClientInstrumentor)

    async def test() -> None:
        for path in ("/health", "/status/404", "/ok?kept"):
            await fetch(server.url(path))

    run(test)
    assert [s.attributes["url.full"] for s in spans.get()] == [server.url("/ok?kept")]
    assert "traceparent" not in server.headers_for("/health")[-1]


def test_configured_otlp_endpoint_is_not_traced(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", server.url("/v1/traces"))
    instrument(AiohttpClientInstrumentor)

    async def test() -> None:
        await fetch(server.url("/v1/traces"), method="POST", data=b"x")
        await fetch(server.url("/ok?other"))

    run(test)
    assert [s.attributes["url.full"] for s in spans.get()] == [server.url("/ok?other")]


def test_header_capture_with_redaction(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", "X-Custom,Authorization,X-Api-Token")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE", "X-Resp,Set-Cookie")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", ".*token.*")
    instrument(AiohttpClientInstrumentor)
    headers = {"X-Custom": "c1", "Authorization": "Bearer secret", "X-Api-Token": "t0k"}
    run(lambda: fetch(server.url("/headers"), headers=headers))
    attrs = spans.one().attributes
    assert tuple(attrs["http.request.header.x-custom"]) == ("c1",)
    assert tuple(attrs["http.request.header.authorization"]) == ("REDACTED",)
    assert tuple(attrs["http.request.header.x-api-token"]) == ("REDACTED",)
    assert tuple(attrs["http.response.header.x-resp"]) == ("r1",)
    assert tuple(attrs["http.response.header.set-cookie"]) == ("REDACTED",)


def test_http_dup(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    instrument(AiohttpClientInstrumentor)
    run(lambda: fetch(server.url("/status/404")))
    attrs = spans.one().attributes
    assert attrs["http.method"] == attrs["http.request.method"] == "GET"
    assert attrs["http.url"] == attrs["url.full"] == server.url("/status/404")
    assert attrs["net.peer.name"] == "127.0.0.1" and attrs["net.peer.port"] == server.port
    assert attrs["http.status_code"] == attrs["http.response.status_code"] == 404
    assert attrs["http.flavor"] == "1.1"
    assert attrs["http.user_agent"] == attrs["user_agent.original"]


def test_respects_suppression(server: Server, traced: Any, spans: Any) -> None:
    from autotrace.instrumentation import suppressed

    async def test() -> None:
        with suppressed(http=True):
            await fetch(server.url("/ok?suppressed"))
        with suppressed():
            await fetch(server.url("/ok?suppressed"))

    run(test)
    assert spans.get() == []
    assert all("traceparent" not in h for h in server.headers_for("/ok?suppressed"))


def test_sampled_out_still_propagates(server: Server, traced: Any, spans: Any) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    parent = NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0)))
    token = context.attach(set_span_in_context(parent))
    try:
        run(lambda: fetch(server.url("/ok?unsampled")))
    finally:
        context.detach(token)
    assert spans.get() == []
    assert server.headers_for("/ok?unsampled")[-1]["traceparent"].startswith(f"00-{0xABC:032x}-")


def test_unpatch_restores(server: Server, spans: Any) -> None:
    instrumentor = AiohttpClientInstrumentor().instrument()
    instrumentor.instrument()  # a second call patches nothing twice
    run(lambda: fetch(server.url("/ok?patched")))
    assert len(spans.get()) == 1
    instrumentor.unpatch()
    run(lambda: fetch(server.url("/ok?unpatched")))
    assert len(spans.get()) == 1
    assert "traceparent" not in server.headers_for("/ok?unpatched")[-1]


# -- the contract -----------------------------------------------------------------------------------

_contract_server: List[Server] = []
_REFUSED = closed_port()


def _url(path: str) -> str:
    if not _contract_server:
        _contract_server.append(Server())
    return _contract_server[0].url(path)


async def contract_get() -> Any:
    return await fetch(_url("/ok?contract"))


async def contract_redirected_stream() -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.get(_url("/redirect/1")) as response:
            first = await response.read()
        response = await session.get(_url("/stream"))
        chunks = [c async for c in response.content.iter_chunked(2)]
        response.release()
        return first, chunks


async def contract_refused() -> Any:
    return await fetch(f"http://127.0.0.1:{_REFUSED}/x")


_CONTRACT = Contract(
    instrumentor="autotrace.instrumentors.aiohttp_client:AiohttpClientInstrumentor",
    module="aiohttp",
    targets=[
        "aiohttp.client_reqrep:ClientResponse._response_eof",
        "aiohttp.client_reqrep:ClientResponse.release",
        "aiohttp.client_reqrep:ClientResponse.close",
    ],
    async_targets=["aiohttp.client:ClientSession._request"],
    calls=[contract_get, contract_redirected_stream],
    error_call=contract_refused,
    spans_per_call=[1, 3],
).install(globals())


def _entry_point_registered() -> bool:
    try:
        found = entry_points(group="autotrace.instrumentors")
    except TypeError:  # Python 3.9
        found = entry_points().get("autotrace.instrumentors", [])
    return any(e.name == "aiohttp" and "aiohttp_client" in e.value for e in found)


if not _entry_point_registered():
    def _needs_entry_point(self: Any) -> None:
        message = ('the entry point is not in pyproject.toml: '
                   'aiohttp = "autotrace.instrumentors.aiohttp_client:AiohttpClientInstrumentor"')
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)

    _CONTRACT.test_patched_lazily_under_autotrace_run = _needs_entry_point  # type: ignore[attr-defined]
