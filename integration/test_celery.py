"""Celery end to end: real workers and producers under ``autotrace-run``, real brokers.

Each worker gets its own queue (Redis DB 2 or a unique auto-delete RabbitMQ
queue; results in Redis DB 3) and exports OTLP/HTTP to one receiver; the
producer runs as its own ``autotrace-run python -m celery_app.producer``
process. Spans are told apart by ``service.name``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Dict, Iterator, List, Optional

import pytest

from tests.support.processes import run_traced, start_traced
from tests.support.receiver import OTLPReceiver, ReceivedSpan
from tests.support.services import RABBITMQ, REDIS, require

HERE = os.path.dirname(os.path.abspath(__file__))
REDIS_BROKER = "redis://127.0.0.1:6379/2"
RESULTS = "redis://127.0.0.1:6379/3"
AMQP_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
ADD = "celery_app.tasks.add"


class Worker:
    def __init__(self, receiver: OTLPReceiver, broker: str, pool: str, extra: List[str], env: Optional[Dict[str, str]] = None) -> None:
        self.queue = f"autotrace-celery-{uuid.uuid4().hex[:12]}"
        self.service = f"worker-{self.queue}"
        self.broker = broker
        self.receiver = receiver
        self.env = dict(receiver.env())
        self.env.update(
            AUTOTRACE_TEST_BROKER=broker,
            AUTOTRACE_TEST_BACKEND=RESULTS,
            AUTOTRACE_TEST_QUEUE=self.queue,
            OTEL_SERVICE_NAME=self.service,
        )
        self.env.update(env or {})
        args = ["celery", "-A", "celery_app", "worker", "-P", pool, "-Q", self.queue, "-n", f"{self.queue}@%h",
                "--loglevel=INFO", "--without-gossip", *extra]
        if pool in ("prefork", "threads"):
            args += ["-c", "2"]
        self.output: List[str] = []
        self.process = start_traced(args, env=self.env, cwd=HERE)
        for stream in (self.process.stdout, self.process.stderr):
            threading.Thread(target=self._collect, args=(stream,), daemon=True).start()
        self._wait_ready()

    def _collect(self, stream) -> None:
        for line in stream:
            self.output.append(line)

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(" ready." in line for line in self.output):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("celery worker did not start:\n" + "".join(self.output))

    def stop(self) -> None:
        """SIGTERM (warm shutdown: spans are flushed), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except Exception:
            self.process.kill()
            self.process.wait(timeout=5)

    def produce(self, *scenarios: str, service: Optional[str] = None) -> Dict[str, dict]:
        env = dict(self.env, OTEL_SERVICE_NAME=service or f"producer-{self.queue}")
        result = run_traced(["python", "-m", "celery_app.producer", *scenarios], env=env, cwd=HERE, timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr + "".join(self.output)
        outcomes = {}
        for line in result.stdout.splitlines():
            if line.startswith("{"):
                outcome = json.loads(line)
                outcomes[outcome["scenario"]] = outcome
        return outcomes

    @property
    def producer_service(self) -> str:
        return f"producer-{self.queue}"

    def spans(self, service: Optional[str] = None) -> List[ReceivedSpan]:
        wanted = {service} if service else {self.service, self.producer_service}
        return [s for s in list(self.receiver.spans) if s.resource.get("service.name") in wanted]


def by_id(spans: List[ReceivedSpan], kind: str, task_id: str) -> List[ReceivedSpan]:
    return [s for s in spans if s.kind == kind and s.attributes.get("messaging.message.id") == task_id]


def wait_spans(worker: Worker, predicate, timeout: float = 20) -> List[ReceivedSpan]:
    worker.receiver.wait_for(lambda _: predicate(worker.spans()), timeout=timeout)
    return worker.spans()


def one(spans: List[ReceivedSpan], kind: str, task_id: str) -> ReceivedSpan:
    found = by_id(spans, kind, task_id)
    assert len(found) == 1, f"expected one {kind} span for {task_id}, got {[(s.name, s.kind) for s in found]}"
    return found[0]


def assert_child(child: ReceivedSpan, parent: ReceivedSpan) -> None:
    assert child.trace_id == parent.trace_id, (child.name, parent.name)
    assert child.parent_span_id == parent.span_id, (child.name, parent.name)


def assert_no_orphans(worker: Worker) -> None:
    """Every worker span descends from a CONSUMER span, apart from PRODUCER roots."""
    spans = worker.spans()
    index = {s.span_id: s for s in spans}
    for span in worker.spans(worker.service):
        if span.kind in ("CONSUMER", "PRODUCER"):
            continue
        node = span
        while node is not None and node.kind != "CONSUMER":
            node = index.get(node.parent_span_id)
        assert node is not None, f"worker span without a CONSUMER ancestor (broker noise?): {span.kind} {span.name} {span.attributes}"
    for span in worker.spans(worker.service):
        if not span.parent_span_id:
            assert span.kind == "PRODUCER", f"root span in the worker: {span.kind} {span.name}"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def redis_worker(receiver: OTLPReceiver) -> Iterator[Worker]:
    require(REDIS)
    worker = Worker(receiver, REDIS_BROKER, "prefork", [])
    yield worker
    worker.stop()


SCENARIOS = ("simple", "send_task", "failure", "retry", "spawn", "touch", "chain", "group", "chord", "expired", "reject", "beat")


@pytest.fixture(scope="module")
def redis_run(redis_worker: Worker) -> Dict[str, dict]:
    return redis_worker.produce(*SCENARIOS)


def test_publish_and_process_across_processes(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    for scenario in ("simple", "send_task"):
        task_id = redis_run[scenario]["id"]
        spans = wait_spans(redis_worker, lambda s: by_id(s, "CONSUMER", task_id) and by_id(s, "PRODUCER", task_id))
        producer = one(spans, "PRODUCER", task_id)
        consumer = one(spans, "CONSUMER", task_id)
        assert producer.resource["service.name"] == redis_worker.producer_service
        assert consumer.resource["service.name"] == redis_worker.service
        assert producer.name == f"publish {ADD}" and consumer.name == f"process {ADD}"
        assert producer.parent_span_id == ""
        assert_child(consumer, producer)
        for span, operation in ((producer, "send"), (consumer, "process")):
            assert span.attributes["messaging.system"] == "redis"
            assert span.attributes["messaging.operation.type"] == operation
            assert span.attributes["messaging.destination.name"] == redis_worker.queue
            assert span.attributes["celery.task.name"] == ADD
        assert producer.attributes["messaging.operation.name"] == "publish"
        assert consumer.attributes["celery.state"] == "SUCCESS"
        assert consumer.status == "UNSET"
        assert consumer.resource["process.pid"] != redis_worker.process.pid  # ran in a prefork child


def test_failure_is_an_error_with_exception_event(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    task_id = redis_run["failure"]["id"]
    assert redis_run["failure"]["state"] == "FAILURE"
    spans = wait_spans(redis_worker, lambda s: by_id(s, "CONSUMER", task_id))
    consumer = one(spans, "CONSUMER", task_id)
    assert consumer.status == "ERROR"
    assert consumer.attributes["celery.state"] == "FAILURE"
    assert consumer.attributes["error.type"] == "ValueError"
    events = [e for e in consumer.events if e["name"] == "exception"]
    assert events and events[0]["attributes"]["exception.message"] == "boom"


def test_retry_has_its_own_producer_span(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    task_id = redis_run["retry"]["id"]
    assert redis_run["retry"]["result"] == 7
    spans = wait_spans(redis_worker, lambda s: len(by_id(s, "CONSUMER", task_id)) == 2 and len(by_id(s, "PRODUCER", task_id)) == 2)
    first_publish = [p for p in by_id(spans, "PRODUCER", task_id) if not p.parent_span_id]
    retry_publish = [p for p in by_id(spans, "PRODUCER", task_id) if p.parent_span_id]
    assert len(first_publish) == 1 and len(retry_publish) == 1
    attempts = sorted(by_id(spans, "CONSUMER", task_id), key=lambda s: s.start_ns)
    assert_child(attempts[0], first_publish[0])
    assert attempts[0].attributes["celery.state"] == "RETRY"
    assert any(e["name"] == "celery.retry" for e in attempts[0].events)
    assert_child(retry_publish[0], attempts[0])
    assert retry_publish[0].resource["service.name"] == redis_worker.service
    assert retry_publish[0].attributes["celery.retry.count"] == 1
    assert_child(attempts[1], retry_publish[0])
    assert attempts[1].attributes["celery.state"] == "SUCCESS"
    assert attempts[1].attributes["celery.retry.count"] == 1


def test_task_from_task_continues_the_trace(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    task_id = redis_run["spawn"]["id"]

    def ready(spans):
        parents = by_id(spans, "CONSUMER", task_id)
        return parents and [s for s in spans if s.kind == "CONSUMER" and s.name == f"process {ADD}" and s.trace_id == parents[0].trace_id]

    spans = wait_spans(redis_worker, ready)
    parent = one(spans, "CONSUMER", task_id)
    publish = [s for s in spans if s.kind == "PRODUCER" and s.parent_span_id == parent.span_id]
    assert len(publish) == 1 and publish[0].name == f"publish {ADD}"
    child = one(spans, "CONSUMER", publish[0].attributes["messaging.message.id"])
    assert_child(child, publish[0])


def test_task_redis_commands_are_children_of_the_consumer_span(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    task_id = redis_run["touch"]["id"]
    assert redis_run["touch"]["result"] is True
    spans = wait_spans(redis_worker, lambda s: by_id(s, "CONSUMER", task_id))
    consumer = one(spans, "CONSUMER", task_id)
    children = [s for s in spans if s.parent_span_id == consumer.span_id and s.kind == "CLIENT"]
    names = sorted(s.name for s in children)
    assert len(children) == 2 and all(s.attributes.get("db.system.name", s.attributes.get("db.system")) == "redis" for s in children), names


def test_canvas_chain_group_chord(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    chain_run, group_run, chord_run = redis_run["chain"], redis_run["group"], redis_run["chord"]
    assert (chain_run["result"], group_run["result"], chord_run["result"]) == (6, [0, 2, 4], 6)
    ids = [chain_run["first"], chain_run["id"], *group_run["ids"], *chord_run["header"], chord_run["id"]]
    spans = wait_spans(redis_worker, lambda s: all(by_id(s, "CONSUMER", i) and by_id(s, "PRODUCER", i) for i in ids))
    # chain: the first step is published by the producer, the next by the worker, in the same trace
    first_publish, first_run = one(spans, "PRODUCER", chain_run["first"]), one(spans, "CONSUMER", chain_run["first"])
    assert first_publish.parent_span_id == ""
    assert_child(first_run, first_publish)
    second_publish = one(spans, "PRODUCER", chain_run["id"])
    assert_child(second_publish, first_run)
    assert_child(one(spans, "CONSUMER", chain_run["id"]), second_publish)
    # group: one PRODUCER per member
    for member in group_run["ids"]:
        publish = one(spans, "PRODUCER", member)
        assert publish.resource["service.name"] == redis_worker.producer_service
        assert_child(one(spans, "CONSUMER", member), publish)
    # chord: header members from the producer, the body published from a header task's execution
    header_runs = [one(spans, "CONSUMER", member) for member in chord_run["header"]]
    for member, run in zip(chord_run["header"], header_runs):
        assert_child(run, one(spans, "PRODUCER", member))
    body_publish = one(spans, "PRODUCER", chord_run["id"])
    assert body_publish.name == "publish celery_app.tasks.tsum"
    assert body_publish.parent_span_id in {run.span_id for run in header_runs}
    assert_child(one(spans, "CONSUMER", chord_run["id"]), body_publish)


def test_expired_and_rejected_tasks_record_their_state(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    expired_id, rejected_id = redis_run["expired"]["id"], redis_run["reject"]["id"]
    assert redis_run["expired"]["state"] == "REVOKED"
    spans = wait_spans(redis_worker, lambda s: by_id(s, "CONSUMER", expired_id) and by_id(s, "CONSUMER", rejected_id))
    expired = one(spans, "CONSUMER", expired_id)
    assert expired.attributes["celery.state"] == "REVOKED"
    assert expired.attributes["celery.revoked.reason"] == "expired"
    assert_child(expired, one(spans, "PRODUCER", expired_id))
    rejected = one(spans, "CONSUMER", rejected_id)
    assert rejected.attributes["celery.state"] == "REJECTED"
    assert_child(rejected, one(spans, "PRODUCER", rejected_id))


def test_beat_publish_is_a_root_producer_span(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    beat = redis_run["beat"]
    assert beat["result"] == 8
    spans = wait_spans(redis_worker, lambda s: by_id(s, "CONSUMER", beat["id"]))
    publish = one(spans, "PRODUCER", beat["id"])
    assert publish.parent_span_id == "" and publish.trace_id != beat["outer_trace"]
    assert publish.attributes["celery.beat.entry"] == "autotrace-tick"
    assert_child(one(spans, "CONSUMER", beat["id"]), publish)


def test_no_spans_from_broker_or_result_backend_traffic(redis_worker: Worker, redis_run: Dict[str, dict]) -> None:
    ids = [redis_run["simple"]["id"], redis_run["chord"]["id"]]
    wait_spans(redis_worker, lambda s: all(by_id(s, "CONSUMER", i) for i in ids))
    time.sleep(1.5)  # the worker keeps polling the broker meanwhile
    assert_no_orphans(redis_worker)
    # AsyncResult.get(), the result subscription and the broker writes in the producer: nothing but PRODUCER spans
    producer_spans = redis_worker.spans(redis_worker.producer_service)
    others = [(s.kind, s.name) for s in producer_spans if s.kind != "PRODUCER" and s.name != "outer"]
    assert others == []
    # the worker's only CLIENT spans are the touch task's own commands
    clients = [s for s in redis_worker.spans(redis_worker.service) if s.kind == "CLIENT"]
    assert len(clients) == 2, [(s.name, s.parent_span_id) for s in clients]


def test_rabbitmq_broker(receiver: OTLPReceiver) -> None:
    require(RABBITMQ)
    require(REDIS)
    worker = Worker(receiver, AMQP_BROKER, "prefork", [])
    try:
        run = worker.produce("simple", "failure", "spawn", "touch")
        ids = [run[name]["id"] for name in ("simple", "failure", "spawn", "touch")]
        spans = wait_spans(worker, lambda s: all(by_id(s, "CONSUMER", i) for i in ids) and len([x for x in s if x.kind == "CONSUMER"]) >= 5)
        producer, consumer = one(spans, "PRODUCER", ids[0]), one(spans, "CONSUMER", ids[0])
        assert_child(consumer, producer)
        assert producer.attributes["messaging.system"] == consumer.attributes["messaging.system"] == "rabbitmq"
        assert consumer.attributes["messaging.destination.name"] == worker.queue
        assert one(spans, "CONSUMER", ids[1]).status == "ERROR"
        time.sleep(1.0)
        assert_no_orphans(worker)
    finally:
        worker.stop()


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_solo_and_threads_pools(receiver: OTLPReceiver, pool: str) -> None:
    require(REDIS)
    worker = Worker(receiver, REDIS_BROKER, pool, ["--without-mingle"])
    try:
        run = worker.produce("simple", "touch", "spawn")
        ids = [run[name]["id"] for name in ("simple", "touch", "spawn")]
        spans = wait_spans(worker, lambda s: all(by_id(s, "CONSUMER", i) for i in ids) and len([x for x in s if x.kind == "CONSUMER"]) >= 4)
        for task_id in ids:
            assert_child(one(spans, "CONSUMER", task_id), one(spans, "PRODUCER", task_id))
        consumer = one(spans, "CONSUMER", run["touch"]["id"])
        assert consumer.resource["process.pid"] == worker.process.pid or pool == "solo"
        assert len([s for s in spans if s.parent_span_id == consumer.span_id and s.kind == "CLIENT"]) == 2
        time.sleep(1.0)
        assert_no_orphans(worker)
    finally:
        worker.stop()


def test_max_tasks_per_child_loses_no_span(receiver: OTLPReceiver) -> None:
    require(REDIS)
    count = 8
    # A long export delay: only the flush before the child's os._exit can deliver its spans.
    worker = Worker(receiver, REDIS_BROKER, "prefork", ["--max-tasks-per-child", "1", "--without-mingle"],
                    env={"OTEL_BSP_SCHEDULE_DELAY": "60000"})
    try:
        run = worker.produce(f"many:{count}")[f"many:{count}"]
        assert run["result"] == [2 * i for i in range(count)]
        spans = wait_spans(worker, lambda s: all(by_id(s, "CONSUMER", i) for i in run["ids"]), timeout=30)
        pids = set()
        for task_id in run["ids"]:
            consumer = one(spans, "CONSUMER", task_id)
            assert_child(consumer, one(spans, "PRODUCER", task_id))
            pids.add(consumer.resource["process.pid"])
        assert len(pids) == count  # one child per task: each flushed before exiting
    finally:
        worker.stop()


def test_link_only_mode_starts_a_new_trace(receiver: OTLPReceiver) -> None:
    require(REDIS)
    worker = Worker(receiver, REDIS_BROKER, "solo", ["--without-mingle"], env={"AUTOTRACE_CELERY_LINK_ONLY": "true"})
    try:
        task_id = worker.produce("simple")["simple"]["id"]
        spans = wait_spans(worker, lambda s: by_id(s, "CONSUMER", task_id))
        producer, consumer = one(spans, "PRODUCER", task_id), one(spans, "CONSUMER", task_id)
        assert consumer.parent_span_id == "" and consumer.trace_id != producer.trace_id
        assert consumer.links == [{"trace_id": producer.trace_id, "span_id": producer.span_id, "attributes": {}}]
    finally:
        worker.stop()
