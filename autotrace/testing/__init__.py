"""A test kit for programs traced by autotrace (or any OpenTelemetry SDK setup).

With pytest, use the ``autotrace_spans`` fixture (the plugin registers itself
through the ``pytest11`` entry point, but installs nothing unless the fixture
is used)::

    def test_checkout(client, autotrace_spans):
        client.get("/checkout")
        server = autotrace_spans.one(name="GET /checkout", kind="server")
        query = autotrace_spans.one(kind="client", db_operation_name="SELECT")
        autotrace_spans.assert_child_of(query, server)

Without pytest, :class:`SpanCapture` works as a context manager.

This module imports nothing heavy at import time: the OpenTelemetry SDK is
imported when a capture starts.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

__all__ = ["SpanCapture"]

NameMatch = Union[str, "re.Pattern[str]", None]


def _kind_name(kind: Any) -> str:
    name = getattr(kind, "name", kind)
    return str(name).lower()


def _attribute_matches(attributes: Mapping[str, Any], key: str, expected: Any) -> bool:
    """``key`` is an attribute name, or its keyword spelling with dots as underscores."""
    if key in attributes:
        return _equal(attributes[key], expected)
    for name, value in attributes.items():
        if name.replace(".", "_") == key:
            return _equal(value, expected)
    return False


def _equal(value: Any, expected: Any) -> bool:
    if isinstance(expected, re.Pattern):
        return isinstance(value, str) and expected.search(value) is not None
    if isinstance(value, tuple) and isinstance(expected, list):
        return list(value) == expected
    return bool(value == expected)


def _describe(span: Any) -> str:
    kind = _kind_name(span.kind)
    return f"{span.name!r} ({kind}, span {span.context.span_id:016x})"


class SpanCapture:
    """Collects the spans that end while it is active, from the global SDK ``TracerProvider``.

    ``start()`` adds a ``SimpleSpanProcessor`` with an ``InMemorySpanExporter`` to
    the global provider (installing an SDK provider first if the program has
    none); ``stop()`` shuts that processor down and removes it again.
    """

    def __init__(self) -> None:
        self._exporter: Any = None
        self._processor: Any = None
        self._provider: Any = None
        self._lock = threading.Lock()

    # -- life cycle --------------------------------------------------------

    def start(self) -> "SpanCapture":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            if isinstance(provider, trace.ProxyTracerProvider):
                trace.set_tracer_provider(TracerProvider())
                provider = trace.get_tracer_provider()
            if not isinstance(provider, TracerProvider):
                raise RuntimeError(
                    f"autotrace.testing: the global tracer provider is a {type(provider).__name__}, not an "
                    "OpenTelemetry SDK TracerProvider, so spans cannot be captured (is OTEL_SDK_DISABLED set?)"
                )
        self._exporter = InMemorySpanExporter()
        self._processor = SimpleSpanProcessor(self._exporter)
        self._provider = provider
        provider.add_span_processor(self._processor)
        return self

    def stop(self) -> None:
        processor, provider = self._processor, self._provider
        if processor is None:
            return
        self._processor = None
        # Keep the spans for reading after stop(); the exporter ignores new ones once shut down.
        self._spans_after_stop = self.spans
        processor.shutdown()
        multi = getattr(provider, "_active_span_processor", None)
        processors = getattr(multi, "_span_processors", None)
        lock = getattr(multi, "_lock", None)
        if isinstance(processors, tuple) and lock is not None:  # SDK internals; neutralised anyway if absent
            with lock:
                multi._span_processors = tuple(p for p in multi._span_processors if p is not processor)

    def __enter__(self) -> "SpanCapture":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- reading -----------------------------------------------------------

    @property
    def spans(self) -> List[Any]:
        """The finished spans captured so far (``ReadableSpan``), in the order they ended."""
        if self._processor is None and hasattr(self, "_spans_after_stop"):
            return list(self._spans_after_stop)
        if self._exporter is None:
            return []
        return list(self._exporter.get_finished_spans())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)

    def clear(self) -> None:
        if self._exporter is not None:
            self._exporter.clear()

    def find(
        self,
        name: NameMatch = None,
        kind: Any = None,
        attributes: Optional[Mapping[str, Any]] = None,
        **attrs: Any,
    ) -> List[Any]:
        """Spans matching every criterion given.

        ``name``: exact name, or a compiled regex (``re.search``). ``kind``: a
        ``SpanKind`` or its name (``"server"``). Attributes: ``attributes={"http.route": "/x"}``
        or keywords with dots written as underscores (``http_route="/x"``); an
        expected value may be a compiled regex.
        """
        wanted_kind = _kind_name(kind) if kind is not None else None
        expected: Dict[str, Any] = dict(attributes or {})
        expected.update(attrs)
        found = []
        for span in self.spans:
            if name is not None:
                if isinstance(name, re.Pattern):
                    if name.search(span.name) is None:
                        continue
                elif span.name != name:
                    continue
            if wanted_kind is not None and _kind_name(span.kind) != wanted_kind:
                continue
            span_attributes = span.attributes or {}
            if all(_attribute_matches(span_attributes, key, value) for key, value in expected.items()):
                found.append(span)
        return found

    def one(
        self,
        name: NameMatch = None,
        kind: Any = None,
        attributes: Optional[Mapping[str, Any]] = None,
        **attrs: Any,
    ) -> Any:
        """The single span matching (see :meth:`find`); AssertionError listing the spans otherwise."""
        found = self.find(name, kind, attributes, **attrs)
        if len(found) != 1:
            criteria = []
            if name is not None:
                criteria.append(f"name={name.pattern if isinstance(name, re.Pattern) else name!r}")
            if kind is not None:
                criteria.append(f"kind={_kind_name(kind)}")
            criteria.extend(f"{key}={value!r}" for key, value in {**dict(attributes or {}), **attrs}.items())
            raise AssertionError(
                f"expected exactly one span with {', '.join(criteria) or 'any criteria'}, found {len(found)}"
                + (": " + ", ".join(_describe(span) for span in found) if found else "")
                + "\ncaptured spans:\n"
                + (self.tree() or "  (none)\n")
            )
        return found[0]

    def children(self, parent: Any) -> List[Any]:
        """Captured spans whose parent is ``parent``, in start order."""
        kids = [
            span
            for span in self.spans
            if span.parent is not None
            and span.parent.span_id == parent.context.span_id
            and span.context.trace_id == parent.context.trace_id
        ]
        return sorted(kids, key=lambda span: span.start_time or 0)

    def parent_of(self, span: Any) -> Optional[Any]:
        if span.parent is None:
            return None
        for candidate in self.spans:
            if candidate.context.span_id == span.parent.span_id and candidate.context.trace_id == span.context.trace_id:
                return candidate
        return None

    def assert_child_of(self, child: Any, parent: Any) -> None:
        """``child``'s parent is ``parent`` (same trace, direct parent)."""
        if child.parent is not None and child.parent.span_id == parent.context.span_id and (
            child.context.trace_id == parent.context.trace_id
        ):
            return
        if child.parent is None:
            actual = "it is a root span"
        else:
            found = self.parent_of(child)
            actual = f"its parent is {_describe(found)}" if found is not None else (
                f"its parent is span {child.parent.span_id:016x}{' (remote)' if child.parent.is_remote else ''}, "
                "not captured"
            )
            if child.context.trace_id != parent.context.trace_id:
                actual += " in another trace"
        raise AssertionError(
            f"expected {_describe(child)} to be a child of {_describe(parent)}, but {actual}\n"
            "captured spans:\n" + self.tree()
        )

    def assert_same_trace(self, *spans: Any) -> None:
        ids = {span.context.trace_id for span in spans}
        if len(ids) > 1:
            raise AssertionError(
                "expected one trace, got " + ", ".join(f"{_describe(s)} in {s.context.trace_id:032x}" for s in spans)
            )

    def tree(self, width: int = 100, color: bool = False) -> str:
        """The captured spans drawn as trees (the ``tree`` exporter's format)."""
        from autotrace.render import Renderer, from_readable

        spans = self.spans
        if not spans:
            return ""
        return Renderer(width=width, color=color).render_traces(from_readable(span) for span in spans)

