"""``OTEL_TRACES_EXPORTER=otlp_file``: spans appended to a file as OTLP JSON lines.

Each export writes one line: an ``ExportTraceServiceRequest`` in the OTLP JSON
encoding (the protobuf JSON mapping with the OTLP rules: trace and span ids as
hex strings, enums as integers), compact, no newline inside -- the format of the
OpenTelemetry Collector's file exporter, readable by ``autotrace-view``.

Several processes may append to the same file (a web app, its workers, a
second service run locally): the file is opened with ``O_APPEND`` for each
batch and the line is written by ``os.write`` while holding an exclusive
``flock`` on it, so lines larger than ``PIPE_BUF`` never interleave either.
Opening per batch also means a forked child never shares a descriptor (or its
lock) with its parent, and a rotated or deleted file is simply recreated.

Settings (read once, when the exporter is built):

``AUTOTRACE_TRACE_FILE``  path of the file (default ``./autotrace-traces.jsonl``, resolved
                          against the working directory at the first export)
"""

from __future__ import annotations

import base64
import json
import os
import threading
from typing import Any, Dict, Optional, Sequence

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from autotrace._log import warn_every
from autotrace.config import EnvReader

try:  # pragma: no cover - always there on POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_APPEND alone
    fcntl = None  # type: ignore[assignment]

DEFAULT_PATH = "autotrace-traces.jsonl"
_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(node: Any) -> None:
    """Protobuf's JSON mapping writes bytes as base64; OTLP JSON wants ids as hex."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            elif isinstance(value, (dict, list)):
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, (dict, list)):
                _hex_ids(item)


def encode_line(spans: Sequence[Any]) -> bytes:
    """One OTLP JSON line (with its newline) for ``spans``."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    message: Dict[str, Any] = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in message.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                _hex_ids(span)
    return (json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def append_line(path: str, data: bytes) -> None:
    """Append ``data`` to ``path`` atomically with respect to other processes doing the same."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class OTLPFileSpanExporter(SpanExporter):
    """Appends each batch of spans to a file as one OTLP JSON line."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = os.path.abspath(path or EnvReader().string("AUTOTRACE_TRACE_FILE", DEFAULT_PATH) or DEFAULT_PATH)
        self._lock = threading.Lock()
        self._closed = False
        self.spans_written = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        data = encode_line(spans)
        try:
            with self._lock:
                append_line(self.path, data)
                self.spans_written += len(spans)
        except OSError as exc:
            warn_every(
                f"otlp-file:{self.path}",
                60.0,
                "autotrace: cannot write spans to %s: %s (AUTOTRACE_TRACE_FILE); the program is not affected",
                self.path,
                exc,
            )
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
