"""autotrace/dbapi.py, the DB-API layer under the five drivers; and no duplicate span under SQLAlchemy.

The generic parts run against a small pure-Python driver defined here (the
objects a real driver would not give: connections without attributes, a
cursor whose executemany calls its own execute); everything else against the
real drivers and servers.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import uuid
from typing import Any, Iterator, List

import pytest
from opentelemetry.trace import StatusCode

from autotrace import dbapi
from autotrace.dbapi import DbApiInstrumentor, statement_text
from autotrace.instrumentors.mysqldb import MySQLdbInstrumentor
from autotrace.instrumentors.psycopg import PsycopgInstrumentor
from autotrace.instrumentors.psycopg2 import Psycopg2Instrumentor
from autotrace.instrumentors.pymysql import PyMySQLInstrumentor
from autotrace.instrumentors.sqlalchemy import SQLAlchemyInstrumentor
from autotrace.instrumentors.sqlite3 import Sqlite3Instrumentor
from tests.support.services import POSTGRES, require
from tests.test_mysql import MARIADB
from tests.test_psycopg import CARD, SECRET, exported_text

# --------------------------------------------------------------------------
# A pure-Python driver


class FakeError(Exception):
    sqlstate = "42P01"


class Connection:
    """Takes attributes; ``facts`` counts how often its facts are read."""

    def __init__(self, database: str = "shop") -> None:
        self.database = database


class SlotConnection:
    __slots__ = ("database", "__weakref__")

    def __init__(self, database: str = "slots") -> None:
        self.database = database


class BareConnection:
    """Neither attributes nor weak references."""

    __slots__ = ("database",)

    def __init__(self) -> None:
        self.database = "bare"


class Cursor:
    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.seen: List[Any] = []

    def execute(self, query: Any, params: Any = None) -> str:
        if query == "SELECT * FROM missing":
            raise FakeError("relation missing does not exist")
        self.seen.append(params)
        return "executed"

    def executemany(self, query: Any, param_sets: Any) -> int:
        return sum(1 for params in param_sets if self.execute(query, params))  # nested execute: no second span

    def callproc(self, procname: str, args: Any = ()) -> Any:
        self.execute(f"CALL {procname}()")
        return args

    def stream(self, query: Any) -> Iterator[int]:
        yield from (1, 2, 3)


class FakeInstrumentor(DbApiInstrumentor):
    name = "fake"
    modules = (__name__,)
    facts_read = 0

    def facts(self, connection: Any) -> dbapi.Facts:
        FakeInstrumentor.facts_read += 1
        return "postgresql", connection.database, "db.internal", None

    def patch_module(self, module_name: str, module: Any) -> None:
        for method in ("execute", "executemany", "callproc", "stream"):
            self.wrap(module, "Cursor." + method, getattr(self.cursor_spans, method))


@pytest.fixture
def fake(instrument: Any) -> Any:
    FakeInstrumentor.facts_read = 0
    return instrument(FakeInstrumentor)


def test_statement_span_and_cache_per_connection(fake, spans):
    conn = Connection()
    for _ in range(3):
        assert Cursor(conn).execute(f"SELECT * FROM orders WHERE card = '{CARD}' AND id = %s", (SECRET,)) == "executed"
    assert FakeInstrumentor.facts_read == 1  # the connection's cache is reused
    first, *_ = spans.get()
    assert len(spans.get()) == 3
    assert dict(first.attributes) == {
        "db.system.name": "postgresql",
        "db.namespace": "shop",
        "server.address": "db.internal",
        "server.port": 5432,
        "db.operation.name": "SELECT",
        "db.collection.name": "orders",
        "db.query.text": "SELECT * FROM orders WHERE card = ? AND id = %s",
    }
    Cursor(Connection("other")).execute("SELECT 1")
    assert spans.get()[-1].attributes["db.namespace"] == "other" and FakeInstrumentor.facts_read == 2


def test_connections_without_attributes(fake, spans):
    slots = SlotConnection()
    for conn in (slots, slots, BareConnection(), BareConnection()):
        Cursor(conn).execute("SELECT 1")
    assert [s.attributes["db.namespace"] for s in spans.get()] == ["slots", "slots", "bare", "bare"]
    assert FakeInstrumentor.facts_read == 3  # the slotted one cached (weakly), the bare ones each time


def test_closed_cursor_makes_no_span(fake, spans):
    cursor = Cursor(None)
    assert cursor.execute("SELECT 1") == "executed"
    assert spans.get() == []


def test_executemany_nested_execute_is_one_span(fake, spans):
    cursor = Cursor(Connection())
    assert cursor.executemany("INSERT INTO t VALUES (%s)", [(SECRET,), (2,), (3,)]) == 3
    assert cursor.executemany("INSERT INTO t VALUES (%s)", [(1,)]) == 1
    assert cursor.executemany("INSERT INTO t VALUES (%s)", iter([(1,), (2,)])) == 2
    assert cursor.executemany(query="INSERT INTO t VALUES (%s)", param_sets=[(1,), (2,)]) == 2
    batch, single, iterated, named = spans.get()
    assert batch.name == "BATCH INSERT t" and batch.attributes["db.operation.batch.size"] == 3
    assert single.name == "INSERT t" and "db.operation.batch.size" not in single.attributes
    assert iterated.name == "BATCH INSERT t" and "db.operation.batch.size" not in iterated.attributes
    assert named.name == "BATCH INSERT t"  # the keyword names drivers use are read too
    assert SECRET not in exported_text(spans.get())


def test_callproc(fake, spans):
    assert Cursor(Connection()).callproc("refund", (SECRET,)) == (SECRET,)
    span = spans.one()
    assert span.name == "CALL refund"
    assert span.attributes["db.stored_procedure.name"] == "refund"
    assert SECRET not in exported_text([span])


def test_error_policy(fake, spans):
    with pytest.raises(FakeError):
        Cursor(Connection()).execute("SELECT * FROM missing")
    span = spans.one()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["db.response.status_code"] == "42P01" and span.attributes["error.type"] == "42P01"


def test_stream_ends_on_exhaustion_and_when_dropped(fake, spans):
    cursor = Cursor(Connection())
    rows = cursor.stream("SELECT n FROM numbers")
    assert spans.get() == []
    assert list(rows) == [1, 2, 3]
    assert len(spans.get()) == 1
    dropped = cursor.stream("SELECT n FROM numbers")
    assert next(dropped) == 1
    del dropped
    gc.collect()
    assert len(spans.get()) == 2


def test_settings_are_read_again_after_repatching(monkeypatch, spans):
    conn = Connection()
    instrumentor = FakeInstrumentor().instrument()
    Cursor(conn).execute(f"SELECT '{CARD}'")
    instrumentor.unpatch()
    monkeypatch.setenv("AUTOTRACE_SQL_RAW_QUERY", "true")
    instrumentor.instrument()
    Cursor(conn).execute(f"SELECT '{CARD}'")
    instrumentor.unpatch()
    assert [s.attributes["db.query.text"] for s in spans.get()] == ["SELECT ?", f"SELECT '{CARD}'"]


def test_statement_text():
    class Composed:
        def __init__(self, fail: bool = False) -> None:
            self.fail = fail

        def as_string(self, context: Any) -> Any:
            if self.fail:
                raise RuntimeError("closed")
            return b"SELECT 1"

    class Secretive:
        def __str__(self) -> str:
            return SECRET

    assert statement_text("SELECT 1", None) == "SELECT 1"
    assert statement_text(b"SELECT \xff", None) == "SELECT \ufffd"
    assert statement_text(bytearray(b"SELECT 2"), None) == "SELECT 2"
    assert statement_text(memoryview(b"SELECT 3"), None) == "SELECT 3"
    assert statement_text(Composed(), None) == "SELECT 1"
    assert statement_text(Composed(fail=True), None) == ""
    assert statement_text(Secretive(), None) == ""  # never str() of an unknown object


def test_unknown_statement_object_gives_a_span_without_text(fake, spans):
    class Template:
        strings = ("SELECT ", "")

    Cursor(Connection()).execute(Template())
    span = spans.one()
    assert span.name == "postgresql" and "db.query.text" not in span.attributes


def test_traced_class_puts_the_shim_under_the_programs_overrides(instrument):
    instrumentor = instrument(Sqlite3Instrumentor)

    class Mine(sqlite3.Cursor):
        """My cursor."""

    traced = instrumentor.traced_class(Mine, sqlite3.Cursor, {})
    assert traced.__mro__[1] is Mine and traced.__mro__[3] is sqlite3.Cursor
    assert (traced.__name__, traced.__qualname__, traced.__module__, traced.__doc__) == (
        "Mine", Mine.__qualname__, __name__, "My cursor.")
    assert instrumentor.traced_class(Mine, sqlite3.Cursor, {}) is traced  # made once
    assert instrumentor.traced_class(traced, sqlite3.Cursor, {}) is traced  # ours already
    assert instrumentor.traced_class(lambda conn: None, sqlite3.Cursor, {}) is None  # not a class
    assert instrumentor.traced_class(dict, sqlite3.Cursor, {}) is None  # not the driver's


def test_traced_class_refused_subclassing_gives_none(instrument):
    instrumentor = instrument(Sqlite3Instrumentor)

    class Final(sqlite3.Cursor):
        def __init_subclass__(cls, **kwargs: Any) -> None:
            raise TypeError("final")

    assert instrumentor.traced_class(Final, sqlite3.Cursor, {}) is None
    conn = sqlite3.connect(":memory:")
    assert type(conn.cursor(Final)) is Final  # the program's class, used as it is


def test_installed_distribution():
    assert dbapi.installed("no-such-distribution-at-dbapi", "pytest") == "pytest"
    assert dbapi.installed("no-such-distribution-at-dbapi") == "no-such-distribution-at-dbapi"
    assert Psycopg2Instrumentor().distribution in ("psycopg2", "psycopg2-binary")


def test_mysql_system():
    assert dbapi.mysql_system("10.11.6-MariaDB-0+deb12u1") == "mariadb"
    assert dbapi.mysql_system("5.5.5-10.11.6-MariaDB") == "mariadb"
    assert dbapi.mysql_system("8.0.36") == "mysql"
    assert dbapi.mysql_system(None) == "mysql"


# --------------------------------------------------------------------------
# Under SQLAlchemy: one span per statement, whatever the driver

_ALL = (PsycopgInstrumentor, Psycopg2Instrumentor, Sqlite3Instrumentor, PyMySQLInstrumentor, MySQLdbInstrumentor)
URLS = {
    "psycopg": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "psycopg2": "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
    "pymysql": "mysql+pymysql://root@127.0.0.1:3306/test",
    "MySQLdb": "mysql+mysqldb://root@127.0.0.1:3306/test",
    "sqlite3": None,  # a file per test
}
SERVICES = {"psycopg": POSTGRES, "psycopg2": POSTGRES, "pymysql": MARIADB, "MySQLdb": MARIADB}


@pytest.fixture(params=sorted(URLS))
def engine(request, tmp_path, instrument) -> Any:
    """``engine(pool_pre_ping=...)`` over one driver, every DB-API instrumentor and SQLAlchemy's patched."""
    sa = pytest.importorskip("sqlalchemy")
    if request.param in SERVICES:
        require(SERVICES[request.param])
    pytest.importorskip(request.param)
    for cls in _ALL + (SQLAlchemyInstrumentor,):
        instrument(cls)
    made = []

    def make(**options: Any) -> Any:
        made.append(sa.create_engine(URLS[request.param] or f"sqlite:///{tmp_path / 'sa.db'}", **options))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


def _scopes(spans: Any) -> List[str]:
    return [s.instrumentation_scope.name.rsplit(".", 1)[-1] for s in spans.get()]


def test_sqlalchemy_statement_is_one_span(engine, spans):
    import sqlalchemy as sa

    engine = engine()
    table = "at_dbapi_" + uuid.uuid4().hex[:10]
    with engine.begin() as conn:  # the engine's first connection and its set-up
        conn.execute(sa.text(f"CREATE TABLE {table} (id INT, card VARCHAR(40))"))
    spans.clear()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"SELECT id FROM {table} WHERE card = '{CARD}' OR card = :c"), {"c": SECRET}).all()
            conn.execute(sa.text(f"INSERT INTO {table} (id, card) VALUES (:i, :c)"), [{"i": 1, "c": SECRET}, {"i": 2, "c": "b"}])
        assert _scopes(spans) == ["sqlalchemy", "sqlalchemy"], [s.name for s in spans.get()]
        assert CARD not in exported_text(spans.get()) and SECRET not in exported_text(spans.get())
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {table}"))


def test_sqlalchemy_connection_set_up_makes_no_span(engine, spans):
    import sqlalchemy as sa

    engine = engine(pool_pre_ping=True)
    with engine.connect() as conn:  # first connect: dialect initialisation and on-connect hooks
        conn.execute(sa.text("SELECT 1")).all()
    with engine.connect() as conn:  # checkout: pre-ping
        conn.execute(sa.text("SELECT 2")).all()
    assert _scopes(spans) == ["sqlalchemy", "sqlalchemy"], [s.name for s in spans.get()]


def test_sqlalchemy_aiosqlite_is_one_span(tmp_path, instrument, spans):
    pytest.importorskip("aiosqlite")
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    instrument(Sqlite3Instrumentor)
    instrument(SQLAlchemyInstrumentor)

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        spans.clear()
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 2"))
        await engine.dispose()

    asyncio.run(main())
    assert [s.instrumentation_scope.name for s in spans.get()] == ["autotrace.instrumentors.sqlalchemy"]
