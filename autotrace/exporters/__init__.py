"""Building the configured span exporters.

Exporters are built when the SDK is set up (itself deferred until a traced
library or the OpenTelemetry API is first imported), not on the first batch:
a first batch may only come at interpreter exit, when imports that start
threads are no longer allowed. A failure to build or run one is logged once
and costs the program nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Sequence

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from autotrace._log import error_once, logger, warn_every, warn_once
from autotrace.config import Settings

EXPORTER_GROUP = "opentelemetry_traces_exporter"


class SafeExporter(SpanExporter):
    """Isolates the program from an exporter: a failed build or export is logged once, never raised."""

    def __init__(self, name: str, factory: Callable[[], SpanExporter]) -> None:
        self.name = name
        self._exporter: Optional[SpanExporter] = None
        try:
            self._exporter = factory()
        except Exception:
            error_once(
                f"exporter-build:{name}",
                "autotrace: could not create the %r span exporter; its spans are dropped",
                name,
            )

    @property
    def exporter(self) -> Optional[SpanExporter]:
        return self._exporter

    def begin_shutdown(self) -> None:
        begin = getattr(self._exporter, "begin_shutdown", None)
        if begin is not None:
            begin()

    def failed_spans(self) -> int:
        stats = getattr(self._exporter, "stats", None)
        return int(getattr(stats, "spans_failed", 0))

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        exporter = self.exporter
        if exporter is None:
            return SpanExportResult.FAILURE
        try:
            return exporter.export(spans)
        except Exception:
            error_once(f"exporter-export:{self.name}", "autotrace: the %r span exporter raised", self.name)
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        if self._exporter is not None:
            try:
                self._exporter.shutdown()
            except Exception:
                logger.debug("autotrace: %r exporter shutdown failed", self.name, exc_info=True)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._exporter is None:
            return True
        try:
            return bool(self._exporter.force_flush(timeout_millis))
        except Exception:
            return False


def _otlp_http(settings: Settings) -> SpanExporter:
    from autotrace.exporters.otlp_http import OTLPHttpSpanExporter

    otlp = settings.otlp
    return OTLPHttpSpanExporter(
        endpoint=otlp.endpoint,
        headers=otlp.headers,
        timeout_s=otlp.timeout_s,
        compression=otlp.compression,
        certificate=otlp.certificate,
        client_key=otlp.client_key,
        client_certificate=otlp.client_certificate,
    )


class _GrpcLogFilter(logging.Filter):
    """Turns upstream's per-batch gRPC warnings into one warning a minute."""

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.endpoint = endpoint

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        warn_every(
            f"export:{self.endpoint}",
            60.0,
            "autotrace: cannot export spans to %s: %s (the program is not affected, export continues)",
            self.endpoint,
            record.getMessage().split(". Error details")[0],
        )
        return False


def _otlp_grpc(settings: Settings) -> SpanExporter:
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    otlp = settings.otlp
    endpoint = otlp.endpoint
    insecure = otlp.insecure or endpoint.startswith("http://")
    credentials = None
    if not insecure:
        def read(path: Optional[str]) -> Optional[bytes]:
            if not path:
                return None
            with open(path, "rb") as handle:
                return handle.read()

        credentials = grpc.ssl_channel_credentials(
            read(otlp.certificate), read(otlp.client_key), read(otlp.client_certificate)
        )
    from opentelemetry.exporter.otlp.proto.grpc import exporter as grpc_exporter_module

    grpc_exporter_module.logger.addFilter(_GrpcLogFilter(endpoint))
    compression = grpc.Compression.Gzip if otlp.compression == "gzip" else grpc.Compression.NoCompression
    return OTLPSpanExporter(
        endpoint=endpoint,
        insecure=insecure,
        credentials=credentials,
        headers=dict(otlp.headers),
        timeout=otlp.timeout_s,
        compression=compression,
    )


def _console(settings: Settings) -> SpanExporter:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter()


BUILTIN_EXPORTERS = {"console": _console}


def _entry_point(name: str) -> Any:
    from autotrace.plugins import _entry_points

    for entry_point in _entry_points(EXPORTER_GROUP):
        if entry_point.name == name:
            return entry_point
    return None


def build_exporters(settings: Settings) -> List[SafeExporter]:
    """One exporter per name in ``OTEL_TRACES_EXPORTER``; unknown names are skipped with a warning."""
    exporters: List[SafeExporter] = []
    for name in settings.traces_exporters:
        if name == "otlp":
            build = _otlp_grpc if settings.otlp.protocol == "grpc" else _otlp_http
            exporters.append(SafeExporter(f"otlp ({settings.otlp.protocol} to {settings.otlp.endpoint})", lambda b=build: b(settings)))
        elif name in BUILTIN_EXPORTERS:
            exporters.append(SafeExporter(name, lambda n=name: BUILTIN_EXPORTERS[n](settings)))
        else:
            entry_point = _entry_point(name)
            if entry_point is None:
                warn_once(
                    f"exporter-unknown:{name}",
                    "autotrace: unknown traces exporter %r in OTEL_TRACES_EXPORTER (not built in, no %r entry point); ignored",
                    name,
                    EXPORTER_GROUP,
                )
                continue
            exporters.append(SafeExporter(name, lambda ep=entry_point: ep.load()()))
    return exporters
