"""Our direct OTLP encoder must produce the same message as upstream's encode_spans."""

import time

from hypothesis import given, settings, strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from autotrace.exporters.encoding import SpanEncoder


def provider(resource=None):
    exporter = InMemorySpanExporter()
    tp = TracerProvider(resource=resource or Resource({"service.name": "svc", "n": 3}))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp, exporter


def assert_same(spans):
    ours = ExportTraceServiceRequest.FromString(SpanEncoder()(spans))
    theirs = ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString())
    assert ours == theirs


def test_rich_spans_encode_like_upstream():
    tp, exporter = provider()
    tracer = tp.get_tracer("scope-a", "1.2", schema_url="https://x/schema")
    other = tp.get_tracer("scope-b")
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v"), ("a", "b")]))
    from opentelemetry import trace

    with tracer.start_as_current_span("root", kind=SpanKind.SERVER, attributes={"s": "é", "i": -5, "b": False, "f": 1.5, "l": ["a", "b"], "li": [1, 2], "big": 2**62},
                                      links=[Link(remote, {"why": "batch"})], context=trace.set_span_in_context(trace.NonRecordingSpan(remote))) as root:
        root.add_event("evt", {"x": 1})
        with other.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.set_status(Status(StatusCode.ERROR, "boom"))
            child.record_exception(ValueError("bad"))
        root.set_status(Status(StatusCode.OK))
    tracer.start_span("empty-name-attrs", attributes={"": ""}).end()
    assert_same(exporter.get_finished_spans())


def test_spans_from_two_resources_are_grouped_like_upstream():
    tp1, exporter1 = provider(Resource({"service.name": "one"}))
    tp2, exporter2 = provider(Resource({"service.name": "two"}))
    for tp in (tp1, tp2, tp1):
        tp.get_tracer("t").start_span("s").end()
    assert_same(list(exporter1.get_finished_spans()) + list(exporter2.get_finished_spans()))


def test_equal_values_of_different_types_are_not_confused():
    """True == 1 == 1.0: the encoder's per-attribute cache must still tell them apart."""
    tp, exporter = provider()
    tracer = tp.get_tracer("t")
    for value in (True, 1, 1.0, False, 0, 0.0, "1"):
        tracer.start_span("s", attributes={"x": value}).end()
    spans = exporter.get_finished_spans()
    encoder = SpanEncoder()  # one encoder, as the exporter keeps: its cache spans batches
    for batch in (spans, spans[::-1]):
        ours = ExportTraceServiceRequest.FromString(encoder(batch))
        assert ours == ExportTraceServiceRequest.FromString(encode_spans(batch).SerializeToString())


values = st.one_of(
    st.text(max_size=30), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False), st.lists(st.text(max_size=5), max_size=4), st.lists(st.integers(-1000, 1000), max_size=4),
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=8), st.text(max_size=40))
def test_any_attributes_encode_like_upstream(attributes, name):
    tp, exporter = provider()
    tp.get_tracer("fuzz").start_span(name, attributes=attributes).end()
    assert_same(exporter.get_finished_spans())


def test_encoder_is_faster_than_upstream():
    """Prints the figure; the assertion only guards against a gross regression."""
    tp, exporter = provider()
    tracer = tp.get_tracer("bench")
    attrs = {"db.system.name": "redis", "db.operation.name": "GET", "db.namespace": "0", "server.address": "127.0.0.1", "server.port": 6379, "db.query.text": "GET ?"}
    for _ in range(512):
        tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=attrs).end()
    spans = exporter.get_finished_spans()
    encoder = SpanEncoder()
    start = time.perf_counter()
    for _ in range(5):
        encoder(spans)
    ours = (time.perf_counter() - start) / 5 / 512 * 1e6
    start = time.perf_counter()
    for _ in range(5):
        encode_spans(spans).SerializePartialToString()
    theirs = (time.perf_counter() - start) / 5 / 512 * 1e6
    print(f"encoding: autotrace {ours:.1f} us/span, upstream {theirs:.1f} us/span")
    assert ours < theirs


def test_resource_updated_in_place_after_fork_is_re_encoded():
    """tracing._update_pid_after_fork swaps the Resource's attributes in place; the cache must notice."""
    from opentelemetry.attributes import BoundedAttributes

    resource = Resource({"service.name": "svc", "process.pid": 1})
    tp, exporter = provider(resource)
    tp.get_tracer("t").start_span("s").end()
    encoder = SpanEncoder()
    spans = exporter.get_finished_spans()
    first = ExportTraceServiceRequest.FromString(encoder(spans))
    resource._attributes = BoundedAttributes(attributes={"service.name": "svc", "process.pid": 2}, immutable=True)
    second = ExportTraceServiceRequest.FromString(encoder(spans))
    pid = lambda request: {kv.key: kv.value.int_value for kv in request.resource_spans[0].resource.attributes}["process.pid"]
    assert (pid(first), pid(second)) == (1, 2)
