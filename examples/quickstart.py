"""autotrace quick start: a tiny Flask shop, with no tracing code in it.

    pip install 'autotrace[example]'
    autotrace-run --exporter tree python examples/quickstart.py

The app keeps its data in SQLite through SQLAlchemy (in memory: no services
needed) and calls another of its own routes over real HTTP with requests. It
starts on a free port, makes two requests (one for a missing order), prints the answers and
exits; autotrace prints each request's trace as a tree on stderr.
"""

import logging
import threading

import requests
from flask import Flask, jsonify
from sqlalchemy import create_engine, text
from sqlalchemy.pool import StaticPool
from werkzeug.serving import make_server

engine = create_engine(
    "sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool
)
with engine.begin() as db:
    db.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, quantity INTEGER)"))
    db.execute(text("CREATE TABLE stock (item TEXT PRIMARY KEY, available INTEGER)"))
    db.execute(text("INSERT INTO orders VALUES (1, 'teapot', 2), (2, 'kettle', 1)"))
    db.execute(text("INSERT INTO stock VALUES ('teapot', 12), ('kettle', 0)"))

app = Flask("shop")
base_url = ""  # set once the server has a port


@app.get("/orders/<int:order_id>")
def get_order(order_id):
    with engine.connect() as db:
        row = db.execute(
            text("SELECT item, quantity FROM orders WHERE id = :id"), {"id": order_id}
        ).first()
    if row is None:
        return jsonify(error=f"no order {order_id}"), 404
    # Another service in real life; here the same app, over real HTTP.
    stock = requests.get(f"{base_url}/stock/{row.item}", timeout=5).json()
    return jsonify(order=order_id, item=row.item, quantity=row.quantity,
                   in_stock=stock["available"] >= row.quantity)


@app.get("/stock/<item>")
def get_stock(item):
    with engine.connect() as db:
        available = db.execute(
            text("SELECT available FROM stock WHERE item = :item"), {"item": item}
        ).scalar()
    return jsonify(item=item, available=available or 0)


def main():
    global base_url
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log lines
    server = make_server("127.0.0.1", 0, app, threaded=True)
    base_url = f"http://127.0.0.1:{server.port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for order_id in (1, 42):
            response = requests.get(f"{base_url}/orders/{order_id}", timeout=5)
            print(f"GET /orders/{order_id} -> {response.status_code} {response.text.strip()}")
    finally:
        server.shutdown()
        thread.join()


if __name__ == "__main__":
    main()
