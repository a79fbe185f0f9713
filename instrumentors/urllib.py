"""urllib.request (stdlib): one CLIENT span per physical HTTP(S) request of ``urlopen`` / ``OpenerDirector.open``.

What is wrapped: ``AbstractHTTPHandler.do_open`` (class level), where every
HTTP and HTTPS request of an opener is sent -- ``urlopen``, ``build_opener``
openers, ``HTTPHandler`` / ``HTTPSHandler`` subclasses that call it. Other
schemes (``file:``, ``data:``, ``ftp:``) get no span.

* **Redirects**: urllib follows a redirect by calling ``OpenerDirector.open``
  again from inside the first call's response handling; each hop passes
  ``do_open`` once, so each is its own span, siblings under the caller's span,
  with ``http.request.resend_count`` = 1, 2, ... (read from the
  ``redirect_dict`` urllib keeps on the hop's ``Request``; a ``Request`` object
  the program reuses after it was redirected counts on from there).
* **Span end**: when ``do_open`` returns, i.e. with the response head; the body
  is the caller's to read later (or never). A 4xx/5xx response is an error span
  (``error.type`` = the status) before urllib raises ``HTTPError``; a
  connection failure records the ``URLError`` the caller gets.
* **Propagation**: the headers go into a copy of the ``Request`` that
  ``do_open`` sends (its unredirected headers, so they win over a caller's
  stale ``traceparent``); the caller's ``Request`` is never modified. The span
  is current with the HTTP suppression key set, so http.client adds no span.

Exporter traffic (the suppress key, a configured OTLP endpoint, a caller in an
exporter module) gets no span and no headers.
``OTEL_PYTHON_URLLIB_EXCLUDED_URLS`` (else ``OTEL_PYTHON_EXCLUDED_URLS``).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Tuple

from autotrace.http import PROTOCOL_VERSIONS, HttpClient, caller_is_exporter
from autotrace.kit import CallSpan, Instrumentor, Plan, Suppress, arg, replace_arg

_MODULES = sys.modules
#: Frames passed over when looking for an exporter caller.
_SKIP = ("urllib.", "http.", "wrapt.", "autotrace.kit", "autotrace.http", "autotrace.instrumentors.")


class _Headers(dict):
    """urllib's header spelling (``Traceparent``) for what the propagators write."""

    def __setitem__(self, name: str, value: str) -> None:
        dict.__setitem__(self, name.capitalize(), value)


class UrllibInstrumentor(Instrumentor):
    name = "urllib"
    covers = ("urllib",)
    modules = ("urllib.request",)

    def __init__(self) -> None:
        super().__init__()
        self._client = HttpClient(self, ("urllib", "http"))
        # Bound once, so that wrap() recognises (and refuses) a second patch.
        self._w_open = CallSpan(self, self._describe, suppress=Suppress.HTTP, finish=self._finish, site="urllib.open")

    def patch_module(self, module_name: str, module: Any) -> None:
        self._client.configure()
        self.wrap(module, "AbstractHTTPHandler.do_open", self._w_open)

    def _describe(self, handler: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = arg(args, kwargs, 1, "req")
        url = request.full_url
        client = self._client
        if (client.exporter_urls and url.startswith(client.exporter_urls)) or (
            "opentelemetry.exporter" in _MODULES and caller_is_exporter(_SKIP)
        ):
            return None
        captured = request.header_items() if client.capture_request else None
        described = client.request(request.get_method(), url, request.get_header("User-agent"), captured)
        if described is None:
            return None
        name, attributes = described
        visited = getattr(request, "redirect_dict", None)
        if visited:
            attributes["http.request.resend_count"] = sum(visited.values())
        sent = object.__new__(type(request))
        sent.__dict__.update(request.__dict__)
        sent.unredirected_hdrs = headers = _Headers(request.unredirected_hdrs)
        args, kwargs = replace_arg(args, kwargs, 1, "req", sent)
        return Plan(name, attributes, carrier=headers, args=args, kwargs=kwargs)

    def _finish(self, span: Any, response: Any, state: Any) -> None:
        self._client.outcome(span, response.status, PROTOCOL_VERSIONS.get(response.version), response.headers)
