"""A Flask app under ``autotrace-run`` querying PostgreSQL with psycopg directly, spans at a real OTLP receiver.

The test process makes the table (untraced) and calls the app with
``requests``; the child is patched only by the agent's post-import hooks (the
``psycopg`` and ``flask`` entry points). One request = one trace: the SERVER
span and, as its children, one CLIENT span per statement -- none for the
connection set-up, no literal, no bound parameter.
"""

from __future__ import annotations

import json
import textwrap
import uuid

import pytest

from tests.support.processes import free_port, start_traced, stop, wait_for_port
from tests.support.receiver import OTLPReceiver
from tests.support.services import POSTGRES, POSTGRES_DSN, require

psycopg = pytest.importorskip("psycopg")
requests = pytest.importorskip("requests")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CARD = "4111-1111"
SECRET = "SECRET-PARAM-31415"

APP = textwrap.dedent(
    """
    import sys

    import psycopg
    from flask import Flask, jsonify

    DSN, TABLE, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app = Flask("orders")

    @app.route("/orders/<int:order_id>")
    def order(order_id):
        with psycopg.connect(DSN) as conn:
            row = conn.execute(
                f"SELECT id, card FROM {TABLE} WHERE card <> '%CARD%' AND amount > 4111 AND id = %s", (order_id,)
            ).fetchone()
            conn.cursor().executemany(f"UPDATE {TABLE} SET amount = amount + 1 WHERE card = %s", [("%SECRET%",), ("x",)])
        return jsonify(list(row))

    @app.route("/broken")
    def broken():
        with psycopg.connect(DSN) as conn:
            try:
                conn.execute("SELEC '%CARD%'")
            except psycopg.errors.SyntaxError:
                return "syntax error", 500
        return "unreachable"

    if __name__ == "__main__":
        app.run(host="127.0.0.1", port=PORT, threaded=True)
    """
).replace("%CARD%", CARD).replace("%SECRET%", SECRET)


@pytest.fixture
def table():
    require(POSTGRES)
    name = "at_dbapi_" + uuid.uuid4().hex[:10]
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id INT PRIMARY KEY, card TEXT, amount INT)")
        conn.execute(f"INSERT INTO {name} VALUES (7, 'c-7', 5000)")
    yield name
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_flask_psycopg_one_trace_per_request(tmp_path, table):
    (tmp_path / "orders.py").write_text(APP)
    port = free_port()
    with OTLPReceiver() as receiver:
        env = {**receiver.env(), "OTEL_SERVICE_NAME": "orders"}
        process = start_traced(["python", "orders.py", POSTGRES_DSN, table, str(port)], env=env, cwd=str(tmp_path))
        try:
            wait_for_port(port, timeout=30, process=process)
            base = f"http://127.0.0.1:{port}"
            response = requests.get(f"{base}/orders/7", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}, timeout=10)
            assert response.status_code == 200 and response.json() == [7, "c-7"]
            assert requests.get(f"{base}/broken", timeout=10).status_code == 500
            spans = receiver.wait_for(lambda s: len(s) >= 5, timeout=20)
        finally:
            out, err = stop(process)
    assert "Traceback" not in err, err

    server = {s.name: s for s in spans if s.kind == "SERVER"}
    assert set(server) == {"GET /orders/<int:order_id>", "GET /broken"}
    client = [s for s in spans if s.kind == "CLIENT"]
    assert len(spans) == 5, [(s.kind, s.name) for s in spans]

    order = server["GET /orders/<int:order_id>"]
    assert order.trace_id == TRACE_ID and order.parent_span_id == PARENT_ID
    select, batch = sorted((s for s in client if s.trace_id == TRACE_ID), key=lambda s: s.name, reverse=True)
    for span in (select, batch):
        assert span.parent_span_id == order.span_id
        assert span.attributes["db.system.name"] == "postgresql"
        assert span.attributes["db.namespace"] == "test"
        assert span.attributes["server.address"] == "127.0.0.1" and span.attributes["server.port"] == 5432
    assert select.name == f"SELECT {table}"
    assert select.attributes["db.query.text"] == f"SELECT id, card FROM {table} WHERE card <> ? AND amount > ? AND id = %s"
    assert batch.name == f"BATCH UPDATE {table}" and batch.attributes["db.operation.batch.size"] == 2

    broken = server["GET /broken"]
    [failed] = [s for s in client if s.trace_id == broken.trace_id]
    assert failed.parent_span_id == broken.span_id
    assert failed.status == "ERROR" and failed.attributes["db.response.status_code"] == "42601"

    exported = json.dumps([[s.name, s.attributes, s.events, s.status_message] for s in spans], default=str)
    assert CARD not in exported and SECRET not in exported
