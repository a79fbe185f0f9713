"""Agent start-up, run once per interpreter by the sitecustomize bootstrap.

Order matters: settings first (so a bad value is reported before anything
uses it), then the SDK, then the lazy import hooks. Nothing here imports an
instrumented library; any failure is logged and the program runs untraced.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Optional

from autotrace._log import logger

_lock = threading.Lock()
_initialized = False

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def initialize() -> bool:
    """Set up tracing for this process; True if it was set up now."""
    global _initialized
    with _lock:
        if _initialized:
            return False
        _initialized = True
    try:
        _initialize()
        return True
    except Exception:
        logger.error("autotrace: start-up failed; the program runs untraced", exc_info=True)
        return False


def _initialize() -> None:
    from autotrace.config import get_settings

    settings = get_settings()
    logger.setLevel(_LEVELS.get(settings.log_level, logging.INFO))
    if settings.sdk_disabled:
        logger.debug("autotrace: OTEL_SDK_DISABLED=true; nothing is patched")
        return
    _scrub_invalid_variables(settings.invalid_variables)
    from autotrace import plugins, tracing

    tracing.install(settings)
    if settings.log_correlation:
        install_log_correlation(settings)
    plugins.activate(settings)


def _scrub_invalid_variables(names: Any) -> None:
    """Remove OTEL_* values we rejected, so SDK code that reads them itself cannot raise."""
    for name in names:
        if name.startswith("OTEL_"):
            os.environ.pop(name, None)


def install_log_correlation(settings: Any) -> None:
    """Add ``otelTraceID``, ``otelSpanID``, ``otelServiceName``, ``otelTraceSampled`` to LogRecords."""
    from opentelemetry import trace

    from autotrace import tracing

    provider = tracing.provider()
    service_name = ""
    if provider is not None:
        service_name = str(provider.resource.attributes.get("service.name", ""))
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.otelServiceName = service_name
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.otelTraceID = format(context.trace_id, "032x")
            record.otelSpanID = format(context.span_id, "016x")
            record.otelTraceSampled = context.trace_flags.sampled
        else:
            record.otelTraceID = "0"
            record.otelSpanID = "0"
            record.otelTraceSampled = False
        return record

    logging.setLogRecordFactory(factory)


def is_initialized() -> bool:
    return _initialized


def reset_for_tests(value: Optional[bool] = None) -> None:
    global _initialized
    _initialized = bool(value)
