"""Tasks used by the Celery tests."""

from __future__ import annotations

import os

import redis

from celery_app import app

_redis = None


def _client() -> "redis.Redis":
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ.get("AUTOTRACE_TEST_BACKEND", "redis://127.0.0.1:6379/3"))
    return _redis


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(values):
    return sum(values)


@app.task
def fail(message="boom"):
    raise ValueError(message)


@app.task(bind=True, max_retries=3)
def retry_once(self, value):
    if self.request.retries < 1:
        raise self.retry(exc=RuntimeError("transient"), countdown=0)
    return value


@app.task
def spawn(x):
    """A task that publishes another task (same trace)."""
    add.delay(x, 1)
    return x


@app.task
def touch(key):
    """The task's own Redis commands are traced as children of its CONSUMER span."""
    client = _client()
    client.set(key, "1", ex=60)
    return client.get(key) is not None


@app.task
def reject():
    from celery.exceptions import Reject

    raise Reject("not wanted", requeue=False)
