"""A small Celery app for the autotrace Celery tests (workers run it under autotrace-run).

Configured from the environment so that each test worker gets its own broker
and queue: ``AUTOTRACE_TEST_BROKER`` (default Redis DB 2),
``AUTOTRACE_TEST_BACKEND`` (default Redis DB 3), ``AUTOTRACE_TEST_QUEUE``.
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue


BROKER = os.environ.get("AUTOTRACE_TEST_BROKER", "redis://127.0.0.1:6379/2")
BACKEND = os.environ.get("AUTOTRACE_TEST_BACKEND", "redis://127.0.0.1:6379/3")
QUEUE = os.environ.get("AUTOTRACE_TEST_QUEUE", "autotrace-celery-default")

app = Celery("celery_app", broker=BROKER, backend=BACKEND, include=["celery_app.tasks"])
app.conf.update(
    task_default_queue=QUEUE,
    # auto_delete: no queue is left behind on the shared RabbitMQ.
    task_queues=[Queue(QUEUE, routing_key=QUEUE, auto_delete=True)],
    result_expires=300,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
)
