"""Flask request through the in-process WSGI test client (1 server span per op)."""
from flask import Flask

from _common import run

app = Flask("bench_flask")


@app.route("/users/<int:user_id>")
def user(user_id):
    return {"id": user_id, "name": "bench"}


client = app.test_client()


def op(i):
    response = client.get("/users/42?page=1")
    assert response.status_code == 200


if __name__ == "__main__":
    run("flask_wsgi", op, 3000)
