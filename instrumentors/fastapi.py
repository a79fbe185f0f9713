"""FastAPI / Starlette: one SERVER span per HTTP request.

Patched at class level (import-order proof, no subclassing):

* ``starlette.applications.Starlette.__call__`` and
  ``fastapi.applications.FastAPI.__call__`` -- the application entry point of
  every Starlette/FastAPI app, including apps created before patching. The
  outermost traced app of a request owns the span; mounted sub-applications see
  the marker in the ASGI scope and pass through (one SERVER span per request).
* ``starlette.background.BackgroundTask.__call__`` -- each background task gets
  its own INTERNAL span, child of the (already ended) request span.

Per request there is one wrapper around the app call and one around ``send``.
The span ends after the last ``http.response.body`` message was sent (so a
streaming response is timed in full and background tasks do not stretch it),
or when the app raises, or when the app returns without finishing the response.

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

import time
from typing import Any, Dict, List, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind

from autotrace import http as _http
from autotrace._log import error_once
from autotrace.config import env
from autotrace.instrumentation import SUPPRESS_INSTRUMENTATION_KEY, Instrumentor, record_exception

#: Scope key marking a request already handled by an outer traced app.
SCOPE_MARKER = "autotrace.server_span"
_FASTAPI_KEY = "fastapi.telemetry"
_STARLETTE_KEY = "starlette.opentelemetry"

#: Switches (read once, when fastapi is patched).
INTERNAL_SPANS_ENV = "AUTOTRACE_FASTAPI_INTERNAL_SPANS"
ASGI_MESSAGE_SPANS_ENV = "AUTOTRACE_FASTAPI_ASGI_MESSAGE_SPANS"

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_SITE = "fastapi.request"


class _ScopeHeadersGetter(Getter):  # type: ignore[type-arg]
    """Reads propagation headers straight from ASGI ``(bytes, bytes)`` pairs."""

    def get(self, carrier: Any, key: str) -> Optional[List[str]]:
        wanted = key.lower().encode("latin-1")
        values = [bytes(v).decode("latin-1") for n, v in carrier if bytes(n).lower() == wanted]
        if not values:
            return None
        if key == "baggage" and len(values) > 1:
            return [",".join(values)]  # the W3C baggage propagator reads only the first value
        return values

    def keys(self, carrier: Any) -> List[str]:
        return [bytes(n).decode("latin-1") for n, _ in carrier]


_GETTER = _ScopeHeadersGetter()


def _authority(host: Optional[str], scheme: str, server: Any) -> Tuple[Optional[str], Optional[int]]:
    """``server.address``/``server.port`` from the Host header, else the ASGI ``server``."""
    if host:
        if host.startswith("["):  # [ipv6]:port
            end = host.find("]")
            address = host[1:end] if end > 0 else host
            rest = host[end + 1:] if end > 0 else ""
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            address, _, port_text = host.partition(":")
        port = int(port_text) if port_text.isdigit() else _DEFAULT_PORTS.get(scheme)
        return address or None, port
    if server and len(server) >= 2:
        return server[0], server[1]
    return None, None


def _fallback_route(scope: Dict[str, Any]) -> Optional[str]:
    """Route template from the scope Starlette leaves behind (mount prefixes are in root_path)."""
    route = scope.get("route")
    path_format = getattr(route, "path_format", None)
    if not isinstance(path_format, str):
        return None
    if type(route).__name__ == "Mount":
        path_format = "/{path}"
    return (scope.get("root_path") or "").rstrip("/") + path_format


def _native_telemetry_class() -> Any:
    """FastAPI's ``_RequestTelemetry`` if it has the fields we rely on, else None."""
    try:
        from fastapi.telemetry._api import _RequestTelemetry  # type: ignore[import-not-found]

        probe = _RequestTelemetry(span=None, span_method="GET", tracer=None, logger=None, data=None, _mount_prefix="")
        if probe.route is None and hasattr(probe, "_exceptions"):
            return _RequestTelemetry
    except Exception:
        pass
    return None


def _native_context_key() -> Any:
    try:
        from fastapi.telemetry._api import _REQUEST_TELEMETRY_KEY  # type: ignore[import-not-found]

        return _REQUEST_TELEMETRY_KEY
    except Exception:
        return None


class _Request:
    """State of one traced request; ``send`` is the wrapper handed to the app."""

    __slots__ = (
        "owner", "span", "inner_send", "scope", "telemetry", "method", "status",
        "trailers", "end_ns", "ended", "deferred",
    )

    def __init__(self, owner: "FastAPIInstrumentor", span: Any, inner_send: Any, scope: Dict[str, Any],
                 telemetry: Any, method: str) -> None:
        self.owner = owner
        self.span = span
        self.inner_send = inner_send
        self.scope = scope
        self.telemetry = telemetry
        self.method = method  # method as used in the span name ("HTTP" for unknown ones)
        self.status: Optional[int] = None
        self.trailers = False
        self.end_ns: Optional[int] = None
        self.ended = False
        self.deferred = False

    async def send(self, message: Any) -> None:
        if self.ended or self.deferred:
            await self.inner_send(message)
            return
        try:
            kind = message["type"]
            if kind == "http.response.start":
                self.status = message["status"]
                self.trailers = bool(message.get("trailers", False))
                if _http.header_capture_enabled("server_response"):
                    self.span.set_attributes(_http.capture_headers("server_response", message.get("headers") or ()))
                last = False
            else:
                last = (
                    (kind == "http.response.body" and not message.get("more_body", False) and not self.trailers)
                    or (kind == "http.response.trailers" and not message.get("more_trailers", False))
                    or kind == "http.response.pathsend"
                )
        except Exception:
            error_once(_SITE, "autotrace: internal error in %s; the program continues, this call may be untraced", _SITE)
            last = False
        await self.inner_send(message)
        if last:
            self.end_ns = time.time_ns()
            if self.status is not None and self.status >= 500:
                # A 5xx may be followed by the exception that caused it (Starlette's
                # ServerErrorMiddleware sends the 500, then re-raises): end when the
                # app call returns or raises, with this end time.
                self.deferred = True
            else:
                self.finish(None)

    def finish(self, exc: Optional[BaseException]) -> None:
        if self.ended:
            return
        self.ended = True
        span = self.span
        try:
            route = self.telemetry.route if self.telemetry is not None else None
            named = route
            if route is None or route.endswith("/{path}"):
                # FastAPI reports only FastAPI routers; a plain Starlette app mounted
                # below (or an older FastAPI) leaves its route in the scope.
                path_format = getattr(self.scope.get("route"), "path_format", None)
                if isinstance(path_format, str) and (route is None or not route.endswith(path_format)):
                    route = _fallback_route(self.scope) or route
            if route is not None and route != named:
                span.update_name(f"{self.method} {route}")
                span.set_attribute("http.route", route)
            if self.status is not None:
                _http.set_server_status(span, self.status)
            if exc is not None:
                record_exception(span, exc)
        except Exception:
            error_once(_SITE, "autotrace: internal error in %s; the program continues, this call may be untraced", _SITE)
        try:
            span.end(end_time=self.end_ns)
        except Exception:
            error_once(_SITE + ".end", "autotrace: internal error ending a span in %s", _SITE)


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
        self._has_native = False
        self._has_starlette_mw = False
        self._fastapi_cls: Any = ()

    # -- patching -------------------------------------------------------------
    def patch_module(self, module_name: str, module: Any) -> None:
        import importlib.util

        import fastapi.applications
        import starlette.applications
        import starlette.background

        reader = env()
        self._internal_spans = reader.flag(INTERNAL_SPANS_ENV, False)
        self._message_spans = reader.flag(ASGI_MESSAGE_SPANS_ENV, False)
        self._has_native = importlib.util.find_spec("fastapi.telemetry") is not None
        if self._has_native:
            self._native_cls = _native_telemetry_class()
            self._native_key = _native_context_key()
        try:
            self._has_starlette_mw = importlib.util.find_spec("starlette.middleware.opentelemetry") is not None
        except Exception:
            self._has_starlette_mw = False

        handler = self._make_app_wrapper()
        self._fastapi_cls = fastapi.applications.FastAPI
        self.wrap(starlette.applications, "Starlette.__call__", handler)
        self.wrap(fastapi.applications, "FastAPI.__call__", handler)
        self.wrap(starlette.background, "BackgroundTask.__call__", self._make_background_wrapper())

    # -- the request path ----------------------------------------------------------
    def _make_app_wrapper(self) -> Any:
        traced = self._traced
        nested = self._nested_fastapi

        def app_call(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            if len(args) == 3 and not kwargs:
                scope = args[0]
                try:
                    is_http = scope["type"] == "http"
                    outer = scope.get(SCOPE_MARKER, False) if is_http else False
                except Exception:
                    is_http = False
                    outer = False
                if is_http:
                    if outer is False:
                        return traced(wrapped, instance, scope, args[1], args[2])
                    if outer is not None and outer.telemetry is None and isinstance(instance, self._fastapi_cls):
                        return nested(wrapped, instance, outer, args)
            return wrapped(*args, **kwargs)

        return app_call

    def _nested_fastapi(self, wrapped: Any, instance: Any, request: "_Request", args: Tuple[Any, ...]) -> Any:
        """A FastAPI app below a traced plain-Starlette app: let it report its routes to our span."""
        ctx = None
        try:
            if self._native_cls is not None:
                ctx = self._attach_native(instance, args[0], request, otel_context.get_current())
        except Exception:
            error_once(_SITE, "autotrace: internal error in %s; the program continues, this call may be untraced", _SITE)
        if ctx is None or not self._internal_spans:
            return wrapped(*args)

        async def run() -> None:
            token = otel_context.attach(ctx)
            try:
                await wrapped(*args)
            finally:
                otel_context.detach(token)

        return run()

    def _attach_native(self, instance: Any, scope: Dict[str, Any], request: "_Request", ctx: Any) -> Any:
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

    async def _traced(self, wrapped: Any, instance: Any, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        request: Optional[_Request] = None
        token = None
        try:
            request, ctx = self._start(instance, scope, send)
            if ctx is not None:
                token = otel_context.attach(ctx)
        except Exception:
            error_once(_SITE, "autotrace: internal error in %s; the program continues, this call may be untraced", _SITE)
        if request is None:
            try:
                await wrapped(scope, receive, send)
            finally:
                if token is not None:
                    otel_context.detach(token)
                self._cleanup(scope)
            return
        if self._message_spans:
            receive, app_send = self._message_wrappers(request, receive)
        else:
            app_send = request.send
        try:
            await wrapped(scope, receive, app_send)
        except BaseException as exc:
            request.finish(exc)
            raise
        else:
            if not request.ended:
                request.finish(None)
        finally:
            if token is not None:
                otel_context.detach(token)
            self._cleanup(scope)

    def _cleanup(self, scope: Dict[str, Any]) -> None:
        scope.pop(SCOPE_MARKER, None)
        if self._has_native:
            scope.pop(_FASTAPI_KEY, None)
        if self._has_starlette_mw:
            scope.pop(_STARLETTE_KEY, None)

    def _start(self, instance: Any, scope: Dict[str, Any], send: Any) -> Tuple[Optional[_Request], Any]:
        """Mark the scope and start the span; ``(None, ctx_or_None)`` when untraced."""
        scope[SCOPE_MARKER] = None  # handled here (None: untraced); nested apps pass through
        if self._has_starlette_mw:
            scope[_STARLETTE_KEY] = True
        if self._has_native:
            scope[_FASTAPI_KEY] = None
        if otel_context.get_value(SUPPRESS_INSTRUMENTATION_KEY):
            return None, None

        headers = scope.get("headers") or ()
        scheme = scope.get("scheme") or "http"
        path = scope.get("path") or ""
        host = user_agent = None
        for raw_name, raw_value in headers:
            if raw_name == b"host":
                host = bytes(raw_value).decode("latin-1")
            elif raw_name == b"user-agent":
                user_agent = bytes(raw_value).decode("latin-1")

        excluded = _http.excluded_urls("fastapi")
        if excluded and excluded.match(f"{scheme}://{host or ''}{path}"):
            return None, None

        method, original = _http.normalize_method(scope.get("method"))
        span_method = "HTTP" if method == "_OTHER" else method
        attributes: Dict[str, Any] = {
            "http.request.method": method,
            "url.path": path,
            "url.scheme": scheme,
        }
        if original is not None:
            attributes["http.request.method_original"] = original
        query = scope.get("query_string")
        if query:
            attributes["url.query"] = _http.redact_query(bytes(query).decode("latin-1"))
        address, port = _authority(host, scheme, scope.get("server"))
        if address:
            attributes["server.address"] = address
            if port is not None:
                attributes["server.port"] = port
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        version = scope.get("http_version")
        if version:
            attributes["network.protocol.version"] = version
        if user_agent is not None:
            attributes["user_agent.original"] = user_agent
        if _http.header_capture_enabled("server_request"):
            attributes.update(_http.capture_headers("server_request", headers))
        _http.with_old_names(attributes, client=False)

        parent = propagate.extract(headers, getter=_GETTER)
        span = self.tracer.start_span(span_method, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        ctx = trace.set_span_in_context(span, parent)

        if not span.is_recording():
            # Sampled out: keep the context (for propagation), skip the send wrapper.
            span.end()
            scope[SCOPE_MARKER] = None
            return None, ctx
        request = _Request(self, span, send, scope, None, span_method)
        scope[SCOPE_MARKER] = request
        if self._native_cls is not None and isinstance(instance, self._fastapi_cls):
            ctx = self._attach_native(instance, scope, request, ctx)
        return request, ctx

    # -- opt-in ASGI message spans -------------------------------------------------
    def _message_wrappers(self, request: _Request, receive: Any) -> Tuple[Any, Any]:
        tracer = self.tracer

        async def traced_receive() -> Any:
            with tracer.start_as_current_span(f"{request.span.name} http receive", kind=SpanKind.INTERNAL) as span:
                message = await receive()
                span.set_attribute("asgi.event.type", message.get("type", ""))
                return message

        async def traced_send(message: Any) -> None:
            with tracer.start_as_current_span(
                f"{request.span.name} http send", kind=SpanKind.INTERNAL,
                attributes={"asgi.event.type": message.get("type", "")},
            ):
                await request.send(message)

        return traced_receive, traced_send

    # -- background tasks ------------------------------------------------------------
    def _make_background_wrapper(self) -> Any:
        instrumentor = self

        async def run_task(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            span = None
            token = None
            try:
                current = trace.get_current_span()
                if (
                    current.get_span_context().is_valid
                    and getattr(current, "name", None) != "fastapi.background_task"  # FastAPI's own, when enabled
                    and not otel_context.get_value(SUPPRESS_INSTRUMENTATION_KEY)
                ):
                    func = getattr(instance, "func", None)
                    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
                    module = getattr(func, "__module__", None) or type(func).__module__
                    span = instrumentor.tracer.start_span(
                        f"background_task {qualname}",
                        kind=SpanKind.INTERNAL,
                        attributes={"code.function.name": f"{module}.{qualname}"},
                    )
                    token = otel_context.attach(trace.set_span_in_context(span))
            except Exception:
                error_once("fastapi.background", "autotrace: internal error in %s; the program continues", "fastapi.background")
            if span is None:
                return await wrapped(*args, **kwargs)
            try:
                return await wrapped(*args, **kwargs)
            except BaseException as exc:
                try:
                    record_exception(span, exc)
                except Exception:
                    pass
                raise
            finally:
                try:
                    otel_context.detach(token)
                    span.end()
                except Exception:
                    error_once("fastapi.background", "autotrace: internal error in %s; the program continues", "fastapi.background")

        return run_task
