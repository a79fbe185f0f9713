"""Issue 9, in process: hostile or odd input never changes what the program sees, and faults in
autotrace's own code never reach the program.

Headers are fuzzed with hypothesis through a Flask app (test client) and a FastAPI app (Starlette's
TestClient), every propagator installed (tracecontext, baggage, b3, b3multi, jaeger): the response is
exactly the uninstrumented one and no context is left attached.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask import Flask, request  # imported before patching
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.jaeger import JaegerPropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from autotrace import http as at_http
from autotrace.instrumentors import flask as flask_instr
from autotrace.instrumentors.flask import FlaskInstrumentor

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI, WebSocket  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from autotrace.instrumentors.fastapi import FastAPIInstrumentor  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PROPAGATION_HEADERS = ["traceparent", "tracestate", "baggage", "b3", "X-B3-TraceId", "X-B3-SpanId",
                       "X-B3-Sampled", "X-B3-Flags", "X-B3-ParentSpanId", "uber-trace-id", "uberctx-user"]


@pytest.fixture(autouse=True)
def every_propagator():
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([
        TraceContextTextMapPropagator(), W3CBaggagePropagator(), B3MultiFormat(), B3SingleFormat(), JaegerPropagator(),
    ]))
    yield
    propagate.set_global_textmap(previous)


def flask_app() -> Flask:
    app = Flask("fuzz")

    @app.route("/echo", methods=["GET", "POST"])
    def echo():
        return {"seen": sorted(k.lower() for k in request.headers.keys()), "n": len(request.headers)}

    return app


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/echo")
    async def echo(q: str = "") -> dict:
        return {"q": q}

    return app


# --------------------------------------------------------------------------
# Header values: valid-looking, broken, huge, unicode

HEX = "0123456789abcdef"
hex_id = st.one_of(
    st.text(HEX, min_size=0, max_size=40),
    st.sampled_from(["0" * 32, "0" * 16, "f" * 32, "F" * 32, "zz" * 16, "-1", ""]),
)
traceparent = st.one_of(
    st.builds(lambda v, t, s, f: f"{v}-{t}-{s}-{f}", st.text(HEX, max_size=3), hex_id, hex_id, st.text(HEX + "x", max_size=3)),
    st.text(max_size=200),
)
latin = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=300)
header_value = st.one_of(
    traceparent,
    latin,
    st.builds(lambda k, v, n: ",".join([f"{k}={v}"] * n), latin, latin, st.integers(0, 200)),  # long lists
    st.builds(lambda n: "a" * n, st.integers(0, 20000)),  # huge values
    st.text(max_size=100).map(lambda s: s.encode("utf-8").decode("latin-1")),  # unicode as raw UTF-8 bytes
)
headers_strategy = st.lists(st.tuples(st.sampled_from(PROPAGATION_HEADERS), header_value), max_size=8)


def printable(value: str) -> str:
    return "".join(c for c in value if c not in "\r\n\x00")


@pytest.fixture
def flask_pair(instrument):
    """(uninstrumented client, instrumented client) on the same app: the plain one calls the original wsgi_app."""
    import flask.app
    from werkzeug.test import Client

    instrument(FlaskInstrumentor)
    app = flask_app()
    original = flask.app.Flask.wsgi_app.__wrapped__
    plain = Client(lambda environ, start_response: original(app, environ, start_response), flask.Response)
    return plain, Client(app, flask.Response)


@given(headers=headers_strategy)
@FUZZ
def test_flask_propagation_headers_fuzz(flask_pair, headers):
    plain, traced = flask_pair
    headers = [(k, printable(v).strip()) for k, v in headers]  # repeated names kept
    expected = plain.get("/echo", headers=headers)
    response = traced.get("/echo", headers=headers)
    assert (response.status_code, response.data) == (expected.status_code, expected.data)
    assert response.status_code == 200
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.fixture
def fastapi_client(instrument):
    instrument(FastAPIInstrumentor)
    with TestClient(fastapi_app()) as client:
        yield client


@given(headers=headers_strategy, q=latin)
@FUZZ
def test_fastapi_propagation_headers_fuzz(fastapi_client, headers, q):
    raw = [(k.encode(), printable(v).strip().encode("utf-8")) for k, v in headers]
    response = fastapi_client.get("/echo", params={"q": q}, headers=raw)
    assert response.status_code == 200
    assert response.json() == {"q": q}
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_same_answer_with_and_without_autotrace_for_hostile_headers(instrument, spans):
    """Sanity for the fuzz tests: the instrumented app answers exactly like the plain one."""
    hostile = [("traceparent", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"), ("traceparent", "ff-x"),
               ("baggage", "k=" + "v" * 100000), ("b3", "not-b3"), ("tracestate", "=,=,=" * 1000),
               ("uber-trace-id", "\xe9\xe9:::")]
    before = flask_app().test_client().get("/echo", headers=hostile)
    instrument(FlaskInstrumentor)
    after = flask_app().test_client().get("/echo", headers=hostile)
    assert (before.status_code, before.data, before.headers.get("Content-Type")) == \
        (after.status_code, after.data, after.headers.get("Content-Type"))
    [span] = spans.get()
    assert span.context.trace_id != 0  # an invalid parent starts a new trace


# --------------------------------------------------------------------------
# Odd values elsewhere


@given(url=st.one_of(st.binary(max_size=300), st.text(max_size=300), st.integers(), st.none(), st.floats()))
@FUZZ
def test_redact_url_never_raises(url):
    assert isinstance(at_http.redact_url(url), str)


def test_redact_url_bytes_with_secrets():
    assert at_http.redact_url(b"https://u:p@h/x?token=abc") == "https://REDACTED:REDACTED@h/x?token=REDACTED"
    assert isinstance(at_http.redact_url(b"\xff\xfe://[::1?a=b"), str)


@given(pairs=st.lists(st.tuples(st.one_of(st.text(max_size=30), st.binary(max_size=30)),
                                st.one_of(st.text(), st.binary(), st.integers(), st.none(), st.floats())), max_size=10))
@FUZZ
def test_capture_headers_accepts_any_value_type(monkeypatch, pairs):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    at_http.reset_caches()
    result = at_http.capture_headers("server_request", pairs)
    assert all(isinstance(v, str) for values in result.values() for v in values)


def test_huge_attribute_values_and_non_string_headers_pass_through(instrument, spans, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-big,x-num")
    instrument(FlaskInstrumentor)
    client = flask_app().test_client()
    big = "x" * 1_000_000
    response = client.get("/echo?" + "q=" + "y" * 200_000, headers={"X-Big": big, "X-Num": 12345})
    assert response.status_code == 200
    span = spans.one()
    assert span.attributes["http.request.header.x-big"] == (big,)
    assert span.attributes["http.request.header.x-num"] == ("12345",)


def wsgi_call(app, environ):
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"] = status
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return captured["status"], body


BASE_ENVIRON = {
    "REQUEST_METHOD": "GET", "PATH_INFO": "/echo", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
    "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "wsgi.input": None, "wsgi.errors": None,
    "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
}

ODD_ENVIRONS = {
    "no-server-name": {"SERVER_NAME": None},
    "no-server-port-no-host": {"SERVER_NAME": None, "SERVER_PORT": None},
    "bytes-values": {"HTTP_HOST": b"example.com:8080", "HTTP_TRACEPARENT": b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01",
                     "REMOTE_ADDR": b"10.0.0.1", "QUERY_STRING": b"token=secret"},
    "weird-method": {"REQUEST_METHOD": "BREW"},
    "non-digit-port": {"SERVER_PORT": "http", "HTTP_HOST": "[::1]:x"},
    "non-ascii-path": {"PATH_INFO": "/\xc3\xa9cho"},
    "int-header": {"HTTP_X_NUMBER": 7, "HTTP_TRACEPARENT": 12},
    "non-str-key": {1: "one", b"HTTP_X": "b"},
}


@pytest.mark.parametrize("name", list(ODD_ENVIRONS))
def test_unusual_wsgi_environs_pass_through(instrument, name):
    import io

    def environ():
        env = dict(BASE_ENVIRON, **{"wsgi.input": io.BytesIO(b""), "wsgi.errors": io.StringIO()})
        for key, value in ODD_ENVIRONS[name].items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    app = flask_app()
    try:
        expected = wsgi_call(app, environ())
    except Exception as exc:  # Flask itself may reject the environ: it must reject it the same way traced
        expected = type(exc)
    instrument(FlaskInstrumentor)
    try:
        got = wsgi_call(flask_app(), environ())
    except Exception as exc:
        got = type(exc)
    assert got == expected
    assert trace.get_current_span() is trace.INVALID_SPAN


async def _asgi(app, scope, messages):
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception as exc:  # the app's own behaviour, compared below
        sent.append(("raised", type(exc)))
    return sent


ODD_SCOPES = {
    "no-headers-server-client": {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                                 "scheme": "http", "path": "/echo", "raw_path": b"/echo", "query_string": b"",
                                 "root_path": ""},
    "bytes-junk-headers": {"type": "http", "asgi": {"version": "3.0"}, "method": "GET", "path": "/echo",
                           "query_string": b"q=1", "headers": [(b"traceparent", b"\xff\xfe"), (b"host", b"\x00:\xff")],
                           "server": None, "client": None},
    "odd-server": {"type": "http", "asgi": {"version": "3.0"}, "method": "GET", "path": "/echo", "query_string": b"",
                   "headers": [], "server": ("unix-socket", None), "client": ["x"]},
}


@pytest.mark.parametrize("name", list(ODD_SCOPES))
def test_unusual_asgi_scopes_pass_through(instrument, name):
    expected = asyncio.run(_asgi(fastapi_app(), dict(ODD_SCOPES[name]), [{"type": "http.request", "body": b""}]))
    instrument(FastAPIInstrumentor)
    got = asyncio.run(_asgi(fastapi_app(), dict(ODD_SCOPES[name]), [{"type": "http.request", "body": b""}]))
    raised = lambda messages: [m for m in messages if isinstance(m, tuple)]  # noqa: E731
    sent = lambda messages: [m for m in messages if not isinstance(m, tuple)]  # noqa: E731
    assert raised(got) == raised(expected)  # the same exception (or none) reaches the server
    # FastAPI's own telemetry (active without autotrace when an SDK provider is set) reads
    # scope["headers"] before Starlette's error middleware: plain FastAPI then crashes without
    # answering, where under autotrace the error middleware still answers 500.
    assert sent(got) == sent(expected) or (sent(expected) == [] and got[0]["status"] == 500)
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_websocket_and_lifespan_scopes_pass_through(instrument, spans):
    app = fastapi_app()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        await websocket.send_text("hello " + await websocket.receive_text())
        await websocket.close()

    instrument(FastAPIInstrumentor)
    with TestClient(app) as client:  # runs the lifespan scope
        with client.websocket_connect("/ws") as socket:
            socket.send_text("there")
            assert socket.receive_text() == "hello there"
    assert trace.get_current_span() is trace.INVALID_SPAN


# --------------------------------------------------------------------------
# 5. Faults inside autotrace


class Bug(Exception):
    pass


def _explode(*args, **kwargs):
    raise Bug("autotrace bug")


def test_flask_wrapper_bug_leaves_the_call_alone(instrument, monkeypatch, caplog, spans):
    instrument(FlaskInstrumentor)
    monkeypatch.setattr(flask_instr, "_request_attributes", _explode)
    app = flask_app()

    @app.route("/fail")
    def fail():
        raise KeyError("the app's own error")

    app.config["PROPAGATE_EXCEPTIONS"] = True
    client = app.test_client()
    with caplog.at_level(logging.ERROR, logger="autotrace"):
        for _ in range(5):
            response = client.get("/echo", headers={"X-A": "1"})
            assert response.status_code == 200 and response.get_json()["seen"]
        with pytest.raises(KeyError, match="the app's own error"):
            client.get("/fail")
    errors = [r for r in caplog.records if r.name == "autotrace" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "flask.begin" in errors[0].getMessage()
    assert errors[0].exc_info[0] is Bug
    assert spans.get() == []  # untraced, not broken
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_fastapi_wrapper_bug_leaves_the_call_alone(instrument, monkeypatch, caplog):
    instrument(FastAPIInstrumentor)
    monkeypatch.setattr(FastAPIInstrumentor, "_start", _explode)
    app = fastapi_app()

    @app.get("/fail")
    async def fail():
        raise KeyError("the app's own error")

    with caplog.at_level(logging.ERROR, logger="autotrace"):
        with TestClient(app) as client:
            for _ in range(5):
                assert client.get("/echo", params={"q": "v"}).json() == {"q": "v"}
            with pytest.raises(KeyError, match="the app's own error"):
                client.get("/fail")
    errors = [r for r in caplog.records if r.name == "autotrace" and r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info[0] is Bug
    assert trace.get_current_span() is trace.INVALID_SPAN
