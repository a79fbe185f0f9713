"""pika BlockingConnection basic_publish to RabbitMQ 127.0.0.1:5672 (1 producer span per op).

One connection and one channel; the op publishes a 64-byte message through the
default exchange to a queue with the process id in its name (no publisher
confirms, no consumer). The queue is declared here and deleted at the end,
with the messages in it.
"""
import os

import pika

from _common import run

QUEUE = f"autotrace-bench-pika-{os.getpid():07d}"  # fixed length: same size in every run
BODY = b"x" * 64

if __name__ == "__main__":
    params = pika.ConnectionParameters("127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"))
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare(queue=QUEUE)
    try:
        properties = pika.BasicProperties(content_type="application/octet-stream")

        def op(i):
            channel.basic_publish(exchange="", routing_key=QUEUE, body=BODY, properties=properties)

        run("pika_publish", op, 3000)
    finally:
        channel.queue_delete(queue=QUEUE)
        connection.close()
