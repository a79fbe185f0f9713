"""psycopg2: one CLIENT span per statement (``execute``, ``executemany``, ``callproc``).

psycopg2's connection and cursor are C types whose methods cannot be patched.
So ``psycopg2.connect`` is wrapped when ``psycopg2`` is first imported (the
post-import hook runs right after that import: a later
``from psycopg2 import connect`` gets the wrapped one) and hands the driver a
traced subclass of the connection class -- the program's own
``connection_factory`` (subclassed), or ``psycopg2.extensions.connection``.
That connection's ``cursor()`` in turn makes a traced subclass of whichever
cursor class applies (``cursor_factory=`` of the call, of ``connect()`` or set
on the connection: ``RealDictCursor``, ``NamedTupleCursor``, a program's own),
so named cursors and ``psycopg2.extras`` helpers are traced as well.

Limits: connections made before autotrace started, or by a ``connect``
bound before the import hook ran, are not traced; a ``connection_factory`` or
``cursor_factory`` that is a plain function rather than a class is used as it
is, untraced. psycopg2 runs no statement of its own through a cursor at
connect. ``commit()`` / ``rollback()`` are not traced. Server, port and
database come from ``get_dsn_parameters()``; the rest is
:mod:`autotrace.dbapi`'s.
"""

from __future__ import annotations

from typing import Any

from autotrace.dbapi import DbApiInstrumentor, Facts, installed


class Psycopg2Instrumentor(DbApiInstrumentor):
    name = "psycopg2"
    distribution = "psycopg2"  # or psycopg2-binary: see __init__
    supported = ">=2.7,<3"
    covers = ("psycopg2",)
    modules = ("psycopg2",)
    system = "postgresql"

    def __init__(self) -> None:
        super().__init__()
        self.distribution = installed("psycopg2", "psycopg2-binary")

    def facts(self, connection: Any) -> Facts:
        dsn = connection.get_dsn_parameters()
        return "postgresql", dsn.get("dbname"), dsn.get("host"), dsn.get("port")

    def patch_module(self, module_name: str, module: Any) -> None:
        from psycopg2 import extensions

        spans = self.cursor_spans
        cursors = {"execute": spans.execute, "executemany": spans.executemany, "callproc": spans.callproc}
        cursor = self.factory_argument(
            1, "cursor_factory", extensions.cursor, cursors, lambda conn: conn.cursor_factory or extensions.cursor
        )
        connect = self.factory_argument(1, "connection_factory", extensions.connection, {"cursor": cursor})
        self.wrap(module, "connect", connect)


__all__ = ["Psycopg2Instrumentor"]
