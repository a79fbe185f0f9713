"""Setting up the OpenTelemetry SDK from :class:`~autotrace.config.Settings`.

Every SDK object is built with explicit values (never ``None``), so the SDK's
own environment parsing -- which raises on a malformed value -- never runs.
"""

from __future__ import annotations

import atexit
import logging
import os
import platform
import socket
import sys
import threading
from typing import Any, Dict, List, Optional

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from autotrace import __version__
from autotrace._log import error_once, logger, warn_once
from autotrace.config import Settings
from autotrace.exporters import build_exporters
from autotrace.queue_drops import DropCounter

_provider: Optional[TracerProvider] = None
_exporters: List[Any] = []
_processors: List[Any] = []
_shut_down = False


# --------------------------------------------------------------------------
# Resource


def build_resource(settings: Settings) -> Resource:
    """Resource per the SDK spec, without the SDK's entry-point detector scan."""
    from opentelemetry.sdk.version import __version__ as sdk_version

    attributes: Dict[str, Any] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": sdk_version,
        "telemetry.distro.name": "autotrace",
        "telemetry.distro.version": __version__,
        "process.pid": os.getpid(),
        "process.runtime.name": sys.implementation.name,
        "process.runtime.version": platform.python_version(),
        "process.runtime.description": sys.version,
        "process.executable.path": sys.executable,
        "host.name": socket.gethostname(),
    }
    if sys.argv and sys.argv[0]:
        attributes["process.command"] = sys.argv[0]
    attributes.update(settings.resource_attributes)
    service = settings.service_name or settings.resource_attributes.get("service.name")
    attributes["service.name"] = service or _default_service_name()
    return Resource(attributes)


def _default_service_name() -> str:
    """``unknown_service:<executable>`` as the spec asks, e.g. ``unknown_service:python``."""
    executable = os.path.basename(sys.executable or "") or "python"
    return f"unknown_service:{executable}"


# --------------------------------------------------------------------------
# Sampler


def build_sampler(settings: Settings) -> sampling.Sampler:
    name, arg = settings.sampler, settings.sampler_arg
    ratio = 1.0
    if name.endswith("traceidratio"):
        ratio = _ratio(arg)
    builtin = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if name in builtin:
        return builtin[name]()
    try:
        from autotrace.plugins import _entry_points

        for entry_point in _entry_points("opentelemetry_traces_sampler"):
            if entry_point.name == name:
                factory = entry_point.load()
                return factory(arg)
    except Exception:
        logger.error(
            "autotrace: sampler %r from OTEL_TRACES_SAMPLER failed to load; using parentbased_always_on",
            name,
            exc_info=True,
        )
        return sampling.ParentBased(sampling.ALWAYS_ON)
    warn_once(
        f"sampler:{name}",
        "autotrace: unknown sampler %r in OTEL_TRACES_SAMPLER; using the default parentbased_always_on",
        name,
    )
    return sampling.ParentBased(sampling.ALWAYS_ON)


def _ratio(arg: Optional[str]) -> float:
    if arg is None:
        return 1.0
    try:
        ratio = float(arg)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        warn_once(
            f"sampler-arg:{arg}",
            "autotrace: invalid value %r for OTEL_TRACES_SAMPLER_ARG (expected a ratio from 0 to 1); using the default 1.0",
            arg,
        )
        return 1.0
    return ratio


# --------------------------------------------------------------------------
# Propagators


def _builtin_propagator(name: str) -> Any:
    if name == "tracecontext":
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        return TraceContextTextMapPropagator()
    if name == "baggage":
        from opentelemetry.baggage.propagation import W3CBaggagePropagator

        return W3CBaggagePropagator()
    if name == "b3":
        from opentelemetry.propagators.b3 import B3SingleFormat

        return B3SingleFormat()
    if name == "b3multi":
        from opentelemetry.propagators.b3 import B3MultiFormat

        return B3MultiFormat()
    if name == "jaeger":
        from opentelemetry.propagators.jaeger import JaegerPropagator

        return JaegerPropagator()
    return None


def build_propagator(settings: Settings) -> Any:
    """The composite propagator; unknown names are skipped with a warning."""
    from opentelemetry.propagators.composite import CompositePropagator

    if "none" in settings.propagators:
        return CompositePropagator([]), ["none"]
    propagators: List[Any] = []
    names: List[str] = []
    for name in settings.propagators:
        try:
            propagator = _builtin_propagator(name)
            if propagator is None:
                propagator = _entry_point_propagator(name)
        except Exception:
            logger.error("autotrace: propagator %r failed to load; skipped", name, exc_info=True)
            continue
        if propagator is None:
            warn_once(
                f"propagator:{name}",
                "autotrace: unknown propagator %r in OTEL_PROPAGATORS; skipped",
                name,
            )
            continue
        propagators.append(propagator)
        names.append(name)
    return CompositePropagator(propagators), names


def _entry_point_propagator(name: str) -> Any:
    from autotrace.plugins import _entry_points

    for entry_point in _entry_points("opentelemetry_propagator"):
        if entry_point.name == name:
            return entry_point.load()()
    return None


# --------------------------------------------------------------------------
# Provider


def build_limits(settings: Settings) -> SpanLimits:
    limits = settings.limits

    def value(number: Optional[int]) -> int:
        return SpanLimits.UNSET if number is None else number

    return SpanLimits(
        max_span_attributes=value(limits.attribute_count),
        max_attributes=value(limits.attribute_count),
        max_events=value(limits.event_count),
        max_links=value(limits.link_count),
        max_event_attributes=value(limits.event_attribute_count),
        max_link_attributes=value(limits.link_attribute_count),
        max_attribute_length=value(limits.attribute_value_length),
        max_span_attribute_length=value(limits.attribute_value_length),
    )


class CountingBatchSpanProcessor(BatchSpanProcessor, DropCounter):
    """The SDK's BatchSpanProcessor (for exporters other than our OTLP/HTTP one), counting its drops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        BatchSpanProcessor.__init__(self, *args, **kwargs)
        DropCounter.__init__(self, kwargs.get("max_queue_size") or 0)
        self._queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)

    def on_end(self, span: Any) -> None:
        try:
            queue = self._queue
            if queue is not None and len(queue) >= self.capacity and span.context.trace_flags.sampled:
                self.count_drop()
                return  # the newest span is dropped, without the SDK's per-span log record
            if self.dropped_in_burst:
                self.check_burst_over()
            super().on_end(span)
        except Exception:  # span.end() runs in the program's code: never raise there
            error_once("processor.on_end", "autotrace: internal error while queueing a span")


class _QueueFullFilter(logging.Filter):
    """The SDK's per-span 'Queue full' line is replaced by our counted warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Queue full" not in str(record.msg)


def build_provider(settings: Settings) -> TracerProvider:
    # The SDK's TracerProvider submits to a ThreadPoolExecutor in its after-fork
    # hook. concurrent.futures.thread releases its global lock in forked children
    # in a hook of its own, which must be registered first -- so import it before
    # the provider exists, or every prefork child (Celery, gunicorn) deadlocks.
    import concurrent.futures.thread  # noqa: F401

    provider = TracerProvider(
        sampler=build_sampler(settings),
        resource=build_resource(settings),
        span_limits=build_limits(settings),
        shutdown_on_exit=False,  # we flush at exit ourselves, with a bound
    )
    for exporter in build_exporters(settings):
        _exporters.append(exporter)
        processor = _processor_for(exporter, settings)
        _processors.append(processor)
        provider.add_span_processor(processor)
    logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(_QueueFullFilter())
    return provider


def _processor_for(exporter: Any, settings: Settings) -> Any:
    """Our OTLP/HTTP exporter gets the direct processor; every other exporter the SDK's batch processor."""
    options = dict(
        max_queue_size=settings.bsp_max_queue_size,
        schedule_delay_millis=settings.bsp_schedule_delay_ms,
        max_export_batch_size=settings.bsp_max_export_batch_size,
        export_timeout_millis=settings.bsp_export_timeout_ms,
    )
    from autotrace.exporters.otlp_http import OTLPHttpSpanExporter

    if settings.direct_export and isinstance(exporter.exporter, OTLPHttpSpanExporter):
        from autotrace.exporters.direct import DirectOTLPSpanProcessor

        return DirectOTLPSpanProcessor(exporter.exporter, **options)
    return CountingBatchSpanProcessor(exporter, **options)


def shutdown(timeout_s: Optional[float] = None) -> bool:
    """Flush and stop the provider, waiting at most ``timeout_s``; True when done in time.

    The flush runs in a helper thread so that a collector that does not answer
    cannot hang the program's exit beyond the bound.
    """
    global _shut_down
    provider = _provider
    if provider is None or _shut_down:
        return True
    _shut_down = True
    from autotrace.config import get_settings

    if timeout_s is None:
        timeout_s = get_settings().shutdown_timeout_ms / 1000.0
    for exporter in _exporters:
        exporter.begin_shutdown()
    worker = threading.Thread(target=_safe_shutdown, args=(provider,), name="autotrace-shutdown", daemon=True)
    try:
        worker.start()
    except RuntimeError:
        # Python 3.12+ refuses new threads once the interpreter is finalizing (an atexit
        # callback run late, e.g. under gunicorn): flush on this thread, bounded by the
        # exporters' own timeouts.
        _safe_shutdown(provider)
        worker = None
    if worker is not None:
        worker.join(timeout_s)
    done = worker is None or not worker.is_alive()
    if not done:
        logger.warning(
            "autotrace: spans were still being exported after %.1fs at exit; gave up (AUTOTRACE_SHUTDOWN_TIMEOUT)",
            timeout_s,
        )
    failed = sum(exporter.failed_spans() for exporter in _exporters)
    if failed:
        logger.warning("autotrace: %d spans of this process were not exported (see the warnings above)", failed)
    dropped = dropped_spans()
    if dropped:
        logger.warning("autotrace: %d spans of this process were dropped because the span queue was full", dropped)
    return done


def dropped_spans() -> int:
    """Spans dropped by a full queue in this process so far."""
    return sum(p.dropped for p in _processors)


def _safe_shutdown(provider: TracerProvider) -> None:
    try:
        provider.shutdown()
    except Exception:
        logger.debug("autotrace: provider shutdown failed", exc_info=True)


class _ForkedChildFlush:
    """``multiprocessing`` fork children leave with ``os._exit``, skipping atexit.

    They do run ``multiprocessing.util`` finalizers, but clear the registry
    first and then call the after-fork hooks: so an after-fork hook registers
    the flush as a finalizer in each child.
    """

    def __call__(self, mp_util: Any) -> None:
        mp_util.register_after_fork(self, self.in_child)
        # This process may itself be a multiprocessing child (spawned: uvicorn
        # workers and reloader children), which may also leave with os._exit.
        mp_util.Finalize(None, shutdown, exitpriority=100)

    @staticmethod
    def in_child(self: Any) -> None:
        import multiprocessing.util as mp_util

        mp_util.Finalize(None, shutdown, exitpriority=100)


_forked_child_flush = _ForkedChildFlush()


def _update_pid_after_fork() -> None:
    """A forked child (gunicorn worker, Celery prefork child) reports its own ``process.pid``.

    The Resource is shared by every tracer already handed out, so it is updated
    in place -- in the child's own copy of memory only.
    """
    global _shut_down
    _shut_down = False
    provider = _provider
    if provider is None:
        return
    try:
        from opentelemetry.attributes import BoundedAttributes

        resource = provider.resource
        attributes = dict(resource.attributes)
        attributes["process.pid"] = os.getpid()
        resource._attributes = BoundedAttributes(attributes=attributes, immutable=True)  # type: ignore[attr-defined]
    except Exception:
        logger.debug("autotrace: could not update process.pid after fork", exc_info=True)


class _OverrideExplainer(logging.Filter):
    """Explains the API's terse 'Overriding of current TracerProvider is not allowed'."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Overriding of current TracerProvider" in str(record.msg):
            warn_once(
                "provider-override",
                "autotrace: the program tried to install its own TracerProvider; autotrace's provider "
                "stays in place so spans are not duplicated. Configure tracing with OTEL_* variables, "
                "or run without autotrace-run to use your own setup.",
            )
        return True


def install(settings: Settings) -> TracerProvider:
    """Build and install the global provider and propagator; register exit flushes."""
    global _provider
    propagator, names = build_propagator(settings)
    from opentelemetry import propagate  # made safe to import by the bootstrap's before-import hook

    propagate.set_global_textmap(propagator)
    provider = build_provider(settings)
    trace.set_tracer_provider(provider)
    _provider = provider
    logging.getLogger("opentelemetry.trace").addFilter(_OverrideExplainer())
    atexit.register(shutdown)
    from autotrace._importhook import when_imported

    when_imported("multiprocessing.util", _forked_child_flush)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_update_pid_after_fork)
    return provider


def provider() -> Optional[TracerProvider]:
    return _provider
