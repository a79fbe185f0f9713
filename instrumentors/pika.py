"""pika 1.x (RabbitMQ): a PRODUCER span per publish, a CONSUMER span per message processed.

What is wrapped (at class level, when ``pika.channel`` / ``pika.adapters.blocking_connection`` are imported):

* ``BlockingChannel.basic_publish`` and ``Channel.basic_publish`` (every async
  adapter): PRODUCER ``publish {exchange or routing key}``. The trace context
  goes into the headers of a *copy* of the caller's ``BasicProperties`` (the
  caller's object and headers are never modified). The blocking channel's
  call to the inner channel adds no second span.
* ``basic_consume`` (both classes): the callback is wrapped when registered;
  each call is a CONSUMER ``process {queue}``, child of the producer's span.
  ``Channel.basic_get``'s callback likewise.
* ``BlockingChannel.basic_get``: a CONSUMER ``receive {queue}`` marking the
  message's arrival (child of the producer's span; the processing after the
  call is not pika's to see).
* ``BlockingChannel.consume``: each message yielded gets a CONSUMER
  ``process {queue}``, current from the yield until the next ``next()`` (or the
  generator's close).

Attributes: the stable messaging conventions (``messaging.system=rabbitmq``,
destination, routing key, operation, message id, body size, server address);
the body is never recorded. Celery's RabbitMQ transport is kombu/py-amqp, not
pika: nothing here runs under Celery.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from opentelemetry import context as otel_context

from autotrace.kit import PRODUCER, CallSpan, Instrumentor, Plan, arg, guard, replace_arg
from autotrace.messaging import BODY_SIZE, MESSAGE_ID, PROCESS, RECEIVE, SEND, ConsumerCall, consumer_parent
from autotrace.messaging import body_size, message_attributes, span_name, start_consumer_span

ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
#: Set while a publish span is current: the blocking channel's inner channel adds no second one.
_PUBLISHING = otel_context.create_key("autotrace-pika-publish")
_BLOCKING = "pika.adapters.blocking_connection"
#: Attribute sets cached per channel (destinations are few; a program publishing to many stays bounded).
_CACHE_LIMIT = 256


def _attributes(
    channel: Any, operation: str, destination: Any, routing_key: Any, properties: Any, body: Any, method: Any = None
) -> Dict[str, Any]:
    """The span's attributes; the part fixed per channel, operation and destination is built once."""
    channel = getattr(channel, "_impl", channel)  # a BlockingChannel's pika.channel.Channel
    cache = channel.__dict__.setdefault("_autotrace_pika", {})
    base = cache.get((operation, destination, routing_key))
    if base is None:
        params = getattr(getattr(channel, "connection", None), "params", None)
        base = message_attributes(
            "rabbitmq", operation, "publish" if operation == SEND else operation, destination,
            server_address=getattr(params, "host", None), server_port=getattr(params, "port", None),
        )
        if routing_key:
            base[ROUTING_KEY] = str(routing_key)
        if len(cache) < _CACHE_LIMIT:
            cache[(operation, destination, routing_key)] = base
    attrs = base.copy()
    if getattr(properties, "message_id", None):
        attrs[MESSAGE_ID] = str(properties.message_id)
    size = body_size(body)  # bytes, or str (pika encodes it as UTF-8)
    if size is not None:
        attrs[BODY_SIZE] = size
    if getattr(method, "delivery_tag", None) is not None:
        attrs[DELIVERY_TAG] = method.delivery_tag
    return attrs


def _consumer_attributes(facts: Tuple[Any, Any, str], method: Any, properties: Any, body: Any) -> Dict[str, Any]:
    return _attributes(facts[1], facts[2], facts[0], getattr(method, "routing_key", None), properties, body, method)


def _over(pending: Any) -> None:
    """The processing of the message ``pending`` traces is over: no longer current, ended."""
    if pending is not None:
        pending.leave()
        pending.end()


class PikaInstrumentor(Instrumentor):
    name = "pika"
    distribution = "pika"
    supported = ">=1.0,<2"
    covers = ("pika",)
    modules = ("pika.channel", _BLOCKING)

    def __init__(self) -> None:
        super().__init__()
        self._publish = CallSpan(self, self._describe_publish, PRODUCER, suppress=_PUBLISHING, site="pika.publish")
        self._process = ConsumerCall(self, self._describe_process, site="pika.process")

    def _describe_publish(self, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        exchange, routing_key = arg(args, kwargs, 0, "exchange"), arg(args, kwargs, 1, "routing_key")
        properties = arg(args, kwargs, 3, "properties")
        duplicate = self._properties()  # the caller's properties (and headers) stay as they are
        duplicate.__dict__.update(getattr(properties, "__dict__", ()))
        duplicate.headers = dict(properties.headers) if properties is not None and properties.headers else {}
        args, kwargs = replace_arg(args, kwargs, 3, "properties", duplicate)
        destination = exchange or routing_key
        attrs = _attributes(instance, SEND, destination, routing_key, properties, arg(args, kwargs, 2, "body"))
        return Plan(span_name("publish", destination), attrs, carrier=duplicate.headers, args=args, kwargs=kwargs)

    def _describe_process(self, facts: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        _, method, properties, body = args
        parent, links = consumer_parent(getattr(properties, "headers", None))
        return Plan(span_name(PROCESS, facts[0]), _consumer_attributes(facts, method, properties, body), parent, links)

    def _callback(self, index: int, name: str) -> Any:
        """A wrapper of ``basic_consume`` / ``basic_get``: the callback is traced (not pika's own)."""

        def register(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            callback = arg(args, kwargs, index, name)
            with guard("pika.register"):
                if callable(callback) and type(getattr(callback, "__self__", None)).__module__ != _BLOCKING:
                    process, facts = self._process.sync, (arg(args, kwargs, 0, "queue"), instance, PROCESS)
                    traced = lambda *args, **kwargs: process(callback, facts, args, kwargs)  # noqa: E731
                    args, kwargs = replace_arg(args, kwargs, index, name, traced)
            return wrapped(*args, **kwargs)

        return register

    def _received(self, facts: Tuple[Any, Any, str], item: Any) -> Any:
        """The CONSUMER span of a ``(method, properties, body)`` returned by pika; None for an empty one."""
        method, properties, body = item
        if method is None:
            return None
        attrs = _consumer_attributes(facts, method, properties, body)
        return start_consumer_span(self, span_name(facts[2], facts[0]), attrs, properties.headers)

    def _get(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        result = wrapped(*args, **kwargs)
        with guard("pika.get"):
            _over(self._received((arg(args, kwargs, 0, "queue"), instance, RECEIVE), result))
        return result

    def _consume(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        return self._messages(wrapped(*args, **kwargs), (arg(args, kwargs, 0, "queue"), instance, PROCESS))

    def _messages(self, generator: Any, facts: Tuple[Any, Any, str]) -> Any:
        """Each message yielded is processed under its CONSUMER span, until the next ``next()`` or close.

        (A per-message iterator is what :mod:`autotrace.messaging` should offer; kept here meanwhile.)
        """
        pending = None
        try:
            for item in generator:
                _over(pending)
                pending = None
                with guard("pika.consume"):
                    pending = self._received(facts, item)
                    if pending is not None:
                        pending.enter()
                yield item
        finally:
            _over(pending)

    def patch_module(self, module_name: str, module: Any) -> None:
        from pika.spec import BasicProperties

        self._properties = BasicProperties
        cls = "BlockingChannel" if module_name == _BLOCKING else "Channel"
        self.wrap(module, cls + ".basic_publish", self._publish)
        self.wrap(module, cls + ".basic_consume", self._callback(1, "on_message_callback"))
        if module_name == _BLOCKING:
            self.wrap(module, "BlockingChannel.basic_get", self._get)
            self.wrap(module, "BlockingChannel.consume", self._consume)
        else:
            self.wrap(module, "Channel.basic_get", self._callback(1, "callback"))


__all__ = ["PikaInstrumentor"]
