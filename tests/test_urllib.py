"""The urllib.request instrumentor against the real test server."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.http_client import HttpClientInstrumentor
from autotrace.instrumentors.urllib import UrllibInstrumentor
from tests.support.contract import Contract
from tests.support.http_server import HTTPTestServer
from tests.support.processes import free_port
from tests.support.receiver import OTLPReceiver


@pytest.fixture(scope="module")
def http_server() -> Iterator[HTTPTestServer]:
    """The shared real test server (tests/support/http_server.py), one per module."""
    with HTTPTestServer() as server:
        yield server


@pytest.fixture
def traced(instrument: Any) -> UrllibInstrumentor:
    instrument(HttpClientInstrumentor)  # as under the agent: urllib.request sends with http.client
    return instrument(UrllibInstrumentor)


def span_id_sent(server: HTTPTestServer, path: str) -> int:
    return int(server.headers_for(path)[-1]["traceparent"].split("-")[2], 16)


def by_start(spans: Any) -> List[Any]:
    return sorted(spans.get(), key=lambda s: s.start_time)


def read(url: Any, **kwargs: Any) -> Tuple[int, bytes]:
    with urllib.request.urlopen(url, **kwargs) as response:
        return response.status, response.read()


# --------------------------------------------------------------------------


def test_urlopen_attributes_and_injection(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        assert read(http_server.url("/ok?x=1")) == (200, b"hello")
    span = spans.one("GET")  # one span: http.client below adds none
    assert span.kind == SpanKind.CLIENT and span.status.status_code == StatusCode.UNSET
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.instrumentation_scope.name == "autotrace.instrumentors.urllib"
    attrs = dict(span.attributes)
    assert attrs == {
        "http.request.method": "GET",
        "url.full": http_server.url("/ok?x=1"),
        "server.address": "127.0.0.1",
        "server.port": http_server.port,
        "user_agent.original": attrs["user_agent.original"],
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
    }
    assert attrs["user_agent.original"].startswith("Python-urllib/")
    assert span_id_sent(http_server, "/ok?x=1") == span.context.span_id


def test_request_object_post_and_opener(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    request = urllib.request.Request(http_server.url("/ok?post"), data=b"body", headers={"User-Agent": "probe/2"})
    before = (dict(request.headers), dict(request.unredirected_hdrs))
    opener = urllib.request.build_opener()
    with opener.open(request) as response:
        assert response.status == 200
    span = spans.one("POST")
    assert span.attributes["user_agent.original"] == "probe/2"
    assert span_id_sent(http_server, "/ok?post") == span.context.span_id
    # the caller's Request is not given our headers (urllib itself adds Host, Content-type...)
    assert dict(request.headers) == before[0]
    assert not any(k.lower() == "traceparent" for k in request.unredirected_hdrs)
    assert set(request.unredirected_hdrs) >= set(before[1])


def test_callers_stale_traceparent_replaced(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    stale = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    read(urllib.request.Request(http_server.url("/ok?stale"), headers={"traceparent": stale}))
    assert span_id_sent(http_server, "/ok?stale") == spans.one().context.span_id


def test_redirects_each_hop_a_span(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        assert read(http_server.url("/redirect/2")) == (200, b"hello")
    hops = [s for s in by_start(spans) if s.kind == SpanKind.CLIENT]
    assert [s.attributes["url.full"] for s in hops] == [http_server.url(p) for p in ("/redirect/2", "/redirect/1", "/ok")]
    assert [s.attributes["http.response.status_code"] for s in hops] == [302, 302, 200]
    assert [s.attributes.get("http.request.resend_count") for s in hops] == [None, 1, 2]
    assert {s.parent.span_id for s in hops} == {parent.get_span_context().span_id}  # siblings
    assert all(a.end_time <= b.start_time for a, b in zip(hops, hops[1:]))
    sent = [span_id_sent(http_server, p) for p in ("/redirect/2", "/redirect/1", "/ok")]
    assert sent == [s.context.span_id for s in hops]


@pytest.mark.parametrize("code", [404, 500])
def test_error_status(http_server: HTTPTestServer, traced: Any, spans: Any, code: int) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(http_server.url(f"/status/{code}"))
    assert caught.value.code == code
    caught.value.close()
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == str(code)
    assert span.attributes["http.response.status_code"] == code


def test_connection_refused(traced: Any, spans: Any) -> None:
    with pytest.raises(urllib.error.URLError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{free_port()}/x", timeout=5)
    assert isinstance(caught.value.reason, ConnectionRefusedError)
    span = spans.one()
    assert span.attributes["error.type"] == "urllib.error.URLError"
    assert span.status.status_code == StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_timeout(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(http_server.url("/slow"), timeout=0.2)
    span = spans.one()
    assert span.attributes["error.type"] == "TimeoutError"
    assert span.status.status_code == StatusCode.ERROR


def test_secret_in_url_never_exported(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    read(http_server.url("/ok?password=hunter2&x=1&token=t0k"))
    full = spans.one().attributes["url.full"]
    assert "hunter2" not in full and "t0k" not in full
    assert full == http_server.url("/ok?password=REDACTED&x=1&token=REDACTED")


def test_non_http_schemes_untraced(traced: Any, spans: Any, tmp_path: Any) -> None:
    (tmp_path / "f.txt").write_text("local")
    assert read((tmp_path / "f.txt").as_uri())[1] == b"local"
    assert read("data:text/plain,hi")[1] == b"hi"
    assert spans.get() == []


def test_excluded_urls(http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_PYTHON_URLLIB_EXCLUDED_URLS", "/health")
    instrument(HttpClientInstrumentor)
    instrument(UrllibInstrumentor)
    read(http_server.url("/health"))
    read(http_server.url("/ok?kept"))
    assert [s.attributes["url.full"] for s in spans.get()] == [http_server.url("/ok?kept")]
    assert "traceparent" not in http_server.headers_for("/health")[-1]


def test_header_capture_and_http_dup(http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", "X-Custom,Authorization")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE", "X-Resp,Set-Cookie")
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    instrument(UrllibInstrumentor)
    read(urllib.request.Request(http_server.url("/headers"), headers={"X-Custom": "c1", "Authorization": "Bearer x"}))
    attrs = spans.one().attributes
    assert tuple(attrs["http.request.header.x-custom"]) == ("c1",)
    assert tuple(attrs["http.request.header.authorization"]) == ("REDACTED",)
    assert tuple(attrs["http.response.header.x-resp"]) == ("r1",)
    assert tuple(attrs["http.response.header.set-cookie"]) == ("REDACTED",)
    assert attrs["http.method"] == "GET" and attrs["http.url"] == http_server.url("/headers")
    assert attrs["http.status_code"] == 200 and attrs["http.user_agent"].startswith("Python-urllib/")


def test_suppressed(http_server: HTTPTestServer, traced: Any, spans: Any) -> None:
    from autotrace.kit import suppressed

    with suppressed(http=True):
        read(http_server.url("/ok?suppressed"))
    assert spans.get() == []
    assert "traceparent" not in http_server.headers_for("/ok?suppressed")[-1]


def test_configured_otlp_endpoint_not_traced(http_server: HTTPTestServer, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", http_server.url("/v1/traces"))
    instrument(HttpClientInstrumentor)
    instrument(UrllibInstrumentor)
    read(urllib.request.Request(http_server.url("/v1/traces"), data=b"x"))
    read(http_server.url("/ok?other"))
    assert [s.attributes["url.full"] for s in spans.get()] == [http_server.url("/ok?other")]
    assert "traceparent" not in http_server.headers_for("/v1/traces")[-1]


def test_exporter_caller_not_traced(traced: Any, spans: Any) -> None:
    """An exporter module posting with urllib.request (as a user's exporter might): no span, no headers."""
    import types

    import opentelemetry.exporter.otlp.proto.http  # noqa: F401  (a program with an exporter has imported one)

    with OTLPReceiver() as receiver:
        module = types.ModuleType("opentelemetry.exporter.fake_urllib")
        exec(
            "import urllib.request\n"
            "def post(url):\n"
            "    return urllib.request.urlopen(urllib.request.Request(url, data=b'', method='POST')).status\n",
            module.__dict__,
        )
        assert module.post(receiver.http_endpoint + "/v1/traces") == 200
    assert spans.get() == []
    assert all("traceparent" not in h for h in receiver.headers)


# -- the contract (urllib is imported by the bare interpreter -- pathlib imports urllib.parse --
#    so the lazy check waits only for urllib.request) ----------------------------------------

_SERVER: Dict[str, HTTPTestServer] = {}


def _url(path: str) -> str:
    if "s" not in _SERVER:
        _SERVER["s"] = HTTPTestServer()
    return _SERVER["s"].url(path)


def urllib_get() -> Any:
    return read(_url("/ok?contract"))


def urllib_redirected() -> Any:
    return read(_url("/redirect/1"))


def urllib_refused() -> Any:
    return read(f"http://127.0.0.1:{_CLOSED[0]}/", timeout=5)


_CLOSED: List[int] = [free_port()]


class _StdlibContract(Contract):
    def lazy_script(self) -> str:
        return super().lazy_script().replace("'urllib', ", "", 1)


_StdlibContract(
    instrumentor="autotrace.instrumentors.urllib:UrllibInstrumentor",
    module="urllib.request",
    targets=["urllib.request:AbstractHTTPHandler.do_open"],
    calls=[urllib_get, urllib_redirected],
    error_call=urllib_refused,
    spans_per_call=[1, 2],
).install(globals())
