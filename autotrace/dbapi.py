"""What every DB-API 2.0 driver instrumentor shares: statement spans, per-connection caches, traced factories.

A driver instrumentor (``psycopg``, ``psycopg2``, ``sqlite3``, ``pymysql``,
``MySQLdb``) subclasses :class:`DbApiInstrumentor` and says only what is its
own: which classes and methods to wrap, and :meth:`DbApiInstrumentor.facts` --
how to read system, database, host and port from one of its connections.
Everything else is here, once:

* :class:`Spans` -- the :class:`autotrace.kit.CallSpan` of each statement
  method: ``execute`` (and a connection's ``execute`` shortcut),
  ``executemany`` (``BATCH`` operation, ``db.operation.batch.size`` = number of
  parameter sets when it can be counted), ``callproc`` (``CALL name``,
  ``db.stored_procedure.name``) and ``stream`` (a generator of rows: the span
  ends when it is exhausted, closed, fails or is collected). Each suppresses
  database spans below it (``Suppress.DB``): a driver's ``executemany`` that
  calls its own ``execute`` stays one span, and under SQLAlchemy's span (which
  suppresses everything) a driver adds none.
* The per-connection :class:`autotrace.db.StatementCache` (sanitised text,
  span name, attribute dict, error policy: :mod:`autotrace.db`), kept on the
  connection object, or in a ``WeakKeyDictionary`` for one that takes no
  attributes; rebuilt when the settings changed (a new patching).
* :meth:`DbApiInstrumentor.traced_class` / :meth:`DbApiInstrumentor.factory_argument`
  -- for drivers whose connection and cursor types are C types that cannot be
  patched (psycopg2, sqlite3): a traced subclass of the class the program asks
  for (its own factory, or the driver's default) is handed to the driver in
  its place, at ``connect()`` and at ``cursor()``. The subclass keeps the
  name, module and docstring of its base.

Bound parameters are never read, only counted; statement objects other than
text (``bytes``, psycopg's ``sql.Composed``) are turned into text only to be
sanitised.
"""

from __future__ import annotations

import weakref
from operator import attrgetter
from typing import Any, Callable, Dict, Optional, Tuple

from opentelemetry.context import get_value

from autotrace import db
from autotrace._log import internal_error
from autotrace.kit import (
    SUPPRESS_INSTRUMENTATION_KEY,
    CallSpan,
    Instrumentor,
    Suppress,
    TracedAsyncIterator,
    TracedIterator,
    arg,
    replace_arg,
)

__all__ = ["DbApiInstrumentor", "Spans", "statement_text", "CACHE_ATTRIBUTE"]

#: Attribute on a connection holding its :class:`autotrace.db.StatementCache`.
CACHE_ATTRIBUTE = "_autotrace_dbapi"
#: Marks the traced subclasses made by :meth:`DbApiInstrumentor.traced_class`.
_TRACED = "_autotrace_traced"

# Keyword names drivers give the statement and the parameter sets (positional use is the rule).
_QUERY = ("query", "sql", "operation", "statement")
_PARAM_SETS = ("params_seq", "vars_list", "args", "seq_of_parameters", "parameters")

Facts = Tuple[str, Optional[str], Optional[str], Any]


def _named(kwargs: Dict[str, Any], names: Tuple[str, ...]) -> Any:
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None


def statement_text(statement: Any, cursor: Any) -> str:
    """The text of a statement that is not a ``str``: bytes decoded, an SQL composition rendered.

    ``cursor``: the context psycopg's / psycopg2's ``Composable.as_string``
    needs. Anything else (a t-string template, an unknown object) gives ``""``
    -- a span without ``db.query.text`` -- never its ``str()``, which may hold
    values.
    """
    if isinstance(statement, str):
        return statement
    if isinstance(statement, (bytes, bytearray, memoryview)):
        return bytes(statement).decode("utf-8", "replace")
    as_string = getattr(statement, "as_string", None)
    if as_string is not None:
        try:
            text = as_string(cursor)
        except Exception:  # a closed cursor: the driver will say so
            return ""
        return text if isinstance(text, str) else statement_text(text, cursor)
    return ""


class Spans:
    """The CallSpans of one kind of object's statement methods (a cursor's, or a connection's shortcuts).

    ``execute``, ``executemany``, ``callproc``, ``stream``: pass them to
    :meth:`autotrace.instrumentation.Instrumentor.wrap`.
    """

    __slots__ = ("execute", "executemany", "callproc", "stream")

    def __init__(self, instrumentor: "DbApiInstrumentor", connection_of: Optional[Callable[[Any], Any]], site: str) -> None:
        caches = instrumentor.statement_cache
        owner = instrumentor

        def execute(instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            statement = args[0] if args else _named(kwargs, _QUERY)
            conn = instance if connection_of is None else connection_of(instance)
            try:
                cache = conn.__dict__.get(CACHE_ATTRIBUTE)
            except AttributeError:
                cache = None
            if cache is None or cache.settings is not owner.settings:
                cache = caches(conn)
                if cache is None:
                    return None
            if type(statement) is not str:
                statement = statement_text(statement, instance)
            return cache.single.get(statement) or cache.build(statement)

        def executemany(instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            statement = args[0] if args else _named(kwargs, _QUERY)
            param_sets = args[1] if len(args) > 1 else _named(kwargs, _PARAM_SETS)
            cache = caches(instance if connection_of is None else connection_of(instance))
            if cache is None:
                return None
            if type(statement) is not str:
                statement = statement_text(statement, instance)
            try:
                size = len(param_sets)
            except TypeError:  # an iterator: it is the driver's to consume, not counted
                return cache.batch.get(statement) or cache.build(statement, True)
            if size > 1:
                return cache.batch_entry(statement, size)
            return cache.single.get(statement) or cache.build(statement)

        def callproc(instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            procedure = str(arg(args, kwargs, 0, "procname", ""))
            cache = caches(instance if connection_of is None else connection_of(instance))
            if cache is None:
                return None
            attrs = dict(cache.base)
            attrs["db.operation.name"] = "CALL"
            if procedure:
                attrs["db.stored_procedure.name"] = procedure
            return ("CALL " + procedure).rstrip(), attrs, cache.errors

        common = {"suppress": Suppress.DB, "record": db.record}
        self.execute = CallSpan(instrumentor, execute, site=site + ".execute", **common)
        self.executemany = CallSpan(instrumentor, executemany, site=site + ".executemany", **common)
        self.callproc = CallSpan(instrumentor, callproc, site=site + ".callproc", **common)
        self.stream = CallSpan(instrumentor, execute, outlive=_rows_read_later, site=site + ".stream", **common)


def _rows_read_later(pending: Any, result: Any, state: Any) -> Any:
    """``outlive`` of a ``stream()`` call: the span ends with the iteration of the rows."""
    if hasattr(result, "__aiter__"):
        rows: Any = TracedAsyncIterator(result, pending)
    else:
        rows = TracedIterator(result, pending)
    weakref.finalize(rows, pending.end)  # dropped unfinished: ended when collected
    return rows


class DbApiInstrumentor(Instrumentor):
    """Base of the DB-API driver instrumentors (see the module docstring).

    A subclass sets the usual class attributes, :attr:`connection_attribute`,
    implements :meth:`facts` and, in ``patch_module``, wraps its statement
    methods with the CallSpans of :attr:`cursor_spans` (or of a
    :meth:`spans` of its own).
    """

    #: The cursor attribute naming its connection.
    connection_attribute = "connection"
    #: ``db.system.name`` when :meth:`facts` cannot be read (a closed connection).
    system = "other_sql"

    def __init__(self) -> None:
        super().__init__()
        #: :class:`autotrace.db.SqlSettings`, read at the first statement after patching.
        self.settings: Optional[db.SqlSettings] = None
        self._unattributable: "weakref.WeakKeyDictionary[Any, db.StatementCache]" = weakref.WeakKeyDictionary()
        self._traced: Dict[type, type] = {}
        self._factories: Dict[Tuple[int, str], Callable[..., Any]] = {}
        self.cursor_spans = self.spans(attrgetter(self.connection_attribute))

    def facts(self, connection: Any) -> Facts:
        """``(db.system.name, database, host, port)`` of an open connection (``None`` where unknown)."""
        raise NotImplementedError

    def spans(self, connection_of: Optional[Callable[[Any], Any]] = None) -> Spans:
        """The statement CallSpans of objects whose connection is ``connection_of(obj)`` (None: obj itself)."""
        return Spans(self, connection_of, self.name)

    def statement_cache(self, conn: Any) -> Optional[db.StatementCache]:
        """The statement cache of ``conn``, made at its first statement; None without a connection."""
        settings = self.settings
        if settings is None:
            settings = self.settings = db.SqlSettings()
        if conn is None:  # a closed cursor: the driver raises, no span
            return None
        namespace = getattr(conn, "__dict__", None)
        if type(namespace) is dict:
            cache = namespace.get(CACHE_ATTRIBUTE)
        else:
            try:
                cache = self._unattributable.get(conn)
            except TypeError:  # neither attributes nor weak references: uncached
                cache = None
        if cache is None or cache.settings is not settings:
            try:
                system, database, host, port = self.facts(conn)
            except Exception:  # closed: the driver raises its own error, traced without server facts (uncached)
                return db.StatementCache(settings, self.system)
            cache = db.StatementCache(settings, system, database or None, host or None, port)
            if type(namespace) is dict:
                namespace[CACHE_ATTRIBUTE] = cache
            else:
                try:
                    self._unattributable[conn] = cache
                except TypeError:
                    pass
        return cache

    # -- C-type drivers: traced subclasses handed out by the factories ----

    def traced_class(self, base: Any, root: type, methods: Dict[str, Any]) -> Any:
        """The traced version of ``base``, a subclass of the driver's C type ``root`` (made once per patching).

        The wrapped ``methods`` (name -> CallSpan or wrapt wrapper) sit on a
        *shim*, a subclass of ``root`` placed right above it in the method
        resolution order: ``traced(Base) -> Base -> shim -> root``. So a
        program's class that overrides a method (``LoggingConnection.cursor``
        choosing its own cursor class, ``RealDictCursor.execute``) keeps its
        behaviour, and its ``super()`` call reaches the traced method. The
        traced class keeps the name, module and docstring of ``base``.
        ``base`` itself if it already is ours; None if it is not a class
        derived from ``root`` or cannot be subclassed (the program's factory
        is then used as it is, untraced).
        """
        traced = self._traced.get(base)
        if traced is not None:
            return traced
        if not isinstance(base, type) or not issubclass(base, root):
            return None
        if base.__dict__.get(_TRACED):
            return base
        shim = self._traced.get(root)
        if shim is None:
            shim = self._traced[root] = self._subclass(root, (root,))
            for name, wrapper in methods.items():
                self.wrap(shim, name, wrapper)
            if base is root:
                return shim
        try:
            traced = self._subclass(base, (base, shim))
        except TypeError:  # a final type, a metaclass taking other arguments, an order conflict
            return None
        self._traced[base] = traced
        return traced

    @staticmethod
    def _subclass(like: type, bases: Tuple[type, ...]) -> type:
        namespace = {"__module__": like.__module__, "__qualname__": like.__qualname__, "__doc__": like.__doc__, _TRACED: True}
        return type(like)(like.__name__, bases, namespace)

    def factory_argument(
        self, index: int, name: str, root: type, methods: Dict[str, Any], default: Optional[Callable[[Any], Any]] = None
    ) -> Callable[..., Any]:
        """A wrapper for a ``connect()`` / ``cursor()`` that hands the call a traced factory.

        The factory is the argument ``name`` / ``index`` if given, else
        ``default(instance)`` (default: ``root``, the driver's C type); it is
        replaced by its :meth:`traced_class`. Put on the shim (a ``cursor``
        method in ``methods``), the wrapper sees the factory a program's own
        override chose. The program's arguments are otherwise passed on as
        they are, and so is everything the call returns or raises. Made once
        per ``(index, name)``: patching a module twice wraps with the same
        wrapper (which :meth:`wrap` then refuses to stack).
        """
        made = self._factories.get((index, name))
        if made is not None:
            return made
        site = f"{self.name}.{name}"
        traced_class = self.traced_class

        def swap(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            if get_value(SUPPRESS_INSTRUMENTATION_KEY):
                # Made under full suppression -- SQLAlchemy's pool connecting (its events trace every
                # statement): the driver's own classes, without a Python layer on each statement.
                return wrapped(*args, **kwargs)
            try:
                factory = arg(args, kwargs, index, name) or (root if default is None else default(instance))
                traced = traced_class(factory, root, methods)
                if traced is not None and traced is not factory:
                    args, kwargs = replace_arg(args, kwargs, index, name, traced)
            except Exception:
                internal_error(site)
            return wrapped(*args, **kwargs)

        self._factories[(index, name)] = swap
        return swap

    def unpatch_extra(self) -> None:
        # The next patching re-reads the settings (every connection's cache is then rebuilt)
        # and makes new traced classes (the old ones lost their wrappers).
        self.settings = None
        self._traced = {}
        self._unattributable = weakref.WeakKeyDictionary()


def mysql_system(server_version: Any) -> str:
    """``mariadb`` or ``mysql``, from the server version string a MySQL-protocol driver read at connect."""
    return "mariadb" if "mariadb" in str(server_version or "").lower() else "mysql"


def installed(*distributions: str) -> str:
    """The first of ``distributions`` that is installed (``psycopg2`` or ``psycopg2-binary``), else the first.

    For :attr:`Instrumentor.distribution` when one module ships under several names.
    """
    from autotrace.plugins import installed_version

    for name in distributions:
        if installed_version(name) is not None:
            return name
    return distributions[0]
