"""urllib3 (1.26, 2.x) used directly: one CLIENT span per physical HTTP request.

What is wrapped (class level: pools and managers made before patching, and
subclasses such as ``ProxyManager`` / ``HTTPSConnectionPool``, are covered):

* ``HTTPConnectionPool.urlopen`` -- the span of each request a pool sends
  (``pool.request``, ``pool.urlopen``, and each request of a ``PoolManager``).
  The propagation headers go into a *copy* of the headers passed (or of the
  pool's default headers): the caller's dict and ``PoolManager.headers`` are
  never modified. The span is current with the HTTP suppression key set, so
  http.client adds no span.
* ``Retry.increment`` + the recursive ``urlopen`` -- a retry (``Retry``:
  connect/read errors, ``status_forcelist``) or a same-pool redirect decided
  inside one ``urlopen`` call ends the attempt's span with its own outcome,
  and the next attempt is a sibling span with ``http.request.resend_count``
  (and its own ``url.full`` for a redirect).
* ``PoolManager.urlopen`` -- no span: scopes one logical request, so that the
  cross-host redirect hops it follows count on in ``resend_count``, and sends
  exporter traffic (a caller in an exporter module, a configured OTLP
  endpoint) with all instrumentation suppressed.
* ``HTTPResponse.release_conn`` / ``close`` -- a response not preloaded
  (``preload_content=False``) ends its span when its body has been read or it
  is released or closed (or garbage-collected); a preloaded one when
  ``urlopen`` returns, the body read.

Under requests (which uses urllib3) nothing is added: requests' span is
current with the HTTP suppression key. ``OTEL_PYTHON_URLLIB3_EXCLUDED_URLS``
(else ``OTEL_PYTHON_EXCLUDED_URLS``); a URL excluded for requests is excluded
here too (requests sends through urllib3).
"""

from __future__ import annotations

from collections import namedtuple
from contextvars import ContextVar
from typing import Any, Dict, Optional, Tuple

from autotrace._log import internal_error
from autotrace.http import PROTOCOL_VERSIONS, ClientChain, HttpClient
from autotrace.instrumentors.http_client import excluded_under, origin
from autotrace.kit import Instrumentor, arg, is_suppressed, release, replace_arg

#: The logical request (``PoolManager.urlopen``, or a pool's ``urlopen`` used alone) in progress.
_CHAIN: "ContextVar[Optional[ClientChain]]" = ContextVar("autotrace.urllib3", default=None)
_Target = namedtuple("_Target", "url")  # what HttpClient.logical_request reads of a request


class Urllib3Instrumentor(Instrumentor):
    name = "urllib3"
    distribution = "urllib3"
    supported = ">=1.26,<3"
    covers = ("urllib3",)
    modules = ("urllib3",)

    def __init__(self) -> None:
        super().__init__()
        self._client = HttpClient(self, ("urllib3", "requests"), _CHAIN)
        self._agent: Tuple[Optional[str], Any] = (None, None)  # urllib3's default User-Agent, SKIP_HEADER
        # Bound once, so that wrap() recognises (and refuses) a second patch.
        self._w_attempt = self._client.attempts(self._describe, self._finish, "urllib3.urlopen")
        self._w_manager = self._manager_urlopen
        self._w_pool = self._pool_urlopen
        self._w_increment = self._client.retry_hook(_CHAIN)
        self._w_release = self._release

    def patch_module(self, module_name: str, urllib3: Any) -> None:
        # urllib3/__init__ imports every module wrapped here.
        self._client.configure()
        self._client.excluded = excluded_under(self.name, "requests")
        self._agent = ("python-urllib3/" + urllib3.__version__, getattr(urllib3.util, "SKIP_HEADER", None))
        self.wrap(urllib3.poolmanager, "PoolManager.urlopen", self._w_manager)
        self.wrap(urllib3.connectionpool, "HTTPConnectionPool.urlopen", self._w_pool)
        self.wrap(urllib3.util.retry, "Retry.increment", self._w_increment)
        self.wrap(urllib3.response, "HTTPResponse.release_conn", self._w_release)
        self.wrap(urllib3.response, "HTTPResponse.close", self._w_release)

    # -- one logical request --------------------------------------------------
    def _manager_urlopen(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if _CHAIN.get() is not None or is_suppressed(http=True):
            return wrapped(*args, **kwargs)  # a redirect hop, or under another HTTP client's span
        url = arg(args, kwargs, 1, "url")
        return self._client.logical_request(wrapped, args, kwargs, _Target(url), kwargs.get("preload_content") is False)

    def _pool_urlopen(self, wrapped: Any, pool: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        chain = _CHAIN.get()
        if chain is None:
            if is_suppressed(http=True):
                return wrapped(*args, **kwargs)  # under requests (or another HTTP client's span)
            target = _Target(self._url(pool, arg(args, kwargs, 1, "url")))
            streamed = arg(args, kwargs, 12, "preload_content", True) is False
            return self._client.logical_request(self._attempt, (wrapped, pool, args, kwargs), {}, target, streamed)
        call = chain.call
        if call is None or call.span is not None:
            return self._attempt(wrapped, pool, args, kwargs)  # a hop's first attempt (or nested: suppressed)
        # A retry or redirect decided inside urlopen: the next attempt, a sibling span.
        sent = self._prepare(pool, args, kwargs, True)
        if sent is None or sent[2] is None:
            return wrapped(*args, **kwargs)
        call.name, call.attributes = sent[2][0], sent[2][1]
        return self._client.retry(chain, call, wrapped, sent[0], sent[1], sent[2][2])

    def _attempt(self, wrapped: Any, pool: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        sent = self._prepare(pool, args, kwargs, False)
        if sent is None:
            return wrapped(*args, **kwargs)
        return self._w_attempt(wrapped, pool, sent[0], sent[1])

    def _prepare(self, pool: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], describe: bool) -> Any:
        """``(args, kwargs, description)`` with a copy of the headers to send (ours to inject into); None on failure."""
        try:
            headers = arg(args, kwargs, 3, "headers")
            args, kwargs = replace_arg(args, kwargs, 3, "headers", (pool.headers if headers is None else headers).copy())
            return args, kwargs, (self._describe(pool, args, kwargs) if describe else None)
        except Exception:
            internal_error("urllib3.prepare")
            return None

    def _url(self, pool: Any, url: str) -> str:
        return url if url.startswith(("http://", "https://")) else origin(pool.scheme, pool.host, pool.port) + url

    def _describe(self, pool: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        headers = arg(args, kwargs, 3, "headers")  # what urllib3 sends, else its default (unless SKIP_HEADER)
        agent = next((v for k, v in headers.items() if k.lower() == "user-agent"), self._agent[0])
        agent = None if agent == self._agent[1] else agent
        described = self._client.request(arg(args, kwargs, 0, "method"), self._url(pool, arg(args, kwargs, 1, "url")), agent, headers)
        return None if described is None else (described[0], described[1], headers)

    def _finish(self, span: Any, response: Any) -> Any:
        """The outcome; the response whose release ends the span, unless already read and closed."""
        self._client.outcome(span, response.status, PROTOCOL_VERSIONS.get(response.version), response.headers)
        return None if response.closed else response

    # -- retries and the end of the body ----------------------------------------
    def _release(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        release(instance)
        return wrapped(*args, **kwargs)
