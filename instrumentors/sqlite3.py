"""sqlite3 (the standard library): one CLIENT span per statement.

sqlite3's ``Connection`` and ``Cursor`` are C types whose methods cannot be
patched. So ``sqlite3.connect`` (and ``sqlite3.dbapi2.connect``, which
SQLAlchemy calls) is wrapped when ``sqlite3`` is first imported -- the
post-import hook runs right after that import, so a later
``from sqlite3 import connect`` gets the wrapped one -- and hands sqlite3 a
traced subclass of the connection class: the program's own ``factory=``
(subclassed) or ``sqlite3.Connection``. Traced on it: the ``execute`` /
``executemany`` / ``executescript`` shortcuts, and ``cursor()``, which makes a
traced subclass of the cursor class asked for (``factory=`` or
``sqlite3.Cursor``) with the same three methods. ``db.namespace`` is the
database argument of ``connect()`` (a file name, ``:memory:``, a URI).

aiosqlite runs sqlite3 in a worker thread: its ``Connection._execute`` is
wrapped to carry the caller's context there, so the statements of an
aiosqlite program are children of the span current where they were awaited
(and under SQLAlchemy's aiosqlite dialect they stay one span).

Limits: connections made before autotrace started, or by a ``connect``
bound before the import hook ran, are not traced; a ``factory`` that is a
function rather than a class is used as it is, untraced. ``commit()`` /
``rollback()`` are not traced. The rest is :mod:`autotrace.dbapi`'s.
"""

from __future__ import annotations

import contextvars
import os
from typing import Any, Dict, Tuple

from autotrace.dbapi import DbApiInstrumentor, Facts
from autotrace.kit import arg

_DATABASE = "_autotrace_sqlite_database"


def _remember_database(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    wrapped(*args, **kwargs)
    database = arg(args, kwargs, 0, "database")
    instance.__dict__[_DATABASE] = os.fsdecode(database) if isinstance(database, (str, bytes, os.PathLike)) else None


def _statements(spans: Any) -> Dict[str, Any]:
    return {"execute": spans.execute, "executemany": spans.executemany, "executescript": spans.execute}


def _in_caller_context(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    # aiosqlite's _execute(fn, *args, **kwargs) queues fn for its thread: queue ctx.run(fn, ...) instead.
    return wrapped(contextvars.copy_context().run, *args, **kwargs)


class Sqlite3Instrumentor(DbApiInstrumentor):
    name = "sqlite3"
    distribution = ""  # the standard library's
    covers = ("sqlite3",)
    modules = ("sqlite3", "aiosqlite.core")
    system = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.connection_spans = self.spans()  # the execute / executemany / executescript shortcuts

    def facts(self, connection: Any) -> Facts:
        return "sqlite", connection.__dict__.get(_DATABASE), None, None

    def patch_module(self, module_name: str, module: Any) -> None:
        if module_name == "aiosqlite.core":
            self.wrap(module, "Connection._execute", _in_caller_context)
            return
        cursor = self.factory_argument(0, "factory", module.Cursor, _statements(self.cursor_spans))
        methods = dict(_statements(self.connection_spans), cursor=cursor, __init__=_remember_database)
        connect = self.factory_argument(5, "factory", module.Connection, methods)
        self.wrap(module, "connect", connect)
        self.wrap(module, "dbapi2.connect", connect)


__all__ = ["Sqlite3Instrumentor"]
