"""aiohttp server instrumentor, in process: real aiohttp servers (AppRunner + TCPSite on a free port), real clients."""

from __future__ import annotations

import asyncio
import time

import pytest

aiohttp = pytest.importorskip("aiohttp")

from aiohttp import web  # noqa: E402  (imported BEFORE patching)
from opentelemetry import trace  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from autotrace.instrumentors.aiohttp_server import AiohttpServerInstrumentor  # noqa: E402
from tests.support.contract import Contract  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
SCOPE = "autotrace.instrumentors.aiohttp.web"
inner = trace.get_tracer("test.inner")
STARTED = web.AppKey("started", asyncio.Event)


class Boom(Exception):
    pass


async def user(request: web.Request) -> web.Response:
    with inner.start_as_current_span("in-handler"):
        return web.Response(text="user " + request.match_info["id"], headers={"X-Served-By": "unit"})


async def gone(request: web.Request) -> web.Response:
    raise web.HTTPNotFound(text="gone")


async def boom(request: web.Request) -> web.Response:
    raise Boom("kaput")


async def http_500(request: web.Request) -> web.Response:
    raise web.HTTPInternalServerError()


async def unavailable(request: web.Request) -> web.Response:
    return web.Response(status=503)


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for n in range(3):
        await asyncio.sleep(0.05)
        with inner.start_as_current_span(f"chunk {n}"):
            await response.write(b"part ")
    await response.write_eof()
    return response


async def slow(request: web.Request) -> web.Response:
    request.app[STARTED].set()
    await asyncio.sleep(30)
    return web.Response(text="never")


def build_app() -> web.Application:
    """Created before the instrumentor patches anything."""
    app = web.Application()
    app.router.add_get("/users/{id}", user)
    app.router.add_get("/gone", gone)
    app.router.add_get("/boom", boom)
    app.router.add_get("/http-500", http_500)
    app.router.add_get("/unavailable", unavailable)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/healthz", ok)
    app.router.add_route("*", "/any", ok)
    sub = web.Application()
    sub.router.add_get("/items/{id}", user)
    app.add_subapp("/api", sub)
    return app


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def serve(talk, app=None):
    """Run a real server on a free port; ``await talk(session, port)`` against it; its result."""

    async def main():
        application = app or build_app()
        application[STARTED] = asyncio.Event()
        runner = web.AppRunner(application, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
                return await talk(session, port, application)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def get(path: str, **kwargs):
    async def talk(session, port, app):
        async with session.get(path, **kwargs) as response:
            return response.status, await response.text(), port

    return serve(talk)


@pytest.fixture
def patched(instrument):
    return instrument(AiohttpServerInstrumentor)


def one_server(spans):
    found = [s for s in spans.get() if s.kind == SpanKind.SERVER]
    assert len(found) == 1, [(s.name, s.instrumentation_scope.name) for s in spans.get()]
    return found[0]


def test_request_is_a_child_of_the_remote_parent_named_by_its_route(patched, spans):
    status, text, port = get("/users/7?token=abc&page=2", headers={"traceparent": TRACEPARENT, "User-Agent": "probe/1"})
    assert (status, text) == (200, "user 7")
    span = one_server(spans)
    assert span.name == "GET /users/{id}" and span.instrumentation_scope.name == SCOPE
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent.is_remote and format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    attributes = dict(span.attributes)
    assert attributes.pop("client.address") == "127.0.0.1"
    assert attributes == {
        "http.request.method": "GET",
        "url.path": "/users/7",
        "url.query": "token=REDACTED&page=2",
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": port,
        "network.protocol.version": "1.1",
        "user_agent.original": "probe/1",
        "http.route": "/users/{id}",
        "http.response.status_code": 200,
    }
    assert span.status.status_code == StatusCode.UNSET
    assert spans.one("in-handler").parent.span_id == span.context.span_id


def test_bad_traceparent_starts_a_new_trace(patched, spans):
    assert get("/users/1", headers={"traceparent": "00-zz-nope-01"})[0] == 200
    assert one_server(spans).parent is None


def test_subapp_route_has_its_prefix(patched, spans):
    assert get("/api/items/3")[:2] == (200, "user 3")
    span = one_server(spans)
    assert span.name == "GET /api/items/{id}" and span.attributes["http.route"] == "/api/items/{id}"


def test_unmatched_path_is_a_404_without_route_nor_error(patched, spans):
    assert get("/nope")[0] == 404
    span = one_server(spans)
    assert span.name == "GET" and "http.route" not in span.attributes
    assert span.attributes["http.response.status_code"] == 404
    assert span.status.status_code == StatusCode.UNSET and not span.events


def test_http_exception_raised_by_the_handler_is_its_response(patched, spans):
    assert get("/gone")[:2] == (404, "gone")
    span = one_server(spans)
    assert span.name == "GET /gone" and span.attributes["http.response.status_code"] == 404
    assert span.status.status_code == StatusCode.UNSET and not span.events  # not an exception to record


def test_5xx_http_exception_and_response_are_errors_without_exception_event(patched, spans):
    assert get("/http-500")[0] == 500
    span = one_server(spans)
    assert span.status.status_code == StatusCode.ERROR and span.attributes["error.type"] == "500" and not span.events
    spans.clear()
    assert get("/unavailable")[0] == 503
    span = one_server(spans)
    assert span.status.status_code == StatusCode.ERROR and span.attributes["error.type"] == "503"


def test_unhandled_exception_is_recorded_with_the_500(patched, spans):
    assert get("/boom")[0] == 500
    span = one_server(spans)
    assert span.name == "GET /boom" and span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["error.type"] == "tests.test_aiohttp_server.Boom"
    (event,) = span.events
    assert event.name == "exception" and event.attributes["exception.message"] == "kaput"


def test_streaming_response_is_timed_in_full(patched, spans):
    status, text, _ = get("/stream")
    assert (status, text) == (200, "part part part ")
    span = one_server(spans)
    assert span.name == "GET /stream" and span.attributes["http.response.status_code"] == 200
    assert span.end_time - span.start_time >= 150_000_000
    chunks = [s for s in spans.get() if s.name.startswith("chunk ")]
    assert len(chunks) == 3 and all(c.parent.span_id == span.context.span_id for c in chunks)
    assert max(c.end_time for c in chunks) <= span.end_time


def test_client_disconnect_records_the_cancellation(patched, spans):
    async def talk(session, port, app):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(app[STARTED].wait(), 5)
        writer.close()  # the client goes away mid-request
        deadline = time.monotonic() + 5
        while not spans.get() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    serve(talk)
    span = one_server(spans)
    assert span.name == "GET /slow" and span.attributes["server.address"] == "svc"
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "asyncio.CancelledError"
    assert "http.response.status_code" not in span.attributes


def test_excluded_urls(monkeypatch, instrument, spans):
    monkeypatch.setenv("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", "127.0.0.1:[0-9]+/healthz$")
    instrument(AiohttpServerInstrumentor)
    assert get("/healthz")[0] == 200
    assert spans.get() == []
    assert get("/users/1")[0] == 200
    assert one_server(spans).name == "GET /users/{id}"


def test_unknown_method_and_old_names(monkeypatch, instrument, spans):
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    instrument(AiohttpServerInstrumentor)

    async def talk(session, port, app):
        async with session.request("PROPFIND", "/any?q=1") as response:
            return response.status

    assert serve(talk) == 200
    span = one_server(spans)
    assert span.name == "HTTP /any"
    assert span.attributes["http.request.method"] == "_OTHER" and span.attributes["http.request.method_original"] == "PROPFIND"
    assert span.attributes["http.method"] == "_OTHER" and span.attributes["http.target"] == "/any?q=1"
    assert span.attributes["http.status_code"] == 200 and span.attributes["http.route"] == "/any"


def test_captured_headers_with_credentials_redacted(monkeypatch, instrument, spans):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-request-id,authorization")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "x-served-by")
    instrument(AiohttpServerInstrumentor)
    get("/users/2", headers={"X-Request-Id": "r-1", "Authorization": "Bearer secret"})
    attributes = one_server(spans).attributes
    assert attributes["http.request.header.x-request-id"] == ("r-1",)
    assert attributes["http.request.header.authorization"] == ("REDACTED",)
    assert attributes["http.response.header.x-served-by"] == ("unit",)


async def echo_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str("echo " + message.data)
        await ws.close()
    return ws


def test_websocket_session_and_static_route(patched, spans, tmp_path):
    (tmp_path / "a.txt").write_text("static")
    app = build_app()
    app.router.add_get("/ws", echo_ws)
    app.router.add_static("/static", tmp_path)

    async def talk(session, port, app):
        async with session.ws_connect("/ws") as ws:
            await ws.send_str("hi")
            echoed = (await ws.receive()).data
        async with session.get("/static/a.txt") as response:
            return echoed, await response.text()

    assert serve(talk, app) == ("echo hi", "static")
    by_name = {s.name: s for s in spans.get()}
    assert by_name["GET /ws"].attributes["http.response.status_code"] == 101  # the whole session
    assert by_name["GET /static"].attributes["http.route"] == "/static"


def test_no_span_while_suppressed_nor_after_unpatch(instrument, spans):
    import aiohttp.web_app

    original = aiohttp.web_app.Application.__dict__["_handle"]
    instrumentor = instrument(AiohttpServerInstrumentor)
    assert aiohttp.web_app.Application.__dict__["_handle"] is not original
    instrumentor.unpatch()
    assert aiohttp.web_app.Application.__dict__["_handle"] is original
    assert get("/users/1")[0] == 200
    assert [s.name for s in spans.get()] == ["in-handler"]  # the program's own span only


# ---------------------------------------------------------------------------
# The contract (its autotrace-run child needs the entry point: see _entry_point_env)


def _entry_point_env() -> dict:
    """PYTHONPATH to a throwaway dist-info declaring the ``aiohttp.web`` entry point, if the install does not yet."""
    import atexit
    import pathlib
    import shutil
    import tempfile

    from autotrace.plugins import GROUP, _entry_points

    if any(ep.name == "aiohttp.web" for ep in _entry_points(GROUP)):
        return {}
    site = pathlib.Path(tempfile.mkdtemp(prefix="autotrace-aiohttp-ep-"))
    atexit.register(shutil.rmtree, site, True)
    info = site / "autotrace_aiohttp_server_test-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: autotrace-aiohttp-server-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        f"[{GROUP}]\naiohttp.web = autotrace.instrumentors.aiohttp_server:AiohttpServerInstrumentor\n"
    )
    return {"PYTHONPATH": str(site)}


ENTRY_POINT_ENV = _entry_point_env()
CONTRACT_PORT = free_port()


def _contract_get(path: str, raise_for_status: bool = False):
    """A fresh server on one fixed port (the error message names the URL), one request."""

    async def main():
        runner = web.AppRunner(build_app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", CONTRACT_PORT).start()
        try:
            async with aiohttp.ClientSession(raise_for_status=raise_for_status) as session:
                async with session.get(f"http://127.0.0.1:{CONTRACT_PORT}{path}") as response:
                    return response.status, await response.text()
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def aiohttp_ok():
    return _contract_get("/healthz")


def aiohttp_http_exception():
    return _contract_get("/gone")


def aiohttp_boom():
    return _contract_get("/boom", raise_for_status=True)


Contract(
    instrumentor="autotrace.instrumentors.aiohttp_server:AiohttpServerInstrumentor",
    module="aiohttp.web",
    async_targets=["aiohttp.web_app:Application._handle"],
    calls=[aiohttp_ok, aiohttp_http_exception],
    error_call=aiohttp_boom,
    spans_per_call=1,
    env=ENTRY_POINT_ENV,
    name="aiohttp_server",
).install(globals())
