"""aiohttp client: one CLIENT span per physical HTTP request of a ``ClientSession``.

Where the spans come from (class-level patches: ``session.get/post/request``,
``aiohttp.request``, ``ws_connect``, sessions created before patching and
subclasses are covered):

* ``ClientSession._request`` -- no span: it is one logical request, whose
  redirects (and aiohttp's one retry of an idempotent request on a dropped
  keep-alive connection) loop *inside* it. The wrapper adds our client
  middleware (aiohttp >= 3.12) to the call, innermost, after the session's or
  the call's own middlewares; a fresh :class:`_Hops` counts its physical requests.
* the middleware -- aiohttp calls it once per physical request with the
  ``ClientRequest`` about to be connected and sent: a :class:`CallSpan` around
  the connect + send + response headers, current (with the HTTP suppression
  key) while the request is in flight, injected into ``ClientRequest.headers``
  -- aiohttp's own copy, never the caller's dict nor the session's defaults --
  and ``http.request.resend_count`` = 1, 2... on every request after the first.
  Why not aiohttp's ``TraceConfig`` signals: ``on_request_start`` fires once per
  logical request (not per hop, not for the retry) and the signals cannot make
  the span current; ``ClientRequest.send`` runs after the connect, so a refused
  connection would get no span.
* ``ClientResponse._response_eof`` / ``release`` / ``close`` -- the span ends
  when the body has been read to its end, or the response is released or
  closed first (``async with`` included); a response dropped unread ends it
  when garbage-collected; a WebSocket's (``101``) ends with the handshake. An
  unfinished body ends it with the reading error recorded: the stream's own
  (payload error, read timeout), else a timeout, cancellation or connection
  error being raised through ``read()`` / ``async with``.

Errors: the exception of the physical request (``ClientConnectorError``,
``ServerDisconnectedError``, ``SocketTimeoutError``, ``asyncio.CancelledError``...),
except that a total timeout, which aiohttp's timer raises as a cancellation
inside the request and the caller gets as ``TimeoutError``, is recorded as that.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Dict, Tuple

from autotrace._log import internal_error
from autotrace.http import HttpClient
from autotrace.kit import CallSpan, Instrumentor, Plan, Suppress, guard, held, hold, record_error, release

_VERSIONS = {(1, 1): "1.1", (1, 0): "1.0", (2, 0): "2", (0, 9): "0.9"}
_NO_KWARGS: Dict[str, Any] = {}


class _Hops:
    """The middleware of one logical request: ``sent`` physical requests so far."""

    __slots__ = ("send", "sent")

    def __init__(self, send: Any) -> None:
        self.send = send
        self.sent = 0

    def __call__(self, request: Any, handler: Any) -> Any:
        return self.send(handler, self, (request,), _NO_KWARGS)  # the span's coroutine, awaited by aiohttp


class AiohttpClientInstrumentor(Instrumentor):
    name = "aiohttp_client"
    distribution = "aiohttp"
    supported = ">=3.12,<4"
    covers = ("aiohttp-client",)
    modules = ("aiohttp.client",)

    def __init__(self) -> None:
        super().__init__()
        self._client = HttpClient(self, ("aiohttp",))
        self._send = CallSpan(self, self._describe, suppress=Suppress.HTTP, record=self._record,
                              outlive=self._outlive, site="aiohttp_client.send").async_
        # Bound once, so that wrap() recognises (and refuses) a second patch.
        self._w_request = self._request
        self._w_eof = self._eof
        self._w_release = self._release

    def patch_module(self, module_name: str, module: Any) -> None:
        from aiohttp import client_reqrep
        from aiohttp.client_exceptions import ClientConnectionError, ClientPayloadError

        self._client.configure()
        #: what stops a body being read (not the program's own errors inside ``async with``)
        self._read_errors = (ClientPayloadError, ClientConnectionError, asyncio.TimeoutError, asyncio.CancelledError)
        self.wrap(module, "ClientSession._request", self._w_request)
        self.wrap(client_reqrep, "ClientResponse._response_eof", self._w_eof)
        self.wrap(client_reqrep, "ClientResponse.release", self._w_release)
        self.wrap(client_reqrep, "ClientResponse.close", self._w_release)

    def _request(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:  # (kwargs is this call's own dict: adding ours in place changes nothing the caller holds)
            own = kwargs.get("middlewares")
            kwargs["middlewares"] = (*(instance._middlewares if own is None else own), _Hops(self._send))
        except Exception:
            internal_error("aiohttp_client.request")
        return wrapped(*args, **kwargs)

    def _describe(self, hops: _Hops, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = args[0]
        headers = request.headers
        client = self._client
        url = str(request.url)
        if client.exporter_urls and url.startswith(client.exporter_urls):
            return None
        described = client.request(request.method, url, headers.get("User-Agent"), headers)
        if described is None:
            return None
        sent = hops.sent
        hops.sent = sent + 1
        if sent:
            described[1]["http.request.resend_count"] = sent
        return Plan(described[0], described[1], carrier=headers, state=request)

    def _record(self, span: Any, exc: BaseException, request: Any) -> None:
        """A total timeout reaches the span as the cancellation aiohttp's timer turns into the caller's TimeoutError."""
        timer = getattr(request, "_timer", None)
        if isinstance(exc, asyncio.CancelledError) and getattr(timer, "_cancelled", False):
            exc = asyncio.TimeoutError().with_traceback(exc.__traceback__)
        record_error(span, exc)

    def _outlive(self, pending: Any, response: Any, hops: Any) -> Any:
        """The outcome (here rather than in ``finish``: one call less); the span held until the body is read."""
        self._client.outcome(pending.span, response.status, _VERSIONS.get(response.version), response.headers)
        pending.state = None  # the request: it refers to the response, which it would keep alive
        if response.closed or response.status == 101:  # no body, the body came with the headers, a WebSocket
            pending.end()
        else:
            hold(response, pending, collect=True)
        return response

    def _eof(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        release(instance)  # the body was read to its end
        return wrapped(*args, **kwargs)

    def _release(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if held(instance) is not None:  # released before the end of the body: why?
            failure = None
            with guard("aiohttp_client.release"):  # the stream's error, else one raised through read / async with
                failure = instance.content.exception() or sys.exc_info()[1]
            release(instance, failure if isinstance(failure, self._read_errors) else None)
        return wrapped(*args, **kwargs)
