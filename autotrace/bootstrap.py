"""Agent start-up, run once per interpreter by the sitecustomize bootstrap.

Start-up only reads the settings and registers post-import hooks: it imports
neither an instrumented library nor the OpenTelemetry SDK. The SDK is set up
(:func:`ensure_sdk`) the first time it can matter -- when a traced library or
the OpenTelemetry API itself is first imported -- so a program that uses
neither pays almost nothing. Any failure is logged; the program runs untraced.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from autotrace._log import logger

_lock = threading.Lock()
_initialized = False
_sdk_lock = threading.RLock()
_sdk_state = "pending"  # pending -> in progress -> done | failed

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
    install_sigterm_flush()
    from autotrace import plugins

    # Code that uses OpenTelemetry directly gets the SDK once its first OpenTelemetry import is complete.
    from autotrace._importhook import after_each_import

    after_each_import("opentelemetry", _sdk_when_settled)
    configured = os.environ.get("OTEL_PROPAGATORS")
    if configured:
        from autotrace._importhook import around_import

        def put_back(module: Any) -> None:
            os.environ["OTEL_PROPAGATORS"] = configured

        around_import("opentelemetry.propagate", _importable_propagators, put_back)
    plugins.activate(settings)


def _sdk_when_settled(module: Any) -> None:
    """Set up the SDK unless an OpenTelemetry module is still half-imported.

    ``from opentelemetry.sdk.trace import TracerProvider`` (or ``opentelemetry.propagate``)
    as a program's first import loads the API in the middle of its own import:
    setting up then would import a half-made module. Every ``opentelemetry*``
    module's completion checks again; the outermost one's finds none left.
    """
    from autotrace._importhook import stop_after_each_import

    if _sdk_state != "pending":  # set up already (a traced library's import came first)
        stop_after_each_import("opentelemetry")
        return
    for name, loaded in list(sys.modules.items()):
        if loaded is module or not name.startswith("opentelemetry"):
            continue  # the module whose hook this is counts as imported
        if getattr(getattr(loaded, "__spec__", None), "_initializing", False):
            return
    stop_after_each_import("opentelemetry")
    ensure_sdk()


#: Propagators the API itself ships: always loadable.
_API_PROPAGATORS = frozenset({"tracecontext", "baggage"})


def _importable_propagators(module: Any) -> None:
    """``opentelemetry.propagate`` raises *at import* on a name it cannot load (API 1.27: even ``none``).

    Only while it is imported, OTEL_PROPAGATORS holds the names that load (or
    ``tracecontext``); the value is put back right after (``put_back`` above). autotrace's own
    propagator, set up with the SDK, follows the configured names, with a
    warning for those that do not load.
    """
    configured = os.environ.get("OTEL_PROPAGATORS", "")
    names = [name.strip() for name in configured.split(",") if name.strip()]
    if all(name in _API_PROPAGATORS for name in names):
        return
    try:
        from autotrace.plugins import _entry_points

        installed = {entry_point.name for entry_point in _entry_points("opentelemetry_propagator")}
    except Exception:
        installed = set(_API_PROPAGATORS)
    loadable = [name for name in names if name in installed and name != "none"]
    os.environ["OTEL_PROPAGATORS"] = ",".join(loadable) or "tracecontext"


def ensure_sdk() -> None:
    """Install the SDK tracer provider once; re-entrant (the SDK imports the API)."""
    global _sdk_state
    with _sdk_lock:
        if _sdk_state != "pending":
            return
        _sdk_state = "in progress"
        try:
            from autotrace import tracing
            from autotrace.config import get_settings

            settings = get_settings()
            tracing.install(settings)
            if settings.log_correlation:
                install_log_correlation(settings)
            _sdk_state = "done"
        except Exception:
            _sdk_state = "failed"
            logger.error("autotrace: setting up the OpenTelemetry SDK failed; spans are not exported", exc_info=True)


def install_sigterm_flush() -> None:
    """On SIGTERM, flush spans, then die by SIGTERM as before -- only if the program has no handler.

    Installed at start-up, not with the (lazy) SDK: servers such as uvicorn
    save the handler they find when they start, and restore and re-raise it
    when they stop; it must be ours by then.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
    except (ValueError, AttributeError):  # pragma: no cover - exotic platforms
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        try:
            tracing = sys.modules.get("autotrace.tracing")
            if tracing is not None:
                tracing.shutdown()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


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


def sdk_state() -> str:
    return _sdk_state
