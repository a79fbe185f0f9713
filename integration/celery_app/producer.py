"""Publishes the test scenarios; run as ``autotrace-run python -m celery_app.producer NAME...``.

Prints one JSON line per scenario: ``{"scenario": NAME, ...ids and results}``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import timedelta

from celery import chain, chord, group
from celery.result import AsyncResult

from celery_app import app
from celery_app.tasks import add, fail, reject, retry_once, spawn, touch, tsum

TIMEOUT = 20


def wait_state(result: AsyncResult, states, timeout: float = TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result.state in states:
            return result.state
        time.sleep(0.05)
    return result.state


def scenario(name: str) -> dict:
    if name == "simple":
        r = add.delay(2, 3)
        return {"id": r.id, "result": r.get(timeout=TIMEOUT)}
    if name == "send_task":
        r = app.send_task("celery_app.tasks.add", (1, 1))
        return {"id": r.id, "result": r.get(timeout=TIMEOUT)}
    if name == "failure":
        r = fail.delay("boom")
        r.get(timeout=TIMEOUT, propagate=False)
        return {"id": r.id, "state": r.state}
    if name == "retry":
        r = retry_once.delay(7)
        return {"id": r.id, "result": r.get(timeout=TIMEOUT)}
    if name == "spawn":
        r = spawn.delay(5)
        return {"id": r.id, "result": r.get(timeout=TIMEOUT)}
    if name == "touch":
        key = f"autotrace:celery:{uuid.uuid4().hex}"
        r = touch.delay(key)
        return {"id": r.id, "result": r.get(timeout=TIMEOUT)}
    if name == "chain":
        r = chain(add.s(1, 2), add.s(3)).apply_async()
        return {"id": r.id, "first": r.parent.id, "result": r.get(timeout=TIMEOUT)}
    if name == "group":
        r = group(add.s(i, i) for i in range(3)).apply_async()
        return {"ids": [c.id for c in r.results], "result": r.get(timeout=TIMEOUT)}
    if name == "chord":
        r = chord([add.s(1, 1), add.s(2, 2)], tsum.s()).apply_async()
        header = [c.id for c in r.parent.results] if r.parent is not None else []
        return {"id": r.id, "header": header, "result": r.get(timeout=TIMEOUT)}
    if name == "expired":
        r = add.apply_async((1, 1), countdown=1, expires=0.3)
        return {"id": r.id, "state": wait_state(r, ("REVOKED",))}
    if name == "reject":
        r = reject.delay()
        time.sleep(0.5)
        return {"id": r.id}
    if name == "beat":
        from celery.beat import ScheduleEntry, Scheduler
        from opentelemetry import trace

        scheduler = Scheduler(app, lazy=True)
        entry = ScheduleEntry(name="autotrace-tick", task="celery_app.tasks.add", args=(4, 4),
                              schedule=timedelta(seconds=1), app=app)
        scheduler.schedule[entry.name] = entry
        with trace.get_tracer("producer").start_as_current_span("outer") as outer:
            r = scheduler.apply_async(entry, producer=None, advance=False)
            outer_trace = format(outer.get_span_context().trace_id, "032x")
        return {"id": r.id, "outer_trace": outer_trace, "result": r.get(timeout=TIMEOUT)}
    if name.startswith("many:"):
        count = int(name.split(":", 1)[1])
        results = [add.delay(i, i) for i in range(count)]
        return {"ids": [r.id for r in results], "result": [r.get(timeout=TIMEOUT) for r in results]}
    raise SystemExit(f"unknown scenario {name}")


def main() -> None:
    for name in sys.argv[1:]:
        outcome = scenario(name)
        outcome["scenario"] = name
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
