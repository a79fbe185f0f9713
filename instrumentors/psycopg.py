"""psycopg 3: one CLIENT span per statement, sync and asyncio.

Wrapped at class level when ``psycopg`` is first imported (the statement
methods are Python methods, so subclasses -- ``ClientCursor``, ``RawCursor``,
a program's own -- are covered too):

* ``Cursor`` / ``AsyncCursor``: ``execute``, ``executemany``
  (``db.operation.batch.size``) and ``stream`` (the span lasts until the rows
  are read). ``Connection.execute`` goes through ``Cursor.execute``.
* ``ServerCursor`` / ``AsyncServerCursor``: ``execute`` (the ``DECLARE``);
  their ``fetch*`` round trips add no span.

Server, port and database come from ``conn.info``. psycopg itself issues no
statement of its own through these methods. Not traced: ``copy()``,
``commit()`` / ``rollback()``; in pipeline mode a span covers the sending of
its statement, not the wait for its result. Everything else is
:mod:`autotrace.dbapi`'s.
"""

from __future__ import annotations

from typing import Any

from autotrace.dbapi import DbApiInstrumentor, Facts


class PsycopgInstrumentor(DbApiInstrumentor):
    name = "psycopg"
    distribution = "psycopg"
    supported = ">=3.0,<4"
    covers = ("psycopg",)
    modules = ("psycopg",)
    system = "postgresql"
    connection_attribute = "_conn"  # the slot behind Cursor.connection

    def facts(self, connection: Any) -> Facts:
        info = connection.info
        return "postgresql", info.dbname, info.host, info.port

    def patch_module(self, module_name: str, module: Any) -> None:
        spans = self.cursor_spans
        for cursor in ("Cursor", "AsyncCursor"):
            self.wrap(module, cursor + ".execute", spans.execute)
            self.wrap(module, cursor + ".executemany", spans.executemany)
            self.wrap(module, cursor + ".stream", spans.stream)
        for cursor in ("ServerCursor", "AsyncServerCursor"):
            self.wrap(module, cursor + ".execute", spans.execute)


__all__ = ["PsycopgInstrumentor"]
