"""autotrace.messaging: the helpers messaging instrumentors share, and Celery on them.

Spans of the library calls made inside handlers come from real Redis commands
(database 9, keys under a per-test prefix, deleted afterwards); the Celery
tests use Celery's in-memory transport.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Dict, Iterator, Tuple

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, StatusCode

from autotrace import messaging
from autotrace.kit import PRODUCER, CallSpan, Instrumentor, Plan, Suppress, suppressed
from autotrace.messaging import (
    ConsumerCall,
    Machinery,
    batch_links,
    body_size,
    consumer_attributes,
    consumer_parent,
    inject_headers,
    new_trace,
    producer_attributes,
    span_name,
    start_consumer_span,
)
from tests.support.processes import free_port
from tests.support.services import REDIS, require

redis = pytest.importorskip("redis")
pytest.importorskip("redis.asyncio.client")

from autotrace.instrumentors.redis import RedisInstrumentor  # noqa: E402

URL = "redis://127.0.0.1:6379/9"
tracer = trace.get_tracer("test")


class Library(Instrumentor):
    """A stand-in messaging instrumentor: what pika or a Kafka client's would be, minus the patching."""

    name = "testmq"
    modules = (__name__,)

    def patch_module(self, module_name: str, module: Any) -> None:
        """Nothing: each test wraps its own target with ``self.wrap`` (undone by ``unpatch``)."""


class Queue:
    """The library under test: a handler is called once per delivered message."""

    def __init__(self, client: Any = None, prefix: str = "") -> None:
        self.client = client
        self.prefix = prefix

    def deliver(self, headers: Dict[str, str], body: bytes) -> int:
        if self.client is not None:
            self.client.set(self.prefix + "seen", body)
        if body == b"bad":
            raise ValueError("bad message")
        return len(body)

    async def deliver_async(self, headers: Dict[str, str], body: bytes) -> int:
        await asyncio.sleep(0)
        if body == b"bad":
            raise ValueError("bad message")
        return len(body)


@pytest.fixture
def prefix() -> Iterator[str]:
    require(REDIS)
    value = f"autotrace-test-messaging:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(URL)
    try:
        keys = list(client.scan_iter(match=value + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def client(instrument, prefix) -> Iterator[Any]:
    instrument(RedisInstrumentor)
    connection = redis.Redis.from_url(URL)
    yield connection
    connection.close()


def headers_of(span: Any, **values: str) -> Dict[str, str]:
    ctx = trace.set_span_in_context(span)
    for key, value in values.items():
        ctx = baggage.set_baggage(key, value, ctx)
    carrier: Dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


# --------------------------------------------------------------------------
# Attributes, names, headers


def test_attribute_builders_leave_out_missing_facts_and_never_hold_the_body() -> None:
    assert producer_attributes("rabbitmq", "orders", message_id=17, body_size=body_size(b"abc"),
                               conversation_id="c-1", server_address="mq.local", server_port="5672") == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "orders",
        "messaging.message.id": "17",
        "messaging.message.body.size": 3,
        "messaging.message.conversation_id": "c-1",
        "server.address": "mq.local",
        "server.port": 5672,
    }
    assert consumer_attributes("kafka", operation_name="poll", server_port=9092) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "poll",
    }
    assert messaging.message_attributes("kafka", messaging.RECEIVE)["messaging.operation.name"] == "receive"
    assert [body_size(b) for b in (b"", bytearray(b"ab"), memoryview(b"abcd"), "h\u00e9", "abc", object())] == [0, 2, 4, 3, 3, None]
    assert span_name("publish", "orders") == "publish orders"
    assert span_name("process") == span_name("process", "") == "process"


def test_inject_headers_returns_a_copy_with_the_context() -> None:
    original = {"x-app": "1"}
    with tracer.start_as_current_span("producer") as span:
        copy = inject_headers(original)
        fresh = inject_headers(None)
    assert original == {"x-app": "1"}
    assert copy["x-app"] == "1" and copy is not original
    for headers in (copy, fresh):
        assert headers["traceparent"].split("-")[2] == format(span.get_span_context().span_id, "016x")
    explicit = tracer.start_span("other")
    assert inject_headers(None, trace.set_span_in_context(explicit))["traceparent"].split("-")[2] == format(
        explicit.get_span_context().span_id, "016x"
    )


# --------------------------------------------------------------------------
# The consumer side


def test_consumer_parent_is_the_producer_or_only_a_link() -> None:
    producer = tracer.start_span("producer")
    carrier = headers_of(producer, tenant="acme")
    expected = producer.get_span_context()

    parent, links = consumer_parent(carrier)
    assert trace.get_current_span(parent).get_span_context().span_id == expected.span_id and links is None

    parent, links = consumer_parent(carrier, link_only=True)
    assert not trace.get_current_span(parent).get_span_context().is_valid
    assert [link.context.span_id for link in links] == [expected.span_id]
    assert baggage.get_baggage("tenant", parent) == "acme"  # baggage carries on in a new trace

    for bad in ({"traceparent": "00-zz-yy-01"}, {}, None):
        parent, links = consumer_parent(bad, link_only=True)
        assert not trace.get_current_span(parent).get_span_context().is_valid and links is None


def test_batch_links_one_per_distinct_valid_context() -> None:
    first, second = tracer.start_span("a"), tracer.start_span("b")
    carriers = [headers_of(first), {"traceparent": "bogus"}, None, headers_of(second), headers_of(first), {}]
    links = batch_links(carriers)
    assert [link.context.span_id for link in links] == [first.get_span_context().span_id, second.get_span_context().span_id]
    assert len(batch_links(carriers, limit=1)) == 1
    assert batch_links([]) == []


def test_start_consumer_span_from_headers(spans) -> None:
    library = Library()
    producer = tracer.start_span("producer")
    with tracer.start_as_current_span("unrelated"):
        consumer = start_consumer_span(library, "process orders", consumer_attributes("testmq", "orders"), headers_of(producer))
        consumer.enter()
        with tracer.start_as_current_span("handler work"):
            pass
        consumer.leave()
        consumer.end()
    linked = start_consumer_span(library, "process orders", {}, headers_of(producer), link_only=True,
                                 links=batch_links([headers_of(tracer.start_span("other"))]))
    linked.end()
    span, work = spans.named("process orders")[0], spans.one("handler work")
    assert span.kind is SpanKind.CONSUMER
    assert span.parent.span_id == producer.get_span_context().span_id
    assert work.parent.span_id == span.context.span_id
    assert spans.named("process orders")[1].parent is None
    assert len(spans.named("process orders")[1].links) == 2


def consume_describe(queue: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    headers, body = args
    if headers.get("skip"):
        return None
    if headers.get("explode"):
        raise RuntimeError("our bug")
    parent, links = consumer_parent(headers, link_only=bool(headers.get("link")))
    attributes = consumer_attributes("testmq", "orders", body_size=body_size(body))
    return Plan(span_name("process", "orders"), attributes, parent, links, state=body)


def test_consumer_call_traces_from_the_message_whatever_is_current(instrument, client, prefix, spans) -> None:
    finished = []
    library = instrument(Library)
    call = ConsumerCall(library, consume_describe, finish=lambda span, result, state: finished.append((result, state)))
    library.wrap(Queue, "deliver", call)
    queue = Queue(client, prefix)
    producer = tracer.start_span("producer")
    with tracer.start_as_current_span("worker loop"), suppressed():  # a consumer loop runs suppressed
        assert queue.deliver(headers_of(producer), b"hello") == 5
        client.get(prefix + "noise")  # the loop's own command: suppressed
    span = spans.one("process orders")
    assert span.kind is SpanKind.CONSUMER
    assert span.parent.span_id == producer.get_span_context().span_id
    assert span.attributes["messaging.message.body.size"] == 5
    assert finished == [(5, b"hello")]
    command = spans.one("SET")  # the handler's own command is traced, a child of the consumer span
    assert command.parent.span_id == span.context.span_id
    assert otel_context.get_current().get(otel_context._SUPPRESS_INSTRUMENTATION_KEY) is None


def test_consumer_call_errors_pass_unchanged(instrument, spans, caplog) -> None:
    library = instrument(Library)
    library.wrap(Queue, "deliver", ConsumerCall(library, consume_describe))
    queue = Queue()
    with pytest.raises(ValueError, match="bad message"):
        queue.deliver({}, b"bad")
    span = spans.one("process orders")
    assert span.parent is None and span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    spans.clear()
    assert queue.deliver({"skip": "1"}, b"abc") == 3  # describe says no span
    with caplog.at_level(logging.ERROR, logger="autotrace"):
        assert queue.deliver({"explode": "1"}, b"abcd") == 4  # our failure: the handler runs untraced
    assert spans.get() == []
    assert "internal error in testmq.consume_describe" in caplog.text


def test_consumer_call_async_handler(instrument, spans) -> None:
    library = instrument(Library)
    library.wrap(Queue, "deliver_async", ConsumerCall(library, consume_describe))
    producer = tracer.start_span("producer")
    queue = Queue()
    assert asyncio.iscoroutinefunction(Queue.deliver_async)
    assert asyncio.run(queue.deliver_async(headers_of(producer), b"abc")) == 3
    with pytest.raises(ValueError):
        asyncio.run(queue.deliver_async(headers_of(producer), b"bad"))
    first, failed = spans.named("process orders")
    assert first.parent.span_id == producer.get_span_context().span_id and first.end_time > first.start_time
    assert failed.status.status_code is StatusCode.ERROR


def test_consumer_call_link_only(instrument, spans) -> None:
    library = instrument(Library)
    library.wrap(Queue, "deliver", ConsumerCall(library, consume_describe))
    producer = tracer.start_span("producer")
    Queue().deliver(dict(headers_of(producer), link="1"), b"x")
    span = spans.one("process orders")
    assert span.parent is None
    assert [link.context.span_id for link in span.links] == [producer.get_span_context().span_id]


# --------------------------------------------------------------------------
# The library's machinery


def publish_describe(instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    return span_name("publish", args[0]), producer_attributes("testmq", args[0])


class Broker:
    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def publish(self, destination: str) -> str:
        self.client.rpush(self.prefix + destination, "message")  # the broker write: never a span of its own
        return destination

    def bookkeeping(self) -> None:
        self.client.incr(self.prefix + "counter")
        self.publish("callbacks")

    def results(self) -> Iterator[int]:
        for index in range(2):
            self.client.incr(self.prefix + "results")
            yield index


def test_machinery_suppresses_all_but_the_library_publishes(instrument, client, prefix, spans) -> None:
    library = instrument(Library)
    machinery = Machinery("testmq")
    library.wrap(Broker, "publish", machinery.through(CallSpan(library, publish_describe, PRODUCER, Suppress.ALL)))
    library.wrap(Broker, "bookkeeping", machinery.run)
    library.wrap(Broker, "results", machinery.run)
    broker = Broker(client, prefix)
    with tracer.start_as_current_span("task") as task:
        broker.bookkeeping()
        assert list(broker.results()) == [0, 1]
        client.get(prefix + "after")  # the task's own command, after the machinery
    publish = spans.one("publish callbacks")
    assert publish.kind is SpanKind.PRODUCER and publish.parent.span_id == task.get_span_context().span_id
    assert [s.name for s in spans.get() if s.kind is SpanKind.CLIENT] == ["GET"]  # no INCR, no RPUSH
    assert client.llen(prefix + "callbacks") == 1

    spans.clear()
    with suppressed():  # suppression that is not the machinery's is respected
        broker.publish("quiet")
    assert spans.get() == []


def test_new_trace_starts_each_call_from_an_empty_context(instrument, spans) -> None:
    key = otel_context.create_key("test-entry")
    seen = []

    class Scheduler:
        def tick(self, entry: str) -> None:
            seen.append(otel_context.get_value(key))
            tracer.start_span("scheduled").end()

    library = instrument(Library)
    library.wrap(Scheduler, "tick", new_trace(lambda scheduler, args, kwargs: {key: args[0]}, "testmq.tick"))
    with tracer.start_as_current_span("unrelated"):
        Scheduler().tick("nightly")
        assert otel_context.get_value(key) is None
    assert seen == ["nightly"]
    assert spans.one("scheduled").parent is None


# --------------------------------------------------------------------------
# Celery on these helpers (in-memory transport)

celery = pytest.importorskip("celery")


@pytest.fixture
def celery_app(instrument) -> Any:
    from celery import Celery

    from autotrace.instrumentors.celery import CeleryInstrumentor

    instrument(CeleryInstrumentor)
    app = Celery("messaging_tests", broker="memory://", set_as_current=False)

    @app.task(name="m.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="m.audit", shared=False)
    def audit():
        return None

    return app


def test_celery_explicit_headers_are_copied_and_carry_the_context(celery_app, spans) -> None:
    headers = {"x-app": "shop"}
    with celery_app.connection_for_write() as connection:
        result = celery_app.tasks["m.add"].apply_async((1, 2), headers=headers, connection=connection, queue="q-headers")
        message = connection.default_channel.basic_get("q-headers")
    span = spans.one("publish m.add")
    assert headers == {"x-app": "shop"}
    assert message.headers["x-app"] == "shop"
    assert message.headers["traceparent"].split("-")[2] == format(span.context.span_id, "016x")
    assert span.attributes["messaging.destination.name"] == "q-headers"
    assert span.attributes["messaging.message.id"] == result.id


def test_celery_publish_inside_a_publish_is_traced_but_broker_io_is_not(celery_app, client, prefix, spans) -> None:
    """A ``before_task_publish`` handler runs inside the publish (Celery's machinery)."""
    from celery.signals import before_task_publish

    def handler(sender=None, headers=None, **kwargs):
        if sender == "m.add":
            client.incr(prefix + "published")  # inside the machinery: no span
            celery_app.tasks["m.audit"].apply_async(queue="q-audit")

    before_task_publish.connect(handler, weak=False)
    try:
        with tracer.start_as_current_span("request"):
            celery_app.tasks["m.add"].apply_async((1, 2), queue="q-nested")
    finally:
        before_task_publish.disconnect(handler)
    outer, inner = spans.one("publish m.add"), spans.one("publish m.audit")
    assert inner.parent.span_id == outer.context.span_id
    assert inner.attributes["messaging.destination.name"] == "q-audit"
    assert outer.attributes["messaging.destination.name"] == "q-nested"
    assert [s.name for s in spans.get() if s.kind is SpanKind.CLIENT] == []
    assert int(client.get(prefix + "published")) == 1


def test_celery_failed_publish_keeps_its_destination(instrument, spans) -> None:
    """The broker refuses the connection after routing: the span has the error and where it was going."""
    from celery import Celery

    from autotrace.instrumentors.celery import CeleryInstrumentor

    instrument(CeleryInstrumentor)
    app = Celery("messaging_down", broker=f"redis://127.0.0.1:{free_port()}/9", set_as_current=False)
    app.conf.task_publish_retry = False
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    app.conf.broker_transport_options = {"max_retries": 0, "socket_connect_timeout": 0.5}

    @app.task(name="m.down", shared=False)
    def down():
        return None

    with pytest.raises(Exception) as raised:
        down.apply_async(queue="q-failed")
    span = spans.one("publish m.down")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == f"{type(raised.value).__module__}.{type(raised.value).__qualname__}"
    assert span.attributes["messaging.destination.name"] == "q-failed"
    assert span.attributes["messaging.system"] == "redis"
