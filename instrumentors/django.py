"""Django: one SERVER span per request (WSGI and ASGI), one CLIENT span per ORM statement.

Everything is patched on classes, each when Django itself first imports its
module, and nothing here reads ``django.conf.settings``: a project whose
``wsgi.py`` / ``asgi.py`` / ``manage.py`` sets ``DJANGO_SETTINGS_MODULE``
*after* importing Django works as without autotrace (no middleware is
inserted into ``settings.MIDDLEWARE``).

* ``django.core.handlers.wsgi.WSGIHandler.__call__`` -- the request span
  (:mod:`autotrace.wsgi`): started from the environ with the remote context
  extracted, ended when the body is exhausted or closed (at once for an
  ``HttpResponse``, whose body is complete in memory).
* ``django.core.handlers.asgi.ASGIHandler.__call__`` -- the same for ASGI
  (:mod:`autotrace.asgi`); ended after the last response message.
* ``django.core.handlers.base.BaseHandler.resolve_request`` -- once the
  resolver matched, the span is named ``{method} {route}`` and ``http.route``
  set: ``"/" + ResolverMatch.route`` (``include()`` prefixes included, a
  ``re_path`` regex as Django gives it), under the mount point
  (``SCRIPT_NAME`` / ``root_path``). No match (404): the span keeps ``GET``.
* The ``got_request_exception`` signal -- Django turns a view's exception
  into a 500 response: the exception is recorded on the span there.
* ``django.test.client.ClientHandler.__call__`` -- requests of Django's
  (sync) test ``Client``, which bypasses ``WSGIHandler``.
* ``django.db.backends.utils.CursorWrapper._execute`` / ``_executemany`` /
  ``callproc`` -- the statement spans of every backend
  (:mod:`autotrace.dbapi`: sanitised ``db.query.text``, ``BATCH`` for
  ``executemany``, the driver's error scrubbed). They suppress database spans
  below them (``Suppress.DB``), so the psycopg / sqlite3 / MySQL driver
  instrumentors add no second span, while an HTTP call made by a backend stays
  visible. Quiet (``db.QUIET``: no span inside): ``BaseDatabaseWrapper.connect``
  -- the backend's connection set-up (``PRAGMA``, ``SET TIME ZONE``) -- and
  the ``SELECT QUOTE(?)`` SQLite's backend runs to log a query under ``DEBUG``.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import Any, Dict, Optional, Tuple

from autotrace import asgi, db
from autotrace._log import internal_error
from autotrace.dbapi import DbApiInstrumentor, Facts, mysql_system
from autotrace.kit import guarded
from autotrace.wsgi import WsgiRequest, start_request

#: The scope key of the request being traced (shared with the FastAPI instrumentor: one SERVER span).
SCOPE_MARKER = "autotrace.server_span"
_ACTIVE: "ContextVar[Optional[_Request]]" = ContextVar("autotrace_django_request", default=None)


class _Request(WsgiRequest):
    __slots__ = ()
    library = "django"
    active = _ACTIVE

    def returned(self, result: Any) -> Any:
        if getattr(type(result), "streaming", None) is False:  # an HttpResponse: its body is complete in memory
            self.streamed = False
        return WsgiRequest.returned(self, result)


class _AsgiRequest(asgi.AsgiRequest):
    __slots__ = ("exception",)  # what Django turned into a 500, recorded at the end (unset until then)

    def rename(self, route: str, method: Optional[str] = None) -> None:
        prefix = (self.scope.get("root_path") or "").rstrip("/")
        asgi.AsgiRequest.rename(self, prefix + route, method or self.method)

    def on_exception(self, exc: BaseException) -> None:
        if getattr(self, "exception", None) is None:
            self.exception = exc

    def finish(self, exc: Optional[BaseException]) -> None:
        asgi.AsgiRequest.finish(self, exc or getattr(self, "exception", None))


def _traced(request: Any) -> Any:
    """Our traced request serving the Django ``request`` (WSGI or ASGI), or None."""
    attributes = getattr(request, "__dict__", None) or {}  # (no AttributeError raised and caught per request)
    scope = attributes.get("scope")  # an ASGIRequest
    if scope is not None:
        found = scope.get(SCOPE_MARKER)
        return found if isinstance(found, _AsgiRequest) else None
    found = _ACTIVE.get()
    return found if found is not None and found.environ is attributes.get("environ") else None


def _resolved(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    match = wrapped(*args, **kwargs)
    try:
        traced = _traced(args[0] if args else kwargs.get("request"))
        route = getattr(match, "route", None)
        if traced is not None and isinstance(route, str):
            traced.rename("/" + route)
    except Exception:
        internal_error("django.route")
    return match


@guarded("django.exception")
def _got_exception(sender: Any, request: Any = None, **kwargs: Any) -> None:
    """The ``got_request_exception`` receiver: sent while Django handles the exception it turns into a 500."""
    traced = _traced(request)
    exc = sys.exc_info()[1]
    if traced is not None and exc is not None:
        traced.on_exception(exc)


def _responded(request: _Request, response: Any) -> Any:
    """The test client's response, reported to the span as a server's ``start_response`` would."""
    try:
        request.on_response("%d %s" % (response.status_code, response.reason_phrase), response.items())
    except Exception:
        internal_error("django.test_client")
    return response


class DjangoInstrumentor(DbApiInstrumentor):
    name = "django"
    distribution = "django"
    supported = ">=4.2,<7"
    covers = ("django",)
    modules = ("django.core.handlers.base", "django.core.handlers.wsgi", "django.core.handlers.asgi",
               "django.db.backends.utils", "django.db.backends.base.base", "django.db.backends.sqlite3.operations",
               "django.test.client")
    connection_attribute = "db"  # CursorWrapper.db: the backend's DatabaseWrapper

    def __init__(self) -> None:
        super().__init__()
        self._asgi = asgi.AsgiServer(self, _AsgiRequest, marker=SCOPE_MARKER)
        self._caches: Dict[str, Tuple[Any, db.StatementCache]] = {}
        spans = self.cursor_spans
        # Made once: patching again finds its own wrappers and adds none.
        self._hooks: Dict[str, Dict[str, Any]] = {
            "django.core.handlers.base": {"BaseHandler.resolve_request": _resolved},
            "django.core.handlers.wsgi": {"WSGIHandler.__call__": self._wsgi_call},
            "django.core.handlers.asgi": {"ASGIHandler.__call__": self._asgi_call},
            "django.db.backends.utils": {"CursorWrapper._execute": spans.execute,
                                         "CursorWrapper._executemany": spans.executemany,
                                         "CursorWrapper.callproc": spans.callproc},
            "django.db.backends.base.base": {"BaseDatabaseWrapper.connect": db.QUIET},
            # Under DEBUG, SQLite's backend runs SELECT QUOTE(?) to render each logged query's parameters.
            "django.db.backends.sqlite3.operations":
                {"DatabaseOperations._quote_params_for_last_executed_query": db.QUIET},
            "django.test.client": {"ClientHandler.__call__": self._test_client},
        }

    def patch_module(self, module_name: str, module: Any) -> None:
        for path, hook in self._hooks[module_name].items():
            self.wrap(module, path, hook)
        if module_name == "django.core.handlers.base":
            from django.core.signals import got_request_exception

            got_request_exception.connect(_got_exception, weak=False, dispatch_uid=__name__)

    def unpatch_extra(self) -> None:
        super().unpatch_extra()
        signals = sys.modules.get("django.core.signals")
        if signals is not None:
            signals.got_request_exception.disconnect(dispatch_uid=__name__)

    # -- requests ---------------------------------------------------------------
    def _wsgi_call(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = start_request(_Request, self, args[0], args[1]) if len(args) == 2 and not kwargs else None
        if request is None:
            return wrapped(*args, **kwargs)
        return request.call(wrapped, args[0])

    def _asgi_call(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        scope = args[0] if len(args) == 3 and not kwargs else None
        if type(scope) is dict and scope.get("type") == "http" and SCOPE_MARKER not in scope:
            return self._asgi.serve(wrapped, instance, scope, args[1], args[2])
        return wrapped(*args, **kwargs)

    def _test_client(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = start_request(_Request, self, args[0], None) if len(args) == 1 and not kwargs else None
        if request is None:
            return wrapped(*args, **kwargs)
        request.streamed = False  # the client gets the response object itself: the span ends with the call
        return request.call(lambda environ, _: _responded(request, wrapped(environ)), args[0])

    # -- statements ---------------------------------------------------------------
    def facts(self, connection: Any) -> Facts:
        config = connection.settings_dict
        system = db.system_name(connection.vendor)
        if system == "mysql":  # MySQLdb and PyMySQL both know the server from the handshake
            info = getattr(connection.connection, "get_server_info", None)
            system = mysql_system(info() if info is not None else None)
        name = config.get("NAME")
        return system, (str(name) if name else None), config.get("HOST") or None, config.get("PORT") or None

    def statement_cache(self, connection: Any) -> Optional[db.StatementCache]:
        """One cache per database alias (under ASGI each request has its own DatabaseWrapper),
        rebuilt when its ``NAME`` changes (the test runner's test database)."""
        settings = self.settings
        if settings is None:
            settings = self.settings = db.SqlSettings()
        name = connection.settings_dict.get("NAME")
        held = self._caches.get(connection.alias)
        if held is None or held[0] is not name or held[1].settings is not settings:
            held = self._caches[connection.alias] = (name, db.StatementCache(settings, *self.facts(connection)))
        return held[1]


__all__ = ["DjangoInstrumentor"]
