"""redis-py SET on 127.0.0.1:6379 db 4 (1 client span per op)."""
import os

import redis

from _common import run

client = redis.Redis(host="127.0.0.1", port=6379, db=4)
key = f"autotrace-bench:set:{os.getpid()}"
value = b"x" * 64


def op(i):
    client.set(key, value)


if __name__ == "__main__":
    try:
        run("redis_set", op, 5000)
    finally:
        client.delete(key)
