"""requests: one CLIENT span per physical HTTP request.

Where the spans come from (all class-level patches, so ``requests.get``,
sessions created before patching and subclasses are covered):

* ``requests.adapters.HTTPAdapter.send`` -- starts the span of the first
  attempt, injects the propagation headers into the *PreparedRequest* (the
  caller's headers dict is never touched: requests copies it), makes the span
  current and sets the HTTP suppression key while the request is in flight,
  so a urllib3 / http.client plugin adds no second span. Redirects each pass
  through it (``Session.resolve_redirects`` calls ``send`` again per hop), so
  each hop gets its own span.
* ``urllib3 Retry.increment`` / ``HTTPConnectionPool.urlopen`` -- urllib3
  retries (``HTTPAdapter(max_retries=Retry(...))``) happen inside one adapter
  call; when a retry is decided the attempt's span is ended with its outcome
  and the recursive ``urlopen`` starts the next attempt's span (new
  traceparent). These wrappers do nothing outside a traced requests call.
* ``requests.sessions.Session.send`` -- no span: it scopes one logical request
  (its redirect hops) so that ``http.request.resend_count`` counts redirects
  and retries together, recognises exporter traffic, and ends the final span
  once a non-streamed body has been read.
* ``urllib3 HTTPResponse.release_conn`` / ``close`` -- the final span ends when
  the response body is consumed or the response is closed (``stream=True``
  included; an abandoned response ends its span when garbage-collected).

Exporter traffic is never traced: the SDK processors set the suppress key, and
independently of that a request issued from ``opentelemetry.exporter.*`` /
``opentelemetry.sdk.*`` / ``autotrace.exporters`` code (found by looking at the
few frames above ``Session.send``) or sent to a configured OTLP endpoint runs
with instrumentation fully suppressed.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from autotrace import http as _http
from autotrace._log import error_once
from autotrace.config import env, get_settings, semconv_dup
from autotrace.spans import set_attributes
from autotrace.instrumentation import (
    SUPPRESS_HTTP_INSTRUMENTATION_KEY,
    Instrumentor,
    inject,
    is_suppressed,
    record_exception,
    suppressed,
)

_CLIENT = SpanKind.CLIENT
_SPAN_ATTR = "_autotrace_span"
_VERSIONS = {9: "0.9", 10: "1.0", 11: "1.1", 20: "2", 30: "3"}
_DEFAULT_PORTS = {"http": 80, "https": 443}

#: Modules whose frames are skipped when looking for the caller of Session.send.
_PASS_THROUGH = ("requests.", "wrapt.", __name__)
#: A request whose first caller outside requests lives here is exporter traffic.
_EXPORTER_MODULES = ("opentelemetry.exporter.", "opentelemetry.sdk.", "autotrace.exporters")

_MSG = "autotrace: internal error in %s; the program continues, this call may be untraced"


class _Chain:
    """One logical request (``Session.send`` and its redirect hops)."""

    __slots__ = ("sent", "call", "pending")

    def __init__(self) -> None:
        self.sent = 0  # physical requests started so far (-> resend_count)
        self.call: Optional[_Call] = None  # the adapter call in flight
        self.pending: Any = None  # urllib3 response whose span waits for its body


class _Call:
    """One ``HTTPAdapter.send`` in flight; its urllib3 retries share it."""

    __slots__ = ("span", "parent", "name", "attrs")

    def __init__(self, span: Any, parent: Any, name: str, attrs: Dict[str, Any]) -> None:
        self.span = span
        self.parent = parent
        self.name = name
        self.attrs = attrs


_STATE: "ContextVar[Optional[_Chain]]" = ContextVar("autotrace.requests", default=None)


@lru_cache(maxsize=256)
def _server(origin: str) -> Tuple[Optional[str], Optional[int]]:
    """``"https://Host:8443"`` -> ``("host", 8443)``; default ports filled in."""
    scheme, _, host = origin.partition("://")
    port: Optional[int] = None
    if host.startswith("["):  # IPv6 literal
        close = host.find("]")
        rest = host[close + 1 :]
        host = host[1:close]
        if rest[:1] == ":" and rest[1:].isdigit():
            port = int(rest[1:])
    else:
        name, sep, digits = host.rpartition(":")
        if sep:
            host = name
            if digits.isdigit():
                port = int(digits)
    if port is None:
        port = _DEFAULT_PORTS.get(scheme.lower())
    return (host.lower() or None), port


_URL_CACHE: Dict[str, Tuple[str, Optional[str], Optional[int]]] = {}
_URL_CACHE_SIZE = 256


def _url_parts(url: str) -> Tuple[str, Optional[str], Optional[int]]:
    """``(redacted url, server.address, server.port)``, cached: programs call the same URLs again."""
    parts = _URL_CACHE.get(url)
    if parts is None:
        host, port = _server(_origin(url))
        parts = (_http.redact_url(url), host, port)
        if len(_URL_CACHE) >= _URL_CACHE_SIZE:
            _URL_CACHE.clear()
        _URL_CACHE[url] = parts
    return parts


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, userinfo dropped."""
    raw = _origin_raw(url)
    start = raw.find("://") + 3
    at = raw.rfind("@", start)
    if at >= 0:
        return raw[:start] + raw[at + 1 :]
    return raw


def _caller_is_exporter() -> bool:
    """True when the first frame above Session.send outside requests is exporter code.

    Exporters that send with requests live in ``opentelemetry.exporter.*``; while
    no such module is imported, no frame can be theirs and the walk is skipped.
    """
    if "opentelemetry.exporter" not in sys.modules:
        return False
    frame = sys._getframe(2)  # 0: here, 1: the Session.send wrapper
    for _ in range(16):
        if frame is None:
            return False
        module = frame.f_globals.get("__name__") or ""
        if module.startswith(_PASS_THROUGH) or module == "requests":
            frame = frame.f_back
            continue
        return module.startswith(_EXPORTER_MODULES)
    return False


def _exporter_endpoints() -> Tuple[str, ...]:
    """URL prefixes of the OTLP/Zipkin endpoints configured in the environment."""
    reader = env()
    found = []
    settings = get_settings()
    if settings.otlp.protocol != "grpc":
        found.append(settings.otlp.endpoint)
    for signal in ("TRACES", "METRICS", "LOGS"):
        value = reader.string(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        if value:
            found.append(value)
    generic = reader.string("OTEL_EXPORTER_OTLP_ENDPOINT")
    if generic:
        found.append(generic.rstrip("/") + "/v1/")
    zipkin = reader.string("OTEL_EXPORTER_ZIPKIN_ENDPOINT")
    if zipkin:
        found.append(zipkin)
    prefixes = []
    for url in found:
        origin = _origin_raw(url)
        if origin:  # requests lower-cases scheme and host
            prefixes.append(origin.lower() + url[len(origin) :])
    return tuple(dict.fromkeys(prefixes))


def _origin_raw(url: str) -> str:
    """``scheme://[userinfo@]host[:port]`` of a URL."""
    start = url.find("://")
    if start < 0:
        return ""
    start += 3
    end = len(url)
    for sep in ("/", "?", "#"):
        index = url.find(sep, start, end)
        if index >= 0:
            end = index
    return url[:end]


def _arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


class RequestsInstrumentor(Instrumentor):
    name = "requests"
    distribution = "requests"
    supported = ">=2.0,<3"
    covers = ("requests",)
    modules = ("requests",)

    def __init__(self) -> None:
        super().__init__()
        # Bound once, so that wrap() recognises (and refuses) a second patch.
        self._w_session_send: Callable[..., Any] = self._session_send
        self._w_adapter_send: Callable[..., Any] = self._adapter_send
        self._w_urlopen: Callable[..., Any] = self._urlopen
        self._w_increment: Callable[..., Any] = self._increment
        self._w_release: Callable[..., Any] = self._release
        self._configure()

    def _configure(self) -> None:
        """Every switch is read here, once (patch time), never per call."""
        _URL_CACHE.clear()  # redaction rules may have changed
        self._excluded = _http.excluded_urls("requests")
        self._dup = semconv_dup("http")
        self._capture_request = _http.header_capture_enabled("client_request")
        self._capture_response = _http.header_capture_enabled("client_response")
        self._exporter_urls = _exporter_endpoints()

    # -- patching -------------------------------------------------------------
    def patch_module(self, module_name: str, module: Any) -> None:
        import importlib

        import requests.adapters
        import requests.sessions

        self._configure()
        # The urllib3 requests really uses (old releases vendored it).
        base = requests.adapters.PoolManager.__module__.rsplit(".", 1)[0]
        connectionpool = importlib.import_module(base + ".connectionpool")
        response = importlib.import_module(base + ".response")
        retry = importlib.import_module(base + ".util.retry")

        self.wrap(requests.sessions, "Session.send", self._w_session_send)
        self.wrap(requests.adapters, "HTTPAdapter.send", self._w_adapter_send)
        self.wrap(connectionpool, "HTTPConnectionPool.urlopen", self._w_urlopen)
        self.wrap(retry, "Retry.increment", self._w_increment)
        self.wrap(response, "HTTPResponse.release_conn", self._w_release)
        self.wrap(response, "HTTPResponse.close", self._w_release)

    # -- Session.send: one logical request ------------------------------------
    def _session_send(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if _STATE.get() is not None and kwargs.get("allow_redirects", True) is False:
            return wrapped(*args, **kwargs)  # a redirect hop: same chain
        exporter = False
        try:
            exporter = _caller_is_exporter()
            if not exporter and self._exporter_urls:
                request = _arg(args, kwargs, 0, "request")
                url = request.url
                exporter = isinstance(url, str) and url.startswith(self._exporter_urls)
        except Exception:
            error_once("requests.session", _MSG, "requests.session")
        if exporter:
            with suppressed():
                return wrapped(*args, **kwargs)

        chain = _Chain()
        token = _STATE.set(chain)
        try:
            response = wrapped(*args, **kwargs)
        except BaseException as exc:
            _STATE.reset(token)
            if chain.pending is not None:
                self._end_pending(chain.pending, exc)
            raise
        _STATE.reset(token)
        if chain.pending is not None and not kwargs.get("stream"):
            self._end_pending(chain.pending, None)  # body read (or not) by Session.send
        return response

    @staticmethod
    def _end_pending(raw: Any, exc: Optional[BaseException]) -> None:
        try:
            span = raw.__dict__.pop(_SPAN_ATTR, None)
            if span is not None:
                if exc is not None:
                    record_exception(span, exc)
                span.end()
        except Exception:
            error_once("requests.end", _MSG, "requests.end")

    # -- HTTPAdapter.send: the first attempt's span ---------------------------
    def _adapter_send(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if is_suppressed(True):
            return wrapped(*args, **kwargs)
        chain = _STATE.get()
        own = None
        if chain is None:  # HTTPAdapter.send called without a Session
            chain = _Chain()
            own = _STATE.set(chain)
        call = None
        token = None
        try:
            call, token = self._start(chain, args, kwargs)
        except Exception:
            error_once("requests.start", _MSG, "requests.start")
        if call is None:
            try:
                return wrapped(*args, **kwargs)
            finally:
                if own is not None:
                    _STATE.reset(own)
        previous = chain.call
        chain.call = call
        try:
            response = wrapped(*args, **kwargs)
        except BaseException as exc:
            chain.call = previous
            self._fail(call, token, exc, own)
            raise
        chain.call = previous
        self._succeed(chain, call, token, response, own, kwargs)
        return response

    def _start(self, chain: _Chain, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Optional[_Call], Any]:
        request = _arg(args, kwargs, 0, "request")
        url = request.url
        if not isinstance(url, str):
            url = url.decode("utf-8", "replace") if isinstance(url, bytes) else str(url)
        excluded = self._excluded
        if excluded and excluded.match(url):
            return None, None
        method, original = _http.normalize_method(request.method)
        redacted, host, port = _url_parts(url)
        headers = request.headers
        attrs: Dict[str, Any] = {"http.request.method": method, "url.full": redacted}
        if host is not None:
            attrs["server.address"] = host
        if port is not None:
            attrs["server.port"] = port
        if original is not None:
            attrs["http.request.method_original"] = original
        agent = headers.get("User-Agent")
        if agent:
            attrs["user_agent.original"] = agent
        if self._capture_request:
            attrs.update(_http.capture_headers("client_request", headers.items()))
        if self._dup:
            _http.with_old_names(attrs, client=True)
        sent = chain.sent
        chain.sent = sent + 1
        if sent:
            span_attrs = dict(attrs)
            span_attrs["http.request.resend_count"] = sent
        else:
            span_attrs = attrs
        parent = otel_context.get_current()
        span = self.tracer.start_span(method, parent, kind=_CLIENT, attributes=span_attrs)
        ctx = otel_context.set_value(SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, trace.set_span_in_context(span, parent))
        inject(headers, ctx)
        return _Call(span, parent, method, attrs), otel_context.attach(ctx)

    def _fail(self, call: _Call, token: Any, exc: BaseException, own: Any) -> None:
        try:
            otel_context.detach(token)
            if own is not None:
                _STATE.reset(own)
            span = call.span
            if span is not None:
                call.span = None
                record_exception(span, exc)
                span.end()
        except Exception:
            error_once("requests.fail", _MSG, "requests.fail")

    def _succeed(self, chain: _Chain, call: _Call, token: Any, response: Any, own: Any, kwargs: Dict[str, Any]) -> None:
        span = call.span
        call.span = None
        try:
            otel_context.detach(token)
            if own is not None:
                _STATE.reset(own)
            if span is None:
                return
            raw = getattr(response, "raw", None)
            if span.is_recording():
                self._set_outcome(span, getattr(response, "status_code", None), raw)
                if self._capture_response:
                    span.set_attributes(_http.capture_headers("client_response", response.headers.items()))
            # The span ends when the body is consumed or the response closed.
            if raw is None or raw.closed:
                span.end()
                return
            raw.__dict__[_SPAN_ATTR] = span
            chain.pending = raw
        except Exception:
            error_once("requests.finish", _MSG, "requests.finish")
            if span is not None:
                try:
                    span.end()
                except Exception:
                    pass

    def _set_outcome(self, span: Any, status: Any, raw: Any) -> None:
        """Status code (and what it implies) and protocol version, set together."""
        more: Dict[str, Any] = {}
        version = _VERSIONS.get(getattr(raw, "version", None))
        if version is not None:
            more["network.protocol.version"] = version
            if self._dup:
                more["http.flavor"] = version
        if isinstance(status, int):
            _http.set_client_status(span, status, more)
        elif more:
            set_attributes(span, more)

    # -- urllib3: retries -------------------------------------------------------
    def _increment(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """A retry was decided: end the attempt's span with its own outcome.

        When retries are exhausted ``increment`` raises and the span stays
        open: the adapter records the exception the caller actually gets.
        """
        retried = wrapped(*args, **kwargs)
        chain = _STATE.get()
        call = chain.call if chain is not None else None
        if call is None or call.span is None:
            return retried
        try:
            span = call.span
            call.span = None
            error = _arg(args, kwargs, 3, "error")
            response = _arg(args, kwargs, 2, "response")
            if error is not None:
                record_exception(span, error)
            elif response is not None and span.is_recording():
                self._set_outcome(span, getattr(response, "status", None), response)
            span.end()
        except Exception:
            error_once("requests.retry", _MSG, "requests.retry")
        return retried

    def _urlopen(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        chain = _STATE.get()
        if chain is None:
            return wrapped(*args, **kwargs)
        call = chain.call
        if call is None or call.span is not None:
            return wrapped(*args, **kwargs)  # not ours, or the first attempt
        token = None
        try:
            token = self._restart(chain, call, _arg(args, kwargs, 3, "headers"))
        except Exception:
            error_once("requests.retry", _MSG, "requests.retry")
        if token is None:
            return wrapped(*args, **kwargs)
        try:
            return wrapped(*args, **kwargs)
        finally:
            otel_context.detach(token)

    def _restart(self, chain: _Chain, call: _Call, headers: Any) -> Any:
        sent = chain.sent
        chain.sent = sent + 1
        attrs = dict(call.attrs)
        attrs["http.request.resend_count"] = sent
        span = self.tracer.start_span(call.name, call.parent, kind=_CLIENT, attributes=attrs)
        call.span = span
        ctx = otel_context.set_value(
            SUPPRESS_HTTP_INSTRUMENTATION_KEY, True, trace.set_span_in_context(span, call.parent)
        )
        if headers is not None:
            inject(headers, ctx)
        return otel_context.attach(ctx)

    # -- urllib3: end of the body ---------------------------------------------
    def _release(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            span = instance.__dict__.pop(_SPAN_ATTR, None)
        except Exception:
            span = None
        try:
            return wrapped(*args, **kwargs)
        finally:
            if span is not None:
                try:
                    span.end()
                except Exception:
                    pass
