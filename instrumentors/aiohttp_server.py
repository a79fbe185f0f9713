"""aiohttp server (``aiohttp.web.Application``): one SERVER span per request.

Hooked at class level: ``aiohttp.web_app.Application._handle(request)``, the
coroutine aiohttp's ``RequestHandler`` awaits for every request of an
application (routing, middlewares, the handler). It is the narrowest point
that sees both the matched route (``request.match_info``, set inside it) and
the handler's outcome: the response it returns, or the exception it raises
before aiohttp turns it into a response (``_handle_request`` sees only the
final 500, not the exception). Sub-applications (``add_subapp``) are routed
inside the root application's ``_handle``: one span per request.

* Name ``{METHOD} {route}``, ``http.route`` the resource's canonical path
  (``/users/{id}``, with sub-app prefixes); ``{METHOD}`` alone when nothing
  matched (404/405 from the router).
* Parent: the context the request headers bring (:func:`autotrace.kit.extract`).
* Outcome: the returned response's status (a 5xx is an error, a 4xx not); an
  ``HTTPException`` raised by the handler is a response (``HTTPNotFound`` ->
  404, nothing recorded); another exception is recorded, with the 500 (504
  for a timeout) aiohttp answers; a cancellation (client gone, with
  ``handler_cancellation``; server shutdown) is recorded as
  ``asyncio.CancelledError``.
* The span is current in middlewares and the handler, and ends when the
  handler returns: a ``StreamResponse`` written in parts is timed in full; a
  plain ``Response`` body, written by aiohttp afterwards, is not.

The span itself is the kit's (:class:`autotrace.kit.CallSpan`, kind SERVER);
the rules (redaction, header capture, excluded URLs, status, old names) are
:mod:`autotrace.http`'s.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from autotrace.asgi import authority
from autotrace.http import (
    capture_headers,
    excluded_urls,
    header_capture_enabled,
    normalize_method,
    redact_query,
    set_server_status,
    with_old_names,
)
from autotrace.kit import SERVER, CallSpan, Instrumentor, Plan, extract, record_error

#: ``OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS``
LIBRARY = "aiohttp_server"
_VERSIONS = {(1, 1): "1.1", (1, 0): "1.0", (0, 9): "0.9"}


def _describe(app: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """The span of one request: stable-semconv attributes, the parent from its headers; None if excluded."""
    request = args[0] if args else kwargs["request"]
    headers = request.headers
    host = headers.get("Host")
    scheme = request.scheme
    path = request.path
    excluded = excluded_urls(LIBRARY)
    if excluded and excluded.match(f"{scheme}://{host or ''}{path}"):
        return None
    method, original = normalize_method(request.method)
    attributes: Dict[str, Any] = {"http.request.method": method, "url.path": path, "url.scheme": scheme}
    if original is not None:
        attributes["http.request.method_original"] = original
    query = request.rel_url.raw_query_string
    if query:
        attributes["url.query"] = redact_query(query)
    transport = None if host else request.transport  # the socket only when there is no Host header
    address, port = authority(host, scheme, transport and transport.get_extra_info("sockname"))
    if address:
        attributes["server.address"] = address
        if port is not None:
            attributes["server.port"] = port
    remote = request.remote
    if remote:
        attributes["client.address"] = remote
    version = request.version
    attributes["network.protocol.version"] = _VERSIONS.get(version) or f"{version[0]}.{version[1]}"
    user_agent = headers.get("User-Agent")
    if user_agent is not None:
        attributes["user_agent.original"] = user_agent
    if header_capture_enabled("server_request"):
        attributes.update(capture_headers("server_request", request.raw_headers))
    with_old_names(attributes, client=False)
    name = "HTTP" if method == "_OTHER" else method
    return Plan(name, attributes, parent=extract(headers), state=(request, name))


def _routed(span: Any, state: Tuple[Any, str]) -> Dict[str, Any]:
    """Rename the span by the matched resource; its ``http.route`` attribute to set (none if nothing matched)."""
    request, method = state
    match_info = getattr(request, "_match_info", None)  # (the public property asserts it is set)
    resource = getattr(getattr(match_info, "route", None), "resource", None)
    route = getattr(resource, "canonical", None)
    if not route:
        return {}
    span.update_name(f"{method} {route}")
    return {"http.route": route}


def _finish(span: Any, response: Any, state: Tuple[Any, str]) -> None:
    more = _routed(span, state)
    status = getattr(response, "status", None)
    if header_capture_enabled("server_response") and status is not None:
        more.update(capture_headers("server_response", response.headers.items()))
    set_server_status(span, status if type(status) is int else 500, more)  # not a response: aiohttp answers 500


def _recorder() -> Any:
    """``record`` for a handler that raised: aiohttp's exception types are known once it is imported."""
    import asyncio

    from aiohttp.web_exceptions import HTTPException

    def record(span: Any, exc: BaseException, state: Tuple[Any, str]) -> None:
        if isinstance(exc, HTTPException):  # a response aiohttp sends, not a failure
            _finish(span, exc, state)
            return
        more = _routed(span, state)
        if isinstance(exc, Exception):
            set_server_status(span, 504 if isinstance(exc, asyncio.TimeoutError) else 500, more)
        elif more:
            span.set_attributes(more)
        record_error(span, exc)

    return record


class AiohttpServerInstrumentor(Instrumentor):
    name = "aiohttp.web"
    distribution = "aiohttp"
    supported = ">=3.8,<4"
    covers = ("aiohttp-server",)
    modules = ("aiohttp.web",)

    def __init__(self) -> None:
        super().__init__()
        self._call: Any = None  # built once: patching twice adds no second wrapper

    def patch_module(self, module_name: str, module: Any) -> None:
        import aiohttp.web_app

        if self._call is None:
            self._call = CallSpan(self, _describe, SERVER, finish=_finish, record=_recorder())
        self.wrap(aiohttp.web_app, "Application._handle", self._call)
