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

Beyond that, when the installed SDK lays its spans out exactly as
:class:`_SpanFactory` expects -- checked once per tracer by building a span
both ways and comparing every field -- a sampled span is made by copying the
fields of a prototype span and setting the per-span ones, instead of running
the SDK's constructors (another ~3 us). Any difference, an unknown SDK version
or an unusual call, and the SDK's ``start_span`` runs as it is.
"""

from __future__ import annotations

import threading
from collections import deque
from time import time_ns
from typing import Any, Dict, Optional, Tuple

from opentelemetry import trace as trace_api
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


#: Attribute-container fields set per span; others (limits, flags) are copied from the prototype.
_ATTRIBUTE_FIELDS = {"_dict", "dropped", "_lock", "_immutable"}
_LIST_FIELDS = {"dropped", "_dq", "_lock"}
#: Span fields set per span; every other field is the same for all spans of a tracer.
_PER_SPAN = {"_name", "_context", "_parent", "_kind", "_start_time", "_end_time", "_attributes", "_events",
             "_links", "_lock", "_status", "_record_end_metrics"}


class _SpanFactory:
    """Makes sampled SDK spans by copying a prototype's fields (see the module docstring)."""

    __slots__ = ("_tracer", "_class", "_shared", "_attribute_template", "_events_maxlen", "_links_maxlen",
                 "_sampled", "_random_flag", "_metrics", "_status", "_attributes_class", "_list_class",
                 "_static_sampler", "_static_table", "_record_and_sample")

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer
        prototype = tracer.start_span("autotrace.prototype")  # processors ignore on_start; never ended
        fields = dict(prototype.__dict__)
        if not _PER_SPAN - {"_record_end_metrics"} <= set(fields) or not _ATTRIBUTE_FIELDS <= set(fields["_attributes"].__dict__):
            raise LookupError("unexpected span layout")
        for name in ("_events", "_links"):
            if set(fields[name].__dict__) != _LIST_FIELDS:
                raise LookupError("unexpected list layout")
        self._class = type(prototype)
        self._attributes_class = type(fields["_attributes"])
        self._list_class = type(fields["_events"])
        self._shared = {k: v for k, v in fields.items() if k not in _PER_SPAN}
        self._attribute_template = dict(fields["_attributes"].__dict__)
        self._events_maxlen = fields["_events"]._dq.maxlen
        self._links_maxlen = fields["_links"]._dq.maxlen
        self._status = fields["_status"]
        self._sampled = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)
        random_flag = getattr(trace_api.TraceFlags, "RANDOM_TRACE_ID", None)
        self._random_flag = random_flag if random_flag is not None and hasattr(tracer.id_generator, "is_trace_id_random") else None
        self._metrics = getattr(tracer, "_tracer_metrics", None)
        from opentelemetry.sdk.trace.sampling import Decision

        self._record_and_sample = Decision.RECORD_AND_SAMPLE
        self._static_sampler = tracer.sampler
        self._static_table = _static_decisions(tracer.sampler)
        self._check()

    def _check(self) -> None:
        """Build spans both ways (root and child) and require every field to match."""
        tracer = self._tracer
        attributes = {"k": "v", "n": 1}
        parent = tracer.start_span("parent")
        for context in (None, trace_api.set_span_in_context(parent)):
            ours = self.start(tracer, "check", context, SpanKind.CLIENT, attributes)
            theirs = tracer.start_span("check", context, SpanKind.CLIENT, attributes)
            if ours is None or set(ours.__dict__) != set(theirs.__dict__):
                raise LookupError("span fields differ")
            for name, value in theirs.__dict__.items():
                mine = ours.__dict__[name]
                if name == "_context":
                    same = (mine.trace_flags, mine.trace_state, mine.is_remote) == (value.trace_flags, value.trace_state, value.is_remote)
                elif name in ("_start_time", "_lock", "_record_end_metrics"):
                    same = type(mine) is type(value)
                elif name in ("_attributes", "_events", "_links"):
                    same = type(mine) is type(value) and dict(mine.__dict__, _lock=None, _dq=None) == dict(value.__dict__, _lock=None, _dq=None)
                    if same and name != "_attributes":
                        same = mine._dq.maxlen == value._dq.maxlen
                else:
                    same = mine == value
                if not same:
                    raise LookupError(f"span field {name} differs")

    def start(self, tracer: Any, name: str, context: Any, kind: Any, attributes: Dict[str, Any]) -> Optional[Any]:
        """A started sampled span, or None when the SDK must decide (not sampled, tracer disabled)."""
        is_enabled = getattr(tracer, "_is_enabled", None)
        if is_enabled is not None and not is_enabled():
            return None
        parent = trace_api.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = tracer.id_generator.generate_trace_id()
        else:
            trace_id = parent.trace_id
        table = self._static_table
        if table is not None and tracer.sampler is self._static_sampler:
            if parent is None:
                sampled = table[0]
            elif parent.is_remote:
                sampled = table[1] if parent.trace_flags.sampled else table[2]
            else:
                sampled = table[3] if parent.trace_flags.sampled else table[4]
            if not sampled:
                return None
            decision = self._record_and_sample
            trace_state = parent.trace_state if parent is not None else None
        else:
            result = tracer.sampler.should_sample(context, trace_id, name, kind, attributes, ())
            decision = result.decision
            if not decision.is_sampled() or not decision.is_recording():
                return None
            trace_state = result.trace_state
        flags = self._sampled
        if self._random_flag is not None:
            random_id = tracer.id_generator.is_trace_id_random() if parent is None else parent.trace_flags.random_trace_id
            if random_id:
                flags = trace_api.TraceFlags(flags | self._random_flag)
        span_context = trace_api.SpanContext(
            trace_id, tracer.id_generator.generate_span_id(), is_remote=False, trace_flags=flags, trace_state=trace_state,
        )
        values = dict(self._attribute_template)
        values["_dict"] = dict(attributes)
        values["_lock"] = threading.Lock()
        values["dropped"] = 0
        values["_immutable"] = False
        bounded = _new(self._attributes_class, values)
        fields = dict(self._shared)
        fields["_name"] = name
        fields["_context"] = span_context
        fields["_parent"] = parent
        fields["_kind"] = kind
        fields["_end_time"] = None
        fields["_attributes"] = bounded
        list_class = self._list_class
        fields["_events"] = _new(list_class, {"dropped": 0, "_dq": deque(maxlen=self._events_maxlen), "_lock": threading.Lock()})
        fields["_links"] = _new(list_class, {"dropped": 0, "_dq": deque(maxlen=self._links_maxlen), "_lock": threading.Lock()})
        fields["_lock"] = threading.Lock()
        fields["_status"] = self._status
        if self._metrics is not None:
            fields["_record_end_metrics"] = self._metrics.start_span(parent, decision)
        fields["_start_time"] = time_ns()
        return _new(self._class, fields)


_PARENT_BASED_DELEGATES = ("_root", "_remote_parent_sampled", "_remote_parent_not_sampled",
                           "_local_parent_sampled", "_local_parent_not_sampled")


def _static_decisions(sampler: Any) -> Optional[Tuple[bool, ...]]:
    """Whether a span is sampled, for (no parent, remote sampled, remote not sampled, local sampled,
    local not sampled) -- when the sampler's answer depends on nothing else.

    Why: the default ``parentbased_always_on`` (and ``always_on``/``always_off``) answer from the parent
    alone, yet a call costs about a fifth of starting a span. Any other sampler (ratio, custom) is asked.
    Its trace state is the parent's, as the SDK's static samplers return.
    """
    from opentelemetry.sdk.trace import sampling

    def decides(static: Any) -> Optional[bool]:
        if type(static) is not sampling.StaticSampler:
            return None
        return getattr(static, "_decision", None) is sampling.Decision.RECORD_AND_SAMPLE

    if type(sampler) is sampling.StaticSampler:
        answer = decides(sampler)
        return (answer,) * 5
    if type(sampler) is sampling.ParentBased:
        table = tuple(decides(getattr(sampler, name, None)) for name in _PARENT_BASED_DELEGATES)
        if None not in table:
            return table  # type: ignore[return-value]
    return None


def _new(cls: Any, fields: Dict[str, Any]) -> Any:
    instance = object.__new__(cls)
    instance.__dict__ = fields
    return instance


class SpanStarter:
    """A tracer proxy whose ``start_span`` skips the SDK's attribute re-checks when that cannot show."""

    __slots__ = ("_tracer", "_maxlen", "_processors", "_checked_processors", "_factory")

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer
        self._maxlen = self._fast_limit(tracer)
        self._factory: Any = None  # built at the first span; False when the SDK's layout is not the expected one
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
        factory = self._factory
        if factory is None:
            factory = self._factory = self._make_factory()
        if factory and not links:
            span = factory.start(tracer, name, context, kind, attributes)
            if span is not None:
                return span
        span = tracer.start_span(name, context, kind, None, links)
        target = getattr(getattr(span, "_attributes", None), "_dict", None)
        if type(target) is dict:
            target.update(attributes)
        elif span.is_recording():
            span.set_attributes(attributes)
        return span


    def _make_factory(self) -> Any:
        try:
            return _SpanFactory(self._tracer)
        except Exception as exc:
            from autotrace._log import logger

            logger.debug("autotrace: spans are made by the SDK's start_span (%s)", exc)
            return False


def _plain_attributes(attributes: dict) -> bool:
    for key, value in attributes.items():
        if type(value) not in _PLAIN or type(key) is not str or not key:
            return False
    return True


_BOUNDED_ATTRIBUTES: Any = None


def set_attributes(span: Any, attributes: Dict[str, Any]) -> None:
    """``span.set_attributes(attributes)``, for attributes added after the start (status, version).

    Why: the SDK takes two locks and re-checks every value (13 000 instructions
    a call, counted with callgrind; see docs/performance.md). Where the outcome
    is certain -- an SDK span not yet ended, plain values under new keys, room
    under the count limit, no length limit -- they go straight into the span's
    attribute dict, as the SDK would put them. Anything else goes through
    ``span.set_attributes``.
    """
    global _BOUNDED_ATTRIBUTES
    fields = getattr(span, "__dict__", None)
    bounded = fields.get("_attributes") if fields is not None else None
    if bounded is not None and fields.get("_end_time", 0) is None:
        if _BOUNDED_ATTRIBUTES is None:
            from opentelemetry.attributes import BoundedAttributes

            _BOUNDED_ATTRIBUTES = BoundedAttributes
        if type(bounded) is _BOUNDED_ATTRIBUTES:
            limits = bounded.__dict__
            target = limits.get("_dict")
            maxlen = limits.get("maxlen", 0)
            if (
                type(target) is dict
                and limits.get("max_value_len", 0) is None
                and not limits.get("_immutable", True)
                and (maxlen is None or len(target) + len(attributes) <= maxlen)
                and _plain_attributes(attributes)
                and not any(key in target for key in attributes)
            ):
                target.update(attributes)
                return
    span.set_attributes(attributes)


def starter_for(tracer: Any) -> Tuple[Any, bool]:
    """``(tracer to use, whether it is the fast proxy)``."""
    starter = SpanStarter(tracer)
    if starter._maxlen == 0:
        return tracer, False
    return starter, True
