"""Celery in-process: eager execution (task_always_eager), publish wrapping, beat, suppression.

Eager tasks never touch a broker; the publish tests use Celery's in-memory
transport, so they need no service either.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, StatusCode

celery = pytest.importorskip("celery")

from celery import Celery  # noqa: E402

from autotrace.instrumentation import suppressed  # noqa: E402
from autotrace.instrumentors.celery import CeleryInstrumentor  # noqa: E402


def make_app(eager: bool) -> Celery:
    app = Celery("eager_tests", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_always_eager = eager
    app.conf.task_store_eager_result = False

    @app.task(name="t.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="t.fail", shared=False)
    def fail():
        raise ValueError("eager boom")

    @app.task(name="t.outer", shared=False)
    def outer(x):
        return add.delay(x, 1).result

    return app


@pytest.fixture
def celery_instrumented(instrument):
    return instrument(CeleryInstrumentor)


def test_eager_task_is_a_consumer_span_in_the_current_trace(celery_instrumented, spans) -> None:
    app = make_app(eager=True)
    with trace.get_tracer("test").start_as_current_span("request") as parent:
        result = app.tasks["t.add"].delay(2, 3)
    assert result.get() == 5
    span = spans.one("process t.add")
    assert span.kind is SpanKind.CONSUMER
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes["messaging.operation.type"] == "process"
    assert span.attributes["messaging.message.id"] == result.id
    assert span.attributes["celery.task.name"] == "t.add"
    assert span.attributes["celery.state"] == "SUCCESS"
    assert spans.named("publish t.add") == []  # nothing is published in eager mode


def test_eager_failure_is_an_error(celery_instrumented, spans) -> None:
    app = make_app(eager=True)
    result = app.tasks["t.fail"].delay()
    assert result.state == "FAILURE"
    span = spans.one("process t.fail")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["celery.state"] == "FAILURE"
    assert span.attributes["error.type"] == "ValueError"
    assert [e.name for e in span.events] == ["exception"]


def test_eager_propagated_exception_passes_through_unchanged(celery_instrumented, spans) -> None:
    app = make_app(eager=True)
    app.conf.task_eager_propagates = True
    with pytest.raises(ValueError, match="eager boom"):
        app.tasks["t.fail"].apply()
    assert spans.one("process t.fail").status.status_code is StatusCode.ERROR


def test_eager_nested_task_is_a_child(celery_instrumented, spans) -> None:
    app = make_app(eager=True)
    assert app.tasks["t.outer"].delay(1).get() == 2
    outer, inner = spans.one("process t.outer"), spans.one("process t.add")
    assert inner.parent.span_id == outer.context.span_id


def test_publish_is_a_producer_span_with_context_in_the_headers(celery_instrumented, spans) -> None:
    app = make_app(eager=False)
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with trace.get_tracer("test").start_as_current_span("request") as parent:
            with app.connection_for_write() as connection:
                result = app.tasks["t.add"].apply_async((1, 2), connection=connection)
                message = connection.default_channel.basic_get(app.conf.task_default_queue)
    finally:
        otel_context.detach(token)
    span = spans.one("publish t.add")
    assert span.kind is SpanKind.PRODUCER
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes["messaging.message.id"] == result.id
    assert span.attributes["messaging.operation.type"] == "send"
    assert span.attributes["messaging.destination.name"] == "celery"
    assert span.attributes["messaging.system"] == "memory"
    headers = message.headers
    assert headers["traceparent"].split("-")[2] == format(span.context.span_id, "016x")
    assert "tenant=acme" in headers["baggage"]
    assert headers["id"] == result.id


def test_worker_side_execution_continues_the_producer_trace(celery_instrumented, spans) -> None:
    """The tracer the worker stores on ``task.__trace__`` extracts the parent from the request headers."""
    from celery.app.trace import build_tracer

    app = make_app(eager=False)
    task = app.tasks["t.add"]
    producer = trace.get_tracer("test").start_span("producer")
    carrier = {}
    from opentelemetry import propagate

    propagate.inject(carrier, context=trace.set_span_in_context(producer))
    task.__trace__ = build_tracer(task.name, task, app=app)
    try:
        request = dict(carrier, id="abc", retries=2, delivery_info={"routing_key": "q1", "exchange": ""})
        with suppressed():  # the worker's loop is suppressed: the task must not be
            retval, info, _, _ = task.__trace__("abc", (1, 2), {}, request)
    finally:
        del task.__trace__
    assert (retval, info) == (3, None)
    span = spans.one("process t.add")
    assert span.kind is SpanKind.CONSUMER
    assert span.parent.span_id == producer.get_span_context().span_id
    assert span.attributes["messaging.destination.name"] == "q1"
    assert span.attributes["celery.retry.count"] == 2
    assert span.attributes["celery.state"] == "SUCCESS"


def test_link_only_switch(instrument, spans, monkeypatch) -> None:
    monkeypatch.setenv("AUTOTRACE_CELERY_LINK_ONLY", "true")
    instrument(CeleryInstrumentor)
    from celery.app.trace import build_tracer
    from opentelemetry import propagate

    app = make_app(eager=False)
    task = app.tasks["t.add"]
    producer = trace.get_tracer("test").start_span("producer")
    carrier = {}
    propagate.inject(carrier, context=trace.set_span_in_context(producer))
    task.__trace__ = build_tracer(task.name, task, app=app)
    try:
        task.__trace__("abc", (1, 2), {}, carrier)
    finally:
        del task.__trace__
    span = spans.one("process t.add")
    assert span.parent is None
    assert [link.context.span_id for link in span.links] == [producer.get_span_context().span_id]


def test_beat_publish_is_a_root_producer_span(celery_instrumented, spans) -> None:
    from celery.beat import ScheduleEntry, Scheduler

    app = make_app(eager=False)
    scheduler = Scheduler(app, lazy=True)
    entry = ScheduleEntry(name="tick", task="t.add", args=(1, 1), schedule=timedelta(seconds=5), app=app)
    scheduler.schedule[entry.name] = entry
    with trace.get_tracer("test").start_as_current_span("unrelated"):
        scheduler.apply_async(entry, advance=False)
    span = spans.one("publish t.add")
    assert span.parent is None
    assert span.attributes["celery.beat.entry"] == "tick"


def test_suppressed_publish_makes_no_span(celery_instrumented, spans) -> None:
    app = make_app(eager=False)
    with suppressed():
        app.tasks["t.add"].apply_async((1, 2))
    assert spans.named("publish t.add") == []


def test_unpatch_restores_everything() -> None:
    from celery.app.base import Celery as CeleryClass
    from celery.app.task import Task

    original_send, original_apply = CeleryClass.__dict__["send_task"], Task.__dict__["apply"]
    instrumentor = CeleryInstrumentor().instrument()
    assert CeleryClass.__dict__["send_task"] is not original_send
    assert Task.__dict__["__trace__"] is not None
    instrumentor.unpatch()
    assert CeleryClass.__dict__["send_task"] is original_send
    assert Task.__dict__["apply"] is original_apply
    assert Task.__dict__["__trace__"] is None
