"""asyncpg instrumentor against a real PostgreSQL (127.0.0.1:5432, db ``test``; tables ``at_asyncpg_*``)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from importlib.metadata import entry_points
from typing import Any, Awaitable, Callable, List

import pytest

asyncpg = pytest.importorskip("asyncpg")

from opentelemetry import trace  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from autotrace.instrumentors.asyncpg import AsyncpgInstrumentor  # noqa: E402
from tests.support.contract import Contract  # noqa: E402
from tests.support.services import POSTGRES, POSTGRES_DSN, require  # noqa: E402

SCOPE = "autotrace.instrumentors.asyncpg"
HAS_FETCHMANY = hasattr(asyncpg.Connection, "fetchmany")  # asyncpg >= 0.30
SOCKET_DIR = "/var/run/postgresql"


@pytest.fixture(autouse=True)
def _postgres() -> None:
    require(POSTGRES)


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(test())


def table() -> str:
    return f"at_asyncpg_{uuid.uuid4().hex[:12]}"


async def connect(**kwargs: Any) -> Any:
    return await asyncpg.connect(POSTGRES_DSN, **kwargs)


async def drop(*tables: str) -> None:
    """Clean up with instrumentation suppressed (no span)."""
    from autotrace.kit import suppressed

    with suppressed():
        conn = await connect()
        try:
            for name in tables:
                await conn.execute(f"DROP TABLE IF EXISTS {name}")
                await conn.execute(f"DROP TYPE IF EXISTS {name}_mood")
        finally:
            await conn.close()


def ours(spans: Any) -> List[Any]:
    return [s for s in spans.get() if s.instrumentation_scope.name == SCOPE]


def exported_text(span: Any) -> str:
    """Everything a span exports as text: name, attributes, status, events."""
    parts = [span.name, json.dumps(dict(span.attributes), default=str), str(span.status.description)]
    parts += [json.dumps(dict(event.attributes), default=str) for event in span.events]
    return "\n".join(parts)


# --------------------------------------------------------------------------
# Attributes


def test_statement_span_attributes(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await connect()
        try:
            return await conn.fetchval("SELECT $1::int + 41", 1)
        finally:
            await conn.close()

    assert run(main) == 42
    span = spans.one()
    assert span.name == "SELECT"
    assert span.kind is SpanKind.CLIENT
    assert span.instrumentation_scope.name == SCOPE
    assert dict(span.attributes) == {
        "db.system.name": "postgresql",
        "db.namespace": "test",
        "server.address": "127.0.0.1",
        "server.port": 5432,
        "db.operation.name": "SELECT",
        "db.query.text": "SELECT $1::int + ?",
    }
    assert span.status.status_code is StatusCode.UNSET


def test_unix_socket_address(spans: Any, instrument: Any) -> None:
    if not os.path.exists(os.path.join(SOCKET_DIR, ".s.PGSQL.5432")):
        pytest.skip("no PostgreSQL Unix socket")
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await asyncpg.connect(host=SOCKET_DIR, user="postgres", database="test")
        try:
            return await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    assert run(main) == 1
    attributes = spans.one().attributes
    assert attributes["server.address"] == os.path.join(SOCKET_DIR, ".s.PGSQL.5432")
    assert attributes["db.namespace"] == "test"


def test_one_span_per_call_of_every_method(spans: Any, instrument: Any) -> None:
    name = table()
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await connect()
        try:
            await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, label text)")
            status = await conn.execute(f"INSERT INTO {name} VALUES ($1, $2)", 1, "one")
            await conn.executemany(f"INSERT INTO {name} VALUES ($1, $2)", [(2, "b"), (3, "c"), (4, "d")])
            if HAS_FETCHMANY:
                insert = f"INSERT INTO {name} VALUES ($1, $2) RETURNING id"
                returned = await conn.fetchmany(insert, [(5, "e"), (6, "f")])
            else:
                await conn.executemany(f"INSERT INTO {name} VALUES ($1, $2)", [(5, "e"), (6, "f")])
                returned = [{"id": 5}, {"id": 6}]
            rows = await conn.fetch(f"SELECT id FROM {name} ORDER BY id")
            row = await conn.fetchrow(f"SELECT label FROM {name} WHERE id = $1", 1)
            count = await conn.fetchval(f"SELECT count(*) FROM {name}")
            return status, [r["id"] for r in returned], [r["id"] for r in rows], row["label"], count
        finally:
            await conn.close()
            await drop(name)

    assert run(main) == ("INSERT 0 1", [5, 6], [1, 2, 3, 4, 5, 6], "one", 6)
    got = [(s.name, s.attributes.get("db.operation.batch.size")) for s in spans.get()]
    assert got == [
        (f"CREATE {name}", None),
        (f"INSERT {name}", None),
        (f"BATCH INSERT {name}", 3),
        (f"BATCH INSERT {name}", 2),
        (f"SELECT {name}", None),
        (f"SELECT {name}", None),
        (f"SELECT {name}", None),
    ]
    batch = spans.get()[2].attributes
    assert batch["db.operation.name"] == "BATCH INSERT"
    assert batch["db.collection.name"] == name
    assert batch["db.query.text"] == f"INSERT INTO {name} VALUES ($1, $2)"


def test_executemany_sizes(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> None:
        conn = await connect()
        try:
            await conn.executemany("SELECT $1::int", [(1,)])  # one set: not a batch
            await conn.executemany("SELECT $1::int", ((i,) for i in range(3)))  # an iterator: size unknown
        finally:
            await conn.close()

    run(main)
    single, unsized = spans.get()
    assert single.name == "SELECT" and "db.operation.batch.size" not in single.attributes
    assert unsized.name == "BATCH SELECT" and "db.operation.batch.size" not in unsized.attributes


def test_literals_and_parameters_never_exported(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await connect()
        try:
            row = await conn.fetchrow(
                "SELECT 'literal-secret' AS a, 4111111111111111 AS b, $1::text AS c", "parameter-secret"
            )
            with pytest.raises(asyncpg.DataError):
                await conn.fetchval("SELECT $1::int", "not-an-int-secret")
            with pytest.raises(asyncpg.InvalidTextRepresentationError):
                await conn.fetchval("SELECT 'cast-secret'::int")
            return tuple(row)
        finally:
            await conn.close()

    assert run(main) == ("literal-secret", 4111111111111111, "parameter-secret")
    assert len(spans.get()) == 3
    assert spans.get()[0].attributes["db.query.text"] == "SELECT ? AS a, ? AS b, $1::text AS c"
    for span in spans.get():
        text = exported_text(span)
        for secret in ("literal-secret", "4111111111111111", "parameter-secret", "cast-secret", "not-an-int"):
            assert secret not in text, (secret, text)


def test_raw_query_setting(spans: Any, instrument: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("AUTOTRACE_SQL_RAW_QUERY", "true")
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await connect()
        try:
            return await conn.fetchval("SELECT 'kept'")
        finally:
            await conn.close()

    assert run(main) == "kept"
    assert spans.one().attributes["db.query.text"] == "SELECT 'kept'"


# --------------------------------------------------------------------------
# Errors, cancellation, timeouts


def test_error_sqlstate_and_scrubbed_message(spans: Any, instrument: Any) -> None:
    name = table()
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await connect()
        try:
            await conn.execute(f"CREATE TABLE {name} (card text PRIMARY KEY)")
            await conn.execute(f"INSERT INTO {name} VALUES ($1)", "4111-card-secret")
            with pytest.raises(asyncpg.UniqueViolationError) as duplicate:
                await conn.execute(f"INSERT INTO {name} VALUES ($1)", "4111-card-secret")
            with pytest.raises(asyncpg.PostgresSyntaxError):
                await conn.fetch("SELEC 1")
            return duplicate.value.sqlstate
        finally:
            await conn.close()
            await drop(name)

    assert run(main) == "23505"
    failed = spans.named(f"INSERT {name}")[1]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["db.response.status_code"] == "23505"
    assert failed.attributes["error.type"] == "23505"
    event = failed.events[0]
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "asyncpg.exceptions.UniqueViolationError"
    assert "4111-card-secret" not in exported_text(failed)
    syntax = spans.get()[-1]
    assert syntax.attributes["db.response.status_code"] == "42601"
    assert syntax.status.status_code is StatusCode.ERROR


def test_cancellation_recorded(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await connect()
        try:
            task = asyncio.ensure_future(conn.fetch("SELECT pg_sleep(5)"))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await conn.fetchval("SELECT 7")  # the connection is still usable
        finally:
            await conn.close()

    started = time.monotonic()
    assert run(main) == 7
    assert time.monotonic() - started < 4
    cancelled, after = spans.get()
    assert cancelled.name == "SELECT"
    assert cancelled.status.status_code is StatusCode.ERROR
    assert cancelled.attributes["error.type"] == "asyncio.CancelledError"
    assert (cancelled.end_time - cancelled.start_time) / 1e9 < 4
    assert after.status.status_code is StatusCode.UNSET


def test_timeout_recorded(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> None:
        conn = await connect()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetch("SELECT pg_sleep(5)", timeout=0.3)
        finally:
            await conn.close()

    run(main)
    span = spans.one()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "TimeoutError"
    assert "db.response.status_code" not in span.attributes


# --------------------------------------------------------------------------
# Prepared statements, cursors, transactions


def test_prepared_statement(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await connect()
        try:
            statement = await conn.prepare("SELECT $1::int * 2 AS doubled")  # no span: not executed yet
            values = [await statement.fetchval(1), (await statement.fetchrow(2))["doubled"]]
            values += [r["doubled"] for r in await statement.fetch(3)]
            if HAS_FETCHMANY:
                values += [r["doubled"] for r in await statement.fetchmany([(4,), (5,)])]
            else:
                await statement.executemany([(4,), (5,)])
                values += [8, 10]
            await statement.executemany([(6,), (7,), (8,)])
            return values
        finally:
            await conn.close()

    assert run(main) == [2, 4, 6, 8, 10]
    got = [(s.name, s.attributes.get("db.operation.batch.size")) for s in spans.get()]
    assert got == [("SELECT", None)] * 3 + [("BATCH SELECT", 2), ("BATCH SELECT", 3)]
    assert {s.attributes["db.query.text"] for s in spans.get()} == {"SELECT $1::int * ? AS doubled"}


def test_cursors_one_span_per_statement(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)
    query = "SELECT g FROM generate_series(1, $1::int) AS g"

    async def main() -> Any:
        conn = await connect()
        try:
            async with conn.transaction():  # BEGIN / COMMIT of a Transaction: no spans
                iterated = [r["g"] async for r in conn.cursor(query, 7, prefetch=2)]
                cursor = await conn.cursor(query, 9)
                fetched = [r["g"] for r in await cursor.fetch(3)]
                await cursor.forward(2)
                fetched.append((await cursor.fetchrow())["g"])
                statement = await conn.prepare(query)
                prepared = [r["g"] async for r in statement.cursor(3)]
            return iterated, fetched, prepared
        finally:
            await conn.close()

    assert run(main) == (list(range(1, 8)), [1, 2, 3, 6], [1, 2, 3])
    assert [s.name for s in spans.get()] == ["SELECT"] * 3
    assert {s.attributes["db.query.text"] for s in spans.get()} == {"SELECT g FROM generate_series(?, $1::int) AS g"}


def test_cursor_errors_recorded(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> None:
        conn = await connect()
        try:
            async with conn.transaction():
                with pytest.raises(asyncpg.UndefinedTableError):
                    await conn.cursor("SELECT * FROM at_asyncpg_no_such_table")  # prepared inside the span
            async with conn.transaction():
                with pytest.raises(asyncpg.DivisionByZeroError):
                    async for _ in conn.cursor("SELECT 1 / (g - 3) FROM generate_series(1, 5) AS g", prefetch=10):
                        pass
        finally:
            await conn.close()

    run(main)
    missing, division = spans.get()
    assert missing.name == "SELECT at_asyncpg_no_such_table"
    assert missing.attributes["db.response.status_code"] == "42P01"
    assert division.attributes["db.response.status_code"] == "22012"
    assert division.status.status_code is StatusCode.ERROR


def test_transactions_quiet_explicit_statements_traced(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        conn = await connect()
        try:
            async with conn.transaction():
                async with conn.transaction():  # a SAVEPOINT
                    first = await conn.fetchval("SELECT 1")
            transaction = conn.transaction()
            await transaction.start()
            await transaction.rollback()
            await conn.execute("BEGIN")  # the program's own statements are traced
            await conn.execute("COMMIT")
            return first
        finally:
            await conn.close()

    assert run(main) == 1
    assert [s.name for s in spans.get()] == ["SELECT", "BEGIN", "COMMIT"]


# --------------------------------------------------------------------------
# No noise


def test_type_introspection_makes_no_span(spans: Any, instrument: Any) -> None:
    name = table()
    instrument(AsyncpgInstrumentor)
    logged: List[str] = []

    async def main() -> Any:
        conn = await connect()
        try:
            await conn.execute(f"CREATE TYPE {name}_mood AS ENUM ('sad', 'happy')")
            spans.clear()
            if not hasattr(conn, "add_query_logger"):  # asyncpg >= 0.29
                pytest.skip("no query logger to prove the introspection ran")
            conn.add_query_logger(lambda record: logged.append(record.query))
            value = await conn.fetchval(f"SELECT 'happy'::{name}_mood")  # first use: asyncpg introspects the type
            await conn.set_type_codec(f"{name}_mood", encoder=str, decoder=str, format="text")  # looks the type up
            await asyncio.sleep(0)  # query loggers are called soon
            return value
        finally:
            await conn.close()
            await drop(name)

    assert run(main) == "happy"
    assert [s.name for s in spans.get()] == ["SELECT"]
    assert len(logged) >= 2, f"asyncpg ran no introspection query: {logged}"  # the test can fail


def test_pool_reset_makes_no_span(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                await conn.execute("SET application_name = 'at_asyncpg_changed'")
            async with pool.acquire() as conn:  # the same connection, reset on release
                name = await conn.fetchval("SHOW application_name")
            value = await pool.fetchval("SELECT 5")
            return name, value
        finally:
            await pool.close()

    name, value = run(main)
    assert name != "at_asyncpg_changed", "the pool did not reset the connection"
    assert value == 5
    assert [s.name for s in spans.get()] == ["SET", "SHOW", "SELECT"]
    assert all(s.attributes["server.port"] == 5432 for s in spans.get())


def test_connect_makes_no_span(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)

    async def main() -> None:
        try:
            conn = await connect(target_session_attrs="read-write")  # may probe the server's state
        except TypeError:  # asyncpg < 0.28
            conn = await connect()
        await conn.close()

    run(main)
    assert spans.get() == []


def test_nested_under_the_programs_span(spans: Any, instrument: Any) -> None:
    instrument(AsyncpgInstrumentor)
    tracer = trace.get_tracer("test")

    async def main() -> None:
        conn = await connect()
        try:
            with tracer.start_as_current_span("handler"):
                await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    run(main)
    parent = spans.one("handler")
    child = spans.one("SELECT")
    assert child.parent.span_id == parent.context.span_id


# --------------------------------------------------------------------------
# No duplicates under SQLAlchemy


def test_sqlalchemy_asyncpg_dialect_one_span_per_statement(spans: Any, instrument: Any) -> None:
    pytest.importorskip("greenlet")
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.ext.asyncio import create_async_engine

    from autotrace.instrumentors.sqlalchemy import SQLAlchemyInstrumentor

    name = table()
    instrument(SQLAlchemyInstrumentor)
    instrument(AsyncpgInstrumentor)

    async def main() -> Any:
        engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:5432/test")
        try:
            async with engine.begin() as conn:
                await conn.execute(sqlalchemy.text(f"CREATE TABLE {name} (id int)"))
            spans.clear()  # the dialect's first-connect queries and the DDL
            async with engine.begin() as conn:
                await conn.execute(sqlalchemy.text(f"INSERT INTO {name} VALUES (:id)"), [{"id": 1}, {"id": 2}])
                total = await conn.scalar(sqlalchemy.text(f"SELECT sum(id) FROM {name} WHERE id > :low"), {"low": 0})
            async with engine.connect() as conn:
                rows = (await conn.execute(sqlalchemy.text(f"SELECT id FROM {name} ORDER BY id"))).all()
                through_sqlalchemy = [(s.name, s.instrumentation_scope.name) for s in spans.get()]
                raw = await conn.get_raw_connection()
                direct = await raw.driver_connection.fetchval("SELECT 3")  # outside SQLAlchemy: traced
            return total, [r[0] for r in rows], direct, through_sqlalchemy
        finally:
            async with engine.begin() as conn:
                await conn.execute(sqlalchemy.text(f"DROP TABLE IF EXISTS {name}"))
            await engine.dispose()

    total, rows, direct, through_sqlalchemy = run(main)
    assert (total, rows, direct) == (3, [1, 2], 3)
    sa = "autotrace.instrumentors.sqlalchemy"
    assert through_sqlalchemy == [
        (f"BATCH INSERT {name}", sa), (f"SELECT {name}", sa), (f"SELECT {name}", sa)
    ], "one statement, one span: asyncpg adds nothing under SQLAlchemy (not even BEGIN / COMMIT)"
    # Of everything asyncpg did -- statements, BEGIN / COMMIT, the ROLLBACK when a connection
    # goes back to SQLAlchemy's pool, the DROP -- only the call made outside SQLAlchemy is its span.
    assert [(s.name, s.attributes["db.query.text"]) for s in ours(spans)] == [("SELECT", "SELECT ?")]


# --------------------------------------------------------------------------
# The contract


async def contract_fetchval() -> Any:
    conn = await connect()
    try:
        return await conn.fetchval("SELECT $1::int + 1", 41)
    finally:
        await conn.close()


async def contract_executemany() -> Any:
    conn = await connect()
    try:
        return await conn.executemany("SELECT $1::int", [(1,), (2,)])
    finally:
        await conn.close()


async def contract_prepared() -> Any:
    conn = await connect()
    try:
        statement = await conn.prepare("SELECT $1::int * 3")
        return await statement.fetchval(3)
    finally:
        await conn.close()


async def contract_cursor() -> Any:
    conn = await connect()
    try:
        async with conn.transaction():
            return [r[0] async for r in conn.cursor("SELECT generate_series(1, 5)", prefetch=2)]
    finally:
        await conn.close()


async def contract_pool() -> Any:
    pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=1)
    try:
        return await pool.fetchval("SELECT 8")
    finally:
        await pool.close()


async def contract_missing_table() -> Any:
    conn = await connect()
    try:
        return await conn.fetch("SELECT * FROM at_asyncpg_no_such_table_contract")
    finally:
        await conn.close()


_contract = Contract(
    instrumentor="autotrace.instrumentors.asyncpg:AsyncpgInstrumentor",
    module="asyncpg",
    targets=[  # asyncpg's connresource.guarded methods: sync, returning the coroutine
        "asyncpg.prepared_stmt:PreparedStatement.executemany",
        *(["asyncpg.prepared_stmt:PreparedStatement.fetchmany"] if HAS_FETCHMANY else []),
        "asyncpg.transaction:Transaction.start",
    ],
    async_targets=[
        *(f"asyncpg.connection:Connection.{m}" for m in ("execute", "fetch", "fetchval", "fetchrow", "executemany")),
        *(["asyncpg.connection:Connection.fetchmany"] if HAS_FETCHMANY else []),
        "asyncpg.prepared_stmt:PreparedStatement._PreparedStatement__bind_execute",
        "asyncpg.cursor:Cursor._init",
        "asyncpg.cursor:BaseCursor._bind_exec",
        "asyncpg.transaction:Transaction._Transaction__commit",
        "asyncpg.transaction:Transaction._Transaction__rollback",
        "asyncpg.pool:PoolConnectionHolder.release",
    ],
    calls=[contract_fetchval, contract_executemany, contract_prepared, contract_cursor, contract_pool],
    error_call=contract_missing_table,
    spans_per_call=1,
    requires=[POSTGRES],
).install(globals())

_lazy_check = _contract.test_patched_lazily_under_autotrace_run


def _lazy_once_registered(self: Any) -> None:
    if not any(ep.name == "asyncpg" for ep in entry_points(group="autotrace.instrumentors")):
        pytest.skip('entry point not registered yet: asyncpg = "autotrace.instrumentors.asyncpg:AsyncpgInstrumentor"')
    _lazy_check(self)


_contract.test_patched_lazily_under_autotrace_run = _lazy_once_registered


# --------------------------------------------------------------------------
# autotrace.db.QUIET (added for this instrumentor; generic)


def test_quiet_wrapper_for_every_kind_of_target() -> None:
    import functools

    from autotrace import db
    from autotrace.instrumentation import wrap
    from autotrace.kit import is_suppressed

    def checked(method: Any) -> Any:  # like asyncpg's connresource.guarded: sync, returning the coroutine
        @functools.wraps(method)
        def check(self: Any, *args: Any) -> Any:
            if args and args[0] == "bad":
                raise ValueError("rejected at the call")
            return method(self, *args)

        return check

    class Driver:
        def sync(self) -> bool:
            return is_suppressed()

        async def coroutine(self) -> bool:
            await asyncio.sleep(0)
            return is_suppressed()

        @checked
        async def guarded(self, value: str = "ok") -> bool:
            await asyncio.sleep(0)
            return is_suppressed()

    names = ("sync", "coroutine", "guarded")
    patches = [wrap(Driver, name, db.QUIET.for_target(Driver.__dict__[name])) for name in names]
    try:
        driver = Driver()
        assert driver.sync() is True
        assert run(driver.coroutine) is True
        assert run(driver.guarded) is True
        with pytest.raises(ValueError):
            driver.guarded("bad")  # raised at the call, as unpatched
        assert is_suppressed() is False
    finally:
        for patch in patches:
            patch.undo()
    assert Driver().sync() is False
