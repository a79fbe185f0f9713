"""FastAPI / Starlette: one SERVER span per HTTP request.

Two instrumentors share this file: :class:`FastAPIInstrumentor` (entry point
``fastapi``, loaded on ``import fastapi``) and :class:`StarletteInstrumentor`
(entry point ``starlette``, loaded on ``import starlette``) for Starlette apps
in programs that never import fastapi. Once fastapi is imported, its
instrumentor takes Starlette's classes over (every app is traced exactly as
before, under the ``fastapi`` name), or -- when ``fastapi`` is switched off --
the Starlette one steps aside too, so that switch keeps meaning "no
FastAPI/Starlette spans".

Patched at class level (import-order proof, no subclassing):

* ``starlette.applications.Starlette.__call__`` and
  ``fastapi.applications.FastAPI.__call__`` -- the application entry point of
  every Starlette/FastAPI app, including apps created before patching. The
  outermost traced app of a request owns the span; mounted sub-applications see
  the marker in the ASGI scope and pass through (one SERVER span per request).
* ``starlette.background.BackgroundTask.__call__`` -- each background task gets
  its own INTERNAL span, child of the (already ended) request span.

The request itself -- attributes, propagation, exclusion, the ``send`` wrapper
that ends the span after the last response message -- is
:mod:`autotrace.asgi`'s; this file adds what FastAPI and Starlette know.

FastAPI's built-in OpenTelemetry (``fastapi.telemetry``, FastAPI >= 0.144)
switches itself on when an SDK tracer provider is global -- which autotrace
installs -- and would add its own SERVER span with unredacted ``url.query``.
``FastAPI.__call__`` skips it when the scope already has a
``"fastapi.telemetry"`` key (its own guard for mounted apps), so we put one
there: by default an object FastAPI's router reports route selections to (the
route template, including included-router and mount prefixes, lands on *our*
span) but without a tracer, so none of its INTERNAL operation spans appear;
with ``AUTOTRACE_FASTAPI_INTERNAL_SPANS=true`` it carries our tracer and
FastAPI's ``fastapi.dependencies`` / ``fastapi.endpoint`` /
``fastapi.serialization`` / ``fastapi.background_task`` spans are children of
our SERVER span. Starlette's opt-in ``OpenTelemetryMiddleware`` is told the
request is already traced through its own ``"starlette.opentelemetry"`` key.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, List, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import trace

from autotrace import asgi
from autotrace.config import env, get_settings
from autotrace.kit import INTERNAL, CallSpan, Instrumentor, guarded, record_error

#: Scope key marking a request already handled by an outer traced app.
SCOPE_MARKER = "autotrace.server_span"
_FASTAPI_KEY = "fastapi.telemetry"
_STARLETTE_KEY = "starlette.opentelemetry"

#: Switches (read once, when fastapi is patched).
INTERNAL_SPANS_ENV = "AUTOTRACE_FASTAPI_INTERNAL_SPANS"
ASGI_MESSAGE_SPANS_ENV = "AUTOTRACE_FASTAPI_ASGI_MESSAGE_SPANS"

_SITE = "fastapi.request"
_MESSAGE_SITE = "fastapi.message"
#: The fields we set on FastAPI's ``_RequestTelemetry``.
_NATIVE_ARGS = frozenset({"span", "span_method", "tracer", "logger", "data", "_mount_prefix"})
_MISSING = dataclasses.MISSING
#: The instrumentors whose wrappers are on Starlette's classes now (the fastapi one takes them over).
_ACTIVE: List[Instrumentor] = []


def _fallback_route(scope: Dict[str, Any]) -> Optional[str]:
    """Route template from the scope Starlette leaves behind (mount prefixes are in root_path)."""
    route = scope.get("route")
    path_format = getattr(route, "path_format", None)
    if not isinstance(path_format, str):
        return None
    if type(route).__name__ == "Mount":
        path_format = "/{path}"
    return (scope.get("root_path") or "").rstrip("/") + path_format


def _native_api() -> Tuple[Any, Any]:
    """FastAPI's ``_RequestTelemetry`` (None unless it takes the fields we rely on) and its context key.

    Read from the loaded module (``fastapi.applications`` imports it where it
    exists): probing never imports anything nor raises.
    """
    api = sys.modules.get("fastapi.telemetry._api")
    cls = getattr(api, "_RequestTelemetry", None)
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    route = fields.get("route")
    usable = (
        _NATIVE_ARGS <= fields.keys() and "_exceptions" in fields and route is not None and route.default is None
        and all(  # constructible with just our arguments
            f.init if name in _NATIVE_ARGS
            else not f.init or f.default is not _MISSING or f.default_factory is not _MISSING
            for name, f in fields.items()
        )
    )
    return (cls if usable else None), getattr(api, "_REQUEST_TELEMETRY_KEY", None)


class _Request(asgi.AsgiRequest):
    """A request served by a Starlette or FastAPI app; ``telemetry``: FastAPI's route reporter, if any."""

    __slots__ = ("telemetry",)

    def channels(self, receive: Any) -> Tuple[Any, Any]:
        self.telemetry = None
        return self.owner._start(self, receive)

    def route(self) -> Optional[str]:
        """The route when FastAPI did not report it (a plain Starlette app below, an older FastAPI)."""
        named = route = self.telemetry.route if self.telemetry is not None else None
        if route is None or route.endswith("/{path}"):
            path_format = getattr(self.scope.get("route"), "path_format", None)
            if isinstance(path_format, str) and (route is None or not route.endswith(path_format)):
                route = _fallback_route(self.scope) or route
        return route if route != named else None


# -- opt-in ASGI message spans ----------------------------------------------------


def _describe_receive(request: _Request, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    return f"{request.span.name} http receive", {}


def _received(span: Any, message: Any, state: Any) -> None:
    span.set_attribute("asgi.event.type", message.get("type", ""))


def _describe_send(request: _Request, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    return f"{request.span.name} http send", {"asgi.event.type": args[0].get("type", "")}


def _record_message_error(span: Any, exc: BaseException, state: Any) -> None:
    if isinstance(exc, Exception):  # a cancelled receive (client gone) is no error of the message
        record_error(span, exc)


# -- background tasks ------------------------------------------------------------


def _describe_background(instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    current = trace.get_current_span()
    if not current.get_span_context().is_valid or getattr(current, "name", None) == "fastapi.background_task":
        return None  # outside a request, or FastAPI's own span (internal spans on) already covers it
    func = getattr(instance, "func", None)
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    module = getattr(func, "__module__", None) or type(func).__module__
    return f"background_task {qualname}", {"code.function.name": f"{module}.{qualname}"}


class FastAPIInstrumentor(Instrumentor):
    name = "fastapi"
    distribution = "fastapi"
    supported = ">=0.100,<1"
    covers = ("fastapi", "starlette", "asgi")
    modules = ("fastapi",)

    def __init__(self) -> None:
        super().__init__()
        self._internal_spans = False
        self._message_spans = False
        self._native_cls: Any = None
        self._native_key: Any = None
        self._fastapi_cls: Any = ()
        self._message_span_calls: Any = None
        self._wrappers: Any = None  # (app wrapper, background CallSpan): built once, so patching twice adds none

    # -- patching -------------------------------------------------------------
    def patch_module(self, module_name: str, module: Any) -> None:
        import fastapi.applications
        import starlette.applications
        import starlette.background

        for other in [i for i in _ACTIVE if isinstance(i, StarletteInstrumentor)]:
            other.stand_down()  # FastAPI is here: this instrumentor traces every app, as it always did
        self._fastapi_cls = fastapi.applications.FastAPI
        handler, background = self._built(fastapi_telemetry=True)
        self.wrap(starlette.applications, "Starlette.__call__", handler)
        self.wrap(fastapi.applications, "FastAPI.__call__", handler)
        self.wrap(starlette.background, "BackgroundTask.__call__", background)
        if self not in _ACTIVE:
            _ACTIVE.append(self)

    def unpatch_extra(self) -> None:
        self._wrappers = None
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _built(self, fastapi_telemetry: bool) -> Any:
        if self._wrappers is None:
            serve = self._server(fastapi_telemetry)
            self._wrappers = (self._make_app_wrapper(serve), CallSpan(self, _describe_background, INTERNAL))
        return self._wrappers

    def _server(self, fastapi_telemetry: bool) -> Any:
        """The switches, the scope claims and the message spans; the :class:`asgi.AsgiServer` of the requests.

        ``fastapi_telemetry``: probe FastAPI's built-in telemetry (imports
        fastapi); else its scope key is claimed (with None) if fastapi is installed.
        """
        import importlib.util

        reader = env()
        self._internal_spans = reader.flag(INTERNAL_SPANS_ENV, False)
        self._message_spans = reader.flag(ASGI_MESSAGE_SPANS_ENV, False)
        claims = []
        if importlib.util.find_spec("starlette.middleware.opentelemetry") is not None:
            claims.append((_STARLETTE_KEY, True))
        if fastapi_telemetry and importlib.util.find_spec("fastapi.telemetry") is not None:
            claims.append((_FASTAPI_KEY, None))
            self._native_cls, self._native_key = _native_api()
        elif not fastapi_telemetry and importlib.util.find_spec("fastapi") is not None:
            claims.append((_FASTAPI_KEY, None))  # a FastAPI app mounted below stays out of the way
        message = dict(kind=INTERNAL, record=_record_message_error, site=_MESSAGE_SITE)
        self._message_span_calls = (
            CallSpan(self, _describe_receive, finish=_received, **message).async_,
            CallSpan(self, _describe_send, **message).async_,
        )
        return asgi.AsgiServer(self, _Request, marker=SCOPE_MARKER, claims=claims).serve

    # -- the request path ----------------------------------------------------------
    def _make_app_wrapper(self, serve: Any) -> Any:
        nested = self._nested_fastapi

        def app_call(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            if len(args) == 3 and not kwargs:
                scope = args[0]
                if isinstance(scope, dict) and scope.get("type") == "http":
                    outer = scope.get(SCOPE_MARKER, False)
                    if outer is False:
                        return serve(wrapped, instance, scope, args[1], args[2])
                    if (outer is not None and getattr(outer, "telemetry", 0) is None
                            and isinstance(instance, self._fastapi_cls)):
                        return nested(wrapped, instance, outer, args)
            return wrapped(*args, **kwargs)

        return app_call

    def _start(self, request: _Request, receive: Any) -> Tuple[Any, Any]:
        """FastAPI's part of a traced request's start: its route reporter, the message spans."""
        if self._native_cls is not None and isinstance(request.app, self._fastapi_cls):
            request.context = self._attach_native(request.app, request.scope, request, request.context)
        if self._message_spans:
            return self._message_channels(request, receive)
        return receive, request.send

    def _nested_fastapi(self, wrapped: Any, instance: Any, request: _Request, args: Tuple[Any, ...]) -> Any:
        """A FastAPI app below a traced plain-Starlette app: let it report its routes to our span."""
        ctx = None
        if self._native_cls is not None:
            ctx = self._attach_native_guarded(instance, args[0], request, otel_context.get_current())
        if ctx is None or not self._internal_spans:
            return wrapped(*args)
        return asgi.call_in_context(ctx, wrapped, args)

    def _attach_native(self, instance: Any, scope: Dict[str, Any], request: _Request, ctx: Any) -> Any:
        """Hand FastAPI's router an object that reports route selections to our span."""
        # root_path includes the prefixes of the mounts above this app (app_root_path does not).
        root_path = getattr(instance, "root_path", None) or scope.get("root_path", "")
        telemetry = self._native_cls(
            span=request.span,
            span_method=request.method,
            tracer=self.tracer if self._internal_spans else None,
            logger=None,
            data=None,
            _mount_prefix=(root_path or "").rstrip("/"),
        )
        request.telemetry = telemetry
        scope[_FASTAPI_KEY] = telemetry
        if self._internal_spans and self._native_key is not None:
            ctx = otel_context.set_value(self._native_key, telemetry, ctx)
        return ctx

    _attach_native_guarded = guarded(_SITE)(_attach_native)

    def _message_channels(self, request: _Request, receive: Any) -> Tuple[Any, Any]:
        """``receive`` and ``send`` with one INTERNAL span per ASGI message."""
        traced_receive, traced_send = self._message_span_calls
        send = request.send

        def receive_message() -> Any:
            return traced_receive(receive, request, (), {})

        def send_message(message: Any) -> Any:
            return traced_send(send, request, (message,), {})

        return receive_message, send_message


class StarletteInstrumentor(FastAPIInstrumentor):
    """Plain Starlette apps (``Starlette.__call__``) and their background tasks, without fastapi.

    FastAPI apps are left to :class:`FastAPIInstrumentor`, which takes over
    (:meth:`stand_down`) when fastapi is imported; when ``fastapi`` is
    disabled by env, this one stands down then too.
    """

    name = "starlette"
    distribution = "starlette"
    supported = ">=0.27,<2"
    covers = ("starlette",)
    modules = ("starlette.applications", "starlette.background", "fastapi.applications")

    def __init__(self) -> None:
        super().__init__()
        self.yielded = False

    def patch_module(self, module_name: str, module: Any) -> None:
        if module_name == "fastapi.applications":
            self._fastapi_cls = module.FastAPI
            if get_settings().instrumentation_disabled("fastapi"):
                self.stand_down()
        elif self.yielded or any(not isinstance(i, StarletteInstrumentor) for i in _ACTIVE):
            return  # the fastapi instrumentor's wrappers cover Starlette already
        elif module_name == "starlette.applications":
            self.wrap(module, "Starlette.__call__", self._built(fastapi_telemetry=False)[0])
            if self not in _ACTIVE:
                _ACTIVE.append(self)
        else:
            self.wrap(module, "BackgroundTask.__call__", self._built(fastapi_telemetry=False)[1])

    def stand_down(self) -> None:
        """Leave Starlette's classes to the fastapi instrumentor (or to its being switched off), for good."""
        self.yielded = True
        self.unpatch()

    def _make_app_wrapper(self, serve: Any) -> Any:
        def app_call(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            if len(args) == 3 and not kwargs:
                scope = args[0]
                if (isinstance(scope, dict) and scope.get("type") == "http" and scope.get(SCOPE_MARKER, False) is False
                        and not isinstance(instance, self._fastapi_cls)):  # a FastAPI app is not ours
                    return serve(wrapped, instance, scope, args[1], args[2])
            return wrapped(*args, **kwargs)

        return app_call
