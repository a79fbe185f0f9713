"""OTLP/HTTP (protobuf) span exporter on the standard library's ``http.client``.

Why not upstream's exporter: it sends with ``requests``. Importing it at
start-up would import ``requests`` into programs that never use it (and patch
it), and its calls would pass through our own requests instrumentation. This
exporter speaks the same protocol with ``http.client`` (keep-alive connection,
gzip, TLS and mTLS, the OTLP retry rules: 429/502/503/504 with exponential
backoff and ``Retry-After``) and encodes with :mod:`autotrace.exporters.encoding`
(the same message as upstream's encoder, several times faster).

A collector that is down or failing is reported by one warning naming the
endpoint, repeated at most once a minute while it lasts, never a traceback.
"""

from __future__ import annotations

import gzip
import http.client
import os
import random
import ssl
import threading
import time
import weakref
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from autotrace import __version__
from autotrace._log import logger, warn_every

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
WARN_INTERVAL_S = 60.0
MAX_BACKOFF_S = 8.0


class ExportStats:
    """Counters shared with diagnostics (``spans_sent``, ``spans_failed``)."""

    def __init__(self) -> None:
        self.spans_sent = 0
        self.spans_failed = 0
        self.batches_failed = 0
        self.last_error: Optional[str] = None


class OTLPHttpSpanExporter(SpanExporter):
    def __init__(
        self,
        endpoint: str = "http://localhost:4318/v1/traces",
        headers: Optional[Mapping[str, str]] = None,
        timeout_s: float = 10.0,
        compression: str = "none",
        certificate: Optional[str] = None,
        client_key: Optional[str] = None,
        client_certificate: Optional[str] = None,
        encoder: Optional[Callable[[Sequence[Any]], bytes]] = None,
    ) -> None:
        parts = urlsplit(endpoint)
        self.endpoint = endpoint
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout_s = timeout_s
        self._gzip = compression == "gzip"
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"autotrace/{__version__}",
        }
        self._headers.update(headers or {})
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._tls = (certificate, client_key, client_certificate)
        self._encoder = encoder or _protobuf_encoder()
        self._connection: Optional[http.client.HTTPConnection] = None
        self._lock = threading.Lock()
        self._shutdown = threading.Event()
        self.stats = ExportStats()
        if hasattr(os, "register_at_fork"):
            weak = weakref.WeakMethod(self._after_fork_in_child)
            os.register_at_fork(after_in_child=lambda: _call_if_alive(weak))

    def _after_fork_in_child(self) -> None:
        """The parent's export thread may hold the lock and a half-used connection at the fork."""
        self._lock = threading.Lock()
        self._connection = None  # the parent's socket: never reused by the child
        was_closing = self._shutdown.is_set()
        self._shutdown = threading.Event()
        if was_closing:
            self._shutdown.set()
        self.stats = ExportStats()  # the child reports only its own losses

    # -- SpanExporter ---------------------------------------------------------
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            body = self._encode(spans)
        except Exception as exc:
            self._failed(len(spans), f"could not encode spans: {exc!r}")
            return SpanExportResult.FAILURE
        with self._lock:
            ok, reason = self._send_with_retries(body)
        if ok:
            self.stats.spans_sent += len(spans)
            return SpanExportResult.SUCCESS
        self._failed(len(spans), reason)
        return SpanExportResult.FAILURE

    def begin_shutdown(self) -> None:
        """The process is exiting: from now on one attempt per batch, no retry waits."""
        self._shutdown.set()

    def shutdown(self) -> None:
        self._shutdown.set()
        with self._lock:
            self._close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    # -- internals ----------------------------------------------------------------
    def _encode(self, spans: Sequence[Any]) -> bytes:
        body = self._encoder(spans)
        return gzip.compress(body, compresslevel=6) if self._gzip else body

    def _failed(self, count: int, reason: str) -> None:
        self.stats.spans_failed += count
        self.stats.batches_failed += 1
        self.stats.last_error = reason
        self._warn(reason)

    def _warn(self, reason: str) -> None:
        warn_every(
            f"export:{self.endpoint}",
            WARN_INTERVAL_S,
            "autotrace: cannot export spans to %s: %s (%d spans dropped so far; "
            "the program is not affected, export continues)",
            self.endpoint,
            reason,
            self.stats.spans_failed,
        )

    def _send_with_retries(self, body: bytes) -> Tuple[bool, str]:
        deadline = time.monotonic() + self._timeout_s
        attempt = 0
        while True:
            status, reason, retry_after = self._post(body, deadline)
            if status is not None and 200 <= status < 300:
                return True, ""
            retryable = status is None or status in RETRYABLE_STATUS
            if not retryable:
                return False, reason
            self._warn(reason + ", retrying")
            delay = retry_after if retry_after is not None else min(MAX_BACKOFF_S, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            if self._shutdown.is_set() or time.monotonic() + delay >= deadline:
                return False, reason
            if self._shutdown.wait(delay):
                return False, reason

    def _post(self, body: bytes, deadline: float) -> Tuple[Optional[int], str, Optional[float]]:
        remaining = max(0.05, deadline - time.monotonic())
        try:
            connection = self._connect(remaining)
            connection.timeout = remaining
            if connection.sock is not None:
                connection.sock.settimeout(remaining)
            connection.request("POST", self._path, body=body, headers=self._headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._close()
            return None, _describe(exc), None
        status = response.status
        if response.getheader("Connection", "").lower() == "close":
            self._close()
        if 200 <= status < 300:
            return status, "", None
        return status, f"HTTP {status} {response.reason}", _retry_after(response.getheader("Retry-After"))

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._connection is None:
            if self._https:
                self._connection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=self._ssl_context()
                )
            else:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        return self._connection

    def _ssl_context(self) -> ssl.SSLContext:
        certificate, client_key, client_certificate = self._tls
        context = ssl.create_default_context(cafile=certificate)
        if client_certificate:
            context.load_cert_chain(client_certificate, client_key)
        return context

    def _close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:
                logger.debug("autotrace: closing the OTLP connection failed", exc_info=True)
            self._connection = None


def _call_if_alive(weak_method: Any) -> None:
    method = weak_method()
    if method is not None:
        method()


def _protobuf_encoder() -> Callable[[Sequence[Any]], bytes]:
    """Our direct encoder; should it ever fail on a batch, upstream's encodes that batch."""
    from autotrace.exporters.encoding import SpanEncoder

    fast = SpanEncoder()

    def encode(batch: Sequence[Any]) -> bytes:
        try:
            return fast(batch)
        except Exception:
            from autotrace._log import error_once
            from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

            error_once("encoder", "autotrace: the span encoder failed; using upstream's encoder for this batch")
            return encode_spans(batch).SerializePartialToString()

    return encode


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is a collector listening?)"
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
