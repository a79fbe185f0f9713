"""PyMySQL: one CLIENT span per statement (``execute``, ``executemany``, ``callproc``).

Wrapped at class level when ``pymysql`` is first imported:
``pymysql.cursors.Cursor`` (so ``DictCursor``, ``SSCursor``, ``SSDictCursor``
and a program's own subclasses are covered). ``executemany`` calls
``execute`` for each row or multi-row page: that stays one span
(``db.operation.batch.size`` = number of parameter sets). ``Connection.connect``
(run by the constructor and by ``ping(reconnect=True)``) runs the
``sql_mode`` / ``init_command`` statements through a cursor: it runs under
:data:`autotrace.db.QUIET`, so set-up makes no span. ``commit()`` /
``rollback()`` are not traced.

``db.system.name`` is ``mariadb`` when the server says so, else ``mysql``;
server, port and database are the connection's ``host`` / ``port`` / ``db``
(the database given at connect: ``select_db()`` later is not followed). The
error's errno is ``db.response.status_code``. The rest is
:mod:`autotrace.dbapi`'s.
"""

from __future__ import annotations

import os
from typing import Any

from autotrace import db
from autotrace.dbapi import DbApiInstrumentor, Facts, mysql_system


class PyMySQLInstrumentor(DbApiInstrumentor):
    name = "pymysql"
    distribution = "PyMySQL"
    supported = ">=1.0,<2"
    covers = ("pymysql",)
    modules = ("pymysql",)
    system = "mysql"

    def facts(self, connection: Any) -> Facts:
        database = connection.db
        database = os.fsdecode(database) if database else None  # bytes once the handshake is done
        host = connection.unix_socket or connection.host
        return mysql_system(connection.server_version), database, host, None if connection.unix_socket else connection.port

    def patch_module(self, module_name: str, module: Any) -> None:
        from pymysql import connections, cursors

        spans = self.cursor_spans
        for method in ("execute", "executemany", "callproc"):
            self.wrap(cursors, "Cursor." + method, getattr(spans, method))
        self.wrap(connections, "Connection.connect", db.QUIET)


__all__ = ["PyMySQLInstrumentor"]
