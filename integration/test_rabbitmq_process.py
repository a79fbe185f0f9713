"""RabbitMQ across processes: a pika publisher and a pika consumer, each under ``autotrace-run``,
exporting to a real OTLP receiver: the consumer's CONSUMER span is a child of the publisher's
PRODUCER span (the context travels in the message headers), and the body is never exported.
"""

from __future__ import annotations

import textwrap
import uuid
from typing import Any, List

import pytest

pytest.importorskip("pika")

from tests.support.processes import run_traced, start_traced, stop  # noqa: E402
from tests.support.receiver import OTLPReceiver  # noqa: E402
from tests.support.services import RABBITMQ, require  # noqa: E402

SECRET = "card-4111-1111-1111-1111"

CONSUMER = textwrap.dedent(
    """
    import sys
    import pika
    from opentelemetry import trace

    queue = sys.argv[1]
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    channel = connection.channel()
    channel.queue_declare(queue=queue, auto_delete=False)
    print("ready", flush=True)

    def handle(ch, method, properties, body):
        with trace.get_tracer("consumer-app").start_as_current_span("handle-order"):
            pass
        ch.basic_ack(method.delivery_tag)
        ch.stop_consuming()

    channel.basic_consume(queue=queue, on_message_callback=handle)
    channel.start_consuming()
    channel.queue_delete(queue=queue)
    connection.close()
    print("consumed", flush=True)
    """
)

PUBLISHER = textwrap.dedent(
    """
    import sys
    import pika
    from opentelemetry import trace

    queue, secret = sys.argv[1], sys.argv[2]
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    channel = connection.channel()
    channel.queue_declare(queue=queue, auto_delete=False)
    properties = pika.BasicProperties(headers={"mine": "1"}, message_id="order-1")
    with trace.get_tracer("publisher-app").start_as_current_span("place-order"):
        channel.basic_publish(exchange="", routing_key=queue, body=secret.encode(), properties=properties)
    assert properties.headers == {"mine": "1"}, properties.headers  # the caller's object is untouched
    connection.close()
    print("published", flush=True)
    """
)


def test_publisher_and_consumer_processes_make_one_trace(tmp_path: Any) -> None:
    require(RABBITMQ)
    queue = f"at_pika_process_{uuid.uuid4().hex[:10]}"
    (tmp_path / "consumer.py").write_text(CONSUMER)
    (tmp_path / "publisher.py").write_text(PUBLISHER)
    with OTLPReceiver() as receiver:
        env = receiver.env()
        consumer = start_traced(["python", str(tmp_path / "consumer.py"), queue], env=dict(env, OTEL_SERVICE_NAME="orders-consumer"))
        try:
            assert consumer.stdout.readline().strip() == "ready"
            publisher = run_traced(["python", str(tmp_path / "publisher.py"), queue, SECRET],
                                   env=dict(env, OTEL_SERVICE_NAME="orders-publisher"), timeout=60)
            assert publisher.returncode == 0, publisher.stderr
            assert "published" in publisher.stdout

            def complete(spans: List[Any]) -> bool:
                return {"place-order", "handle-order"} <= {s.name for s in spans} and any(s.kind == "CONSUMER" for s in spans)

            spans = receiver.wait_for(complete, timeout=30)
        finally:
            out, err = stop(consumer)
    assert "Traceback" not in err, err
    by_name = {s.name: s for s in spans}
    root = by_name["place-order"]
    producers = [s for s in spans if s.kind == "PRODUCER"]
    consumers = [s for s in spans if s.kind == "CONSUMER"]
    assert len(producers) == 1 and len(consumers) == 1, sorted((s.kind, s.name) for s in spans)
    producer, consumer_span = producers[0], consumers[0]
    assert producer.name == f"publish {queue}" and consumer_span.name == f"process {queue}"
    assert producer.parent_span_id == root.span_id and producer.trace_id == root.trace_id
    assert consumer_span.trace_id == root.trace_id and consumer_span.parent_span_id == producer.span_id
    assert by_name["handle-order"].parent_span_id == consumer_span.span_id
    assert producer.resource.get("service.name") == "orders-publisher"
    assert consumer_span.resource.get("service.name") == "orders-consumer"
    assert producer.attributes["messaging.system"] == "rabbitmq"
    assert producer.attributes["messaging.message.id"] == "order-1"
    assert producer.attributes["messaging.message.body.size"] == len(SECRET)
    assert all(SECRET not in repr(s.attributes) and SECRET not in repr(s.events) for s in spans)
