"""Flask instrumentor, in process, with Flask's test client."""

from __future__ import annotations

import io
import sys
import time

import pytest
from flask import Blueprint, Flask, Response, abort, stream_with_context  # imported before any patching
from flask.testing import FlaskClient
from opentelemetry import baggage, propagate, trace
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import EnvironBuilder

import flask.app
from autotrace.instrumentors import flask as flask_instr
from autotrace.instrumentors.flask import FlaskInstrumentor

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
tracer = trace.get_tracer("test")


class Boom(Exception):
    pass


class Client(FlaskClient):
    """Reads (and closes) each response body, as a WSGI server does; pass buffered=False to stream."""

    def open(self, *args, buffered=True, **kwargs):
        return super().open(*args, buffered=buffered, **kwargs)


def make_app(**config) -> Flask:
    app = Flask("orders")
    app.test_client_class = Client
    app.config.update(config)

    @app.route("/orders/<int:order_id>")
    def order(order_id):
        return {"id": order_id}

    @app.route("/boom")
    def boom():
        raise Boom("kaput")

    @app.route("/fail")
    def fail():
        return "backend down", 503

    @app.route("/forbidden")
    def forbidden():
        abort(403)

    @app.route("/health")
    def health():
        return "ok"

    @app.route("/headers")
    def headers():
        response = Response("ok")
        response.headers["X-Resp"] = "r1"
        response.headers["Set-Cookie"] = "sid=secret"
        return response

    @app.route("/context")
    def context():
        span = trace.get_current_span()
        with tracer.start_as_current_span("inside"):
            pass
        return {
            "span_id": format(span.get_span_context().span_id, "016x"),
            "user": baggage.get_baggage("user"),
        }

    @app.route("/stream")
    def stream():
        def generate():
            yield "first\n"
            with tracer.start_as_current_span("chunk"):
                time.sleep(0.2)
            yield "second\n"

        return Response(stream_with_context(generate()))

    api = Blueprint("api", __name__, url_prefix="/api/v1")

    @api.route("/items/<name>", methods=["GET", "POST"])
    def item(name):
        return {"name": name}

    app.register_blueprint(api)
    return app


def server_spans(spans):
    return [s for s in spans.get() if s.kind is SpanKind.SERVER]


@pytest.fixture
def app():
    return make_app()  # created BEFORE the instrumentor patches (import-order proof)


@pytest.fixture
def client(app, instrument):
    instrument(FlaskInstrumentor)
    return app.test_client()


# ----------------------------------------------------------------------------
# names and attributes


def test_route_name_and_stable_attributes(client, spans):
    response = client.get(
        "/orders/7?token=s3cret&page=2",
        headers={"User-Agent": "probe/1.0"},
        environ_overrides={"REMOTE_ADDR": "10.1.2.3"},
    )
    assert response.status_code == 200 and response.json == {"id": 7}
    span = spans.one()
    assert span.name == "GET /orders/<int:order_id>"
    assert span.kind is SpanKind.SERVER
    assert span.status.status_code is StatusCode.UNSET
    assert span.parent is None
    assert dict(span.attributes) == {
        "http.request.method": "GET",
        "url.path": "/orders/7",
        "url.query": "token=REDACTED&page=2",
        "url.scheme": "http",
        "server.address": "localhost",
        "server.port": 80,
        "client.address": "10.1.2.3",
        "network.protocol.version": "1.1",
        "user_agent.original": "probe/1.0",
        "http.route": "/orders/<int:order_id>",
        "http.response.status_code": 200,
    }


def test_host_port_forwarded_for_and_https(client, spans):
    client.get(
        "/orders/1",
        base_url="https://shop.example:8443",
        headers={"X-Forwarded-For": "203.0.113.9, 10.0.0.1"},
    )
    attributes = spans.one().attributes
    assert attributes["url.scheme"] == "https"
    assert attributes["server.address"] == "shop.example"
    assert attributes["server.port"] == 8443
    assert attributes["client.address"] == "203.0.113.9"


def test_blueprint_route_includes_prefix(client, spans):
    client.post("/api/v1/items/widget")
    span = spans.one()
    assert span.name == "POST /api/v1/items/<name>"
    assert span.attributes["http.route"] == "/api/v1/items/<name>"


def test_404_is_named_by_method_only(client, spans):
    response = client.get("/no/such/page/123")
    assert response.status_code == 404
    span = spans.one()
    assert span.name == "GET"
    assert "http.route" not in span.attributes
    assert span.attributes["url.path"] == "/no/such/page/123"
    assert span.attributes["http.response.status_code"] == 404
    assert span.status.status_code is StatusCode.UNSET


def test_405_is_named_by_method_only(client, spans):
    assert client.delete("/orders/1").status_code == 405
    assert spans.one().name == "DELETE"


def test_nonstandard_method_is_other(client, spans):
    response = client.open("/orders/1", method="FROBNICATE")
    assert response.status_code == 405
    span = spans.one()
    assert span.name == "_OTHER"
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "FROBNICATE"


# ----------------------------------------------------------------------------
# status and exceptions


def test_5xx_response_is_an_error(client, spans):
    assert client.get("/fail").status_code == 503
    span = spans.one()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "503"
    assert span.events == ()


def test_4xx_is_not_an_error(client, spans):
    assert client.get("/forbidden").status_code == 403
    span = spans.one()
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in span.attributes
    assert span.name == "GET /forbidden"


def test_exception_converted_to_500_is_recorded(client, spans):
    response = client.get("/boom")
    assert response.status_code == 500
    span = spans.one()
    assert span.name == "GET /boom"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["error.type"].endswith("Boom")
    [event] = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"].endswith("Boom")
    assert event.attributes["exception.message"] == "kaput"
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_propagated_exception_is_recorded_and_reraised_unchanged(instrument, spans):
    app = make_app(TESTING=True)  # PROPAGATE_EXCEPTIONS: the test client sees the error
    raised = []

    @app.route("/own")
    def own():
        exc = Boom("mine")
        raised.append(exc)
        raise exc

    instrument(FlaskInstrumentor)
    with pytest.raises(Boom) as info:
        app.test_client().get("/own")
    assert info.value is raised[0]
    span = spans.one()
    assert span.name == "GET /own"
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]  # once, not twice
    assert "http.response.status_code" not in span.attributes
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_handled_exception_is_not_an_error_event(instrument, app, spans):
    @app.errorhandler(Boom)
    def handled(exc):
        return "handled", 409

    instrument(FlaskInstrumentor)
    assert app.test_client().get("/boom").status_code == 409
    span = spans.one()
    assert span.events == ()
    assert span.status.status_code is StatusCode.UNSET


# ----------------------------------------------------------------------------
# streaming


def test_streaming_span_ends_when_body_is_exhausted(client, spans):
    response = client.get("/stream", buffered=False)  # the test client reads only the first chunk here
    assert server_spans(spans) == []
    assert response.get_data(as_text=True) == "first\nsecond\n"
    server = server_spans(spans)[0]
    assert (server.end_time - server.start_time) / 1e9 >= 0.2
    chunk = spans.one("chunk")  # made while streaming: a child of the SERVER span
    assert chunk.parent.span_id == server.context.span_id
    assert server.name == "GET /stream"
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_streaming_span_ends_when_body_is_closed(client, spans):
    response = client.get("/stream", buffered=False)
    assert server_spans(spans) == []
    response.close()  # client went away before the end
    assert len(server_spans(spans)) == 1


def test_streaming_generator_failure_is_recorded(app, instrument, spans):
    @app.route("/broken-stream")
    def broken_stream():
        def generate():
            yield "partial"
            raise Boom("mid-stream")

        return Response(generate())

    instrument(FlaskInstrumentor)
    response = app.test_client().get("/broken-stream", buffered=False)
    with pytest.raises(Boom):
        response.get_data()
    span = spans.one()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 200  # headers were already sent
    assert [e.name for e in span.events] == ["exception"]
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_wrapped_body_keeps_close(app, instrument):
    instrument(FlaskInstrumentor)
    closed = []

    @app.route("/closing")
    def closing():
        response = Response(iter([b"a", b"b"]))
        response.call_on_close(lambda: closed.append(True))
        return response

    environ = EnvironBuilder(path="/closing").get_environ()
    body = app.wsgi_app(environ, lambda status, headers, exc_info=None: None)
    assert hasattr(body, "close")
    assert list(body) == [b"a", b"b"]
    body.close()
    assert closed == [True]


# ----------------------------------------------------------------------------
# configuration


def test_excluded_urls_flask_specific(client, spans, monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_FLASK_EXCLUDED_URLS", "/health$,token=")
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "orders")  # the specific one wins
    assert client.get("/health").status_code == 200
    assert client.get("/api/v1/items/x?token=1").status_code == 200
    assert spans.get() == []
    client.get("/orders/1")
    assert spans.one().name == "GET /orders/<int:order_id>"


def test_excluded_urls_generic_matches_full_url(client, spans, monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", r"^http://localhost/health")
    client.get("/health")
    assert spans.get() == []
    client.get("/health", base_url="http://other.host")
    assert len(spans.get()) == 1


def test_header_capture_with_redaction(client, spans, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-request-id,authorization,cookie,x-api-.*,content-type")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "x-resp,set-cookie")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "x-api-key")
    client = client.application.test_client(use_cookies=False)  # lets our Cookie header through
    client.post(
        "/headers",
        headers={
            "X-Request-Id": "req-1",
            "Authorization": "Bearer abc",
            "Cookie": "sid=1",
            "X-Api-Key": "k",
            "X-Api-Version": "3",
            "X-Other": "not captured",
        },
        data="{}",
        content_type="application/json",
        environ_overrides={"HTTP_CONTENT_TYPE": "application/json"},  # both spellings: reported once
    )
    client.get("/headers")
    post, get = spans.get()
    attributes = post.attributes
    assert attributes["http.request.header.x-request-id"] == ("req-1",)
    assert attributes["http.request.header.authorization"] == ("REDACTED",)
    assert attributes["http.request.header.cookie"] == ("REDACTED",)
    assert attributes["http.request.header.x-api-key"] == ("REDACTED",)
    assert attributes["http.request.header.x-api-version"] == ("3",)
    assert attributes["http.request.header.content-type"] == ("application/json",)
    assert not any("x-other" in key for key in attributes)
    assert get.attributes["http.response.header.x-resp"] == ("r1",)
    assert get.attributes["http.response.header.set-cookie"] == ("REDACTED",)


def test_no_header_capture_by_default(client, spans):
    client.get("/headers", headers={"X-Request-Id": "r"})
    assert not any(".header." in key for key in spans.one().attributes)


def test_http_dup_adds_old_names(client, spans, monkeypatch):
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    client.get("/orders/3?x=1", headers={"User-Agent": "ua"})
    attributes = spans.one().attributes
    assert attributes["http.method"] == "GET"
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.status_code"] == 200
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.scheme"] == "http"
    assert attributes["http.target"] == "/orders/3?x=1"
    assert attributes["net.host.name"] == "localhost"
    assert attributes["http.user_agent"] == "ua"
    assert attributes["http.flavor"] == "1.1"


def test_without_dup_no_old_names(client, spans):
    client.get("/orders/3")
    assert "http.method" not in spans.one().attributes


# ----------------------------------------------------------------------------
# propagation and context


def test_valid_traceparent_continues_the_trace_with_baggage(client, spans):
    response = client.get("/context", headers={"traceparent": TRACEPARENT, "baggage": "user=alice"})
    server = spans.one("GET /context")
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert server.parent.is_remote
    assert response.json == {"span_id": format(server.context.span_id, "016x"), "user": "alice"}
    inside = spans.one("inside")
    assert inside.parent.span_id == server.context.span_id


@pytest.mark.parametrize(
    "header",
    ["garbage", "00-zzzz-b7ad6b7169203331-01", f"00-{'0' * 32}-{PARENT_ID}-01", "\x00\xff", "00-" + "a" * 600],
)
def test_malformed_traceparent_starts_new_trace(client, spans, header):
    response = client.get("/orders/1", headers={"traceparent": header})
    assert response.status_code == 200
    span = spans.one()
    assert span.parent is None
    assert format(span.context.trace_id, "032x") != TRACE_ID


def test_b3_when_configured(client, spans):
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), B3MultiFormat()]))
    try:
        client.get(
            "/orders/1",
            headers={"X-B3-TraceId": TRACE_ID, "X-B3-SpanId": PARENT_ID, "X-B3-Sampled": "1"},
        )
    finally:
        propagate.set_global_textmap(previous)
    span = spans.one()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID


def test_no_context_left_after_requests(instrument, spans):
    app = make_app(TESTING=True)
    instrument(FlaskInstrumentor)
    client = app.test_client()
    with pytest.raises(Boom):
        client.get("/boom")
    assert trace.get_current_span() is trace.INVALID_SPAN
    client.get("/orders/1")
    client.get("/stream", buffered=False).close()
    assert trace.get_current_span() is trace.INVALID_SPAN
    for span in server_spans(spans):
        assert span.parent is None  # each request started from no current span
    assert flask_instr._ACTIVE.get() is None


def test_app_created_before_patching_and_factory_after(instrument, spans):
    early = Flask("early")
    early.test_client_class = Client
    early.add_url_rule("/e", "e", lambda: "e")
    instrument(FlaskInstrumentor)
    late = make_app()
    early.test_client().get("/e")
    late.test_client().get("/orders/5")
    assert sorted(s.name for s in spans.get()) == ["GET /e", "GET /orders/<int:order_id>"]
    # never a subclass swap: the class users imported is the class that runs
    assert type(early) is Flask and flask.Flask is Flask and flask.app.Flask is Flask


def test_unpatch_restores_originals(instrument, spans, app):
    wsgi_app = Flask.__dict__["wsgi_app"]
    handle_exception = Flask.__dict__["handle_exception"]
    instrumentor = instrument(FlaskInstrumentor)
    assert Flask.__dict__["wsgi_app"] is not wsgi_app
    captured = app.wsgi_app  # as `app.wsgi_app = Middleware(app.wsgi_app)` would keep it
    instrumentor.unpatch()
    assert Flask.__dict__["wsgi_app"] is wsgi_app
    assert Flask.__dict__["handle_exception"] is handle_exception
    assert app.test_client().get("/orders/1").status_code == 200
    environ = EnvironBuilder(path="/orders/1").get_environ()
    assert b"".join(captured(environ, lambda *a: None)) == b'{"id":1}\n'
    assert spans.get() == []


# ----------------------------------------------------------------------------
# exactly one SERVER span when nested


def test_inside_an_existing_server_span_enriches_it(client, spans):
    with tracer.start_as_current_span("GET", kind=SpanKind.SERVER):
        assert client.get("/orders/9").status_code == 200
    [server] = server_spans(spans)
    assert server.name == "GET /orders/<int:order_id>"
    assert server.attributes["http.route"] == "/orders/<int:order_id>"
    assert len(spans.get()) == 1


def test_mounted_under_another_flask_app(instrument, spans):
    instrument(FlaskInstrumentor)  # before the middleware captures outer.wsgi_app
    outer = Flask("outer")
    outer.test_client_class = Client
    outer.add_url_rule("/", "root", lambda: "root")
    inner = make_app()
    outer.wsgi_app = DispatcherMiddleware(outer.wsgi_app, {"/shop": inner})
    client = outer.test_client()
    assert client.get("/shop/orders/4").json == {"id": 4}
    assert client.get("/").data == b"root"
    mounted, root = spans.get()
    assert mounted.name == "GET /shop/orders/<int:order_id>"
    assert mounted.attributes["url.path"] == "/shop/orders/4"
    assert root.name == "GET /"


def test_flask_called_from_inside_a_flask_view(instrument, spans):
    inner = make_app()
    outer = Flask("outer")
    outer.test_client_class = Client

    @outer.route("/proxy")
    def proxy():
        from flask import request

        status = []
        body = inner.wsgi_app(dict(request.environ, PATH_INFO="/orders/2"), lambda s, h, e=None: status.append(s))
        return b"".join(body), int(status[0][:3])

    instrument(FlaskInstrumentor)
    assert outer.test_client().get("/proxy").data == b'{"id":2}\n'
    assert [s.name for s in server_spans(spans)] == ["GET /proxy"]


# ----------------------------------------------------------------------------
# never break the app


def _run(app, environ):
    """Call the app as a WSGI server would; (outcome, status, body)."""
    result = {}

    def start_response(status, headers, exc_info=None):
        result["status"] = status

    try:
        body = app.wsgi_app(environ, start_response)
        data = b"".join(body)
        getattr(body, "close", lambda: None)()
        return "ok", result.get("status"), data
    except Exception as exc:
        return type(exc).__name__, None, None


ODD_ENVIRONS = [
    {"REQUEST_METHOD": "GET", "PATH_INFO": "/orders/1", "wsgi.url_scheme": "http", "SERVER_NAME": "x", "SERVER_PORT": "80"},
    {"REQUEST_METHOD": b"GET", "PATH_INFO": "/orders/1", "wsgi.url_scheme": "http", "HTTP_HOST": b"h:1", "HTTP_USER_AGENT": b"\xff", "HTTP_TRACEPARENT": TRACEPARENT.encode()},
    {"REQUEST_METHOD": "GET", "PATH_INFO": b"/orders/1", "SCRIPT_NAME": b"", "QUERY_STRING": b"a=1", "SERVER_PORT": "not-a-port", "SERVER_NAME": "x"},
    {"PATH_INFO": "/caf\xc3\xa9", "HTTP_HOST": "[::1]:8080", "SERVER_PROTOCOL": "HTTP/2", "wsgi.url_scheme": "https"},
    {"REQUEST_METHOD": None, "HTTP_HOST": ":", "HTTP_X_FORWARDED_FOR": ",", "wsgi.url_scheme": "http", "SERVER_NAME": "x", "SERVER_PORT": "80"},
]


@pytest.mark.parametrize("overrides", ODD_ENVIRONS)
def test_unusual_environs_behave_as_without_autotrace(app, overrides, monkeypatch):
    base = {"wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr}
    monkeypatch.setenv("OTEL_PYTHON_FLASK_EXCLUDED_URLS", "never-matches")
    expected = _run(app, dict(base, **overrides))
    instrumentor = FlaskInstrumentor().instrument()
    try:
        assert _run(app, dict(base, **overrides)) == expected
    finally:
        instrumentor.unpatch()
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_odd_environ_still_traced(client, spans):
    environ = EnvironBuilder(path="/orders/1", headers={"User-Agent": "x"}).get_environ()
    environ["HTTP_USER_AGENT"] = b"bytes-agent"
    environ["HTTP_TRACEPARENT"] = TRACEPARENT.encode()
    environ["PATH_INFO"] = "/orders/1"
    environ.pop("SERVER_PROTOCOL", None)
    environ.pop("REMOTE_ADDR", None)
    app = client.application
    outcome = _run(app, environ)
    assert outcome[0] == "ok" and outcome[1].startswith("200")
    span = spans.one()
    assert span.name == "GET /orders/<int:order_id>"
    assert span.attributes["user_agent.original"] == "bytes-agent"
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_bug_in_our_code_leaves_request_served(client, spans, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("autotrace bug")

    monkeypatch.setattr(flask_instr, "_request_attributes", broken)
    response = client.get("/orders/1")
    assert response.status_code == 200 and response.json == {"id": 1}
    assert spans.get() == []
    monkeypatch.undo()

    monkeypatch.setattr(flask_instr._Request, "on_response", broken)
    monkeypatch.setattr(flask_instr._Request, "on_exception", broken)
    assert client.get("/orders/1").json == {"id": 1}
    assert client.get("/boom").status_code == 500
    assert len(spans.get()) == 2  # still ended, just without the response details
    monkeypatch.undo()

    monkeypatch.setattr(flask_instr._Request, "body", broken)
    assert client.get("/stream", buffered=False).get_data() == b"first\nsecond\n"
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_propagator_failure_starts_new_trace(client, spans):
    class Broken(TraceContextTextMapPropagator):
        def extract(self, *args, **kwargs):
            raise ValueError("bad propagator")

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(Broken())
    try:
        with tracer.start_as_current_span("unrelated local span"):
            assert client.get("/orders/1", headers={"traceparent": TRACEPARENT}).status_code == 200
    finally:
        propagate.set_global_textmap(previous)
    assert server_spans(spans)[0].parent is None  # a new trace, not a child of whatever is current
