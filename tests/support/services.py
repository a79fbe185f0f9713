"""Real services the tests talk to, and the skip-or-fail rule.

A test that needs a service skips with a clear reason when it is absent on a
developer's machine; under ``CI=true`` a missing service is a failure.
"""

from __future__ import annotations

import os
import socket

import pytest

REDIS = ("127.0.0.1", 6379, "Redis")
POSTGRES = ("127.0.0.1", 5432, "PostgreSQL")
RABBITMQ = ("127.0.0.1", 5672, "RabbitMQ")
MARIADB = ("127.0.0.1", 3306, "MariaDB")

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(service: tuple) -> None:
    host, port, name = service
    if reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if in_ci():
        pytest.fail(message + " (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(message)
