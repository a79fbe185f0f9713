"""aio-pika instrumentor against the real RabbitMQ at 127.0.0.1:5672 (guest/guest); one queue per test, deleted."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Awaitable, Callable

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.aio_pika import AioPikaInstrumentor
from tests.support.services import AMQP_URL, RABBITMQ, require

aio_pika = pytest.importorskip("aio_pika")
SECRET = "hunter2-secret-body"


def run(instrument: Any, test: Callable[[Any, Any], Awaitable[None]], robust: bool = False) -> None:
    """``test(channel, queue)`` on a fresh connection and queue (deleted after), instrumented."""
    require(RABBITMQ)
    instrument(AioPikaInstrumentor)

    async def main() -> None:
        connection = await (aio_pika.connect_robust if robust else aio_pika.connect)(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"at_pika_{uuid.uuid4().hex}")
            try:
                await asyncio.wait_for(test(channel, queue), 10)
            finally:
                await queue.delete(if_unused=False, if_empty=False)

    asyncio.run(main())


async def publish(channel: Any, queue: Any) -> Any:
    message = aio_pika.Message(SECRET.encode(), message_id="m-1", headers={"app": "x"})
    await channel.default_exchange.publish(message, routing_key=queue.name)
    assert message.headers == {"app": "x"}  # the caller's message is unchanged
    return message


def check_pair(spans: Any, queue: Any, operation: str = "process") -> Any:
    producer, consumer = spans.one(f"publish {queue.name}"), spans.one(f"{operation} {queue.name}")
    assert producer.kind == SpanKind.PRODUCER and consumer.kind == SpanKind.CONSUMER
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.context.trace_id == producer.context.trace_id
    for span, kind in ((producer, "send"), (consumer, operation)):
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.operation.type"] == kind
        assert span.attributes["messaging.destination.name"] == queue.name
        assert span.attributes["messaging.rabbitmq.destination.routing_key"] == queue.name
        assert span.attributes["messaging.message.id"] == "m-1"
        assert span.attributes["messaging.message.body.size"] == len(SECRET)
        assert (span.attributes["server.address"], span.attributes["server.port"]) == ("127.0.0.1", 5672)
    assert SECRET not in json.dumps([s.to_json() for s in spans.get()])
    return consumer


@pytest.mark.parametrize("robust", [False, True])
def test_publish_then_iterator(instrument: Any, spans: Any, robust: bool) -> None:
    async def test(channel: Any, queue: Any) -> None:
        await publish(channel, queue)
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    assert message.headers["app"] == "x" and "traceparent" in message.headers
                    with trace.get_tracer("test").start_as_current_span("work"):
                        pass
                assert not spans.named(f"process {queue.name}")  # open until the next __anext__
                break
        consumer = check_pair(spans, queue)
        assert spans.one("work").parent.span_id == consumer.context.span_id
        assert not trace.get_current_span().get_span_context().is_valid  # nothing left attached

    run(instrument, test, robust)


@pytest.mark.parametrize("fail", [False, True])
def test_consume_callback(instrument: Any, spans: Any, fail: bool) -> None:
    async def test(channel: Any, queue: Any) -> None:
        done = asyncio.get_running_loop().create_future()

        async def on_message(message: Any) -> None:
            done.set_result(trace.get_current_span().get_span_context().span_id)
            if fail:
                raise ValueError("boom")
            await message.ack()

        tag = await queue.consume(on_message, no_ack=fail)
        await publish(channel, queue)
        current = await done
        await asyncio.sleep(0.05)  # the callback's span ends after it returns
        await queue.cancel(tag)
        consumer = check_pair(spans, queue)
        assert current == consumer.context.span_id
        assert (consumer.status.status_code == StatusCode.ERROR) is fail
        assert len(spans.get()) == 2  # the iterator's and the library's own callbacks add none

    run(instrument, test)


def test_get(instrument: Any, spans: Any) -> None:
    async def test(channel: Any, queue: Any) -> None:
        await publish(channel, queue)
        message = None
        while message is None:
            message = await queue.get(no_ack=True, fail=False)
        assert message.body == SECRET.encode()
        check_pair(spans, queue, "receive")

    run(instrument, test)
