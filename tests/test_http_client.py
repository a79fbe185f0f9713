"""The http.client instrumentor against the real test server, alone and under the higher HTTP clients."""

from __future__ import annotations

import http.client
import time
import urllib.request
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.http_client import HttpClientInstrumentor
from tests.support.contract import Contract
from tests.support.http_server import HTTPTestServer, STREAM_CHUNKS, STREAM_PAUSE_S
from tests.support.processes import free_port, run_traced
from tests.support.receiver import OTLPReceiver


@pytest.fixture(scope="module")
def http_server() -> Iterator[HTTPTestServer]:
    """The shared real test server (tests/support/http_server.py), one per module."""
    with HTTPTestServer() as server:
        yield server


@pytest.fixture
def traced(instrument: Any) -> HttpClientInstrumentor:
    return instrument(HttpClientInstrumentor)


def parse_traceparent(value: str) -> Tuple[int, int]:
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)


def get(server: HTTPTestServer, path: str, headers: Any = None, **kwargs: Any) -> Tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, **kwargs)
    try:
        conn.request("GET", path, headers=headers if headers is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------


def test_request_attributes_and_injection(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    headers = {"User-Agent": "probe/1", "X-Mine": "1"}
    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        assert get(http_server, "/ok?x=1", headers) == (200, b"hello")
    span = spans.one("GET")
    assert span.kind == SpanKind.CLIENT and span.status.status_code == StatusCode.UNSET
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.instrumentation_scope.name == "autotrace.instrumentors.http_client"
    assert dict(span.attributes) == {
        "http.request.method": "GET",
        "url.full": http_server.url("/ok?x=1"),
        "server.address": "127.0.0.1",
        "server.port": http_server.port,
        "user_agent.original": "probe/1",
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
    }
    seen = http_server.headers_for("/ok?x=1")[-1]
    assert parse_traceparent(seen["traceparent"]) == (span.context.trace_id, span.context.span_id)
    assert seen["x-mine"] == "1"
    assert headers == {"User-Agent": "probe/1", "X-Mine": "1"}  # the caller's dict is not touched


def test_low_level_putrequest_api(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port)
    conn.putrequest("POST", "/ok?low")
    conn.putheader("Content-Length", "2")
    conn.endheaders(b"hi")
    assert spans.get() == []  # sent, not answered yet
    response = conn.getresponse()
    assert response.read() == b"hello"
    conn.close()
    span = spans.one("POST")
    assert span.attributes["http.response.status_code"] == 200
    seen = http_server.headers_for("/ok?low")[-1]
    assert parse_traceparent(seen["traceparent"])[1] == span.context.span_id


def test_headers_in_another_mapping(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    from collections import OrderedDict
    from email.message import Message

    message = Message()
    message["X-Twice"] = "a"
    message["X-Twice"] = "b"  # sent twice: a copy into a dict would send it once
    for headers in (message, OrderedDict([("X-Ordered", "1")])):
        get(http_server, "/ok?mapping", headers)
    first, second = sorted(spans.get(), key=lambda s: s.start_time)
    sent = http_server.seen[-2:]
    assert [int(h["traceparent"].split("-")[2], 16) for _, h in sent] == [first.context.span_id, second.context.span_id]
    assert sent[1][1]["x-ordered"] == "1"
    assert len(message.get_all("X-Twice")) == 2 and "traceparent" not in message


def test_callers_traceparent_replaced(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    stale = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    get(http_server, "/ok?stale", {"traceparent": stale})
    assert parse_traceparent(http_server.headers_for("/ok?stale")[-1]["traceparent"])[1] == spans.one().context.span_id


def test_keep_alive_connection_one_span_per_request(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port)
    for path in ("/ok?ka1", "/status/404", "/ok?ka2"):
        conn.request("GET", path)
        conn.getresponse().read()
    conn.close()
    got = sorted(spans.get(), key=lambda s: s.start_time)
    assert [s.attributes["url.full"] for s in got] == [http_server.url(p) for p in ("/ok?ka1", "/status/404", "/ok?ka2")]
    assert [s.status.status_code for s in got] == [StatusCode.UNSET, StatusCode.ERROR, StatusCode.UNSET]
    assert got[1].attributes["error.type"] == "404"


def test_span_ends_with_the_response_head(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port)
    conn.request("GET", "/stream")
    response = conn.getresponse()
    span = spans.one()  # ended by getresponse(), before the body arrived
    assert response.read() == b"".join(STREAM_CHUNKS)
    conn.close()
    assert span.end_time - span.start_time < len(STREAM_CHUNKS) * STREAM_PAUSE_S * 1e9
    assert len(spans.get()) == 1


def test_unanswered_request_ends_at_close(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port)
    conn.request("GET", "/ok?unanswered")
    assert spans.get() == []
    conn.close()
    assert "http.response.status_code" not in spans.one().attributes


def test_connection_refused(traced: Any, spans: Any) -> None:
    port = free_port()
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5)
    with pytest.raises(ConnectionRefusedError):
        conn.request("GET", "/x?token=abc")
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "ConnectionRefusedError"
    assert span.attributes["url.full"] == f"https://127.0.0.1:{port}/x?token=REDACTED"
    assert [e.name for e in span.events] == ["exception"]


def test_read_timeout(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=0.2)
    conn.request("GET", "/slow")
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    span = spans.one()
    assert span.attributes["error.type"] == "TimeoutError"
    assert span.status.status_code == StatusCode.ERROR


def test_secret_in_url_never_exported(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    get(http_server, "/ok?api_key=s3cret&x=1&sig=abc")
    full = spans.one().attributes["url.full"]
    assert "s3cret" not in full and "abc" not in full
    assert full == http_server.url("/ok?api_key=REDACTED&x=1&sig=REDACTED")


def test_absolute_target_and_default_port(traced: Any, spans: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", free_port(), timeout=2)  # a proxy-style absolute target
    with pytest.raises(OSError):
        conn.request("GET", "http://example.com/page")
    attrs = spans.one().attributes
    assert (attrs["url.full"], attrs["server.address"], attrs["server.port"]) == ("http://example.com/page", "example.com", 80)


def test_excluded_urls(http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_PYTHON_HTTP_CLIENT_EXCLUDED_URLS", "/health")
    instrument(HttpClientInstrumentor)
    get(http_server, "/health")
    get(http_server, "/ok?kept")
    assert [s.attributes["url.full"] for s in spans.get()] == [http_server.url("/ok?kept")]
    assert "traceparent" not in http_server.headers_for("/health")[-1]


def test_header_capture_and_http_dup(http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", "X-Custom,Authorization")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE", "X-Resp,Set-Cookie")
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    instrument(HttpClientInstrumentor)
    get(http_server, "/headers", {"X-Custom": "c1", "Authorization": "Bearer secret"})
    attrs = spans.one().attributes
    assert tuple(attrs["http.request.header.x-custom"]) == ("c1",)
    assert tuple(attrs["http.request.header.authorization"]) == ("REDACTED",)
    assert tuple(attrs["http.response.header.x-resp"]) == ("r1",)
    assert tuple(attrs["http.response.header.set-cookie"]) == ("REDACTED",)
    assert attrs["http.method"] == "GET" and attrs["http.url"] == http_server.url("/headers")
    assert attrs["http.status_code"] == 200 and attrs["net.peer.port"] == http_server.port


def test_suppressed(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    from autotrace.kit import suppressed

    with suppressed(http=True):
        get(http_server, "/ok?suppressed")
    with suppressed():
        get(http_server, "/ok?suppressed")
    assert spans.get() == []
    assert all("traceparent" not in h for h in http_server.headers_for("/ok?suppressed"))


# -- layering: exactly one span per request, from the highest client ---------------------------


@pytest.fixture
def every_http_client(instrument: Any) -> None:
    from autotrace.instrumentors.requests import RequestsInstrumentor
    from autotrace.instrumentors.urllib import UrllibInstrumentor
    from autotrace.instrumentors.urllib3 import Urllib3Instrumentor

    for cls in (HttpClientInstrumentor, UrllibInstrumentor, Urllib3Instrumentor, RequestsInstrumentor):
        instrument(cls)


def _with_requests(url: str) -> Any:
    import requests

    return requests.get(url).status_code


def _with_urllib(url: str) -> Any:
    with urllib.request.urlopen(url) as response:
        return response.status


def _with_urllib3(url: str) -> Any:
    import urllib3

    return urllib3.PoolManager().request("GET", url).status


def _with_http_client(url: str) -> Any:
    port = int(url.split(":")[2].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", url[url.index("/", 8):])
    return conn.getresponse().status


@pytest.mark.parametrize(
    "client, scope",
    [(_with_requests, "requests"), (_with_urllib, "urllib"), (_with_urllib3, "urllib3"), (_with_http_client, "http_client")],
)
def test_one_span_per_request_whatever_the_layers(
    http_server: HTTPTestServer, every_http_client: Any, spans: Any, client: Any, scope: str
) -> None:
    path = f"/ok?layers={scope}"
    assert client(http_server.url(path)) == 200
    span = spans.one()
    assert span.instrumentation_scope.name == f"autotrace.instrumentors.{scope}"
    assert parse_traceparent(http_server.headers_for(path)[-1]["traceparent"])[1] == span.context.span_id


# -- exporter traffic ---------------------------------------------------------------------


def _finished_span(name: str) -> Any:
    from opentelemetry.sdk.trace import TracerProvider

    with TracerProvider().get_tracer("t").start_as_current_span(name) as span:
        pass
    return span


def test_autotrace_exporter_to_configured_endpoint_not_traced(monkeypatch: Any, instrument: Any, spans: Any) -> None:
    """Our OTLP/HTTP exporter (http.client) called without the suppress key: the configured endpoint is recognised."""
    from autotrace.exporters.otlp_http import OTLPHttpSpanExporter

    with OTLPReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
        instrument(HttpClientInstrumentor)
        exporter = OTLPHttpSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces")
        exporter.export([_finished_span("ours")])
        receiver.wait_for(lambda got: [s.name for s in got] == ["ours"])
        exporter.shutdown()
    assert spans.get() == []
    assert all("traceparent" not in h for h in receiver.headers)


def test_autotrace_processors_not_traced(every_http_client: Any, spans: Any, http_server: HTTPTestServer) -> None:
    """The agent's direct processor and a BatchSpanProcessor on our exporter, endpoint not configured."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from autotrace.exporters.direct import DirectOTLPSpanProcessor
    from autotrace.exporters.otlp_http import OTLPHttpSpanExporter

    with OTLPReceiver() as receiver:
        for make in (
            lambda e: DirectOTLPSpanProcessor(e, schedule_delay_millis=50),
            lambda e: BatchSpanProcessor(e, schedule_delay_millis=50),
        ):
            provider = TracerProvider()
            processor = make(OTLPHttpSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces"))
            provider.add_span_processor(processor)
            for _ in range(3):
                with provider.get_tracer("t").start_as_current_span("exported"):
                    get(http_server, "/ok?under-export")
            processor.force_flush()
            processor.shutdown()
        receiver.wait_for(lambda got: len([s for s in got if s.name == "exported"]) == 6)
    assert len(spans.get()) == 6  # the program's requests only, none for the export
    assert {s.attributes["url.full"] for s in spans.get()} == {http_server.url("/ok?under-export")}
    assert all("traceparent" not in h for h in receiver.headers)


@pytest.mark.parametrize("layers", ["http_client", "http_client,urllib3", "http_client,urllib3,requests"])
def test_upstream_exporter_not_traced(instrument: Any, spans: Any, layers: str) -> None:
    """opentelemetry-exporter-otlp-proto-http (requests) exporting without the suppress key, to an unconfigured URL."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from autotrace.instrumentors.requests import RequestsInstrumentor
    from autotrace.instrumentors.urllib3 import Urllib3Instrumentor

    classes = {"http_client": HttpClientInstrumentor, "urllib3": Urllib3Instrumentor, "requests": RequestsInstrumentor}
    for name in layers.split(","):
        instrument(classes[name])
    with OTLPReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.http_endpoint + "/elsewhere/v1/traces")
        exporter.export([_finished_span("upstream")])
        receiver.wait_for(lambda got: [s.name for s in got] == ["upstream"])
        exporter.shutdown()
    assert spans.get() == []
    assert all("traceparent" not in h for h in receiver.headers)


def test_under_the_agent(http_server: HTTPTestServer) -> None:
    """autotrace-run: the SDK's own exporter imports http.client, which is patched then (cheaply);
    the program's request is one span at the receiver, the exports none."""
    program = f"""
import sys
from opentelemetry import trace  # the SDK is set up now; its exporter imports http.client
from autotrace import plugins
states = {{p.name: p.state for p in plugins.current().plugins}}
assert states["http.client"] == "patched", states
import http.client
with trace.get_tracer("app").start_as_current_span("work"):
    conn = http.client.HTTPConnection("127.0.0.1", {http_server.port})
    conn.request("GET", "/ok?agent")
    assert conn.getresponse().read() == b"hello"
"""
    with OTLPReceiver() as receiver:
        result = run_traced(["python", "-c", program], env=dict(receiver.env(), OTEL_SERVICE_NAME="hc-agent"))
        assert result.returncode == 0, result.stderr
        got = receiver.wait_for(lambda got: any(s.kind == "CLIENT" for s in got) and any(s.name == "work" for s in got))
        time.sleep(0.3)
        got = list(receiver.spans)
    clients = [s for s in got if s.kind == "CLIENT"]
    assert [(s.scope, s.attributes["url.full"]) for s in clients] == [
        ("autotrace.instrumentors.http_client", http_server.url("/ok?agent"))
    ]
    assert clients[0].parent_span_id == [s for s in got if s.name == "work"][0].span_id
    assert all("traceparent" not in h for h in receiver.headers)


# -- the contract ----------------------------------------------------------------------------

_SERVER: Dict[str, HTTPTestServer] = {}


def _server() -> HTTPTestServer:
    if "s" not in _SERVER:
        _SERVER["s"] = HTTPTestServer()
    return _SERVER["s"]


def http_client_get() -> Any:
    return get(_server(), "/ok?contract")


def http_client_low_level() -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", _server().port)
    conn.putrequest("GET", "/ok?contract-low")
    conn.endheaders()
    response = conn.getresponse()
    return response.status, response.read()


def http_client_refused() -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", _CLOSED[0], timeout=5)
    conn.request("GET", "/")


_CLOSED: List[int] = [free_port()]

Contract(
    instrumentor="autotrace.instrumentors.http_client:HttpClientInstrumentor",
    module="http.client",
    targets=[
        "http.client:HTTPConnection.request",
        "http.client:HTTPConnection.putrequest",
        "http.client:HTTPConnection.getresponse",
        "http.client:HTTPConnection.close",
    ],
    calls=[http_client_get, http_client_low_level],
    error_call=http_client_refused,
    spans_per_call=1,
).install(globals())
