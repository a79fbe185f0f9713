"""Redis (redis-py) instrumentor, against the real Redis at 127.0.0.1:6379, database 1.

Keys are prefixed per test run; nothing is flushed. Cluster tests start their
own single-node cluster-mode redis-server on a free loopback port when the
``redis-server`` binary is installed (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Any, Iterator, List

import pytest


from autotrace.instrumentation import is_wrapped, suppressed
from autotrace.instrumentors.redis import RedisInstrumentor
from tests.support.processes import free_port, run_traced
from tests.support.receiver import OTLPReceiver
from tests.support.services import REDIS, in_ci, require

redis = pytest.importorskip("redis")
pytest.importorskip("redis.client")
pytest.importorskip("redis.asyncio.client")  # binds redis.asyncio and redis.asyncio.client

URL = "redis://127.0.0.1:6379/1"


def no_retry(asynchronous: bool = False) -> Any:
    """No retries (redis-py 6+ retries connection errors 3 times with backoff by default)."""
    from redis.backoff import NoBackoff

    if asynchronous:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry
    return Retry(NoBackoff(), 0)
REDIS_VERSION = tuple(int(part) for part in redis.__version__.split(".")[:2])


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique key prefix; every key under it is deleted after the test."""
    require(REDIS)
    value = f"autotrace-test:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(URL)
    try:
        keys = list(client.scan_iter(match=value + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def client(prefix: str) -> Iterator[Any]:
    c = redis.Redis.from_url(URL)
    yield c
    c.close()


def all_text(span: Any) -> str:
    """Every string the span would export (attributes, events, status)."""
    parts: List[str] = [span.name, str(span.status.description or "")]
    parts += [f"{k}={v}" for k, v in span.attributes.items()]
    for event in span.events:
        parts += [f"{k}={v}" for k, v in event.attributes.items()]
    return "\n".join(parts)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def close_async(client: Any) -> None:
    closer = getattr(client, "aclose", None) or client.close
    await closer()


# --------------------------------------------------------------------------
# Sync client


def test_commands_spans_and_attributes(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    secret = "value-" + uuid.uuid4().hex
    assert client.set(prefix + "k", secret) is True
    assert client.get(prefix + "k") == secret.encode()
    assert client.hset(prefix + "h", "field-" + secret, secret) == 1

    assert [s.name for s in spans.get()] == ["SET", "GET", "HSET"]
    set_span = spans.one("SET")
    assert set_span.kind.name == "CLIENT"
    assert dict(set_span.attributes) == {
        "db.system.name": "redis",
        "db.namespace": "1",
        "server.address": "127.0.0.1",
        "server.port": 6379,
        "db.operation.name": "SET",
        "db.query.text": "SET ? ?",
    }
    assert spans.one("GET").attributes["db.query.text"] == "GET ?"
    assert spans.one("HSET").attributes["db.query.text"] == "HSET ? ? ?"
    assert set_span.status.status_code.name == "UNSET"
    for span in spans.get():
        assert secret not in all_text(span)
        assert prefix not in all_text(span)  # keys are not exported either


def test_span_is_parented_and_current(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    from opentelemetry import trace

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        client.get(prefix + "k")
    get = spans.one("GET")
    assert get.parent is not None and get.parent.span_id == outer.get_span_context().span_id
    assert get.context.trace_id == outer.get_span_context().trace_id


def test_lowercase_and_bytes_command_names(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    client.execute_command("set", prefix + "a", "1")
    client.execute_command(b"get", prefix + "a")
    assert [s.name for s in spans.get()] == ["SET", "GET"]
    assert spans.one("GET").attributes["db.query.text"] == "GET ?"


def test_pipeline_is_one_span(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    secret = uuid.uuid4().hex
    with client.pipeline(transaction=False) as pipe:
        pipe.set(prefix + "a", secret).get(prefix + "a").hset(prefix + "h", "f", secret)
        assert pipe.execute() == [True, secret.encode(), 1]
    span = spans.one()
    assert span.name == "PIPELINE"
    attrs = span.attributes
    assert attrs["db.operation.name"] == "PIPELINE"
    assert attrs["db.operation.batch.size"] == 3
    assert attrs["db.query.text"] == "SET ? ?; GET ?; HSET ? ? ?"
    assert attrs["db.namespace"] == "1" and attrs["server.port"] == 6379
    assert secret not in all_text(span)


def test_identical_batch_commands_share_one_query_text(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    with client.pipeline(transaction=False) as pipe:
        for i in range(5):
            pipe.set(f"{prefix}{i}", i)
        pipe.execute()
    span = spans.one("PIPELINE")
    assert span.attributes["db.operation.batch.size"] == 5
    assert span.attributes["db.query.text"] == "SET ? ?"


def test_empty_pipeline_makes_no_span(instrument, spans, client):
    instrument(RedisInstrumentor)
    with client.pipeline() as pipe:
        assert pipe.execute() == []
    assert spans.get() == []


def test_transaction_is_one_multi_span(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    with client.pipeline() as pipe:  # transaction=True by default
        pipe.incr(prefix + "n").incr(prefix + "n")
        assert pipe.execute() == [1, 2]
    span = spans.one()
    assert span.name == "MULTI"
    assert span.attributes["db.operation.name"] == "MULTI"
    assert span.attributes["db.operation.batch.size"] == 2
    assert span.attributes["db.query.text"] == "INCRBY ? ?"


def test_watch_commands_and_transaction(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    client.set(prefix + "w", 10)
    spans.clear()
    with client.pipeline() as pipe:
        pipe.watch(prefix + "w")
        current = int(pipe.get(prefix + "w"))  # immediate execution while watching
        pipe.multi()
        pipe.set(prefix + "w", current + 1)
        pipe.execute()
    assert client.get(prefix + "w") == b"11"
    names = [s.name for s in spans.get()]
    assert names[:3] == ["WATCH", "GET", "MULTI"], names
    assert spans.one("MULTI").attributes["db.query.text"] == "SET ? ?"
    assert spans.named("WATCH")[0].attributes["db.query.text"] == "WATCH ?"
    assert spans.named("WATCH")[0].attributes["server.address"] == "127.0.0.1"


def test_response_error(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    client.set(prefix + "s", "text")
    spans.clear()
    with pytest.raises(redis.ResponseError) as raised:
        client.lpush(prefix + "s", "x")
    assert str(raised.value).startswith("WRONGTYPE")  # unchanged for the caller
    span = spans.one("LPUSH")
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == "redis.exceptions.ResponseError"
    assert span.attributes["db.response.status_code"] == "WRONGTYPE"
    event = span.events[0]
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "redis.exceptions.ResponseError"
    assert "WRONGTYPE" in event.attributes["exception.message"]


def test_err_prefix_status_code(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    client.set(prefix + "s", "text")
    spans.clear()
    with pytest.raises(redis.ResponseError):
        client.incr(prefix + "s")  # ERR value is not an integer
    assert spans.one("INCRBY").attributes["db.response.status_code"] == "ERR"


def test_unknown_command_arguments_not_exported(instrument, spans, client):
    instrument(RedisInstrumentor)
    secret = "secret-" + uuid.uuid4().hex
    with pytest.raises(redis.ResponseError) as raised:
        client.execute_command("NOSUCHCOMMAND", secret)
    span = spans.one("NOSUCHCOMMAND")
    assert span.attributes["db.response.status_code"] == "ERR"
    assert span.attributes["db.query.text"] == "NOSUCHCOMMAND ?"
    assert secret not in all_text(span)
    if secret in str(raised.value):  # the server echoed it: the caller still sees it
        assert "with args beginning with" in str(raised.value)


def test_pipeline_error_is_recorded_without_values(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    secret = "secret-" + uuid.uuid4().hex
    client.set(prefix + "s", "text")
    spans.clear()
    with pytest.raises(redis.ResponseError) as raised:
        with client.pipeline() as pipe:
            pipe.set(prefix + "other", secret).lpush(prefix + "s", secret).execute()
    assert secret in str(raised.value)  # redis-py's annotation, unchanged for the caller
    span = spans.one("MULTI")
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["db.response.status_code"] == "WRONGTYPE"
    assert secret not in all_text(span)
    assert "of pipeline caused error" in span.events[0].attributes["exception.message"]


def test_pipeline_without_raise_on_error_is_ok(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    client.set(prefix + "s", "text")
    spans.clear()
    with client.pipeline(transaction=False) as pipe:
        results = pipe.lpush(prefix + "s", "x").get(prefix + "s").execute(raise_on_error=False)
    assert isinstance(results[0], redis.ResponseError)
    assert spans.one("PIPELINE").status.status_code.name == "UNSET"


def test_connection_error(instrument, spans):
    instrument(RedisInstrumentor)
    port = free_port()  # nothing listens there
    c = redis.Redis(host="127.0.0.1", port=port, db=1, socket_connect_timeout=1, retry=no_retry())
    with pytest.raises(redis.ConnectionError) as raised:
        c.get("k")
    assert type(raised.value) is redis.ConnectionError
    span = spans.one("GET")
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == "redis.exceptions.ConnectionError"
    assert span.attributes["server.port"] == port
    assert "db.response.status_code" not in span.attributes
    c.close()


def test_connection_error_in_pipeline(instrument, spans):
    instrument(RedisInstrumentor)
    c = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=no_retry())
    with pytest.raises(redis.ConnectionError):
        with c.pipeline() as pipe:
            pipe.get("a").get("b").execute()
    span = spans.one("MULTI")
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == "redis.exceptions.ConnectionError"


def test_unix_socket_address(instrument, spans):
    instrument(RedisInstrumentor)
    path = os.path.join(tempfile.mkdtemp(), "missing.sock")
    c = redis.Redis(unix_socket_path=path, db=1, retry=no_retry())
    with pytest.raises(redis.ConnectionError):
        c.ping()
    span = spans.one("PING")
    assert span.attributes["server.address"] == path
    assert span.attributes["network.transport"] == "unix"
    assert "server.port" not in span.attributes


@pytest.mark.parametrize("capture", ["false", "true"])
def test_auth_password_never_exported(instrument, spans, client, monkeypatch, capture):
    monkeypatch.setenv("AUTOTRACE_REDIS_CAPTURE_ARGS", capture)
    instrument(RedisInstrumentor)
    password = "pw-" + uuid.uuid4().hex
    with pytest.raises(redis.RedisError):
        client.execute_command("AUTH", "someone", password)
    with pytest.raises(redis.RedisError):
        client.execute_command("AUTH", password)
    with pytest.raises(redis.RedisError):
        client.execute_command("HELLO", "3", "AUTH", "someone", password)
    found = spans.get()
    assert [s.name for s in found] == ["AUTH", "AUTH", "HELLO"]
    assert found[0].attributes["db.query.text"] == "AUTH ? ?"
    for span in found:
        assert span.status.status_code.name == "ERROR"
        assert password not in all_text(span), all_text(span)


def test_config_set_arguments_never_exported(instrument, spans, client, monkeypatch):
    monkeypatch.setenv("AUTOTRACE_REDIS_CAPTURE_ARGS", "true")
    instrument(RedisInstrumentor)
    secret = "pw-" + uuid.uuid4().hex
    with pytest.raises(redis.ResponseError):
        client.config_set("no-such-parameter-" + secret, secret)
    span = spans.one("CONFIG SET")
    assert span.attributes["db.query.text"] == "CONFIG SET ? ?"
    assert secret not in all_text(span)


def test_capture_args_opt_in(instrument, spans, client, prefix, monkeypatch):
    monkeypatch.setenv("AUTOTRACE_REDIS_CAPTURE_ARGS", "true")
    instrument(RedisInstrumentor)
    client.set(prefix + "k", b"v\xff")
    with client.pipeline(transaction=False) as pipe:
        pipe.get(prefix + "k").get(prefix + "z").execute()
    assert spans.one("SET").attributes["db.query.text"] == f"SET {prefix}k v\ufffd"
    assert spans.one("PIPELINE").attributes["db.query.text"] == f"GET {prefix}k; GET {prefix}z"


def test_captured_args_are_truncated(instrument, spans, client, prefix, monkeypatch):
    monkeypatch.setenv("AUTOTRACE_REDIS_CAPTURE_ARGS", "true")
    instrument(RedisInstrumentor)
    client.set(prefix + "big", b"x" * 200_000)
    text = spans.one("SET").attributes["db.query.text"]
    assert text.startswith(f"SET {prefix}big xxx") and text.endswith("...")
    assert len(text) <= 1024 + 3


def test_long_argument_lists_are_capped(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    client.delete(*[f"{prefix}{i}" for i in range(200)])
    text = spans.one("DEL").attributes["db.query.text"]
    assert text.startswith("DEL ? ?") and text.endswith(" ...")
    assert text.count("?") == 64


def test_suppressed_makes_no_span(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    with suppressed():
        client.set(prefix + "k", "v")
        with client.pipeline() as pipe:
            pipe.get(prefix + "k").get(prefix + "k").execute()
    assert spans.get() == []
    client.get(prefix + "k")
    assert [s.name for s in spans.get()] == ["GET"]


def test_database_dup(instrument, spans, client, prefix, monkeypatch):
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "database/dup")
    instrument(RedisInstrumentor)
    client.set(prefix + "k", "v")
    with client.pipeline() as pipe:
        pipe.get(prefix + "k").get(prefix + "k").execute()
    attrs = spans.one("SET").attributes
    assert attrs["db.system"] == "redis" and attrs["db.system.name"] == "redis"
    assert attrs["db.statement"] == "SET ? ?" == attrs["db.query.text"]
    assert attrs["db.redis.database_index"] == 1
    assert attrs["net.peer.name"] == "127.0.0.1"
    assert attrs["net.peer.port"] == 6379
    assert spans.one("MULTI").attributes["db.statement"] == "GET ?"


def test_no_dup_attributes_by_default(instrument, spans, client, prefix):
    instrument(RedisInstrumentor)
    client.get(prefix + "k")
    attrs = spans.one("GET").attributes
    for old in ("db.system", "db.statement", "db.redis.database_index", "net.peer.name", "net.peer.port"):
        assert old not in attrs


def test_unpatch_restores_originals(spans, client, prefix):
    originals = {
        (redis.client.Redis, "execute_command"): redis.client.Redis.__dict__["execute_command"],
        (redis.client.Pipeline, "execute"): redis.client.Pipeline.__dict__["execute"],
        (redis.client.Pipeline, "immediate_execute_command"): redis.client.Pipeline.__dict__["immediate_execute_command"],
        (redis.asyncio.client.Redis, "execute_command"): redis.asyncio.client.Redis.__dict__["execute_command"],
        (redis.asyncio.client.Pipeline, "execute"): redis.asyncio.client.Pipeline.__dict__["execute"],
    }
    instrumentor = RedisInstrumentor().instrument()
    try:
        for cls, name in originals:
            assert is_wrapped(cls, name), (cls, name)
        client.get(prefix + "k")
        assert len(spans.get()) == 1
    finally:
        instrumentor.unpatch()
    for (cls, name), original in originals.items():
        assert cls.__dict__[name] is original
    spans.clear()
    client.get(prefix + "k")
    with client.pipeline() as pipe:
        pipe.get(prefix + "k").execute()
    assert spans.get() == []
    instrumentor.unpatch()  # twice is harmless


def test_patching_twice_makes_one_span(instrument, spans, client, prefix):
    instrumentor = instrument(RedisInstrumentor)
    instrumentor.patch_module("redis.client", redis.client)
    client.get(prefix + "k")
    assert len(spans.get()) == 1


def test_internal_error_never_breaks_the_call(instrument, spans, client, prefix, monkeypatch):
    from autotrace.instrumentors import redis as module

    instrument(RedisInstrumentor)

    def broken(*args, **kwargs):
        raise RuntimeError("instrumentation bug")

    monkeypatch.setattr(module, "_command_attributes", broken)  # a fault we cannot make for real
    client.set(prefix + "k", "v")
    assert client.get(prefix + "k") == b"v"
    assert spans.get() == []


# --------------------------------------------------------------------------
# asyncio


def test_async_commands(instrument, spans, prefix):
    instrument(RedisInstrumentor)

    async def main() -> Any:
        c = redis.asyncio.Redis.from_url(URL)
        try:
            await c.set(prefix + "k", "v")
            return await c.get(prefix + "k")
        finally:
            await close_async(c)

    assert run(main()) == b"v"
    assert [s.name for s in spans.get()] == ["SET", "GET"]
    attrs = spans.one("GET").attributes
    assert attrs["db.namespace"] == "1" and attrs["server.address"] == "127.0.0.1"
    assert attrs["db.query.text"] == "GET ?"


def test_async_span_covers_the_await_not_the_coroutine_creation(instrument, spans, prefix):
    instrument(RedisInstrumentor)

    async def main() -> int:
        c = redis.asyncio.Redis.from_url(URL)
        try:
            await c.ping()  # connect first
            pending = c.get(prefix + "k")  # coroutine created, nothing sent yet
            await asyncio.sleep(0.2)
            before_await = time.time_ns()
            await pending
            return before_await
        finally:
            await close_async(c)

    before_await = run(main())
    span = spans.one("GET")
    assert span.start_time >= before_await
    assert span.end_time - span.start_time < 150_000_000


def test_async_pipeline_and_transaction(instrument, spans, prefix):
    instrument(RedisInstrumentor)

    async def main() -> Any:
        c = redis.asyncio.Redis.from_url(URL)
        try:
            async with c.pipeline(transaction=False) as pipe:
                pipe.set(prefix + "a", 1).get(prefix + "a")
                first = await pipe.execute()
            async with c.pipeline() as pipe:
                pipe.incr(prefix + "n").incr(prefix + "n").incr(prefix + "n")
                second = await pipe.execute()
            return first, second
        finally:
            await close_async(c)

    assert run(main()) == ([True, b"1"], [1, 2, 3])
    assert [s.name for s in spans.get()] == ["PIPELINE", "MULTI"]
    assert spans.one("PIPELINE").attributes["db.query.text"] == "SET ? ?; GET ?"
    assert spans.one("MULTI").attributes["db.operation.batch.size"] == 3


def test_async_watch(instrument, spans, prefix):
    instrument(RedisInstrumentor)

    async def main() -> None:
        c = redis.asyncio.Redis.from_url(URL)
        try:
            async with c.pipeline() as pipe:
                await pipe.watch(prefix + "w")
                await pipe.get(prefix + "w")
                pipe.multi()
                pipe.set(prefix + "w", 1)
                await pipe.execute()
        finally:
            await close_async(c)

    run(main())
    assert [s.name for s in spans.get()][:3] == ["WATCH", "GET", "MULTI"]


def test_async_cancellation(instrument, spans, prefix):
    instrument(RedisInstrumentor)

    async def main() -> None:
        c = redis.asyncio.Redis.from_url(URL)
        try:
            task = asyncio.ensure_future(c.blpop([prefix + "empty"], timeout=5))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await close_async(c)

    started = time.monotonic()
    run(main())
    assert time.monotonic() - started < 4
    span = spans.one("BLPOP")
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == "asyncio.CancelledError"
    assert span.end_time - span.start_time >= 150_000_000  # the span covered the wait


def test_async_response_error_and_suppression(instrument, spans, prefix):
    instrument(RedisInstrumentor)

    async def main() -> None:
        c = redis.asyncio.Redis.from_url(URL)
        try:
            await c.set(prefix + "s", "x")
            with pytest.raises(redis.ResponseError):
                await c.lpush(prefix + "s", "y")
            with suppressed():
                await c.get(prefix + "s")
        finally:
            await close_async(c)

    run(main())
    assert [s.name for s in spans.get()] == ["SET", "LPUSH"]
    assert spans.one("LPUSH").attributes["db.response.status_code"] == "WRONGTYPE"


def test_async_connection_error(instrument, spans):
    instrument(RedisInstrumentor)

    async def main() -> None:
        c = redis.asyncio.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=no_retry(True))
        try:
            with pytest.raises(redis.ConnectionError):
                await c.get("k")
        finally:
            await close_async(c)

    run(main())
    span = spans.one("GET")
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"].startswith("redis.exceptions.")


def test_async_wrappers_stay_coroutine_functions(instrument):
    import inspect

    instrument(RedisInstrumentor)
    assert inspect.iscoroutinefunction(redis.asyncio.client.Redis.execute_command)
    assert inspect.iscoroutinefunction(redis.asyncio.client.Pipeline.execute)


# --------------------------------------------------------------------------
# Cluster (a real single-node cluster-mode server started for these tests)


def _cluster_node_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free and valid too."""
    import socket

    for _ in range(50):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    pytest.skip("no free port pair for a cluster-mode redis-server")


def _start_cluster_node(server: str, workdir: str) -> Any:
    """Start a one-node cluster owning every slot; ``(process, port)`` or ``None`` if it exited."""
    port = _cluster_node_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", os.path.join(workdir, f"nodes-{port}.conf"), "--dir", workdir,
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    admin = redis.Redis(host="127.0.0.1", port=port)
    try:
        while process.poll() is None and time.monotonic() < deadline:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        if process.poll() is not None:
            return None  # e.g. the bus port was taken meanwhile: try another port
        admin.execute_command("CLUSTER ADDSLOTS", *range(16384))
        while process.poll() is None and time.monotonic() < deadline:
            info = admin.execute_command("CLUSTER INFO")  # parsed into a dict by redis-py
            state = info.get("cluster_state") if isinstance(info, dict) else info
            if state in ("ok", b"ok") or (isinstance(state, bytes) and b"cluster_state:ok" in state):
                return process, port
            time.sleep(0.05)
    except redis.ConnectionError:
        pass
    finally:
        admin.close()
    _stop_process(process)
    return None


def _stop_process(process: Any) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def cluster_port() -> Iterator[int]:
    server = shutil.which("redis-server")
    if server is None:
        message = "redis-server binary not installed: no cluster-mode server to start"
        if in_ci():
            pytest.fail(message + " (CI=true: a missing service is a failure)", pytrace=False)
        pytest.skip(message)
    workdir = tempfile.mkdtemp(prefix="autotrace-redis-cluster-")
    try:
        for _ in range(3):
            started = _start_cluster_node(server, workdir)
            if started is not None:
                break
        else:
            pytest.fail("could not start a cluster-mode redis-server")
        process, port = started
        try:
            yield port
        finally:
            _stop_process(process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_cluster_classes_are_wrapped(instrument):
    pytest.importorskip("redis.cluster")  # redis-py >= 4.1
    pytest.importorskip("redis.asyncio.cluster")  # redis-py >= 4.3
    instrument(RedisInstrumentor)
    assert is_wrapped(redis.cluster.RedisCluster, "execute_command")
    assert is_wrapped(redis.cluster.ClusterPipeline, "execute")
    assert is_wrapped(redis.asyncio.cluster.RedisCluster, "execute_command")
    assert is_wrapped(redis.asyncio.cluster.ClusterPipeline, "execute")


def test_cluster_client_against_a_non_cluster_server_fails_as_before(instrument):
    require(REDIS)

    def attempt() -> type:
        try:
            redis.cluster.RedisCluster(host="127.0.0.1", port=6379)
        except Exception as exc:  # what redis-py raises untraced
            return type(exc)
        return type(None)

    untraced = attempt()
    instrument(RedisInstrumentor)
    assert attempt() is untraced


def test_cluster_commands_and_pipeline(instrument, spans, cluster_port):
    instrument(RedisInstrumentor)
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster_port)
    try:
        spans.clear()
        secret = uuid.uuid4().hex
        assert rc.set("{at}k", secret) is True
        assert rc.get("{at}k") == secret.encode()
        pipe = rc.pipeline()
        pipe.set("{at}a", 1)
        pipe.get("{at}a")
        assert pipe.execute() == [True, b"1"]
    finally:
        rc.close()
    names = [s.name for s in spans.get()]
    assert names[:2] == ["SET", "GET"] and "PIPELINE" in names, names
    get = spans.named("GET")[0]
    assert get.attributes["db.system.name"] == "redis"
    assert get.attributes["db.namespace"] == "0"
    assert get.attributes["db.query.text"] == "GET ?"
    pipeline = spans.one("PIPELINE")
    assert pipeline.attributes["db.operation.batch.size"] == 2
    assert pipeline.attributes["db.query.text"] == "SET ? ?; GET ?"
    for span in spans.get():
        assert secret not in all_text(span)


def test_async_cluster_commands_and_pipeline(instrument, spans, cluster_port):
    pytest.importorskip("redis.asyncio.cluster")  # redis-py >= 4.3
    instrument(RedisInstrumentor)

    async def main() -> Any:
        rc = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster_port)
        try:
            await rc.initialize()
            spans.clear()
            await rc.set("{at}k", "v")
            value = await rc.get("{at}k")
            pipe = rc.pipeline()
            pipe.set("{at}a", 2)
            pipe.get("{at}a")
            return value, await pipe.execute()
        finally:
            await close_async(rc)

    assert run(main()) == (b"v", [True, b"2"])
    names = [s.name for s in spans.get()]
    assert names[:2] == ["SET", "GET"] and "PIPELINE" in names, names
    assert spans.one("PIPELINE").attributes["db.query.text"] == "SET ? ?; GET ?"


# --------------------------------------------------------------------------
# Zero-code: the agent patches redis lazily on import


def test_agent_patches_redis_on_import(prefix, tmp_path):
    script = tmp_path / "app.py"
    script.write_text(
        "import asyncio, redis, redis.asyncio\n"
        f"r = redis.Redis.from_url({URL!r})\n"
        f"r.set({prefix + 'agent'!r}, 'hidden-value')\n"
        "with r.pipeline() as p:\n"
        f"    p.get({prefix + 'agent'!r}).get({prefix + 'agent'!r}).execute()\n"
        "async def main():\n"
        f"    a = redis.asyncio.Redis.from_url({URL!r})\n"
        f"    await a.get({prefix + 'agent'!r})\n"
        "    await (getattr(a, 'aclose', None) or a.close)()\n"
        "asyncio.run(main())\n"
    )
    with OTLPReceiver() as receiver:
        env = dict(receiver.env(), OTEL_SERVICE_NAME="redis-app")
        result = run_traced(["python", str(script)], env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        spans = receiver.wait_for(lambda found: len([s for s in found if s.name in ("SET", "GET", "MULTI")]) >= 3)
    by_name = {s.name: s for s in spans}
    assert by_name["SET"].kind.endswith("CLIENT")
    assert by_name["SET"].attributes["db.query.text"] == "SET ? ?"
    assert by_name["MULTI"].attributes["db.operation.batch.size"] == 2
    assert all("hidden-value" not in str(s.attributes) for s in spans)
