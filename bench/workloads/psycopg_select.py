"""psycopg 3 SELECT by primary key on PostgreSQL 127.0.0.1:5432 db test (1 client span per op).

One connection (autocommit, so no transaction stays open on the shared server)
and one cursor for the whole run; the op is ``cursor.execute`` of a
parameterised ``SELECT ... WHERE id = %s`` + ``fetchall``. The table has the
process id in its name, is created here and dropped at the end.
"""
import os

import psycopg

from _common import run

DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
TABLE = f"autotrace_bench_items_{os.getpid():07d}"  # fixed length: same SQL size in every run

if __name__ == "__main__":
    conn = psycopg.connect(DSN, autocommit=True)
    cursor = conn.cursor()
    cursor.execute(f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, name TEXT, value INTEGER)")
    try:
        cursor.executemany(f"INSERT INTO {TABLE} (id, name, value) VALUES (%s, %s, %s)", [(i, f"item{i}", i) for i in range(100)])
        query = f"SELECT id, name, value FROM {TABLE} WHERE id = %s"

        def op(i):
            cursor.execute(query, (i % 100,))
            assert len(cursor.fetchall()) == 1

        run("psycopg_select", op, 3000)
    finally:
        cursor.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.close()
