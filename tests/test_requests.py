"""The requests instrumentor against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from typing import Any, Iterator, List, Tuple

import pytest
import requests
import urllib3
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from urllib3.util.retry import Retry

from autotrace.instrumentors.requests import RequestsInstrumentor
from tests.support.http_server import HTTPTestServer as Server
from tests.support.receiver import OTLPReceiver


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


@pytest.fixture
def traced(instrument: Any) -> RequestsInstrumentor:
    return instrument(RequestsInstrumentor)


def client_spans(spans: Any) -> List[Any]:
    return sorted((s for s in spans.get() if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)


def parse_traceparent(value: str) -> Tuple[int, int]:
    _, trace_id, span_id, _ = value.split("-")
    return int(trace_id, 16), int(span_id, 16)


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# --------------------------------------------------------------------------


def test_success_attributes_and_injection(server: Server, traced: Any, spans: Any) -> None:
    response = requests.get(server.url + "/ok?x=1")
    assert response.text == "hello"
    span = spans.one()
    assert span.name == "GET"
    assert span.kind == SpanKind.CLIENT
    assert span.status.status_code == StatusCode.UNSET
    attrs = dict(span.attributes)
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.full"] == server.url + "/ok?x=1"
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == server.port
    assert attrs["http.response.status_code"] == 200
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["user_agent.original"].startswith("python-requests/")
    assert "http.request.resend_count" not in attrs
    assert "error.type" not in attrs
    assert "http.method" not in attrs  # no old names unless http/dup
    trace_id, span_id = parse_traceparent(server.headers_for("/ok?x=1")[-1]["traceparent"])
    assert (trace_id, span_id) == (span.context.trace_id, span.context.span_id)


def test_parent_and_current_span(server: Server, traced: Any, spans: Any) -> None:
    tracer = trace.get_tracer("test")
    seen: List[Any] = []

    def hook(response: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(trace.get_current_span())

    with tracer.start_as_current_span("parent") as parent:
        requests.get(server.url + "/ok", hooks={"response": hook})
    client = client_spans(spans)[0]
    assert client.parent.span_id == parent.get_span_context().span_id
    assert seen and seen[0] is parent  # hooks run after the physical request, in the caller's context


def test_span_current_while_in_flight(server: Server, traced: Any, spans: Any) -> None:
    class Recording(requests.adapters.HTTPAdapter):
        def build_response(self, req: Any, resp: Any) -> Any:
            self.current = trace.get_current_span()
            return super().build_response(req, resp)

    session = requests.Session()
    adapter = Recording()
    session.mount("http://", adapter)
    session.get(server.url + "/ok")
    assert adapter.current.get_span_context().span_id == spans.one().context.span_id


def test_session_created_before_patching_and_subclass(server: Server, instrument: Any, spans: Any) -> None:
    early = requests.Session()

    class MySession(requests.Session):
        pass

    instrument(RequestsInstrumentor)
    early.get(server.url + "/ok")
    MySession().post(server.url + "/ok", data=b"x")
    assert [s.name for s in client_spans(spans)] == ["GET", "POST"]


@pytest.mark.parametrize("code", [404, 500])
def test_error_status(server: Server, traced: Any, spans: Any, code: int) -> None:
    response = requests.get(f"{server.url}/status/{code}")
    assert response.status_code == code
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == code
    assert span.attributes["error.type"] == str(code)


def test_nonstandard_method(server: Server, traced: Any, spans: Any) -> None:
    requests.request("PURGE", server.url + "/ok")
    span = spans.one()
    assert span.name == "_OTHER"
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "PURGE"


def test_redirects_each_hop_a_span(server: Server, traced: Any, spans: Any) -> None:
    with trace.get_tracer("test").start_as_current_span("parent") as parent:
        response = requests.get(server.url + "/redirect/2")
    assert response.status_code == 200 and len(response.history) == 2
    hops = client_spans(spans)
    assert [s.attributes["url.full"] for s in hops] == [
        server.url + "/redirect/2",
        server.url + "/redirect/1",
        server.url + "/ok",
    ]
    assert [s.attributes["http.response.status_code"] for s in hops] == [302, 302, 200]
    assert [s.attributes.get("http.request.resend_count") for s in hops] == [None, 1, 2]
    assert len({s.context.span_id for s in hops}) == 3
    assert {s.parent.span_id for s in hops} == {parent.get_span_context().span_id}  # siblings
    # each hop carried its own traceparent
    sent = [parse_traceparent(h["traceparent"])[1] for h in server.headers_for("/redirect/2")[-1:]]
    sent += [parse_traceparent(server.headers_for("/redirect/1")[-1]["traceparent"])[1]]
    sent += [parse_traceparent(server.headers_for("/ok")[-1]["traceparent"])[1]]
    assert sent == [s.context.span_id for s in hops]
    assert all(s.status.status_code == StatusCode.UNSET for s in hops)


def test_no_redirect_follow_is_one_span(server: Server, traced: Any, spans: Any) -> None:
    requests.get(server.url + "/redirect/2", allow_redirects=False)
    assert spans.one().attributes["http.response.status_code"] == 302


def test_urllib3_status_retries(server: Server, traced: Any, spans: Any) -> None:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(
        max_retries=Retry(total=3, status_forcelist=[503], backoff_factor=0, allowed_methods=None)
    ))
    response = session.get(server.url + "/flaky/a/2")
    assert response.status_code == 200
    attempts = client_spans(spans)
    assert len(attempts) == 3
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1, 2]
    assert [s.attributes["http.response.status_code"] for s in attempts] == [503, 503, 200]
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    sent = [parse_traceparent(h["traceparent"])[1] for h in server.headers_for("/flaky/a/2")]
    assert sent == [s.context.span_id for s in attempts]
    # attempts are siblings, not nested
    assert len({s.parent for s in attempts}) == 1
    assert all(a.end_time <= b.start_time for a, b in zip(attempts, attempts[1:]))


def test_redirect_then_retry_share_resend_count(server: Server, traced: Any, spans: Any) -> None:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(
        max_retries=Retry(total=3, status_forcelist=[503], backoff_factor=0)
    ))
    session.get(server.url + "/redirect/1")
    session.get(server.url + "/flaky/b/1")
    counts = [s.attributes.get("http.request.resend_count") for s in client_spans(spans)]
    assert counts == [None, 1, None, 1]


def test_connection_refused(traced: Any, spans: Any) -> None:
    with pytest.raises(requests.exceptions.ConnectionError) as caught:
        requests.get(f"http://127.0.0.1:{closed_port()}/x")
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "requests.exceptions.ConnectionError"
    assert "http.response.status_code" not in span.attributes
    events = [e for e in span.events if e.name == "exception"]
    assert len(events) == 1
    assert events[0].attributes["exception.type"] == "requests.exceptions.ConnectionError"
    assert type(caught.value) is requests.exceptions.ConnectionError  # unchanged


def test_connect_retries_each_a_span(traced: Any, spans: Any) -> None:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(max_retries=Retry(connect=2, backoff_factor=0)))
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(f"http://127.0.0.1:{closed_port()}/x")
    attempts = client_spans(spans)
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1, 2]
    assert [s.attributes["error.type"] for s in attempts] == [
        "urllib3.exceptions.NewConnectionError",
        "urllib3.exceptions.NewConnectionError",
        "requests.exceptions.ConnectionError",
    ]
    assert all(s.status.status_code == StatusCode.ERROR for s in attempts)


def test_timeout(server: Server, traced: Any, spans: Any) -> None:
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(server.url + "/slow", timeout=0.2)
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == "requests.exceptions.ReadTimeout"
    assert [e.name for e in span.events] == ["exception"]


def test_streaming_span_ends_when_consumed(server: Server, traced: Any, spans: Any) -> None:
    response = requests.get(server.url + "/stream", stream=True)
    assert spans.get() == []  # headers are in, the body is not
    assert b"".join(response.iter_content(2)) == b"abcdef"
    after = time.time_ns()
    span = spans.one()
    assert span.attributes["http.response.status_code"] == 200
    assert span.end_time <= after
    assert span.end_time - span.start_time >= 0.25e9  # covers the slow body
    response.close()
    assert len(spans.get()) == 1  # ended once


def test_streaming_span_ends_on_close(server: Server, traced: Any, spans: Any) -> None:
    with requests.get(server.url + "/stream", stream=True) as response:
        assert response.status_code == 200
        assert spans.get() == []
    assert len(spans.get()) == 1


def test_non_streamed_span_covers_body(server: Server, traced: Any, spans: Any) -> None:
    before = time.time_ns()
    assert requests.get(server.url + "/stream").content == b"abcdef"
    span = spans.one()
    assert span.end_time - span.start_time >= 0.25e9
    assert span.start_time >= before


def test_head_and_empty_body(server: Server, traced: Any, spans: Any) -> None:
    requests.head(server.url + "/ok")
    assert [s.name for s in spans.get()] == ["HEAD"]  # nothing to read: ended by Session.send
    response = requests.get(server.url + "/status/204", stream=True)
    assert len(spans.get()) == 1
    assert response.content == b""
    assert len(spans.get()) == 2


def test_abandoned_stream_ends_when_collected(server: Server, traced: Any, spans: Any) -> None:
    import gc

    response = requests.get(server.url + "/ok", stream=True)
    assert spans.get() == []
    del response
    gc.collect()
    assert len(spans.get()) == 1


def test_callers_headers_untouched(server: Server, traced: Any, spans: Any) -> None:
    headers = {"X-Mine": "1"}
    session = requests.Session()
    session_headers = dict(session.headers)
    session.get(server.url + "/ok", headers=headers)
    requests.get(server.url + "/redirect/1", headers=headers)
    assert headers == {"X-Mine": "1"}
    assert dict(session.headers) == session_headers
    assert "traceparent" in server.headers_for("/ok")[-1]
    assert server.headers_for("/ok")[-1]["x-mine"] == "1"


def test_b3_when_configured(server: Server, traced: Any, spans: Any) -> None:
    from opentelemetry.propagators.b3 import B3MultiFormat

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(B3MultiFormat())
    try:
        requests.get(server.url + "/ok?b3")
    finally:
        propagate.set_global_textmap(previous)
    seen = server.headers_for("/ok?b3")[-1]
    assert int(seen["x-b3-spanid"], 16) == spans.one().context.span_id


def test_baggage_propagated(server: Server, traced: Any, spans: Any) -> None:
    from opentelemetry import baggage, context

    token = context.attach(baggage.set_baggage("tenant", "t1"))
    try:
        requests.get(server.url + "/ok?baggage")
    finally:
        context.detach(token)
    assert server.headers_for("/ok?baggage")[-1]["baggage"] == "tenant=t1"


def test_redaction(server: Server, traced: Any, spans: Any) -> None:
    url = f"http://alice:s3cret@127.0.0.1:{server.port}/ok?token=abc&x=1&api_key=k"
    requests.get(url)
    full = spans.one().attributes["url.full"]
    assert "alice" not in full and "s3cret" not in full
    assert "abc" not in full and "=k" not in full
    assert full == f"http://REDACTED:REDACTED@127.0.0.1:{server.port}/ok?token=REDACTED&x=1&api_key=REDACTED"


def test_implicit_port(traced: Any, spans: Any) -> None:
    from autotrace.instrumentors.requests import _origin, _server

    assert _server(_origin("https://Example.com/x")) == ("example.com", 443)
    assert _server(_origin("http://u:p@example.com?q=1")) == ("example.com", 80)
    assert _server(_origin("http://[::1]:8080/")) == ("::1", 8080)
    assert _server(_origin("http://[::1]/")) == ("::1", 80)


def test_implicit_port_real_request(traced: Any, spans: Any) -> None:
    # Port 80 on 127.0.0.1 is normally closed; either way the span names the implicit port.
    try:
        requests.get("http://127.0.0.1/nothing", timeout=2)
    except requests.exceptions.RequestException:
        pass
    assert spans.one().attributes["server.port"] == 80


def test_excluded_urls(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_PYTHON_REQUESTS_EXCLUDED_URLS", "/health,status/4")
    instrument(RequestsInstrumentor)
    requests.get(server.url + "/health")
    requests.get(server.url + "/status/404")
    requests.get(server.url + "/ok?kept")
    assert [s.attributes["url.full"] for s in spans.get()] == [server.url + "/ok?kept"]
    assert "traceparent" not in server.headers_for("/health")[-1]


def test_generic_excluded_urls(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "/health")
    instrument(RequestsInstrumentor)
    requests.get(server.url + "/health")
    assert spans.get() == []


def test_header_capture_with_redaction(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", "X-Custom,Authorization,X-Api-Token")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE", "X-Resp,Set-Cookie")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", ".*token.*")
    instrument(RequestsInstrumentor)
    requests.get(
        server.url + "/headers",
        headers={"X-Custom": "c1", "Authorization": "Bearer secret", "X-Api-Token": "t0k"},
    )
    attrs = spans.one().attributes
    assert tuple(attrs["http.request.header.x-custom"]) == ("c1",)
    assert tuple(attrs["http.request.header.authorization"]) == ("REDACTED",)
    assert tuple(attrs["http.request.header.x-api-token"]) == ("REDACTED",)
    assert tuple(attrs["http.response.header.x-resp"]) == ("r1",)
    assert tuple(attrs["http.response.header.set-cookie"]) == ("REDACTED",)


def test_http_dup(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    instrument(RequestsInstrumentor)
    requests.get(server.url + "/status/404")
    attrs = spans.one().attributes
    assert attrs["http.method"] == "GET" and attrs["http.request.method"] == "GET"
    assert attrs["http.url"] == attrs["url.full"] == server.url + "/status/404"
    assert attrs["net.peer.name"] == "127.0.0.1"
    assert attrs["net.peer.port"] == server.port
    assert attrs["http.status_code"] == 404 and attrs["http.response.status_code"] == 404
    assert attrs["http.flavor"] == "1.1"
    assert attrs["http.user_agent"] == attrs["user_agent.original"]


def test_respects_suppression(server: Server, traced: Any, spans: Any) -> None:
    from autotrace.instrumentation import suppressed

    with suppressed(http=True):
        requests.get(server.url + "/ok?suppressed")
    with suppressed():
        requests.get(server.url + "/ok?suppressed")
    assert spans.get() == []
    assert all("traceparent" not in h for h in server.headers_for("/ok?suppressed"))


def test_sampled_out_still_propagates(server: Server, traced: Any, spans: Any) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
    from opentelemetry import context

    parent = NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0)))
    token = context.attach(set_span_in_context(parent))
    try:
        requests.get(server.url + "/ok?unsampled")
    finally:
        context.detach(token)
    assert spans.get() == []
    assert server.headers_for("/ok?unsampled")[-1]["traceparent"].startswith(f"00-{0xABC:032x}-")


# -- exporter traffic, duplicates, unpatch -----------------------------------------


def _upstream_exporter(receiver: OTLPReceiver, **kwargs: Any) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=receiver.http_endpoint + "/v1/traces", **kwargs)


def _finished_span(name: str) -> Any:
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span(name) as span:
        pass
    return span


@pytest.mark.parametrize("own_session", [False, True])
def test_upstream_exporter_makes_no_spans_without_suppression(traced: Any, spans: Any, own_session: bool) -> None:
    """A user's processor that exports without the suppress key: still no spans."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    with OTLPReceiver() as receiver:
        session = requests.Session() if own_session else None
        exporter = _upstream_exporter(receiver, session=session)
        assert exporter.export([_finished_span("exported")]) == SpanExportResult.SUCCESS
        receiver.wait_for(lambda got: any(s.name == "exported" for s in got))
        exporter.shutdown()
    assert client_spans(spans) == []
    assert all("traceparent" not in h for h in receiver.headers)


def test_upstream_exporter_in_batch_processor(traced: Any, spans: Any, server: Server) -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with OTLPReceiver() as receiver:
        processor = BatchSpanProcessor(_upstream_exporter(receiver), schedule_delay_millis=50)
        provider = trace.get_tracer_provider()
        provider.add_span_processor(processor)  # type: ignore[attr-defined]
        try:
            requests.get(server.url + "/ok?batched")
            receiver.wait_for(lambda got: any(s.kind == "CLIENT" for s in got))
            processor.force_flush()
        finally:
            processor.shutdown()
            # detach the processor again (SynchronousMultiSpanProcessor keeps a tuple)
            multi = provider._active_span_processor  # type: ignore[attr-defined]
            multi._span_processors = tuple(p for p in multi._span_processors if p is not processor)
    assert len(client_spans(spans)) == 1  # only the user's request
    assert [s.attributes["url.full"] for s in receiver.spans] == [server.url + "/ok?batched"]


def test_configured_otlp_endpoint_is_not_traced(server: Server, monkeypatch: Any, instrument: Any, spans: Any) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", server.url + "/v1/traces")
    instrument(RequestsInstrumentor)
    requests.post(server.url + "/v1/traces", data=b"x")
    requests.get(server.url + "/ok?other")
    assert [s.attributes["url.full"] for s in spans.get()] == [server.url + "/ok?other"]


def test_no_duplicate_with_upstream_urllib3(server: Server, traced: Any, spans: Any) -> None:
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor

    upstream = URLLib3Instrumentor()
    upstream.instrument()
    try:
        urllib3.PoolManager().request("GET", server.url + "/ok?plain")
        assert len(client_spans(spans)) == 1  # the plugin works on its own ...
        spans.clear()
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(
            max_retries=Retry(total=2, status_forcelist=[503], backoff_factor=0)
        ))
        session.get(server.url + "/ok?dedup")
        assert len(client_spans(spans)) == 1  # ... and adds nothing under ours
        assert client_spans(spans)[0].instrumentation_scope.name == "autotrace.instrumentors.requests"
        spans.clear()
        session.get(server.url + "/flaky/dedup/1")
        assert len(client_spans(spans)) == 2  # one per attempt, all ours
        assert {s.instrumentation_scope.name for s in client_spans(spans)} == {"autotrace.instrumentors.requests"}
    finally:
        upstream.uninstrument()


def test_unpatch_restores(server: Server, spans: Any) -> None:
    originals = (
        requests.sessions.Session.__dict__["send"],
        requests.adapters.HTTPAdapter.__dict__["send"],
        urllib3.connectionpool.HTTPConnectionPool.__dict__["urlopen"],
        urllib3.util.retry.Retry.__dict__["increment"],
        urllib3.response.HTTPResponse.__dict__["release_conn"],
        urllib3.response.HTTPResponse.__dict__["close"],
    )
    instrumentor = RequestsInstrumentor().instrument()
    assert requests.sessions.Session.__dict__["send"] is not originals[0]
    instrumentor.instrument()  # a second call patches nothing twice
    requests.get(server.url + "/ok")
    assert len(spans.get()) == 1
    instrumentor.unpatch()
    current = (
        requests.sessions.Session.__dict__["send"],
        requests.adapters.HTTPAdapter.__dict__["send"],
        urllib3.connectionpool.HTTPConnectionPool.__dict__["urlopen"],
        urllib3.util.retry.Retry.__dict__["increment"],
        urllib3.response.HTTPResponse.__dict__["release_conn"],
        urllib3.response.HTTPResponse.__dict__["close"],
    )
    assert all(a is b for a, b in zip(current, originals))
    requests.get(server.url + "/ok")
    assert len(spans.get()) == 1
    assert "traceparent" not in server.headers_for("/ok")[-1]


def test_under_the_agent_with_upstream_exporter_in_process(server: Server) -> None:
    """autotrace-run: requests is patched lazily; a user's own upstream OTLP/HTTP exporter
    (which sends with requests) exporting in the same process adds no spans."""
    from tests.support.processes import run_traced

    program = f"""
import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
user_provider = TracerProvider()
user_exporter = OTLPSpanExporter(endpoint=ENDPOINT)
with user_provider.get_tracer("user").start_as_current_span("user-span") as span:
    pass
assert requests.get("{server.url}/ok?agent").status_code == 200
user_exporter.export([span])
"""
    with OTLPReceiver() as receiver:
        program = program.replace("ENDPOINT", repr(receiver.http_endpoint + "/user/traces"))  # not the configured endpoint
        result = run_traced(["python", "-c", program], env=dict(receiver.env(), OTEL_SERVICE_NAME="req-agent"))
        assert result.returncode == 0, result.stderr
        receiver.wait_for(lambda got: any(s.kind == "CLIENT" for s in got) and any(s.name == "user-span" for s in got))
        time.sleep(0.3)
        clients = [s for s in receiver.spans if s.kind == "CLIENT"]
    assert [s.attributes["url.full"] for s in clients] == [server.url + "/ok?agent"]
    assert clients[0].scope == "autotrace.instrumentors.requests"
