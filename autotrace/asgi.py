"""ASGI servers: the SERVER span of each HTTP request an ASGI application serves.

What every ASGI framework instrumentor (FastAPI, Starlette, Django's ASGI
handler, ...) shares, so that its own file holds only what its framework adds
(nested-app markers, route discovery, built-in telemetry to switch off):

* :data:`GETTER` -- reads propagation headers from the scope's
  ``(bytes, bytes)`` header pairs, indexed once (:func:`header_index`).
* :func:`request_attributes` -- the stable-semconv SERVER attributes of an
  HTTP scope (method normalisation, ``url.*`` with the query redacted,
  ``server.address``/``server.port`` from the Host header or
  ``scope["server"]``, ``client.address``, protocol version, user agent,
  captured request headers, ``http/dup`` old names), or None when its URL is
  excluded (``OTEL_PYTHON_<LIB>_EXCLUDED_URLS``).
* :class:`AsgiRequest` -- one traced request: it wraps ``send`` (response
  status, captured response headers) and ends the span after the last
  response message. A framework subclasses it for its own facts
  (:meth:`AsgiRequest.channels`, :meth:`AsgiRequest.route`).
* :class:`AsgiServer` -- runs one app call as a request: claims the scope,
  starts the span in the context the headers bring, makes it current around
  the app, ends it when the app raises or returns without finishing.
* :func:`call_in_context` -- await an app with a given context current.

When the span ends. After the last ``http.response.body`` (no ``more_body``,
no trailers announced), the last ``http.response.trailers`` or an
``http.response.pathsend`` has been sent: a streaming response is timed in
full, and what the app does afterwards (background tasks) does not stretch
it. A 5xx response may be followed by the exception that caused it
(Starlette's ServerErrorMiddleware sends the 500, then re-raises): the span
then ends when the app call returns or raises, with the time of that last
message, so the exception is recorded on it. When the app raises, the
exception is recorded and re-raised unchanged; when it returns without
finishing the response, the span ends then.

Sampled out: the span's context is still current around the app (it
propagates to outgoing calls), ``send`` is not wrapped.

Hot path: per request, one attribute dict, one header index for the
propagators (one pass over the headers instead of one per header they read),
one :class:`AsgiRequest`, one wrapper call per sent message; env-derived rules
come from :mod:`autotrace.http`'s caches.
"""

from __future__ import annotations

from time import time_ns
from typing import Any, Dict, List, Optional, Sequence, Tuple

from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import Getter

from autotrace._log import internal_error
from autotrace.http import (
    ExcludedUrls,
    capture_headers,
    excluded_urls,
    header_capture_enabled,
    normalize_method,
    redact_query,
    set_server_status,
    with_old_names,
)
from autotrace.kit import (
    SERVER,
    SUPPRESS_INSTRUMENTATION_KEY,
    Instrumentor,
    PendingSpan,
    ServerSpan,
    extract,
    span_context,
)

__all__ = [
    "GETTER", "ScopeHeadersGetter", "header_index", "DEFAULT_PORTS", "authority", "request_attributes", "AsgiRequest",
    "AsgiServer", "call_in_context",
]

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_get_current = otel_context.get_current
_attach = otel_context.attach
_detach = otel_context.detach


# --------------------------------------------------------------------------
# Propagation and attributes


def header_index(headers: Any) -> Dict[bytes, List[Any]]:
    """The scope's ``(name, value)`` header pairs by lower-cased name (``bytes``), raw values in order.

    One pass, where a getter scanning the pairs makes one per header the
    propagators ask for (three for W3C trace context and baggage).
    """
    index: Dict[bytes, List[Any]] = {}
    for raw_name, raw_value in headers:
        name = bytes(raw_name).lower()
        values = index.get(name)
        if values is None:
            index[name] = [raw_value]
        else:
            values.append(raw_value)
    return index


class ScopeHeadersGetter(Getter):  # type: ignore[type-arg]
    """Reads propagation headers from a :func:`header_index` (or from the scope's header pairs).

    Names are case-insensitive; repeated ``baggage`` headers are joined (the
    W3C baggage propagator reads only the first value).
    """

    def get(self, carrier: Any, key: str) -> Optional[List[str]]:
        if type(carrier) is not dict:
            carrier = header_index(carrier)
        values = carrier.get(key.lower().encode("latin-1"))
        if not values:
            return None
        if len(values) == 1:
            return [bytes(values[0]).decode("latin-1")]
        texts = [bytes(v).decode("latin-1") for v in values]
        return [",".join(texts)] if key == "baggage" else texts

    def keys(self, carrier: Any) -> List[str]:
        if type(carrier) is not dict:
            carrier = header_index(carrier)
        return [name.decode("latin-1") for name in carrier]


GETTER = ScopeHeadersGetter()


def authority(host: Optional[str], scheme: str, server: Any) -> Tuple[Optional[str], Optional[int]]:
    """``server.address``/``server.port`` from the Host header, else the ASGI ``server`` pair."""
    if host:
        if host.startswith("["):  # [ipv6]:port
            end = host.find("]")
            address = host[1:end] if end > 0 else host
            rest = host[end + 1:] if end > 0 else ""
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            address, _, port_text = host.partition(":")
        port = int(port_text) if port_text.isdigit() else DEFAULT_PORTS.get(scheme)
        return address or None, port
    if server and len(server) >= 2:
        return server[0], server[1]
    return None, None


def request_attributes(
    scope: Dict[str, Any], excluded: Optional[ExcludedUrls] = None
) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(span method, attributes)`` of an HTTP ``scope``; None when ``excluded`` matches its URL.

    The span method is the normalised method, or ``HTTP`` for an unknown one
    (the semconv span name). ``excluded`` is searched in ``scheme://host/path``.
    """
    headers = scope.get("headers") or ()
    scheme = scope.get("scheme") or "http"
    path = scope.get("path") or ""
    host = user_agent = None
    for raw_name, raw_value in headers:
        if raw_name == b"host":
            host = bytes(raw_value).decode("latin-1")
        elif raw_name == b"user-agent":
            user_agent = bytes(raw_value).decode("latin-1")

    if excluded and excluded.match(f"{scheme}://{host or ''}{path}"):
        return None

    method, original = normalize_method(scope.get("method"))
    attributes: Dict[str, Any] = {
        "http.request.method": method,
        "url.path": path,
        "url.scheme": scheme,
    }
    if original is not None:
        attributes["http.request.method_original"] = original
    query = scope.get("query_string")
    if query:
        attributes["url.query"] = redact_query(bytes(query).decode("latin-1"))
    address, port = authority(host, scheme, scope.get("server"))
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
    if header_capture_enabled("server_request"):
        attributes.update(capture_headers("server_request", headers))
    with_old_names(attributes, client=False)
    return ("HTTP" if method == "_OTHER" else method), attributes


# --------------------------------------------------------------------------
# One request


class AsgiRequest(ServerSpan):
    """One traced HTTP request: its SERVER span and the ``send`` the app is given.

    A :class:`~autotrace.kit.ServerSpan` (``span``, ``context``, ``rename``,
    idempotent ``end``), made by :meth:`AsgiServer.serve` once the span is
    started and recording. ``owner``: the instrumentor; ``app``: the
    application object called; ``method``: the method in the span name
    (``HTTP`` for unknown ones); ``status``: the response status, once sent.

    A framework subclasses it (adding its ``__slots__``) and overrides
    :meth:`channels` (report to the span, wrap the channels) and
    :meth:`route` (the route template, known at the end).
    """

    __slots__ = ("owner", "app", "scope", "method", "inner_send", "status", "trailers", "end_ns", "deferred")

    def __init__(
        self, span: Any, context: Any, owner: Instrumentor, app: Any, scope: Dict[str, Any], send: Any, method: str
    ) -> None:
        ServerSpan.__init__(self, span, context)
        self.owner = owner
        self.app = app
        self.scope = scope
        self.method = method
        self.inner_send = send
        self.status: Optional[int] = None
        self.trailers = False
        self.end_ns: Optional[int] = None
        self.deferred = False

    # -- framework hooks -----------------------------------------------------
    def channels(self, receive: Any) -> Tuple[Any, Any]:
        """``(receive, send)`` to give the app; called once, before the app runs.

        Default: ``receive`` unchanged and :meth:`send`. An override may report
        to the span first (``self.context`` is what is made current around the
        app: it may replace it) or wrap both; if it fails, the request is still
        traced with the default channels.
        """
        return receive, self.send

    def route(self) -> Optional[str]:
        """The route template to name the span by at the end (``{method} {route}``), or None to keep its name."""
        return None

    # -- the response --------------------------------------------------------
    async def send(self, message: Any) -> None:
        """The app's ``send``: notes the status and captured headers, ends the span after the last message."""
        if self.deferred or self.done:
            await self.inner_send(message)
            return
        try:
            kind = message["type"]
            if kind == "http.response.start":
                self.status = message["status"]
                self.trailers = bool(message.get("trailers", False))
                if header_capture_enabled("server_response"):
                    self.span.set_attributes(capture_headers("server_response", message.get("headers") or ()))
                last = False
            else:
                last = (
                    (kind == "http.response.body" and not message.get("more_body", False) and not self.trailers)
                    or (kind == "http.response.trailers" and not message.get("more_trailers", False))
                    or kind == "http.response.pathsend"
                )
        except Exception:
            internal_error(self.owner.name + ".request")
            last = False
        await self.inner_send(message)
        if last:
            self.end_ns = time_ns()
            if self.status is not None and self.status >= 500:
                self.deferred = True  # the exception behind the 5xx may follow: end when the app call is over
            else:
                self.finish(None)

    def finish(self, exc: Optional[BaseException]) -> None:
        """Name, status and (``exc``) failure of the span, then end it (at the last message's time); once."""
        if self.done:
            return
        try:
            route = self.route()
            if route is not None:
                self.rename(route, self.method)
            if self.status is not None:
                set_server_status(self.span, self.status)
        except Exception:
            internal_error(self.owner.name + ".request")
        self.end(exc, self.end_ns)


# --------------------------------------------------------------------------
# One app call


class AsgiServer:
    """Serves ASGI HTTP app calls as traced requests: ``serve(...)`` is the coroutine to run instead of the app's.

    ``request_type``: the :class:`AsgiRequest` subclass of the framework.
    ``library``: the name in ``OTEL_PYTHON_<LIB>_EXCLUDED_URLS`` (default: the
    instrumentor's name). ``marker``: a scope key set to the request while it
    is traced (None while untraced), so that nested apps see it is handled.
    ``claims``: ``(key, value)`` pairs set in the scope for the duration of the
    call (the keys by which framework built-in telemetry stands aside); these
    and ``marker`` are removed afterwards.

    Why the span is started here and not by :func:`autotrace.kit.start_server_span`:
    that builds a plain :class:`~autotrace.kit.ServerSpan`, and a second
    object per request beside it (the request state) cost ~3 000 instructions
    (callgrind), over 1 % of what tracing adds to a FastAPI request. The
    steps are the same: the parent extracted from the headers with
    :func:`autotrace.kit.extract` (a bad header starts a new trace), the span
    started in it, not current until the app runs.
    """

    __slots__ = ("instrumentor", "request_type", "library", "marker", "claims", "site")

    def __init__(
        self,
        instrumentor: Instrumentor,
        request_type: type = AsgiRequest,
        library: Optional[str] = None,
        marker: Optional[str] = None,
        claims: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        self.instrumentor = instrumentor
        self.request_type = request_type
        self.library = library or instrumentor.name
        self.marker = marker
        self.claims = tuple(((marker, None),) if marker else ()) + tuple(claims)
        self.site = f"{instrumentor.name}.request"

    async def serve(self, app: Any, instance: Any, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        """Await ``app(scope, receive, send)`` (``instance``: the application object) as one traced request.

        Nothing is traced while instrumentation is suppressed or when the URL is
        excluded; the claims are made either way.
        """
        span = context = request = None
        app_send = send
        try:
            for key, value in self.claims:
                scope[key] = value
            if not _get_current().get(SUPPRESS_INSTRUMENTATION_KEY):
                described = request_attributes(scope, excluded_urls(self.library))
                if described is not None:
                    method = described[0]
                    instrumentor = self.instrumentor
                    parent = extract(header_index(scope.get("headers") or ()), GETTER)
                    tracer = instrumentor._tracer or instrumentor.tracer
                    span = tracer.start_span(method, parent, SERVER, described[1])
                    context = span_context(span, parent)
                    if span.is_recording():
                        request = self.request_type(span, context, instrumentor, instance, scope, send, method)
                        app_send = request.send
                        if self.marker:
                            scope[self.marker] = request
                        receive, app_send = request.channels(receive)
                    else:
                        span.end()  # sampled out: only its context is needed (it still propagates)
        except Exception:
            internal_error(self.site)
            if request is None and span is not None:
                context = None
                PendingSpan(span).end()
        if request is not None:
            context = request.context
        token = _attach(context) if context is not None else None
        try:
            await app(scope, receive, app_send)
        except BaseException as exc:
            if request is not None:
                request.finish(exc)
            raise
        else:
            if request is not None:
                request.finish(None)
        finally:
            if token is not None:
                _detach(token)
            try:
                for key, _ in self.claims:
                    scope.pop(key, None)
            except Exception:
                internal_error(self.site)


async def call_in_context(context: Any, app: Any, args: Tuple[Any, ...]) -> Any:
    """Await ``app(*args)`` with ``context`` current (a mounted app working for the outer request's span)."""
    token = _attach(context)
    try:
        return await app(*args)
    finally:
        _detach(token)
