"""pika instrumentor against the real RabbitMQ at 127.0.0.1:5672 (guest/guest); one queue per test, deleted after."""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.pika import PikaInstrumentor
from tests.support.services import RABBITMQ, require

pika = pytest.importorskip("pika")
SECRET = "hunter2-secret-body"


@pytest.fixture
def channel(instrument: Any) -> Iterator[Any]:
    require(RABBITMQ)
    instrument(PikaInstrumentor)
    params = pika.ConnectionParameters("127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"))
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue = f"at_pika_{uuid.uuid4().hex}"
    channel.queue_declare(queue=channel.queue)
    yield channel
    channel.queue_delete(queue=channel.queue)
    connection.close()


def publish(channel: Any, headers: Any = None) -> Any:
    properties = pika.BasicProperties(message_id="m-1", headers=headers)
    channel.basic_publish(exchange="", routing_key=channel.queue, body=SECRET.encode(), properties=properties)
    return properties


def check_pair(spans: Any, channel: Any, consumer_name: str) -> Any:
    producer, consumer = spans.one(f"publish {channel.queue}"), spans.one(consumer_name)
    assert producer.kind == SpanKind.PRODUCER and consumer.kind == SpanKind.CONSUMER
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.context.trace_id == producer.context.trace_id
    assert producer.attributes["messaging.system"] == "rabbitmq"
    assert producer.attributes["messaging.operation.type"] == "send"
    assert producer.attributes["messaging.destination.name"] == channel.queue
    assert producer.attributes["messaging.rabbitmq.destination.routing_key"] == channel.queue
    assert producer.attributes["messaging.message.id"] == "m-1"
    assert producer.attributes["messaging.message.body.size"] == len(SECRET)
    assert (producer.attributes["server.address"], producer.attributes["server.port"]) == ("127.0.0.1", 5672)
    assert SECRET not in json.dumps([s.to_json() for s in spans.get()])
    return consumer


def test_publish_then_basic_consume(channel: Any, spans: Any) -> None:
    headers = {"app": "x"}
    properties = publish(channel, headers)
    assert headers == {"app": "x"} and properties.headers is headers  # the caller's objects are unchanged
    seen = []

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        seen.append((props.headers, trace.get_current_span().get_span_context().span_id))
        ch.basic_ack(method.delivery_tag)
        ch.stop_consuming()

    channel.basic_consume(channel.queue, on_message)
    channel.start_consuming()
    consumer = check_pair(spans, channel, f"process {channel.queue}")
    assert seen[0][0]["app"] == "x" and "traceparent" in seen[0][0]
    assert seen[0][1] == consumer.context.span_id  # the span is current in the callback
    assert consumer.attributes["messaging.operation.type"] == "process"
    assert len(spans.get()) == 2  # the blocking channel's inner channel added no second producer span


def test_basic_get(channel: Any, spans: Any) -> None:
    publish(channel)
    for _ in range(50):
        method, properties, body = channel.basic_get(channel.queue, auto_ack=True)
        if method is not None:
            break
    assert body == SECRET.encode()
    consumer = check_pair(spans, channel, f"receive {channel.queue}")
    assert consumer.attributes["messaging.operation.type"] == "receive"


def test_consume_generator(channel: Any, spans: Any) -> None:
    publish(channel)
    tracer = trace.get_tracer("test")
    for method, properties, body in channel.consume(channel.queue, auto_ack=True, inactivity_timeout=5):
        assert method is not None
        with tracer.start_as_current_span("work"):
            pass
        assert not spans.named(f"process {channel.queue}")  # open until the next next()
        break
    channel.cancel()
    consumer = check_pair(spans, channel, f"process {channel.queue}")
    assert spans.one("work").parent.span_id == consumer.context.span_id
    assert not trace.get_current_span().get_span_context().is_valid  # nothing left attached


def test_callback_exception_recorded(channel: Any, spans: Any) -> None:
    publish(channel)

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        raise ValueError("boom")

    channel.basic_consume(channel.queue, on_message, auto_ack=True)
    with pytest.raises(ValueError, match="boom"):
        channel.start_consuming()
    consumer = check_pair(spans, channel, f"process {channel.queue}")
    assert consumer.status.status_code == StatusCode.ERROR
    assert consumer.attributes["error.type"] == "ValueError"


def test_select_connection_adapter(instrument: Any, spans: Any) -> None:
    """The async adapters (here SelectConnection) share pika.channel.Channel: the same two spans."""
    require(RABBITMQ)
    instrument(PikaInstrumentor)
    queue, seen = f"at_pika_{uuid.uuid4().hex}", []
    params = pika.ConnectionParameters("127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"))

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)
        ch.connection.close()  # the queue is exclusive: deleted with the connection

    def on_declared(ch: Any) -> None:
        ch.basic_consume(queue, on_message, auto_ack=True)
        ch.basic_publish("", queue, SECRET.encode(), pika.BasicProperties(message_id="m-1"))

    def on_channel(ch: Any) -> None:
        ch.queue_declare(queue, exclusive=True, callback=lambda _frame: on_declared(ch))

    connection = pika.SelectConnection(params, on_open_callback=lambda c: c.channel(on_open_callback=on_channel))
    connection.add_on_close_callback(lambda *_: connection.ioloop.stop())
    connection.ioloop.call_later(10, connection.ioloop.stop)
    connection.ioloop.start()
    fake = type("Queue", (), {"queue": queue})
    consumer = check_pair(spans, fake, f"process {queue}")
    assert seen == [consumer.context.span_id]
