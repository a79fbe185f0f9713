"""SQLAlchemy Core INSERT on in-memory SQLite, one open Connection, one commit at the end (1 span per op)."""
from sqlalchemy import create_engine, text

from _common import run

engine = create_engine("sqlite://")
conn = engine.connect()
conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, value INTEGER)"))
conn.commit()
statement = text("INSERT INTO items (name, value) VALUES (:name, :value)")


def op(i):
    conn.execute(statement, {"name": "item", "value": i})


if __name__ == "__main__":
    run("sqlalchemy_insert", op, 5000)
    conn.commit()
    conn.close()
