"""SQLAlchemy: one CLIENT span per DBAPI statement execution, for every engine.

Listeners are registered once on the ``Engine`` *class* (``before_cursor_execute``,
``after_cursor_execute``, ``handle_error``), so every engine is traced whenever
and however it was made: before patching, through an early-imported
``create_engine``, ``engine_from_config``, ``create_async_engine`` (its sync
engine) or an ORM ``Session``. ``create_engine`` is never wrapped.

The span is current -- with OTel instrumentation suppressed -- only during the
driver call, so a DBAPI-level plugin (psycopg, asyncpg, ...) adds no duplicate.
Everything derived from an engine (system, namespace, server) is computed once
per engine; everything derived from a statement (sanitised text, operation,
collection, span name, the attribute dict itself) is cached per engine and
statement, so the per-statement work is a couple of dict look-ups.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from autotrace._log import error_once
from autotrace.config import env, semconv_dup
from autotrace.instrumentation import SUPPRESS_INSTRUMENTATION_KEY, Instrumentor

from ._sql import flavor_for, summarize

#: Attribute on the execution context (or connection) holding ``(span, token)``.
_PENDING = "_autotrace_sa_pending"
#: Attribute on a dialect (one per engine) holding its :class:`_EngineInfo`.
_INFO = "_autotrace_sa_info"

DEFAULT_MAX_LENGTH = 2048
#: Distinct statements cached per engine before its cache is reset.
STATEMENT_CACHE_SIZE = 1024

#: SQLAlchemy dialect name -> stable ``db.system.name``.
_SYSTEMS = {
    "postgresql": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
    "db2": "ibm.db2",
    "ibm_db_sa": "ibm.db2",
    "cockroachdb": "cockroachdb",
    "firebird": "firebirdsql",
    "trino": "trino",
    "sybase": "sap.ase",
    "hana": "sap.hana",
    "snowflake": "snowflake",
    "clickhouse": "clickhouse",
    "duckdb": "duckdb",
}
#: Stable name -> the pre-1.26 ``db.system`` value (``database/dup``).
_OLD_SYSTEMS = {"microsoft.sql_server": "mssql", "oracle.db": "oracle", "ibm.db2": "db2", "firebirdsql": "firebird"}
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "microsoft.sql_server": 1433, "oracle.db": 1521}


def db_system(dialect: Any) -> str:
    """``db.system.name`` for a SQLAlchemy dialect (MariaDB told apart from MySQL)."""
    name = getattr(dialect, "name", "") or "other_sql"
    system = _SYSTEMS.get(name, name)
    if system == "mysql" and getattr(dialect, "is_mariadb", False):
        system = "mariadb"
    return system


def _scrub_message(message: str) -> str:
    """First line of a driver message with quoted values and numbers replaced by ``?``."""
    import re

    line = message.strip().split("\n", 1)[0]
    line = re.sub(r"'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?|`[^`]*`?", "?", line)
    return re.sub(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])", "?", line)[:512]


def _status_code(exc: BaseException, system: str) -> Optional[str]:
    for attr in ("sqlstate", "pgcode"):
        code = getattr(exc, attr, None)
        if code:
            return str(code)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return str(code)
    if system in ("mysql", "mariadb"):
        args = getattr(exc, "args", ())
        if args and isinstance(args[0], int):
            return str(args[0])
    return None


def _qualified_name(cls: type) -> str:
    module = cls.__module__
    if module in ("builtins", "__main__") or not module:
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


class _EngineInfo:
    """What is known about one engine, and its statement cache."""

    __slots__ = ("owner", "system", "base", "flavor", "cache", "batch_cache")

    def __init__(self, owner: Any, system: str, base: Dict[str, Any]) -> None:
        self.owner = owner
        self.system = system
        self.base = base
        self.flavor = flavor_for(system)
        # statement -> (span name, attributes); batch_cache: same for executemany
        self.cache: Dict[str, Tuple[str, Dict[str, Any]]] = {}
        self.batch_cache: Dict[str, Tuple[str, Dict[str, Any]]] = {}


class SQLAlchemyInstrumentor(Instrumentor):
    name = "sqlalchemy"
    distribution = "sqlalchemy"
    supported = ">=1.4,<2.2"
    covers = ("sqlalchemy",)
    modules = ("sqlalchemy",)

    def __init__(self) -> None:
        super().__init__()
        self._listeners: List[Tuple[Any, str, Callable[..., Any]]] = []
        reader = env()
        self.raw_query = reader.flag("AUTOTRACE_SQL_RAW_QUERY", False)
        self.max_length = reader.number("AUTOTRACE_SQL_MAX_LENGTH", DEFAULT_MAX_LENGTH, int, minimum=0)
        self.dup = False

    # -- patching -------------------------------------------------------------
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

        reader = env()
        self.raw_query = reader.flag("AUTOTRACE_SQL_RAW_QUERY", False)
        self.max_length = reader.number("AUTOTRACE_SQL_MAX_LENGTH", DEFAULT_MAX_LENGTH, int, minimum=0)
        self.dup = semconv_dup("database")

        before, after, on_error = self._make_listeners(insertmany)
        event.listen(Engine, "before_cursor_execute", before, retval=True)
        self._listeners.append((Engine, "before_cursor_execute", before))
        event.listen(Engine, "after_cursor_execute", after)
        self._listeners.append((Engine, "after_cursor_execute", after))
        event.listen(Engine, "handle_error", on_error)
        self._listeners.append((Engine, "handle_error", on_error))

    def unpatch_extra(self) -> None:
        if not self._listeners:
            return
        from sqlalchemy import event

        while self._listeners:
            target, identifier, fn = self._listeners.pop()
            try:
                event.remove(target, identifier, fn)
            except Exception:
                error_once("sqlalchemy.unpatch", "autotrace: could not remove the SQLAlchemy %s listener", identifier)

    # -- per engine / per statement ------------------------------------------
    def _engine_info(self, conn: Any, dialect: Any) -> _EngineInfo:
        system = db_system(dialect)
        url = conn.engine.url
        base: Dict[str, Any] = {"db.system.name": system}
        database = url.database
        host = url.host
        port = url.port or (_DEFAULT_PORTS.get(system) if host else None)
        if database:
            base["db.namespace"] = database
        if host:
            base["server.address"] = host
        if port:
            base["server.port"] = int(port)
        if self.dup:
            base["db.system"] = _OLD_SYSTEMS.get(system, system)
            if database:
                base["db.name"] = database
            if host:
                base["net.peer.name"] = host
            if port:
                base["net.peer.port"] = int(port)
        info = _EngineInfo(self, system, base)
        # MySQL vs MariaDB is only known once the server version was read.
        if system != "mysql" or getattr(dialect, "server_version_info", None) is not None:
            dialect.__dict__[_INFO] = info
        return info

    def _statement_entry(self, info: _EngineInfo, statement: str, batch: bool) -> Tuple[str, Dict[str, Any]]:
        summary = summarize(statement, info.flavor)
        operation, collection = summary.operation, summary.collection
        if batch:
            operation = "BATCH " + operation if operation else "BATCH"
        text = statement.strip() if self.raw_query else summary.text
        if len(text) > self.max_length:
            text = text[: self.max_length]
        attrs = dict(info.base)
        if operation:
            attrs["db.operation.name"] = operation
        if collection:
            attrs["db.collection.name"] = collection
        if text:
            attrs["db.query.text"] = text
            if self.dup:
                attrs["db.statement"] = text
        if operation and collection:
            name = f"{operation} {collection}"
        else:
            name = operation or info.system
        entry = (name, attrs)
        cache = info.batch_cache if batch else info.cache
        if len(cache) >= STATEMENT_CACHE_SIZE:
            cache.clear()
        cache[statement] = entry
        return entry

    # -- the listeners ----------------------------------------------------------
    def _make_listeners(self, insertmany: Any) -> Tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        instrumentor = self
        get_value = otel_context.get_value
        set_value = otel_context.set_value
        attach = otel_context.attach
        detach = otel_context.detach
        set_span_in_context = trace.set_span_in_context
        suppress_key = SUPPRESS_INSTRUMENTATION_KEY
        client = SpanKind.CLIENT
        statement_entry = self._statement_entry
        engine_info = self._engine_info

        def before_cursor_execute(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool) -> Any:
            try:
                if get_value(suppress_key):
                    return statement, parameters
                if context is not None:
                    holder = context
                    # SQLAlchemy skips handle_error for these (MySQL reflection
                    # probes): a failure could not end the span, so trace none.
                    if context.execution_options.get("skip_user_error_events"):
                        return statement, parameters
                else:
                    holder = conn
                dialect = conn.dialect
                info = dialect.__dict__.get(_INFO)
                if info is None or info.owner is not instrumentor:
                    info = engine_info(conn, dialect)
                size = 0
                if executemany:
                    if insertmany is not None and context is not None and context.execute_style is insertmany:
                        # One multi-row INSERT per page: count the rows it carries.
                        per_row = len(context.parameters[0]) if context.parameters else 0
                        size = len(parameters) // per_row if per_row else 0
                    else:
                        size = len(parameters)
                if size > 1:
                    entry = info.batch_cache.get(statement) or statement_entry(info, statement, True)
                    attrs = dict(entry[1])
                    attrs["db.operation.batch.size"] = size
                else:
                    entry = info.cache.get(statement) or statement_entry(info, statement, False)
                    attrs = entry[1]
                # The SDK copies ``attributes``: the cached dict is never mutated.
                span = instrumentor.tracer.start_span(entry[0], kind=client, attributes=attrs)
                token = attach(set_value(suppress_key, True, set_span_in_context(span)))
                holder.__dict__[_PENDING] = (span, token, info)
            except Exception:
                error_once("sqlalchemy.before_cursor_execute", "autotrace: internal error in sqlalchemy.before_cursor_execute; the program continues, this call may be untraced")
            return statement, parameters

        def after_cursor_execute(conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool) -> None:
            try:
                pending = (context if context is not None else conn).__dict__.pop(_PENDING, None)
                if pending is None:
                    return
                detach(pending[1])
                pending[0].end()
            except Exception:
                error_once("sqlalchemy.after_cursor_execute", "autotrace: internal error in sqlalchemy.after_cursor_execute")

        def handle_error(exception_context: Any) -> None:
            try:
                holder = exception_context.execution_context or exception_context.connection
                if holder is None:
                    return None
                pending = holder.__dict__.pop(_PENDING, None)
                if pending is None:
                    return None
                span, token, info = pending
                detach(token)
                try:
                    instrumentor._record_error(span, exception_context.original_exception, info.system)
                finally:
                    span.end()
            except Exception:
                error_once("sqlalchemy.handle_error", "autotrace: internal error in sqlalchemy.handle_error")
            return None  # never replace the user's exception

        return before_cursor_execute, after_cursor_execute, handle_error

    def _record_error(self, span: Any, exc: BaseException, system: str) -> None:
        if not span.is_recording():
            return
        type_name = _qualified_name(type(exc))
        code = _status_code(exc, system)
        if self.raw_query:
            message = str(exc)
            span.record_exception(exc)
        else:
            # Driver messages quote values ("Key (card)=(4111...) already
            # exists"): keep the first line, values replaced by ``?``.
            message = _scrub_message(str(exc))
            stack = "".join(traceback.format_tb(exc.__traceback__)) + f"{type_name}: {message}\n"
            span.record_exception(exc, attributes={"exception.message": message, "exception.stacktrace": stack})
        if code is not None:
            span.set_attribute("db.response.status_code", code)
        span.set_attribute("error.type", code or type_name)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}"[:1024]))
