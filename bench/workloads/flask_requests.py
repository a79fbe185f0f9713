"""Flask served over real HTTP (werkzeug server in a thread), called with requests.

Per op: one server span (Flask) and one client span (requests). The client keeps
one requests.Session (HTTP/1.1 keep-alive), so the op is request + response,
not a TCP connect.
"""
import logging
import threading

import requests
from flask import Flask
from werkzeug.serving import make_server

from _common import run

logging.getLogger("werkzeug").setLevel(logging.ERROR)
app = Flask("bench_flask_http")


@app.route("/users/<int:user_id>")
def user(user_id):
    return {"id": user_id, "name": "bench"}


if __name__ == "__main__":
    server = make_server("127.0.0.1", 0, app, threaded=True)
    port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    session = requests.Session()
    url = f"http://127.0.0.1:{port}/users/42?page=1"

    def op(i):
        response = session.get(url)
        assert response.status_code == 200

    run("flask_requests", op, 2000)
    session.close()
    server.shutdown()
