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

The mechanisms (spans per attempt, the chain of one logical request, the
attributes and outcome) are :class:`autotrace.http.HttpClient`'s; this module
says what to wrap and reads requests' and urllib3's objects.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Dict, Optional, Tuple

from autotrace.http import PROTOCOL_VERSIONS, ClientChain, HttpClient
from autotrace.http import server_of as _server, url_origin as _origin  # noqa: F401  (tests use these names)
from autotrace.kit import Instrumentor, arg, release

_VERSIONS = PROTOCOL_VERSIONS
#: The logical request (``Session.send``) in progress.
_CHAIN: "ContextVar[Optional[ClientChain]]" = ContextVar("autotrace.requests", default=None)


class RequestsInstrumentor(Instrumentor):
    name = "requests"
    distribution = "requests"
    supported = ">=2.0,<3"
    covers = ("requests",)
    modules = ("requests",)

    def __init__(self) -> None:
        super().__init__()
        self._client = HttpClient(self, ("requests",), _CHAIN)
        # Bound once, so that wrap() recognises (and refuses) a second patch.
        self._w_session_send = self._session_send
        self._w_adapter_send = self._client.attempts(self._describe, self._finish, "requests.send")
        self._w_urlopen = self._urlopen
        self._w_increment = self._client.retry_hook(_CHAIN)
        self._w_release = self._release

    def patch_module(self, module_name: str, module: Any) -> None:
        import importlib

        import requests.adapters
        import requests.sessions

        self._client.configure()
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
        if _CHAIN.get() is not None and kwargs.get("allow_redirects", True) is False:
            return wrapped(*args, **kwargs)  # a redirect hop: same chain
        return self._client.logical_request(wrapped, args, kwargs, arg(args, kwargs, 0, "request"), kwargs.get("stream"))

    # -- HTTPAdapter.send: the first attempt's span ---------------------------
    def _describe(self, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = arg(args, kwargs, 0, "request")
        headers = request.headers
        described = self._client.request(request.method, request.url, headers.get("User-Agent"), headers)
        return None if described is None else (described[0], described[1], headers)

    def _finish(self, span: Any, response: Any) -> Any:
        """The outcome; the urllib3 response whose release ends the span, unless already closed."""
        raw = getattr(response, "raw", None)
        self._client.outcome(
            span, getattr(response, "status_code", None), _VERSIONS.get(getattr(raw, "version", None)), response.headers
        )
        return None if raw is None or raw.closed else raw

    # -- urllib3: retries -------------------------------------------------------
    def _urlopen(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        chain = _CHAIN.get()
        call = chain.call if chain is not None else None
        if call is None or call.span is not None:
            return wrapped(*args, **kwargs)  # not ours, or the first attempt
        return self._client.retry(chain, call, wrapped, args, kwargs, arg(args, kwargs, 3, "headers"))

    # -- urllib3: end of the body ---------------------------------------------
    def _release(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        release(instance)
        return wrapped(*args, **kwargs)
