"""http.client (stdlib): one CLIENT span per request sent on an ``HTTPConnection``.

What is wrapped (class level, so ``HTTPSConnection``, subclasses and
connections made before patching are covered):

* ``HTTPConnection.request`` -- starts the span; the propagation headers go
  into a *copy* of the caller's ``headers`` dict (the caller's is never
  touched; a ``traceparent`` of the caller's with the same spelling is replaced).
  Headers given as another mapping are left as they are: the span then comes
  from ``putrequest``.
* ``HTTPConnection.putrequest`` -- the low-level API (``putrequest`` /
  ``putheader`` / ``endheaders``: xmlrpc.client, urllib3 2.x): starts the span
  and sends the propagation headers with ``putheader`` right after the request
  line. Inside ``request()`` it adds nothing (``request`` calls it).
* ``HTTPConnection.getresponse`` -- the span ends when it returns, with the
  status, protocol version and configured response headers (or the error it
  raised). So a span covers sending the request and receiving the response
  head, not the body: http.client hands the body to the caller, who reads it
  or not, much later or never.
* ``HTTPConnection.close`` -- a request never answered ends its span here (or
  at the next request on the connection).

Spans only when no other HTTP client span is current: requests, urllib3 and
urllib.request set the HTTP suppression key around their requests, so their
traffic is theirs alone. Exporter traffic (the SDK's suppress key, a
configured OTLP endpoint, a caller in an exporter module) gets no span and
no headers. ``url.full`` is built from the connection (``set_tunnel``'s
target host when tunnelling) and the request target, redacted.
``OTEL_PYTHON_HTTP_CLIENT_EXCLUDED_URLS`` (else ``OTEL_PYTHON_EXCLUDED_URLS``);
a URL excluded for urllib, urllib3 or requests is excluded here too (those
clients send through http.client, and without their span it would trace them).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any, Dict, Optional, Tuple

from autotrace.http import DEFAULT_PORTS, PROTOCOL_VERSIONS, ExcludedUrls, HttpClient, caller_is_exporter, excluded_urls
from autotrace.kit import CallSpan, Instrumentor, Plan, Suppress, arg, ends_held, hold, release, replace_arg

_MODULES = sys.modules
#: Frames passed over when looking for an exporter caller: the HTTP libraries built on http.client, ours.
_SKIP = ("http.", "urllib.", "urllib3.", "requests.", "wrapt.", "autotrace.kit", "autotrace.http", "autotrace.instrumentors.")


@lru_cache(maxsize=256)
def origin(scheme: str, host: str, port: Optional[int]) -> str:
    """``scheme://host[:port]`` (the port only when not the scheme's default; IPv6 in brackets)."""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" if port is None or port == DEFAULT_PORTS.get(scheme) else f"{scheme}://{host}:{port}"


def excluded_under(*libraries: str) -> ExcludedUrls:
    """The excluded URLs of ``libraries``: a URL a client excludes gets no span from the clients under it either."""
    found = {p.pattern: p for library in libraries for p in excluded_urls(library).patterns}
    return ExcludedUrls(list(found.values()))


class HttpClientInstrumentor(Instrumentor):
    name = "http_client"
    modules = ("http.client",)

    def __init__(self) -> None:
        super().__init__()
        self._client = HttpClient(self, ("http",))
        # Bound once, so that wrap() recognises (and refuses) a second patch.
        self._w_request = CallSpan(self, self._describe_request, suppress=Suppress.HTTP, outlive=self._sent)
        self._w_putrequest = CallSpan(self, self._describe_putrequest, suppress=Suppress.HTTP, outlive=self._sent)
        self._w_getresponse = ends_held(self._outcome, "http_client.getresponse")
        self._w_close = self._close

    def patch_module(self, module_name: str, module: Any) -> None:
        self._client.configure()
        self._client.excluded = excluded_under(self.name, "urllib", "urllib3", "requests")
        self.wrap(module, "HTTPConnection.request", self._w_request)
        self.wrap(module, "HTTPConnection.putrequest", self._w_putrequest)
        self.wrap(module, "HTTPConnection.getresponse", self._w_getresponse)
        self.wrap(module, "HTTPConnection.close", self._w_close)

    def _describe(self, conn: Any, method: Any, target: Any, headers: Any) -> Any:
        """``(name, attributes)`` of a request, or None (excluded, exporter traffic)."""
        if not target.startswith(("http://", "https://")):  # else absolute (a request to a proxy)
            host = conn._tunnel_host  # CONNECT tunnel through a proxy: the target host
            port = conn._tunnel_port if host else conn.port
            target = origin("https" if conn.default_port == 443 else "http", host or conn.host, port) + target
        client = self._client
        if (client.exporter_urls and target.startswith(client.exporter_urls)) or (
            "opentelemetry.exporter" in _MODULES and caller_is_exporter(_SKIP)
        ):
            return None
        agent = headers.get("User-Agent") or headers.get("user-agent") if headers else None
        return client.request(method, target, agent, headers)

    def _describe_request(self, conn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        headers = arg(args, kwargs, 3, "headers", {})
        if type(headers) is not dict:
            return None  # another mapping: copied, it might not send the same; the putrequest wrapper traces it
        sent = headers.copy()
        described = self._describe(conn, arg(args, kwargs, 0, "method"), arg(args, kwargs, 1, "url"), sent)
        if described is None:
            return None
        args, kwargs = replace_arg(args, kwargs, 3, "headers", sent)
        return Plan(described[0], described[1], carrier=sent, args=args, kwargs=kwargs, state=(conn, None))

    def _describe_putrequest(self, conn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        described = self._describe(conn, arg(args, kwargs, 0, "method"), arg(args, kwargs, 1, "url"), ())
        if described is None:
            return None
        headers: Dict[str, str] = {}
        return Plan(described[0], described[1], carrier=headers, state=(conn, headers))

    def _sent(self, pending: Any, result: Any, state: Any) -> Any:
        """The request is out: the propagation headers follow a bare ``putrequest``; the span waits for the response."""
        conn, headers = state
        if headers:
            for name, value in headers.items():
                conn.putheader(name, value)
        release(conn)  # a previous request on this connection never answered
        hold(conn, pending)
        return result

    def _outcome(self, span: Any, response: Any) -> None:
        self._client.outcome(span, response.status, PROTOCOL_VERSIONS.get(response.version), response.headers)

    def _close(self, wrapped: Any, conn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        release(conn)
        return wrapped(*args, **kwargs)
