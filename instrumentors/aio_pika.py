"""aio-pika 9.x / 10.x (RabbitMQ on asyncio): a PRODUCER span per publish, a CONSUMER span per message processed.

What is wrapped (at class level, when ``aio_pika.exchange`` / ``.queue`` / ``.robust_queue`` are imported):

* ``Exchange.publish``: PRODUCER ``publish {exchange or routing key}`` around
  the awaited publish (confirmation included). The trace context goes into the
  headers of a *copy* of the caller's ``Message`` (the caller's message and
  headers dict are never modified).
* ``Queue.consume``: the callback is wrapped when registered; each call is a
  CONSUMER ``process {queue}``, child of the producer's span (a
  ``RobustQueue`` re-registers the original callback on reconnection, wrapped
  again then). The queue iterator's own callback is not traced.
* ``QueueIterator.__anext__`` / ``RobustQueueIterator.__anext__``: each
  message returned gets a CONSUMER ``process {queue}``, current until the next
  ``__anext__`` or ``close()`` (``async with queue.iterator()`` closes it).
* ``Queue.get``: a CONSUMER ``receive {queue}`` marking the message's arrival
  (child of the producer's span), as pika's ``basic_get``.

Attributes as :mod:`autotrace.instrumentors.pika`; the body is never recorded.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

from autotrace.kit import CONSUMER, PRODUCER, CallSpan, Instrumentor, Plan, arg, guard, hold, held, release, replace_arg
from autotrace.kit import start_server_span
from autotrace.messaging import PROCESS, RECEIVE, SEND, ConsumerCall, consumer_parent, message_attributes, span_name

ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
#: The queue iterators' own callbacks (each message is traced when the iterator returns it).
_ITERATORS = ("QueueIterator", "RobustQueueIterator")


def _attributes(channel: Any, operation: str, destination: Any, routing_key: Any, message: Any) -> Dict[str, Any]:
    url = getattr(getattr(channel, "_connection", None), "url", None)
    attrs = message_attributes(
        "rabbitmq", operation, "publish" if operation == SEND else operation, destination,
        getattr(message, "message_id", None), getattr(message, "body_size", None),
        server_address=getattr(url, "host", None), server_port=getattr(url, "port", None),
    )
    if routing_key:
        attrs[ROUTING_KEY] = str(routing_key)
    tag = getattr(message, "delivery_tag", None)
    if tag is not None:
        attrs[DELIVERY_TAG] = tag
    return attrs


def _consumer_plan(queue: Any, message: Any, operation: str = PROCESS) -> Plan:
    attrs = _attributes(queue.channel, operation, queue.name, message.routing_key, message)
    parent, links = consumer_parent(message.headers)
    return Plan(span_name(operation, queue.name), attrs, parent, links)


class AioPikaInstrumentor(Instrumentor):
    name = "aio_pika"
    distribution = "aio-pika"
    supported = ">=9,<11"
    covers = ("aio-pika",)
    modules = ("aio_pika.exchange", "aio_pika.queue", "aio_pika.robust_queue")

    def __init__(self) -> None:
        super().__init__()
        self._publish = CallSpan(self, self._describe_publish, PRODUCER, site="aio_pika.publish")
        describe = lambda queue, args, kwargs: _consumer_plan(queue, args[0])  # noqa: E731
        self._process = ConsumerCall(self, describe, site="aio_pika.process")

    def _describe_publish(self, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        message, routing_key = arg(args, kwargs, 0, "message"), arg(args, kwargs, 1, "routing_key")
        duplicate = copy.copy(message)
        duplicate.headers = dict(message.headers or {})
        args, kwargs = replace_arg(args, kwargs, 0, "message", duplicate)
        destination = instance.name or routing_key
        attrs = _attributes(instance.channel, SEND, destination, routing_key, message)
        return Plan(span_name("publish", destination), attrs, carrier=duplicate.headers, args=args, kwargs=kwargs)

    def _consume(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        callback = arg(args, kwargs, 0, "callback")
        with guard("aio_pika.consume"):
            if callable(callback) and type(getattr(callback, "__self__", None)).__name__ not in _ITERATORS:
                from aio_pika.tools import ensure_awaitable

                process, handler = self._process.async_, ensure_awaitable(callback)

                async def traced(message: Any) -> Any:
                    return await process(handler, instance, (message,), {})

                args, kwargs = replace_arg(args, kwargs, 0, "callback", traced)
        return wrapped(*args, **kwargs)

    async def _get(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        message = await wrapped(*args, **kwargs)
        with guard("aio_pika.get"):
            if message is not None:
                self._start(_consumer_plan(instance, message, RECEIVE)).end()
        return message

    async def _next(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        self._done(instance)
        message = await wrapped(*args, **kwargs)
        with guard("aio_pika.iterator"):
            pending = self._start(_consumer_plan(instance._amqp_queue, message))
            pending.enter()
            hold(instance, pending)
        return message

    def _start(self, plan: Plan) -> Any:
        return start_server_span(self, plan.name, plan.attributes, kind=CONSUMER, parent=plan.parent, links=plan.links)

    def _done(self, iterator: Any) -> None:
        """End the span of the message the iterator returned last (its processing is over)."""
        pending = held(iterator)
        if pending is not None:
            pending.leave()
            release(iterator)

    def _close(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        self._done(instance)
        return wrapped(*args, **kwargs)

    def patch_module(self, module_name: str, module: Any) -> None:
        if module_name == "aio_pika.exchange":
            self.wrap(module, "Exchange.publish", self._publish)
        elif module_name == "aio_pika.queue":
            self.wrap(module, "Queue.consume", self._consume)
            self.wrap(module, "Queue.get", self._get)
            self.wrap(module, "QueueIterator.__anext__", self._next)
            self.wrap(module, "QueueIterator.close", self._close)
        else:
            self.wrap(module, "RobustQueueIterator.__anext__", self._next)


__all__ = ["AioPikaInstrumentor"]
