"""HTTP rules shared by every HTTP instrumentor, server and client.

Privacy lives here, once: URL userinfo and the values of sensitive query
parameters are redacted, captured headers that carry credentials are recorded
as ``REDACTED``. So do the stable-semconv details every HTTP span needs
(method normalisation, status rules, the ``http/dup`` old names) and the
excluded-URL matching, so that Flask, FastAPI and requests agree.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.trace import Span, Status, StatusCode

from autotrace.config import EnvReader, semconv_dup
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
