"""SpanStarter: our instrumentors' spans skip the SDK's attribute re-checks only where that cannot show."""

from __future__ import annotations

from typing import Any, List, Tuple

from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanKind

from autotrace.spans import SpanStarter, starter_for

ATTRIBUTES = {"db.system.name": "redis", "server.port": 6379, "ratio": 0.5, "cached": True, "db.query.text": "GET ?"}


def setup(**provider_options: Any) -> Tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**provider_options)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_fast_spans_are_the_sdks_spans_with_the_same_attributes() -> None:
    provider, exporter = setup()
    tracer = provider.get_tracer("t")
    starter, fast = starter_for(tracer)
    assert fast
    tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=dict(ATTRIBUTES)).end()
    span = starter.start_span("GET", kind=SpanKind.CLIENT, attributes=dict(ATTRIBUTES))
    assert type(span) is type(tracer.start_span("x"))
    span.set_attribute("late", 1)
    span.end()
    span.set_attribute("after.end", 1)  # ignored, as on any ended SDK span
    slow, quick = exporter.get_finished_spans()
    assert dict(quick.attributes) == dict(ATTRIBUTES, late=1)
    assert dict(slow.attributes) == ATTRIBUTES
    assert quick.dropped_attributes == 0
    assert quick.kind is SpanKind.CLIENT and quick.name == "GET"


def test_the_caller_dict_is_not_shared() -> None:
    provider, exporter = setup()
    starter = SpanStarter(provider.get_tracer("t"))
    mine = dict(ATTRIBUTES)
    span = starter.start_span("GET", attributes=mine)
    span.set_attribute("extra", 1)
    span.end()
    assert "extra" not in mine


class RecordingSampler(sampling.Sampler):
    def __init__(self) -> None:
        self.seen: List[Any] = []

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):  # type: ignore[no-untyped-def]
        self.seen.append(dict(attributes or {}))
        return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "recording"


def test_a_custom_sampler_still_sees_the_attributes() -> None:
    sampler = RecordingSampler()
    provider, exporter = setup(sampler=sampler)
    starter, fast = starter_for(provider.get_tracer("t"))
    assert not fast
    starter.start_span("GET", attributes=dict(ATTRIBUTES)).end()
    assert sampler.seen == [ATTRIBUTES]


class ReadsOnStart(SpanProcessor):
    def __init__(self) -> None:
        self.seen: List[Any] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.seen.append(dict(span.attributes))


def test_a_processor_that_reads_on_start_sees_the_attributes_even_if_added_later() -> None:
    provider, exporter = setup()
    starter = SpanStarter(provider.get_tracer("t"))
    starter.start_span("first", attributes=dict(ATTRIBUTES)).end()  # fast
    reader = ReadsOnStart()
    provider.add_span_processor(reader)
    starter.start_span("second", attributes=dict(ATTRIBUTES)).end()
    assert reader.seen == [ATTRIBUTES]


def test_limits_and_unusual_values_go_through_the_sdk(caplog: Any) -> None:
    provider, exporter = setup(span_limits=SpanLimits(max_span_attributes=2))
    starter = SpanStarter(provider.get_tracer("t"))
    starter.start_span("many", attributes=dict(ATTRIBUTES)).end()
    provider2, exporter2 = setup(span_limits=SpanLimits(max_span_attribute_length=3))
    SpanStarter(provider2.get_tracer("t")).start_span("long", attributes={"k": "abcdef"}).end()
    provider3, exporter3 = setup()
    SpanStarter(provider3.get_tracer("t")).start_span("seq", attributes={"k": ["a", "b"], "n": None}).end()
    (many,) = exporter.get_finished_spans()
    assert len(many.attributes) == 2 and many.dropped_attributes == 3
    (long,) = exporter2.get_finished_spans()
    assert long.attributes["k"] == "abc"
    (seq,) = exporter3.get_finished_spans()
    assert seq.attributes["k"] == ("a", "b")


def test_not_sampled_and_other_tracer_calls() -> None:
    provider, exporter = setup(sampler=sampling.ALWAYS_OFF)
    starter = SpanStarter(provider.get_tracer("t"))
    span = starter.start_span("GET", attributes=dict(ATTRIBUTES))
    assert isinstance(span, NonRecordingSpan)
    span.end()
    with starter.start_as_current_span("delegated") as inner:
        assert not inner.is_recording()
    assert exporter.get_finished_spans() == ()


def test_api_only_tracer_is_left_alone() -> None:
    from opentelemetry.trace import NoOpTracer

    tracer = NoOpTracer()
    assert starter_for(tracer) == (tracer, False)


# -- spans made from a prototype's fields --------------------------------------------------


def test_prototype_spans_behave_as_sdk_spans() -> None:
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from autotrace.spans import _SpanFactory

    provider, exporter = setup()
    tracer = provider.get_tracer("t", "1.0")
    starter = SpanStarter(tracer)
    root = starter.start_span("root", kind=SpanKind.SERVER, attributes={"a": 1})
    assert isinstance(starter._factory, _SpanFactory)  # the path under test is the one taken
    token = otel_context.attach(trace.set_span_in_context(root))
    try:
        child = starter.start_span("child", kind=SpanKind.CLIENT, attributes={"b": "x"})
    finally:
        otel_context.detach(token)
    child.add_event("evt", {"k": 1})
    try:
        raise ValueError("boom")
    except ValueError as exc:
        child.record_exception(exc)
    child.set_status(trace.Status(trace.StatusCode.ERROR, "bad"))
    child.update_name("child2")
    child.end()
    root.end()
    child.set_attribute("late", 1)  # ended: ignored
    done_child, done_root = exporter.get_finished_spans()
    assert done_child.name == "child2" and done_child.kind is SpanKind.CLIENT
    assert done_child.parent == root.get_span_context()
    assert done_child.context.trace_id == done_root.context.trace_id
    assert done_child.context.span_id != done_root.context.span_id
    assert done_child.context.trace_flags.sampled and done_root.context.trace_flags == tracer.start_span("x").get_span_context().trace_flags
    assert dict(done_child.attributes) == {"b": "x"}
    assert [e.name for e in done_child.events] == ["evt", "exception"]
    assert done_child.status.status_code is trace.StatusCode.ERROR
    assert done_root.parent is None and done_root.instrumentation_scope.version == "1.0"
    assert done_child.start_time <= done_child.end_time
    assert '"name": "child2"' in done_child.to_json()


def test_remote_and_unsampled_parents() -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    provider, exporter = setup()
    starter = SpanStarter(provider.get_tracer("t"))
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    span = starter.start_span("s", trace.set_span_in_context(NonRecordingSpan(remote)), SpanKind.SERVER, {"a": 1})
    span.end()
    (done,) = exporter.get_finished_spans()
    assert done.context.trace_id == 0xABC and done.parent == remote and done.parent.is_remote
    unsampled = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    dropped = starter.start_span("s", trace.set_span_in_context(NonRecordingSpan(unsampled)), SpanKind.SERVER, {"a": 1})
    assert not dropped.is_recording()
    dropped.end()
    assert len(exporter.get_finished_spans()) == 1


def test_an_unexpected_span_layout_falls_back_to_the_sdk(monkeypatch: Any) -> None:
    import autotrace.spans as spans_module

    monkeypatch.setattr(spans_module, "_ATTRIBUTE_FIELDS", {"_dict", "a_field_no_sdk_has"})
    provider, exporter = setup()
    starter = SpanStarter(provider.get_tracer("t"))
    starter.start_span("s", attributes={"a": 1}).end()
    assert starter._factory is False
    assert dict(exporter.get_finished_spans()[0].attributes) == {"a": 1}


def _parents() -> List[Any]:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    state = TraceState([("vendor", "v1")])
    out: List[Any] = [None]
    for remote in (True, False):
        for flags in (TraceFlags.SAMPLED, TraceFlags.DEFAULT):
            parent = SpanContext(0xABC, 0xDEF, is_remote=remote, trace_flags=TraceFlags(flags), trace_state=state)
            out.append(trace.set_span_in_context(NonRecordingSpan(parent)))
    return out


SAMPLERS = {
    "always_on": sampling.ALWAYS_ON,
    "always_off": sampling.ALWAYS_OFF,
    "parentbased_always_on": sampling.DEFAULT_ON,
    "parentbased_always_off": sampling.DEFAULT_OFF,
    "parentbased_unusual_delegates": sampling.ParentBased(
        sampling.ALWAYS_ON, remote_parent_not_sampled=sampling.ALWAYS_ON, local_parent_sampled=sampling.ALWAYS_OFF
    ),
    "ratio": sampling.TraceIdRatioBased(0.5),
    "parentbased_ratio": sampling.ParentBased(sampling.TraceIdRatioBased(0.5)),
}


def test_every_sampler_and_parent_decide_as_the_sdk() -> None:
    """Decisions taken without calling a static sampler match the SDK's, parent by parent."""
    for label, sampler in SAMPLERS.items():
        provider, _ = setup(sampler=sampler)
        tracer = provider.get_tracer("t")
        starter = SpanStarter(tracer)
        for parent in _parents():
            if parent is None and "ratio" in label:
                continue  # decided by each root's random trace id
            for attempt in range(3):
                ours = starter.start_span("s", parent, SpanKind.CLIENT, {"a": 1})
                mine = ours.get_span_context()
                theirs = tracer.start_span("s", parent, SpanKind.CLIENT, {"a": 1})
                expected = theirs.get_span_context()
                where = f"{label}, parent {parent and list(parent.values())[0].get_span_context()}"
                assert ours.is_recording() == theirs.is_recording(), where
                assert mine.trace_flags.sampled == expected.trace_flags.sampled, where
                assert mine.trace_state == expected.trace_state, where
                if parent is not None:
                    assert mine.trace_id == 0xABC, where
                ours.end()
                theirs.end()
        if label == "parentbased_always_on":
            assert starter._factory and starter._factory._static_table is not None
        if "ratio" in label:
            assert not starter._factory or starter._factory._static_table is None


def test_a_sampler_replaced_at_run_time_is_asked() -> None:
    provider, exporter = setup()
    tracer = provider.get_tracer("t")
    starter = SpanStarter(tracer)
    starter.start_span("before", attributes={"a": 1}).end()
    tracer.sampler = sampling.ALWAYS_OFF
    dropped = starter.start_span("after", attributes={"a": 1})
    assert not dropped.is_recording()
    dropped.end()
    tracer.sampler = RecordingSampler()
    starter.start_span("asked", attributes={"a": 1}).end()
    assert tracer.sampler.seen == [{"a": 1}]
    assert [s.name for s in exporter.get_finished_spans()] == ["before", "asked"]


def test_set_attributes_matches_the_sdk_case_by_case() -> None:
    """Attributes added after the start end up exactly as the SDK's own set_attributes leaves them."""
    from opentelemetry.trace import INVALID_SPAN

    from autotrace.spans import set_attributes

    cases = [
        {"http.response.status_code": 200, "network.protocol.version": "1.1"},
        {"a": 1},  # an existing key: replaced (the SDK moves it last)
        {"list": ["x", "y"]},  # not a plain value: the SDK converts it
        {"": "empty key"},  # invalid: the SDK drops it
        {"f": 0.5, "b": True, "s": "text"},
    ]
    for limits in (SpanLimits(), SpanLimits(max_span_attributes=3)):
        for case in cases:
            results = []
            for ours in (True, False):
                provider, exporter = setup(span_limits=limits)
                span = SpanStarter(provider.get_tracer("t")).start_span("s", attributes={"a": 0, "z": 9})
                if ours:
                    set_attributes(span, dict(case))
                else:
                    span.set_attributes(dict(case))
                span.end()
                (done,) = exporter.get_finished_spans()
                results.append((list(done.attributes.items()), done.dropped_attributes))
            assert results[0] == results[1], (limits, case)
    provider, exporter = setup()
    span = SpanStarter(provider.get_tracer("t")).start_span("s", attributes={"a": 0})
    span.end()
    set_attributes(span, {"late": 1})  # ended: ignored, as the SDK does
    assert dict(exporter.get_finished_spans()[0].attributes) == {"a": 0}
    set_attributes(INVALID_SPAN, {"a": 1})  # a non-recording span: nothing happens


def test_set_attributes_takes_the_direct_way_only_when_certain(monkeypatch: Any) -> None:
    from opentelemetry.sdk.trace import Span

    from autotrace.spans import set_attributes

    calls: List[Any] = []
    original = Span.set_attributes
    monkeypatch.setattr(Span, "set_attributes", lambda self, attrs: (calls.append(dict(attrs)), original(self, attrs)))
    provider, exporter = setup()
    span = SpanStarter(provider.get_tracer("t")).start_span("s", attributes={"a": 0})
    set_attributes(span, {"plain": 1})
    assert calls == []  # the direct way
    set_attributes(span, {"plain": 2})  # existing key
    set_attributes(span, {"seq": [1]})  # not plain
    assert calls == [{"plain": 2}, {"seq": [1]}]
    span.end()
    assert dict(exporter.get_finished_spans()[0].attributes) == {"a": 0, "plain": 2, "seq": (1,)}
