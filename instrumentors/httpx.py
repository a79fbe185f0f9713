"""httpx (0.23+): one CLIENT span per physical HTTP request, ``Client`` and ``AsyncClient``.

What is wrapped (class level, when httpx is first imported; so ``httpx.get``
and friends, clients made before patching and subclasses are covered):

* ``Client._send_single_request`` / ``AsyncClient._send_single_request`` --
  where every physical request passes: ``Client.send`` -> ``_send_handling_auth``
  -> ``_send_handling_redirects`` -> here -> ``transport.handle_request``. Each
  redirect hop and each auth round trip is its own span, and a custom transport
  (``MockTransport``, a user's ``BaseTransport``, Starlette's TestClient) gets
  one too: the span is around the transport call, whatever the transport.
  Chosen over the transport boundary (``HTTPTransport.handle_request``), which
  custom transports never pass. The propagation headers go into the
  ``httpx.Request`` httpx built (never the caller's dict); while the transport
  runs the span is current with the HTTP suppression key set, so httpcore and
  any HTTP plugin below add no span.
* ``BaseClient._build_redirect_request`` -- no span: the redirect request
  inherits how many requests were sent before it, for
  ``http.request.resend_count`` (kept on the request object: an auth flow that
  sends the same request again counts on).

A span ends when its response body has been read or the response closed: the
body (``response.stream``) is replaced by a traced one
(:func:`autotrace.httpx_common.body_types`), so an error while reading it is
recorded on the span and an abandoned streamed response ends its span when
collected. Exporter traffic (a caller in an exporter module, a configured OTLP
endpoint) gets no span and no headers. :mod:`autotrace.instrumentors.httpx2`
is this instrumentor on httpx2's modules.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Tuple

from autotrace.http import HttpClient, caller_is_exporter
from autotrace.httpx_common import body_types
from autotrace.kit import CallSpan, Instrumentor, Plan, Suppress, arg, guard

#: ``network.protocol.version`` of ``Response.http_version``.
_VERSIONS = {"HTTP/1.1": "1.1", "HTTP/2": "2", "HTTP/1.0": "1.0", "HTTP/3": "3", "HTTP/2.0": "2", "HTTP/0.9": "0.9"}
#: Attribute of an ``httpx.Request``: the physical requests sent so far in its chain of redirects and resends.
_SENT = "_autotrace_sent"
_MODULES = sys.modules


class HttpxInstrumentor(Instrumentor):
    name = "httpx"
    distribution = "httpx"
    supported = ">=0.23,<1"
    covers = ("httpx",)
    modules = ("httpx",)

    def __init__(self) -> None:
        super().__init__()
        library = self.modules[0]
        self._client = HttpClient(self, (library,))
        # Frames passed over when looking for an exporter caller: the library's, the kit's wrapper, ours.
        self._skip = (library + ".", "wrapt.", "autotrace.kit", __name__, type(self).__module__)
        self._names = (library,)
        self._bodies: Tuple[Any, Any] = (None, None)
        # Bound once, so that wrap() recognises (and refuses) a second patch.
        self._w_send = CallSpan(self, self._describe, suppress=Suppress.HTTP, outlive=self._ends(0))
        self._w_async_send = CallSpan(self, self._describe, suppress=Suppress.HTTP, outlive=self._ends(1))
        self._w_redirect = self._redirect

    def patch_module(self, module_name: str, module: Any) -> None:
        import importlib

        self._client.configure()
        self._bodies = body_types(module)
        self.wrap(module, "Client._send_single_request", self._w_send)
        self.wrap(module, "AsyncClient._send_single_request", self._w_async_send)
        self.wrap(importlib.import_module(module_name + "._client"), "BaseClient._build_redirect_request", self._w_redirect)

    def _describe(self, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = args[0] if args else kwargs["request"]
        url = str(request.url)
        client = self._client
        if (client.exporter_urls and url.startswith(client.exporter_urls)) or (
            "opentelemetry.exporter" in _MODULES and caller_is_exporter(self._skip, self._names)
        ):
            return None
        headers = request.headers
        described = client.request(request.method, url, headers.get("user-agent"), headers)
        if described is None:
            return None
        own = request.__dict__
        sent = own.get(_SENT, 0)
        own[_SENT] = sent + 1
        if sent:
            described[1]["http.request.resend_count"] = sent
        return Plan(described[0], described[1], carrier=headers)

    def _ends(self, body: int) -> Callable[..., Any]:
        """The ``outlive`` hook: the response's outcome, and its body replaced by one that ends the span."""

        def outlive(pending: Any, response: Any, state: Any) -> Any:
            self._client.outcome(pending.span, response.status_code, _VERSIONS.get(response.http_version), response.headers)
            if response.is_closed:  # a body loaded already (a transport's ``Response(content=...)``)
                pending.end()
            else:
                response.stream = self._bodies[body](response.stream, pending)
            return response

        return outlive

    def _redirect(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        redirect = wrapped(*args, **kwargs)
        with guard(self.name + ".redirect"):
            sent = arg(args, kwargs, 0, "request").__dict__.get(_SENT)
            if sent:
                redirect.__dict__[_SENT] = sent
        return redirect
