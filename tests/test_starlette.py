"""Starlette apps without FastAPI: the ``starlette`` instrumentor.

In a subprocess under ``autotrace-run`` (the proof that fastapi is never
imported, and how the two instrumentors share Starlette's classes once it is),
and in process through Starlette's TestClient.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")  # starlette.testclient

from opentelemetry import trace  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from starlette.applications import Starlette  # noqa: E402  (imported BEFORE patching)
from starlette.background import BackgroundTask  # noqa: E402
from starlette.responses import PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from autotrace.instrumentors.fastapi import FastAPIInstrumentor, StarletteInstrumentor  # noqa: E402
from tests.support.contract import Contract  # noqa: E402
from tests.support.processes import run_traced  # noqa: E402
from tests.support.receiver import OTLPReceiver  # noqa: E402

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
SCOPE = "autotrace.instrumentors.starlette"
inner = trace.get_tracer("test.inner")
LATER: list = []


class Boom(Exception):
    pass


def user(request):
    return PlainTextResponse("user " + request.path_params["id"])


def boom(request):
    raise Boom("kaput")


def stream(request):
    async def chunks():
        for n in range(3):
            await asyncio.sleep(0.05)
            with inner.start_as_current_span(f"chunk {n}"):
                pass
            yield b"part "

    return StreamingResponse(chunks())


def record_later(what: str) -> None:
    with inner.start_as_current_span("in-background"):
        LATER.append(what)


def later(request):
    return PlainTextResponse("queued", background=BackgroundTask(record_later, "done"))


def build_app() -> Starlette:
    """Created before the instrumentor patches anything."""
    sub = Starlette(routes=[Route("/s/{id}", user)])
    return Starlette(
        routes=[
            Route("/users/{id}", user),
            Route("/boom", boom),
            Route("/stream", stream),
            Route("/later", later),
            Route("/later-plain", lambda request: PlainTextResponse("queued", background=BackgroundTask(LATER.append, "x"))),
            Route("/healthz", lambda request: PlainTextResponse("ok")),
            Mount("/api", routes=[Route("/items/{id}", user)]),
            Mount("/sub", app=sub),
        ]
    )


APP = build_app()


@pytest.fixture
def patched(instrument):
    return instrument(StarletteInstrumentor)


def get(path: str, app=APP, **kwargs):
    with TestClient(app, raise_server_exceptions=False) as client:
        return client.get(path, **kwargs)


def one_server(spans):
    found = [s for s in spans.get() if s.kind == SpanKind.SERVER]
    assert len(found) == 1, [(s.name, s.instrumentation_scope.name) for s in spans.get()]
    return found[0]


# ---------------------------------------------------------------------------
# In process


def test_route_with_path_params_child_of_the_remote_parent(patched, spans):
    response = get("/users/7?token=abc&page=2", headers={"traceparent": TRACEPARENT, "user-agent": "probe/1"})
    assert response.status_code == 200 and response.text == "user 7"
    span = one_server(spans)
    assert span.name == "GET /users/{id}"
    assert span.instrumentation_scope.name == SCOPE
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331" and span.parent.is_remote
    attributes = dict(span.attributes)
    assert attributes == {
        "http.request.method": "GET",
        "url.path": "/users/7",
        "url.query": "token=REDACTED&page=2",
        "url.scheme": "http",
        "server.address": "testserver",
        "server.port": 80,
        "client.address": "testclient",
        "network.protocol.version": "1.1",
        "user_agent.original": "probe/1",
        "http.route": "/users/{id}",
        "http.response.status_code": 200,
    }
    assert span.status.status_code == StatusCode.UNSET


@pytest.mark.parametrize(
    "path, route", [("/api/items/3", "/api/items/{id}"), ("/sub/s/4", "/sub/s/{id}")], ids=["mount-routes", "mount-app"]
)
def test_mounts_give_one_span_with_the_full_route(patched, spans, path, route):
    assert get(path).status_code == 200
    span = one_server(spans)  # the mounted Starlette app adds no second SERVER span
    assert span.name == f"GET {route}" and span.attributes["http.route"] == route
    assert span.attributes["url.path"] == path


def test_not_found_is_not_an_error_and_has_no_route(patched, spans):
    assert get("/nope").status_code == 404
    span = one_server(spans)
    assert span.name == "GET" and "http.route" not in span.attributes
    assert span.attributes["http.response.status_code"] == 404
    assert span.status.status_code == StatusCode.UNSET


def test_exception_gives_500_error_with_the_exception_recorded(patched, spans):
    assert get("/boom").status_code == 500
    span = one_server(spans)
    assert span.name == "GET /boom"
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["error.type"] == "tests.test_starlette.Boom"
    (event,) = [e for e in span.events if e.name == "exception"]
    assert event.attributes["exception.message"] == "kaput"


def test_with_the_exception_raised_through_the_client(patched, spans):
    with TestClient(APP) as client, pytest.raises(Boom):  # the user's exception passes through unchanged
        client.get("/boom")
    assert one_server(spans).attributes["error.type"] == "tests.test_starlette.Boom"


def test_streaming_response_is_timed_in_full(patched, spans):
    started = time.time_ns()
    response = get("/stream")
    assert response.text == "part part part "
    server = one_server(spans)
    assert server.end_time - server.start_time >= 150_000_000
    chunks = [s for s in spans.get() if s.name.startswith("chunk ")]
    assert len(chunks) == 3
    assert all(c.parent.span_id == server.context.span_id for c in chunks)
    assert max(c.end_time for c in chunks) <= server.end_time and server.start_time >= started


def test_background_task_gets_its_own_child_span(patched, spans):
    LATER.clear()
    assert get("/later").text == "queued"
    assert LATER == ["done"]
    server = one_server(spans)
    task = spans.one("background_task record_later")
    assert task.kind == SpanKind.INTERNAL and task.instrumentation_scope.name == SCOPE
    assert task.parent.span_id == server.context.span_id
    assert task.attributes["code.function.name"] == "tests.test_starlette.record_later"
    assert task.start_time >= server.end_time  # run after the response: not part of the request span
    assert spans.one("in-background").parent.span_id == task.context.span_id


def test_excluded_urls(monkeypatch, instrument, spans):
    monkeypatch.setenv("OTEL_PYTHON_STARLETTE_EXCLUDED_URLS", "healthz")
    instrument(StarletteInstrumentor)
    assert get("/healthz").status_code == 200
    assert spans.get() == []
    get("/users/1")
    assert one_server(spans).name == "GET /users/{id}"


def test_unpatch_restores(instrument, spans):
    import starlette.applications
    import starlette.background

    originals = (starlette.applications.Starlette.__dict__["__call__"], starlette.background.BackgroundTask.__dict__["__call__"])
    instrumentor = instrument(StarletteInstrumentor)
    assert starlette.applications.Starlette.__dict__["__call__"] is not originals[0]
    assert starlette.background.BackgroundTask.__dict__["__call__"] is not originals[1]
    instrumentor.unpatch()
    assert (starlette.applications.Starlette.__dict__["__call__"], starlette.background.BackgroundTask.__dict__["__call__"]) == originals
    get("/later")
    assert [s.name for s in spans.get()] == ["in-background"]  # the program's own span only


# ---------------------------------------------------------------------------
# Sharing Starlette's classes with the fastapi instrumentor (in process)


def _layers(owner, name="__call__"):
    import wrapt

    count, target = 0, owner.__dict__[name]
    while isinstance(target, wrapt.FunctionWrapper):
        count, target = count + 1, target.__wrapped__
    return count


def test_fastapi_apps_are_left_to_the_fastapi_instrumentor(patched, spans):
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI()

    @app.get("/f/{x}")
    async def f(x: str) -> dict:
        return {"x": x}

    assert get("/f/1", app=app).status_code == 200
    assert [s for s in spans.get() if s.instrumentation_scope.name == SCOPE] == []


@pytest.mark.parametrize("order", ["starlette-first", "fastapi-first"])
def test_fastapi_instrumentor_takes_starlette_over(instrument, spans, order):
    pytest.importorskip("fastapi")
    first, second = (StarletteInstrumentor, FastAPIInstrumentor) if order == "starlette-first" else (FastAPIInstrumentor, StarletteInstrumentor)
    instrument(first)
    instrument(second)
    assert _layers(Starlette) == 1 and _layers(BackgroundTask) == 1
    LATER.clear()
    get("/later")
    assert one_server(spans).instrumentation_scope.name == "autotrace.instrumentors.fastapi"  # exactly as before
    assert len(spans.named("background_task record_later")) == 1


def test_fastapi_disabled_by_env_makes_starlette_stand_down(monkeypatch, instrument, spans):
    pytest.importorskip("fastapi")
    monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "fastapi")
    instrumentor = instrument(StarletteInstrumentor)
    assert _layers(Starlette) == 0 and _layers(BackgroundTask) == 0
    get("/users/1")
    assert spans.get() == []
    import starlette.background

    instrumentor.patch_module("starlette.background", starlette.background)  # a later import: still nothing
    assert _layers(BackgroundTask) == 0


# ---------------------------------------------------------------------------
# The contract (its autotrace-run child needs the entry point: see _entry_point_dir)


def _entry_point_dir() -> dict:
    """PYTHONPATH to a throwaway dist-info declaring the ``starlette`` entry point, if the install does not yet."""
    import atexit
    import pathlib
    import shutil
    import tempfile

    from autotrace.plugins import GROUP, _entry_points

    if any(ep.name == "starlette" for ep in _entry_points(GROUP)):
        return {}
    site = pathlib.Path(tempfile.mkdtemp(prefix="autotrace-starlette-ep-"))
    atexit.register(shutil.rmtree, site, True)
    info = site / "autotrace_starlette_test-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: autotrace-starlette-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nstarlette = autotrace.instrumentors.fastapi:StarletteInstrumentor\n")
    return {"PYTHONPATH": str(site)}


ENTRY_POINT_ENV = _entry_point_dir()


def starlette_get():
    response = get("/healthz")
    return response.status_code, response.text


def starlette_background():
    response = get("/later-plain")
    return response.status_code, response.text


def starlette_boom():
    with TestClient(APP) as client:
        return client.get("/boom")


Contract(
    instrumentor="autotrace.instrumentors.fastapi:StarletteInstrumentor",
    module="starlette",
    async_targets=["starlette.applications:Starlette.__call__", "starlette.background:BackgroundTask.__call__"],
    calls=[starlette_get, starlette_background],
    error_call=starlette_boom,
    spans_per_call=[1, 2],  # the request; the request and its background task
    env=ENTRY_POINT_ENV,
).install(globals())


# ---------------------------------------------------------------------------
# Under autotrace-run

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    WITH_FASTAPI = sys.argv[1] == "with-fastapi"
    if WITH_FASTAPI:
        import fastapi
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    def user(request):
        return PlainTextResponse("u" + request.path_params["id"], background=BackgroundTask(print, "bg"))

    app = Starlette(routes=[Mount("/api", routes=[Route("/users/{id}", user)])])
    apps = [app]
    if WITH_FASTAPI:
        fast = fastapi.FastAPI()
        fast.get("/api/users/{id}")(lambda id: {"id": id})
        apps.append(fast)

    async def call(app, path, traceparent):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"svc:8000"), (b"traceparent", traceparent.encode())],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
        sent = []
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}
        async def send(message):
            sent.append(message)
        await app(scope, receive, send)
        return sent[0]["status"]

    statuses = [asyncio.run(call(a, "/api/users/7", sys.argv[2])) for a in apps]
    print(json.dumps({"statuses": statuses, "fastapi_imported": "fastapi" in sys.modules}))
    """
)


def _run(tmp_path, mode: str, extra=None):
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    with OTLPReceiver() as receiver:
        env = dict(receiver.env(), OTEL_SERVICE_NAME="starlette-it", **ENTRY_POINT_ENV, **(extra or {}))
        result = run_traced([sys.executable, str(script), mode, TRACEPARENT], env, cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        time.sleep(0.3)
        output = json.loads(result.stdout.strip().splitlines()[-1])
        return output, list(receiver.spans)


def test_plain_starlette_app_traced_without_importing_fastapi(tmp_path):
    output, spans = _run(tmp_path, "plain")
    assert output == {"statuses": [200], "fastapi_imported": False}
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.name == "GET /api/users/{id}" and server.attributes["http.route"] == "/api/users/{id}"
    assert server.scope == SCOPE
    assert server.trace_id == TRACE_ID and server.parent_span_id == "b7ad6b7169203331"
    assert server.attributes["server.address"] == "svc" and server.attributes["server.port"] == 8000
    (task,) = [s for s in spans if s.name == "background_task print"]
    assert task.parent_span_id == server.span_id and task.scope == SCOPE


def test_with_fastapi_imported_every_app_is_the_fastapi_instrumentors_as_before(tmp_path):
    output, spans = _run(tmp_path, "with-fastapi")
    assert output == {"statuses": [200, 200], "fastapi_imported": True}
    servers = [s for s in spans if s.kind == "SERVER"]
    assert len(servers) == 2 and {s.scope for s in servers} == {"autotrace.instrumentors.fastapi"}
    assert all(s.name == "GET /api/users/{id}" and s.trace_id == TRACE_ID for s in servers)
    assert len([s for s in spans if s.name == "background_task print"]) == 1
    assert not [s for s in spans if s.scope in ("fastapi", SCOPE)]


def test_fastapi_disabled_still_means_no_starlette_spans_once_fastapi_is_imported(tmp_path):
    output, spans = _run(tmp_path, "with-fastapi", {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "fastapi"})
    assert output["statuses"] == [200, 200]
    assert [s for s in spans if s.scope.startswith("autotrace.")] == []
