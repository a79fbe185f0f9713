"""An aiohttp server run by ``autotrace-run`` (``web.run_app``), requests from the test, spans at a real OTLP receiver.

Needs the ``aiohttp.web`` entry point: when the install does not declare it
yet, a throwaway dist-info on PYTHONPATH (outside the repository) does.
"""

from __future__ import annotations

import textwrap
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("aiohttp")

from autotrace.plugins import GROUP, _entry_points  # noqa: E402
from tests.support.processes import free_port, start_traced, stop, wait_for_port  # noqa: E402
from tests.support.receiver import OTLPReceiver  # noqa: E402

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"
SCOPE = "autotrace.instrumentors.aiohttp.web"

APP = textwrap.dedent(
    '''
    import asyncio, sys
    from aiohttp import web
    from opentelemetry import trace

    tracer = trace.get_tracer("svc")

    async def user(request):
        with tracer.start_as_current_span("load-user"):
            await asyncio.sleep(0)
        return web.json_response({"id": request.match_info["id"]})

    async def gone(request):
        raise web.HTTPNotFound()

    async def boom(request):
        raise RuntimeError("kaput")

    async def stream(request):
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(3):
            await asyncio.sleep(0.05)
            await response.write(b"part ")
        return response

    async def healthz(request):
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/users/{id}", user)
    app.router.add_get("/gone", gone)
    app.router.add_get("/boom", boom)
    app.router.add_get("/stream", stream)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
    '''
)


def _entry_point_env(tmp_path) -> dict:
    if any(ep.name == "aiohttp.web" for ep in _entry_points(GROUP)):
        return {}
    info = tmp_path / "site" / "autotrace_aiohttp_server_it-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: autotrace-aiohttp-server-it\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        f"[{GROUP}]\naiohttp.web = autotrace.instrumentors.aiohttp_server:AiohttpServerInstrumentor\n"
    )
    return {"PYTHONPATH": str(tmp_path / "site")}


def get(port: int, path: str, headers=None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_aiohttp_server_spans_reach_the_receiver_with_the_callers_parent(tmp_path):
    (tmp_path / "svc.py").write_text(APP)
    port = free_port()
    with OTLPReceiver() as receiver:
        env = dict(
            receiver.env(), OTEL_SERVICE_NAME="aiohttp-it", OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS="/healthz",
            **_entry_point_env(tmp_path),
        )
        process = start_traced(["python", "svc.py", str(port)], env=env, cwd=str(tmp_path))
        try:
            wait_for_port(port, process=process)
            headers = {"traceparent": TRACEPARENT}
            assert get(port, "/healthz") == 200
            assert get(port, "/users/42?api_key=s3cret&page=1", headers) == 200
            assert get(port, "/gone", headers) == 404
            assert get(port, "/boom", headers) == 500
            started = time.time_ns()
            assert get(port, "/stream", headers) == 200
            spans = receiver.wait_for(lambda got: len([s for s in got if s.kind == "SERVER"]) >= 4)
        finally:
            out, err = stop(process)
    assert "autotrace:" not in err, err  # no internal error nor warning (aiohttp logs the handler's own error)
    assert err.count("Traceback") == 1 and "RuntimeError: kaput" in err, err
    servers = {s.name: s for s in spans if s.kind == "SERVER"}
    assert sorted(servers) == ["GET /boom", "GET /gone", "GET /stream", "GET /users/{id}"]  # /healthz excluded
    for span in servers.values():
        assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT
        assert span.scope == SCOPE and span.resource["service.name"] == "aiohttp-it"
        assert span.attributes["server.address"] == "127.0.0.1" and span.attributes["server.port"] == port
    user = servers["GET /users/{id}"]
    assert user.attributes["http.route"] == "/users/{id}"
    assert user.attributes["url.query"] == "api_key=REDACTED&page=1"
    assert user.attributes["http.response.status_code"] == 200 and user.status == "UNSET"
    (load,) = [s for s in spans if s.name == "load-user"]
    assert load.parent_span_id == user.span_id and load.trace_id == TRACE_ID
    assert servers["GET /gone"].status == "UNSET" and servers["GET /gone"].attributes["http.response.status_code"] == 404
    boom = servers["GET /boom"]
    assert boom.status == "ERROR" and boom.attributes["error.type"] == "RuntimeError"
    assert [e["name"] for e in boom.events] == ["exception"]
    stream = servers["GET /stream"]
    assert stream.end_ns - stream.start_ns >= 150_000_000 and stream.start_ns >= started
