"""WSGI server spans: everything a WSGI framework instrumentor shares, on the kit.

A framework instrumentor (Flask, Django) wraps its application callable and
says only what is specific to it -- where the matched route is, which hook
sees the unhandled exception. The rest is here, once:

* reading the environ without ever raising (bytes and junk values tolerated:
  :func:`safe_get`), the SERVER span attributes of a request
  (:func:`request_attributes`), the full URL matched by
  ``OTEL_PYTHON_<LIB>_EXCLUDED_URLS`` (:func:`full_url`), the propagation
  getter over the environ (:data:`GETTER`);
* :class:`WsgiRequest` -- one traced request (a :class:`autotrace.kit.ServerSpan`).
  It is also the ``start_response`` handed to the application: the status
  code, a 5xx error and the captured response headers are read there. The span
  ends when the response body is exhausted or closed
  (:class:`autotrace.kit.TracedIterator`), at once when the body is known to be
  complete in memory or goes out through ``wsgi.file_wrapper``, or when the
  application raises.

Use::

    class _Request(WsgiRequest):
        __slots__ = ()
        library = "django"               # site names, OTEL_PYTHON_DJANGO_EXCLUDED_URLS
        active = ContextVar("autotrace_django_request", default=None)

        def find_route(self):            # optional: asked while no route is known
            return "/users/<id>"         # (relative to the app; or call self.rename() when known)

    def _call(self, wrapped, instance, args, kwargs):     # the wrapt wrapper
        request = start_request(_Request, self, args[0], args[1]) if len(args) == 2 and not kwargs else None
        if request is None:
            return wrapped(*args, **kwargs)
        return request.call(wrapped, args[0])

A framework hook that sees an unhandled exception calls
``_Request.active.get().on_exception(exc)``; one that knows the body is
complete in memory sets ``request.streamed = False`` (the span then ends when
the application returns, whether or not the server reads the body).

Cost: one object per request (the request is the span holder, the context
holder and the ``start_response``); attributes set after the start go through
the kit's fast :func:`autotrace.kit.set_attributes`, in one write at
``start_response``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from autotrace._log import internal_error
from autotrace.config import semconv_dup
from autotrace.http import (
    KNOWN_METHODS,
    capture_headers,
    excluded_urls,
    header_capture_enabled,
    normalize_method,
    redact_query,
    with_old_names,
)
from autotrace.kit import (
    SERVER,
    SUPPRESS_INSTRUMENTATION_KEY,
    Instrumentor,
    ServerSpan,
    TracedIterator,
    extract,
    record_error,
    set_attributes,
    span_context,
)

try:  # the context key of the current span (stable since API 1.0; stay defensive)
    from opentelemetry.trace.propagation import _SPAN_KEY
except ImportError:  # pragma: no cover
    _SPAN_KEY = None

__all__ = [
    "WsgiRequest", "start_request", "request_attributes", "full_url", "safe_get", "wsgi_decode",
    "request_headers", "EnvironGetter", "GETTER",
]

_PROTOCOLS = {"HTTP/1.1": "1.1", "HTTP/1.0": "1.0", "HTTP/2": "2", "HTTP/2.0": "2", "HTTP/3": "3", "HTTP/0.9": "0.9"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ERROR = Status(StatusCode.ERROR)
_attach = otel_context.attach
_detach = otel_context.detach
_get_current = otel_context.get_current


# --------------------------------------------------------------------------
# Reading the environ (never raising on odd values: see safe_get)


def _text(value: Any) -> Optional[str]:
    if value is None or value.__class__ is str:
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return str(value)


def safe_get(environ: Any) -> Callable[..., Optional[str]]:
    """``environ.get`` that always answers ``str`` or ``None`` (bytes and other junk tolerated)."""

    def get(key: str, default: Any = None) -> Optional[str]:
        try:
            value = environ.get(key)
        except Exception:
            value = None
        return default if value is None else _text(value)

    return get


def wsgi_decode(value: str) -> str:
    """WSGI strings are latin-1 decoded bytes; URL paths are UTF-8 on the wire."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeError:
        return value


def _host_port(host: str, scheme: str) -> Tuple[str, Optional[int]]:
    if host.startswith("["):  # [::1]:8080
        end = host.find("]")
        address, rest = host[1:end], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        address, _, port = host.partition(":")
    if port.isdigit():
        return address, int(port)
    return address, _DEFAULT_PORTS.get(scheme)


def request_attributes(get: Callable[..., Any]) -> Tuple[str, str, Dict[str, Any]]:
    """``(method, script_name, attributes)`` of a request, for the span start.

    ``get`` is ``environ.get``: a value of the wrong type raises (``TypeError``),
    and the caller asks again through :func:`safe_get`, so the common case
    pays for no conversion. ``script_name`` is the decoded mount point
    (``SCRIPT_NAME``).
    """
    method = get("REQUEST_METHOD")
    if method in KNOWN_METHODS:
        attributes: Dict[str, Any] = {"http.request.method": method}
    else:
        method, original = normalize_method(method)
        attributes = {"http.request.method": method}
        if original is not None:
            attributes["http.request.method_original"] = original
    script_name = get("SCRIPT_NAME") or ""
    path = script_name + (get("PATH_INFO") or "")
    if path.__class__ is not str:
        raise TypeError("bytes in the WSGI environ")  # the caller retries with safe_get
    if not path:
        path = "/"
    elif not path.isascii():
        path = wsgi_decode(path)
        script_name = wsgi_decode(script_name)
    attributes["url.path"] = path
    query = get("QUERY_STRING")
    if query:
        attributes["url.query"] = redact_query(wsgi_decode(query))
    scheme = get("wsgi.url_scheme") or "http"
    if scheme.__class__ is not str:
        raise TypeError("bytes in the WSGI environ")
    attributes["url.scheme"] = scheme
    host = get("HTTP_HOST")
    if host:
        address, port = _host_port(host, scheme)
    else:
        address = get("SERVER_NAME")
        port = get("SERVER_PORT")
        port = int(port) if port and port.isdigit() else None
    if address:
        attributes["server.address"] = address
    if port is not None:
        attributes["server.port"] = port
    forwarded = get("HTTP_X_FORWARDED_FOR")
    client = forwarded.split(",", 1)[0].strip() if forwarded else get("REMOTE_ADDR")
    if client:
        if client.__class__ is not str:
            raise TypeError("bytes in the WSGI environ")
        attributes["client.address"] = client
    protocol = get("SERVER_PROTOCOL")
    if protocol:
        version = _PROTOCOLS.get(protocol)
        if version is None and protocol.startswith("HTTP/"):
            version = protocol[5:]
        if version:
            attributes["network.protocol.version"] = version
    agent = get("HTTP_USER_AGENT")
    if agent:
        if agent.__class__ is not str:
            raise TypeError("bytes in the WSGI environ")
        attributes["user_agent.original"] = agent
    return method, script_name, attributes


def full_url(get: Callable[..., Any]) -> str:
    """The request URL matched by the excluded-URL patterns (query included, not redacted)."""
    scheme = get("wsgi.url_scheme") or "http"
    host = get("HTTP_HOST")
    if not host:
        host = get("SERVER_NAME") or ""
        port = get("SERVER_PORT")
        if port and _DEFAULT_PORTS.get(scheme) != (int(port) if port.isdigit() else None):
            host = f"{host}:{port}"
    url = f"{scheme}://{host}{wsgi_decode((get('SCRIPT_NAME') or '') + (get('PATH_INFO') or ''))}"
    query = get("QUERY_STRING")
    return f"{url}?{wsgi_decode(query)}" if query else url


def request_headers(environ: Any) -> Iterator[Tuple[str, Any]]:
    """The request headers of an environ as ``(name, value)`` (``HTTP_X_ID`` -> ``X-ID``), for capture."""
    for key, value in list(environ.items()):
        if key.__class__ is not str:
            continue
        if key.startswith("HTTP_"):
            if (key == "HTTP_CONTENT_TYPE" or key == "HTTP_CONTENT_LENGTH") and key[5:] in environ:
                continue  # some servers send both spellings: the CGI one is authoritative
            yield key[5:].replace("_", "-"), value
        elif key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            yield key.replace("_", "-"), value


class EnvironGetter:
    """Propagator getter over a WSGI environ (``traceparent`` -> ``HTTP_TRACEPARENT``)."""

    def __init__(self) -> None:
        self._keys: Dict[str, str] = {}

    def get(self, carrier: Any, key: str) -> Optional[List[str]]:
        name = self._keys.get(key)
        if name is None:
            name = "HTTP_" + key.upper().replace("-", "_")
            if len(self._keys) < 256:
                self._keys[key] = name
        value = carrier.get(name)
        if value is None:
            return None
        if value.__class__ is not str:
            value = _text(value)
        return [value]

    def keys(self, carrier: Any) -> List[str]:
        return [
            k[5:].lower().replace("_", "-") for k in carrier if k.__class__ is str and k.startswith("HTTP_")
        ]


GETTER = EnvironGetter()


# --------------------------------------------------------------------------
# One request


def _recorded(span: Any, exc: BaseException, state: Any) -> None:
    """The ``record`` of a request whose exception is already on the span (see ``on_exception``)."""


class WsgiRequest(ServerSpan):
    """One traced WSGI request: its SERVER span, and the ``start_response`` handed to the application.

    Made by :func:`start_request`. Subclasses set :attr:`library`, optionally
    :attr:`active` and :meth:`find_route`, and add no slots of their own
    (``__slots__ = ()``). A request that only *joins* a SERVER span someone
    else started (an outer WSGI middleware) is born ``done``: it names that
    span by the route and records an unhandled exception on it, nothing else.
    """

    __slots__ = (
        "start_response", "environ", "method", "script_name", "route", "exception", "dup", "streamed", "active_token",
    )

    #: The instrumentor's name: site names of internal errors, ``OTEL_PYTHON_<LIB>_EXCLUDED_URLS``.
    library = "wsgi"
    #: A ``ContextVar`` holding the request while the application runs (framework hooks find it
    #: there; an application of the same framework called inside is not traced again), or None.
    active: Optional["ContextVar[Any]"] = None
    #: The response body wrapper: ``body(iterable, request)``.
    body = TracedIterator

    # -- hooks for the framework ----------------------------------------------
    def find_route(self) -> Optional[str]:
        """The route template if the framework knows it now, else None.

        Asked (span recording) at ``start_response`` and at :meth:`on_exception`
        while no route is known; a framework that learns its route earlier
        calls :meth:`rename` instead.
        """
        return None

    def rename(self, route: str, method: Optional[str] = None) -> None:
        """Name the span ``{method} {route}`` (``method``: default the request's) and set ``http.route``.

        ``route`` is the framework's template, relative to the application:
        the mount point (``SCRIPT_NAME``) is prefixed, as semconv asks.
        """
        set_attributes(self.span, {"http.route": self._named(route, method)})

    def _named(self, route: str, method: Optional[str] = None) -> str:
        route = self.script_name + route
        self.route = route
        self.span.update_name(f"{method or self.method} {route}")
        return route

    def on_exception(self, exc: BaseException) -> None:
        """The framework saw ``exc`` escape the handler: recorded now, once (the handler's
        500 or the re-raise follows)."""
        span = self.span
        if self.route is None and span.is_recording():
            route = self.find_route()
            if route is not None:
                self.rename(route)
        if self.exception is None:
            self.exception = exc
            record_error(span, exc)
            self.record = _recorded

    # -- start_response ------------------------------------------------------
    def __call__(self, status: Any, headers: Any, *rest: Any) -> Any:
        try:
            self.on_response(status, headers)
        except Exception:
            internal_error(self.library + ".start_response")
        return self.start_response(status, headers, *rest)

    def on_response(self, status: Any, headers: Any) -> None:
        """The route (if still unknown), status code, 5xx error (unless an exception was
        recorded) and captured response headers, in one write."""
        span = self.span
        if not span.is_recording():
            return
        attributes: Dict[str, Any] = {}
        if self.route is None:
            route = self.find_route()
            if route is not None:
                attributes["http.route"] = self._named(route)
        if not self.done:  # (a joined span: its owner reads the response)
            if status.__class__ is not str:
                status = _text(status)
            code = int(status[:3])
            attributes["http.response.status_code"] = code
            if self.dup:
                attributes["http.status_code"] = code
            if code >= 500 and self.exception is None:
                attributes["error.type"] = str(code)
                span.set_status(_ERROR)
            if header_capture_enabled("server_response"):
                attributes.update(capture_headers("server_response", headers))
        if attributes:
            set_attributes(span, attributes)

    # -- around the application ------------------------------------------------
    def call(self, app: Callable[[Any, Any], Any], environ: Any) -> Any:
        """``app(environ, self)``: its result or exception, unchanged, with the span ended in time."""
        try:
            result = app(environ, self)
        except BaseException as exc:
            self.failed(exc)
            raise
        return self.returned(result)

    def enter(self) -> None:
        if self.context is not None:
            self.token = _attach(self.context)
        active = self.active
        if active is not None:
            self.active_token = active.set(self)

    def leave(self) -> None:
        """Undo :meth:`enter` (called in the frame that entered, so always in the right context)."""
        token = self.active_token
        if token is not None:
            self.active_token = None
            self.active.reset(token)  # type: ignore[union-attr]
        token = self.token
        if token is not None:
            self.token = None
            _detach(token)

    def failed(self, exc: BaseException) -> None:
        """The application raised ``exc``: recorded (unless already) and the span ended."""
        try:
            self.leave()
        except Exception:
            internal_error(self.library + ".failed")
        self.end(exc)

    def returned(self, result: Any) -> Any:
        """The application returned its body: the span ends with it (or now); the body to give the server."""
        try:
            self.leave()
            if self.done:
                return result
            if self.streamed is False:
                # The body is already complete in memory: the request is done.
                # (Test clients often never read or close it.)
                self.end()
                return result
            file_wrapper = self.environ.get("wsgi.file_wrapper")
            if file_wrapper is not None and isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
                # A file sent through the server's sendfile path: keep it (the span
                # ends now, without the transfer time).
                self.end()
                return result
            return self.body(result, self)
        except Exception:
            internal_error(self.library + ".returned")
            self.end()
            return result


def start_request(
    cls: Any,
    instrumentor: Instrumentor,
    environ: Any,
    start_response: Any,
    read: Callable[[Callable[..., Any]], Tuple[str, str, Dict[str, Any]]] = request_attributes,
) -> Optional[WsgiRequest]:
    """The traced request (a ``cls``, made current), or None: suppressed, excluded URL, nested, or our own failure.

    Never raises. ``read``: the attribute reader (default :func:`request_attributes`).
    Inside a recording SERVER span someone else started, the request joins it
    (see :class:`WsgiRequest`) instead of starting a second one.
    """
    context = _get_current()
    if context.get(SUPPRESS_INSTRUMENTATION_KEY):
        return None
    active = cls.active
    if active is not None and active.get() is not None:
        return None  # an application of this framework called from inside one of its traced requests
    request = span = None
    try:
        excluded = excluded_urls(cls.library)
        get = environ.get
        try:
            if excluded and excluded.match(full_url(get)):
                return None
            method, script_name, attributes = read(get)
        except Exception:  # bytes or junk in the environ: the careful way
            get = safe_get(environ)
            if excluded and excluded.match(full_url(get)):
                return None
            method, script_name, attributes = read(get)

        current = context.get(_SPAN_KEY) if _SPAN_KEY is not None else trace.get_current_span(context)
        if getattr(current, "kind", None) is SERVER and current.is_recording():
            # Another instrumentation (a WSGI middleware) already made the
            # SERVER span of this request: enrich it with the route only.
            request = cls(current, None)
            request.done = True
            dup = False
        else:
            dup = semconv_dup("http")
            if dup:
                with_old_names(attributes, client=False)
            parent = extract(environ, GETTER)
            span = (instrumentor._tracer or instrumentor.tracer).start_span(method, parent, SERVER, attributes)
            request = cls(span, span_context(span, parent))
        request.start_response = start_response
        request.environ = environ
        request.method = method
        request.script_name = script_name
        request.route = None
        request.exception = None
        request.dup = dup
        request.streamed = None  # a framework that knows sets it: False = body complete in memory
        request.active_token = None
        if span is not None and header_capture_enabled("server_request") and span.is_recording():
            set_attributes(span, capture_headers("server_request", request_headers(environ)))
        request.enter()
        return request
    except Exception:
        internal_error(cls.library + ".begin")
        if request is not None:
            request.leave()
            request.end()
        elif span is not None:
            span.end()
        return None
