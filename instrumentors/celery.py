"""Celery 5.x: a PRODUCER span per published task message, a CONSUMER span per execution.

What is wrapped (at class level, each module when it is first imported):

* ``celery.app.base``: ``Celery.send_task`` -- the one funnel of every publish
  (``apply_async``, ``delay``, ``send_task``, canvas primitives, retries,
  callbacks, chord bodies, beat). The PRODUCER span ``publish {task}`` is
  current during the call and everything under it (routing, the result
  backend's subscription, the broker write) is suppressed.
  ``Celery._get_backend``: the result backend's class gets its I/O methods
  (``store_result``, ``mark_as_*``, ``get_task_meta``, ``wait_for_pending``,
  ``on_chord_part_return``, ...) run suppressed: no spans from bookkeeping
  and none from ``AsyncResult.get()``.
* ``celery.app.amqp``: ``AMQP._create_task_sender`` -- the task sender it
  returns injects the trace context (global propagator) into the message
  headers and records the destination on the PRODUCER span.
* ``celery.app.task``: ``Task.__trace__`` becomes a data descriptor that wraps
  each tracer Celery builds (worker main process, prefork children, solo and
  threads pools) with the CONSUMER span ``process {task}``; ``Task.apply``
  (eager execution, ``task_always_eager``) gets a CONSUMER span too.
* ``celery.worker.worker``: ``WorkController.start/stop/terminate`` run
  suppressed (polling, heartbeats, mingle/gossip, unacked restores), so the
  worker makes no root spans of its own; task execution starts from a fresh
  context (extracted from the message), so the task's own calls are traced.
* ``celery.worker.request``: ``Request._announce_revoked`` -- revoked,
  expired and terminated tasks get a CONSUMER span with ``celery.state``.
* ``celery.app.control``: broadcast/purge/election run suppressed.
* ``celery.beat``: ``Service.start`` runs suppressed; ``Scheduler.apply_async``
  starts from an empty context, so each scheduled publish is a root PRODUCER.
* ``billiard.pool``: ``Worker._do_exit`` flushes the spans (bounded) before a
  pool child leaves with ``os._exit`` (``--max-tasks-per-child``).

Suppression by Celery's own machinery (:class:`autotrace.messaging.Machinery`)
still lets publishes and eager executions made inside it be traced (a chord
body published by the backend, an errback), as children of the current span.
The spans are the kit's (:class:`autotrace.kit.CallSpan` for publish and eager
execution, :class:`autotrace.messaging.ConsumerCall` for worker execution).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from opentelemetry import context as otel_context

from autotrace.config import env
from autotrace.kit import (
    CONSUMER,
    PRODUCER,
    CallSpan,
    Instrumentor,
    Plan,
    Suppress,
    arg,
    guard,
    guarded,
    inject,
    record_error,
    set_attributes,
)
from autotrace.messaging import (
    DESTINATION,
    MESSAGE_ID,
    ConsumerCall,
    Machinery,
    consumer_attributes,
    consumer_parent,
    inject_headers,
    new_trace,
    producer_attributes,
    span_name,
    start_consumer_span,
)

LINK_ONLY_ENV = "AUTOTRACE_CELERY_LINK_ONLY"

_get_current = otel_context.get_current

#: Celery's own machinery: suppressed, its publishes and eager executions still traced.
_MACHINERY = Machinery("celery")
#: In the context of a publish in progress: the facts the task sender adds to its PRODUCER span.
_PUBLISH_KEY = otel_context.create_key("autotrace-celery-publish")
#: The beat schedule entry being applied.
_BEAT_KEY = otel_context.create_key("autotrace-celery-beat")

TASK_NAME = "celery.task.name"
RETRY_COUNT = "celery.retry.count"
STATE = "celery.state"
BEAT_ENTRY = "celery.beat.entry"
REVOKE_REASON = "celery.revoked.reason"

#: Broker URL scheme -> ``messaging.system``.
_SYSTEMS = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "pyamqp": "rabbitmq",
    "librabbitmq": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "sentinel": "redis",
    "sqs": "aws_sqs",
    "azureservicebus": "servicebus",
    "gcpubsub": "gcp_pubsub",
    "confluentkafka": "kafka",
}

#: Result-backend methods that talk to the backend's store; run as machinery.
_BACKEND_METHODS = (
    "store_result",
    "mark_as_started",
    "mark_as_done",
    "mark_as_failure",
    "mark_as_retry",
    "mark_as_revoked",
    "forget",
    "get_task_meta",
    "get_state",
    "get_status",
    "get_result",
    "get_traceback",
    "get_children",
    "get_many",
    "wait_for_pending",
    "wait_for",
    "iter_native",
    "save_group",
    "restore_group",
    "delete_group",
    "on_task_call",
    "on_chord_part_return",
    "apply_chord",
    "set_chord_size",
    "add_to_chord",
    "fallback_chord_unlock",
    "process_cleanup",
    "cleanup",
    "add_pending_result",
    "remove_pending_result",
    "reload_task_result",
    "reload_group_result",
)

_CACHE_LIMIT = 1024


def _system_for(app: Any) -> str:
    """``messaging.system`` from the app's broker URL (the broker is the messaging system)."""
    url = None
    with guard("celery.system"):
        url = app.conf.broker_url
    if not isinstance(url, str) or not url:
        return "rabbitmq"  # Celery's default broker is amqp://
    scheme = url.split(";", 1)[0].split("://", 1)[0].strip().lower()
    scheme = scheme.split("+", 1)[0]
    return _SYSTEMS.get(scheme, scheme or "rabbitmq")


def _destination(routing_key: Any, queue: Any, exchange: Any) -> Optional[str]:
    if queue is not None:
        name = queue if isinstance(queue, str) else getattr(queue, "name", None)
        if name:
            return str(name)
    if routing_key:
        return str(routing_key)
    if exchange:
        name = exchange if isinstance(exchange, str) else getattr(exchange, "name", None)
        if name:
            return str(name)
    return None


def _delivered_to(carrier: Dict[str, Any]) -> Optional[str]:
    """The destination a worker's request came from (its ``delivery_info``)."""
    delivery = carrier.get("delivery_info")
    return _destination(delivery.get("routing_key"), None, delivery.get("exchange")) if delivery else None


# --------------------------------------------------------------------------
# The consumer side


class _TraceSlot:
    """Replaces ``Task.__trace__``: every tracer Celery stores there is wrapped once.

    The raw tracer stays in the instance ``__dict__`` under ``__trace__`` (what
    Celery would have had), so removing this descriptor restores everything.
    """

    def __init__(self, instrumentor: "CeleryInstrumentor") -> None:
        self.instrumentor = instrumentor

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return None
        namespace = obj.__dict__
        traced = namespace.get("_autotrace_trace")
        if traced is not None:
            return traced
        return namespace.get("__trace__")

    def __set__(self, obj: Any, value: Any) -> None:
        namespace = obj.__dict__
        namespace["__trace__"] = value
        traced = None
        if value is not None:
            with guard("celery.tracer"):
                traced = self.instrumentor._traced_tracer(obj, value)
        namespace["_autotrace_trace"] = traced

    def __delete__(self, obj: Any) -> None:
        obj.__dict__.pop("__trace__", None)
        obj.__dict__.pop("_autotrace_trace", None)


class CeleryInstrumentor(Instrumentor):
    name = "celery"
    distribution = "celery"
    supported = ">=5.0,<6"
    covers = ("celery",)
    modules = (
        "celery.app.base",
        "celery.app.amqp",
        "celery.app.task",
        "celery.app.control",
        "celery.worker.worker",
        "celery.worker.request",
        "celery.beat",
        "billiard.pool",
    )

    def __init__(self) -> None:
        super().__init__()
        self.link_only = False
        self._publish_attrs: Dict[Tuple[Any, str], Tuple[str, Dict[str, Any]]] = {}
        self._patched_backends: set = set()
        self._task_class: Any = None
        self._task_trace_original: Any = None
        self._configured = False
        publish = CallSpan(self, self._describe_publish, PRODUCER, Suppress.ALL, _finish_publish, _record_publish, site="celery.publish")
        apply = CallSpan(self, self._describe_apply, CONSUMER, finish=_finish_apply, record=_record_apply, site="celery.apply")
        self._send_task = _MACHINERY.through(publish)
        self._apply = _MACHINERY.through(apply)
        self._consume = ConsumerCall(self, self._describe_consume, _finish_consume, _record_consume, site="celery.consume")
        self._beat_apply_async = new_trace(_beat_values, "celery.beat")
        # One wrapper object per target: patching a module twice adds no second layer.
        self._get_backend = self._get_backend
        self._announce_revoked = self._announce_revoked

    # -- patching -------------------------------------------------------------
    def _configure(self) -> None:
        if not self._configured:
            self.link_only = env().flag(LINK_ONLY_ENV, False)
            self._configured = True

    def patch_module(self, module_name: str, module: Any) -> None:
        self._configure()
        run_internal = _MACHINERY.run
        if module_name == "celery.app.base":
            self.wrap(module, "Celery.send_task", self._send_task)
            self.wrap(module, "Celery._get_backend", self._get_backend)
            self._patch_known_backends()
        elif module_name == "celery.app.amqp":
            self.wrap(module, "AMQP._create_task_sender", _create_task_sender)
        elif module_name == "celery.app.task":
            task_class = module.Task
            if not isinstance(task_class.__dict__.get("__trace__"), _TraceSlot):
                self._task_class = task_class
                self._task_trace_original = task_class.__dict__.get("__trace__")
                task_class.__trace__ = _TraceSlot(self)
            self.wrap(module, "Task.apply", self._apply)
        elif module_name == "celery.app.control":
            for method in ("broadcast", "purge", "discard_all", "election"):
                self.wrap(module, "Control." + method, run_internal)
        elif module_name == "celery.worker.worker":
            for method in ("start", "stop", "terminate"):
                self.wrap(module, "WorkController." + method, run_internal)
        elif module_name == "celery.worker.request":
            self.wrap(module, "Request._announce_revoked", self._announce_revoked)
        elif module_name == "celery.beat":
            self.wrap(module, "Service.start", run_internal)
            self.wrap(module, "Service.sync", run_internal)
            self.wrap(module, "Scheduler.apply_async", self._beat_apply_async)
        elif module_name == "billiard.pool":
            self.wrap(module, "Worker._do_exit", _child_exit)

    def unpatch_extra(self) -> None:
        if self._task_class is not None:
            if isinstance(self._task_class.__dict__.get("__trace__"), _TraceSlot):
                self._task_class.__trace__ = self._task_trace_original
            self._task_class = None
        self._patched_backends.clear()
        self._publish_attrs.clear()

    # -- publish ----------------------------------------------------------------
    def _publish_base(self, app: Any, name: str) -> Tuple[str, Dict[str, Any]]:
        key = (app, name)
        cached = self._publish_attrs.get(key)
        if cached is None:
            if len(self._publish_attrs) >= _CACHE_LIMIT:
                self._publish_attrs.clear()
            attributes = producer_attributes(_system_for(app))
            attributes[TASK_NAME] = name
            cached = self._publish_attrs[key] = (span_name("publish", name), attributes)
        return cached

    def _describe_publish(self, app: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Plan:
        """``Celery.send_task``: the PRODUCER span; the routing and broker write inside are machinery.

        The task sender, called inside, puts what routing decided (the
        destination) into ``facts``: they reach the span when the call ends.
        """
        name, base = self._publish_base(app, str(args[0] if args else kwargs["name"]))
        attributes = _call_attributes(base, kwargs)
        current = _get_current()
        beat = current.get(_BEAT_KEY)
        if beat is not None:
            attributes[BEAT_ENTRY] = beat
        facts: Dict[str, Any] = {}
        parent = _MACHINERY.context(current, {_PUBLISH_KEY: facts}, _BEAT_KEY)
        # Positional: a third cheaper than by keyword, on the hot path (parent, links, carrier, args, kwargs, state).
        return Plan(name, attributes, parent, None, None, None, None, (MESSAGE_ID in attributes, facts))

    # -- consume --------------------------------------------------------------------
    def _consume_base(self, task: Any) -> Tuple[str, Dict[str, Any]]:
        name = str(getattr(task, "name", None) or type(task).__name__)
        app = None
        with guard("celery.app"):
            app = task._get_app()
        attributes = consumer_attributes(_system_for(app) if app is not None else "rabbitmq")
        attributes[TASK_NAME] = name
        return span_name("process", name), attributes

    def _traced_tracer(self, task: Any, tracer_fn: Callable[..., Any]) -> Callable[..., Any]:
        facts = self._consume_base(task)
        consume = self._consume.sync

        def traced_task(*args: Any, **kwargs: Any) -> Any:
            return consume(tracer_fn, facts, args, kwargs)

        traced_task.__wrapped__ = tracer_fn  # type: ignore[attr-defined]
        return traced_task

    def _describe_consume(self, facts: Tuple[str, Dict[str, Any]], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Plan:
        """A tracer's call ``(uuid, args, kwargs, request)``: the request dict is the message's headers."""
        task_id = args[0] if args else kwargs.get("uuid")
        request = args[3] if len(args) > 3 else kwargs.get("request")
        carrier = request if isinstance(request, dict) else {}
        parent, links = consumer_parent(carrier, self.link_only)
        attributes = dict(facts[1])
        if task_id:
            attributes[MESSAGE_ID] = str(task_id)
        retries = carrier.get("retries")
        if retries:
            attributes[RETRY_COUNT] = retries
        destination = _delivered_to(carrier)
        if destination:
            attributes[DESTINATION] = destination
        return Plan(facts[0], attributes, parent, links)

    def _announce_revoked(self, wrapped: Callable[..., Any], request: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """A revoked/expired/terminated task: a CONSUMER span with the state, ended at once."""
        result = wrapped(*args, **kwargs)
        with guard("celery.revoked"):
            reason = arg(args, kwargs, 0, "reason")
            headers = getattr(request, "_request_dict", None)
            carrier = headers if isinstance(headers, dict) else {}
            task = getattr(request, "task", None)
            name, base = self._consume_base(task) if task is not None else ("process " + str(request.name), {})
            attributes = dict(base)
            attributes[MESSAGE_ID] = str(request.id)
            attributes[STATE] = "REVOKED"
            if reason:
                attributes[REVOKE_REASON] = str(reason)
            destination = _delivered_to(carrier)
            if destination:
                attributes[DESTINATION] = destination
            start_consumer_span(self, name, attributes, carrier, link_only=self.link_only).end()
        return result

    # -- eager ------------------------------------------------------------------------
    def _describe_apply(self, task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[str, Dict[str, Any], Any]:
        """``Task.apply`` (eager): a CONSUMER span in the current trace; its state is the task id given."""
        name, base = self._consume_base(task)
        return name, _call_attributes(base, kwargs), kwargs.get("task_id")

    # -- backends ---------------------------------------------------------------------
    def _get_backend(self, wrapped: Callable[..., Any], app: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        backend = wrapped(*args, **kwargs)
        with guard("celery.backend"):
            self._patch_backend_class(type(backend))
        return backend

    def _patch_backend_class(self, cls: type) -> None:
        """Run the store's I/O methods on ``cls`` and its bases as machinery, each definition once."""
        for klass in cls.__mro__:
            if klass is object or klass in self._patched_backends:
                continue
            self._patched_backends.add(klass)
            namespace = klass.__dict__
            for method in _BACKEND_METHODS:
                if method in namespace:
                    self.wrap(klass, method, _MACHINERY.run)

    def _patch_known_backends(self) -> None:
        """Backend classes already defined (a backend may have been built before patching)."""
        with guard("celery.backend"):
            from celery.backends.base import BaseBackend

            pending = [BaseBackend]
            while pending:
                cls = pending.pop()
                self._patch_backend_class(cls)
                pending.extend(cls.__subclasses__())


# --------------------------------------------------------------------------
# Wrappers and hooks


def _create_task_sender(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """``AMQP._create_task_sender``: the task sender it returns is wrapped (:func:`_traced_sender`)."""
    return _traced_sender(wrapped(*args, **kwargs))


def _traced_sender(send_task_message: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the task sender closure: inject the context, record the destination."""

    def send_task_message_traced(producer: Any, name: Any, message: Any, *args: Any, **kwargs: Any) -> Any:
        current = _get_current()
        facts = current.get(_PUBLISH_KEY)
        if facts is not None:
            _prepare_message(current, facts, message, kwargs)
        return send_task_message(producer, name, message, *args, **kwargs)

    send_task_message_traced.__wrapped__ = send_task_message  # type: ignore[attr-defined]
    return send_task_message_traced


@guarded("celery.inject")
def _prepare_message(current: Any, facts: Dict[str, Any], message: Any, kwargs: Dict[str, Any]) -> None:
    """The trace context into the message headers (Celery's own dict), the routed destination into ``facts``."""
    inject(message[0], current)
    extra = kwargs.get("headers")
    if extra:  # explicit headers win in Celery; ours must reach the worker
        kwargs["headers"] = inject_headers(extra, current)
    destination = _destination(kwargs.get("routing_key"), kwargs.get("queue"), kwargs.get("exchange"))
    if destination:
        facts[DESTINATION] = destination


def _finish_publish(span: Any, result: Any, state: Tuple[bool, Dict[str, Any]]) -> None:
    given, facts = state
    if not given:
        result_id = getattr(result, "id", None)
        if result_id:
            facts[MESSAGE_ID] = str(result_id)
    if facts:
        set_attributes(span, facts)


def _record_publish(span: Any, exc: BaseException, state: Tuple[bool, Dict[str, Any]]) -> None:
    if state[1]:
        set_attributes(span, state[1])
    record_error(span, exc)


def _beat_values(scheduler: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[Any, Any]:
    """``Scheduler.apply_async(entry)``: each scheduled publish a root PRODUCER span, with the entry's name."""
    return {_BEAT_KEY: str(getattr(arg(args, kwargs, 0, "entry"), "name", "") or "")}


def _child_exit(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """A pool child is about to ``os._exit``: flush its spans first (bounded)."""
    _flush()
    return wrapped(*args, **kwargs)


@guarded("celery.child_exit")
def _flush() -> None:
    from autotrace import tracing

    tracing.shutdown()


def _call_attributes(base: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The cached per-task attributes plus this call's task id and retry count."""
    attributes = dict(base)
    task_id = kwargs.get("task_id")
    if task_id:
        attributes[MESSAGE_ID] = str(task_id)
    retries = kwargs.get("retries")
    if retries:
        attributes[RETRY_COUNT] = retries
    return attributes


def _settle(span: Any, state: Optional[str], failure: Optional[BaseException], attributes: Optional[Dict[str, Any]] = None) -> None:
    """``celery.state`` (and ``attributes``) on the span; ``failure`` recorded as its error."""
    attributes = attributes or {}
    if state:
        attributes[STATE] = str(state)
    if attributes:
        set_attributes(span, attributes)
    if failure is not None:
        record_error(span, failure)


def _finish_consume(span: Any, result: Any, state: Any) -> None:
    """The tracer's ``(retval, info, runtime, retstr)``: the task's state, its failure."""
    status, failure = "SUCCESS", None
    info = result[1]
    if info is not None:
        status = info.state
        if status == "FAILURE" and isinstance(info.retval, BaseException):
            failure = info.retval
        elif status == "RETRY" and span.is_recording():
            span.add_event("celery.retry", {"celery.retry.reason": str(info.retval)[:1024]})
    _settle(span, status, failure)


def _record_consume(span: Any, exc: BaseException, state: Any) -> None:
    """The tracer raised: ``Reject`` (the task asked to be rejected) is no error."""
    rejected = type(exc).__name__ == "Reject"
    _settle(span, "REJECTED" if rejected else "FAILURE", None if rejected else exc)


def _finish_apply(span: Any, result: Any, task_id: Any) -> None:
    """The ``EagerResult``: its state, its id (when Celery made it), its failure."""
    status, failure, attributes = getattr(result, "state", None), None, {}
    if task_id is None:
        result_id = getattr(result, "id", None)
        if result_id:
            attributes[MESSAGE_ID] = str(result_id)
    if status == "FAILURE":
        error = getattr(result, "result", None)
        if isinstance(error, BaseException):
            failure = error
    _settle(span, status, failure, attributes)


def _record_apply(span: Any, exc: BaseException, state: Any) -> None:
    _settle(span, "FAILURE", exc)
