"""PyMySQL and mysqlclient (MySQLdb) instrumentors against a real MariaDB server."""

from __future__ import annotations

import uuid
from typing import Any, Dict

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentors.mysqldb import MySQLdbInstrumentor
from autotrace.instrumentors.pymysql import PyMySQLInstrumentor
from tests.support.contract import Contract
from tests.support.services import require
from tests.test_psycopg import CARD, SECRET, exported_text

# Not in tests/support/services.py yet.
MARIADB = ("127.0.0.1", 3306, "MariaDB")
MYSQL_ARGS = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "", "database": "test"}

DRIVERS = {"pymysql": PyMySQLInstrumentor, "MySQLdb": MySQLdbInstrumentor}


@pytest.fixture(params=sorted(DRIVERS))
def driver(request, instrument) -> Any:
    require(MARIADB)
    module = pytest.importorskip(request.param)
    instrument(DRIVERS[request.param])
    return module


@pytest.fixture
def table() -> Any:
    require(MARIADB)
    import pymysql

    name = "at_dbapi_" + uuid.uuid4().hex[:10]
    conn = pymysql.connect(**MYSQL_ARGS, autocommit=True)
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {name} (id INT PRIMARY KEY, card VARCHAR(40) UNIQUE)")
    yield name
    with conn.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {name}")
    conn.close()


def connect(driver: Any, **extra: Any) -> Any:
    return driver.connect(**MYSQL_ARGS, **extra)


def test_execute_sanitised_with_connection_facts(driver, table, spans):
    conn = connect(driver)
    spans.clear()
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT id FROM {table} WHERE card = '{CARD}' AND id > 4111 AND card <> %s", (SECRET,))
        assert cursor.fetchall() == ()
    conn.close()
    span = spans.one()
    assert span.kind is SpanKind.CLIENT and span.name == f"SELECT {table}"
    assert dict(span.attributes) == {
        "db.system.name": "mariadb",
        "db.namespace": "test",
        "server.address": "127.0.0.1",
        "server.port": 3306,
        "db.operation.name": "SELECT",
        "db.collection.name": table,
        "db.query.text": f"SELECT id FROM {table} WHERE card = ? AND id > ? AND card <> %s",
    }
    assert CARD not in exported_text([span]) and SECRET not in exported_text([span])


def test_connection_set_up_makes_no_span(driver, table, spans):
    conn = connect(driver, init_command="SET @at_dbapi = 1", sql_mode="ANSI_QUOTES", autocommit=True)
    assert spans.get() == []
    conn.ping()
    conn.close()
    assert spans.get() == []


def test_executemany_is_one_span(driver, table, spans):
    conn = connect(driver)
    with conn.cursor() as cursor:
        # INSERT: one multi-row statement built by the driver through its own execute()
        cursor.executemany(f"INSERT INTO {table} (id, card) VALUES (%s, %s)", [(1, SECRET), (2, "b"), (3, "c")])
        # anything else: execute() once per row
        cursor.executemany(f"UPDATE {table} SET card = %s WHERE id = %s", [(SECRET + "x", 1), ("d", 2)])
    conn.rollback()
    conn.close()
    insert, update = spans.get()
    assert insert.name == f"BATCH INSERT {table}" and insert.attributes["db.operation.batch.size"] == 3
    assert insert.attributes["db.query.text"] == f"INSERT INTO {table} (id, card) VALUES (%s, %s)"
    assert update.name == f"BATCH UPDATE {table}" and update.attributes["db.operation.batch.size"] == 2
    assert SECRET not in exported_text(spans.get())


def test_every_cursor_class(driver, table, spans):
    conn = connect(driver)
    for name in ("DictCursor", "SSCursor", "SSDictCursor"):
        cursor = conn.cursor(getattr(driver.cursors, name))
        cursor.execute(f"SELECT id FROM {table}")
        cursor.fetchall()
        cursor.close()
    conn.close()
    assert [s.name for s in spans.get()] == [f"SELECT {table}"] * 3


def test_errors_record_the_errno(request, driver, table, spans):
    conn = connect(driver, autocommit=True)
    with conn.cursor() as cursor:
        cursor.execute(f"INSERT INTO {table} (id, card) VALUES (1, %s)", (SECRET,))
        with pytest.raises(driver.IntegrityError):
            cursor.execute(f"INSERT INTO {table} (id, card) VALUES (2, %s)", (SECRET,))
        with pytest.raises(driver.ProgrammingError):
            cursor.execute(f"SELEC '{CARD}'")
    conn.close()
    _, unique, syntax = spans.get()
    assert unique.status.status_code is StatusCode.ERROR and syntax.status.status_code is StatusCode.ERROR
    assert CARD not in exported_text(spans.get()) and SECRET not in exported_text(spans.get())
    assert unique.attributes["db.response.status_code"] == "1062"  # ER_DUP_ENTRY
    assert syntax.attributes["db.response.status_code"] == "1064"  # ER_PARSE_ERROR


def test_error_message_is_the_servers_scrubbed(driver, table, spans):
    conn = connect(driver, autocommit=True)
    with conn.cursor() as cursor:
        cursor.execute(f"INSERT INTO {table} (id, card) VALUES (1, %s)", (SECRET,))
        with pytest.raises(driver.IntegrityError):
            cursor.execute(f"INSERT INTO {table} (id, card) VALUES (1, %s)", (SECRET,))
    conn.close()
    event = spans.get()[-1].events[0]
    assert event.attributes["exception.message"] == "Duplicate entry ? for key ?"


def test_callproc(driver, table, spans):
    procedure = table + "_p"
    conn = connect(driver, autocommit=True)
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE PROCEDURE {procedure} (IN n INT) SELECT n * 2")
        spans.clear()
        try:
            cursor.callproc(procedure, (21,))
            assert cursor.fetchall() == ((42,),)
            while cursor.nextset():
                pass
        finally:
            cursor.execute(f"DROP PROCEDURE {procedure}")
    conn.close()
    call = spans.get()[0]
    assert call.name == f"CALL {procedure}"
    assert call.attributes["db.operation.name"] == "CALL"
    assert call.attributes["db.stored_procedure.name"] == procedure
    assert [s.name for s in spans.get()][1:] == ["DROP"]  # callproc's own SET / CALL statements add none


def test_unpatched_nothing(table, spans):
    for cls in DRIVERS.values():
        cls().instrument().unpatch()
    import MySQLdb
    import pymysql

    for driver in (pymysql, MySQLdb):
        conn = connect(driver)
        conn.cursor().execute("SELECT 1")
        conn.close()
    assert spans.get() == []


# --------------------------------------------------------------------------
# The contracts (connections made before patching: the class-level wraps see them)

_lazy: Dict[str, Any] = {}


def _conn(name: str) -> Any:
    if name not in _lazy:
        _lazy[name] = connect(__import__(name), autocommit=True)
    return _lazy[name]


def pymysql_select() -> Any:
    with _conn("pymysql").cursor() as cursor:
        cursor.execute("SELECT 1 + %s", (1,))
        return cursor.fetchall()


def pymysql_executemany() -> Any:
    with _conn("pymysql").cursor() as cursor:
        cursor.executemany("SELECT %s", [(1,), (2,)])
        return cursor.rowcount


def pymysql_fresh_connection() -> Any:
    import pymysql

    connect(pymysql, init_command="SET @at_dbapi = 2").close()  # set-up through a cursor: no span
    return "closed"


def pymysql_syntax_error() -> Any:
    with _conn("pymysql").cursor() as cursor:
        cursor.execute("SELEC 1")


def mysqldb_select() -> Any:
    with _conn("MySQLdb").cursor() as cursor:
        cursor.execute("SELECT 1 + %s", (1,))
        return cursor.fetchall()


def mysqldb_executemany() -> Any:
    with _conn("MySQLdb").cursor() as cursor:
        cursor.executemany("SELECT %s", [(1,), (2,)])
        return cursor.rowcount


def mysqldb_syntax_error() -> Any:
    with _conn("MySQLdb").cursor() as cursor:
        cursor.execute("SELEC 1")


Contract(
    instrumentor="autotrace.instrumentors.pymysql:PyMySQLInstrumentor",
    module="pymysql",
    targets=["pymysql.cursors:Cursor.execute", "pymysql.cursors:Cursor.executemany", "pymysql.cursors:Cursor.callproc",
             "pymysql.connections:Connection.connect"],
    calls=[pymysql_select, pymysql_executemany, pymysql_fresh_connection],
    error_call=pymysql_syntax_error,
    spans_per_call=[1, 1, 0],
    requires=[MARIADB],
).install(globals())

Contract(
    instrumentor="autotrace.instrumentors.mysqldb:MySQLdbInstrumentor",
    module="MySQLdb",
    targets=["MySQLdb.cursors:BaseCursor.execute", "MySQLdb.cursors:BaseCursor.executemany",
             "MySQLdb.cursors:BaseCursor.callproc"],
    calls=[mysqldb_select, mysqldb_executemany],
    error_call=mysqldb_syntax_error,
    spans_per_call=1,
    requires=[MARIADB],
).install(globals())
