"""redis-py GET on 127.0.0.1:6379 db 4 (1 client span per op)."""
import os

import redis

from _common import run

client = redis.Redis(host="127.0.0.1", port=6379, db=4)
key = f"autotrace-bench:get:{os.getpid()}"
client.set(key, b"x" * 64)


def op(i):
    assert client.get(key) is not None


if __name__ == "__main__":
    try:
        run("redis_get", op, 5000)
    finally:
        client.delete(key)
