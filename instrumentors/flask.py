"""Flask: one SERVER span per request.

What is wrapped (on the class, so apps created before patching, app factories
and an early ``from flask import Flask`` are all covered):

* ``flask.app.Flask.wsgi_app`` -- the span: started from the context the
  global propagator extracts from the WSGI environ, current while the request
  is dispatched, ended when the WSGI response iterable is exhausted or closed
  (so streamed responses are timed to their last chunk).
* ``flask.app.Flask.handle_exception`` -- where Flask turns an unhandled
  exception into a 500 (or re-raises it with ``PROPAGATE_EXCEPTIONS``): the
  exception is recorded there, so the span has it in both cases.

The route template is read from the request context when the response starts
(our ``start_response`` runs inside ``wsgi_app``, with the request context
still pushed), so no extra wrapper is needed on the dispatch path.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from autotrace import http as _http
from autotrace._log import error_once
from autotrace.config import semconv_dup
from autotrace.instrumentation import Instrumentor, record_exception

_SERVER = SpanKind.SERVER
_KNOWN_METHODS = _http.KNOWN_METHODS
_PROTOCOLS = {"HTTP/1.1": "1.1", "HTTP/1.0": "1.0", "HTTP/2": "2", "HTTP/2.0": "2", "HTTP/3": "3", "HTTP/0.9": "0.9"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MESSAGE = "autotrace: internal error in %s; the program continues, this request may be untraced"

#: The request being traced in this context (nested wsgi_app calls and
#: handle_exception find it here).
_ACTIVE: "ContextVar[Optional[_Request]]" = ContextVar("autotrace_flask_request", default=None)


def _report(site: str) -> None:
    error_once(site, _MESSAGE, site)


# --------------------------------------------------------------------------
# Reading the WSGI environ (never raising on odd values: see _safe_get)


def _text(value: Any) -> Optional[str]:
    if value is None or value.__class__ is str:
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return str(value)


def _safe_get(environ: Any) -> Callable[[str], Optional[str]]:
    """``environ.get`` that always answers ``str`` or ``None`` (bytes and other junk tolerated)."""

    def get(key: str, default: Any = None) -> Optional[str]:
        try:
            value = environ.get(key)
        except Exception:
            value = None
        return default if value is None else _text(value)

    return get


def _wsgi_decode(value: str) -> str:
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


def _request_attributes(get: Callable[..., Any]) -> Tuple[str, str, Dict[str, Any]]:
    """``(method, url_path, attributes)`` for the span start."""
    method = get("REQUEST_METHOD")
    if method in _KNOWN_METHODS:
        attributes: Dict[str, Any] = {"http.request.method": method}
    else:
        method, original = _http.normalize_method(method)
        attributes = {"http.request.method": method}
        if original is not None:
            attributes["http.request.method_original"] = original
    path = (get("SCRIPT_NAME") or "") + (get("PATH_INFO") or "")
    if path.__class__ is not str:
        raise TypeError("bytes in the WSGI environ")  # the caller retries with _safe_get
    path = _wsgi_decode(path) if path else "/"
    attributes["url.path"] = path
    query = get("QUERY_STRING")
    if query:
        attributes["url.query"] = _http.redact_query(_wsgi_decode(query))
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
    return method, path, attributes


def _full_url(get: Callable[..., Any]) -> str:
    """The request URL matched by OTEL_PYTHON_FLASK_EXCLUDED_URLS."""
    scheme = get("wsgi.url_scheme") or "http"
    host = get("HTTP_HOST")
    if not host:
        host = get("SERVER_NAME") or ""
        port = get("SERVER_PORT")
        if port and _DEFAULT_PORTS.get(scheme) != (int(port) if port.isdigit() else None):
            host = f"{host}:{port}"
    url = f"{scheme}://{host}{_wsgi_decode((get('SCRIPT_NAME') or '') + (get('PATH_INFO') or ''))}"
    query = get("QUERY_STRING")
    return f"{url}?{_wsgi_decode(query)}" if query else url


def _request_headers(environ: Any) -> Iterator[Tuple[str, Any]]:
    for key, value in list(environ.items()):
        if key.__class__ is not str:
            continue
        if key.startswith("HTTP_"):
            if (key == "HTTP_CONTENT_TYPE" or key == "HTTP_CONTENT_LENGTH") and key[5:] in environ:
                continue  # some servers send both spellings: the CGI one is authoritative
            yield key[5:].replace("_", "-"), value
        elif key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            yield key.replace("_", "-"), value


class _EnvironGetter:
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


_GETTER = _EnvironGetter()


# --------------------------------------------------------------------------
# Finding the matched route in the request context


def _request_finder() -> Callable[[], Any]:
    """A function returning the current ``flask.Request`` or None (Flask 2.0 .. 3.x)."""
    import flask.globals as flask_globals

    cv = getattr(flask_globals, "_cv_request", None)  # Flask >= 2.2
    if cv is not None:

        def from_contextvar() -> Any:
            ctx = cv.get(None)
            return None if ctx is None else ctx.request

        return from_contextvar
    stack = getattr(flask_globals, "_request_ctx_stack", None)  # Flask 2.0, 2.1
    if stack is not None:

        def from_stack() -> Any:
            ctx = stack.top
            return None if ctx is None else ctx.request

        return from_stack

    proxy = flask_globals.request

    def from_proxy() -> Any:  # any later layout: the public proxy
        try:
            return proxy._get_current_object()
        except RuntimeError:
            return None

    return from_proxy


# --------------------------------------------------------------------------
# One request


class _Request:
    """The traced request; it is also the ``start_response`` handed to Flask."""

    __slots__ = (
        "span", "owned", "start_response", "environ", "method", "script_name", "context",
        "token", "active_token", "status_code", "route", "exception", "ended", "dup", "finder", "streamed",
    )

    def __init__(self, span: Any, owned: bool, start_response: Any, environ: Any, method: str, finder: Any) -> None:
        self.span = span
        self.owned = owned
        self.start_response = start_response
        self.environ = environ
        self.method = method
        self.finder = finder
        self.script_name = ""
        self.context: Any = None
        self.token: Any = None
        self.active_token: Any = None
        self.status_code: Optional[int] = None
        self.route: Optional[str] = None
        self.exception: Optional[BaseException] = None
        self.ended = False
        self.dup = False
        self.streamed: Optional[bool] = None  # known once Flask has built the response

    # -- start_response ----------------------------------------------------
    def __call__(self, status: Any, headers: Any, *rest: Any) -> Any:
        try:
            self.on_response(status, headers)
        except Exception:
            _report("flask.start_response")
        return self.start_response(status, headers, *rest)

    def on_response(self, status: Any, headers: Any) -> None:
        span = self.span
        if not span.is_recording():
            return
        attributes: Dict[str, Any] = {}
        if self.route is None:
            self.find_route(attributes)
        if not self.owned:
            if attributes:
                span.set_attributes(attributes)
            return
        if status.__class__ is not str:
            status = _text(status)
        code = int(status[:3])
        self.status_code = code
        attributes["http.response.status_code"] = code
        if self.dup:
            attributes["http.status_code"] = code
        if code >= 500 and self.exception is None:
            attributes["error.type"] = str(code)
            span.set_status(Status(StatusCode.ERROR))
        if _http.header_capture_enabled("server_response"):
            attributes.update(_http.capture_headers("server_response", headers))
        span.set_attributes(attributes)

    def find_route(self, attributes: Dict[str, Any]) -> None:
        request = self.finder()
        if request is None or request.environ is not self.environ:
            return
        rule = request.url_rule
        if rule is None:
            return
        route = self.script_name + rule.rule
        self.route = route
        attributes["http.route"] = route
        self.span.update_name(f"{self.method} {route}")

    # -- Flask.handle_exception --------------------------------------------
    def on_exception(self, exc: BaseException) -> None:
        span = self.span
        if self.route is None and span.is_recording():
            attributes: Dict[str, Any] = {}
            self.find_route(attributes)
            if attributes:
                span.set_attributes(attributes)
        if self.exception is None:
            self.exception = exc
            record_exception(span, exc)

    # -- end of wsgi_app -----------------------------------------------------
    def leave(self) -> None:
        """Undo what wsgi_app attached (same frame, so always in the right context)."""
        if self.active_token is not None:
            _ACTIVE.reset(self.active_token)
            self.active_token = None
        if self.token is not None:
            otel_context.detach(self.token)
            self.token = None

    def failed(self, exc: BaseException) -> None:
        try:
            self.leave()
            if self.owned and self.exception is None:
                self.exception = exc
                record_exception(self.span, exc)
        except Exception:
            _report("flask.failed")
        self.finish()

    def returned(self, result: Any) -> Any:
        try:
            self.leave()
            if not self.owned:
                return result
            if self.streamed is False:
                # The body is already complete in memory: the request is done.
                # (Test clients often never read or close it.)
                self.finish()
                return result
            file_wrapper = self.environ.get("wsgi.file_wrapper")
            if file_wrapper is not None and isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
                # send_file through the server's sendfile path: keep it (the span
                # ends now, without the transfer time).
                self.finish()
                return result
            return _TracedBody(result, self)
        except Exception:
            _report("flask.returned")
            self.finish()
            return result

    def finish(self, exc: Optional[BaseException] = None) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.owned:
            return
        try:
            if exc is not None and self.exception is None:
                self.exception = exc
                record_exception(self.span, exc)
            self.span.end()
        except Exception:
            _report("flask.finish")


class _TracedBody:
    """The WSGI response iterable, ending the span when exhausted or closed.

    The span is current again while each chunk is produced, so spans started
    by a streaming generator are its children.
    """

    __slots__ = ("_iterable", "_iterator", "_state")

    def __init__(self, iterable: Any, state: _Request) -> None:
        self._iterable = iterable
        self._iterator: Any = None
        self._state = state

    def __iter__(self) -> "_TracedBody":
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        state = self._state
        try:
            token = otel_context.attach(state.context)
        except Exception:
            token = None
        try:
            return next(self._iterator)
        except StopIteration:
            state.finish()
            raise
        except BaseException as exc:
            state.finish(exc)
            raise
        finally:
            if token is not None:
                otel_context.detach(token)

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._state.finish()


# --------------------------------------------------------------------------
# The instrumentor


class FlaskInstrumentor(Instrumentor):
    name = "flask"
    distribution = "flask"
    supported = ">=2.0,<4"
    covers = ("flask", "wsgi")
    modules = ("flask",)

    def __init__(self) -> None:
        super().__init__()
        self._enabled = False
        self._finder: Callable[[], Any] = lambda: None

    def patch_module(self, module_name: str, module: Any) -> None:
        import flask.app

        self._finder = _request_finder()
        self._enabled = True
        self.wrap(flask.app, "Flask.wsgi_app", self._wsgi_app)
        self.wrap(flask.app, "Flask.handle_exception", self._handle_exception)
        self.wrap(flask.app, "Flask.process_response", self._process_response)

    def unpatch_extra(self) -> None:
        # References captured before unpatching (``app.wsgi_app = Mw(app.wsgi_app)``)
        # still reach our wrapper: they pass straight through from now on.
        self._enabled = False

    # -- wrappers --------------------------------------------------------------
    def _wsgi_app(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if not self._enabled or kwargs or len(args) != 2:
            return wrapped(*args, **kwargs)
        try:
            state = self._begin(args[0], args[1])
        except Exception:
            _report("flask.begin")
            state = None
        if state is None:
            return wrapped(*args)
        try:
            result = wrapped(args[0], state)
        except BaseException as exc:
            state.failed(exc)
            raise
        return state.returned(result)

    def _handle_exception(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        state = _ACTIVE.get()
        if state is not None:
            try:
                exc = args[0] if args else kwargs.get("e")
                if isinstance(exc, BaseException):
                    state.on_exception(exc)
            except Exception:
                _report("flask.handle_exception")
        return wrapped(*args, **kwargs)

    def _process_response(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        response = wrapped(*args, **kwargs)
        state = _ACTIVE.get()
        if state is not None:
            try:
                state.streamed = bool(response.is_streamed)
            except Exception:
                _report("flask.process_response")
        return response

    # -- span start ------------------------------------------------------------
    def _begin(self, environ: Any, start_response: Any) -> Optional[_Request]:
        if _ACTIVE.get() is not None:
            return None  # a Flask app called from inside a traced Flask request
        excluded = _http.excluded_urls("flask")
        get = environ.get
        try:
            if excluded and excluded.match(_full_url(get)):
                return None
            method, path, attributes = _request_attributes(get)
        except Exception:  # bytes or junk in the environ: the careful way
            get = _safe_get(environ)
            if excluded and excluded.match(_full_url(get)):
                return None
            method, path, attributes = _request_attributes(get)

        current = trace.get_current_span()
        if getattr(current, "kind", None) is _SERVER and current.is_recording():
            # Another instrumentation (a WSGI middleware) already made the
            # SERVER span of this request: enrich it with the route only.
            state = _Request(current, False, start_response, environ, method, self._finder)
            state.script_name = _wsgi_decode(get("SCRIPT_NAME") or "")
            state.active_token = _ACTIVE.set(state)
            return state

        dup = semconv_dup("http")
        if dup:
            _http.with_old_names(attributes, client=False)
        try:
            parent = propagate.extract(environ, getter=_GETTER)
        except Exception:  # a propagator choking on a header: start a new trace
            parent = Context()
        span = self.tracer.start_span(method, context=parent, kind=_SERVER, attributes=attributes)
        state = _Request(span, True, start_response, environ, method, self._finder)
        try:
            state.dup = dup
            state.script_name = _wsgi_decode(get("SCRIPT_NAME") or "")
            if _http.header_capture_enabled("server_request") and span.is_recording():
                span.set_attributes(_http.capture_headers("server_request", _request_headers(environ)))
            context = trace.set_span_in_context(span, parent)
            state.context = context
            state.token = otel_context.attach(context)
            state.active_token = _ACTIVE.set(state)
        except Exception:
            _report("flask.begin")
            try:
                state.leave()
            finally:
                state.finish()
            return None
        return state
