"""Celery publish only: apply_async to a Redis broker (db 5), no worker.

Per op: the PRODUCER span, plus whatever Redis client spans the broker's
commands produce under each launcher. The queue is unique to the process and
deleted at the end.
"""
import os

import redis
from celery import Celery

from _common import run

BROKER = "redis://127.0.0.1:6379/5"
app = Celery("bench_publish", broker=BROKER)
QUEUE = f"autotrace-bench-publish-{os.getpid()}"


@app.task(name="bench.add")
def add(x, y):
    return x + y


def op(i):
    add.apply_async((i, 1), queue=QUEUE)


if __name__ == "__main__":
    try:
        run("celery_publish", op, 2000)
    finally:
        client = redis.Redis.from_url(BROKER)
        client.delete(QUEUE)
        for key in client.scan_iter(f"*{QUEUE}*"):
            client.delete(key)
