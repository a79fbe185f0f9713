"""Shared timing loop for the workloads: warm up, time N operations, print one JSON line.

N comes from BENCH_N (the runner sets it; --quick scales it down), else the
workload's default; the warm-up is BENCH_WARMUP, else N // 10 (at least 20).
Spans made during the warm-up are exported too: the runner divides the spans it
received by ``ops + warmup`` (reported as ``total_ops``).
"""

import json
import os
import sys
import time


def ops_from_env(default):
    n = int(os.environ.get("BENCH_N") or default)
    warmup = int(os.environ.get("BENCH_WARMUP") or max(20, n // 10))
    return n, warmup


def run(name, op, default_n, extra=None):
    n, warmup = ops_from_env(default_n)
    for i in range(warmup):
        op(i)
    clock = time.perf_counter
    t0 = clock()
    for i in range(n):
        op(i)
    elapsed = clock() - t0
    result = {
        "workload": name,
        "ops": n,
        "warmup": warmup,
        "total_ops": n + warmup,
        "us_per_op": elapsed * 1e6 / n,
        "python": sys.version.split()[0],
    }
    if extra:
        result.update(extra)
    print(json.dumps(result), flush=True)
    return result


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout=20.0):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} did not open in {timeout}s")
