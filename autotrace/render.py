"""Drawing traces as an indented tree with a time bar per span (a terminal waterfall).

Shared by the ``tree`` exporter (spans of this process, as they end), the
``autotrace-view`` command (spans of several processes, read from OTLP JSON
lines) and the pytest kit (captured spans printed when a test fails).

Everything is rendered from :class:`SpanView`, a neutral record built either
from an SDK ``ReadableSpan`` (:func:`from_readable`) or from one span of the
OTLP JSON encoding (:func:`from_otlp_json`). The renderer is pure: a list of
spans, a width and a colour flag in, text out -- which is what makes its output
testable byte for byte.

Layout of one trace (width 100, no colour)::

    trace 0af7651916cd43dd8448eb211c80319c · 3 spans · 25.0ms · shop
    GET /orders/{id} server                                   25.0ms │█████████████████████████│
    │  http.route=/orders/{id}  http.response.status_code=200
    ├─ SELECT orders client                                    3.00ms │██▉                      │
    ...
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

#: Attributes worth a glance, shown under a span in this order when present.
KEY_ATTRIBUTES: Tuple[str, ...] = (
    "http.route",
    "http.response.status_code",
    "db.operation.name",
    "db.collection.name",
    "celery.task.name",
    "messaging.destination.name",
    "url.full",
    "server.address",
    "error.type",
)

#: Pre-stable names shown when the stable one is absent (spans from older instrumentations).
OLD_NAMES: Dict[str, str] = {
    "http.response.status_code": "http.status_code",
    "url.full": "http.url",
    "db.operation.name": "db.operation",
    "db.collection.name": "db.sql.table",
}

_KINDS = {0: "internal", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}

DEFAULT_WIDTH = 100
MIN_WIDTH = 50
MAX_VALUE_CHARS = 48
DEFAULT_MAX_SPANS = 500

# ANSI styles (only used when colour is on).
_RESET = "\x1b[0m"
_STYLES = {
    "bold": "\x1b[1m",
    "dim": "\x1b[2m",
    "red": "\x1b[31m",
    "green": "\x1b[32m",
    "yellow": "\x1b[33m",
    "blue": "\x1b[34m",
    "magenta": "\x1b[35m",
    "cyan": "\x1b[36m",
    "boldred": "\x1b[1;31m",
}
_KIND_STYLE = {"server": "cyan", "client": "yellow", "producer": "magenta", "consumer": "magenta", "internal": "blue"}
_SERVICE_STYLES = ("cyan", "yellow", "magenta", "green", "blue")

_UNICODE = {
    "tee": "├─ ", "last": "└─ ", "pipe": "│  ", "blank": "   ", "fill": "█", "edge": "│",
    "ellipsis": "…", "dot": " · ", "error": "✗", "event": "•", "micro": "µs",
}
_ASCII = {
    "tee": "|- ", "last": "`- ", "pipe": "|  ", "blank": "   ", "fill": "#", "edge": "|",
    "ellipsis": "...", "dot": " - ", "error": "x", "event": "*", "micro": "us",
}
#: Eighth blocks for the ends of a bar: a span shorter than one cell still shows.
_PARTIAL = ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")


class SpanView:
    """What the renderer needs of one span, whatever it came from."""

    __slots__ = (
        "trace_id", "span_id", "parent_id", "parent_remote", "name", "kind", "start_ns", "end_ns",
        "status", "status_message", "attributes", "events", "service",
    )

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        parent_id: Optional[int],
        name: str,
        kind: str = "internal",
        start_ns: int = 0,
        end_ns: int = 0,
        status: str = "UNSET",
        status_message: str = "",
        attributes: Optional[Mapping[str, Any]] = None,
        events: Sequence[Tuple[str, int, Mapping[str, Any]]] = (),
        service: Optional[str] = None,
        parent_remote: bool = False,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id or None
        self.parent_remote = parent_remote
        self.name = name
        self.kind = kind
        self.start_ns = start_ns
        self.end_ns = max(end_ns, start_ns)
        self.status = status
        self.status_message = status_message
        self.attributes = dict(attributes or {})
        self.events = list(events)
        self.service = service

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def __repr__(self) -> str:
        return f"SpanView({self.name!r}, span_id={self.span_id:016x}, parent={self.parent_id and format(self.parent_id, '016x')})"


def from_readable(span: Any) -> SpanView:
    """A :class:`SpanView` of an SDK ``ReadableSpan``."""
    context = span.context
    parent = span.parent
    resource = getattr(span, "resource", None)
    service = None
    if resource is not None:
        service = resource.attributes.get("service.name")
    status = span.status
    events = [(event.name, event.timestamp or 0, dict(event.attributes or {})) for event in span.events]
    return SpanView(
        trace_id=context.trace_id,
        span_id=context.span_id,
        parent_id=parent.span_id if parent is not None else None,
        parent_remote=bool(parent is not None and parent.is_remote),
        name=span.name,
        kind=_KINDS.get(getattr(span.kind, "value", 0) + 1, "internal"),
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        status=status.status_code.name if status is not None else "UNSET",
        status_message=(status.description or "") if status is not None else "",
        attributes=span.attributes or {},
        events=events,
        service=service,
    )


# --------------------------------------------------------------------------
# OTLP JSON


def _hex_id(value: Any) -> Optional[int]:
    if not value:
        return None
    try:
        return int(value, 16) or None
    except (TypeError, ValueError):
        return None


def any_value(value: Mapping[str, Any]) -> Any:
    """The Python value of an OTLP JSON ``AnyValue``."""
    if not isinstance(value, Mapping):
        return value
    for key in ("stringValue", "boolValue", "doubleValue", "bytesValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        try:
            return int(value["intValue"])
        except (TypeError, ValueError):
            return value["intValue"]
    if "arrayValue" in value:
        return tuple(any_value(item) for item in value["arrayValue"].get("values", []))
    if "kvlistValue" in value:
        return key_values(value["kvlistValue"].get("values", []))
    return None


def key_values(items: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    return {item.get("key", ""): any_value(item.get("value", {})) for item in items or ()}


_STATUS_CODES = {0: "UNSET", 1: "OK", 2: "ERROR", "STATUS_CODE_UNSET": "UNSET", "STATUS_CODE_OK": "OK", "STATUS_CODE_ERROR": "ERROR"}
_JSON_KINDS = {
    "SPAN_KIND_UNSPECIFIED": "internal", "SPAN_KIND_INTERNAL": "internal", "SPAN_KIND_SERVER": "server",
    "SPAN_KIND_CLIENT": "client", "SPAN_KIND_PRODUCER": "producer", "SPAN_KIND_CONSUMER": "consumer",
}


def from_otlp_json(span: Mapping[str, Any], service: Optional[str] = None) -> Optional[SpanView]:
    """A :class:`SpanView` of one span of the OTLP JSON encoding; None when it has no usable ids."""
    trace_id = _hex_id(span.get("traceId"))
    span_id = _hex_id(span.get("spanId"))
    if trace_id is None or span_id is None:
        return None
    kind = span.get("kind", 0)
    kind_name = _JSON_KINDS.get(kind) if isinstance(kind, str) else _KINDS.get(int(kind), "internal")
    status = span.get("status") or {}
    flags = int(span.get("flags", 0) or 0)
    events = [
        (event.get("name", ""), int(event.get("timeUnixNano", 0) or 0), key_values(event.get("attributes", [])))
        for event in span.get("events", []) or ()
    ]
    return SpanView(
        trace_id=trace_id,
        span_id=span_id,
        parent_id=_hex_id(span.get("parentSpanId")),
        parent_remote=bool(flags & 0x200 and flags & 0x100),
        name=span.get("name", ""),
        kind=kind_name or "internal",
        start_ns=int(span.get("startTimeUnixNano", 0) or 0),
        end_ns=int(span.get("endTimeUnixNano", 0) or 0),
        status=_STATUS_CODES.get(status.get("code", 0), "UNSET"),
        status_message=status.get("message", ""),
        attributes=key_values(span.get("attributes", [])),
        events=events,
        service=service,
    )


def spans_from_request(request: Mapping[str, Any]) -> List[SpanView]:
    """Every span of one ``ExportTraceServiceRequest`` in OTLP JSON (one line of a trace file)."""
    views: List[SpanView] = []
    for resource_spans in request.get("resourceSpans", []) or ():
        resource = key_values((resource_spans.get("resource") or {}).get("attributes", []))
        service = resource.get("service.name")
        for scope_spans in resource_spans.get("scopeSpans", []) or ():
            for span in scope_spans.get("spans", []) or ():
                view = from_otlp_json(span, service)
                if view is not None:
                    views.append(view)
    return views


# --------------------------------------------------------------------------
# Formatting helpers


def format_duration(ns: int, micro: str = "µs") -> str:
    """``850ns``, ``12µs``, ``3.45ms``, ``12.3ms``, ``123ms``, ``1.25s``, ``2m03s``."""
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        us = ns / 1_000
        return f"{us:.1f}{micro}" if us < 10 else f"{us:.0f}{micro}"
    if ns < 1_000_000_000:
        ms = ns / 1_000_000
        if ms < 10:
            return f"{ms:.2f}ms"
        return f"{ms:.1f}ms" if ms < 100 else f"{ms:.0f}ms"
    if ns < 60_000_000_000:
        s = ns / 1_000_000_000
        return f"{s:.2f}s" if s < 10 else f"{s:.1f}s"
    total = int(ns // 1_000_000_000)
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def shorten(text: str, limit: int, ellipsis: str = "…") -> str:
    """``text`` cut to ``limit`` characters, ending with an ellipsis when cut."""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    if limit <= len(ellipsis):
        return text[:limit]
    return text[: limit - len(ellipsis)] + ellipsis


def format_value(value: Any, limit: int = MAX_VALUE_CHARS, ellipsis: str = "…") -> str:
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(str(item) for item in value) + "]"
    else:
        text = str(value)
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")
    return shorten(text, limit, ellipsis)


# --------------------------------------------------------------------------
# Rendering


class _Line:
    """A line as styled segments; widths are measured on the plain text."""

    __slots__ = ("segments",)

    def __init__(self) -> None:
        self.segments: List[Tuple[str, Optional[str]]] = []

    def add(self, text: str, style: Optional[str] = None) -> "_Line":
        if text:
            self.segments.append((text, style))
        return self

    def __len__(self) -> int:
        return sum(len(text) for text, _ in self.segments)

    def truncate(self, width: int, ellipsis: str) -> "_Line":
        if len(self) <= width:
            return self
        room = width - len(ellipsis)
        kept: List[Tuple[str, Optional[str]]] = []
        for text, style in self.segments:
            if room <= 0:
                break
            kept.append((text[:room], style))
            room -= len(text[:room])
        while kept and not kept[-1][0].rstrip():
            kept.pop()
        if kept:
            kept[-1] = (kept[-1][0].rstrip(), kept[-1][1])
        last_style = kept[-1][1] if kept else None
        kept.append((ellipsis, last_style))
        self.segments = kept
        return self

    def text(self, color: bool) -> str:
        if not color:
            return "".join(text for text, _ in self.segments).rstrip()
        out = []
        for text, style in self.segments:
            out.append(f"{_STYLES[style]}{text}{_RESET}" if style else text)
        return "".join(out).rstrip()


class Renderer:
    """Renders groups of spans (one trace each) to text."""

    def __init__(
        self,
        width: int = DEFAULT_WIDTH,
        color: bool = False,
        unicode: bool = True,
        show_service: bool = False,
        max_spans: int = DEFAULT_MAX_SPANS,
    ) -> None:
        self.width = max(MIN_WIDTH, int(width))
        self.color = color
        self.glyphs = _UNICODE if unicode else _ASCII
        self.unicode = unicode
        self.show_service = show_service
        self.max_spans = max(1, max_spans)
        self.bar_width = min(40, max(10, self.width // 4))
        self.duration_width = 8
        # name column | space | duration | space | edge | bar | edge
        self.left_width = self.width - self.duration_width - self.bar_width - 4

    # -- public ------------------------------------------------------------

    def render(self, spans: Sequence[SpanView], note: str = "") -> str:
        """One trace (all ``spans`` share a trace id) as text ending with a newline."""
        if not spans:
            return ""
        spans = self._dedupe(spans)
        by_id = {span.span_id: span for span in spans}
        children: Dict[int, List[SpanView]] = {}
        roots: List[SpanView] = []
        for span in spans:
            if span.parent_id is not None and span.parent_id in by_id and span.parent_id != span.span_id:
                children.setdefault(span.parent_id, []).append(span)
            else:
                roots.append(span)
        order = lambda s: (s.start_ns, s.end_ns, s.name, s.span_id)  # noqa: E731
        roots.sort(key=order)
        for kids in children.values():
            kids.sort(key=order)
        t0 = min(span.start_ns for span in spans)
        t1 = max(span.end_ns for span in spans)
        self._t0, self._total = t0, max(1, t1 - t0)
        self._services = self._service_styles(spans)
        lines: List[_Line] = [self._header(spans, t1 - t0, note)]
        shown = 0
        # Iterative depth-first walk: (span, prefix for its line, prefix for what is below it).
        stack: List[Tuple[SpanView, str, str]] = [(root, "", "") for root in reversed(roots)]
        seen = set()
        while stack:
            span, prefix, below = stack.pop()
            if span.span_id in seen:  # a cycle in bad input
                continue
            seen.add(span.span_id)
            if shown >= self.max_spans:
                hidden = len(spans) - shown
                lines.append(_Line().add(f"{self.glyphs['ellipsis']} {hidden} more span{'s' if hidden != 1 else ''} not shown", "dim"))
                break
            shown += 1
            kids = children.get(span.span_id, [])
            lines.append(self._span_line(span, prefix))
            detail_prefix = below + (self.glyphs["pipe"] if kids else self.glyphs["blank"])
            lines.extend(self._details(span, detail_prefix))
            for index in range(len(kids) - 1, -1, -1):
                last = index == len(kids) - 1
                stack.append(
                    (
                        kids[index],
                        below + (self.glyphs["last"] if last else self.glyphs["tee"]),
                        below + (self.glyphs["blank"] if last else self.glyphs["pipe"]),
                    )
                )
        ellipsis = self.glyphs["ellipsis"]
        return "\n".join(line.truncate(self.width, ellipsis).text(self.color) for line in lines) + "\n"

    def render_traces(self, spans: Iterable[SpanView], note: str = "") -> str:
        """Spans of any number of traces, grouped by trace id, earliest trace first, blank line between."""
        groups: Dict[int, List[SpanView]] = {}
        for span in spans:
            groups.setdefault(span.trace_id, []).append(span)
        ordered = sorted(groups.values(), key=lambda group: min(span.start_ns for span in group))
        return "\n".join(self.render(group, note) for group in ordered)

    # -- pieces ------------------------------------------------------------

    @staticmethod
    def _dedupe(spans: Sequence[SpanView]) -> List[SpanView]:
        unique: Dict[int, SpanView] = {}
        for span in spans:
            unique.setdefault(span.span_id, span)
        return list(unique.values())

    def _service_styles(self, spans: Sequence[SpanView]) -> Dict[Optional[str], str]:
        styles: Dict[Optional[str], str] = {}
        for span in sorted(spans, key=lambda s: s.start_ns):
            if span.service not in styles:
                styles[span.service] = _SERVICE_STYLES[len(styles) % len(_SERVICE_STYLES)]
        return styles

    def _header(self, spans: Sequence[SpanView], total_ns: int, note: str) -> _Line:
        dot = self.glyphs["dot"]
        line = _Line().add("trace ", "bold").add(f"{spans[0].trace_id:032x}", "bold")
        count = len(spans)
        line.add(f"{dot}{count} span{'s' if count != 1 else ''}{dot}{format_duration(total_ns, self.glyphs['micro'])}")
        extras: List[Tuple[str, str]] = []
        errors = sum(1 for span in spans if span.status == "ERROR")
        if errors:
            extras.append((f"{dot}{errors} error{'s' if errors != 1 else ''}", "red"))
        if note:
            extras.append((f"{dot}{note}", "yellow"))
        services = [s for s in self._services if s]
        if services:
            extras.append((dot + ", ".join(services), "dim"))
        # Whole pieces only, while they fit; the last one may be shortened.
        for text, style in extras:
            room = self.width - len(line)
            if len(text) <= room:
                line.add(text, style)
            else:
                if room >= len(dot) + 6:
                    line.add(shorten(text, room, self.glyphs["ellipsis"]), style)
                break
        return line

    def _span_line(self, span: SpanView, prefix: str) -> _Line:
        g = self.glyphs
        error = span.status == "ERROR"
        suffix = f" {span.kind}"
        if self.show_service and span.service:
            suffix += f"{g['dot']}{span.service}"
        marker = f"{g['error']} " if error else ""
        room = self.left_width - len(suffix) - len(marker)
        # Deep trees: keep the tail of the indentation so the name stays readable.
        min_name = min(12, len(span.name or "(no name)"))
        if len(prefix) > room - min_name:
            keep = max(0, room - min_name - len(g["ellipsis"]))
            prefix = g["ellipsis"] + prefix[len(prefix) - keep :] if keep else ""
        name = shorten(span.name or "(no name)", room - len(prefix), g["ellipsis"])
        line = _Line().add(prefix, "dim")
        if marker:
            line.add(marker, "boldred")
        line.add(name, "red" if error else "bold")
        line.add(f" {span.kind}", _KIND_STYLE.get(span.kind))
        if self.show_service and span.service:
            line.add(f"{g['dot']}{span.service}", self._services.get(span.service))
        used = len(prefix) + len(marker) + len(name) + len(suffix)
        line.add(" " * max(0, self.left_width - used))
        line.add(" " + format_duration(span.duration_ns, g["micro"]).rjust(self.duration_width) + " ", "dim")
        line.add(g["edge"], "dim")
        if error:
            bar_style = "red"
        elif self.show_service and len(self._services) > 1:
            bar_style = self._services.get(span.service, "cyan")
        else:
            bar_style = _KIND_STYLE.get(span.kind, "blue")
        lead, bar, trail = self._bar(span)
        line.add(lead).add(bar, bar_style).add(trail)
        line.add(g["edge"], "dim")
        return line

    def _bar(self, span: SpanView) -> Tuple[str, str, str]:
        """Leading blanks, the bar, trailing blanks; together exactly ``bar_width`` cells."""
        width = self.bar_width
        scale = width / self._total
        start = (span.start_ns - self._t0) * scale
        end = (span.end_ns - self._t0) * scale
        first = min(width - 1, int(math.floor(start)))
        if not self.unicode:
            last = max(first + 1, min(width, int(math.ceil(end))))
            return " " * first, "#" * (last - first), " " * (width - last)
        # From the start cell, as long as the span lasts: whole cells, then an eighth block.
        length = max(end - start, 1 / 8)
        full = int(length)
        eighths = int(round((length - full) * 8))
        if eighths == 8:
            full, eighths = full + 1, 0
        if full == 0 and eighths == 0:
            eighths = 1
        full = min(full, width - first)
        bar = "█" * full
        if eighths and first + full < width:
            bar += _PARTIAL[eighths]
        return " " * first, bar, " " * (width - first - len(bar))

    def _details(self, span: SpanView, prefix: str) -> List[_Line]:
        g = self.glyphs
        lines: List[_Line] = []
        room = self.width - len(prefix)
        pairs = []
        attributes = span.attributes
        for key in KEY_ATTRIBUTES:
            shown = key if key in attributes else OLD_NAMES.get(key)
            if shown is None or shown not in attributes:
                continue
            if key == "server.address" and ("url.full" in attributes or "http.url" in attributes):
                continue  # already in the URL
            pairs.append(f"{shown}={format_value(attributes[shown], MAX_VALUE_CHARS, g['ellipsis'])}")
        if span.status == "ERROR" and span.status_message:
            has_exception = any(name == "exception" for name, _, _ in span.events)
            if not has_exception:
                pairs.append("status=" + format_value(span.status_message, MAX_VALUE_CHARS, g["ellipsis"]))
        if pairs:
            lines.append(_Line().add(prefix, "dim").add("  ".join(pairs), "dim"))
        for name, timestamp, attributes in span.events:
            offset = format_duration(max(0, timestamp - span.start_ns), g["micro"])
            if name == "exception":
                kind = format_value(attributes.get("exception.type", "exception"), MAX_VALUE_CHARS, g["ellipsis"])
                message = format_value(attributes.get("exception.message", ""), max(20, room), g["ellipsis"])
                text = f"{g['error']} {kind}: {message}" if message else f"{g['error']} {kind}"
                lines.append(_Line().add(prefix, "dim").add(text, "red").add(f"  (+{offset})", "dim"))
            else:
                extra = "  ".join(
                    f"{key}={format_value(value, 24, g['ellipsis'])}" for key, value in list(attributes.items())[:3]
                )
                line = _Line().add(prefix, "dim").add(f"{g['event']} {name}", "yellow").add(f"  (+{offset})", "dim")
                if extra:
                    line.add("  " + extra, "dim")
                lines.append(line)
        return lines


def render_traces(
    spans: Iterable[SpanView],
    width: int = DEFAULT_WIDTH,
    color: bool = False,
    unicode: bool = True,
    show_service: bool = False,
    note: str = "",
) -> str:
    """Convenience: group ``spans`` by trace and render them all."""
    return Renderer(width=width, color=color, unicode=unicode, show_service=show_service).render_traces(spans, note)
