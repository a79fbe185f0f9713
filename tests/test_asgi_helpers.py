"""autotrace.asgi with a plain ASGI app (no framework): attributes, propagation, exclusion, when the span ends."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from autotrace import asgi
from autotrace.http import ExcludedUrls
from autotrace.kit import Instrumentor, suppressed

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MARKER = "test.asgi.marker"
SLEEP = 0.2


class PlainInstrumentor(Instrumentor):
    name = "plainasgi"


def make_scope(path="/items/7", method="GET", headers=None, **extra):
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "query_string": b"", "root_path": "", "client": ("10.0.0.9", 51000),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"shop.example:8443")] if headers is None else headers,
    }
    scope.update(extra)
    return scope


class Call:
    """One app call through AsgiServer.serve: what the server saw sent, when, and what the app saw."""

    def __init__(self, app, scope=None, request_type=asgi.AsgiRequest, instrumentor=None, messages=None,
                 **server_kwargs):
        self.instrumentor = instrumentor or PlainInstrumentor()
        self.server = asgi.AsgiServer(self.instrumentor, request_type, marker=MARKER, **server_kwargs)
        self.scope = make_scope() if scope is None else scope
        self.sent = []
        self.incoming = list(messages or [{"type": "http.request", "body": b"", "more_body": False}])
        self.app = app

    async def receive(self):
        return self.incoming.pop(0) if self.incoming else {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append((message, time.time_ns()))

    def run(self):
        return asyncio.run(self.server.serve(self.app, "the-app-object", self.scope, self.receive, self.send))


def one_server(spans):
    found = [s for s in spans.get() if s.kind == SpanKind.SERVER]
    assert len(found) == 1, [s.name for s in spans.get()]
    return found[0]


def respond(status=200, headers=(), body=b"ok", sleep_after=0.0, then=None):
    """An app that answers, optionally sleeps, then runs ``then`` (raise, send more)."""

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        await send({"type": "http.response.body", "body": body})
        app.seen = (trace.get_current_span(), scope.get(MARKER), dict(scope))
        if sleep_after:
            await asyncio.sleep(sleep_after)
        app.returned_at = time.time_ns()
        if then is not None:
            await then(send)

    return app


# --------------------------------------------------------------------------
# Propagation getter, authority, attributes


def test_getter_reads_scope_header_pairs():
    headers = [(b"Traceparent", b"tp"), (bytearray(b"x-b3-traceid"), memoryview(b"abc")),
               (b"baggage", b"a=1"), (b"baggage", b"b=2"), (b"x-multi", b"1"), (b"x-multi", b"2")]
    assert asgi.GETTER.get(headers, "traceparent") == ["tp"]
    assert asgi.GETTER.get(headers, "X-B3-TraceId") == ["abc"]
    assert asgi.GETTER.get(headers, "baggage") == ["a=1,b=2"]  # joined: the W3C propagator reads one value
    assert asgi.GETTER.get(headers, "x-multi") == ["1", "2"]
    assert asgi.GETTER.get(headers, "missing") is None
    assert asgi.GETTER.keys(headers)[:2] == ["traceparent", "x-b3-traceid"]  # lower-cased, as ASGI sends them
    assert asgi.GETTER.get(asgi.header_index(headers), "X-Multi") == ["1", "2"]


@pytest.mark.parametrize(
    "host,scheme,server,expected",
    [
        ("shop.example:8443", "http", None, ("shop.example", 8443)),
        ("shop.example", "https", ("10.0.0.1", 9000), ("shop.example", 443)),
        ("shop.example", "ws", None, ("shop.example", 80)),
        ("[::1]:8080", "http", None, ("::1", 8080)),
        ("[::1]", "https", None, ("::1", 443)),
        ("host:notaport", "gopher", None, ("host", None)),
        (None, "http", ("10.0.0.1", 9000), ("10.0.0.1", 9000)),
        (None, "http", ("unix-socket", None), ("unix-socket", None)),
        (None, "http", None, (None, None)),
        (":80", "http", None, (None, 80)),
    ],
)
def test_authority(host, scheme, server, expected):
    assert asgi.authority(host, scheme, server) == expected


def test_request_attributes_of_a_full_scope():
    scope = make_scope(
        "/items/7", query_string=b"token=s3cr3t&page=2", scheme="https",
        headers=[(b"host", b"shop.example:8443"), (b"user-agent", b"probe/1.0"), (b"accept", b"*/*")],
    )
    method, attributes = asgi.request_attributes(scope)
    assert method == "GET"
    assert attributes == {
        "http.request.method": "GET", "url.path": "/items/7", "url.scheme": "https",
        "url.query": "token=REDACTED&page=2", "server.address": "shop.example", "server.port": 8443,
        "client.address": "10.0.0.9", "network.protocol.version": "1.1", "user_agent.original": "probe/1.0",
    }


def test_request_attributes_of_a_minimal_scope():
    method, attributes = asgi.request_attributes({"type": "http", "method": "GET", "headers": [],
                                                  "server": ("127.0.0.1", 8000)})
    assert method == "GET"
    assert attributes == {"http.request.method": "GET", "url.path": "", "url.scheme": "http",
                          "server.address": "127.0.0.1", "server.port": 8000}


@pytest.mark.parametrize("raw,method,name,original", [
    ("PURGE", "_OTHER", "HTTP", "PURGE"), ("get", "GET", "GET", "get"), (b"POST", "POST", "POST", None),
    (None, "_OTHER", "HTTP", "None"),
])
def test_request_attributes_method_normalisation(raw, method, name, original):
    span_method, attributes = asgi.request_attributes(make_scope(method=raw))
    assert span_method == name
    assert attributes["http.request.method"] == method
    assert attributes.get("http.request.method_original") == original


def test_request_attributes_exclusion_searches_scheme_host_path():
    import re

    scope = make_scope("/healthz")
    assert asgi.request_attributes(scope, ExcludedUrls([re.compile("shop.example:8443/health")])) is None
    assert asgi.request_attributes(scope, ExcludedUrls([re.compile("^https://")])) is not None
    assert asgi.request_attributes(scope, ExcludedUrls([])) is not None


def test_request_attributes_captured_headers_and_old_names(monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-request-id,authorization")
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    scope = make_scope(query_string=b"page=1", headers=[(b"host", b"h:81"), (b"x-request-id", b"r-1"),
                                                        (b"x-request-id", b"r-2"), (b"authorization", b"Bearer x")])
    _, attributes = asgi.request_attributes(scope)
    assert attributes["http.request.header.x-request-id"] == ["r-1", "r-2"]
    assert attributes["http.request.header.authorization"] == ["REDACTED"]
    assert attributes["http.method"] == "GET" and attributes["http.target"] == "/items/7?page=1"
    assert attributes["net.host.name"] == "h" and attributes["net.host.port"] == 81
    assert attributes["http.client_ip"] == "10.0.0.9"


# --------------------------------------------------------------------------
# The request span: when it ends, status, errors


def test_span_ends_after_the_last_body_not_when_the_app_returns(spans):
    app = respond(sleep_after=SLEEP)
    call = Call(app)
    call.run()
    span = one_server(spans)
    assert span.name == "GET" and span.kind == SpanKind.SERVER
    assert span.instrumentation_scope.name == "autotrace.instrumentors.plainasgi"
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["url.path"] == "/items/7" and span.attributes["server.address"] == "shop.example"
    assert span.status.status_code == StatusCode.UNSET
    assert call.sent[-1][1] <= span.end_time < app.returned_at - SLEEP * 1e9 / 2
    current, marker, _ = app.seen
    assert current.get_span_context().span_id == span.context.span_id  # current inside the app
    assert marker is not None and marker.span is current  # the marker names the request
    assert MARKER not in call.scope  # removed afterwards
    assert not trace.get_current_span().get_span_context().is_valid


def test_streaming_body_is_timed_in_full(spans):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
        app.before_last = time.time_ns()
        await send({"type": "http.response.body", "body": b""})

    Call(app).run()
    assert one_server(spans).end_time >= app.before_last


def test_trailers_end_the_span_after_the_last_trailers_message(spans):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})
        await asyncio.sleep(SLEEP)
        app.before_trailers = time.time_ns()
        await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")], "more_trailers": True})
        await send({"type": "http.response.trailers", "headers": []})
        await asyncio.sleep(SLEEP)
        app.returned_at = time.time_ns()

    call = Call(app)
    call.run()
    span = one_server(spans)
    assert app.before_trailers <= call.sent[-1][1] <= span.end_time < app.returned_at - SLEEP * 1e9 / 2
    assert len(call.sent) == 4


def test_pathsend_ends_the_span(spans):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/tmp/x"})
        await asyncio.sleep(SLEEP)
        app.returned_at = time.time_ns()

    Call(app).run()
    assert one_server(spans).end_time < app.returned_at - SLEEP * 1e9 / 2


class Kaput(Exception):
    pass


def test_5xx_then_exception_is_recorded_with_the_time_of_the_last_message(spans):
    error = Kaput("behind the 500")

    async def fail(send):
        raise error

    app = respond(500, body=b"Internal Server Error", sleep_after=SLEEP, then=fail)
    call = Call(app)
    with pytest.raises(Kaput) as raised:
        call.run()
    assert raised.value is error  # the app's exception, unchanged
    span = one_server(spans)
    assert span.end_time == pytest.approx(call.sent[-1][1], abs=5e6)  # ended as of the 500's last message
    assert span.end_time < app.returned_at - SLEEP * 1e9 / 2
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["error.type"].endswith("Kaput")  # the exception names the error, not "500"
    assert span.status.status_code == StatusCode.ERROR
    events = [e for e in span.events if e.name == "exception"]
    assert len(events) == 1 and events[0].attributes["exception.message"] == "behind the 500"


def test_5xx_without_exception_ends_at_return_with_the_time_of_the_last_message(spans):
    async def after(send):
        after.span_still_open = not spans.get()  # deferred: not ended yet

    app = respond(503, sleep_after=SLEEP, then=after)
    call = Call(app)
    call.run()
    span = one_server(spans)
    assert after.span_still_open
    assert span.end_time == pytest.approx(call.sent[-1][1], abs=5e6)
    assert span.attributes["error.type"] == "503" and span.status.status_code == StatusCode.ERROR
    assert "exception" not in [e.name for e in span.events]


def test_4xx_is_not_an_error(spans):
    Call(respond(404)).run()
    span = one_server(spans)
    assert span.attributes["http.response.status_code"] == 404
    assert span.status.status_code == StatusCode.UNSET and "error.type" not in span.attributes


def test_app_raising_before_responding_ends_the_span(spans):
    async def app(scope, receive, send):
        raise Kaput("no answer")

    with pytest.raises(Kaput):
        Call(app).run()
    span = one_server(spans)
    assert "http.response.status_code" not in span.attributes
    assert span.attributes["error.type"].endswith("Kaput") and span.status.status_code == StatusCode.ERROR
    assert not trace.get_current_span().get_span_context().is_valid


def test_app_returning_without_finishing_ends_the_span_at_return(spans):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await asyncio.sleep(SLEEP)
        app.returned_at = time.time_ns()

    Call(app).run()
    span = one_server(spans)
    assert span.end_time >= app.returned_at
    assert span.attributes["http.response.status_code"] == 200


def test_messages_after_the_end_pass_through(spans):
    async def more(send):
        await send({"type": "http.response.body", "body": b"late"})

    call = Call(respond(then=more))
    call.run()
    assert [m["type"] for m, _ in call.sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert call.sent[-1][0]["body"] == b"late"
    assert one_server(spans).end_time <= call.sent[-1][1]


def test_captured_response_headers(monkeypatch, spans):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "content-type,set-cookie")
    Call(respond(headers=[(b"content-type", b"text/plain"), (b"set-cookie", b"s=1"), (b"x-other", b"1")])).run()
    attributes = one_server(spans).attributes
    assert tuple(attributes["http.response.header.content-type"]) == ("text/plain",)
    assert tuple(attributes["http.response.header.set-cookie"]) == ("REDACTED",)
    assert not any(k.startswith("http.response.header.x-other") for k in attributes)


def test_a_malformed_message_is_our_failure_not_the_apps(spans, caplog):
    async def app(scope, receive, send):
        await send({"type": "http.response.start"})  # no status: the server will complain, not us
        await send({"type": "http.response.body", "body": b""})

    with caplog.at_level(logging.ERROR, logger="autotrace"):
        call = Call(app)
        call.run()
    assert len(call.sent) == 2  # passed on unchanged
    assert "plainasgi.request" in caplog.text
    assert one_server(spans).end_time is not None


# --------------------------------------------------------------------------
# Propagation, suppression, exclusion, sampling


def test_traceparent_is_extracted(spans):
    Call(respond(), make_scope(headers=[(b"traceparent", TRACEPARENT)])).run()
    span = one_server(spans)
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331" and span.parent.is_remote


def test_malformed_traceparent_starts_a_new_trace(spans):
    Call(respond(), make_scope(headers=[(b"traceparent", b"\xff\xfe-garbage")])).run()
    span = one_server(spans)
    assert span.parent is None and span.context.trace_id != 0


def test_suppressed_requests_are_untraced_but_claimed(spans):
    seen = {}

    async def app(scope, receive, send):
        seen.update(send=send, scope=dict(scope))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    call = Call(app, claims=[("framework.telemetry", None), ("other.key", True)])
    with suppressed():
        call.run()
    assert spans.get() == []
    assert seen["send"] == call.send  # the server's own send, unwrapped
    assert seen["scope"][MARKER] is None and seen["scope"]["other.key"] is True
    assert "framework.telemetry" in seen["scope"]
    assert not {MARKER, "framework.telemetry", "other.key"} & set(call.scope)


def test_excluded_urls_of_the_library(monkeypatch, spans):
    monkeypatch.setenv("OTEL_PYTHON_PLAINASGI_EXCLUDED_URLS", "/healthz")
    Call(respond(), make_scope("/healthz")).run()
    assert spans.get() == []
    Call(respond(), make_scope("/items/1")).run()
    assert one_server(spans).attributes["url.path"] == "/items/1"


def test_library_name_for_exclusion_can_differ_from_the_instrumentor(monkeypatch, spans):
    monkeypatch.setenv("OTEL_PYTHON_OTHERLIB_EXCLUDED_URLS", "/items")
    Call(respond(), library="otherlib").run()
    assert spans.get() == []


def test_sampled_out_request_keeps_its_context_and_the_servers_send(spans):
    instrumentor = PlainInstrumentor()
    instrumentor._tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("sampled-out")
    seen = {}

    async def app(scope, receive, send):
        seen.update(send=send, span=trace.get_current_span(), marker=scope.get(MARKER, "absent"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    call = Call(app, make_scope(headers=[(b"traceparent", TRACEPARENT)]), instrumentor=instrumentor)
    call.run()
    assert seen["send"] == call.send
    assert not seen["span"].is_recording()
    assert format(seen["span"].get_span_context().trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert seen["marker"] is None
    assert spans.get() == [] and len(call.sent) == 2
    assert not trace.get_current_span().get_span_context().is_valid


# --------------------------------------------------------------------------
# Framework hooks


class RoutedRequest(asgi.AsgiRequest):
    __slots__ = ("received",)

    def channels(self, receive):
        self.received = []

        async def counting_receive():
            message = await receive()
            self.received.append(message["type"])
            return message

        return counting_receive, self.send

    def route(self):
        return "/items/{item_id}"


def test_route_and_channels_hooks(spans):
    app = respond()
    Call(app, request_type=RoutedRequest).run()
    span = one_server(spans)
    assert span.name == "GET /items/{item_id}" and span.attributes["http.route"] == "/items/{item_id}"
    assert app.seen[1].received == ["http.request"]


def test_unknown_method_names_the_span_http(spans):
    Call(respond(), make_scope(method="PURGE"), request_type=RoutedRequest).run()
    span = one_server(spans)
    assert span.name == "HTTP /items/{item_id}"
    assert span.attributes["http.request.method"] == "_OTHER"


class BrokenChannels(asgi.AsgiRequest):
    __slots__ = ()

    def channels(self, receive):
        raise RuntimeError("framework hook bug")


def test_a_failing_hook_is_logged_once_and_the_request_still_traced(spans, caplog):
    with caplog.at_level(logging.ERROR, logger="autotrace"):
        for _ in range(3):
            Call(respond(), request_type=BrokenChannels).run()
    errors = [r for r in caplog.records if r.name == "autotrace" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "plainasgi.request" in errors[0].getMessage()
    assert errors[0].exc_info[0] is RuntimeError
    found = [s for s in spans.get() if s.kind == SpanKind.SERVER]
    assert len(found) == 3 and all(s.attributes["http.response.status_code"] == 200 for s in found)


def test_our_failure_before_the_span_leaves_the_request_untraced(spans, caplog):
    seen = {}

    async def app(scope, receive, send):
        seen["send"] = send
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    call = Call(app, make_scope(headers=[b"not-a-pair"]))
    with caplog.at_level(logging.ERROR, logger="autotrace"):
        call.run()
    assert seen["send"] == call.send and len(call.sent) == 2
    assert spans.get() == []
    assert "plainasgi.request" in caplog.text
    assert MARKER not in call.scope


def test_call_in_context():
    key = otel_context.create_key("test-asgi-key")
    ctx = otel_context.set_value(key, "inside")

    async def app(value, fail):
        assert otel_context.get_value(key) == "inside"
        if fail:
            raise Kaput(value)
        return value

    assert asyncio.run(asgi.call_in_context(ctx, app, ("v", False))) == "v"
    with pytest.raises(Kaput):
        asyncio.run(asgi.call_in_context(ctx, app, ("v", True)))
    assert otel_context.get_value(key) is None
