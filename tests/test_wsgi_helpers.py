"""autotrace.wsgi, once, with plain WSGI callables (no framework): what every WSGI instrumentor gets.

A tiny request class stands for a framework (route table, ContextVar), and
``serve`` does what an instrumentor's wrapper and a WSGI server do: start the
request, call the application through it, read and close the body.
"""

from __future__ import annotations

import io
import logging
from contextvars import ContextVar
from wsgiref.util import FileWrapper

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace import wsgi
from autotrace.kit import Instrumentor, suppressed
from autotrace.wsgi import GETTER, WsgiRequest, full_url, request_attributes, safe_get, start_request

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
tracer = trace.get_tracer("test")

ROUTES = {"/items/7": "/items/<id>", "/boom": "/boom", "/stream": "/stream", "/fail": "/fail"}


class Probe(Instrumentor):
    name = "wsgiprobe"


PROBE = Probe()


class Request(WsgiRequest):
    __slots__ = ()
    library = "wsgiprobe"
    active: "ContextVar" = ContextVar("test_wsgi_request", default=None)

    def find_route(self):
        return ROUTES.get(self.environ.get("PATH_INFO"))


class Boom(Exception):
    pass


def make_environ(path="/items/7", method="GET", **extra):
    environ = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
        "SERVER_NAME": "srv.internal", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO(),
        "REMOTE_ADDR": "10.0.0.2",
    }
    environ.update(extra)
    return environ


def serve(app, environ, cls=Request, read=request_attributes):
    """As an instrumentor + server would: (status, body bytes, the request or None, the body object)."""
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, headers
        return seen["write"]

    seen["write"] = lambda data: None
    request = start_request(cls, PROBE, environ, start_response, read)
    body = app(environ, start_response) if request is None else request.call(app, environ)
    data = b"".join(body)
    close = getattr(body, "close", None)
    if close is not None:
        close()
    return seen.get("status"), data, request, body


def hello(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain"), ("X-Resp", "r1"), ("Set-Cookie", "sid=1")])
    hello.write = write
    return [b"hello"]


def status_app(status):
    def app(environ, start_response):
        start_response(status, [])
        return [b"x"]

    return app


# ----------------------------------------------------------------------------
# attributes from the environ


def test_attributes_name_and_route_with_mount_point(spans):
    environ = make_environ(
        SCRIPT_NAME="/shop", PATH_INFO="/items/7", QUERY_STRING="token=s3cret&page=2",
        HTTP_HOST="shop.example:8443", HTTP_X_FORWARDED_FOR="203.0.113.9, 10.0.0.1",
        HTTP_USER_AGENT="probe/1.0", **{"wsgi.url_scheme": "https"},
    )
    status, data, request, _ = serve(hello, environ)
    assert (status, data) == ("200 OK", b"hello")
    assert hello.write is not None  # start_response's own return value reached the app
    span = spans.one()
    assert span.kind is SpanKind.SERVER and span.parent is None
    assert span.name == "GET /shop/items/<id>"
    assert dict(span.attributes) == {
        "http.request.method": "GET",
        "url.path": "/shop/items/7",
        "url.query": "token=REDACTED&page=2",
        "url.scheme": "https",
        "server.address": "shop.example",
        "server.port": 8443,
        "client.address": "203.0.113.9",
        "network.protocol.version": "1.1",
        "user_agent.original": "probe/1.0",
        "http.route": "/shop/items/<id>",
        "http.response.status_code": 200,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert trace.get_current_span() is trace.INVALID_SPAN and Request.active.get() is None


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, {"server.address": "srv.internal", "server.port": 8000}),
        ({"HTTP_HOST": "[::1]:8080"}, {"server.address": "::1", "server.port": 8080}),
        ({"HTTP_HOST": "h.example", "wsgi.url_scheme": "https"}, {"server.address": "h.example", "server.port": 443}),
        ({"HTTP_HOST": "h.example:x"}, {"server.address": "h.example", "server.port": 80}),
        ({"SERVER_PORT": "not-a-port"}, {"server.address": "srv.internal"}),
    ],
)
def test_server_address_and_port(extra, expected):
    _, _, attributes = request_attributes(make_environ(**extra).get)
    assert {k: v for k, v in attributes.items() if k.startswith("server.")} == expected


@pytest.mark.parametrize(
    "method, expected",
    [
        ("GET", ("GET", None)), ("get", ("GET", "get")), ("FROBNICATE", ("_OTHER", "FROBNICATE")),
        (None, ("_OTHER", "None")),
    ],
)
def test_method_normalisation(method, expected):
    environ = make_environ()
    if method is None:
        del environ["REQUEST_METHOD"]
    else:
        environ["REQUEST_METHOD"] = method
    name, _, attributes = request_attributes(safe_get(environ))
    assert (name, attributes.get("http.request.method_original")) == expected
    assert attributes["http.request.method"] == expected[0]


def test_protocol_versions_and_client_address():
    versions = [("HTTP/1.0", "1.0"), ("HTTP/2", "2"), ("HTTP/3", "3"), ("HTTP/4.2", "4.2"), ("SPDY", None)]
    for protocol, version in versions:
        _, _, attributes = request_attributes(make_environ(SERVER_PROTOCOL=protocol).get)
        assert attributes.get("network.protocol.version") == version
    _, _, attributes = request_attributes(make_environ(HTTP_X_FORWARDED_FOR=",").get)
    assert "client.address" not in attributes  # an empty first hop, not REMOTE_ADDR
    _, _, attributes = request_attributes(make_environ().get)
    assert attributes["client.address"] == "10.0.0.2"


def test_non_ascii_path_and_mount_point_are_utf8_decoded(spans):
    script, path = "/caf\xc3\xa9", "/items/\xc3\xa9"  # WSGI strings: UTF-8 bytes as latin-1
    ROUTES[path] = "/items/<name>"
    serve(hello, make_environ(SCRIPT_NAME=script, PATH_INFO=path))
    span = spans.one()
    assert span.attributes["url.path"] == "/café/items/é"
    assert span.attributes["http.route"] == "/café/items/<name>"
    _, script_name, attributes = request_attributes(make_environ(SCRIPT_NAME="", PATH_INFO="").get)
    assert (script_name, attributes["url.path"]) == ("", "/")


def test_bytes_and_junk_in_the_environ_are_tolerated(spans):
    class Hostile(dict):
        def get(self, key, default=None):
            if key == "HTTP_X_FORWARDED_FOR":
                raise KeyError(key)
            return super().get(key, default)

    environ = Hostile(make_environ(
        REQUEST_METHOD=b"GET", PATH_INFO=b"/items/7", QUERY_STRING=b"a=1", HTTP_HOST=b"h:81",
        HTTP_USER_AGENT=b"\xffagent", SERVER_PROTOCOL=11, HTTP_TRACEPARENT=TRACEPARENT.encode(),
    ))
    with pytest.raises(TypeError):
        request_attributes(environ.get)  # the fast path refuses; start_request asks again carefully
    ROUTES[b"/items/7"] = "/items/<id>"  # (this route table reads the raw environ)
    status, data, request, _ = serve(hello, environ)
    assert (status, data) == ("200 OK", b"hello")
    span = spans.one()
    assert span.name == "GET /items/<id>"
    attributes = span.attributes
    assert (attributes["url.path"], attributes["url.query"], attributes["server.port"]) == ("/items/7", "a=1", 81)
    assert attributes["user_agent.original"] == "\xffagent"
    assert attributes["client.address"] == "10.0.0.2"  # X-Forwarded-For unreadable: REMOTE_ADDR
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_full_url_for_excluded_urls():
    assert full_url(make_environ(QUERY_STRING="q=1").get) == "http://srv.internal:8000/items/7?q=1"
    assert full_url(make_environ(SERVER_PORT="80").get) == "http://srv.internal/items/7"
    environ = make_environ(
        HTTP_HOST="h.example", SCRIPT_NAME="/m", PATH_INFO="/caf\xc3\xa9", **{"wsgi.url_scheme": "https"}
    )
    assert full_url(environ.get) == "https://h.example/m/café"


def test_excluded_urls_of_the_library(spans, monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_WSGIPROBE_EXCLUDED_URLS", "/health$,token=")
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "items")  # the specific one wins
    assert serve(hello, make_environ(PATH_INFO="/health"))[2] is None
    assert serve(hello, make_environ(PATH_INFO="/x", QUERY_STRING="token=1"))[2] is None
    assert spans.get() == []
    assert serve(hello, make_environ())[:2] == ("200 OK", b"hello")
    assert len(spans.get()) == 1


def test_environ_getter():
    environ = make_environ(HTTP_TRACEPARENT=TRACEPARENT, HTTP_X_B3_TRACEID=b"abc")
    environ[1] = "junk"
    assert GETTER.get(environ, "traceparent") == [TRACEPARENT]
    assert GETTER.get(environ, "X-B3-TraceId") == ["abc"]
    assert GETTER.get(environ, "tracestate") is None
    assert sorted(GETTER.keys(environ)) == ["traceparent", "x-b3-traceid"]


# ----------------------------------------------------------------------------
# the response


@pytest.mark.parametrize(
    "status, error",
    [("503 Service Unavailable", True), (b"500 Oops", True), ("404 Not Found", False), ("302 Found", False)],
)
def test_status_code_and_5xx_error(spans, status, error):
    serve(status_app(status), make_environ(PATH_INFO="/nowhere"))
    span = spans.one()
    code = int(status[:3])
    assert span.name == "GET"  # no route known
    assert span.attributes["http.response.status_code"] == code
    assert span.status.status_code is (StatusCode.ERROR if error else StatusCode.UNSET)
    assert span.attributes.get("error.type") == (str(code) if error else None)
    assert span.events == ()


def test_header_capture_request_and_response(spans, monkeypatch):
    monkeypatch.setenv(
        "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-request-id,authorization,content-type"
    )
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "x-resp,set-cookie")
    serve(hello, make_environ(
        HTTP_X_REQUEST_ID="req-1", HTTP_AUTHORIZATION="Bearer abc", CONTENT_TYPE="application/json",
        HTTP_CONTENT_TYPE="text/ignored", HTTP_X_OTHER="no",
    ))
    attributes = spans.one().attributes
    assert attributes["http.request.header.x-request-id"] == ("req-1",)
    assert attributes["http.request.header.authorization"] == ("REDACTED",)
    assert attributes["http.request.header.content-type"] == ("application/json",)  # the CGI spelling, once
    assert attributes["http.response.header.x-resp"] == ("r1",)
    assert attributes["http.response.header.set-cookie"] == ("REDACTED",)
    assert not any("x-other" in key for key in attributes)


def test_http_dup_old_names(spans, monkeypatch):
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    serve(hello, make_environ(QUERY_STRING="x=1", HTTP_USER_AGENT="ua"))
    attributes = spans.one().attributes
    assert attributes["http.method"] == "GET" and attributes["http.status_code"] == 200
    assert attributes["http.target"] == "/items/7?x=1" and attributes["net.host.name"] == "srv.internal"
    assert attributes["http.user_agent"] == "ua" and attributes["http.flavor"] == "1.1"
    assert attributes["http.route"] == "/items/<id>"


# ----------------------------------------------------------------------------
# exceptions


def test_app_exception_is_recorded_and_reraised_unchanged(spans):
    raised = Boom("kaput")

    def app(environ, start_response):
        raise raised

    with pytest.raises(Boom) as info:
        serve(app, make_environ(PATH_INFO="/boom"))
    assert info.value is raised
    span = spans.one()
    assert span.name == "GET"  # never reached start_response: no route asked
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"].endswith("Boom")
    assert [e.name for e in span.events] == ["exception"]
    assert trace.get_current_span() is trace.INVALID_SPAN and Request.active.get() is None


def test_on_exception_records_once_and_names_the_span(spans):
    def app(environ, start_response):
        exc = Boom("handled into a 500")
        Request.active.get().on_exception(exc)  # a framework's error hook
        Request.active.get().on_exception(Boom("again"))
        start_response("500 INTERNAL SERVER ERROR", [])
        return [b"error page"]

    serve(app, make_environ(PATH_INFO="/boom"))
    span = spans.one()
    assert span.name == "GET /boom"
    assert span.attributes["error.type"].endswith("Boom")  # the exception's type, not "500"
    assert span.attributes["http.response.status_code"] == 500
    assert [e.attributes["exception.message"] for e in span.events] == ["handled into a 500"]


def test_on_exception_then_reraise_records_once(spans):
    def app(environ, start_response):
        exc = Boom("propagated")
        Request.active.get().on_exception(exc)
        raise exc

    with pytest.raises(Boom):
        serve(app, make_environ(PATH_INFO="/boom"))
    span = spans.one()
    assert span.name == "GET /boom"
    assert len(span.events) == 1 and "http.response.status_code" not in span.attributes


# ----------------------------------------------------------------------------
# the body


def streaming(fail=False):
    def app(environ, start_response):
        start_response("200 OK", [])

        def generate():
            yield b"first"
            with tracer.start_as_current_span("chunk"):
                pass
            if fail:
                raise Boom("mid-stream")
            yield b"second"

        return generate()

    return app


def test_streamed_body_ends_the_span_when_exhausted(spans):
    environ = make_environ(PATH_INFO="/stream")
    request = start_request(Request, PROBE, environ, lambda status, headers, exc_info=None: None)
    body = request.call(streaming(), environ)
    assert trace.get_current_span() is trace.INVALID_SPAN  # left after the app returned
    iterator = iter(body)
    assert next(iterator) == b"first"
    assert spans.get() == []
    assert list(iterator) == [b"second"]
    server = spans.one("GET /stream")
    assert spans.one("chunk").parent.span_id == server.context.span_id  # made while streaming
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_streamed_body_ends_the_span_when_closed(spans):
    closed = []

    class Body:
        def __iter__(self):
            return iter([b"a", b"b"])

        def close(self):
            closed.append(True)

    environ = make_environ()
    request = start_request(Request, PROBE, environ, lambda status, headers, exc_info=None: None)
    body = request.call(lambda environ, start_response: (start_response("200 OK", []), Body())[1], environ)
    assert next(iter(body)) == b"a"
    assert spans.get() == []
    body.close()  # the client went away
    assert closed == [True] and len(spans.get()) == 1


def test_failure_while_streaming_is_recorded(spans):
    with pytest.raises(Boom):
        serve(streaming(fail=True), make_environ(PATH_INFO="/stream"))
    span = spans.one("GET /stream")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 200
    assert [e.name for e in span.events] == ["exception"]
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_body_known_complete_ends_at_return_unwrapped(spans):
    chunks = [b"done"]

    def app(environ, start_response):
        start_response("200 OK", [])
        Request.active.get().streamed = False  # the framework knows: the body is in memory
        return chunks

    environ = make_environ()
    request = start_request(Request, PROBE, environ, lambda status, headers, exc_info=None: None)
    assert request.call(app, environ) is chunks  # never read or closed, and still ended
    assert len(spans.get()) == 1


def test_file_wrapper_body_passes_through(spans):
    def app(environ, start_response):
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"file content"))

    environ = make_environ(**{"wsgi.file_wrapper": FileWrapper})
    request = start_request(Request, PROBE, environ, lambda status, headers, exc_info=None: None)
    body = request.call(app, environ)
    assert type(body) is FileWrapper  # the server's sendfile path still recognises it
    assert len(spans.get()) == 1


# ----------------------------------------------------------------------------
# one SERVER span


def test_inside_an_outer_server_span_only_names_it(spans):
    with tracer.start_as_current_span("GET", kind=SpanKind.SERVER) as outer:
        status, data, request, body = serve(hello, make_environ())
        assert trace.get_current_span() is outer
    assert (status, data) == ("200 OK", b"hello")
    [span] = spans.get()
    assert span.name == "GET /items/<id>"
    assert span.attributes == {"http.route": "/items/<id>"}  # the response is its owner's to read
    assert isinstance(body, list)  # not wrapped: nothing of ours to end


def test_same_framework_nested_is_not_traced_again(spans):
    def outer_app(environ, start_response):
        inner = start_request(Request, PROBE, make_environ(), start_response)
        assert inner is None
        return hello(environ, start_response)

    serve(outer_app, make_environ())
    assert len(spans.get()) == 1


def test_suppressed_makes_no_span(spans):
    with suppressed():
        assert serve(hello, make_environ())[:3] == ("200 OK", b"hello", None)
    assert spans.get() == []


def test_rename_before_the_response(spans):
    class Early(Request):
        __slots__ = ()

        def find_route(self):
            raise AssertionError("not asked: the route is known")

    def app(environ, start_response):
        Early.active.get().rename("/users/<id>", "POST")
        return hello(environ, start_response)

    serve(app, make_environ(SCRIPT_NAME="/api"), cls=Early)
    span = spans.one()
    assert span.name == "POST /api/users/<id>"
    assert span.attributes["http.route"] == "/api/users/<id>"


# ----------------------------------------------------------------------------
# never break the app


def _explode(*args, **kwargs):
    raise RuntimeError("autotrace bug")


def test_our_failures_leave_the_request_served(spans, caplog):
    with caplog.at_level(logging.ERROR, logger="autotrace"):
        assert serve(hello, make_environ(), read=_explode)[:3] == ("200 OK", b"hello", None)
    assert spans.get() == []
    assert any("wsgiprobe.begin" in r.getMessage() for r in caplog.records)

    class Broken(Request):
        __slots__ = ()
        on_response = _explode
        on_exception = _explode
        body = _explode

    def app(environ, start_response):
        with pytest.raises(RuntimeError):
            Broken.active.get().on_exception(Boom())  # a framework hook guards this call itself
        start_response("200 OK", [])
        return iter([b"streamed"])

    status, data, request, body = serve(app, make_environ(), cls=Broken)
    assert (status, data) == ("200 OK", b"streamed")
    assert request.done and len(spans.get()) == 1  # ended, without the response details
    assert "http.response.status_code" not in spans.get()[0].attributes
    assert trace.get_current_span() is trace.INVALID_SPAN and Broken.active.get() is None


def test_safe_get():
    get = safe_get({"A": b"caf\xe9", "B": 3, "C": None, 7: "x"})
    assert (get("A"), get("B"), get("C"), get("C", "d"), get("missing")) == ("café", "3", None, "d", None)
    assert wsgi.wsgi_decode("caf\xc3\xa9") == "café" and wsgi.wsgi_decode("\u0100") == "\u0100"
