"""Celery round trip: apply_async + a worker executes + result.get(), broker and backend Redis db 5.

The worker is a child process (``celery worker -P solo``) started with
``sys.executable`` and this process's environment, so it runs under the same
launcher (both autotrace-run and opentelemetry-instrument put their bootstrap on
PYTHONPATH, which the child inherits). Its spans carry the same service.name and
are counted with the parent's. It is stopped with SIGTERM (warm shutdown, so it
flushes its spans at exit) before this process exits.
"""
import os
import signal
import subprocess
import sys
import time

from celery import Celery

from _common import run

BROKER = "redis://127.0.0.1:6379/5"
QUEUE = os.environ.get("BENCH_CELERY_QUEUE") or f"autotrace-bench-rt-{os.getpid()}"
app = Celery("celery_roundtrip", broker=BROKER, backend=BROKER)
app.conf.update(result_expires=120, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@app.task(name="bench.rt_add")
def add(x, y):
    return x + y


def start_worker():
    env = dict(os.environ, BENCH_CELERY_QUEUE=QUEUE)
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-m", "celery", "-A", "celery_roundtrip", "worker", "-P", "solo",
               "-Q", QUEUE, "-l", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat",
               "-n", f"bench-{os.getpid()}@localhost"]
    return subprocess.Popen(command, cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_worker(worker):
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    err = worker.stderr.read().decode(errors="replace") if worker.stderr else ""
    worker.stderr and worker.stderr.close()
    return err


TASK_IDS = []


def cleanup():
    import redis

    client = redis.Redis.from_url(BROKER)
    client.delete(QUEUE)
    for key in client.scan_iter(f"*{QUEUE}*"):
        client.delete(key)
    for start in range(0, len(TASK_IDS), 500):  # the results (they would expire after result_expires anyway)
        client.delete(*[f"celery-task-meta-{t}" for t in TASK_IDS[start : start + 500]])


def op(i):
    result = add.apply_async((i, 1), queue=QUEUE)
    TASK_IDS.append(result.id)
    assert result.get(timeout=30) == i + 1


if __name__ == "__main__":
    worker = start_worker()
    try:
        t0 = time.perf_counter()
        # first call waits for the worker to come up (not timed)
        first = add.apply_async((1, 1), queue=QUEUE)
        TASK_IDS.append(first.id)
        assert first.get(timeout=120) == 2
        ready_s = time.perf_counter() - t0
        run("celery_roundtrip", op, 500, extra={"worker_ready_s": round(ready_s, 3), "setup_ops": 1})
    finally:
        err = stop_worker(worker)
        cleanup()
    if worker.returncode not in (0, -signal.SIGTERM):
        sys.stderr.write(f"worker exited with {worker.returncode}:\n{err}\n")
