"""psycopg2 instrumentor: traced factories handed to a C driver, against a real PostgreSQL server."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.psycopg2 import Psycopg2Instrumentor
from tests.support.contract import Contract
from tests.support.services import POSTGRES, POSTGRES_DSN, require
from tests.test_psycopg import BASE, CARD, SECRET, exported_text

pytest.importorskip("psycopg2")
import psycopg2  # noqa: E402
import psycopg2.extensions  # noqa: E402
import psycopg2.extras  # noqa: E402


@pytest.fixture
def table() -> Any:
    require(POSTGRES)
    name = "at_dbapi_" + uuid.uuid4().hex[:10]
    conn = psycopg2.connect(POSTGRES_DSN)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {name} (id INT PRIMARY KEY, card TEXT UNIQUE)")
    yield name
    with conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {name}")
    conn.close()


@pytest.fixture
def traced(instrument: Any) -> Any:
    return instrument(Psycopg2Instrumentor)


def test_execute_sanitised_with_connection_facts(table, traced, spans):
    conn = psycopg2.connect(POSTGRES_DSN)
    spans.clear()  # psycopg2 runs nothing through a cursor at connect
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT id FROM {table} WHERE card = '{CARD}' AND id > 4111 AND card <> %s", (SECRET,))
        assert cursor.fetchall() == []
    conn.close()
    span = spans.one()
    assert span.kind is SpanKind.CLIENT and span.name == f"SELECT {table}"
    assert dict(span.attributes) == {
        **BASE,
        "db.operation.name": "SELECT",
        "db.collection.name": table,
        "db.query.text": f"SELECT id FROM {table} WHERE card = ? AND id > ? AND card <> %s",
    }
    assert CARD not in exported_text([span]) and SECRET not in exported_text([span])


def test_traced_classes_look_like_the_originals(table, traced):
    conn = psycopg2.connect(POSTGRES_DSN)
    cursor = conn.cursor()
    assert isinstance(conn, psycopg2.extensions.connection) and isinstance(cursor, psycopg2.extensions.cursor)
    assert type(conn).__name__ == "connection" and type(conn).__module__ == psycopg2.extensions.connection.__module__
    assert type(cursor) is not psycopg2.extensions.cursor  # the traced subclass
    conn.close()


def test_from_import_after_patching_sees_the_wrapper(table, traced, spans):
    from psycopg2 import connect  # bound after the import hook ran, as a program would

    with connect(POSTGRES_DSN) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 1")
    conn.close()
    assert spans.one().name == "SELECT"


def test_cursor_factories_of_the_call_of_connect_and_of_the_connection(table, traced, spans):
    conn = psycopg2.connect(POSTGRES_DSN, cursor_factory=psycopg2.extras.NamedTupleCursor)
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1 AS x")
        assert cursor.fetchone().x == 1
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
        cursor.execute("SELECT 2 AS y")
        assert cursor.fetchone() == {"y": 2}
        assert isinstance(cursor, psycopg2.extras.RealDictCursor)
    conn.cursor_factory = psycopg2.extras.DictCursor
    with conn.cursor() as cursor:
        cursor.execute("SELECT 3 AS z")
        assert cursor.fetchone()["z"] == 3
    conn.close()
    assert [s.attributes["db.query.text"] for s in spans.get()] == ["SELECT ? AS x", "SELECT ? AS y", "SELECT ? AS z"]


def test_program_connection_factory_is_subclassed(table, traced, spans):
    class Audited(psycopg2.extensions.connection):
        opened = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            Audited.opened += 1

    conn = psycopg2.connect(POSTGRES_DSN, connection_factory=Audited)
    assert isinstance(conn, Audited) and Audited.opened == 1
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1")
    conn.close()
    assert spans.one().name == "SELECT"


def test_program_overrides_keep_their_behaviour(table, traced, spans, tmp_path):
    import logging

    log = logging.getLogger("at_dbapi_psycopg2")
    handler = logging.FileHandler(tmp_path / "sql.log")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    conn = psycopg2.connect(POSTGRES_DSN, connection_factory=psycopg2.extras.LoggingConnection)
    conn.initialize(log)
    with conn.cursor() as cursor:  # LoggingConnection.cursor picks LoggingCursor
        assert isinstance(cursor, psycopg2.extras.LoggingCursor)
        cursor.execute("SELECT 41")
    conn.close()
    dict_conn = psycopg2.connect(POSTGRES_DSN, connection_factory=psycopg2.extras.RealDictConnection)
    with dict_conn.cursor() as cursor:  # RealDictConnection.cursor picks RealDictCursor
        cursor.execute("SELECT 42 AS answer")
        assert cursor.fetchone() == {"answer": 42}
    dict_conn.close()
    handler.close()
    log.removeHandler(handler)
    assert "SELECT 41" in (tmp_path / "sql.log").read_text()
    assert [s.attributes["db.query.text"] for s in spans.get()] == ["SELECT ?", "SELECT ? AS answer"]


def test_function_factory_is_used_untraced(table, traced, spans):
    conn = psycopg2.connect(POSTGRES_DSN, connection_factory=lambda dsn, **kw: psycopg2.extensions.connection(dsn, **kw))
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    conn.close()
    assert spans.get() == []  # documented limit


def test_executemany_execute_values_and_named_cursor(table, traced, spans):
    conn = psycopg2.connect(POSTGRES_DSN)
    with conn.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {table} (id, card) VALUES (%s, %s)", [(1, SECRET), (2, "b")])
        psycopg2.extras.execute_values(cursor, f"INSERT INTO {table} (id, card) VALUES %s", [(3, SECRET + "x"), (4, "d")])
    with conn.cursor("at_dbapi_named") as named:
        named.itersize = 1
        named.execute(f"SELECT id FROM {table} ORDER BY id")
        assert [r[0] for r in named] == [1, 2, 3, 4]
    conn.rollback()
    conn.close()
    batch, values, declared = spans.get()
    assert batch.name == f"BATCH INSERT {table}" and batch.attributes["db.operation.batch.size"] == 2
    assert values.attributes["db.query.text"] == f"INSERT INTO {table} (id, card) VALUES (?,?),(?,?)"
    assert declared.name == f"SELECT {table}"  # the fetches of the named cursor add none
    assert SECRET not in exported_text(spans.get())


def test_errors_record_pgcode(table, traced, spans):
    conn = psycopg2.connect(POSTGRES_DSN)
    conn.autocommit = True
    with conn.cursor() as cursor:
        with pytest.raises(psycopg2.errors.SyntaxError):
            cursor.execute(f"SELEC '{CARD}'")
        cursor.execute(f"INSERT INTO {table} (id, card) VALUES (1, %s)", (SECRET,))
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cursor.execute(f"INSERT INTO {table} (id, card) VALUES (2, %s)", (SECRET,))
    conn.close()
    syntax, _, unique = spans.get()
    assert syntax.status.status_code is StatusCode.ERROR and syntax.attributes["db.response.status_code"] == "42601"
    assert unique.attributes["db.response.status_code"] == "23505" and unique.attributes["error.type"] == "23505"
    assert CARD not in exported_text(spans.get()) and SECRET not in exported_text(spans.get())


def test_callproc(table, traced, spans):
    conn = psycopg2.connect(POSTGRES_DSN)
    with conn.cursor() as cursor:
        cursor.callproc("abs", (-7,))
        assert cursor.fetchone() == (7,)
    conn.close()
    span = spans.one()
    assert span.name == "CALL abs"
    assert span.attributes["db.operation.name"] == "CALL"
    assert span.attributes["db.stored_procedure.name"] == "abs"
    assert "db.query.text" not in span.attributes


def test_connection_made_before_patching_is_not_traced(table, instrument, spans):
    conn = psycopg2.connect(POSTGRES_DSN)  # documented limit
    instrument(Psycopg2Instrumentor)
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1")
    conn.close()
    assert spans.get() == []


def test_unpatch_leaves_traced_connections_working_untraced(table, spans):
    instrumentor = Psycopg2Instrumentor().instrument()
    conn = psycopg2.connect(POSTGRES_DSN)
    instrumentor.unpatch()
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    conn.close()
    assert spans.get() == []


# --------------------------------------------------------------------------
# The contract: connections are made inside the calls (one made before patching is not traced)


def pg2_select() -> Any:
    with psycopg2.connect(POSTGRES_DSN) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 1 + %s", (1,))
        result = cursor.fetchall()
    conn.close()
    return result


def pg2_dict_cursor() -> Any:
    with psycopg2.connect(POSTGRES_DSN) as conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cursor:
        cursor.executemany("SELECT %s", [(1,), (2,)])
        result = cursor.rowcount
    conn.close()
    return result


def pg2_syntax_error() -> Any:
    conn = psycopg2.connect(POSTGRES_DSN)
    try:
        conn.cursor().execute("SELEC 1")
    finally:
        conn.close()


Contract(
    instrumentor="autotrace.instrumentors.psycopg2:Psycopg2Instrumentor",
    module="psycopg2",
    targets=["psycopg2:connect"],
    calls=[pg2_select, pg2_dict_cursor],
    error_call=pg2_syntax_error,
    spans_per_call=1,
    requires=[POSTGRES],
).install(globals())
