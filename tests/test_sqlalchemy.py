"""SQLAlchemy instrumentor: real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import uuid

import sys

import pytest
import sqlalchemy as sa
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentation import SUPPRESS_INSTRUMENTATION_KEY
from autotrace.instrumentors.sqlalchemy import SQLAlchemyInstrumentor, db_system
from tests.support.services import POSTGRES, POSTGRES_DSN, require

SECRET = "4111111111111111"
SA_MAJOR = tuple(int(p) for p in sa.__version__.split(".")[:2])


def _table() -> str:
    return "at_" + uuid.uuid4().hex[:10]


def _all_attribute_text(spans) -> str:
    parts = []
    for s in spans:
        parts.append(s.name)
        parts.append(json.dumps(dict(s.attributes), default=str))
        parts.append(s.status.description or "")
        for ev in s.events:
            parts.append(json.dumps(dict(ev.attributes), default=str))
    return "\n".join(parts)


def _db_spans(spans):
    return [s for s in spans.get() if s.instrumentation_scope.name == "autotrace.instrumentors.sqlalchemy"]


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'app.db'}"


def _pg_engine(driver: str):
    require(POSTGRES)
    if driver == "psycopg" and SA_MAJOR < (2, 0):
        pytest.skip("the psycopg (3) dialect is SQLAlchemy 2.0+")
    pytest.importorskip({"psycopg2": "psycopg2", "psycopg": "psycopg"}[driver])
    return sa.create_engine(POSTGRES_DSN.replace("postgresql://", f"postgresql+{driver}://"))


# --------------------------------------------------------------------------
# Engines from everywhere


def test_engine_created_before_patching_is_traced(sqlite_url, instrument, spans):
    engine = sa.create_engine(sqlite_url)  # before patching, module-level create_engine
    with engine.connect() as conn:  # a connection opened before patching too
        instrument(SQLAlchemyInstrumentor)
        conn.exec_driver_sql("CREATE TABLE payments (id INTEGER PRIMARY KEY, card TEXT)")
        conn.exec_driver_sql("SELECT id FROM payments WHERE id = 1").all()
    span = spans.one("SELECT payments")
    assert span.kind is SpanKind.CLIENT
    attrs = span.attributes
    assert attrs["db.system.name"] == "sqlite"
    assert attrs["db.operation.name"] == "SELECT"
    assert attrs["db.collection.name"] == "payments"
    assert attrs["db.query.text"] == "SELECT id FROM payments WHERE id = ?"
    assert attrs["db.namespace"].endswith("app.db")
    assert "server.address" not in attrs
    assert "db.statement" not in attrs and "db.system" not in attrs  # no old names by default
    assert spans.named("CREATE payments")
    engine.dispose()


def test_engine_from_config_and_option_engine(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.engine_from_config({"db.url": sqlite_url}, prefix="db.")
    opt = engine.execution_options(isolation_level="AUTOCOMMIT")
    with opt.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert spans.one("SELECT").attributes["db.query.text"] == "SELECT ?"
    engine.dispose()


def test_span_is_current_and_instrumentation_suppressed_during_the_driver_call(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    seen = {}

    def look():
        seen["span"] = trace.get_current_span()
        seen["suppressed"] = otel_context.get_value(SUPPRESS_INSTRUMENTATION_KEY)

    # Dialect hooks run exactly where the driver call would.
    @sa.event.listens_for(engine, "do_execute_no_params")
    def peek_no_params(cursor, statement, context):
        look()

    @sa.event.listens_for(engine, "do_execute")
    def peek(cursor, statement, parameters, context):
        look()

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("parent") as parent:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        assert trace.get_current_span() is parent  # context restored
    db = spans.one("SELECT")
    assert seen["span"].get_span_context().span_id == db.context.span_id
    assert seen["suppressed"] is True
    assert db.parent.span_id == parent.get_span_context().span_id
    engine.dispose()


def test_already_suppressed_context_makes_no_span(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    token = otel_context.attach(otel_context.set_value(SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 7").scalar() == 7
    finally:
        otel_context.detach(token)
    assert _db_spans(spans) == []
    engine.dispose()


def test_orm_session(sqlite_url, instrument, spans):
    from sqlalchemy.orm import Session, declarative_base

    Base = declarative_base()

    class Payment(Base):
        __tablename__ = "payments"
        id = sa.Column(sa.Integer, primary_key=True)
        card = sa.Column(sa.String(32))

    engine = sa.create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    instrument(SQLAlchemyInstrumentor)
    with Session(engine) as session:
        session.add(Payment(id=1, card=SECRET))
        session.commit()
        found = session.query(Payment).filter(Payment.card == SECRET).one()
        assert found.id == 1
    names = [s.name for s in _db_spans(spans)]
    assert "INSERT payments" in names and "SELECT payments" in names
    # Transactions and checkouts make no spans of their own.
    assert all(n in ("INSERT payments", "SELECT payments") for n in names), names
    assert SECRET not in _all_attribute_text(spans.get())
    engine.dispose()


def test_async_engine_aiosqlite(tmp_path, instrument, spans):
    pytest.importorskip("aiosqlite")
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import create_async_engine

    instrument(SQLAlchemyInstrumentor)
    tracer = trace.get_tracer("test")

    async def main():
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
        with tracer.start_as_current_span("handler"):
            async with engine.begin() as conn:
                await conn.execute(sa.text("CREATE TABLE items (id INTEGER PRIMARY KEY)"))
                await conn.execute(sa.text("INSERT INTO items (id) VALUES (:id)"), [{"id": 1}, {"id": 2}, {"id": 3}])
                rows = (await conn.execute(sa.text("SELECT id FROM items WHERE id > 1"))).all()
        await engine.dispose()
        return rows

    assert len(asyncio.run(main())) == 2
    handler = spans.one("handler")
    select = spans.one("SELECT items")
    assert select.parent.span_id == handler.context.span_id
    batch = spans.one("BATCH INSERT items")
    assert batch.attributes["db.operation.batch.size"] == 3


def test_async_engine_asyncpg(instrument, spans):
    require(POSTGRES)
    pytest.importorskip("asyncpg")
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import create_async_engine

    instrument(SQLAlchemyInstrumentor)
    table = _table()

    async def main():
        engine = create_async_engine(POSTGRES_DSN.replace("postgresql://", "postgresql+asyncpg://"))
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text(f"CREATE TABLE {table} (id int PRIMARY KEY)"))
                await conn.execute(sa.text(f"INSERT INTO {table} (id) VALUES (1)"))
            async with engine.begin() as conn:
                with pytest.raises(sa.exc.IntegrityError):
                    await conn.execute(sa.text(f"INSERT INTO {table} (id) VALUES (1)"))
        finally:
            async with engine.begin() as conn:
                await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
            await engine.dispose()

    asyncio.run(main())
    inserts = spans.named(f"INSERT {table}")
    assert len(inserts) == 2
    failed = [s for s in inserts if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert failed[0].attributes["db.response.status_code"] == "23505"
    assert failed[0].attributes["server.address"] == "127.0.0.1"


# --------------------------------------------------------------------------
# Statements


def test_executemany_is_one_span_with_batch_size(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    meta = sa.MetaData()
    items = sa.Table("items", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.String))
    meta.create_all(engine)
    spans.clear()
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"id": i, "v": "x"} for i in range(5)])
        conn.execute(items.insert(), [{"id": 99, "v": "one"}])  # one parameter set: not a batch
    batch = spans.one("BATCH INSERT items")
    assert batch.attributes["db.operation.batch.size"] == 5
    assert batch.attributes["db.operation.name"] == "BATCH INSERT"
    single = spans.one("INSERT items")
    assert "db.operation.batch.size" not in single.attributes
    engine.dispose()


@pytest.mark.skipif(SA_MAJOR < (2, 0), reason="insertmanyvalues is SQLAlchemy 2.0+")
def test_insertmanyvalues_pages_count_their_rows(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url, insertmanyvalues_page_size=4)
    meta = sa.MetaData()
    items = sa.Table("items", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.String))
    meta.create_all(engine)
    spans.clear()
    with engine.begin() as conn:
        ids = conn.execute(items.insert().returning(items.c.id), [{"id": i, "v": SECRET} for i in range(10)]).all()
    assert len(ids) == 10
    sizes = sorted(s.attributes["db.operation.batch.size"] for s in spans.named("BATCH INSERT items"))
    assert sizes == [2, 4, 4]
    assert SECRET not in _all_attribute_text(spans.get())
    engine.dispose()


def test_failing_statement_sqlite(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        with pytest.raises(sa.exc.OperationalError) as info:
            conn.exec_driver_sql("SELECT * FROM missing_table")
    # The caller's exception is SQLAlchemy's own, unchanged, chained to the driver's.
    assert type(info.value) is sa.exc.OperationalError
    import sqlite3

    assert isinstance(info.value.orig, sqlite3.OperationalError)
    span = spans.one("SELECT missing_table")
    assert span.status.status_code is StatusCode.ERROR
    if sys.version_info >= (3, 11):  # sqlite3 errors carry their code from Python 3.11 on
        assert span.attributes["db.response.status_code"] == "1"
        assert span.attributes["error.type"] == "1"
    else:
        assert span.attributes["error.type"] == "sqlite3.OperationalError"
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "sqlite3.OperationalError"
    assert "no such table" in event.attributes["exception.message"]
    engine.dispose()


def test_statement_after_a_failure_gets_a_fresh_span(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        with engine.connect() as conn:
            with pytest.raises(sa.exc.DBAPIError):
                conn.exec_driver_sql("SELEC broken")
            assert trace.get_current_span() is outer  # context restored after the error
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 2")
    ok = spans.one("SELECT")
    assert ok.status.status_code is StatusCode.UNSET
    assert ok.parent.span_id == outer.get_span_context().span_id
    engine.dispose()


# --------------------------------------------------------------------------
# Privacy, raw switch, truncation


def test_literals_never_reach_spans(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE cards (id INTEGER PRIMARY KEY, number TEXT UNIQUE)")
        conn.exec_driver_sql(f"INSERT INTO cards VALUES (1, '{SECRET}')")
        conn.execute(sa.text("SELECT * FROM cards WHERE number = :n"), {"n": SECRET})  # bound: never recorded
        conn.exec_driver_sql(f"SELECT * FROM cards WHERE number IN ('{SECRET}', '1', '2') AND id = {SECRET}")
        with pytest.raises(sa.exc.IntegrityError):
            conn.exec_driver_sql(f"INSERT INTO cards VALUES (2, '{SECRET}')")
    text = _all_attribute_text(spans.get())
    assert SECRET not in text
    assert "SELECT * FROM cards WHERE number IN (?) AND id = ?" in text


def test_postgres_error_message_is_scrubbed(instrument, spans):
    engine = _pg_engine("psycopg2")
    instrument(SQLAlchemyInstrumentor)
    table = _table()
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {table} (id int PRIMARY KEY, n bigint)")
        with engine.connect() as conn:
            with pytest.raises(sa.exc.DataError):
                conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1, '{SECRET}x')")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        engine.dispose()
    span = spans.one(f"INSERT {table}")
    assert span.attributes["db.response.status_code"] == "22P02"
    assert SECRET not in _all_attribute_text(spans.get())


def test_raw_query_switch(sqlite_url, instrument, spans, monkeypatch):
    monkeypatch.setenv("AUTOTRACE_SQL_RAW_QUERY", "true")
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 'visible' AS v, 42")
    assert spans.one("SELECT").attributes["db.query.text"] == "SELECT 'visible' AS v, 42"
    engine.dispose()


def test_truncation(sqlite_url, instrument, spans, monkeypatch):
    monkeypatch.setenv("AUTOTRACE_SQL_MAX_LENGTH", "40")
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    columns = ", ".join(f"c{i}" for i in range(50))
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT {columns} FROM (SELECT {', '.join(f'{i} AS c{i}' for i in range(50))}) AS sub")
    text = spans.one().attributes["db.query.text"]
    assert len(text) == 40 and text.startswith("SELECT c0, c1")
    engine.dispose()


def test_default_truncation_limit(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    long_sql = "SELECT " + ", ".join(f"{i} AS col_{i}" for i in range(600))
    with engine.connect() as conn:
        conn.exec_driver_sql(long_sql)
    assert len(spans.one().attributes["db.query.text"]) == 2048
    engine.dispose()


# --------------------------------------------------------------------------
# PostgreSQL drivers, names, dup


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_postgresql_drivers(driver, instrument, spans):
    engine = _pg_engine(driver)
    instrument(SQLAlchemyInstrumentor)
    table = _table()
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {table} (id int PRIMARY KEY, card text)")
            conn.execute(sa.text(f"INSERT INTO {table} (id, card) VALUES (:id, :card)"), {"id": 1, "card": SECRET})
            conn.execute(sa.text(f"SELECT card FROM {table} WHERE id = :id"), {"id": 1}).all()
        with engine.connect() as conn:
            with pytest.raises(sa.exc.IntegrityError) as info:
                conn.execute(sa.text(f"INSERT INTO {table} (id, card) VALUES (:id, :card)"), {"id": 1, "card": SECRET})
            assert type(info.value) is sa.exc.IntegrityError
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        engine.dispose()
    select = spans.one(f"SELECT {table}")
    attrs = select.attributes
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["db.namespace"] == "test"
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == 5432
    assert attrs["db.query.text"] == f"SELECT card FROM {table} WHERE id = %(id)s"
    failed = [s for s in spans.named(f"INSERT {table}") if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert failed[0].attributes["db.response.status_code"] == "23505"
    assert failed[0].attributes["error.type"] == "23505"
    assert failed[0].events[0].name == "exception"
    assert SECRET not in _all_attribute_text(spans.get())


def test_database_dup_adds_old_names(instrument, spans, monkeypatch):
    engine = _pg_engine("psycopg2")
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "database/dup")
    instrument(SQLAlchemyInstrumentor)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    engine.dispose()
    attrs = [s for s in spans.named("SELECT") if s.attributes.get("db.query.text") == "SELECT ?"][0].attributes
    assert attrs["db.system"] == "postgresql" and attrs["db.system.name"] == "postgresql"
    assert attrs["db.statement"] == "SELECT ?"
    assert attrs["db.name"] == "test"
    assert attrs["net.peer.name"] == "127.0.0.1"
    assert attrs["net.peer.port"] == 5432


def test_dialect_names_map_to_db_system_name():
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    assert db_system(postgresql.dialect()) == "postgresql"
    assert db_system(sqlite.dialect()) == "sqlite"
    assert db_system(mysql.dialect()) == "mysql"
    maria = mysql.dialect()
    maria.is_mariadb = True  # what SQLAlchemy sets once it has read the server version
    assert db_system(maria) == "mariadb"
    from sqlalchemy.dialects import mssql, oracle

    assert db_system(mssql.dialect()) == "microsoft.sql_server"
    assert db_system(oracle.dialect()) == "oracle.db"


def test_span_name_falls_back_to_operation_then_system(sqlite_url, instrument, spans):
    instrument(SQLAlchemyInstrumentor)
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        conn.exec_driver_sql("/* nothing */ ;")
    names = [s.name for s in _db_spans(spans)]
    assert names == ["SELECT", "sqlite"]
    engine.dispose()


# --------------------------------------------------------------------------
# Unpatch


def test_unpatch_removes_the_listeners(sqlite_url, spans):
    from sqlalchemy.engine import Engine

    inst = SQLAlchemyInstrumentor().instrument()
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert len(_db_spans(spans)) == 1
    before = inst._listeners[0][2]
    assert sa.event.contains(Engine, "before_cursor_execute", before)
    inst.unpatch()
    inst.unpatch()  # twice is fine
    assert not sa.event.contains(Engine, "before_cursor_execute", before)
    spans.clear()
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert _db_spans(spans) == []
    # ... and patching again works.
    inst.instrument()
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        assert len(_db_spans(spans)) == 1
    finally:
        inst.unpatch()
    engine.dispose()
