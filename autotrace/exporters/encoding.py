"""OTLP protobuf encoding of SDK spans, written straight to bytes.

Why: upstream's ``encode_spans`` builds a protobuf object per span, attribute
and value, and hashes every span's Resource (a JSON dump) to group them; on
this project's benchmark that costs more per span than creating the span.
The export thread competes with the program for the GIL, so that cost lands
on the program's requests. This encoder writes the same wire format directly
(tests compare it, message for message, with upstream's), groups by object
identity and caches the encoding of repeated attribute pairs, resources and
scopes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence as AbcSequence
from struct import Struct
from typing import Any, Callable, Dict, List, Sequence, Tuple

_FIXED64 = Struct("<Q").pack
_FIXED32 = Struct("<I").pack
_DOUBLE = Struct("<d").pack
_VARINTS = [bytes([i]) if i < 0x80 else bytes([(i & 0x7F) | 0x80, i >> 7]) for i in range(1 << 14)]
_MAX_CACHE = 8192
_HAS_IS_REMOTE = 0x100
#: ``kind`` field by SDK SpanKind value (INTERNAL=0 ... CONSUMER=4; OTLP counts from 1).
_KIND_FIELDS = [b"\x30" + bytes([value + 1]) for value in range(5)]
_IS_REMOTE = 0x200
_TIMES = Struct("<BQBQ").pack  # start_time_unix_nano and end_time_unix_nano, tags included
#: The flags field: span flags say whether the parent is remote.
_PARENT_LOCAL = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE)
_PARENT_REMOTE = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)
#: The status field without a description, by status code (UNSET, OK, ERROR).
_STATUS_FIELDS = [b"\x7a\x00", b"\x7a\x02\x18\x01", b"\x7a\x02\x18\x02"]


_CACHEABLE = frozenset((str, int, bool, float))


def _varint(value: int) -> bytes:
    if 0 <= value < 16384:
        return _VARINTS[value]
    if value < 0:
        value &= 0xFFFFFFFFFFFFFFFF  # int64 as two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _text(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def encode_value(value: Any) -> bytes:
    """The body of an ``AnyValue`` message."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", _text(value))
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value)
    if kind is float:
        return b"\x21" + _DOUBLE(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", _text(value))
    if isinstance(value, int):
        return b"\x18" + _varint(int(value))
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(float(value))
    if isinstance(value, (bytes, bytearray)):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, AbcSequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", encode_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"cannot encode attribute value of type {kind.__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return _field(b"\x0a", _text(key)) + _field(b"\x12", encode_value(value))


class SpanEncoder:
    """Encodes batches of ReadableSpans into an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self._pairs: Dict[Tuple[str, type, Any], bytes] = {}
        self._resources: Dict[int, Tuple[Any, Any, bytes]] = {}
        self._scopes: Dict[int, Tuple[Any, bytes]] = {}
        self._names: Dict[str, bytes] = {}

    def __call__(self, spans: Sequence[Any]) -> bytes:
        return self.encode(spans)

    # -- attributes -------------------------------------------------------------
    def attributes(self, tag: bytes, attributes: Any) -> bytes:
        """Every attribute as a repeated KeyValue field with ``tag``."""
        if not attributes:
            return b""
        # The SDK's BoundedAttributes iterates through the Mapping ABC (a
        # __getitem__ per key); its plain dict is several times faster.
        plain = getattr(attributes, "_dict", None)
        if type(plain) is not dict:
            plain = attributes
        cache = self._pairs
        parts: List[bytes] = []
        for key, value in plain.items():
            try:
                kind = type(value)
                # The type is part of the key: True == 1 == 1.0 would share an entry.
                cacheable = kind in _CACHEABLE
                encoded = cache.get((key, kind, value)) if cacheable else None
                if encoded is None:
                    encoded = _field(tag, _key_value(key, value))
                    if cacheable:
                        if len(cache) >= _MAX_CACHE:
                            cache.clear()
                        cache[(key, kind, value)] = encoded
                parts.append(encoded)
            except (TypeError, ValueError):
                continue  # as upstream: an unencodable attribute is skipped
        return b"".join(parts)

    # -- containers ----------------------------------------------------------------
    def _resource(self, resource: Any) -> bytes:
        # Keyed on the attributes object too: after a fork the pid is updated in
        # place (a new attributes object on the same Resource).
        attributes = resource.attributes if resource is not None else None
        cached = self._resources.get(id(resource))
        if cached is not None and cached[0] is resource and cached[1] is attributes:
            return cached[2]
        body = self.attributes(b"\x0a", attributes) if resource is not None else b""
        encoded = _field(b"\x0a", body)
        self._resources[id(resource)] = (resource, attributes, encoded)
        return encoded

    def _scope(self, scope: Any) -> bytes:
        cached = self._scopes.get(id(scope))
        if cached is not None and cached[0] is scope:
            return cached[1]
        body = b""
        if scope is not None:
            if scope.name:
                body += _field(b"\x0a", _text(scope.name))
            if scope.version:
                body += _field(b"\x12", _text(scope.version))
            body += self.attributes(b"\x1a", scope.attributes)
        encoded = _field(b"\x0a", body)
        self._scopes[id(scope)] = (scope, encoded)
        return encoded

    def encode(self, spans: Sequence[Any]) -> bytes:
        return self.request([self.span_entry(span) for span in spans])

    def span_entry(self, span: Any) -> Tuple[Tuple[Any, Any], bytes]:
        """``((resource, scope), encoded Span field)``: what :meth:`request` assembles."""
        fields = getattr(span, "__dict__", None)
        if fields is not None and "_resource" in fields and "_instrumentation_scope" in fields:
            group = (fields["_resource"], fields["_instrumentation_scope"])
        else:
            group = (span.resource, span.instrumentation_scope)
        return group, _field(b"\x12", self.span(span))

    def request(self, entries: Sequence[Tuple[Tuple[Any, Any], bytes]]) -> bytes:
        """An ExportTraceServiceRequest from :meth:`span_entry` results, grouped by resource and scope."""
        grouped: Dict[int, Tuple[Any, Dict[int, Tuple[Any, List[bytes]]]]] = {}
        for (resource, scope), encoded in entries:
            by_scope = grouped.get(id(resource))
            if by_scope is None:
                by_scope = grouped[id(resource)] = (resource, {})
            entry = by_scope[1].get(id(scope))
            if entry is None:
                entry = by_scope[1][id(scope)] = (scope, [])
            entry[1].append(encoded)
        out = []
        for resource, scopes in grouped.values():
            scope_parts = []
            for scope, encoded_spans in scopes.values():
                body = self._scope(scope) + b"".join(encoded_spans)
                schema = getattr(scope, "schema_url", None) if scope is not None else None
                if schema:
                    body += _field(b"\x1a", _text(schema))
                scope_parts.append(_field(b"\x12", body))
            body = self._resource(resource) + b"".join(scope_parts)
            schema = getattr(resource, "schema_url", None)
            if schema:
                body += _field(b"\x1a", _text(schema))
            out.append(_field(b"\x0a", body))
        if len(self._resources) > 64:
            self._resources.clear()
        if len(self._scopes) > 1024:
            self._scopes.clear()
        return b"".join(out)

    # -- one span -----------------------------------------------------------------
    def span(self, span: Any) -> bytes:
        # ReadableSpan's properties copy (attributes into a MappingProxy, events
        # and links into new tuples) on every access: read its fields directly
        # where they are where we expect them, else through the properties.
        try:
            fields = span.__dict__
            context = fields["_context"]
            parent = fields["_parent"]
            name = fields["_name"]
            kind = fields["_kind"]
            start_time = fields["_start_time"]
            end_time = fields["_end_time"]
            attributes = fields["_attributes"]
            events = fields["_events"]
            links = fields["_links"]
            status = fields["_status"]
        except (AttributeError, KeyError):
            context, parent, name, kind = span.context, span.parent, span.name, span.kind
            start_time, end_time, status = span.start_time, span.end_time, span.status
            attributes, events, links = span.attributes, span.events, span.links
        parts = [
            b"\x0a\x10",
            context.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            context.span_id.to_bytes(8, "big"),
        ]
        trace_state = context.trace_state
        if trace_state:
            parts.append(_field(b"\x1a", _text(",".join(f"{k}={v}" for k, v in trace_state.items()))))
        if parent is not None:
            parts.append(b"\x22\x08")
            parts.append(parent.span_id.to_bytes(8, "big"))
        encoded_name = self._names.get(name)
        if encoded_name is None:
            encoded_name = _field(b"\x2a", _text(name))
            if len(self._names) >= _MAX_CACHE:
                self._names.clear()
            self._names[name] = encoded_name
        parts.append(encoded_name)
        parts.append(_KIND_FIELDS[getattr(kind, "_value_", None) or kind.value])
        parts.append(_TIMES(0x39, start_time or 0, 0x41, end_time or 0))
        if attributes:
            parts.append(self.attributes(b"\x4a", attributes))
        dropped = getattr(attributes, "dropped", 0)
        if dropped:
            parts.append(b"\x50" + _varint(dropped))
        if events:
            for event in events:
                body = b"\x09" + _FIXED64(event.timestamp or 0) + _field(b"\x12", _text(event.name))
                body += self.attributes(b"\x1a", event.attributes)
                if event.dropped_attributes:
                    body += b"\x20" + _varint(event.dropped_attributes)
                parts.append(_field(b"\x5a", body))
        dropped = getattr(events, "dropped", 0)
        if dropped:
            parts.append(b"\x60" + _varint(dropped))
        if links:
            for link in links:
                link_context = link.context
                body = b"\x0a\x10" + link_context.trace_id.to_bytes(16, "big")
                body += b"\x12\x08" + link_context.span_id.to_bytes(8, "big")
                body += self.attributes(b"\x22", link.attributes)
                if link.dropped_attributes:
                    body += b"\x28" + _varint(link.dropped_attributes)
                body += b"\x35" + _FIXED32(_HAS_IS_REMOTE | (_IS_REMOTE if link_context.is_remote else 0))
                parts.append(_field(b"\x6a", body))
        dropped = getattr(links, "dropped", 0)
        if dropped:
            parts.append(b"\x70" + _varint(dropped))
        if status is not None:
            parts.append(self._status(status))
        parts.append(_PARENT_REMOTE if parent is not None and parent.is_remote else _PARENT_LOCAL)
        return b"".join(parts)

    @staticmethod
    def _status(status: Any) -> bytes:
        description = status.description
        code = getattr(status.status_code, "_value_", None)
        if code is None:
            code = status.status_code.value
        if not description:
            return _STATUS_FIELDS[code]
        return _field(b"\x7a", _field(b"\x12", _text(description)) + (b"\x18" + _VARINTS[code] if code else b""))


def make_encoder() -> Callable[[Sequence[Any]], bytes]:
    return SpanEncoder()

