"""HTTP rules shared by every HTTP instrumentor, server and client.

Privacy lives here, once: URL userinfo and the values of sensitive query
parameters are redacted, captured headers that carry credentials are recorded
as ``REDACTED``. So do the stable-semconv details every HTTP span needs
(method normalisation, status rules, the ``http/dup`` old names) and the
excluded-URL matching, so that Flask, FastAPI and requests agree.

The last part is for HTTP *clients* (requests today; httpx, aiohttp, urllib3,
http.client next): :class:`HttpClient` holds what a client instrumentor reads
at patch time and builds the request attributes and the response outcome;
:func:`server_of` / :func:`url_parts` parse and cache what a URL gives;
:func:`exporter_endpoints` / :func:`caller_is_exporter` recognise the agent's
and the SDK's own export traffic; and :meth:`HttpClient.attempts` /
:meth:`HttpClient.retry` / :meth:`HttpClient.logical_request` give a span to
every physical request of a call its library redirects or retries inside.
"""

from __future__ import annotations

import re
import sys
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from autotrace._log import internal_error
from autotrace.config import EnvReader, get_settings, semconv_dup
from autotrace.kit import (
    SUPPRESS_HTTP_INSTRUMENTATION_KEY,
    SUPPRESS_INSTRUMENTATION_KEY,
    PendingSpan,
    arg,
    hold,
    inject,
    record_error,
    release,
    span_context,
    suppressed,
)
from autotrace.spans import set_attributes

REDACTED = "REDACTED"

KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY")
)

#: A query parameter whose (lower-cased) name contains one of these is redacted.
DEFAULT_SENSITIVE_PARAM_PARTS = (
    "token",
    "key",
    "secret",
    "passw",
    "pwd",
    "signature",
    "auth",
    "credential",
    "session",
)
#: ... and so is one whose name is exactly one of these.
DEFAULT_SENSITIVE_PARAM_NAMES = ("sig", "code", "jwt", "ticket")

#: Headers always recorded as REDACTED when captured.
ALWAYS_SANITIZED_HEADERS = ("authorization", "cookie", "set-cookie", "proxy-authorization")


def normalize_method(method: Any) -> Tuple[str, Optional[str]]:
    """``("GET", None)`` for a known method, ``("_OTHER", original)`` otherwise."""
    if isinstance(method, bytes):
        method = method.decode("latin-1", "replace")
    if not isinstance(method, str) or not method:
        return "_OTHER", str(method)
    upper = method.upper()
    if upper in KNOWN_METHODS:
        return upper, (None if upper == method else method)
    return "_OTHER", method


# --------------------------------------------------------------------------
# Redaction


class _SensitiveParams:
    def __init__(self) -> None:
        env = EnvReader()
        extra = env.names("AUTOTRACE_REDACT_QUERY_PARAMS")
        self.parts = DEFAULT_SENSITIVE_PARAM_PARTS + tuple(extra)
        self.names = frozenset(DEFAULT_SENSITIVE_PARAM_NAMES + tuple(extra))
        self.disabled = env.flag("AUTOTRACE_CAPTURE_RAW_URLS", False)

    def is_sensitive(self, name: str) -> bool:
        lowered = name.lower()
        return lowered in self.names or any(part in lowered for part in self.parts)


@lru_cache(maxsize=1)
def _sensitive() -> _SensitiveParams:
    return _SensitiveParams()


def reset_caches() -> None:
    """Forget env-derived rules (tests change the environment)."""
    _sensitive.cache_clear()
    _header_rules.cache_clear()
    _excluded.cache_clear()
    _URL_PARTS.clear()


def redact_query(query: str) -> str:
    """Replace the values of sensitive parameters in a query string with ``REDACTED``."""
    if not query or _sensitive().disabled:
        return query
    rules = _sensitive()
    parts = query.split("&")
    changed = False
    for index, part in enumerate(parts):
        name, sep, value = part.partition("=")
        if sep and value and rules.is_sensitive(name):
            parts[index] = f"{name}={REDACTED}"
            changed = True
    return "&".join(parts) if changed else query


def redact_url(url: Any) -> str:
    """A URL fit for export: no userinfo, sensitive query values redacted.

    Accepts ``str`` or ``bytes``; never raises (an unparsable URL is returned
    with everything after ``?`` dropped).
    """
    if isinstance(url, (bytes, bytearray)):
        url = bytes(url).decode("utf-8", "replace")
    elif not isinstance(url, str):
        url = str(url)
    if "?" not in url and "@" not in url:
        return url
    try:
        scheme, netloc, path, query, fragment = urlsplit(url)
    except ValueError:
        return url.split("?", 1)[0]
    if "@" in netloc:
        netloc = f"{REDACTED}:{REDACTED}@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((scheme, netloc, path, redact_query(query), fragment))


# --------------------------------------------------------------------------
# Header capture


class _HeaderRules:
    def __init__(self) -> None:
        env = EnvReader()
        base = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_"
        self.lists: Dict[str, Tuple[str, ...]] = {
            kind: env.names(base + kind.upper())
            for kind in ("server_request", "server_response", "client_request", "client_response")
        }
        self.sanitize = tuple(
            re.compile(p.pattern, re.IGNORECASE) for p in env.patterns(base + "SANITIZE_FIELDS")
        )

    def is_sanitized(self, name: str) -> bool:
        return name in ALWAYS_SANITIZED_HEADERS or any(p.fullmatch(name) for p in self.sanitize)

    def wanted(self, kind: str, name: str) -> bool:
        for entry in self.lists[kind]:
            if entry == name:
                return True
            if any(c in entry for c in ".*[]()?+^$") and re.fullmatch(entry, name, re.IGNORECASE):
                return True
        return False


@lru_cache(maxsize=1)
def _header_rules() -> _HeaderRules:
    return _HeaderRules()


def header_capture_enabled(kind: str) -> bool:
    """``kind``: server_request, server_response, client_request or client_response."""
    return bool(_header_rules().lists[kind])


def capture_headers(kind: str, headers: Iterable[Tuple[Any, Any]]) -> Dict[str, List[str]]:
    """Attributes ``http.{request,response}.header.<name>`` for the configured headers.

    ``headers`` is an iterable of (name, value) pairs, str or bytes; repeated
    names are collected into one list. Sensitive headers become ``REDACTED``.
    """
    rules = _header_rules()
    if not rules.lists[kind]:
        return {}
    prefix = "http.request.header." if kind.endswith("request") else "http.response.header."
    captured: Dict[str, List[str]] = {}
    for raw_name, raw_value in headers:
        name = _text(raw_name).lower()
        if not rules.wanted(kind, name):
            continue
        value = REDACTED if rules.is_sanitized(name) else _text(raw_value)
        captured.setdefault(prefix + name, []).append(value)
    return captured


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return str(value)


# --------------------------------------------------------------------------
# Excluded URLs


class ExcludedUrls:
    """``OTEL_PYTHON_<LIB>_EXCLUDED_URLS`` (or else ``OTEL_PYTHON_EXCLUDED_URLS``).

    Comma-separated regular expressions; a URL is excluded when any of them
    matches *anywhere* in it (``re.search``), as in upstream OpenTelemetry.
    """

    def __init__(self, patterns: Sequence["re.Pattern[str]"]) -> None:
        self.patterns = tuple(patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def match(self, url: str) -> bool:
        return any(pattern.search(url) for pattern in self.patterns)


@lru_cache(maxsize=None)
def _excluded(library: str) -> ExcludedUrls:
    env = EnvReader()
    specific = env.patterns(f"OTEL_PYTHON_{library.upper()}_EXCLUDED_URLS")
    return ExcludedUrls(specific or env.patterns("OTEL_PYTHON_EXCLUDED_URLS"))


def excluded_urls(library: str) -> ExcludedUrls:
    return _excluded(library)


# --------------------------------------------------------------------------
# Status and old attribute names


def set_server_status(span: Span, status_code: int, more: Optional[Dict[str, Any]] = None) -> None:
    """SERVER spans: only 5xx is an error (4xx is the client's fault). ``more``: other attributes to set."""
    _set_status(span, status_code, 500, more)


def set_client_status(span: Span, status_code: int, more: Optional[Dict[str, Any]] = None) -> None:
    """CLIENT spans: 4xx and 5xx are errors. ``more``: other attributes to set."""
    _set_status(span, status_code, 400, more)


def _set_status(span: Span, status_code: int, error_from: int, more: Optional[Dict[str, Any]]) -> None:
    attributes: Dict[str, Any] = {"http.response.status_code": status_code}
    if status_code >= error_from:
        attributes["error.type"] = str(status_code)
        span.set_status(Status(StatusCode.ERROR))
    if semconv_dup("http"):
        attributes["http.status_code"] = status_code
    if more:
        attributes.update(more)
    set_attributes(span, attributes)


_OLD_NAMES_COMMON = {
    "http.request.method": "http.method",
    "url.scheme": "http.scheme",
    "network.protocol.version": "http.flavor",
    "user_agent.original": "http.user_agent",
    "http.response.status_code": "http.status_code",
}
_OLD_NAMES_SERVER = dict(
    _OLD_NAMES_COMMON,
    **{"server.address": "net.host.name", "server.port": "net.host.port", "client.address": "http.client_ip", "http.route": "http.route"},
)
_OLD_NAMES_CLIENT = dict(
    _OLD_NAMES_COMMON,
    **{"url.full": "http.url", "server.address": "net.peer.name", "server.port": "net.peer.port"},
)


def with_old_names(attributes: Dict[str, Any], client: bool) -> Dict[str, Any]:
    """Add pre-stable attribute names when ``OTEL_SEMCONV_STABILITY_OPT_IN=http/dup``."""
    if not semconv_dup("http"):
        return attributes
    mapping = _OLD_NAMES_CLIENT if client else _OLD_NAMES_SERVER
    for new, old in mapping.items():
        if new in attributes:
            attributes[old] = attributes[new]
    if not client and "url.path" in attributes:
        query = attributes.get("url.query")
        attributes["http.target"] = attributes["url.path"] + (f"?{query}" if query else "")
    return attributes


HeaderGetter = Callable[[str], Optional[str]]


# --------------------------------------------------------------------------
# HTTP clients: what a URL gives, the request's attributes, the response's outcome

#: Port implied by a URL scheme (``server.port`` is set also when it is implicit).
DEFAULT_PORTS = {"http": 80, "https": 443}
#: ``network.protocol.version`` of the ``version`` ints of http.client and urllib3 responses.
PROTOCOL_VERSIONS = {9: "0.9", 10: "1.0", 11: "1.1", 20: "2", 30: "3"}
#: A request whose first caller outside the HTTP library lives in one of these is export traffic.
EXPORTER_MODULES = ("opentelemetry.exporter.", "opentelemetry.sdk.", "autotrace.exporters")
#: URLs whose ``(url.full, server.address, server.port)`` are kept (the cache is emptied when full).
URL_CACHE_SIZE = 256

_CLIENT = SpanKind.CLIENT


def _origin_raw(url: str) -> str:
    """``scheme://[userinfo@]host[:port]`` of a URL (``""`` without ``://``)."""
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


def url_origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, userinfo dropped (``""`` without ``://``)."""
    raw = _origin_raw(url)
    start = raw.find("://") + 3
    at = raw.rfind("@", start)
    if at >= 0:
        return raw[:start] + raw[at + 1 :]
    return raw


@lru_cache(maxsize=256)
def server_of(origin: str) -> Tuple[Optional[str], Optional[int]]:
    """``server.address`` and ``server.port`` of an origin: ``"https://Host:8443"`` -> ``("host", 8443)``.

    The host is lower-cased (None if empty), IPv6 literals lose their brackets
    (``"http://[::1]:8080"`` -> ``("::1", 8080)``); an absent or non-numeric
    port is the scheme's default (:data:`DEFAULT_PORTS`; None for another scheme).
    """
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
        port = DEFAULT_PORTS.get(scheme.lower())
    return (host.lower() or None), port


_URL_PARTS: Dict[str, Tuple[str, Optional[str], Optional[int]]] = {}


def url_parts(url: str) -> Tuple[str, Optional[str], Optional[int]]:
    """``(url.full, server.address, server.port)`` of a URL: redacted, parsed once, cached.

    Programs call the same URLs again and again; the cache holds
    :data:`URL_CACHE_SIZE` of them (emptied when full, and by
    :func:`reset_caches` and :meth:`HttpClient.configure`, since the redaction
    rules come from the environment).
    """
    parts = _URL_PARTS.get(url)
    if parts is None:
        host, port = server_of(url_origin(url))
        parts = (redact_url(url), host, port)
        if len(_URL_PARTS) >= URL_CACHE_SIZE:
            _URL_PARTS.clear()
        _URL_PARTS[url] = parts
    return parts


def exporter_endpoints() -> Tuple[str, ...]:
    """URL prefixes of the OTLP/HTTP and Zipkin endpoints configured in the environment.

    A request to one of them is the export of telemetry, never traced. Scheme
    and host are lower-cased (HTTP clients normalise them in the URL they send).
    """
    reader = EnvReader()
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
        if origin:
            prefixes.append(origin.lower() + url[len(origin) :])
    return tuple(dict.fromkeys(prefixes))


def caller_is_exporter(skip: Tuple[str, ...], names: Tuple[str, ...] = (), depth: int = 2) -> bool:
    """True when the code that made this HTTP request is an exporter's (:data:`EXPORTER_MODULES`).

    The frames from ``depth`` up (0 is this function) are looked at; those
    whose module starts with one of ``skip`` or is one of ``names`` (the HTTP
    library, wrapt, the instrumentor: see :class:`HttpClient`) are passed over,
    the first other one decides. Exporters live in ``opentelemetry.exporter.*``:
    while no such module is imported, no frame can be theirs and no frame is read.
    """
    if "opentelemetry.exporter" not in sys.modules:
        return False
    frame: Any = sys._getframe(depth)
    for _ in range(16):
        if frame is None:
            return False
        module = frame.f_globals.get("__name__") or ""
        if module.startswith(skip) or module in names:
            frame = frame.f_back
            continue
        return module.startswith(EXPORTER_MODULES)
    return False


class ClientChain:
    """One logical request -- a ``Session.send`` and its redirect hops -- with its physical requests.

    ``sent``: physical requests started so far (the next one's
    ``http.request.resend_count``, counting redirects and retries together);
    ``call``: the :meth:`HttpClient.attempts` call in flight; ``pending``: the
    object holding the last response's span until its body is read.
    """

    __slots__ = ("sent", "call", "pending")

    def __init__(self) -> None:
        self.sent = 0
        self.call: Optional[ClientCall] = None
        self.pending: Any = None


class ClientCall:
    """One call of a method wrapped by :meth:`HttpClient.attempts`; its retries share it.

    ``span`` is the current attempt's (None between a retry decided and the next attempt).
    """

    __slots__ = ("tracer", "name", "attributes", "parent", "span")

    def __init__(self, tracer: Any, name: str, attributes: Dict[str, Any], parent: Any) -> None:
        self.tracer = tracer
        self.name = name
        self.attributes = attributes
        self.parent = parent
        self.span: Any = None


_MODULES = sys.modules
_get_current = otel_context.get_current
_attach = otel_context.attach
_detach = otel_context.detach


def _start_attempt(call: ClientCall, chain: ClientChain, carrier: Any) -> Any:
    """Start the next attempt of ``call`` (a sibling of the previous ones), injected into ``carrier``; the attach token.

    The first attempt's start is the same, inline in :meth:`HttpClient.attempts` (the hot path).
    """
    sent = chain.sent
    chain.sent = sent + 1
    attributes = call.attributes
    if sent:
        attributes = dict(attributes)
        attributes["http.request.resend_count"] = sent
    span = call.span = call.tracer.start_span(call.name, call.parent, _CLIENT, attributes)
    ctx = span_context(span, call.parent, SUPPRESS_HTTP_INSTRUMENTATION_KEY)
    if carrier is not None:
        inject(carrier, ctx)
    return _attach(ctx)


def _pairs(headers: Any) -> Iterable[Tuple[Any, Any]]:
    items = getattr(headers, "items", None)
    return items() if items is not None else headers


def _end(span: Any, site: str) -> None:
    try:
        span.end()
    except Exception:
        internal_error(site + ".end")


class HttpClient:
    """What an HTTP client instrumentor reads once, and the rules of its CLIENT spans.

    Make one in the instrumentor's ``__init__`` and call :meth:`configure` in
    ``patch_module`` (the switches are read there, never per call).
    ``packages``: the library's top-level packages, whose frames are not the
    caller (:func:`caller_is_exporter`); ``chain``: the context variable holding
    the instrumentor's :class:`ClientChain` (one is made if not given).

    * :meth:`request` / :meth:`outcome`: the attributes of a request, the
      response's status, ``error.type`` and protocol version -- for a
      :class:`autotrace.kit.CallSpan`'s ``describe`` and ``finish`` too.
    * :meth:`logical_request`, :meth:`attempts`, :meth:`retried`, :meth:`retry`:
      for libraries that redirect or retry *inside* one call (requests, urllib3:
      ``Retry`` calls ``urlopen`` again): each physical request is a span,
      siblings under the caller's span, each injected into what it sends --
      which a CallSpan cannot do, its span being bound to the call.
    """

    __slots__ = (
        "instrumentor", "library", "chain", "excluded", "dup", "capture_request", "capture_response",
        "exporter_urls", "_skip", "_names",
    )

    def __init__(self, instrumentor: Any, packages: Tuple[str, ...], chain: Optional[ContextVar] = None) -> None:
        self.instrumentor = instrumentor
        self.library: str = instrumentor.name
        self.chain: ContextVar = chain if chain is not None else ContextVar(f"autotrace.{self.library}.chain", default=None)
        self._skip = tuple(p + "." for p in packages) + ("wrapt.", type(instrumentor).__module__, __name__)
        self._names = tuple(packages)
        self.configure()

    def configure(self) -> None:
        """Read every switch (patch time): excluded URLs, ``http/dup``, header capture, export endpoints."""
        _URL_PARTS.clear()  # the redaction rules may have changed
        self.excluded = excluded_urls(self.library)
        self.dup = semconv_dup("http")
        self.capture_request = header_capture_enabled("client_request")
        self.capture_response = header_capture_enabled("client_response")
        self.exporter_urls = exporter_endpoints()

    # -- attributes -----------------------------------------------------------
    def request(self, method: Any, url: Any, user_agent: Optional[str], headers: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
        """``(span name, attributes)`` of a request, or None when its URL is excluded.

        ``method`` normalised (``_OTHER`` + ``http.request.method_original``),
        ``url.full`` redacted, ``server.*`` with the implicit port,
        ``user_agent.original``, the configured request headers (``headers``: a
        mapping or ``(name, value)`` pairs, read only then) and the ``http/dup`` names.
        """
        if not isinstance(url, str):
            url = url.decode("utf-8", "replace") if isinstance(url, bytes) else str(url)
        excluded = self.excluded
        if excluded and excluded.match(url):
            return None
        name, original = normalize_method(method)
        parts = _URL_PARTS.get(url)
        if parts is None:
            parts = url_parts(url)
        full, host, port = parts
        attributes: Dict[str, Any] = {"http.request.method": name, "url.full": full}
        if host is not None:
            attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        if original is not None:
            attributes["http.request.method_original"] = original
        if user_agent:
            attributes["user_agent.original"] = user_agent
        if self.capture_request:
            attributes.update(capture_headers("client_request", _pairs(headers)))
        if self.dup:
            with_old_names(attributes, client=True)
        return name, attributes

    def outcome(self, span: Span, status: Any, version: Optional[str] = None, headers: Any = None) -> None:
        """What a response tells, set on ``span`` in one :func:`set_attributes` call.

        ``status`` (an int, else ignored): ``http.response.status_code``, and
        for >= 400 ``error.type`` and status ERROR; ``version``:
        ``network.protocol.version``; ``headers`` (a mapping or ``(name, value)``
        pairs): the configured response headers; with ``http/dup`` the old names too.
        """
        if not span.is_recording():
            return
        dup = self.dup
        if isinstance(status, int):
            attributes: Dict[str, Any] = {"http.response.status_code": status}
            if status >= 400:
                attributes["error.type"] = str(status)
                span.set_status(Status(StatusCode.ERROR))
            if dup:
                attributes["http.status_code"] = status
        else:
            attributes = {}
        if version is not None:
            attributes["network.protocol.version"] = version
            if dup:
                attributes["http.flavor"] = version
        if headers is not None and self.capture_response:
            attributes.update(capture_headers("client_response", _pairs(headers)))
        if attributes:
            set_attributes(span, attributes)

    # -- calls redirected and retried inside ----------------------------------------
    def logical_request(self, wrapped: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], request: Any, streamed: Any) -> Any:
        """Run ``wrapped`` (``Session.send``) as one logical request, a new :class:`ClientChain`.

        Call it from the wrapper itself (the frames above are searched):
        export traffic -- a caller in :data:`EXPORTER_MODULES`, or
        ``request.url`` under a configured endpoint -- runs with instrumentation
        fully suppressed. The last response's span, held until its body is read,
        ends here if the call fails (the exception recorded) or, unless
        ``streamed``, when it returns (the body was read by then).
        """
        exporter = False
        try:
            # (the module test first saves a call; depth 3: 1 is here, 2 the wrapper)
            exporter = "opentelemetry.exporter" in _MODULES and caller_is_exporter(self._skip, self._names, 3)
            if not exporter and self.exporter_urls:
                url = request.url
                exporter = isinstance(url, str) and url.startswith(self.exporter_urls)
        except Exception:
            internal_error(self.library + ".session")
        if exporter:
            with suppressed():
                return wrapped(*args, **kwargs)
        chain = ClientChain()
        var = self.chain
        token = var.set(chain)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            var.reset(token)
            if chain.pending is not None:
                release(chain.pending, exc)
            raise
        var.reset(token)
        if chain.pending is not None and not streamed:
            release(chain.pending)
        return result

    def attempts(self, describe: Callable[..., Any], finish: Callable[[Span, Any], Any], site: str) -> Callable[..., Any]:
        """A wrapt wrapper: a CLIENT span for the first physical request of each call (sync).

        ``describe(instance, args, kwargs)``: ``(name, attributes, carrier)`` or
        None (no span). The span starts in the current context with
        ``http.request.resend_count`` from the chain, is injected into
        ``carrier`` and is current, with the HTTP suppression key, during the
        call; a retry decided inside ends it (:meth:`retried`) and starts the
        next (:meth:`retry`). ``finish(span, result)`` sets the outcome on the
        last attempt's span and returns the object whose release ends it
        (:func:`autotrace.kit.hold`: e.g. the body read later), or None to end it
        now. An exception ends it with the error recorded. Outside a
        :meth:`logical_request` each call is its own chain.
        """
        instrumentor = self.instrumentor
        var = self.chain
        get_chain = var.get
        get_current = _get_current
        detach = _detach
        suppress_all = SUPPRESS_INSTRUMENTATION_KEY
        suppress_http = SUPPRESS_HTTP_INSTRUMENTATION_KEY

        def begin(chain: ClientChain, current: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            """``(call, token)`` or None; never raises. (:func:`_start_attempt` inline: one call less per request.)"""
            call = None
            try:
                described = describe(instance, args, kwargs)
                if described is None:
                    return None
                name, attributes, carrier = described
                call = ClientCall(instrumentor._tracer or instrumentor.tracer, name, attributes, current)
                sent = chain.sent
                chain.sent = sent + 1
                if sent:
                    attributes = dict(attributes)
                    attributes["http.request.resend_count"] = sent
                span = call.span = call.tracer.start_span(name, current, _CLIENT, attributes)
                ctx = span_context(span, current, suppress_http)
                if carrier is not None:
                    inject(carrier, ctx)
                return call, _attach(ctx)
            except Exception:
                internal_error(site)
                if call is not None and call.span is not None:
                    _end(call.span, site)
                return None

        def failed(call: ClientCall, token: Any, exc: BaseException) -> None:
            span = call.span
            call.span = None
            try:
                detach(token)
                if span is not None:
                    record_error(span, exc)
            except Exception:
                internal_error(site)
            if span is not None:
                _end(span, site)

        def returned(chain: ClientChain, call: ClientCall, token: Any, result: Any) -> None:
            span = call.span
            call.span = None
            try:
                detach(token)
                if span is None:
                    return
                holder = finish(span, result)
                if holder is not None:
                    hold(holder, PendingSpan(span))
                    chain.pending = holder
                    return
            except Exception:
                internal_error(site)
            if span is not None:
                _end(span, site)

        def wrapper(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            current = get_current()
            if current.get(suppress_all) or current.get(suppress_http):
                return wrapped(*args, **kwargs)
            chain = get_chain()
            if chain is None:  # called outside a logical request: the call is one
                own = var.set(ClientChain())
                try:
                    return wrapper(wrapped, instance, args, kwargs)
                finally:
                    var.reset(own)
            started = begin(chain, current, instance, args, kwargs)
            if started is None:
                return wrapped(*args, **kwargs)
            call, token = started
            previous = chain.call
            chain.call = call
            try:
                result = wrapped(*args, **kwargs)
            except BaseException as exc:
                chain.call = previous
                failed(call, token, exc)
                raise
            chain.call = previous
            returned(chain, call, token, result)
            return result

        return wrapper

    def retry_hook(self, chain: ContextVar) -> Callable[..., Any]:
        """The wrapper of urllib3's ``Retry.increment`` for a client whose attempts are in ``chain``.

        A retry was decided: the attempt's span ends with its own outcome. When
        retries are exhausted ``increment`` raises and the span stays open: the
        client's call records the exception the caller actually gets.
        """
        retried = self.retried

        def increment(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            result = wrapped(*args, **kwargs)
            current = chain.get()
            call = current.call if current is not None else None
            if call is not None and call.span is not None:
                response = arg(args, kwargs, 2, "response")
                retried(
                    call, arg(args, kwargs, 3, "error"), getattr(response, "status", None),
                    PROTOCOL_VERSIONS.get(getattr(response, "version", None)),
                )
            return result

        return increment

    def retried(self, call: ClientCall, error: Optional[BaseException], status: Any = None, version: Optional[str] = None) -> None:
        """A retry was decided: end the current attempt's span with its own outcome (``error``, else ``status``/``version``)."""
        span = call.span
        if span is None:
            return
        call.span = None
        try:
            if error is not None:
                record_error(span, error)
            else:
                self.outcome(span, status, version)
        except Exception:
            internal_error(self.library + ".retry")
        _end(span, self.library + ".retry")

    def retry(self, chain: ClientChain, call: ClientCall, wrapped: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], carrier: Any) -> Any:
        """Run ``wrapped`` -- the library sending ``call``'s request again -- as its next attempt.

        The new span is a sibling of the previous attempts (same parent, name
        and attributes, the next ``http.request.resend_count``), injected into
        ``carrier`` (the headers it sends) and current during the call. It is
        not ended here: by the next :meth:`retried`, or when the
        :meth:`attempts` call ends.
        """
        token = None
        try:
            token = _start_attempt(call, chain, carrier)
        except Exception:
            internal_error(self.library + ".retry")
        if token is None:
            return wrapped(*args, **kwargs)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _detach(token)
