"""Starting our instrumentors' spans for less, with the SDK's own spans.

Why: of the ~11 us the SDK's ``Tracer.start_span`` takes on this machine,
~3.5 us is its attribute container re-checking, one by one, values our
instrumentors built themselves from ``str``/``int``/``float``/``bool``. When
nothing can tell the difference -- a built-in sampler (it does not look at
attributes), no attribute length limit, no more attributes than the count
limit, and only span processors that ignore ``on_start`` -- the span is started
without attributes and they are put into its attribute dict directly. In every
other case the call goes to the SDK unchanged. The span is the SDK's own
object either way.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from opentelemetry.trace import SpanKind

_PLAIN = frozenset({str, int, float, bool})


def _builtin_sampler(sampler: Any) -> bool:
    from opentelemetry.sdk.trace import sampling

    if isinstance(sampler, (sampling.StaticSampler, sampling.TraceIdRatioBased)):
        return True
    if type(sampler) is sampling.ParentBased:
        delegates = [getattr(sampler, name, None) for name in (
            "_root", "_remote_parent_sampled", "_remote_parent_not_sampled",
            "_local_parent_sampled", "_local_parent_not_sampled",
        )]
        return all(d is not None and _builtin_sampler(d) for d in delegates)
    return False


def _on_start_free(processor: Any) -> bool:
    """Our processors, and the SDK's batch and simple processors, do nothing in ``on_start``."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from autotrace.exporters.direct import DirectOTLPSpanProcessor

    return type(processor).on_start in (
        DirectOTLPSpanProcessor.on_start, BatchSpanProcessor.on_start, SimpleSpanProcessor.on_start,
    )


class SpanStarter:
    """A tracer proxy whose ``start_span`` skips the SDK's attribute re-checks when that cannot show."""

    __slots__ = ("_tracer", "_maxlen", "_processors", "_checked_processors")

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer
        self._maxlen = self._fast_limit(tracer)
        self._processors: Optional[Any] = None  # the SDK's processor tuple last found free of on_start
        self._checked_processors: Optional[Any] = None

    @staticmethod
    def _fast_limit(tracer: Any) -> int:
        """How many attributes may skip the checks (0: none, the SDK does everything)."""
        try:
            from opentelemetry.sdk.trace import Tracer

            if not isinstance(tracer, Tracer) or not _builtin_sampler(tracer.sampler):
                return 0
            limits = tracer._span_limits
            if limits.max_span_attribute_length is not None:
                return 0
            maxlen = limits.max_span_attributes
            return (1 << 30) if maxlen is None else int(maxlen)
        except Exception:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracer, name)

    def _processors_allow(self) -> bool:
        multi = getattr(self._tracer, "span_processor", None)
        current = getattr(multi, "_span_processors", None)
        if current is None:
            return False
        if current is self._processors:
            return True
        if current is self._checked_processors:
            return False
        self._checked_processors = current
        if all(_on_start_free(p) for p in current):
            self._processors = current
            return True
        return False

    def start_span(
        self,
        name: str,
        context: Any = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        tracer = self._tracer
        if (
            not attributes
            or args
            or kwargs
            or type(attributes) is not dict
            or len(attributes) > self._maxlen
            or not self._processors_allow()
            or not _plain_attributes(attributes)
        ):
            return tracer.start_span(name, context, kind, attributes, links, *args, **kwargs)
        span = tracer.start_span(name, context, kind, None, links)
        target = getattr(getattr(span, "_attributes", None), "_dict", None)
        if type(target) is dict:
            target.update(attributes)
        elif span.is_recording():
            span.set_attributes(attributes)
        return span


def _plain_attributes(attributes: dict) -> bool:
    for key, value in attributes.items():
        if type(value) not in _PLAIN or type(key) is not str or not key:
            return False
    return True


def starter_for(tracer: Any) -> Tuple[Any, bool]:
    """``(tracer to use, whether it is the fast proxy)``."""
    starter = SpanStarter(tracer)
    if starter._maxlen == 0:
        return tracer, False
    return starter, True
