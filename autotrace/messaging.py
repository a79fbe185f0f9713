"""Messaging: what every message-queue instrumentor shares (Celery; pika, aio-pika and Kafka clients next).

An instrumentor for a messaging library says which calls publish and which
process a message, and which facts to read (destination, message id, header
carrier); this module holds the rest, on top of :mod:`autotrace.kit`:

* Attribute names of the stable messaging conventions and
  :func:`producer_attributes` / :func:`consumer_attributes` -- never the
  message body, only its size (:func:`body_size`).
* Span names: :func:`span_name` (``publish {destination}``,
  ``process {destination}``).
* The producer side: :func:`inject_headers` -- the trace context added to a
  *copy* of the message headers (the caller's mapping is never modified). In a
  :class:`kit.Plan`, the copy is the ``carrier`` and goes into ``kwargs``.
* The consumer side: :func:`consumer_parent` (the message's context as the
  parent, or as a link only), :func:`batch_links` (one link per message of a
  batch), :func:`start_consumer_span` (a :class:`kit.ServerSpan` of kind
  CONSUMER) and :class:`ConsumerCall` -- the CONSUMER span around each call of
  a message handler. Why not :class:`kit.CallSpan`: it stands down when the
  current context is suppressed, and a consumer loop usually is (the library's
  own polling), yet each message must be traced, from the context it brings.
* :class:`Machinery` -- the library's own work (broker polling, heartbeats,
  result bookkeeping, control broadcasts) runs suppressed; the library's own
  publishes made inside it (a callback published by a result backend) still
  pass, as children of the current span (:meth:`Machinery.through`).
* :func:`new_trace` -- each call (a scheduler's tick) starts from an empty
  context: what it publishes are new traces.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Link

from autotrace._log import internal_error
from autotrace.kit import (
    CONSUMER,
    SUPPRESS_INSTRUMENTATION_KEY,
    CallSpan,
    Instrumentor,
    ServerSpan,
    extract,
    inject,
    record_error,
    span_context,
    start_server_span,
)

__all__ = [
    "SYSTEM", "DESTINATION", "OPERATION_TYPE", "OPERATION_NAME", "MESSAGE_ID", "BODY_SIZE", "CONVERSATION_ID",
    "BATCH_COUNT", "SERVER_ADDRESS", "SERVER_PORT", "CREATE", "SEND", "RECEIVE", "PROCESS", "SETTLE",
    "message_attributes", "producer_attributes", "consumer_attributes", "body_size", "span_name",
    "inject_headers", "consumer_parent", "batch_links", "start_consumer_span", "ConsumerCall", "Machinery",
    "new_trace",
]

SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
MESSAGE_ID = "messaging.message.id"
BODY_SIZE = "messaging.message.body.size"
CONVERSATION_ID = "messaging.message.conversation_id"
BATCH_COUNT = "messaging.batch.message_count"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"

#: ``messaging.operation.type`` values.
CREATE = "create"
SEND = "send"
RECEIVE = "receive"
PROCESS = "process"
SETTLE = "settle"

#: Links a span over a batch gets at most (the SDK's default link limit).
MAX_BATCH_LINKS = 128

_get_current = otel_context.get_current
_attach = otel_context.attach
_detach = otel_context.detach
_get_span = trace.get_current_span
_set_item = dict.__setitem__
_update = dict.update
_pop = dict.pop


# --------------------------------------------------------------------------
# Attributes and names


def message_attributes(
    system: str,
    operation_type: str,
    operation_name: Optional[str] = None,
    destination: Any = None,
    message_id: Any = None,
    body_size: Optional[int] = None,
    conversation_id: Any = None,
    server_address: Any = None,
    server_port: Any = None,
) -> Dict[str, Any]:
    """The attributes of a messaging span; facts that are None or empty are left out.

    ``operation_name``: the system's own name for the operation (``publish``,
    ``ack``), default ``operation_type``. ``body_size``: bytes (see
    :func:`body_size`) -- the body itself is never recorded.
    """
    attrs: Dict[str, Any] = {SYSTEM: system, OPERATION_TYPE: operation_type, OPERATION_NAME: operation_name or operation_type}
    if destination:
        attrs[DESTINATION] = str(destination)
    if message_id:
        attrs[MESSAGE_ID] = str(message_id)
    if body_size is not None:
        attrs[BODY_SIZE] = int(body_size)
    if conversation_id:
        attrs[CONVERSATION_ID] = str(conversation_id)
    if server_address:
        attrs[SERVER_ADDRESS] = str(server_address)
        if isinstance(server_port, int) or (isinstance(server_port, str) and server_port.isdigit()):
            attrs[SERVER_PORT] = int(server_port)
    return attrs


def producer_attributes(system: str, destination: Any = None, operation_name: str = "publish", **facts: Any) -> Dict[str, Any]:
    """PRODUCER attributes: ``messaging.operation.type`` ``send`` (other facts as :func:`message_attributes`)."""
    return message_attributes(system, SEND, operation_name, destination, **facts)


def consumer_attributes(system: str, destination: Any = None, operation_name: str = "process", **facts: Any) -> Dict[str, Any]:
    """CONSUMER attributes: ``messaging.operation.type`` ``process`` (other facts as :func:`message_attributes`)."""
    return message_attributes(system, PROCESS, operation_name, destination, **facts)


def body_size(body: Any) -> Optional[int]:
    """Size in bytes of a message body (bytes-like, or text as UTF-8); None when it cannot be told cheaply."""
    if isinstance(body, (bytes, bytearray)):
        return len(body)
    if isinstance(body, memoryview):
        return body.nbytes
    if isinstance(body, str):
        return len(body) if body.isascii() else len(body.encode("utf-8", "surrogatepass"))
    return None


def span_name(operation_name: str, destination: Any = None) -> str:
    """``{operation} {destination}`` (``publish orders``), or the operation alone without a destination.

    ``destination`` must be of low cardinality: a queue, topic or task name,
    never a temporary queue or a message id.
    """
    return f"{operation_name} {destination}" if destination else operation_name


# --------------------------------------------------------------------------
# The producer side


def inject_headers(headers: Any = None, context: Optional[Context] = None) -> Dict[str, Any]:
    """A copy of ``headers`` (a mapping, or None) with the trace context of ``context`` (default: current).

    The caller's mapping is never modified (it may be reused for many
    messages, or frozen).
    """
    carrier = dict(headers) if headers else {}
    inject(carrier, _get_current() if context is None else context)
    return carrier


# --------------------------------------------------------------------------
# The consumer side


def consumer_parent(carrier: Any, link_only: bool = False, getter: Any = None) -> Tuple[Context, Optional[List[Link]]]:
    """``(parent context, links)`` of the span that processes a message whose headers are ``carrier``.

    By default the producer's span is the parent (one trace across the
    broker). ``link_only``: a new trace, linked to the producer's span -- for
    a consumer whose work should not count in the producer's trace; baggage
    still carries on. A bad or absent header: a new trace, no link.
    """
    parent = extract(carrier, getter) if carrier is not None else Context()
    if not link_only:
        return parent, None
    producer = _get_span(parent).get_span_context()
    if not producer.is_valid:
        return parent, None
    return trace.set_span_in_context(INVALID_SPAN, parent), [Link(producer)]


def batch_links(carriers: Iterable[Any], getter: Any = None, limit: int = MAX_BATCH_LINKS) -> List[Link]:
    """One link per message of a batch (a span receiving or processing many), from each one's headers.

    Messages without a valid context add none; a context seen twice is linked
    once; at most ``limit`` links.
    """
    links: List[Link] = []
    seen = set()
    for carrier in carriers:
        if carrier is None:
            continue
        producer = _get_span(extract(carrier, getter)).get_span_context()
        if producer.is_valid and (producer.trace_id, producer.span_id) not in seen:
            seen.add((producer.trace_id, producer.span_id))
            links.append(Link(producer))
            if len(links) >= limit:
                break
    return links


def _end(span: Any, site: str) -> None:
    try:
        span.end()
    except Exception:
        internal_error(site + ".end")


def _default_record(span: Any, exc: BaseException, state: Any) -> None:
    record_error(span, exc)


def start_consumer_span(
    instrumentor: Instrumentor,
    name: str,
    attributes: Dict[str, Any],
    carrier: Any = None,
    getter: Any = None,
    link_only: bool = False,
    links: Optional[List[Link]] = None,
    record: Any = None,
) -> ServerSpan:
    """Start the CONSUMER span of a message, from its headers (``carrier``); not made current.

    Parent or link as :func:`consumer_parent`; ``links``: more (a batch's).
    Call ``.enter()`` / ``.leave()`` around the handler and ``.end(exc)``
    once (:class:`kit.ServerSpan`), or ``.end()`` at once for a message
    settled without processing (expired, revoked).
    """
    parent, own = consumer_parent(carrier, link_only, getter)
    if links:
        own = (own or []) + list(links)
    return start_server_span(instrumentor, name, attributes, kind=CONSUMER, parent=parent, links=own, record=record)


class ConsumerCall:
    """The CONSUMER span around each call of a message handler; pass it to :meth:`Instrumentor.wrap`.

    ``describe(instance, args, kwargs)`` returns None (no span) or a
    :class:`kit.Plan`: ``parent`` and ``links`` from :func:`consumer_parent`
    (None: a new trace), ``state`` for the hooks. Whatever is current at the
    call -- suppression included -- is not the span's parent: the message's
    context is. The span is current during the call; ``finish(span, result,
    state)`` reads the outcome, ``record(span, exc, state)`` records a raised
    exception (default :func:`kit.record_error`). Our failures are reported
    and the handler runs untraced; its result and exceptions pass unchanged.
    Like :class:`kit.CallSpan`, the sync or async wrapper is picked by the
    target; to wrap a handler that is not a method (a callback, a closure),
    call ``sync(handler, instance, args, kwargs)`` with any ``instance`` for
    ``describe`` (precomputed facts). The Plan's ``carrier``, ``args`` and
    ``kwargs`` are not used.

    The span is started and ended as :class:`kit.CallSpan` does it (not
    through :class:`kit.ServerSpan`: a consumed message pays for no extra
    object and calls). With a ``CallSpan`` option to ignore the current
    context, this class would be that ``CallSpan``.
    """

    __slots__ = ("site", "sync", "async_", "__weakref__")

    for_target = CallSpan.for_target

    def __init__(
        self,
        instrumentor: Instrumentor,
        describe: Callable[[Any, Tuple[Any, ...], Dict[str, Any]], Any],
        finish: Optional[Callable[[Any, Any, Any], None]] = None,
        record: Optional[Callable[[Any, BaseException, Any], None]] = None,
        site: Optional[str] = None,
    ) -> None:
        site = self.site = site or f"{instrumentor.name}.{getattr(describe, '__name__', 'consume')}"

        record = record or _default_record
        empty = Context()

        def begin(instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            """``(span, token, state)`` or None; never raises."""
            span = None
            try:
                plan = describe(instance, args, kwargs)
                if plan is None:
                    return None
                parent = empty if plan.parent is None else plan.parent
                tracer = instrumentor._tracer or instrumentor.tracer
                span = tracer.start_span(plan.name, parent, CONSUMER, plan.attributes, plan.links)
                return span, _attach(span_context(span, parent)), plan.state
            except Exception:
                internal_error(site)
                if span is not None:
                    _end(span, site)
                return None

        def done(span: Any, token: Any, state: Any, result: Any, exc: Optional[BaseException]) -> None:
            try:
                _detach(token)
                if exc is not None:
                    record(span, exc, state)
                elif finish is not None:
                    finish(span, result, state)
            except Exception:
                internal_error(site)
            _end(span, site)

        def sync(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            started = begin(instance, args, kwargs)
            if started is None:
                return wrapped(*args, **kwargs)
            try:
                result = wrapped(*args, **kwargs)
            except BaseException as exc:
                done(*started, None, exc)
                raise
            done(*started, result, None)
            return result

        async def async_(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            started = begin(instance, args, kwargs)
            if started is None:
                return await wrapped(*args, **kwargs)
            try:
                result = await wrapped(*args, **kwargs)
            except BaseException as exc:
                done(*started, None, exc)
                raise
            done(*started, result, None)
            return result

        self.sync, self.async_ = sync, async_


# --------------------------------------------------------------------------
# The library's own machinery


class Machinery:
    """A library's own work, traced by nothing -- except the library's publishes made inside it.

    ``Machinery("celery")`` makes one context key; :attr:`run` is a wrapper
    (for :meth:`Instrumentor.wrap`) that runs the call with OTel's suppress key
    and this key set (a generator it returns is stepped the same way), so no
    instrumentor adds spans for the library's broker or result-store I/O.
    :meth:`through` wraps a :class:`kit.CallSpan` (a publish, an in-process
    execution) so that inside the machinery its span is made all the same, a
    child of the current span: the suppression *this* machinery set is lifted
    for it, any other (the exporter's, the program's ``suppressed()``) is
    respected. Sync targets.
    """

    __slots__ = ("key", "run", "site")

    def __init__(self, name: str) -> None:
        key = self.key = otel_context.create_key(f"autotrace-{name}-machinery")
        site = self.site = f"{name}.machinery"
        suppress = SUPPRESS_INSTRUMENTATION_KEY
        context = self.context

        def steps(generator: Any) -> Any:
            while True:
                token = _attach(context())
                try:
                    item = next(generator)
                except StopIteration:
                    return
                finally:
                    _detach(token)
                yield item

        def run(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            try:
                current = _get_current()
                token = None if current.get(key) and current.get(suppress) else _attach(context(current))
            except Exception:
                internal_error(site)
                return wrapped(*args, **kwargs)
            try:
                result = wrapped(*args, **kwargs)
            finally:
                if token is not None:
                    _detach(token)
            if token is not None and inspect.isgenerator(result):
                return steps(result)
            return result

        self.run = run

    def context(self, parent: Optional[Context] = None, values: Optional[Dict[Any, Any]] = None, drop: Any = None) -> Context:
        """``parent`` (default: current) inside this machinery (suppressed, this key set), plus ``values``, minus key ``drop``.

        As a :class:`kit.Plan` ``parent``: the span's call is machinery.
        """
        ctx = Context(_get_current() if parent is None else parent)
        # Context forbids item assignment; this copy is ours alone (as in kit.span_context).
        _set_item(ctx, SUPPRESS_INSTRUMENTATION_KEY, True)
        _set_item(ctx, self.key, True)
        if values:
            _update(ctx, values)
        if drop is not None and drop in ctx:
            _pop(ctx, drop)
        return ctx

    def through(self, call_span: CallSpan) -> Callable[..., Any]:
        """``call_span``'s sync wrapper, also traced inside this machinery (its suppression lifted for the call)."""
        sync = call_span.sync
        key = self.key
        suppress = SUPPRESS_INSTRUMENTATION_KEY

        def passthrough(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            current = _get_current()
            if not current.get(key):
                return sync(wrapped, instance, args, kwargs)
            token = _attach(Context({k: v for k, v in current.items() if k is not key and k is not suppress}))
            try:
                return sync(wrapped, instance, args, kwargs)
            finally:
                _detach(token)

        return passthrough


def new_trace(values_for: Callable[[Any, Tuple[Any, ...], Dict[str, Any]], Dict[Any, Any]], site: str) -> Callable[..., Any]:
    """A wrapper (for :meth:`Instrumentor.wrap`): each call runs in a new, empty context.

    What is current at the call is not the parent of what it publishes (a
    scheduler's tick publishes new traces). The context holds only
    ``values_for(instance, args, kwargs)`` (context key -> value, read by the
    spans started inside).
    """

    def fresh(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            token = _attach(Context(values_for(instance, args, kwargs)))
        except Exception:
            internal_error(site)
            return wrapped(*args, **kwargs)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _detach(token)

    return fresh
