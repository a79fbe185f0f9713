"""mysqlclient (``MySQLdb``): one CLIENT span per statement (``execute``, ``executemany``, ``callproc``).

Wrapped at class level when ``MySQLdb`` is first imported:
``MySQLdb.cursors.BaseCursor``, so every cursor class (``Cursor``,
``DictCursor``, ``SSCursor``, ``SSDictCursor``, a program's own) is covered.
``executemany`` may call ``execute`` per row: that stays one span
(``db.operation.batch.size`` = number of parameter sets). mysqlclient's own
set-up (``SET NAMES``, ``sql_mode``, ``init_command``, autocommit) goes
through the C connection, never a cursor, so it makes no span;
``commit()`` / ``rollback()`` are not traced.

``db.system.name`` is ``mariadb`` when the server says so, else ``mysql``;
server, port and database are the connection's ``host`` / ``port`` /
``database`` attributes (mysqlclient 2.2+; older versions give the system
only). The error's errno is ``db.response.status_code``. The rest is
:mod:`autotrace.dbapi`'s.
"""

from __future__ import annotations

from typing import Any

from autotrace.dbapi import DbApiInstrumentor, Facts, mysql_system


class MySQLdbInstrumentor(DbApiInstrumentor):
    name = "mysqldb"
    distribution = "mysqlclient"
    supported = ">=1.4,<3"
    covers = ("mysqlclient",)
    modules = ("MySQLdb",)
    system = "mysql"

    def facts(self, connection: Any) -> Facts:
        database = getattr(connection, "database", None) or getattr(connection, "db", None)
        system = mysql_system(connection.get_server_info())
        return system, database, getattr(connection, "host", None), getattr(connection, "port", None)

    def patch_module(self, module_name: str, module: Any) -> None:
        from MySQLdb import cursors

        spans = self.cursor_spans
        for method in ("execute", "executemany", "callproc"):
            self.wrap(cursors, "BaseCursor." + method, getattr(spans, method))


__all__ = ["MySQLdbInstrumentor"]
