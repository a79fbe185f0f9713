"""sqlite3 instrumentor: traced factories handed to the C driver; aiosqlite's worker thread; real files."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.sqlite3 import Sqlite3Instrumentor
from tests.support.contract import Contract
from tests.test_psycopg import CARD, SECRET, exported_text

SCOPE = "autotrace.instrumentors.sqlite3"


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "shop.db")


@pytest.fixture
def traced(instrument: Any) -> Any:
    return instrument(Sqlite3Instrumentor)


def test_connection_shortcut_and_cursor(path, traced, spans):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE at_dbapi_pay (id INTEGER PRIMARY KEY, card TEXT UNIQUE)")
    cursor = conn.cursor()
    cursor.execute(f"SELECT id FROM at_dbapi_pay WHERE card = '{CARD}' AND id > 4111 AND card <> ?", (SECRET,))
    assert cursor.fetchall() == []
    conn.close()
    create, select = spans.get()
    assert create.name == "CREATE at_dbapi_pay"
    assert select.kind is SpanKind.CLIENT and select.name == "SELECT at_dbapi_pay"
    assert dict(select.attributes) == {
        "db.system.name": "sqlite",
        "db.namespace": path,
        "db.operation.name": "SELECT",
        "db.collection.name": "at_dbapi_pay",
        "db.query.text": "SELECT id FROM at_dbapi_pay WHERE card = ? AND id > ? AND card <> ?",
    }
    assert CARD not in exported_text(spans.get()) and SECRET not in exported_text(spans.get())


def test_in_memory_and_pathlike_namespaces(tmp_path, traced, spans):
    sqlite3.connect(":memory:").execute("SELECT 1")
    sqlite3.connect(tmp_path / "p.db").execute("SELECT 1")
    assert [s.attributes["db.namespace"] for s in spans.get()] == [":memory:", str(tmp_path / "p.db")]


def test_from_import_after_patching_and_dbapi2(path, traced, spans):
    from sqlite3 import connect
    from sqlite3 import dbapi2

    connect(path).execute("SELECT 1")
    dbapi2.connect(path).execute("SELECT 2")
    assert len(spans.get()) == 2


def test_traced_classes_look_like_the_originals(traced):
    conn = sqlite3.connect(":memory:")
    cursor = conn.cursor()
    assert isinstance(conn, sqlite3.Connection) and isinstance(cursor, sqlite3.Cursor)
    assert repr(conn).startswith("<sqlite3.Connection object")
    assert type(cursor).__qualname__ == "Cursor" and type(cursor) is not sqlite3.Cursor


def test_executemany_and_executescript(traced, spans):
    conn = sqlite3.connect(":memory:")
    conn.executescript("CREATE TABLE at_dbapi_t (id INTEGER, card TEXT); CREATE INDEX at_dbapi_i ON at_dbapi_t (id);")
    conn.executemany("INSERT INTO at_dbapi_t VALUES (?, ?)", [(1, SECRET), (2, "b"), (3, "c")])
    conn.cursor().executemany("INSERT INTO at_dbapi_t VALUES (?, ?)", iter([(4, "d"), (5, "e")]))
    conn.executemany("INSERT INTO at_dbapi_t VALUES (?, ?)", [(6, "f")])
    assert conn.execute("SELECT count(*) FROM at_dbapi_t").fetchone() == (6,)
    script, many, iterated, single, _ = spans.get()
    assert script.name == "CREATE at_dbapi_t"
    assert many.name == "BATCH INSERT at_dbapi_t" and many.attributes["db.operation.batch.size"] == 3
    assert iterated.name == "BATCH INSERT at_dbapi_t" and "db.operation.batch.size" not in iterated.attributes
    assert single.name == "INSERT at_dbapi_t"  # one parameter set: not a batch
    assert SECRET not in exported_text(spans.get())


def test_program_factories_are_subclassed(path, traced, spans):
    class MyCursor(sqlite3.Cursor):
        pass

    class MyConnection(sqlite3.Connection):
        def cursor(self, factory: Any = MyCursor) -> Any:
            return super().cursor(factory)

    conn = sqlite3.connect(path, factory=MyConnection)
    assert isinstance(conn, MyConnection)
    cursor = conn.cursor()
    assert isinstance(cursor, MyCursor)
    cursor.execute("SELECT 1")
    conn.execute("SELECT 2")  # the shortcut
    assert [s.attributes["db.query.text"] for s in spans.get()] == ["SELECT ?", "SELECT ?"]


@pytest.mark.filterwarnings("ignore:Passing more than 1 positional argument:DeprecationWarning")  # Python 3.13+
def test_positional_factory(path, traced, spans):
    class MyConnection(sqlite3.Connection):
        pass

    conn = sqlite3.connect(path, 5.0, 0, "DEFERRED", True, MyConnection)
    assert isinstance(conn, MyConnection)
    conn.execute("SELECT 1")
    assert spans.one().attributes["db.namespace"] == path


def test_errors_record_sqlite_codes(traced, spans):
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE at_dbapi_u (card TEXT UNIQUE)")
    with pytest.raises(sqlite3.OperationalError):
        conn.execute(f"SELEC '{CARD}'")
    conn.execute("INSERT INTO at_dbapi_u VALUES (?)", (SECRET,))
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO at_dbapi_u VALUES (?)", (SECRET,))
    _, syntax, _, unique = spans.get()
    assert syntax.status.status_code is StatusCode.ERROR
    assert unique.status.status_code is StatusCode.ERROR
    if sys.version_info >= (3, 11):  # sqlite_errorcode
        assert syntax.attributes["db.response.status_code"] == "1"  # SQLITE_ERROR
        assert unique.attributes["db.response.status_code"] == "2067"  # SQLITE_CONSTRAINT_UNIQUE
    else:
        assert unique.attributes["error.type"] == "sqlite3.IntegrityError"
    assert CARD not in exported_text(spans.get()) and SECRET not in exported_text(spans.get())


def test_nested_statement_spans_are_children(traced, spans):
    conn = sqlite3.connect(":memory:")
    with trace.get_tracer("test").start_as_current_span("request") as parent:
        conn.execute("SELECT 1")
    assert spans.named("SELECT")[0].parent.span_id == parent.get_span_context().span_id


def test_connection_made_before_patching_is_not_traced(instrument, spans):
    conn = sqlite3.connect(":memory:")
    instrument(Sqlite3Instrumentor)
    conn.execute("SELECT 1")
    assert spans.get() == []


def test_unpatch_restores_connect_and_leaves_traced_connections_untraced(spans):
    original = sqlite3.connect
    instrumentor = Sqlite3Instrumentor().instrument()
    conn = sqlite3.connect(":memory:")
    instrumentor.unpatch()
    assert sqlite3.connect is original and sqlite3.dbapi2.connect is original
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert spans.get() == []
    instrumentor.instrument()  # and patching again traces again, with fresh classes
    sqlite3.connect(":memory:").execute("SELECT 1")
    conn.execute("SELECT 2")  # made under the first patching: untraced now
    instrumentor.unpatch()
    assert len(spans.get()) == 1


def test_aiosqlite_statements_are_children_of_the_awaiting_task(path, traced, spans):
    aiosqlite = pytest.importorskip("aiosqlite")

    async def task(n: int) -> Any:
        with trace.get_tracer("test").start_as_current_span(f"task{n}"):
            async with aiosqlite.connect(path) as db:
                async with db.execute("SELECT ?", (n,)) as cursor:
                    return await cursor.fetchone()

    async def main() -> Any:
        return await asyncio.gather(task(1), task(2))

    assert asyncio.run(main()) == [(1,), (2,)]
    tasks = {s.context.span_id for s in spans.get() if s.name.startswith("task")}
    selects = [s for s in spans.get() if s.instrumentation_scope.name == SCOPE]
    assert len(selects) == 2 and {s.parent.span_id for s in selects} == tasks


# --------------------------------------------------------------------------
# The contract: connections are made inside the calls (one made before patching is not traced)


def sqlite_select() -> Any:
    conn = sqlite3.connect(":memory:")
    try:
        return conn.cursor().execute("SELECT 1 + ?", (1,)).fetchall()
    finally:
        conn.close()


def sqlite_shortcut_many() -> Any:
    conn = sqlite3.connect(":memory:")
    try:
        return conn.executemany("SELECT ?", [(1,), (2,)]).rowcount
    finally:
        conn.close()


async def aiosqlite_select() -> Any:
    import aiosqlite

    async with aiosqlite.connect(":memory:") as db:
        async with db.execute("SELECT 3") as cursor:
            return await cursor.fetchall()


def sqlite_missing_table() -> Any:
    conn = sqlite3.connect(":memory:")
    try:
        return conn.execute("SELECT * FROM at_dbapi_no_such_table")
    finally:
        conn.close()


Contract(
    instrumentor="autotrace.instrumentors.sqlite3:Sqlite3Instrumentor",
    module="sqlite3",
    targets=["sqlite3:connect", "sqlite3.dbapi2:connect"],
    async_targets=["aiosqlite.core:Connection._execute"],
    calls=[sqlite_select, sqlite_shortcut_many, aiosqlite_select],
    error_call=sqlite_missing_table,
    spans_per_call=1,
).install(globals())
