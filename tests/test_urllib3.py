"""The urllib3 instrumentor (urllib3 used directly) against the real test server; also under requests."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Dict, Iterator, List

import pytest
import urllib3
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from urllib3.util.retry import Retry

from autotrace.instrumentors.http_client import HttpClientInstrumentor
from autotrace.instrumentors.urllib3 import Urllib3Instrumentor
from tests.support.contract import FAULT, Contract
from tests.support.http_server import STREAM_CHUNKS, STREAM_PAUSE_S, HTTPTestServer
from tests.support.processes import free_port


@pytest.fixture(scope="module")
def http_server() -> Iterator[HTTPTestServer]:
    """The shared real test server (tests/support/http_server.py), one per module."""
    with HTTPTestServer() as server:
        yield server


@pytest.fixture
def traced(instrument: Any) -> Urllib3Instrumentor:
    instrument(HttpClientInstrumentor)  # as under the agent: urllib3 sends with http.client
    return instrument(Urllib3Instrumentor)


def by_start(spans: Any) -> List[Any]:
    return sorted((s for s in spans.get() if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)


def span_ids_sent(server: HTTPTestServer, path: str) -> List[int]:
    return [int(h["traceparent"].split("-")[2], 16) for h in server.headers_for(path)]


# --------------------------------------------------------------------------


def test_pool_manager_attributes_and_injection(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    manager = urllib3.PoolManager(headers={"X-Default": "d"})
    headers = {"X-Mine": "1"}
    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        response = manager.request("GET", http_server.url("/ok?x=1"), headers=headers)
        manager.request("GET", http_server.url("/ok?defaults"))
    assert response.data == b"hello"
    first, second = by_start(spans)  # http.client below adds none
    assert first.parent.span_id == parent.get_span_context().span_id
    assert first.instrumentation_scope.name == "autotrace.instrumentors.urllib3"
    assert dict(first.attributes) == {
        "http.request.method": "GET",
        "url.full": http_server.url("/ok?x=1"),
        "server.address": "127.0.0.1",
        "server.port": http_server.port,
        "user_agent.original": f"python-urllib3/{urllib3.__version__}",
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
    }
    assert span_ids_sent(http_server, "/ok?x=1") == [first.context.span_id]
    assert span_ids_sent(http_server, "/ok?defaults") == [second.context.span_id]
    assert http_server.headers_for("/ok?defaults")[-1]["x-default"] == "d"
    assert headers == {"X-Mine": "1"} and dict(manager.headers) == {"X-Default": "d"}  # never modified


def test_connection_pool_used_directly(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port, headers={"User-Agent": "probe/3"})
    assert pool.request("POST", "/ok?pool", body=b"x").status == 200
    assert pool.urlopen("GET", "/status/404").status == 404
    post, missing = by_start(spans)
    assert post.name == "POST" and post.attributes["url.full"] == http_server.url("/ok?pool")
    assert post.attributes["user_agent.original"] == "probe/3"
    assert missing.status.status_code == StatusCode.ERROR and missing.attributes["error.type"] == "404"
    assert span_ids_sent(http_server, "/ok?pool") == [post.context.span_id]
    assert "traceparent" not in pool.headers


@pytest.mark.parametrize("via", ["manager", "pool"])
def test_redirects_each_hop_a_span(http_server: HTTPTestServer, traced: Any, spans: Any, via: str) -> None:
    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        if via == "manager":
            response = urllib3.PoolManager().request("GET", http_server.url("/redirect/2"))
        else:
            response = urllib3.HTTPConnectionPool("127.0.0.1", http_server.port).request("GET", "/redirect/2")
    assert response.status == 200
    hops = by_start(spans)
    paths = ["/redirect/2", "/redirect/1", "/ok"]
    assert [s.attributes["url.full"] for s in hops] == [http_server.url(p) for p in paths]
    assert [s.attributes["http.response.status_code"] for s in hops] == [302, 302, 200]
    assert [s.attributes.get("http.request.resend_count") for s in hops] == [None, 1, 2]
    assert {s.parent.span_id for s in hops} == {parent.get_span_context().span_id}
    assert [span_ids_sent(http_server, p)[-1] for p in paths] == [s.context.span_id for s in hops]


def test_status_retries_each_a_span(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    retries = Retry(total=3, status_forcelist=[503], backoff_factor=0)
    response = urllib3.PoolManager().request("GET", http_server.url("/flaky/u3/2"), retries=retries)
    assert response.status == 200
    attempts = by_start(spans)
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1, 2]
    assert [s.attributes["http.response.status_code"] for s in attempts] == [503, 503, 200]
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    assert span_ids_sent(http_server, "/flaky/u3/2") == [s.context.span_id for s in attempts]
    assert len({s.parent for s in attempts}) == 1
    assert all(a.end_time <= b.start_time for a, b in zip(attempts, attempts[1:]))


def test_connect_retries_and_exhaustion(traced: Any, spans: Any) -> None:
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        urllib3.PoolManager().request("GET", f"http://127.0.0.1:{free_port()}/x", retries=Retry(connect=2, backoff_factor=0))
    attempts = by_start(spans)
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1, 2]
    assert [s.attributes["error.type"] for s in attempts] == [
        "urllib3.exceptions.NewConnectionError",
        "urllib3.exceptions.NewConnectionError",
        "urllib3.exceptions.MaxRetryError",
    ]
    assert all(s.status.status_code == StatusCode.ERROR for s in attempts)


def test_read_timeout(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        urllib3.PoolManager().request("GET", http_server.url("/slow"), timeout=0.2, retries=False)
    span = spans.one()
    assert span.attributes["error.type"] == "urllib3.exceptions.ReadTimeoutError"
    assert [e.name for e in span.events] == ["exception"]


def test_preloaded_body_is_in_the_span(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    assert urllib3.PoolManager().request("GET", http_server.url("/stream")).data == b"".join(STREAM_CHUNKS)
    span = spans.one()
    assert span.end_time - span.start_time >= (len(STREAM_CHUNKS) - 1) * STREAM_PAUSE_S * 1e9


def test_streamed_span_ends_when_consumed(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    response = urllib3.PoolManager().request("GET", http_server.url("/stream"), preload_content=False)
    assert spans.get() == []
    assert b"".join(response.stream(2)) == b"".join(STREAM_CHUNKS)
    after = time.time_ns()
    span = spans.one()
    assert span.end_time <= after
    assert span.end_time - span.start_time >= (len(STREAM_CHUNKS) - 1) * STREAM_PAUSE_S * 1e9
    response.release_conn()
    assert len(spans.get()) == 1


def test_streamed_span_ends_on_release_or_collection(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    manager = urllib3.PoolManager()
    response = manager.request("GET", http_server.url("/ok?released"), preload_content=False)
    assert spans.get() == []
    response.release_conn()
    assert len(spans.get()) == 1
    response = manager.request("GET", http_server.url("/ok?abandoned"), preload_content=False)
    del response
    gc.collect()
    assert len(spans.get()) == 2


def test_secret_in_url_never_exported(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    urllib3.PoolManager().request("GET", f"http://bob:pw@127.0.0.1:{http_server.port}/ok?session=abc&x=1")
    full = spans.one().attributes["url.full"]
    assert "pw" not in full and "abc" not in full
    assert full == http_server.url("/ok?session=REDACTED&x=1")  # the pool sends no userinfo: none reported


def test_excluded_urls(http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_PYTHON_URLLIB3_EXCLUDED_URLS", "/health")
    instrument(HttpClientInstrumentor)
    instrument(Urllib3Instrumentor)
    manager = urllib3.PoolManager()
    manager.request("GET", http_server.url("/health"))
    manager.request("GET", http_server.url("/ok?kept"))
    assert [s.attributes["url.full"] for s in spans.get()] == [http_server.url("/ok?kept")]
    assert "traceparent" not in http_server.headers_for("/health")[-1]


def test_header_capture_and_http_dup(http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", "X-Custom,Authorization")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE", "X-Resp,Set-Cookie")
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    instrument(Urllib3Instrumentor)
    urllib3.PoolManager().request("GET", http_server.url("/headers"), headers={"X-Custom": "c1", "Authorization": "Bearer x"})
    attrs = spans.one().attributes
    assert tuple(attrs["http.request.header.x-custom"]) == ("c1",)
    assert tuple(attrs["http.request.header.authorization"]) == ("REDACTED",)
    assert tuple(attrs["http.response.header.x-resp"]) == ("r1",)
    assert tuple(attrs["http.response.header.set-cookie"]) == ("REDACTED",)
    assert attrs["http.method"] == "GET" and attrs["net.peer.name"] == "127.0.0.1"
    assert attrs["http.status_code"] == 200 and attrs["http.flavor"] == "1.1"


def test_suppressed(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    from autotrace.kit import suppressed

    with suppressed(http=True):
        urllib3.PoolManager().request("GET", http_server.url("/ok?suppressed"))
    assert spans.get() == []
    assert "traceparent" not in http_server.headers_for("/ok?suppressed")[-1]


def test_configured_otlp_endpoint_not_traced(http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", http_server.url())
    instrument(HttpClientInstrumentor)
    instrument(Urllib3Instrumentor)
    urllib3.PoolManager().request("POST", http_server.url("/v1/traces"), body=b"x")
    urllib3.HTTPConnectionPool("127.0.0.1", http_server.port).request("POST", "/v1/traces", body=b"x")
    urllib3.PoolManager().request("GET", http_server.url("/ok?other"))
    assert [s.attributes["url.full"] for s in spans.get()] == [http_server.url("/ok?other")]
    assert all("traceparent" not in h for h in http_server.headers_for("/v1/traces"))


# -- under requests ------------------------------------------------------------------------


@pytest.fixture
def with_requests(instrument: Any) -> None:
    from autotrace.instrumentors.requests import RequestsInstrumentor

    for cls in (HttpClientInstrumentor, Urllib3Instrumentor, RequestsInstrumentor):
        instrument(cls)


def test_under_requests_one_span_per_attempt(http_server: HTTPTestServer, with_requests: Any, spans: Any) -> None:
    import requests

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(max_retries=Retry(total=2, status_forcelist=[503], backoff_factor=0)))
    assert session.get(http_server.url("/ok?under-requests")).status_code == 200
    assert spans.one().instrumentation_scope.name == "autotrace.instrumentors.requests"
    spans.clear()
    assert session.get(http_server.url("/flaky/under-requests/1")).status_code == 200
    attempts = by_start(spans)
    assert len(spans.get()) == 2
    assert {s.instrumentation_scope.name for s in attempts} == {"autotrace.instrumentors.requests"}
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1]
    spans.clear()
    with requests.get(http_server.url("/stream"), stream=True) as response:  # its span ends with the body
        assert b"".join(response.iter_content(2)) == b"".join(STREAM_CHUNKS)
    assert spans.one().instrumentation_scope.name == "autotrace.instrumentors.requests"


def test_excluded_for_requests_is_excluded_below(
    http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any
) -> None:
    import requests

    from autotrace.instrumentors.requests import RequestsInstrumentor

    monkeypatch.setenv("OTEL_PYTHON_REQUESTS_EXCLUDED_URLS", "/health")
    for cls in (HttpClientInstrumentor, Urllib3Instrumentor, RequestsInstrumentor):
        instrument(cls)
    requests.get(http_server.url("/health"))
    assert spans.get() == []
    assert "traceparent" not in http_server.headers_for("/health")[-1]


# -- the contract ----------------------------------------------------------------------------

_LAZY: Dict[str, Any] = {}


def _server() -> HTTPTestServer:
    if "server" not in _LAZY:
        _LAZY["server"] = HTTPTestServer()
        _LAZY["closed"] = free_port()
    return _LAZY["server"]


def urllib3_manager_get() -> Any:
    response = urllib3.PoolManager().request("GET", _server().url("/ok?contract"))
    return response.status, response.data


def urllib3_pool_get() -> Any:
    response = urllib3.HTTPConnectionPool("127.0.0.1", _server().port).request("GET", "/ok?contract-pool")
    return response.status, response.data


def urllib3_refused() -> Any:
    _server()
    return urllib3.PoolManager().request("GET", f"http://127.0.0.1:{_LAZY['closed']}/", retries=False)


@contextlib.contextmanager
def _describe_fails(instrumentor: Any) -> Iterator[None]:
    from unittest import mock

    from autotrace.http import HttpClient

    with mock.patch.object(HttpClient, "request", side_effect=RuntimeError(FAULT)):
        yield


Contract(
    instrumentor="autotrace.instrumentors.urllib3:Urllib3Instrumentor",
    module="urllib3",
    targets=[
        "urllib3.poolmanager:PoolManager.urlopen",
        "urllib3.connectionpool:HTTPConnectionPool.urlopen",
        "urllib3.util.retry:Retry.increment",
        "urllib3.response:HTTPResponse.release_conn",
        "urllib3.response:HTTPResponse.close",
    ],
    calls=[urllib3_manager_get, urllib3_pool_get],
    error_call=urllib3_refused,
    spans_per_call=1,
    describe_fault=_describe_fails,
).install(globals())
