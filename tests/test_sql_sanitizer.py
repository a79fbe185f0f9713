"""Unit tests of the shared SQL sanitiser / summariser (autotrace/sql.py)."""

from __future__ import annotations

import pytest

from autotrace.sql import ANSI, MYSQL, flavor_for, sanitize, summarize

SECRET = "4111111111111111"


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT * FROM t WHERE card = '4111111111111111'", "SELECT * FROM t WHERE card = ?"),
        ("SELECT * FROM t WHERE a = 'it''s 4111111111111111'", "SELECT * FROM t WHERE a = ?"),
        ("SELECT * FROM t WHERE a = E'it\\'s 4111111111111111'", "SELECT * FROM t WHERE a = ?"),
        ("SELECT $$4111111111111111 'x' $$ FROM t", "SELECT ? FROM t"),
        ("SELECT $tag$ a $$ 4111111111111111 $tag$", "SELECT ?"),
        ("SELECT 42, 3.14, .5, 1e10, 2.5E-3", "SELECT ?, ?, ?, ?, ?"),
        ("SELECT * FROM t WHERE a = -5 AND b = (-7) AND c = a-5 AND d = a - 5", "SELECT * FROM t WHERE a = ? AND b = (?) AND c = a-? AND d = a - ?"),
        ("SELECT -1", "SELECT ?"),
        ("SELECT * FROM t WHERE h = 0xDEADBEEF OR x = X'0A1F' OR b = B'0101'", "SELECT * FROM t WHERE h = ? OR x = ? OR b = ?"),
        ("SELECT * FROM t WHERE id IN (1, 2, 3)", "SELECT * FROM t WHERE id IN (?)"),
        ("SELECT * FROM t WHERE id in ('a','b',  -3)", "SELECT * FROM t WHERE id in (?)"),
        ("SELECT * FROM t WHERE id IN (%(id_1_1)s, %(id_1_2)s)", "SELECT * FROM t WHERE id IN (?)"),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE v = 1)", "SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE v = ?)"),
        ("SELECT a -- secret 4111111111111111\nFROM t", "SELECT a FROM t"),
        ("SELECT /* 4111111111111111 */ a FROM t", "SELECT a FROM t"),
        ("SELECT t1.c2, col_3 FROM t1 JOIN t2 ON t1.id = t2.id", "SELECT t1.c2, col_3 FROM t1 JOIN t2 ON t1.id = t2.id"),
        ('SELECT "Col 1", "x""y" FROM "Table2"', 'SELECT "Col 1", "x""y" FROM "Table2"'),
        ("SELECT * FROM t WHERE a = $1 AND b = ? AND c = %s AND d = :name AND e = %(e)s AND f = ?2 AND g = :1",
         "SELECT * FROM t WHERE a = $1 AND b = ? AND c = %s AND d = :name AND e = %(e)s AND f = ?2 AND g = :1"),
        ("SELECT * FROM t WHERE ok = TRUE AND no = false AND n IS NULL", "SELECT * FROM t WHERE ok = ? AND no = ? AND n IS NULL"),
        ("SELECT '2020-01-01'::date, x::int FROM t", "SELECT ?::date, x::int FROM t"),
        ("SELECT *\n  FROM   t\n WHERE a = 1", "SELECT * FROM t WHERE a = ?"),
        ("SELECT * FROM t WHERE x = 'unterminated 4111111111111111", "SELECT * FROM t WHERE x = ?"),
        ("SELECT * FROM t /* unterminated 4111111111111111", "SELECT * FROM t"),
        ("SELECT N'4111111111111111', _utf8'4111111111111111'", "SELECT ?, ?"),
        ("SELECT ARRAY['4111111111111111', 'b'], arr[1] FROM t", "SELECT ARRAY[?, ?], arr[?] FROM t"),
        ("SELECT INTERVAL '1 day'", "SELECT INTERVAL ?"),
    ],
)
def test_sanitize_ansi(sql: str, expected: str) -> None:
    assert sanitize(sql) == expected


def test_backslash_is_not_an_escape_in_standard_strings() -> None:
    # PostgreSQL standard-conforming strings: 'C:\' ends at the second quote.
    out = sanitize("SELECT 'C:\\' AS p, '4111111111111111' AS q")
    assert out == "SELECT ? AS p, ? AS q"
    assert SECRET not in out


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT * FROM t WHERE a = 'it\\'s 4111111111111111'", "SELECT * FROM t WHERE a = ?"),
        ('SELECT * FROM t WHERE a = "4111111111111111"', "SELECT * FROM t WHERE a = ?"),
        ("SELECT * FROM `order` WHERE a = 1 # 4111111111111111", "SELECT * FROM `order` WHERE a = ?"),
        ("INSERT INTO t VALUES ('a\\\\', '4111111111111111')", "INSERT INTO t VALUES (?, ?)"),
    ],
)
def test_sanitize_mysql(sql: str, expected: str) -> None:
    assert sanitize(sql, MYSQL) == expected


def test_ansi_double_quotes_are_identifiers_but_mysql_strings() -> None:
    assert sanitize('SELECT "name" FROM t') == 'SELECT "name" FROM t'
    assert sanitize('SELECT "name" FROM t', MYSQL) == "SELECT ? FROM t"
    assert flavor_for("mariadb") == MYSQL and flavor_for("mysql") == MYSQL
    assert flavor_for("postgresql") == ANSI and flavor_for("sqlite") == ANSI


@pytest.mark.parametrize(
    "sql, operation, collection",
    [
        ("SELECT id FROM payments WHERE id = 1", "SELECT", "payments"),
        ("select p.id from public.payments as p", "SELECT", "public.payments"),
        ('SELECT * FROM "public"."Payments"', "SELECT", "public.Payments"),
        ("SELECT a FROM t JOIN u ON t.id = u.id", "SELECT", None),
        ("SELECT * FROM a, b WHERE a.x = b.x", "SELECT", None),
        ("SELECT * FROM t WHERE x IN (SELECT y FROM t)", "SELECT", "t"),
        ("SELECT * FROM t WHERE x IN (SELECT y FROM u)", "SELECT", None),
        ("SELECT extract(year FROM ts), trim(both 'x' from name) FROM payments", "SELECT", "payments"),
        ("SELECT * FROM generate_series(1, 3)", "SELECT", None),
        ("SELECT 1", "SELECT", None),
        ("SELECT a FROM t UNION SELECT a FROM t2", "SELECT", None),
        ("  (SELECT a FROM t)", "SELECT", "t"),
        ("INSERT INTO payments (id, card) VALUES (?, ?)", "INSERT", "payments"),
        ("INSERT OR REPLACE INTO t1 (a) VALUES (1)", "INSERT", "t1"),
        ("INSERT IGNORE INTO t VALUES (1)", "INSERT", "t"),
        ("INSERT INTO t (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 2", "INSERT", "t"),
        ("INSERT INTO t (id) VALUES (1) ON DUPLICATE KEY UPDATE v = 2", "INSERT", "t"),
        ("INSERT INTO t SELECT * FROM u", "INSERT", None),
        ("UPDATE accounts SET balance = balance - 10 WHERE id = 3", "UPDATE", "accounts"),
        ("UPDATE ONLY accounts SET x = 1", "UPDATE", "accounts"),
        ("update t set v = 1 from u where t.id = u.id", "UPDATE", None),
        ("DELETE FROM sessions WHERE expires < now()", "DELETE", "sessions"),
        ("SELECT * FROM t FOR UPDATE", "SELECT", "t"),
        ("WITH recent AS (SELECT * FROM payments WHERE amount > 10) SELECT * FROM recent", "SELECT", "payments"),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r", "SELECT", None),
        ("WITH a AS (SELECT id FROM t) DELETE FROM t WHERE id IN (SELECT id FROM a)", "DELETE", "t"),
        ("WITH a AS (SELECT 1)", "WITH", None),
        ("CREATE TABLE IF NOT EXISTS items (id int)", "CREATE", "items"),
        ("CREATE TEMPORARY TABLE tmp1 (id int)", "CREATE", "tmp1"),
        ("CREATE INDEX ix ON t (a)", "CREATE", None),
        ("DROP TABLE IF EXISTS items", "DROP", "items"),
        ("ALTER TABLE items ADD COLUMN x int", "ALTER", "items"),
        ("TRUNCATE items", "TRUNCATE", "items"),
        ("BEGIN", "BEGIN", None),
        ("SAVEPOINT sa_savepoint_1", "SAVEPOINT", None),
        ("PRAGMA main.table_info(\"t\")", "PRAGMA", None),
        ("", None, None),
        ("/* only a comment */", None, None),
        ("42", None, None),
    ],
)
def test_operation_and_collection(sql: str, operation: str, collection: str) -> None:
    summary = summarize(sql)
    assert (summary.operation, summary.collection) == (operation, collection)


def test_summaries_are_cached() -> None:
    sql = "SELECT * FROM cached_table WHERE id = 17"
    first = summarize(sql)
    hits = summarize.cache_info().hits
    assert summarize(sql) is first
    assert summarize.cache_info().hits == hits + 1


def test_long_statements_are_bounded_and_never_leak() -> None:
    from autotrace import sql as _sql

    values = ", ".join(f"({i}, '{SECRET}')" for i in range(20000))  # ~500 KB
    sql = f"INSERT INTO big (id, card) VALUES {values}"
    summary = summarize(sql)
    assert summary.operation == "INSERT" and summary.collection == "big"
    assert SECRET not in summary.text
    assert len(summary.text) <= _sql.MAX_LEX


def test_fuzz_secrets_never_survive() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    # A secret inside a quoted *identifier* is a name, not a literal: the
    # identifier quotes ("..." in ANSI SQL, `...`) are left out of the mix.
    common = ["SELECT", " ", "a", "t1", ",", "(", ")", "=", "-", "'", "''", "\\", "$$", "$x$", "--", "\n", "/*",
              "*/", "IN", "E", "x", "0x", "#", ":", "?", "%s"]
    mixes = {ANSI: st.sampled_from(common), MYSQL: st.sampled_from(common + ['"'])}

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from([ANSI, MYSQL]).flatmap(
        lambda f: st.tuples(st.just(f), st.lists(mixes[f], max_size=20), st.lists(mixes[f], max_size=20))))
    def check(case):
        flavor, before, after = case
        for literal in (f"'{SECRET}'", SECRET, f"$${SECRET}$$", f"-{SECRET}"):
            sql = "".join(before) + " " + literal + " " + "".join(after)
            assert SECRET not in sanitize(sql, flavor), sql

    check()
    assert hypothesis is not None
