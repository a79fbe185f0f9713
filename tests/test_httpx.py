"""The httpx and httpx2 instrumentors against the real HTTP test server on 127.0.0.1.

Every test runs for both libraries (``lib``): httpx, and its fork httpx2 (Python 3.11+;
skipped with that reason on older Pythons, a failure under CI=true when missing on 3.11+).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import importlib.util
import json
import socket
import sys
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.httpx import HttpxInstrumentor
from autotrace.instrumentors.httpx2 import Httpx2Instrumentor
from tests.support.contract import FAULT, Contract
from tests.support.http_server import HTTPTestServer as Server
from tests.support.services import in_ci


class Lib:
    """One library under test: its module, its instrumentor class, the prefix of its exception names."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.module: Any = importlib.import_module(name)
        self.cls = HttpxInstrumentor if name == "httpx" else Httpx2Instrumentor

    def __repr__(self) -> str:
        return self.name


def load(name: str) -> Lib:
    if name == "httpx2" and sys.version_info < (3, 11):
        pytest.skip("httpx2 needs Python 3.11+")
    try:
        return Lib(name)
    except ImportError:
        if in_ci():
            pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{name} is not installed")


@pytest.fixture(params=["httpx", "httpx2"])
def lib(request: Any) -> Lib:
    return load(request.param)


@pytest.fixture
def traced(lib: Lib, instrument: Any) -> Lib:
    instrument(lib.cls)
    return lib


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


def client_spans(spans: Any) -> List[Any]:
    return sorted((s for s in spans.get() if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)


def parse_traceparent(value: str) -> Tuple[int, int]:
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)


def sent_span_id(server: Server, path: str) -> int:
    return parse_traceparent(server.headers_for(path)[-1]["traceparent"])[1]


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def exported_text(spans: Any) -> str:
    return json.dumps(
        [[s.name, dict(s.attributes), [(e.name, dict(e.attributes)) for e in s.events], s.status.description]
         for s in spans.get()], default=str,
    )


# -- requests and their attributes ------------------------------------------------


def test_success_attributes_and_injection(server: Server, traced: Lib, spans: Any) -> None:
    with traced.module.Client() as client:
        response = client.get(server.url("/ok?x=1"))
    assert response.text == "hello"
    span = spans.one()
    assert span.name == "GET" and span.kind == SpanKind.CLIENT
    assert span.status.status_code == StatusCode.UNSET
    assert span.instrumentation_scope.name == f"autotrace.instrumentors.{traced.name}"
    attrs = dict(span.attributes)
    assert attrs == {
        "http.request.method": "GET",
        "url.full": server.url("/ok?x=1"),
        "server.address": "127.0.0.1",
        "server.port": server.port,
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
        "user_agent.original": f"python-{traced.name}/{traced.module.__version__}",
    }
    # the traceparent the server received is the client span's
    trace_id, span_id = parse_traceparent(server.headers_for("/ok?x=1")[-1]["traceparent"])
    assert (trace_id, span_id) == (span.context.trace_id, span.context.span_id)


def test_async_client(server: Server, traced: Lib, spans: Any) -> None:
    async def main() -> Any:
        async with traced.module.AsyncClient() as client:
            return await client.post(server.url("/ok?async"), content=b"body")

    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        response = asyncio.run(main())
    assert response.status_code == 200
    span = client_spans(spans)[0]
    assert span.name == "POST" and span.attributes["http.response.status_code"] == 200
    assert span.parent.span_id == parent.get_span_context().span_id
    assert sent_span_id(server, "/ok?async") == span.context.span_id


def test_module_functions(server: Server, traced: Lib, spans: Any) -> None:
    httpx = traced.module
    for call in (httpx.get, httpx.post, httpx.put, httpx.patch, httpx.delete, httpx.head, httpx.options):
        assert call(server.url("/ok?fn")).status_code == 200
    httpx.request("PURGE", server.url("/ok?fn"))
    names = [s.name for s in client_spans(spans)]
    assert names == ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "_OTHER"]
    other = client_spans(spans)[-1]
    assert other.attributes["http.request.method"] == "_OTHER"
    assert other.attributes["http.request.method_original"] == "PURGE"


def test_client_made_before_patching_and_subclass(server: Server, lib: Lib, instrument: Any, spans: Any) -> None:
    early = lib.module.Client()

    class MyClient(lib.module.Client):
        pass

    instrument(lib.cls)
    early.get(server.url("/ok"))
    MyClient().get(server.url("/ok"))
    early.close()
    assert [s.name for s in client_spans(spans)] == ["GET", "GET"]


@pytest.mark.parametrize("code", [404, 500])
def test_error_status(server: Server, traced: Lib, spans: Any, code: int) -> None:
    assert traced.module.get(server.url(f"/status/{code}")).status_code == code
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == code
    assert span.attributes["error.type"] == str(code)
    assert not span.events


def test_span_current_in_transport_and_parent(server: Server, traced: Lib, spans: Any) -> None:
    httpx = traced.module
    seen: List[Any] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            seen.append(trace.get_current_span())
            return super().handle_request(request)

    hooks = {"response": [lambda response: seen.append(trace.get_current_span())]}
    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        with httpx.Client(transport=Recording(), event_hooks=hooks) as client:
            client.get(server.url("/ok"))
    span = client_spans(spans)[0]
    assert span.parent.span_id == parent.get_span_context().span_id
    assert seen[0].get_span_context().span_id == span.context.span_id  # current while in flight
    assert seen[1] is parent  # hooks run in the caller's context


# -- redirects and resends ---------------------------------------------------------


def test_redirects_each_hop_a_span(server: Server, traced: Lib, spans: Any) -> None:
    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        response = traced.module.get(server.url("/redirect/3"), follow_redirects=True)
    assert response.status_code == 200 and len(response.history) == 3
    hops = client_spans(spans)
    assert [s.attributes["url.full"] for s in hops] == [
        server.url("/redirect/3"), server.url("/redirect/2"), server.url("/redirect/1"), server.url("/ok"),
    ]
    assert [s.attributes["http.response.status_code"] for s in hops] == [302, 302, 302, 200]
    assert [s.attributes.get("http.request.resend_count") for s in hops] == [None, 1, 2, 3]
    assert {s.parent.span_id for s in hops} == {parent.get_span_context().span_id}  # siblings
    assert all(a.end_time <= b.start_time for a, b in zip(hops, hops[1:]))  # each ends before the next hop
    sent = [sent_span_id(server, p) for p in ("/redirect/3", "/redirect/2", "/redirect/1", "/ok")]
    assert sent == [s.context.span_id for s in hops]  # each hop carried its own traceparent
    assert all(s.status.status_code == StatusCode.UNSET for s in hops)


def test_async_redirects(server: Server, traced: Lib, spans: Any) -> None:
    async def main() -> Any:
        async with traced.module.AsyncClient(follow_redirects=True) as client:
            return await client.get(server.url("/redirect/3"))

    assert asyncio.run(main()).status_code == 200
    assert [s.attributes.get("http.request.resend_count") for s in client_spans(spans)] == [None, 1, 2, 3]


def test_no_follow_is_one_span_and_manual_follow_counts(server: Server, traced: Lib, spans: Any) -> None:
    with traced.module.Client() as client:
        response = client.get(server.url("/redirect/1"))
        assert response.status_code == 302
        assert spans.one().attributes["http.response.status_code"] == 302
        client.send(response.next_request)  # following by hand is a resend of the same request
    assert [s.attributes.get("http.request.resend_count") for s in client_spans(spans)] == [None, 1]
    with traced.module.Client() as client:
        client.get(server.url("/ok?fresh"))
    assert "http.request.resend_count" not in client_spans(spans)[-1].attributes  # a new request starts at 0


def test_auth_flow_resend(server: Server, traced: Lib, spans: Any) -> None:
    httpx = traced.module

    class RetryOn404(httpx.Auth):
        def auth_flow(self, request: Any) -> Any:
            response = yield request
            if response.status_code == 404:
                request.url = request.url.copy_with(path="/ok")
                request.headers["Host"] = request.url.netloc.decode()
                yield request  # the same request object, sent again

    assert httpx.get(server.url("/status/404"), auth=RetryOn404()).status_code == 200
    first, second = client_spans(spans)
    assert first.attributes["http.response.status_code"] == 404 and "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1 and second.attributes["url.full"] == server.url("/ok")
    assert sent_span_id(server, "/ok") == second.context.span_id


# -- errors -------------------------------------------------------------------------


def test_connection_refused(traced: Lib, spans: Any) -> None:
    httpx = traced.module
    with pytest.raises(httpx.ConnectError) as caught:
        httpx.get(f"http://127.0.0.1:{closed_port()}/x")
    assert type(caught.value) is httpx.ConnectError  # unchanged
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == f"{traced.name}.ConnectError"
    assert "http.response.status_code" not in span.attributes
    [event] = span.events
    assert event.name == "exception" and event.attributes["exception.type"] == f"{traced.name}.ConnectError"


def test_async_connection_refused(traced: Lib, spans: Any) -> None:
    async def main() -> None:
        async with traced.module.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{closed_port()}/x")

    with pytest.raises(traced.module.ConnectError):
        asyncio.run(main())
    assert spans.one().attributes["error.type"] == f"{traced.name}.ConnectError"


def test_timeout(server: Server, traced: Lib, spans: Any) -> None:
    with pytest.raises(traced.module.ReadTimeout):
        traced.module.get(server.url("/slow/1"), timeout=0.2)
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == f"{traced.name}.ReadTimeout"
    assert [e.name for e in span.events] == ["exception"]


def test_async_timeout(server: Server, traced: Lib, spans: Any) -> None:
    async def main() -> None:
        async with traced.module.AsyncClient(timeout=0.2) as client:
            await client.get(server.url("/slow/1"))

    with pytest.raises(traced.module.ReadTimeout):
        asyncio.run(main())
    assert spans.one().attributes["error.type"] == f"{traced.name}.ReadTimeout"


def test_async_cancellation(server: Server, traced: Lib, spans: Any) -> None:
    async def main() -> None:
        async with traced.module.AsyncClient() as client:
            task = asyncio.ensure_future(client.get(server.url("/slow/1")))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await client.get(server.url("/ok?after"))).status_code == 200

    asyncio.run(main())
    cancelled, after = client_spans(spans)
    assert cancelled.status.status_code == StatusCode.ERROR
    assert cancelled.attributes["error.type"] == "asyncio.CancelledError"
    assert "http.response.status_code" not in cancelled.attributes
    assert after.status.status_code == StatusCode.UNSET and after.parent is None  # the context was restored


# -- streaming: the span ends with the body -----------------------------------------


def test_stream_read_fully(server: Server, traced: Lib, spans: Any) -> None:
    with traced.module.Client() as client:
        with client.stream("GET", server.url("/stream")) as response:
            assert response.status_code == 200
            assert spans.get() == []  # headers are in, the body is not
            assert b"".join(response.iter_bytes()) == b"abcdef"
            after = time.time_ns()
            span = spans.one()
        assert len(spans.get()) == 1  # ended once
    assert span.end_time <= after
    assert span.end_time - span.start_time >= 0.25e9  # covers the slow body
    assert span.status.status_code == StatusCode.UNSET


def test_stream_closed_early(server: Server, traced: Lib, spans: Any) -> None:
    with traced.module.Client() as client:
        with client.stream("GET", server.url("/chunked")) as response:
            chunks = response.iter_raw()  # (httpx2 closes the response when this iterator is dropped)
            assert next(chunks) == b"ab"
            assert spans.get() == []
        span = spans.one()
    assert span.status.status_code == StatusCode.UNSET and not span.events
    assert span.end_time - span.start_time < 0.25e9  # ended at the close, not at the end of the body


def test_stream_error_mid_body(server: Server, traced: Lib, spans: Any) -> None:
    httpx = traced.module
    with httpx.Client(timeout=httpx.Timeout(5, read=0.05)) as client:
        with client.stream("GET", server.url("/stream")) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                response.read()  # the chunks come 0.15 s apart
    span = spans.one()
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["error.type"] == f"{traced.name}.ReadTimeout"
    assert span.status.status_code == StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_non_streamed_body_error_and_duration(server: Server, traced: Lib, spans: Any) -> None:
    httpx = traced.module
    assert httpx.get(server.url("/stream")).content == b"abcdef"
    assert spans.one().end_time - spans.one().start_time >= 0.25e9  # the span covers the body
    spans.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(server.url("/stream"), timeout=httpx.Timeout(5, read=0.05))
    assert spans.one().attributes["error.type"] == f"{traced.name}.ReadTimeout"


def test_async_streams(server: Server, traced: Lib, spans: Any) -> None:
    httpx = traced.module

    async def main() -> None:
        async with httpx.AsyncClient() as client:
            async with client.stream("GET", server.url("/stream")) as response:
                assert spans.get() == []
                assert [c async for c in response.aiter_raw()] == [b"ab", b"cd", b"ef"]
                assert len(spans.get()) == 1
            async with client.stream("GET", server.url("/chunked")) as response:
                async for chunk in response.aiter_bytes():
                    break  # closed early
            assert len(spans.get()) == 2
            async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=0.05)) as slow:
                async with slow.stream("GET", server.url("/stream")) as response:
                    with pytest.raises(httpx.ReadTimeout):
                        await response.aread()

    asyncio.run(main())
    full, early, failed = client_spans(spans)
    assert full.end_time - full.start_time >= 0.25e9 and full.status.status_code == StatusCode.UNSET
    assert early.status.status_code == StatusCode.UNSET and not early.events
    assert failed.attributes["error.type"] == f"{traced.name}.ReadTimeout"


@pytest.mark.parametrize("reading", ["sync, loop dropped", "async, loop dropped", "async, aclosing"])
def test_body_closing_unchanged(lib: Lib, instrument: Any, spans: Any, reading: str) -> None:
    """A body left early: the library's generators and streams are closed exactly when they are without us."""
    httpx = lib.module

    def scenario() -> List[str]:
        events: List[str] = []

        class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
            def __iter__(self) -> Any:
                try:
                    yield from (b"ab", b"cd")
                finally:
                    events.append("generator closed")

            async def __aiter__(self) -> Any:
                try:
                    for chunk in (b"ab", b"cd"):
                        yield chunk
                finally:
                    events.append("generator closed")

            def close(self) -> None:
                events.append("stream closed")

            async def aclose(self) -> None:
                events.append("stream closed")

        def handler(request: Any) -> Any:
            return httpx.Response(200, stream=Body())

        def sync() -> None:
            with httpx.Client(transport=httpx.MockTransport(handler)) as client:
                response = client.send(client.build_request("GET", "http://svc/x"), stream=True)
                for _ in response.iter_raw():
                    break
                events.append("loop left")
                response.close()
                events.append("response closed")

        async def main() -> None:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                async with client.stream("GET", "http://svc/x") as response:
                    if reading == "async, aclosing":
                        chunks = response.aiter_raw()
                        try:  # contextlib.aclosing (Python 3.10+)
                            async for _ in chunks:
                                break
                        finally:
                            await chunks.aclose()
                    else:
                        async for _ in response.aiter_raw():
                            break
                    events.append("loop left")
                events.append("response closed")

        sync() if reading.startswith("sync") else asyncio.run(main())
        return events

    bare = scenario()
    instrument(lib.cls)
    assert scenario() == bare
    span = spans.one()
    assert span.status.status_code == StatusCode.UNSET and not span.events


def test_head_and_empty_body(server: Server, traced: Lib, spans: Any) -> None:
    with traced.module.Client() as client:
        client.head(server.url("/ok"))
        assert [s.name for s in spans.get()] == ["HEAD"]
        response = client.send(client.build_request("GET", server.url("/status/204")), stream=True)
        assert len(spans.get()) == 1
        assert response.read() == b""
        assert len(spans.get()) == 2


def test_abandoned_stream_ends_when_collected(server: Server, traced: Lib, spans: Any) -> None:
    with traced.module.Client() as client:
        response = client.send(client.build_request("GET", server.url("/ok")), stream=True)
        assert spans.get() == []
        del response
        gc.collect()
        assert len(spans.get()) == 1


# -- transports ---------------------------------------------------------------------


def test_mock_transport(traced: Lib, spans: Any) -> None:
    httpx = traced.module
    received: List[Any] = []

    def handler(request: Any) -> Any:
        received.append(dict(request.headers))
        return httpx.Response(503, content=b"no")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert client.get("https://api.example.com/v1/x").status_code == 503
    span = spans.one()
    assert span.attributes["server.address"] == "api.example.com" and span.attributes["server.port"] == 443
    assert span.attributes["http.response.status_code"] == 503 and span.attributes["error.type"] == "503"
    assert parse_traceparent(received[0]["traceparent"]) == (span.context.trace_id, span.context.span_id)


def test_user_transport_async(traced: Lib, spans: Any) -> None:
    httpx = traced.module

    class Echo(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: Any) -> Any:
            return httpx.Response(200, content=request.headers["traceparent"].encode())

    async def main() -> Any:
        async with httpx.AsyncClient(transport=Echo()) as client:
            return await client.get("http://svc.internal:8080/x")

    response = asyncio.run(main())
    span = spans.one()
    assert parse_traceparent(response.text)[1] == span.context.span_id
    assert span.attributes["server.port"] == 8080


def test_one_span_per_physical_request_whatever_lies_below(server: Server, traced: Lib, instrument: Any, spans: Any) -> None:
    """httpx over httpcore is one span; an upstream urllib3 plugin or a requests call inside a transport adds none."""
    requests = pytest.importorskip("requests")
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor

    from autotrace.instrumentors.requests import RequestsInstrumentor

    httpx = traced.module
    instrument(RequestsInstrumentor)
    upstream = URLLib3Instrumentor()
    upstream.instrument()
    try:
        class ViaRequests(httpx.BaseTransport):
            def handle_request(self, request: Any) -> Any:
                reply = requests.get(str(request.url), headers=dict(request.headers))
                return httpx.Response(reply.status_code, content=reply.content)

        httpx.get(server.url("/ok?layers"))
        with httpx.Client(transport=ViaRequests()) as client:
            client.get(server.url("/ok?via-requests"))
        requests.get(server.url("/ok?plain-requests"))  # the others still work on their own
    finally:
        upstream.uninstrument()
    scopes = [s.instrumentation_scope.name for s in client_spans(spans)]
    assert scopes == [f"autotrace.instrumentors.{traced.name}"] * 2 + ["autotrace.instrumentors.requests"]
    assert sent_span_id(server, "/ok?via-requests") == client_spans(spans)[1].context.span_id


def test_starlette_test_client(server: Server, instrument: Any, spans: Any) -> None:
    """Starlette's TestClient is an httpx(2) Client with its own transport: a CLIENT span whose traceparent
    the app receives; an instrumented app's SERVER span is its child, and the app's own outgoing calls
    are traced under that (the HTTP suppression of the transport call does not reach into the app)."""
    testclient = pytest.importorskip("starlette.testclient")
    fastapi = pytest.importorskip("fastapi")
    requests = pytest.importorskip("requests")
    from autotrace.instrumentors.fastapi import FastAPIInstrumentor
    from autotrace.instrumentors.requests import RequestsInstrumentor

    library = load(testclient.httpx.__name__)
    for cls in (library.cls, FastAPIInstrumentor, RequestsInstrumentor):
        instrument(cls)
    app = fastapi.FastAPI()

    @app.get("/")
    def home() -> Any:
        requests.get(server.url("/ok?from-app"))
        return {}

    with testclient.TestClient(app) as client:
        assert client.get("/").status_code == 200
    by_scope = {s.instrumentation_scope.name.rsplit(".", 1)[1]: s for s in spans.get()}
    assert sorted(by_scope) == sorted([library.name, "fastapi", "requests"]), [s.name for s in spans.get()]
    outer, app_span, inner = by_scope[library.name], by_scope["fastapi"], by_scope["requests"]
    assert outer.attributes["server.address"] == "testserver"
    assert app_span.parent.span_id == outer.context.span_id  # the app received the CLIENT span's traceparent
    assert inner.parent.span_id == app_span.context.span_id


# -- privacy, headers, configuration --------------------------------------------------


def test_secrets_never_exported(server: Server, traced: Lib, spans: Any) -> None:
    url = f"http://alice:s3cret@127.0.0.1:{server.port}/ok?api_key=K3Y&x=1&token=T0K"
    traced.module.get(url)
    with pytest.raises(traced.module.ConnectError):
        traced.module.get(f"http://bob:pa55word@127.0.0.1:{closed_port()}/x?api_key=K3Y")
    ok, failed = client_spans(spans)
    assert ok.attributes["url.full"] == (
        f"http://REDACTED:REDACTED@127.0.0.1:{server.port}/ok?api_key=REDACTED&x=1&token=REDACTED"
    )
    assert failed.attributes["url.full"].startswith("http://REDACTED:REDACTED@127.0.0.1:")
    text = exported_text(spans)
    for secret in ("alice", "s3cret", "K3Y", "T0K", "bob", "pa55word"):
        assert secret not in text


def test_callers_headers_untouched(server: Server, traced: Lib, spans: Any) -> None:
    headers = {"X-Mine": "1"}
    with traced.module.Client(headers={"X-Client": "c"}) as client:
        client_headers = dict(client.headers)
        client.get(server.url("/echo"), headers=headers)
        client.get(server.url("/redirect/1"), headers=headers, follow_redirects=True)
        assert dict(client.headers) == client_headers
    assert headers == {"X-Mine": "1"}
    seen = server.headers_for("/echo")[-1]
    assert seen["x-mine"] == "1" and seen["x-client"] == "c" and "traceparent" in seen


def test_b3_and_baggage(server: Server, traced: Lib, spans: Any) -> None:
    from opentelemetry import baggage, context
    from opentelemetry.propagators.b3 import B3MultiFormat

    token = context.attach(baggage.set_baggage("tenant", "t1"))
    try:
        traced.module.get(server.url("/ok?baggage"))
        previous = propagate.get_global_textmap()
        propagate.set_global_textmap(B3MultiFormat())
        try:
            traced.module.get(server.url("/ok?b3"))
        finally:
            propagate.set_global_textmap(previous)
    finally:
        context.detach(token)
    assert server.headers_for("/ok?baggage")[-1]["baggage"] == "tenant=t1"
    assert int(server.headers_for("/ok?b3")[-1]["x-b3-spanid"], 16) == client_spans(spans)[1].context.span_id


def test_excluded_urls(server: Server, lib: Lib, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv(f"OTEL_PYTHON_{lib.name.upper()}_EXCLUDED_URLS", "/health,status/4")
    instrument(lib.cls)
    lib.module.get(server.url("/health"))
    lib.module.get(server.url("/status/404"))
    lib.module.get(server.url("/ok?kept"))
    assert [s.attributes["url.full"] for s in spans.get()] == [server.url("/ok?kept")]
    assert "traceparent" not in server.headers_for("/health")[-1]


@pytest.mark.parametrize("variable", ["OTEL_PYTHON_HTTPX_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS"])
def test_excluded_urls_fallbacks(server: Server, lib: Lib, monkeypatch: Any, instrument: Any, spans: Any, variable: str) -> None:
    monkeypatch.setenv(variable, "/health")
    instrument(lib.cls)
    lib.module.get(server.url("/health?fallback"))
    assert spans.get() == []


def test_httpx2_own_exclusion_wins(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    lib = load("httpx2")
    monkeypatch.setenv("OTEL_PYTHON_HTTPX_EXCLUDED_URLS", "/ok")
    monkeypatch.setenv("OTEL_PYTHON_HTTPX2_EXCLUDED_URLS", "/health")
    instrument(lib.cls)
    lib.module.get(server.url("/health?own"))
    lib.module.get(server.url("/ok?own"))
    assert [s.attributes["url.full"] for s in spans.get()] == [server.url("/ok?own")]


def test_header_capture_with_redaction(server: Server, lib: Lib, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", "X-Custom,Authorization,X-Api-Token")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE", "X-Resp,Set-Cookie")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", ".*token.*")
    instrument(lib.cls)
    lib.module.get(
        server.url("/headers"), headers={"X-Custom": "c1", "Authorization": "Bearer secret", "X-Api-Token": "t0k"}
    )
    attrs = spans.one().attributes
    assert tuple(attrs["http.request.header.x-custom"]) == ("c1",)
    assert tuple(attrs["http.request.header.authorization"]) == ("REDACTED",)
    assert tuple(attrs["http.request.header.x-api-token"]) == ("REDACTED",)
    assert tuple(attrs["http.response.header.x-resp"]) == ("r1",)
    assert tuple(attrs["http.response.header.set-cookie"]) == ("REDACTED",)


def test_http_dup(server: Server, lib: Lib, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    instrument(lib.cls)
    lib.module.get(server.url("/status/404"))
    attrs = spans.one().attributes
    assert attrs["http.method"] == attrs["http.request.method"] == "GET"
    assert attrs["http.url"] == attrs["url.full"] == server.url("/status/404")
    assert attrs["net.peer.name"] == "127.0.0.1" and attrs["net.peer.port"] == server.port
    assert attrs["http.status_code"] == attrs["http.response.status_code"] == 404
    assert attrs["http.flavor"] == "1.1"
    assert attrs["http.user_agent"] == attrs["user_agent.original"]


def test_respects_suppression(server: Server, traced: Lib, spans: Any) -> None:
    from autotrace.instrumentation import suppressed

    with suppressed(http=True):
        traced.module.get(server.url("/ok?suppressed"))
    with suppressed():
        traced.module.get(server.url("/ok?suppressed"))
    assert spans.get() == []
    assert all("traceparent" not in h for h in server.headers_for("/ok?suppressed"))


def test_sampled_out_still_propagates(server: Server, traced: Lib, spans: Any) -> None:
    from opentelemetry import context
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    parent = NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0)))
    token = context.attach(set_span_in_context(parent))
    try:
        traced.module.get(server.url("/ok?unsampled"))
    finally:
        context.detach(token)
    assert spans.get() == []
    assert server.headers_for("/ok?unsampled")[-1]["traceparent"].startswith(f"00-{0xABC:032x}-")


# -- exporter traffic, unpatch --------------------------------------------------------


def test_exporter_caller_is_not_traced(server: Server, traced: Lib, spans: Any) -> None:
    """A request made from exporter code (a module under opentelemetry.exporter) gets no span and no headers."""
    import opentelemetry.exporter  # noqa: F401  (the namespace: exporter frames are looked for only once it exists)

    namespace = {"__name__": "opentelemetry.exporter.autotrace_test_httpx"}
    exec(compile(
        "def export(httpx, url):\n"
        "    httpx.post(url, content=b'x')\n"
        "    async def send():\n"
        "        async with httpx.AsyncClient() as client:\n"
        "            await client.post(url, content=b'y')\n"
        "    return send()\n",
        "<exporter>", "exec"), namespace)
    path = f"/v1/traces?from-exporter-{traced.name}"
    asyncio.run(namespace["export"](traced.module, server.url(path)))
    traced.module.get(server.url("/ok?user"))
    assert [s.attributes["url.full"] for s in spans.get()] == [server.url("/ok?user")]
    assert len(server.headers_for(path)) == 2
    assert all("traceparent" not in h for h in server.headers_for(path))


def test_configured_otlp_endpoint_is_not_traced(server: Server, lib: Lib, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", server.url("/v1/traces"))
    instrument(lib.cls)
    lib.module.post(server.url("/v1/traces"), content=b"x")
    lib.module.get(server.url("/ok?other"))
    assert [s.attributes["url.full"] for s in spans.get()] == [server.url("/ok?other")]
    assert "traceparent" not in server.headers_for("/v1/traces")[-1]


def test_unpatch_restores(server: Server, lib: Lib, spans: Any) -> None:
    httpx = lib.module
    targets = [
        (httpx.Client, "_send_single_request"),
        (httpx.AsyncClient, "_send_single_request"),
        (importlib.import_module(lib.name + "._client").BaseClient, "_build_redirect_request"),
    ]
    originals = [owner.__dict__[name] for owner, name in targets]
    instrumentor = lib.cls().instrument()
    assert all(owner.__dict__[name] is not original for (owner, name), original in zip(targets, originals))
    instrumentor.instrument()  # a second call patches nothing twice
    httpx.get(server.url("/redirect/1"), follow_redirects=True)
    assert [s.attributes.get("http.request.resend_count") for s in client_spans(spans)] == [None, 1]
    instrumentor.unpatch()
    assert all(owner.__dict__[name] is original for (owner, name), original in zip(targets, originals))
    httpx.get(server.url("/ok?unpatched"))
    assert len(spans.get()) == 2
    assert "traceparent" not in server.headers_for("/ok?unpatched")[-1]


# -- the instrumentor contract (tests/support/contract.py), for each library --------------

_LAZY: Dict[str, Any] = {}


def _contract_url(path: str) -> str:
    """A URL on a server started at the first (unpatched) call, as a program's would be."""
    if "server" not in _LAZY:
        _LAZY["server"] = Server()
        _LAZY["closed"] = closed_port()
    return _LAZY["server"].url(path)


def _contract(name: str) -> None:
    def get() -> Any:
        response = importlib.import_module(name).get(_contract_url("/ok?contract"))
        return response.status_code, response.text

    def redirected() -> Any:
        response = importlib.import_module(name).get(_contract_url("/redirect/1"), follow_redirects=True)
        return response.status_code, response.text, len(response.history)

    def streamed() -> Any:
        with importlib.import_module(name).Client() as client:
            with client.stream("GET", _contract_url("/stream")) as response:
                return response.status_code, response.read()

    async def async_get() -> Any:
        async with importlib.import_module(name).AsyncClient() as client:
            response = await client.get(_contract_url("/ok?contract-async"))
            return response.status_code, response.text

    def refused() -> Any:
        _contract_url("/")
        return importlib.import_module(name).get(f"http://127.0.0.1:{_LAZY['closed']}/x")

    @contextlib.contextmanager
    def describe_fails(instrumentor: Any) -> Iterator[None]:
        from unittest import mock

        from autotrace.http import HttpClient

        with mock.patch.object(HttpClient, "request", side_effect=RuntimeError(FAULT)):
            yield

    cls = "HttpxInstrumentor" if name == "httpx" else "Httpx2Instrumentor"
    Contract(
        instrumentor=f"autotrace.instrumentors.{name}:{cls}",
        module=name,
        targets=[f"{name}:Client._send_single_request", f"{name}._client:BaseClient._build_redirect_request"],
        async_targets=[f"{name}:AsyncClient._send_single_request"],
        calls=[get, redirected, streamed, async_get],
        error_call=refused,
        spans_per_call=[1, 2, 1, 1],
        describe_fault=describe_fails,
    ).install(globals())


for _name in ("httpx", "httpx2"):
    if _name == "httpx2" and sys.version_info < (3, 11):
        _reason = "httpx2 needs Python 3.11+"
    elif importlib.util.find_spec(_name) is None and not in_ci():  # under CI a missing library fails
        _reason = f"{_name} is not installed"
    else:
        _contract(_name)
        continue

    def _skipped(self: Any, reason: str = _reason) -> None:
        pytest.skip(reason)

    globals()[f"Test{_name.capitalize()}Contract"] = type(f"Test{_name.capitalize()}Contract", (), {"test_contract": _skipped})
