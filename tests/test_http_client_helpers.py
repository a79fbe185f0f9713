"""The HTTP client helpers of autotrace.http, each tested once, without any HTTP library.

What requests (and later httpx, aiohttp, urllib3, http.client) reuse: URL parsing
and its cache, the request attributes, the response outcome, the export-traffic
checks, and the per-attempt spans of a call retried inside (HttpClient.attempts).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from opentelemetry import context, trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanKind, StatusCode

from autotrace import config, http
from autotrace.http import HttpClient
from autotrace.kit import SUPPRESS_HTTP_INSTRUMENTATION_KEY, Instrumentor, release, suppressed


class FakeInstrumentor(Instrumentor):
    name = "fakeclient"


def client(monkeypatch: Any = None, **environ: str) -> HttpClient:
    if monkeypatch is not None:
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
    http.reset_caches()
    config.reset_settings()
    return HttpClient(FakeInstrumentor(), ("fakelib",))


def finished(spans: Any, build: Any) -> Dict[str, Any]:
    """Attributes of a real SDK span after ``build(span)`` ran on it."""
    span = trace.get_tracer("t").start_span("s", kind=SpanKind.CLIENT)
    build(span)
    span.end()
    return spans.one()


# -- URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://Example.COM/x", ("example.com", 443)),
        ("http://u:p@example.com?q=1", ("example.com", 80)),
        ("http://example.com:8080#f", ("example.com", 8080)),
        ("http://example.com:abc/", ("example.com", 80)),  # not a port: the scheme's
        ("HTTPS://[::1]:8443/", ("::1", 8443)),
        ("http://[2001:db8::1]/", ("2001:db8::1", 80)),
        ("ftp://files.example/", ("files.example", None)),
        ("/relative/path", (None, None)),
    ],
)
def test_server_address_and_port_from_url(url: str, expected: Tuple[Optional[str], Optional[int]]) -> None:
    assert http.server_of(http.url_origin(url)) == expected


def test_url_origin_drops_userinfo_path_query_fragment() -> None:
    assert http.url_origin("https://user:p@ss@Host:1/a?b#c") == "https://Host:1"
    assert http.url_origin("no-scheme") == ""


def test_url_parts_redacted_cached_and_bounded() -> None:
    http.reset_caches()
    url = "http://alice:pw@h:81/p?token=t&x=1"
    parts = http.url_parts(url)
    assert parts == ("http://REDACTED:REDACTED@h:81/p?token=REDACTED&x=1", "h", 81)
    assert http.url_parts(url) is parts  # cached
    for index in range(http.URL_CACHE_SIZE + 10):
        http.url_parts(f"http://h/{index}")
    assert len(http._URL_PARTS) <= http.URL_CACHE_SIZE
    parts = http.url_parts(url)
    http.reset_caches()
    assert http.url_parts(url) is not parts  # the rules may have changed: parsed again
    made = client()
    parts = http.url_parts(url)
    made.configure()  # patch time: the same
    assert http.url_parts(url) is not parts


# -- request attributes ------------------------------------------------------------


def test_request_attributes(monkeypatch: Any) -> None:
    headers = {"User-Agent": "ua/1", "X-Custom": "c", "Authorization": "Bearer s"}
    plain = client(monkeypatch)
    name, attrs = plain.request("get", b"https://u:p@Api.example/v1?api_key=k", "ua/1", headers)
    assert name == "GET"
    assert attrs == {
        "http.request.method": "GET",
        "url.full": "https://REDACTED:REDACTED@Api.example/v1?api_key=REDACTED",
        "server.address": "api.example",
        "server.port": 443,
        "http.request.method_original": "get",
        "user_agent.original": "ua/1",
    }
    assert plain.request("PURGE", "http://h/", None, headers) == (
        "_OTHER",
        {"http.request.method": "_OTHER", "url.full": "http://h/", "server.address": "h", "server.port": 80,
         "http.request.method_original": "PURGE"},
    )


def test_request_attributes_with_switches(monkeypatch: Any) -> None:
    configured = client(
        monkeypatch,
        OTEL_PYTHON_FAKECLIENT_EXCLUDED_URLS="/health",
        OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST="X-Custom,Authorization",
        OTEL_SEMCONV_STABILITY_OPT_IN="http/dup",
    )
    assert configured.request("GET", "http://h/health?x", None, {}) is None
    _, attrs = configured.request("POST", "http://h:8/p", "ua", {"X-Custom": "c", "Authorization": "s"})
    assert attrs["http.request.header.x-custom"] == ["c"]
    assert attrs["http.request.header.authorization"] == ["REDACTED"]
    assert (attrs["http.method"], attrs["http.url"], attrs["net.peer.name"], attrs["net.peer.port"]) == (
        "POST", "http://h:8/p", "h", 8,
    )
    assert attrs["http.user_agent"] == "ua"


# -- response outcome ------------------------------------------------------------------


def test_outcome_in_one_call(monkeypatch: Any, spans: Any) -> None:
    calls: List[Dict[str, Any]] = []
    real = http.set_attributes
    monkeypatch.setattr(http, "set_attributes", lambda span, attrs: (calls.append(dict(attrs)), real(span, attrs)))
    ok = client()
    span = finished(spans, lambda s: ok.outcome(s, 200, "1.1", {"X-Resp": "r"}))
    assert dict(span.attributes) == {"http.response.status_code": 200, "network.protocol.version": "1.1"}
    assert span.status.status_code == StatusCode.UNSET
    assert len(calls) == 1


def test_outcome_error_dup_and_response_headers(monkeypatch: Any, spans: Any) -> None:
    configured = client(
        monkeypatch,
        OTEL_SEMCONV_STABILITY_OPT_IN="http/dup",
        OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE="x-resp,set-cookie",
    )
    span = finished(spans, lambda s: configured.outcome(s, 503, "2", [("X-Resp", "r"), ("Set-Cookie", "sid=1")]))
    assert span.status.status_code == StatusCode.ERROR
    assert dict(span.attributes) == {
        "http.response.status_code": 503,
        "error.type": "503",
        "http.status_code": 503,
        "network.protocol.version": "2",
        "http.flavor": "2",
        "http.response.header.x-resp": ("r",),
        "http.response.header.set-cookie": ("REDACTED",),
    }


def test_outcome_without_status_or_recording(spans: Any) -> None:
    plain = client()
    span = finished(spans, lambda s: plain.outcome(s, None, None))
    assert dict(span.attributes) == {} and span.status.status_code == StatusCode.UNSET
    plain.outcome(NonRecordingSpan(INVALID_SPAN_CONTEXT), 500, "1.1")  # nothing to set, no error


# -- export traffic ----------------------------------------------------------------------


def test_exporter_endpoints(monkeypatch: Any) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")  # gRPC never goes through an HTTP client
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "HTTP://Collector:4318/v1/Traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://gen:4318/")
    monkeypatch.setenv("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://zipkin:9411/api/v2/spans")
    config.reset_settings()
    assert http.exporter_endpoints() == (
        "http://collector:4318/v1/Traces",  # scheme and host lower-cased, the path kept
        "http://gen:4318/v1/",
        "http://zipkin:9411/api/v2/spans",
    )
    for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name)
    config.reset_settings()
    assert http.exporter_endpoints()[0] == config.get_settings().otlp.endpoint  # the default, OTLP/HTTP


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


@pytest.fixture
def exporter_and_library(monkeypatch: Any) -> Iterator[Tuple[Any, Any]]:
    import opentelemetry.exporter.otlp.proto.http  # noqa: F401  (an exporter package is imported)

    library = _module("fakelib.api", "from autotrace.http import caller_is_exporter\n"
                      "def get():\n    return caller_is_exporter(('fakelib.',), ('fakelib',), 1)\n")
    exporter = _module("opentelemetry.exporter.fake", "def export(get):\n    return get()\n")
    yield exporter, library


def test_caller_is_exporter(exporter_and_library: Tuple[Any, Any], monkeypatch: Any) -> None:
    exporter, library = exporter_and_library
    assert exporter.export(library.get) is True  # fakelib's frame passed over, the exporter's decides
    assert library.get() is False  # called from this test module
    assert exporter.export(lambda: library.get()) is False  # first caller outside fakelib: this module
    monkeypatch.delitem(sys.modules, "opentelemetry.exporter")
    assert exporter.export(library.get) is False  # no exporter imported: no frame is read


# -- spans per attempt -------------------------------------------------------------------


class Response:
    def __init__(self, status: int) -> None:
        self.status = status
        self.closed = False

    def close(self) -> None:
        self.closed = True
        release(self)


class Transport:
    """A fake library: ``send`` retries inside (like urllib3's Retry), ``attempt`` is each physical request."""

    def __init__(self, statuses: List[int], fail: Optional[BaseException] = None) -> None:
        self.statuses = statuses
        self.fail = fail
        self.seen: List[Tuple[Dict[str, str], Any, Any]] = []

    def send(self, request: Dict[str, Any]) -> Response:
        status = self.attempt(request["headers"])
        while status >= 500 and self.statuses:
            self.on_retry(status)
            status = self.retry(dict(request["headers"]))
        if self.fail is not None:
            raise self.fail
        return Response(status)

    def attempt(self, headers: Dict[str, str]) -> int:
        """What a physical request sees: the headers it sends, the current span, the HTTP suppression key."""
        self.seen.append((headers, trace.get_current_span(), context.get_value(SUPPRESS_HTTP_INSTRUMENTATION_KEY)))
        return self.statuses.pop(0)

    retry = attempt

    def on_retry(self, status: int) -> None:
        pass


@pytest.fixture
def wrapped_transport(spans: Any) -> Iterator[Tuple[HttpClient, Any]]:
    instrumentor = FakeInstrumentor()
    fake = HttpClient(instrumentor, ("fakelib",))
    module = sys.modules[__name__]

    def describe(instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = args[0]
        name, attrs = fake.request(request["method"], request["url"], None, request["headers"])
        return name, attrs, request["headers"]

    def finish(span: Any, response: Response) -> Any:
        fake.outcome(span, response.status, "1.1")
        return response

    def on_retry(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        chain = fake.chain.get()
        fake.retried(chain.call, None, args[0], "1.1")
        return wrapped(*args, **kwargs)

    def retry(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        chain = fake.chain.get()
        return fake.retry(chain, chain.call, wrapped, args, kwargs, args[0])

    instrumentor.wrap(module, "Transport.send", fake.attempts(describe, finish, "fakeclient.send"))
    instrumentor.wrap(module, "Transport.on_retry", on_retry)
    instrumentor.wrap(module, "Transport.retry", retry)
    yield fake, instrumentor
    instrumentor.unpatch()


def test_attempts_one_span_ended_on_release(wrapped_transport: Any, spans: Any) -> None:
    transport = Transport([200])
    with trace.get_tracer("t").start_as_current_span("parent") as parent:
        response = transport.send({"method": "GET", "url": "http://h/x", "headers": {}})
    headers, current, suppress_http = transport.seen[0]
    assert suppress_http is True  # a lower HTTP layer adds no span under this one
    assert current.get_span_context().trace_id == parent.get_span_context().trace_id
    assert headers["traceparent"].split("-")[2] == f"{current.get_span_context().span_id:016x}"
    assert spans.named("GET") == []  # held until the response is released
    response.close()
    span = spans.one("GET")
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes["http.response.status_code"] == 200
    assert "http.request.resend_count" not in span.attributes


def test_attempts_retried_inside_are_siblings(wrapped_transport: Any, spans: Any) -> None:
    transport = Transport([503, 502, 200])
    with trace.get_tracer("t").start_as_current_span("parent"):
        transport.send({"method": "GET", "url": "http://h/x", "headers": {}}).close()
    attempts = sorted(spans.named("GET"), key=lambda s: s.start_time)
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1, 2]
    assert [s.attributes["http.response.status_code"] for s in attempts] == [503, 502, 200]
    assert len({s.parent.span_id for s in attempts}) == 1
    sent = [int(headers["traceparent"].split("-")[2], 16) for headers, _, _ in transport.seen]
    assert sent == [s.context.span_id for s in attempts]
    assert [current.get_span_context().span_id for _, current, _ in transport.seen] == sent  # each current in turn
    assert [suppress_http for _, _, suppress_http in transport.seen] == [True, True, True]
    assert all(a.end_time <= b.start_time for a, b in zip(attempts, attempts[1:]))


def test_attempts_failure_recorded_on_the_last_attempt(wrapped_transport: Any, spans: Any) -> None:
    transport = Transport([503, 200], fail=ConnectionError("gone"))
    with pytest.raises(ConnectionError, match="gone"):
        transport.send({"method": "GET", "url": "http://h/x", "headers": {}})
    first, last = sorted(spans.named("GET"), key=lambda s: s.start_time)
    assert first.attributes["error.type"] == "503"
    assert last.attributes["error.type"] == "ConnectionError"
    assert [e.name for e in last.events] == ["exception"]


def test_attempts_stand_down_when_suppressed(wrapped_transport: Any, spans: Any) -> None:
    transport = Transport([200])
    with suppressed(http=True):
        transport.send({"method": "GET", "url": "http://h/x", "headers": {}})
    assert spans.get() == [] and transport.seen[0][0] == {}
    assert not transport.seen[0][1].is_recording()


def test_logical_request_chain_counts_and_ends_on_failure(wrapped_transport: Any, spans: Any) -> None:
    fake, _ = wrapped_transport
    request = types.SimpleNamespace(url="http://h/x")

    def two_hops() -> Response:
        Transport([302]).send({"method": "GET", "url": "http://h/x", "headers": {}}).close()
        Transport([200]).send({"method": "GET", "url": "http://h/y", "headers": {}})
        raise ValueError("hook failed")  # the last response is still held

    with pytest.raises(ValueError):
        fake.logical_request(two_hops, (), {}, request, False)
    hops = sorted(spans.named("GET"), key=lambda s: s.start_time)
    assert [s.attributes.get("http.request.resend_count") for s in hops] == [None, 1]
    assert hops[1].attributes["error.type"] == "ValueError"
    assert fake.chain.get() is None


@pytest.mark.parametrize("streamed", [False, True])
def test_logical_request_ends_the_last_span_unless_streamed(wrapped_transport: Any, spans: Any, streamed: bool) -> None:
    fake, _ = wrapped_transport
    request = types.SimpleNamespace(url="http://h/x")
    send = lambda: Transport([200]).send({"method": "GET", "url": "http://h/x", "headers": {}})  # noqa: E731
    response = fake.logical_request(send, (), {}, request, streamed)
    assert len(spans.named("GET")) == (0 if streamed else 1)  # not streamed: the body was read by now
    response.close()
    assert len(spans.named("GET")) == 1  # ended once


def test_logical_request_of_exporter_is_suppressed(wrapped_transport: Any, spans: Any, monkeypatch: Any) -> None:
    fake, _ = wrapped_transport
    monkeypatch.setattr(fake, "exporter_urls", ("http://collector:4318/",))
    send = lambda: Transport([200]).send({"method": "GET", "url": "http://h/x", "headers": {}})  # noqa: E731
    fake.logical_request(send, (), {}, types.SimpleNamespace(url="http://collector:4318/v1/traces"), False).close()
    assert spans.get() == []
    fake.logical_request(send, (), {}, types.SimpleNamespace(url="http://other/"), False)
    assert len(spans.get()) == 1
