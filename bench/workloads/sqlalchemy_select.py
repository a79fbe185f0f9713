"""SQLAlchemy Core SELECT by primary key on in-memory SQLite, one open Connection (1 span per op)."""
from sqlalchemy import create_engine, text

from _common import run

engine = create_engine("sqlite://")
conn = engine.connect()
conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, value INTEGER)"))
conn.execute(text("INSERT INTO items (id, name, value) VALUES (:id, :name, :value)"),
             [{"id": i, "name": f"item{i}", "value": i} for i in range(100)])
conn.commit()
query = text("SELECT id, name, value FROM items WHERE id = :id")


def op(i):
    rows = conn.execute(query, {"id": i % 100}).all()
    assert len(rows) == 1


if __name__ == "__main__":
    run("sqlalchemy_select", op, 5000)
    conn.close()
