"""SQLAlchemy: one CLIENT span per DBAPI statement execution, for every engine.

Listeners are registered once on the ``Engine`` *class* (``before_cursor_execute``,
``after_cursor_execute``, ``handle_error``), so every engine is traced whenever
and however it was made: before patching, through an early-imported
``create_engine``, ``engine_from_config``, ``create_async_engine`` (its sync
engine) or an ORM ``Session``. ``create_engine`` is never wrapped.

The span is current -- with OTel instrumentation suppressed -- only during the
driver call, so a DBAPI-level plugin (psycopg, asyncpg, ...) adds no duplicate.
What is known of an engine (system, namespace, server) and of each statement
(sanitised text, operation, collection, span name, the attribute dict itself)
is cached per engine in an :class:`autotrace.db.StatementCache`, so the
per-statement work is a couple of dict look-ups. Spans, attributes and the
error policy are :mod:`autotrace.db`'s; this file reads SQLAlchemy's objects.
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

from autotrace import db
from autotrace.kit import Instrumentor, guard, guarded

#: Attribute on a dialect (one per engine) holding its :class:`autotrace.db.StatementCache`.
_INFO = "_autotrace_sa_info"


def db_system(dialect: Any) -> str:
    """``db.system.name`` for a SQLAlchemy dialect (MariaDB told apart from MySQL)."""
    system = db.system_name(getattr(dialect, "name", ""))
    if system == "mysql" and getattr(dialect, "is_mariadb", False):
        system = "mariadb"
    return system


class SQLAlchemyInstrumentor(Instrumentor):
    name = "sqlalchemy"
    distribution = "sqlalchemy"
    supported = ">=1.4,<2.2"
    covers = ("sqlalchemy",)
    modules = ("sqlalchemy",)

    def __init__(self) -> None:
        super().__init__()
        self._listeners: List[Tuple[Any, str, Callable[..., Any]]] = []

    def patch_module(self, module_name: str, module: Any) -> None:
        if self._listeners:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        try:
            from sqlalchemy.engine.interfaces import ExecuteStyle

            insertmany = ExecuteStyle.INSERTMANYVALUES
        except (ImportError, AttributeError):  # SQLAlchemy 1.4
            insertmany = None
        spans = db.EventSpans(self, _describer(db.SqlSettings(), insertmany), site="sqlalchemy.statement")
        start, end = spans.start, spans.end

        def before_cursor_execute(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool) -> Any:
            start(conn if context is None else context, (conn, statement, parameters, context, executemany))
            return statement, parameters

        def after_cursor_execute(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool) -> None:
            end(conn if context is None else context)

        @guarded("sqlalchemy.handle_error")
        def handle_error(exception_context: Any) -> None:
            end(exception_context.execution_context or exception_context.connection, exception_context.original_exception)
            # None: never replace the user's exception

        for identifier, fn, retval in (
            ("before_cursor_execute", before_cursor_execute, True),
            ("after_cursor_execute", after_cursor_execute, False),
            ("handle_error", handle_error, False),
        ):
            event.listen(Engine, identifier, fn, retval=retval)
            self._listeners.append((Engine, identifier, fn))
        # A new pool connection: the DBAPI connect, the dialect's first-connect queries (select version(),
        # show standard_conforming_strings ...), on-connect hooks and pre-ping make no driver spans.
        from sqlalchemy.pool import base as pool_base

        self.wrap(pool_base, "_ConnectionFairy._checkout", db.QUIET)

    def unpatch_extra(self) -> None:
        if not self._listeners:
            return
        from sqlalchemy import event

        while self._listeners:
            target, identifier, fn = self._listeners.pop()
            with guard("sqlalchemy.unpatch"):
                event.remove(target, identifier, fn)


def _describer(settings: db.SqlSettings, insertmany: Any) -> Callable[[Any], Any]:
    """``describe`` of one statement, from the arguments of ``before_cursor_execute``."""

    def describe(event: Any) -> Any:
        conn, statement, parameters, context, executemany = event
        # SQLAlchemy skips handle_error for these (MySQL reflection probes):
        # a failure could not end the span, so trace none.
        if context is not None and context.execution_options.get("skip_user_error_events"):
            return None
        dialect = conn.dialect
        cache = dialect.__dict__.get(_INFO)
        if cache is None or cache.settings is not settings:
            cache = _engine_cache(conn, dialect, settings)
        if executemany:
            if insertmany is not None and context is not None and context.execute_style is insertmany:
                # One multi-row INSERT per page: count the rows it carries.
                per_row = len(context.parameters[0]) if context.parameters else 0
                size = len(parameters) // per_row if per_row else 0
            else:
                size = len(parameters)
            if size > 1:
                return cache.batch_entry(statement, size)
        return cache.single.get(statement) or cache.build(statement)

    return describe


def _engine_cache(conn: Any, dialect: Any, settings: db.SqlSettings) -> db.StatementCache:
    system = db_system(dialect)
    url = conn.engine.url
    cache = db.StatementCache(settings, system, url.database, url.host, url.port)
    # MySQL vs MariaDB is only known once the server version was read.
    if system != "mysql" or getattr(dialect, "server_version_info", None) is not None:
        dialect.__dict__[_INFO] = cache
    return cache
