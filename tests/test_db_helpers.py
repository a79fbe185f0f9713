"""autotrace.db, once for every SQL instrumentor: systems, statement cache, error policy, event spans.

Errors are real: sqlite3 from the standard library and a PostgreSQL server
(psycopg 3, psycopg2, asyncpg). MySQL's errno is the one fault made up here:
no MySQL driver is among the test dependencies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
import uuid

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode

from autotrace import db
from autotrace.kit import SUPPRESS_DB_INSTRUMENTATION_KEY, SUPPRESS_INSTRUMENTATION_KEY, CallSpan, Instrumentor, Suppress
from tests.support.services import POSTGRES, POSTGRES_DSN, require

SECRET = "4111111111111111"
PY311 = sys.version_info >= (3, 11)  # sqlite3 errors carry their code from 3.11 on


class Probe(Instrumentor):
    name = "dbprobe"


class Holder:
    """Stands for a library's per-statement object (an execution context)."""


def _text(span) -> str:
    parts = [span.name, json.dumps(dict(span.attributes), default=str), span.status.description or ""]
    parts += [json.dumps(dict(event.attributes), default=str) for event in span.events]
    return "\n".join(parts)


def _table() -> str:
    return "atdb_" + uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------
# Systems, settings, connection attributes


def test_system_names_and_old_names():
    assert db.system_name("postgresql") == "postgresql"
    assert db.system_name("mssql") == "microsoft.sql_server"
    assert db.system_name("oracle") == "oracle.db"
    assert db.system_name("somethingnew") == "somethingnew"
    assert db.system_name("") == db.system_name(None) == "other_sql"
    assert db.OLD_SYSTEMS["microsoft.sql_server"] == "mssql"
    assert db.DEFAULT_PORTS["postgresql"] == 5432 and db.DEFAULT_PORTS["mariadb"] == 3306


def test_connection_attributes():
    assert db.connection_attributes("postgresql", "shop", "db.internal") == {
        "db.system.name": "postgresql", "db.namespace": "shop", "server.address": "db.internal", "server.port": 5432,
    }
    # A file database: no server, no default port.
    assert db.connection_attributes("sqlite", "/tmp/app.db") == {"db.system.name": "sqlite", "db.namespace": "/tmp/app.db"}
    assert db.connection_attributes("mysql", None, "h", "3307")["server.port"] == 3307
    old = db.connection_attributes("microsoft.sql_server", "crm", "sql1", None, dup=True)
    assert old["db.system"] == "mssql" and old["db.system.name"] == "microsoft.sql_server"
    assert old["db.name"] == "crm" and old["net.peer.name"] == "sql1" and old["net.peer.port"] == 1433


def test_settings_are_read_from_the_environment(monkeypatch):
    defaults = db.SqlSettings()
    assert (defaults.raw_query, defaults.max_length, defaults.dup) == (False, 2048, False)
    monkeypatch.setenv("AUTOTRACE_SQL_RAW_QUERY", "true")
    monkeypatch.setenv("AUTOTRACE_SQL_MAX_LENGTH", "12")
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "database/dup")
    from autotrace import config

    config.reset_settings()
    settings = db.SqlSettings()
    assert (settings.raw_query, settings.max_length, settings.dup) == (True, 12, True)
    monkeypatch.setenv("AUTOTRACE_SQL_MAX_LENGTH", "-3")  # invalid: the default, with a warning
    assert db.SqlSettings().max_length == 2048


# --------------------------------------------------------------------------
# Statement cache


def test_statement_entry_is_sanitised_and_cached():
    cache = db.StatementCache(db.SqlSettings(), "postgresql", "shop", "127.0.0.1", 5432)
    sql = f"SELECT * FROM cards WHERE number = '{SECRET}' AND id IN (1, 2, 3)"
    entry = cache.single.get(sql) or cache.build(sql)
    name, attrs, policy = entry
    assert name == "SELECT cards"
    assert attrs == {
        "db.system.name": "postgresql", "db.namespace": "shop", "server.address": "127.0.0.1", "server.port": 5432,
        "db.operation.name": "SELECT", "db.collection.name": "cards",
        "db.query.text": "SELECT * FROM cards WHERE number = ? AND id IN (?)",
    }
    assert (policy.system, policy.raw_query) == ("postgresql", False)
    assert (cache.single.get(sql) or cache.build(sql)) is entry  # the second time: one look-up
    # MySQL quoting: "..." is a string there.
    mysql = db.StatementCache(db.SqlSettings(), "mariadb")
    assert mysql.build(f'SELECT a FROM t WHERE b = "{SECRET}"')[1]["db.query.text"] == "SELECT a FROM t WHERE b = ?"


def test_batch_entries():
    cache = db.StatementCache(db.SqlSettings(), "sqlite")
    sql = "INSERT INTO items (id) VALUES (?)"
    name, attrs, policy = cache.batch_entry(sql, 5)
    assert name == "BATCH INSERT items"
    assert attrs["db.operation.name"] == "BATCH INSERT" and attrs["db.operation.batch.size"] == 5
    assert policy is cache.errors
    assert cache.batch_entry(sql, 7)[1]["db.operation.batch.size"] == 7
    assert "db.operation.batch.size" not in cache.batch[sql][1]  # the cached dict is never changed
    assert cache.build(sql)[0] == "INSERT items"  # the single variant is apart
    assert cache.batch_entry("/* nothing */", 2)[1]["db.operation.name"] == "BATCH"


def test_span_name_falls_back_to_the_operation_then_the_system():
    cache = db.StatementCache(db.SqlSettings(), "sqlite")
    assert cache.build("SELECT 1")[0] == "SELECT"
    name, attrs, _ = cache.build("/* nothing */ ;")
    assert name == "sqlite" and "db.operation.name" not in attrs


def test_raw_query_max_length_and_dup(monkeypatch):
    monkeypatch.setenv("AUTOTRACE_SQL_RAW_QUERY", "true")
    monkeypatch.setenv("AUTOTRACE_SQL_MAX_LENGTH", "20")
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "database/dup")
    from autotrace import config

    config.reset_settings()
    cache = db.StatementCache(db.SqlSettings(), "postgresql")
    attrs = cache.build("  SELECT 'visible' AS v FROM t  ")[1]
    assert attrs["db.query.text"] == "SELECT 'visible' AS "  # as written, stripped, cut at 20
    assert attrs["db.statement"] == attrs["db.query.text"] and attrs["db.system"] == "postgresql"
    assert cache.errors.raw_query is True


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(db, "STATEMENT_CACHE_SIZE", 3)
    cache = db.StatementCache(db.SqlSettings(), "sqlite")
    for i in range(10):
        cache.build(f"SELECT c{i} FROM t")
        assert len(cache.single) <= 3
    assert "SELECT c9 FROM t" in cache.single


# --------------------------------------------------------------------------
# The error policy


def test_scrub_message():
    message = f"duplicate key value violates unique constraint \"cards_pkey\"\nDETAIL:  Key (card)=({SECRET}) already exists."
    assert db.scrub_message(message) == "duplicate key value violates unique constraint ?"
    assert db.scrub_message(f"Duplicate entry '{SECRET}' for key 'PRIMARY'") == "Duplicate entry ? for key ?"
    assert db.scrub_message(f"value {SECRET} out of range at -1.5, col2") == "value ? out of range at ?, col2"
    assert len(db.scrub_message("x" * 2000)) == 512


def test_sqlite_errors():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE cards (number TEXT UNIQUE)")
    conn.execute(f"INSERT INTO cards VALUES ('{SECRET}')")
    with pytest.raises(sqlite3.OperationalError) as missing:
        conn.execute("SELECT * FROM missing_table")
    with pytest.raises(sqlite3.IntegrityError) as duplicate:
        conn.execute(f"INSERT INTO cards VALUES ('{SECRET}')")
    conn.close()
    assert db.status_code(missing.value, "sqlite") == ("1" if PY311 else None)
    assert db.status_code(duplicate.value, "sqlite") == ("2067" if PY311 else None)  # SQLITE_CONSTRAINT_UNIQUE


class MySQLError(Exception):
    """What PyMySQL and mysqlclient raise: ``args == (errno, message)``."""


def test_mysql_errno_only_for_the_mysql_family():
    exc = MySQLError(1062, f"Duplicate entry '{SECRET}' for key 'PRIMARY'")
    assert db.status_code(exc, "mysql") == db.status_code(exc, "mariadb") == "1062"
    assert db.status_code(exc, "postgresql") is None
    assert db.status_code(MySQLError("no code"), "mysql") is None


def _failed(tracer, exc, policy):
    span = tracer.start_span("INSERT cards", kind=SpanKind.CLIENT)
    db.record(span, exc, policy)
    span.end()
    return span


def _pg_unique_violation(driver: str) -> BaseException:
    """A real unique violation whose message and DETAIL quote SECRET."""
    require(POSTGRES)
    table = _table()
    if driver == "asyncpg":
        asyncpg = pytest.importorskip("asyncpg")

        async def run():
            conn = await asyncpg.connect(POSTGRES_DSN)
            try:
                await conn.execute(f"CREATE TABLE {table} (card text PRIMARY KEY)")
                await conn.execute(f"INSERT INTO {table} VALUES ('{SECRET}')")
                try:
                    await conn.execute(f"INSERT INTO {table} VALUES ('{SECRET}')")
                except asyncpg.UniqueViolationError as exc:
                    return exc
            finally:
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
                await conn.close()

        return asyncio.run(run())
    module = pytest.importorskip(driver)
    conn = module.connect(POSTGRES_DSN)
    conn.autocommit = True
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE {table} (card text PRIMARY KEY)")
        cur.execute(f"INSERT INTO {table} VALUES ('{SECRET}')")
        with pytest.raises(module.IntegrityError) as info:
            cur.execute(f"INSERT INTO {table} VALUES ('{SECRET}')")
        return info.value
    finally:
        conn.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        conn.close()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2", "asyncpg"])
def test_postgresql_errors_are_recorded_by_sqlstate_and_scrubbed(driver, spans):
    exc = _pg_unique_violation(driver)
    assert exc is not None and SECRET in str(exc) + str(getattr(exc, "detail", ""))
    assert db.status_code(exc, "postgresql") == "23505"
    span = _failed(trace.get_tracer("test"), exc, db.ErrorPolicy("postgresql", False))
    (finished,) = spans.get()
    assert finished.status.status_code is StatusCode.ERROR
    assert finished.attributes["db.response.status_code"] == "23505"
    assert finished.attributes["error.type"] == "23505"
    (event,) = finished.events
    assert event.attributes["exception.type"] == f"{type(exc).__module__}.{type(exc).__qualname__}"
    assert "duplicate key value violates unique constraint" in event.attributes["exception.message"]
    assert SECRET not in _text(finished)
    assert span is not None


def test_raw_policy_keeps_the_message_and_codeless_errors_are_typed(spans):
    tracer = trace.get_tracer("test")
    _failed(tracer, MySQLError(f"bad value '{SECRET}'"), db.ErrorPolicy("mysql", True))
    _failed(tracer, ValueError(f"bad value '{SECRET}'"), None)
    raw, typed = spans.get()
    assert SECRET in raw.events[0].attributes["exception.message"]
    assert raw.attributes["error.type"] == "tests.test_db_helpers.MySQLError"
    assert "db.response.status_code" not in raw.attributes
    assert typed.attributes["error.type"] == "ValueError"
    assert SECRET not in _text(typed)
    db.record(NonRecordingSpan(SpanContext(1, 1, False)), ValueError("x"), None)  # nothing to do, no error


# --------------------------------------------------------------------------
# Event spans


def _sqlite_events(probe, cache, **options):
    """EventSpans the way a hook-based library would use them, around real sqlite3 calls."""
    spans_ = db.EventSpans(probe, lambda sql: cache.single.get(sql) or cache.build(sql), **options)
    seen = {}

    def execute(conn, sql):
        holder = Holder()
        spans_.start(holder, sql)
        seen["span"] = trace.get_current_span()
        seen["all"] = otel_context.get_value(SUPPRESS_INSTRUMENTATION_KEY)
        seen["db"] = otel_context.get_value(SUPPRESS_DB_INSTRUMENTATION_KEY)
        try:
            result = conn.execute(sql).fetchall()
        except sqlite3.Error as exc:
            spans_.end(holder, exc)
            raise
        spans_.end(holder)
        return result

    return spans_, execute, seen


def test_event_spans_current_suppressed_and_ended(spans):
    probe = Probe()
    cache = db.StatementCache(db.SqlSettings(), "sqlite", ":memory:")
    _, execute, seen = _sqlite_events(probe, cache)
    conn = sqlite3.connect(":memory:")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("handler") as handler:
        assert execute(conn, "SELECT 7") == [(7,)]
        with pytest.raises(sqlite3.OperationalError):
            execute(conn, f"SELECT * FROM missing WHERE card = '{SECRET}'")
        assert trace.get_current_span() is handler  # restored after success and failure
    conn.close()
    ok, failed = [s for s in spans.get() if s.name != "handler"]
    assert ok.name == "SELECT" and ok.kind is SpanKind.CLIENT
    assert ok.parent.span_id == handler.get_span_context().span_id
    assert ok.attributes["db.query.text"] == "SELECT ?" and ok.status.status_code is StatusCode.UNSET
    assert ok.instrumentation_scope.name == "autotrace.instrumentors.dbprobe"
    assert seen["span"].get_span_context().span_id == failed.context.span_id
    assert seen["all"] is True and seen["db"] is True
    assert failed.name == "SELECT missing" and failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == ("1" if PY311 else "sqlite3.OperationalError")
    assert "no such table" in failed.events[0].attributes["exception.message"]
    assert SECRET not in _text(failed)


def test_event_spans_stand_down_and_skip(spans):
    probe = Probe()
    describe_calls = []

    def describe(event):
        describe_calls.append(event)
        return None if event == "skip" else ("SELECT t", {"db.system.name": "sqlite"})

    events = db.EventSpans(probe, describe)
    holder = Holder()
    token = otel_context.attach(otel_context.set_value(SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        events.start(holder, "statement")  # fully suppressed: not even described
    finally:
        otel_context.detach(token)
    assert describe_calls == [] and vars(holder) == {}
    events.start(holder, "skip")
    assert vars(holder) == {}
    events.end(holder)
    events.end(None)  # nothing held, nothing to do
    # Suppress.DB: a driver under an outer database span stands down, and leaves HTTP alone.
    driver = db.EventSpans(probe, describe, suppress=Suppress.DB)
    token = otel_context.attach(otel_context.set_value(SUPPRESS_DB_INSTRUMENTATION_KEY, True))
    try:
        driver.start(holder, "statement")
    finally:
        otel_context.detach(token)
    assert vars(holder) == {}
    driver.start(holder, "statement")
    assert otel_context.get_value(SUPPRESS_INSTRUMENTATION_KEY) is None
    assert otel_context.get_value(SUPPRESS_DB_INSTRUMENTATION_KEY) is True
    driver.end(holder)
    driver.end(holder)  # twice: ended once
    assert otel_context.get_value(SUPPRESS_DB_INSTRUMENTATION_KEY) is None
    (span,) = spans.get()
    assert span.name == "SELECT t" and span.attributes["db.system.name"] == "sqlite"


def test_event_spans_custom_record_gets_the_state(spans):
    got = []
    events = db.EventSpans(Probe(), lambda event: ("CALL", {}, {"state": event}), record=lambda s, e, st: got.append((e, st)))
    holder = Holder()
    events.start(holder, 42)
    error = RuntimeError("boom")
    events.end(holder, error)
    assert got == [(error, {"state": 42})]
    assert spans.one("CALL").status.status_code is StatusCode.UNSET  # recording was the hook's business


def test_our_failures_are_logged_and_leave_the_program_alone(spans, caplog):
    def broken(event):
        raise KeyError("ours")

    events = db.EventSpans(Probe(), broken, site="dbprobe.statement")
    before = otel_context.get_current()
    with caplog.at_level(logging.ERROR, logger="autotrace"):
        events.start(Holder(), "SELECT 1")
        events.start(object(), "SELECT 1")  # a holder without __dict__: untraced, not started
        working = db.EventSpans(Probe(), lambda event: ("SELECT", {}))
        working.start(object(), "SELECT 1")
    assert otel_context.get_current() is before
    assert spans.get() == []
    assert "dbprobe.statement.start" in caplog.text and "dbprobe.<lambda>.start" in caplog.text
    assert [r.levelno for r in caplog.records].count(logging.ERROR) == 2  # once per site


def test_entries_fit_callspan_and_the_error_policy(spans):
    """The way a DB-API driver instrumentor uses them: the entry is what describe returns."""
    probe = Probe()
    cache = db.StatementCache(db.SqlSettings(), "sqlite", ":memory:")
    call = CallSpan(probe, lambda conn, args, kwargs: cache.single.get(args[0]) or cache.build(args[0]),
                    suppress=Suppress.DB, record=db.record)
    conn = sqlite3.connect(":memory:")
    assert call.sync(conn.execute, conn, ("SELECT 1",), {}).fetchall() == [(1,)]
    with pytest.raises(sqlite3.OperationalError):
        call.sync(conn.execute, conn, (f"SELECT * FROM nowhere WHERE n = {SECRET}",), {})
    conn.close()
    ok, failed = spans.get()
    assert ok.name == "SELECT" and ok.attributes["db.namespace"] == ":memory:"
    assert failed.name == "SELECT nowhere" and failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == ("1" if PY311 else "sqlite3.OperationalError")
    assert SECRET not in _text(failed)
