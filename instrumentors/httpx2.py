"""httpx2 (2.x, the maintained fork of httpx; module ``httpx2`` over ``httpcore2``, Python 3.11+).

httpx2 keeps httpx's client structure (``Client.send`` -> ``_send_handling_auth``
-> ``_send_handling_redirects`` -> ``_send_single_request`` -> the transport),
so this is :class:`autotrace.instrumentors.httpx.HttpxInstrumentor` on httpx2's
modules: the same spans, attributes, body handling and exporter rules.

Excluded URLs: ``OTEL_PYTHON_HTTPX2_EXCLUDED_URLS``, else
``OTEL_PYTHON_HTTPX_EXCLUDED_URLS`` (a program moved from httpx keeps its
setting), else ``OTEL_PYTHON_EXCLUDED_URLS``.
"""

from __future__ import annotations

from typing import Any

from autotrace.config import env
from autotrace.http import excluded_urls
from autotrace.instrumentors.httpx import HttpxInstrumentor


class Httpx2Instrumentor(HttpxInstrumentor):
    name = "httpx2"
    distribution = "httpx2"
    supported = ">=2,<3"
    covers = ()  # upstream has no httpx2 instrumentation
    modules = ("httpx2",)

    def patch_module(self, module_name: str, module: Any) -> None:
        super().patch_module(module_name, module)
        if env().string("OTEL_PYTHON_HTTPX2_EXCLUDED_URLS") is None:
            self._client.excluded = excluded_urls("httpx")
