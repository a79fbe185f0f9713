"""FastAPI/Starlette instrumentor, in process (httpx.AsyncClient over ASGITransport, or raw ASGI calls)."""

from __future__ import annotations

import asyncio
import time

import pytest

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException  # noqa: E402  (imported BEFORE patching)
from fastapi.responses import StreamingResponse  # noqa: E402
from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from autotrace.instrumentors.fastapi import FastAPIInstrumentor  # noqa: E402

HAS_NATIVE = hasattr(fastapi, "telemetry") or __import__("importlib").util.find_spec("fastapi.telemetry") is not None
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
inner_tracer = trace.get_tracer("test.inner")


class Boom(Exception):
    pass


def build_app() -> FastAPI:
    """Created before the instrumentor patches anything (module-level import of FastAPI too)."""
    app = FastAPI()
    api = APIRouter(prefix="/api")
    v1 = APIRouter(prefix="/v1")

    def dependency() -> str:
        with inner_tracer.start_as_current_span("in-dependency"):
            return "dep"

    @v1.get("/charge/{order_id}")
    async def charge(order_id: int, dep: str = Depends(dependency)) -> dict:
        with inner_tracer.start_as_current_span("in-endpoint"):
            return {"order": order_id, "dep": dep}

    @v1.get("/sync/{x}")
    def sync_endpoint(x: str) -> dict:
        with inner_tracer.start_as_current_span("in-sync-endpoint"):
            return {"x": x}

    api.include_router(v1)
    app.include_router(api)

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(status_code=404, detail="nope")

    @app.get("/teapot-5xx")
    async def http_5xx() -> None:
        raise HTTPException(status_code=503, detail="down")

    @app.get("/boom")
    async def boom() -> None:
        raise Boom("kaput")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body():
            for i in range(3):
                await asyncio.sleep(0.1)
                yield f"chunk{i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/bg")
    async def with_background(tasks: BackgroundTasks) -> dict:
        async def slow_task() -> None:
            await asyncio.sleep(0.3)
            with inner_tracer.start_as_current_span("in-background"):
                pass

        tasks.add_task(slow_task)
        return {"ok": True}

    @app.get("/sleep/{n}")
    async def sleep(n: int) -> dict:
        await asyncio.sleep(0.05 * (n % 3))
        span = trace.get_current_span()
        return {"n": n, "trace": format(span.get_span_context().trace_id, "032x")}

    @app.get("/healthz")
    async def healthz() -> str:
        return "ok"

    sub = FastAPI()

    @sub.get("/items/{item_id}")
    async def item(item_id: str) -> dict:
        return {"item": item_id}

    app.mount("/sub", sub)
    app.mount("/plain", Starlette(routes=[Route("/p/{x}", lambda request: PlainTextResponse("plain"))]))
    return app


APP = build_app()


@pytest.fixture
def patched(instrument):
    return instrument(FastAPIInstrumentor)


def request(app, method: str, path: str, **kwargs):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def server_spans(spans):
    return [s for s in spans.get() if s.kind == SpanKind.SERVER]


def one_server(spans):
    found = server_spans(spans)
    assert len(found) == 1, [(s.name, s.instrumentation_scope.name) for s in spans.get()]
    return found[0]


# ---------------------------------------------------------------------------
# Names, routes, attributes


@pytest.mark.parametrize(
    "path,name,route",
    [
        ("/api/v1/charge/42", "GET /api/v1/charge/{order_id}", "/api/v1/charge/{order_id}"),
        ("/sub/items/a1", "GET /sub/items/{item_id}", "/sub/items/{item_id}"),
        ("/does-not-exist", "GET", None),
    ],
)
def test_span_name_is_method_and_route_template(patched, spans, path, name, route):
    request(APP, "GET", path)
    span = one_server(spans)
    assert span.name == name
    assert span.attributes.get("http.route") == route
    assert span.attributes["url.path"] == path


def test_plain_starlette_mount_route(patched, spans):
    if not hasattr(__import__("starlette.routing").routing, "Router") or not _starlette_sets_route():
        pytest.skip("this Starlette does not record scope['route']")
    request(APP, "GET", "/plain/p/7")
    assert one_server(spans).name == "GET /plain/p/{x}"


def _starlette_sets_route() -> bool:
    import inspect

    import starlette.routing

    return 'scope["route"]' in inspect.getsource(starlette.routing.Router)


def test_attributes(patched, spans):
    response = request(
        APP, "GET", "/api/v1/charge/7?token=s3cr3t&page=2",
        headers={"User-Agent": "probe/1.0", "Host": "shop.example:8443"},
    )
    assert response.status_code == 200
    span = one_server(spans)
    assert span.kind == SpanKind.SERVER
    attrs = dict(span.attributes)
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/api/v1/charge/7"
    assert attrs["url.query"] == "token=REDACTED&page=2"
    assert attrs["url.scheme"] == "http"
    assert attrs["http.route"] == "/api/v1/charge/{order_id}"
    assert attrs["http.response.status_code"] == 200
    assert attrs["server.address"] == "shop.example"
    assert attrs["server.port"] == 8443
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["user_agent.original"] == "probe/1.0"
    assert "error.type" not in attrs
    assert span.status.status_code == StatusCode.UNSET
    assert "http.method" not in attrs  # old names only on opt-in
    assert span.instrumentation_scope.name == "autotrace.instrumentors.fastapi"


def test_old_names_with_http_dup(monkeypatch, patched, spans):
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    request(APP, "GET", "/api/v1/charge/7?page=1")
    attrs = one_server(spans).attributes
    assert attrs["http.method"] == "GET" and attrs["http.request.method"] == "GET"
    assert attrs["http.status_code"] == 200
    assert attrs["http.target"] == "/api/v1/charge/7?page=1"
    assert attrs["http.scheme"] == "http"


def test_non_standard_method(patched, spans):
    response = request(APP, "PURGE", "/api/v1/charge/1")
    assert response.status_code == 405
    span = one_server(spans)
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "PURGE"
    assert span.name.split()[0] == "HTTP"  # semconv: {method} is HTTP for _OTHER
    assert span.status.status_code == StatusCode.UNSET


# ---------------------------------------------------------------------------
# Status rules and exceptions


def test_http_exception_4xx_is_not_an_error(patched, spans):
    assert request(APP, "GET", "/missing").status_code == 404
    span = one_server(spans)
    assert span.name == "GET /missing"
    assert span.attributes["http.response.status_code"] == 404
    assert span.status.status_code == StatusCode.UNSET
    assert "error.type" not in span.attributes


def test_http_exception_5xx_is_an_error(patched, spans):
    assert request(APP, "GET", "/teapot-5xx").status_code == 503
    span = one_server(spans)
    assert span.attributes["http.response.status_code"] == 503
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "503"


def test_unhandled_exception_recorded_and_reraised_unchanged(patched, spans):
    with pytest.raises(Boom, match="kaput"):
        request(APP, "GET", "/boom")
    span = one_server(spans)
    assert span.name == "GET /boom"
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"].endswith("Boom")
    assert span.attributes["http.response.status_code"] == 500
    events = [e for e in span.events if e.name == "exception"]
    assert len(events) == 1 and events[0].attributes["exception.message"] == "kaput"


def test_exception_without_patching_is_identical(spans):
    """Baseline: the same exception type escapes with and without us."""
    with pytest.raises(Boom):
        request(APP, "GET", "/boom")
    assert server_spans(spans) == [] or all(s.instrumentation_scope.name != "autotrace.instrumentors.fastapi" for s in server_spans(spans))


# ---------------------------------------------------------------------------
# Duration: streaming and background tasks


def test_streaming_span_covers_the_whole_body(patched, spans):
    response = request(APP, "GET", "/stream")
    assert response.text == "chunk0\nchunk1\nchunk2\n"
    span = one_server(spans)
    assert (span.end_time - span.start_time) / 1e9 >= 0.28


def test_background_task_gets_own_span_and_does_not_stretch_request(patched, spans):
    response = request(APP, "GET", "/bg")
    assert response.json() == {"ok": True}
    server = one_server(spans)
    assert (server.end_time - server.start_time) / 1e9 < 0.25
    background = [s for s in spans.get() if s.name.startswith("background_task")]
    assert len(background) == 1
    task = background[0]
    assert task.kind == SpanKind.INTERNAL
    assert task.name.endswith("slow_task")
    assert task.parent.span_id == server.context.span_id
    assert task.context.trace_id == server.context.trace_id
    assert (task.end_time - task.start_time) / 1e9 >= 0.28
    assert task.start_time >= server.end_time
    inner = spans.one("in-background")
    assert inner.parent.span_id == task.context.span_id


# ---------------------------------------------------------------------------
# Context: current span, concurrency, propagation


def test_request_span_is_current_in_endpoint_and_dependency(patched, spans):
    request(APP, "GET", "/api/v1/charge/1")
    server = one_server(spans)
    for name in ("in-dependency", "in-endpoint"):
        child = spans.one(name)
        assert child.parent.span_id == server.context.span_id, name


def test_request_span_is_current_in_sync_endpoint_threadpool(patched, spans):
    request(APP, "GET", "/api/v1/sync/q")
    assert spans.one("in-sync-endpoint").parent.span_id == one_server(spans).context.span_id


def test_concurrent_requests_never_mix(patched, spans):
    async def go():
        transport = httpx.ASGITransport(app=APP)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await asyncio.gather(*(client.get(f"/sleep/{n}") for n in range(20)))

    responses = asyncio.run(go())
    found = server_spans(spans)
    assert len(found) == 20
    by_trace = {format(s.context.trace_id, "032x"): s for s in found}
    assert len(by_trace) == 20  # every request its own trace
    for response in responses:
        body = response.json()
        span = by_trace[body["trace"]]  # the trace seen inside the endpoint is that request's span
        assert span.attributes["url.path"] == f"/sleep/{body['n']}"
    assert otel_context.get_current() == {} or not trace.get_current_span().get_span_context().is_valid


def test_traceparent_is_extracted(patched, spans):
    request(APP, "GET", "/healthz", headers={"traceparent": TRACEPARENT, "baggage": "k=v"})
    span = one_server(spans)
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert span.parent.is_remote


def test_b3_when_configured(patched, spans):
    from opentelemetry import propagate
    from opentelemetry.propagators.b3 import B3MultiFormat

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(B3MultiFormat())
    try:
        request(APP, "GET", "/healthz", headers={
            "X-B3-TraceId": "463ac35c9f6413ad48485a3953bb6124", "X-B3-SpanId": "a2fb4a1d1a96d312", "X-B3-Sampled": "1",
        })
    finally:
        propagate.set_global_textmap(previous)
    span = one_server(spans)
    assert format(span.context.trace_id, "032x") == "463ac35c9f6413ad48485a3953bb6124"
    assert format(span.parent.span_id, "016x") == "a2fb4a1d1a96d312"


@pytest.mark.parametrize("bad", ["garbage", "00-zzzz-b7ad6b7169203331-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"])
def test_malformed_traceparent_starts_new_trace(patched, spans, bad):
    response = request(APP, "GET", "/healthz", headers={"traceparent": bad})
    assert response.status_code == 200
    span = one_server(spans)
    assert span.parent is None
    assert span.context.trace_id != 0


def test_no_context_left_attached(patched, spans):
    async def go():
        before = otel_context.get_current()
        transport = httpx.ASGITransport(app=APP)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/api/v1/charge/3")
            try:
                await client.get("/boom")
            except Boom:
                pass
        return before, otel_context.get_current()

    before, after = asyncio.run(go())
    assert before == after


# ---------------------------------------------------------------------------
# Exclusion and header capture


@pytest.mark.parametrize("var", ["OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS"])
def test_excluded_urls(monkeypatch, patched, spans, var):
    monkeypatch.setenv(var, "healthz,/api/v1/sync")
    assert request(APP, "GET", "/healthz").status_code == 200
    assert request(APP, "GET", "/api/v1/sync/x").status_code == 200
    assert server_spans(spans) == []  # neither ours nor FastAPI's own
    request(APP, "GET", "/api/v1/charge/1")
    assert one_server(spans).name == "GET /api/v1/charge/{order_id}"


def test_header_capture_and_redaction(monkeypatch, patched, spans):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-request-id,authorization,x-api-.*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "content-type,set-cookie")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "x-api-key")
    request(APP, "GET", "/healthz", headers={"X-Request-Id": "r-1", "Authorization": "Bearer xyz", "X-Api-Key": "k"})
    attrs = one_server(spans).attributes
    assert tuple(attrs["http.request.header.x-request-id"]) == ("r-1",)
    assert tuple(attrs["http.request.header.authorization"]) == ("REDACTED",)
    assert tuple(attrs["http.request.header.x-api-key"]) == ("REDACTED",)
    assert tuple(attrs["http.response.header.content-type"]) == ("application/json",)
    assert not any(k.startswith("http.request.header.user-agent") for k in attrs)


# ---------------------------------------------------------------------------
# Import order, mounting, built-in telemetry, unusual scopes


def test_app_created_before_patching_is_traced_without_subclassing(instrument, spans):
    app = FastAPI()

    @app.get("/early")
    async def early() -> str:
        return "early"

    instrument(FastAPIInstrumentor)
    assert type(app) is FastAPI
    request(app, "GET", "/early")
    assert one_server(spans).name == "GET /early"


def test_unpatch_restores(instrument, spans):
    import starlette.applications

    original = starlette.applications.Starlette.__dict__["__call__"]
    instrumentor = instrument(FastAPIInstrumentor)
    assert starlette.applications.Starlette.__dict__["__call__"] is not original
    instrumentor.unpatch()
    assert starlette.applications.Starlette.__dict__["__call__"] is original
    request(APP, "GET", "/healthz")
    assert all(s.instrumentation_scope.name != "autotrace.instrumentors.fastapi" for s in spans.get())


def test_mounted_app_inside_traced_parent_gives_one_server_span(patched, spans):
    parent = Starlette()
    parent.mount("/outer", APP)
    request(parent, "GET", "/outer/sub/items/z")
    span = one_server(spans)
    assert span.attributes["url.path"] == "/outer/sub/items/z"
    assert span.attributes["http.response.status_code"] == 200
    assert span.name == "GET /outer/sub/items/{item_id}"


@pytest.mark.skipif(not HAS_NATIVE, reason="this FastAPI has no built-in telemetry")
def test_builtin_fastapi_telemetry_is_active_without_us(spans):
    """Proves the next test can fail: with an SDK provider global, FastAPI traces by itself."""
    request(APP, "GET", "/api/v1/charge/5?token=abc")
    native = server_spans(spans)
    assert len(native) == 1 and native[0].instrumentation_scope.name == "fastapi"
    assert any(s.name.startswith("fastapi.") for s in spans.get())


def test_builtin_fastapi_telemetry_not_duplicated(patched, spans):
    request(APP, "GET", "/api/v1/charge/5?token=abc")
    span = one_server(spans)
    assert span.instrumentation_scope.name == "autotrace.instrumentors.fastapi"
    assert span.attributes["url.query"] == "token=REDACTED"
    assert not [s.name for s in spans.get() if s.name.startswith("fastapi.")]
    assert all(s.instrumentation_scope.name != "fastapi" for s in spans.get())


@pytest.mark.skipif(not HAS_NATIVE, reason="this FastAPI has no built-in telemetry")
def test_internal_operation_spans_behind_switch(monkeypatch, instrument, spans):
    monkeypatch.setenv("AUTOTRACE_FASTAPI_INTERNAL_SPANS", "true")
    instrument(FastAPIInstrumentor)
    request(APP, "GET", "/api/v1/charge/5")
    server = one_server(spans)
    names = {s.name for s in spans.get()}
    assert {"fastapi.dependencies", "fastapi.endpoint"} <= names
    for s in spans.get():
        if s.name.startswith("fastapi."):
            assert s.kind == SpanKind.INTERNAL
            assert s.context.trace_id == server.context.trace_id
    spans.clear()
    request(APP, "GET", "/bg")
    one_server(spans)
    assert len([s for s in spans.get() if "background_task" in s.name]) == 1  # FastAPI's, not a second one of ours


def test_starlette_opentelemetry_middleware_not_duplicated(patched, spans):
    middleware = pytest.importorskip("starlette.middleware.opentelemetry")
    app = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("x"))])
    app.add_middleware(middleware.OpenTelemetryMiddleware)
    request(app, "GET", "/x")
    span = one_server(spans)
    assert span.instrumentation_scope.name == "autotrace.instrumentors.fastapi"


def test_asgi_message_spans_off_by_default_and_opt_in(monkeypatch, instrument, spans):
    request_app = APP
    instrument(FastAPIInstrumentor)
    request(request_app, "GET", "/healthz")
    assert len(spans.get()) == 1
    spans.clear()


def test_asgi_message_spans_opt_in(monkeypatch, instrument, spans):
    monkeypatch.setenv("AUTOTRACE_FASTAPI_ASGI_MESSAGE_SPANS", "true")
    instrument(FastAPIInstrumentor)
    request(APP, "GET", "/healthz")
    server = one_server(spans)
    sends = [s for s in spans.get() if s.name.endswith("http send")]
    assert len(sends) == 2 and all(s.parent.span_id == server.context.span_id for s in sends)


def _raw_asgi(app, scope, messages=()):
    sent = []
    incoming = list(messages) or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


PLAIN = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("x"))])


def test_minimal_http_scope_with_missing_keys(instrument, spans):
    untraced = _raw_asgi(PLAIN, {"type": "http", "method": "GET", "path": "/x", "headers": []})
    instrument(FastAPIInstrumentor)
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    sent = _raw_asgi(PLAIN, scope)
    assert sent == untraced and sent[0]["status"] == 200
    span = one_server(spans)
    assert span.attributes["url.scheme"] == "http"
    assert "client.address" not in span.attributes
    assert set(scope) >= {"type", "method", "path", "headers"}
    assert not [k for k in scope if k.startswith("autotrace")]


def test_lifespan_and_websocket_scopes_pass_through_untouched(patched, spans):
    from starlette.websockets import WebSocket

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    from starlette.routing import WebSocketRoute

    app = Starlette(routes=[WebSocketRoute("/ws", ws_endpoint)])
    sent = _raw_asgi(app, {"type": "lifespan", "asgi": {"version": "3.0"}},
                     [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    ws_scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b"", "root_path": ""}
    sent = _raw_asgi(app, ws_scope, [{"type": "websocket.connect"}])
    assert [m["type"] for m in sent][:2] == ["websocket.accept", "websocket.send"]
    assert spans.get() == []
    assert not [k for k in ws_scope if k.startswith("autotrace")]


def test_client_disconnect_during_stream_ends_span(patched, spans):
    """The client goes away mid-stream: the server's send raises, the span still ends, the error propagates."""
    scope = {"type": "http", "method": "GET", "path": "/stream", "headers": [(b"host", b"t")],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "root_path": ""}
    count = 0

    async def receive():
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal count
        count += 1
        if count == 3:
            raise OSError("client went away")

    async def go():
        await APP(scope, receive, send)

    started = time.monotonic()
    with pytest.raises(BaseException):
        asyncio.run(go())
    assert time.monotonic() - started < 5
    span = one_server(spans)
    assert span.end_time is not None
    assert span.attributes["http.response.status_code"] == 200
