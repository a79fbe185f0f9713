"""What every SQL client instrumentor shares: systems, statement attributes, the error policy, event spans.

An ORM or DB-API driver instrumentor reads its library's objects (which
server, which database, which statement, which exception); everything
database-generic is here, once:

* :data:`SYSTEMS` / :func:`system_name` -- stable ``db.system.name`` values
  (v1.44.0) from the short names libraries use (``mssql``, ``oracle``);
  :data:`OLD_SYSTEMS` -- the pre-1.26 ``db.system`` value for
  ``database/dup``; :data:`DEFAULT_PORTS`.
* :class:`SqlSettings` -- ``AUTOTRACE_SQL_RAW_QUERY``,
  ``AUTOTRACE_SQL_MAX_LENGTH`` and ``database/dup``, read once at patch time.
* :func:`connection_attributes` -- ``db.system.name``, ``db.namespace``,
  ``server.address`` / ``server.port`` (and the old names under dup).
* :class:`StatementCache` -- one per engine or connection: statement ->
  ``(span name, attributes, error policy)``, the sanitised ``db.query.text``
  (:mod:`autotrace.sql`), ``db.operation.name``, ``db.collection.name``, the
  ``BATCH`` variant with ``db.operation.batch.size``. The entry is what a
  :class:`autotrace.kit.CallSpan` ``describe`` returns as it is, and its third
  item is the ``state`` the kit hands to :func:`record`.
* :func:`record` -- the error policy: ``db.response.status_code`` (SQLSTATE,
  psycopg2's ``pgcode``, SQLite's extended code, MySQL's errno), the driver's
  message scrubbed of values, ``error.type`` = the code, else the type.
* :class:`EventSpans` -- the start / end pair for libraries that announce a
  statement through hooks rather than one call to wrap (SQLAlchemy's
  ``before_cursor_execute`` / ``after_cursor_execute`` / ``handle_error``).
* :data:`QUIET` -- the wrapper for a driver's own housekeeping (pool reset,
  transaction control, connection set-up): nothing inside it is traced.

Hot path: a statement seen before costs one dict look-up in its
:class:`StatementCache` (the entry, attribute dict included, is reused; the
SDK copies the attributes it is given).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Dict, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind

from autotrace._log import internal_error
from autotrace.config import env, semconv_dup
from autotrace.kit import (
    CLIENT,
    SUPPRESS_DB_INSTRUMENTATION_KEY,
    SUPPRESS_INSTRUMENTATION_KEY,
    Instrumentor,
    Suppress,
    record_error,
    span_context,
    suppressed,
)
from autotrace.sql import flavor_for, summarize

__all__ = [
    "SYSTEMS", "OLD_SYSTEMS", "DEFAULT_PORTS", "system_name", "SqlSettings", "connection_attributes",
    "StatementCache", "ErrorPolicy", "record", "status_code", "scrub_message", "EventSpans", "QUIET",
    "RAW_QUERY_ENV", "MAX_LENGTH_ENV", "DEFAULT_MAX_LENGTH", "STATEMENT_CACHE_SIZE",
]

RAW_QUERY_ENV = "AUTOTRACE_SQL_RAW_QUERY"
MAX_LENGTH_ENV = "AUTOTRACE_SQL_MAX_LENGTH"
DEFAULT_MAX_LENGTH = 2048
#: Distinct statements cached per engine / connection before its cache is reset.
STATEMENT_CACHE_SIZE = 1024

#: Short database names (SQLAlchemy dialect names, URL schemes) -> stable ``db.system.name``.
SYSTEMS = {
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
#: Stable name -> the pre-1.26 ``db.system`` value (``database/dup``); others are the same in both.
OLD_SYSTEMS = {"microsoft.sql_server": "mssql", "oracle.db": "oracle", "ibm.db2": "db2", "firebirdsql": "firebird"}
#: ``server.port`` when a host is known but no port was given.
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "microsoft.sql_server": 1433, "oracle.db": 1521}


def system_name(name: Optional[str]) -> str:
    """The stable ``db.system.name`` for a short name; unknown names pass through, none is ``other_sql``."""
    name = name or "other_sql"
    return SYSTEMS.get(name, name)


class SqlSettings:
    """The switches of every SQL instrumentor, read from the environment when constructed (at patch time).

    ``raw_query`` (``AUTOTRACE_SQL_RAW_QUERY``): the statement and the error
    message as they are, literals included. ``max_length``
    (``AUTOTRACE_SQL_MAX_LENGTH``): ``db.query.text`` is cut there. ``dup``:
    ``OTEL_SEMCONV_STABILITY_OPT_IN=database/dup`` adds the old names.
    """

    __slots__ = ("raw_query", "max_length", "dup")

    def __init__(self) -> None:
        reader = env()
        self.raw_query = reader.flag(RAW_QUERY_ENV, False)
        self.max_length = reader.number(MAX_LENGTH_ENV, DEFAULT_MAX_LENGTH, int, minimum=0)
        self.dup = semconv_dup("database")


def connection_attributes(
    system: str, namespace: Optional[str] = None, host: Optional[str] = None, port: Any = None, dup: bool = False
) -> Dict[str, Any]:
    """The attributes every statement on one server and database shares.

    ``port`` defaults to the system's usual one when a ``host`` is known
    (a file or in-memory database has neither).
    """
    attrs: Dict[str, Any] = {"db.system.name": system}
    port = port or (DEFAULT_PORTS.get(system) if host else None)
    if namespace:
        attrs["db.namespace"] = namespace
    if host:
        attrs["server.address"] = host
    if port:
        attrs["server.port"] = int(port)
    if dup:
        attrs["db.system"] = OLD_SYSTEMS.get(system, system)
        if namespace:
            attrs["db.name"] = namespace
        if host:
            attrs["net.peer.name"] = host
        if port:
            attrs["net.peer.port"] = int(port)
    return attrs


class ErrorPolicy:
    """What :func:`record` needs to know about a failed statement's database (no reference back)."""

    __slots__ = ("system", "raw_query")

    def __init__(self, system: str, raw_query: bool) -> None:
        self.system = system
        self.raw_query = raw_query


Entry = Tuple[str, Dict[str, Any], ErrorPolicy]


class StatementCache:
    """Statement -> ``(span name, attributes, error policy)`` for one engine or connection.

    Hot path, inlined by the caller::

        entry = cache.single.get(statement) or cache.build(statement)

    ``batch_entry(statement, size)`` for an ``executemany`` of ``size`` > 1
    parameter sets. ``settings`` tells which settings the cache was built
    with: a cache kept on a library object from an earlier patching is
    replaced when ``cache.settings is not`` the current ones. The attribute
    dicts are shared between calls: never modify one (the SDK copies them).
    """

    __slots__ = ("settings", "system", "base", "flavor", "errors", "single", "batch")

    def __init__(
        self, settings: SqlSettings, system: str, namespace: Optional[str] = None, host: Optional[str] = None, port: Any = None
    ) -> None:
        self.settings = settings
        self.system = system
        self.base = connection_attributes(system, namespace, host, port, settings.dup)
        self.flavor = flavor_for(system)
        self.errors = ErrorPolicy(system, settings.raw_query)
        self.single: Dict[str, Entry] = {}
        self.batch: Dict[str, Entry] = {}

    def build(self, statement: str, batch: bool = False) -> Entry:
        """Compute and cache the entry of a statement not seen yet (``batch``: the executemany variant)."""
        settings = self.settings
        summary = summarize(statement, self.flavor)
        operation, collection = summary.operation, summary.collection
        if batch:
            operation = "BATCH " + operation if operation else "BATCH"
        text = statement.strip() if settings.raw_query else summary.text
        if len(text) > settings.max_length:
            text = text[: settings.max_length]
        attrs = dict(self.base)
        if operation:
            attrs["db.operation.name"] = operation
        if collection:
            attrs["db.collection.name"] = collection
        if text:
            attrs["db.query.text"] = text
            if settings.dup:
                attrs["db.statement"] = text
        if operation and collection:
            name = f"{operation} {collection}"
        else:
            name = operation or self.system
        entry = (name, attrs, self.errors)
        cache = self.batch if batch else self.single
        if len(cache) >= STATEMENT_CACHE_SIZE:
            cache.clear()
        cache[statement] = entry
        return entry

    def batch_entry(self, statement: str, size: int) -> Entry:
        """The entry of one ``executemany`` of ``size`` parameter sets: ``BATCH`` operation, ``db.operation.batch.size``."""
        entry = self.batch.get(statement) or self.build(statement, True)
        attrs = dict(entry[1])
        attrs["db.operation.batch.size"] = size
        return entry[0], attrs, entry[2]


# --------------------------------------------------------------------------
# Errors

# Compiled at the first error (re's own cache), not at import.
_QUOTED = r"'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?|`[^`]*`?"
_NUMBER = r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])"


def scrub_message(message: str) -> str:
    """First line of a driver message, quoted values and numbers replaced by ``?`` (at most 512 characters).

    Drivers echo values into their messages (``Key (card)=(4111...) already exists``).
    """
    line = message.strip().split("\n", 1)[0]
    return re.sub(_NUMBER, "?", re.sub(_QUOTED, "?", line))[:512]


def status_code(exc: BaseException, system: str = "") -> Optional[str]:
    """``db.response.status_code`` of a driver exception, or None.

    SQLSTATE (psycopg 3 and asyncpg ``sqlstate``, psycopg2 ``pgcode``),
    SQLite's ``sqlite_errorcode`` (Python 3.11+), and for MySQL / MariaDB the
    errno that PyMySQL and mysqlclient put first in ``args``.
    """
    if system in ("mysql", "mariadb"):  # the errno first: PyMySQL 1.2 also sets a generic sqlstate
        args = getattr(exc, "args", ())
        if args and isinstance(args[0], int):
            return str(args[0])
    for attr in ("sqlstate", "pgcode"):
        code = getattr(exc, attr, None)
        if code:
            return str(code)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return str(code)
    return None


def _message(exc: BaseException, system: str) -> str:
    """The driver's own text: MySQL drivers keep it in ``args[1]`` (``str(exc)`` is the args tuple)."""
    args = getattr(exc, "args", ())
    if system in ("mysql", "mariadb") and len(args) >= 2 and isinstance(args[0], int) and isinstance(args[1], str):
        return args[1]
    return str(exc)


def record(span: Span, exc: BaseException, policy: Optional[ErrorPolicy]) -> None:
    """Mark ``span`` failed by a statement's ``exc``: the ``record`` hook of a CallSpan or :class:`EventSpans`.

    ``policy``: the third item of the statement's entry. The message is
    scrubbed (:func:`scrub_message`) unless raw queries were asked for;
    ``error.type`` is the status code when there is one.
    """
    if not span.is_recording():
        return
    system = policy.system if policy is not None else ""
    code = status_code(exc, system)
    raw = policy is not None and policy.raw_query
    record_error(
        span,
        exc,
        message=None if raw else scrub_message(_message(exc, system)),
        error=code,
        attributes=None if code is None else {"db.response.status_code": code},
    )


# --------------------------------------------------------------------------
# Spans opened and closed by a library's hooks

_HELD = "_autotrace_event_span"


class EventSpans:
    """The span of an operation a library announces through hooks: started in one, ended in another.

    ``describe(event)`` reads the library's objects (``event``: whatever the
    hook passes to :meth:`start`) and returns None (no span) or
    ``(name, attributes[, state])`` -- a :class:`StatementCache` entry as it is.

    ``start(holder, event)``: unless instrumentation is suppressed, start the
    span and make it current, with ``suppress`` set (default: everything, so
    a driver below adds nothing) and :data:`SUPPRESS_DB_INSTRUMENTATION_KEY`
    too; it is kept on ``holder`` (an object with a ``__dict__`` that the end
    hook sees again: an execution context, a connection).
    ``end(holder, exc=None)``: restore the previous context and end the span
    held on ``holder``, with ``exc`` recorded by ``record(span, exc, state)``
    (default :func:`record`); nothing when none is held (``holder`` may be None).

    Both never raise: our failures are reported once per site and the
    library's own work goes on. Call ``start`` and ``end`` on one thread, in
    order (the context is attached in one and detached in the other).
    """

    __slots__ = ("start", "end", "site")

    def __init__(
        self,
        instrumentor: Instrumentor,
        describe: Callable[[Any], Any],
        record: Callable[[Span, BaseException, Any], None] = record,
        kind: SpanKind = CLIENT,
        suppress: Any = Suppress.ALL,
        site: Optional[str] = None,
    ) -> None:
        # Everything bound locally: the two hooks run per statement.
        self.site = site = site or f"{instrumentor.name}.{getattr(describe, '__name__', 'event')}"
        suppress_all = SUPPRESS_INSTRUMENTATION_KEY
        stand_down_key = suppress if suppress is not suppress_all else None
        db_key = SUPPRESS_DB_INSTRUMENTATION_KEY
        get_current = otel_context.get_current
        attach = otel_context.attach
        detach = otel_context.detach
        make_context = span_context
        set_item = dict.__setitem__  # on our own fresh copy of the context (see kit.span_context)
        held = _HELD
        start_site = site + ".start"
        end_site = site + ".end"

        def start(holder: Any, event: Any) -> None:
            current = get_current()
            if current.get(suppress_all) or (stand_down_key is not None and current.get(stand_down_key)):
                return
            span = None
            try:
                namespace = holder.__dict__
                plan = describe(event)
                if plan is None:
                    return
                tracer = instrumentor._tracer or instrumentor.tracer
                span = tracer.start_span(plan[0], current, kind, plan[1])
                ctx = make_context(span, current, suppress)
                set_item(ctx, db_key, True)
                namespace[held] = (span, attach(ctx), plan[2] if len(plan) > 2 else None)
            except Exception:
                internal_error(start_site)
                if span is not None:
                    try:
                        span.end()
                    except Exception:
                        internal_error(end_site)

        def end(holder: Any, exc: Optional[BaseException] = None) -> None:
            pending = None
            try:
                pending = holder.__dict__.pop(held, None) if holder is not None else None
                if pending is None:
                    return
                detach(pending[1])
                if exc is not None:
                    record(pending[0], exc, pending[2])
            except Exception:
                internal_error(end_site)
                if pending is None:
                    return
            try:
                pending[0].end()
            except Exception:
                internal_error(end_site)

        self.start, self.end = start, end


# --------------------------------------------------------------------------
# A driver's own statements


def _quiet_sync(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    with suppressed():
        return wrapped(*args, **kwargs)


def _quiet_awaitable(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    # The call itself runs now, as unpatched (a decorator's checks raise at the call); its awaitable, quietly.
    return _quietly(wrapped(*args, **kwargs))


async def _quietly(awaitable: Any) -> Any:
    with suppressed():
        return await awaitable


class _Quiet:
    """See :data:`QUIET`."""

    __slots__ = ()

    def for_target(self, target: Any) -> Callable[..., Any]:
        function = getattr(target, "__func__", target)
        if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__wrapped__", None)):
            return _quiet_awaitable
        return _quiet_sync


#: ``self.wrap(module, "Pool.release", db.QUIET)``: the statements a driver runs by itself
#: inside the wrapped method (a pool's reset queries, BEGIN / COMMIT of a transaction
#: object, a connection's set-up probes) make no span -- nothing inside it is traced.
#: Coroutine functions, and sync functions decorated over one (``functools.wraps``,
#: e.g. asyncpg's ``connresource.guarded``), are quiet while awaited; others while called.
QUIET = _Quiet()
