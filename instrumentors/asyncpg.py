"""asyncpg: one CLIENT span per statement a program runs, none for what asyncpg runs by itself.

What is wrapped (at class level, when ``asyncpg`` is first imported) -- the
public methods, each of which is exactly one statement:

* ``Connection.execute`` / ``fetch`` / ``fetchval`` / ``fetchrow`` (pool
  methods and pool connection proxies call these);
* ``Connection.executemany`` / ``fetchmany`` (``db.operation.batch.size``);
* prepared statements: ``PreparedStatement.__bind_execute`` (the one entry of
  its ``fetch`` / ``fetchval`` / ``fetchrow``), ``executemany``, ``fetchmany``;
* cursors: ``Cursor._init`` (``await conn.cursor(...)``: prepare, open the
  portal) and ``BaseCursor._bind_exec`` (``async for``: open the portal, first
  rows). Later ``FETCH`` / ``MOVE`` round trips of the cursor add none, and the
  rows cost nothing (``CursorIterator.__anext__`` is left alone, so an
  ``async for`` whose statement fails to prepare raises with no span).

Why not the internal ``Connection._execute``: asyncpg's own type look-ups
(``set_type_codec``) go through it, and ``execute()`` without arguments does
not. At the public methods asyncpg's housekeeping never produces a span: type
introspection and ``prepare()`` use ``__execute`` / the protocol directly;
BEGIN / SAVEPOINT / COMMIT / ROLLBACK of ``Transaction`` objects and the pool's
reset on release (``PoolConnectionHolder.release``: ``RESET ALL`` ...) run
under :data:`autotrace.db.QUIET`. The span suppresses database spans below it,
and SQLAlchemy's span suppresses everything: under its asyncpg dialect a
statement stays one span. Not traced: ``copy_*``, ``prepare()`` itself.

Attributes, sanitised ``db.query.text`` and the error policy (SQLSTATE) are
:mod:`autotrace.db`'s, cached per server address and database.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from autotrace import db
from autotrace.kit import CallSpan, Instrumentor, Suppress, arg


def _awaited(call_span: CallSpan) -> Any:
    """The wrapper of a method asyncpg decorates with ``connresource.guarded`` (sync, returning the coroutine).

    Its guard runs at the call, as unpatched; the span covers the await.
    """
    traced = call_span.async_

    def wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        coroutine = wrapped(*args, **kwargs)
        return traced(lambda *_, **__: coroutine, instance, args, kwargs)

    return wrapper


class AsyncpgInstrumentor(Instrumentor):
    name = "asyncpg"
    distribution = "asyncpg"
    supported = ">=0.27,<0.33"
    covers = ("asyncpg",)
    modules = ("asyncpg",)

    def __init__(self) -> None:
        super().__init__()
        self._settings: Optional[db.SqlSettings] = None
        self._caches: Dict[Tuple[Any, Any], db.StatementCache] = {}
        span = lambda describe: CallSpan(self, describe, suppress=Suppress.DB, record=db.record)  # noqa: E731
        self._spans = (span(self._statement), span(self._batch), span(self._prepared), span(self._cursor))
        self._prepared_batch_span = _awaited(span(self._prepared_batch))

    def patch_module(self, module_name: str, module: Any) -> None:
        from asyncpg import connection, cursor, pool, prepared_stmt, transaction

        if self._settings is None:
            self._settings = db.SqlSettings()  # the environment, read at patch time
        statement, batch, prepared, cursor_span = self._spans
        for method in ("execute", "fetch", "fetchval", "fetchrow"):
            self.wrap(connection, "Connection." + method, statement)
        self.wrap(connection, "Connection.executemany", batch)
        self.wrap(connection, "Connection.fetchmany", batch)
        self.wrap(prepared_stmt, "PreparedStatement._PreparedStatement__bind_execute", prepared)
        self.wrap(prepared_stmt, "PreparedStatement.executemany", self._prepared_batch_span)
        self.wrap(prepared_stmt, "PreparedStatement.fetchmany", self._prepared_batch_span)
        self.wrap(cursor, "Cursor._init", cursor_span)  # await conn.cursor(): prepare, open
        self.wrap(cursor, "BaseCursor._bind_exec", cursor_span)  # async for: open, first rows
        for path in ("start", "_Transaction__commit", "_Transaction__rollback"):
            self.wrap(transaction, "Transaction." + path, db.QUIET)
        self.wrap(pool, "PoolConnectionHolder.release", db.QUIET)

    def unpatch_extra(self) -> None:
        # The next patch re-reads the environment.
        self._settings = None
        self._caches = {}

    def _entry(self, conn: Any, query: str, batch: Any = None) -> Any:
        """The :class:`autotrace.db.StatementCache` entry of ``query`` on ``conn`` (``batch``: executemany's sets)."""
        key = (conn._addr, conn._params.database)
        cache = self._caches.get(key)
        if cache is None:
            if len(self._caches) >= 64:  # servers x databases: a handful, unless tenants come and go
                self._caches.clear()
            addr = key[0]  # (host, port), or a Unix socket path
            host, port = (addr[0], addr[1]) if isinstance(addr, tuple) else (addr, None)
            cache = self._caches[key] = db.StatementCache(self._settings, "postgresql", key[1], host, port)
        if batch is not None:
            if not hasattr(batch, "__len__"):  # an iterator: a batch of unknown size
                return cache.batch.get(query) or cache.build(query, True)
            if len(batch) > 1:
                return cache.batch_entry(query, len(batch))
        return cache.single.get(query) or cache.build(query)

    def _statement(self, conn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        return self._entry(conn, args[0] if args else kwargs["query"])

    def _batch(self, conn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        query = args[0] if args else kwargs.get("command", kwargs.get("query"))
        return self._entry(conn, query, arg(args, kwargs, 1, "args"))

    def _prepared(self, statement: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        return self._entry(statement._connection, statement._query)

    def _prepared_batch(self, statement: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        return self._entry(statement._connection, statement._query, arg(args, kwargs, 0, "args"))

    def _cursor(self, cursor: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        return self._entry(cursor._connection, cursor._query)


__all__ = ["AsyncpgInstrumentor"]
