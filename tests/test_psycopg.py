"""psycopg 3 instrumentor: a real PostgreSQL server, sync and asyncio connections and cursors."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Dict

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.psycopg import PsycopgInstrumentor
from tests.support.contract import Contract
from tests.support.services import POSTGRES, POSTGRES_DSN, require

psycopg = pytest.importorskip("psycopg")

SCOPE = "autotrace.instrumentors.psycopg"
CARD = "4111-1111"
SECRET = "SECRET-PARAM-2718"
BASE = {"db.system.name": "postgresql", "db.namespace": "test", "server.address": "127.0.0.1", "server.port": 5432}


def exported_text(spans: Any) -> str:
    parts = []
    for s in spans:
        parts += [s.name, json.dumps(dict(s.attributes), default=str), s.status.description or ""]
        parts += [json.dumps(dict(e.attributes), default=str) for e in s.events]
    return "\n".join(parts)


@pytest.fixture
def table() -> Any:
    require(POSTGRES)
    name = "at_dbapi_" + uuid.uuid4().hex[:10]
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id INT PRIMARY KEY, card TEXT UNIQUE, amount NUMERIC)")
    yield name
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def traced(instrument: Any) -> Any:
    return instrument(PsycopgInstrumentor)


def ours(spans: Any) -> list:
    return [s for s in spans.get() if s.instrumentation_scope.name == SCOPE]


def test_execute_one_client_span_sanitised(table, traced, spans):
    with psycopg.connect(POSTGRES_DSN) as conn:
        spans.clear()  # connecting runs nothing through a cursor
        rows = conn.execute(
            f"SELECT id FROM {table} WHERE card = '{CARD}' AND amount > 4111 AND card <> %s", (SECRET,)
        ).fetchall()
    assert rows == []
    span = spans.one(f"SELECT {table}")
    assert span.kind is SpanKind.CLIENT
    assert dict(span.attributes) == {
        **BASE,
        "db.operation.name": "SELECT",
        "db.collection.name": table,
        "db.query.text": f"SELECT id FROM {table} WHERE card = ? AND amount > ? AND card <> %s",
    }
    assert CARD not in exported_text(spans.get()) and SECRET not in exported_text(spans.get())
    assert "4111" not in exported_text(spans.get()).replace(table, "")


def test_parent_is_the_current_span(table, traced, spans):
    with psycopg.connect(POSTGRES_DSN) as conn:
        with trace.get_tracer("test").start_as_current_span("request") as parent:
            conn.cursor().execute(f"SELECT 1 FROM {table}")
    span = spans.one(f"SELECT {table}")
    assert span.parent.span_id == parent.get_span_context().span_id


def test_executemany_is_one_batch_span(table, traced, spans):
    with psycopg.connect(POSTGRES_DSN) as conn:
        spans.clear()
        conn.cursor().executemany(f"INSERT INTO {table} (id, card) VALUES (%s, %s)", [(1, SECRET), (2, "b"), (3, "c")])
    span = spans.one()  # psycopg's pipelined executemany adds no per-row span
    assert span.name == f"BATCH INSERT {table}"
    assert span.attributes["db.operation.name"] == "BATCH INSERT"
    assert span.attributes["db.operation.batch.size"] == 3
    assert span.attributes["db.query.text"] == f"INSERT INTO {table} (id, card) VALUES (%s, %s)"
    assert SECRET not in exported_text(spans.get())


def test_executemany_of_a_generator_is_not_counted(table, traced, spans):
    with psycopg.connect(POSTGRES_DSN) as conn:
        spans.clear()
        conn.cursor().executemany(f"INSERT INTO {table} (id) VALUES (%s)", ((i,) for i in range(3)))
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (3,)  # the driver got every row
    span = spans.named(f"BATCH INSERT {table}")[0]
    assert "db.operation.batch.size" not in span.attributes


def test_syntax_error_records_sqlstate(traced, spans):
    require(POSTGRES)
    with psycopg.connect(POSTGRES_DSN) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute(f"SELEC '{CARD}'")
    span = spans.one()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["db.response.status_code"] == "42601"
    assert span.attributes["error.type"] == "42601"
    assert CARD not in exported_text([span])


def test_unique_violation_never_exports_the_value(table, traced, spans):
    with psycopg.connect(POSTGRES_DSN) as conn:
        conn.execute(f"INSERT INTO {table} (id, card) VALUES (1, %s)", (SECRET,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {table} (id, card) VALUES (2, %s)", (SECRET,))
    failed = [s for s in ours(spans) if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert failed[0].attributes["db.response.status_code"] == "23505"
    assert SECRET not in exported_text(spans.get())


def test_statement_on_a_closed_connection_is_an_error_span(traced, spans, caplog):
    require(POSTGRES)
    conn = psycopg.connect(POSTGRES_DSN)
    cursor = conn.cursor()
    conn.close()
    with pytest.raises(psycopg.OperationalError):
        cursor.execute("SELECT 1")
    span = spans.one()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["db.system.name"] == "postgresql" and "server.address" not in span.attributes
    assert not [r for r in caplog.records if r.name.startswith("autotrace")]  # not an internal error


def test_named_server_cursor_one_span_for_execute_none_for_fetch(table, traced, spans):
    with psycopg.connect(POSTGRES_DSN) as conn:
        conn.execute(f"INSERT INTO {table} (id) SELECT generate_series(1, 5)")
        spans.clear()
        with conn.cursor(name="at_dbapi_named") as cursor:
            cursor.itersize = 2
            cursor.execute(f"SELECT id FROM {table} ORDER BY id")
            assert [r[0] for r in cursor] == [1, 2, 3, 4, 5]
    assert [s.name for s in ours(spans)] == [f"SELECT {table}"]


def test_stream_span_lasts_until_the_rows_are_read(table, traced, spans):
    with psycopg.connect(POSTGRES_DSN) as conn:
        conn.execute(f"INSERT INTO {table} (id) SELECT generate_series(1, 3)")
        spans.clear()
        rows = conn.cursor().stream(f"SELECT id FROM {table} ORDER BY id")
        assert spans.get() == []  # not ended before the rows come
        assert [r[0] for r in rows] == [1, 2, 3]
    assert spans.one().name == f"SELECT {table}"


def test_stream_failure_is_recorded(traced, spans):
    require(POSTGRES)
    with psycopg.connect(POSTGRES_DSN) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            list(conn.cursor().stream("SELECT * FROM at_dbapi_no_such_table"))
    assert spans.one().attributes["db.response.status_code"] == "42P01"


def test_async_connection_and_cursor(table, traced, spans):
    async def main() -> Any:
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN) as conn:
            await conn.execute(f"INSERT INTO {table} (id, card) VALUES (1, %s)", (SECRET,))
            async with conn.cursor() as cursor:
                await cursor.executemany(f"UPDATE {table} SET amount = %s WHERE id = %s", [(1, 1), (2, 1)])
                await cursor.execute(f"SELECT card FROM {table} WHERE id = %s", (1,))
                row = await cursor.fetchone()
            streamed = [r async for r in conn.cursor().stream(f"SELECT id FROM {table}")]
            async with conn.cursor(name="at_dbapi_async_named") as named:
                await named.execute(f"SELECT id FROM {table}")
                fetched = await named.fetchall()
            with pytest.raises(psycopg.errors.SyntaxError):
                await conn.execute("SELEC 1")
            return row, streamed, fetched

    assert asyncio.run(main()) == ((SECRET,), [(1,)], [(1,)])
    assert [s.name for s in ours(spans)] == [
        f"INSERT {table}", f"BATCH UPDATE {table}", f"SELECT {table}", f"SELECT {table}", f"SELECT {table}", "SELEC",
    ]
    assert ours(spans)[1].attributes["db.operation.batch.size"] == 2
    assert ours(spans)[-1].attributes["db.response.status_code"] == "42601"
    assert SECRET not in exported_text(spans.get())


def test_async_spans_are_children_of_the_awaiting_task(table, traced, spans):
    async def query(n: int) -> None:
        with trace.get_tracer("test").start_as_current_span(f"task{n}"):
            async with await psycopg.AsyncConnection.connect(POSTGRES_DSN) as conn:
                await conn.execute(f"SELECT pg_sleep(0.05), {n} FROM {table}")

    async def main() -> None:
        await asyncio.gather(query(1), query(2))

    asyncio.run(main())
    parents = {s.name: s.context.span_id for s in spans.get() if s.name.startswith("task")}
    children = [s for s in ours(spans)]
    assert sorted(s.parent.span_id for s in children) == sorted(parents.values())


def test_composed_statement_is_sanitised(table, traced, spans):
    from psycopg import sql

    with psycopg.connect(POSTGRES_DSN) as conn:
        spans.clear()
        query = sql.SQL("SELECT {} FROM {} WHERE card = {}").format(sql.Identifier("id"), sql.Identifier(table), sql.Literal(CARD))
        conn.execute(query)
        conn.execute(b"SELECT 1 FROM " + table.encode())
    first, second = ours(spans)
    assert first.attributes["db.query.text"] == f'SELECT "id" FROM "{table}" WHERE card = ?'
    assert second.attributes["db.query.text"] == f"SELECT ? FROM {table}"


def test_raw_query_opt_in(table, monkeypatch, instrument, spans):
    monkeypatch.setenv("AUTOTRACE_SQL_RAW_QUERY", "true")
    instrument(PsycopgInstrumentor)
    with psycopg.connect(POSTGRES_DSN) as conn:
        conn.execute(f"SELECT 1 FROM {table} WHERE card = '{CARD}' AND card <> %s", (SECRET,))
    text = spans.one().attributes["db.query.text"]
    assert text == f"SELECT 1 FROM {table} WHERE card = '{CARD}' AND card <> %s"  # parameters still never


def test_unpatched_nothing(table, spans):
    instrumentor = PsycopgInstrumentor().instrument()
    instrumentor.unpatch()
    with psycopg.connect(POSTGRES_DSN) as conn:
        conn.execute(f"SELECT 1 FROM {table}")
    assert spans.get() == []


# --------------------------------------------------------------------------
# The contract

_lazy: Dict[str, Any] = {}


def _conn() -> Any:
    if "conn" not in _lazy:
        _lazy["conn"] = psycopg.connect(POSTGRES_DSN, autocommit=True)  # before patching: class-level wraps see it
    return _lazy["conn"]


def pg_select() -> Any:
    return _conn().execute("SELECT 1 + %s", (1,)).fetchall()


def pg_executemany() -> Any:
    cursor = _conn().cursor()
    cursor.executemany("SELECT %s", [(1,), (2,)])
    return cursor.rowcount


def pg_stream() -> Any:
    return list(_conn().cursor().stream("SELECT generate_series(1, 3)"))


async def pg_async_select() -> Any:
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN) as conn:
        return await (await conn.execute("SELECT 2")).fetchall()


def pg_syntax_error() -> Any:
    return _conn().execute("SELEC 1")


Contract(
    instrumentor="autotrace.instrumentors.psycopg:PsycopgInstrumentor",
    module="psycopg",
    targets=["psycopg:Cursor.execute", "psycopg:Cursor.executemany", "psycopg:Cursor.stream",
             "psycopg:ServerCursor.execute", "psycopg:AsyncCursor.stream"],
    async_targets=["psycopg:AsyncCursor.execute", "psycopg:AsyncCursor.executemany", "psycopg:AsyncServerCursor.execute"],
    calls=[pg_select, pg_executemany, pg_stream, pg_async_select],
    error_call=pg_syntax_error,
    spans_per_call=1,
    requires=[POSTGRES],
).install(globals())
