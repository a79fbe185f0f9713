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

Suppression by Celery's own machinery ("internal") still lets publishes made
inside it be traced (a chord body published by the backend, an errback), as
children of the current span.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind

from autotrace._log import error_once
from autotrace.config import env
from autotrace.instrumentation import SUPPRESS_INSTRUMENTATION_KEY, Instrumentor, close_span, guard, inject

LINK_ONLY_ENV = "AUTOTRACE_CELERY_LINK_ONLY"

_PRODUCER = SpanKind.PRODUCER
_CONSUMER = SpanKind.CONSUMER
_get_current = otel_context.get_current
_attach = otel_context.attach
_detach = otel_context.detach
_set_span_in_context = trace.set_span_in_context

#: The PRODUCER span of the publish in progress (read by the task sender).
_PUBLISH_KEY = otel_context.create_key("autotrace-celery-publish")
#: Set with the suppress key by Celery's own machinery: publishes stay traced.
_INTERNAL_KEY = otel_context.create_key("autotrace-celery-internal")
#: The beat schedule entry being applied.
_BEAT_KEY = otel_context.create_key("autotrace-celery-beat")

SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"
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

#: Result-backend methods that talk to the backend's store; run suppressed.
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

try:  # the context key of the current span (stable since API 1.0; stay defensive)
    from opentelemetry.trace.propagation import _SPAN_KEY
except ImportError:  # pragma: no cover
    _SPAN_KEY = None


def _system_for(app: Any) -> str:
    """``messaging.system`` from the app's broker URL (the broker is the messaging system)."""
    url = None
    try:
        url = app.conf.broker_url
    except Exception:
        pass
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


# --------------------------------------------------------------------------
# Suppression of Celery's own machinery


def _internal_context() -> Any:
    ctx = _get_current()
    if ctx.get(_INTERNAL_KEY) and ctx.get(SUPPRESS_INSTRUMENTATION_KEY):
        return None
    values = dict(ctx)
    values[SUPPRESS_INSTRUMENTATION_KEY] = True
    values[_INTERNAL_KEY] = True
    return Context(values)


def _suppressed_generator(generator: Any) -> Any:
    """Iterate ``generator`` with every step suppressed (backends that yield results)."""
    while True:
        token = _attach(otel_context.set_value(_INTERNAL_KEY, True, otel_context.set_value(SUPPRESS_INSTRUMENTATION_KEY, True)))
        try:
            item = next(generator)
        except StopIteration:
            return
        finally:
            _detach(token)
        yield item


def _run_internal(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """wrapt wrapper: run the call as Celery machinery (no spans, publishes still traced)."""
    try:
        ctx = _internal_context()
        token = None if ctx is None else _attach(ctx)
    except Exception:
        error_once("celery.internal", "autotrace: internal error in celery.internal; the program continues")
        return wrapped(*args, **kwargs)
    try:
        result = wrapped(*args, **kwargs)
    finally:
        if token is not None:
            _detach(token)
    if token is not None and inspect.isgenerator(result):
        return _suppressed_generator(result)
    return result


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
            try:
                traced = self.instrumentor._traced_tracer(obj, value)
            except Exception:
                error_once("celery.tracer", "autotrace: internal error in celery.tracer; this task runs untraced")
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

    # -- patching -------------------------------------------------------------
    def _configure(self) -> None:
        if not self._configured:
            self.link_only = env().flag(LINK_ONLY_ENV, False)
            self._configured = True

    def patch_module(self, module_name: str, module: Any) -> None:
        self._configure()
        if module_name == "celery.app.base":
            self.wrap(module, "Celery.send_task", self._send_task)
            self.wrap(module, "Celery._get_backend", self._get_backend)
            self._patch_known_backends()
        elif module_name == "celery.app.amqp":
            self.wrap(module, "AMQP._create_task_sender", self._create_task_sender)
        elif module_name == "celery.app.task":
            task_class = module.Task
            if not isinstance(task_class.__dict__.get("__trace__"), _TraceSlot):
                self._task_class = task_class
                self._task_trace_original = task_class.__dict__.get("__trace__")
                task_class.__trace__ = _TraceSlot(self)
            self.wrap(module, "Task.apply", self._apply)
        elif module_name == "celery.app.control":
            for method in ("broadcast", "purge", "discard_all", "election"):
                self.wrap(module, "Control." + method, _run_internal)
        elif module_name == "celery.worker.worker":
            for method in ("start", "stop", "terminate"):
                self.wrap(module, "WorkController." + method, _run_internal)
        elif module_name == "celery.worker.request":
            self.wrap(module, "Request._announce_revoked", self._announce_revoked)
        elif module_name == "celery.beat":
            self.wrap(module, "Service.start", _run_internal)
            self.wrap(module, "Service.sync", _run_internal)
            self.wrap(module, "Scheduler.apply_async", self._beat_apply_async)
        elif module_name == "billiard.pool":
            self.wrap(module, "Worker._do_exit", self._child_exit)

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
            cached = (
                "publish " + name,
                {
                    SYSTEM: _system_for(app),
                    OPERATION_TYPE: "send",
                    OPERATION_NAME: "publish",
                    TASK_NAME: name,
                },
            )
            self._publish_attrs[key] = cached
        return cached

    def _send_task(self, wrapped: Callable[..., Any], app: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        ctx = _get_current()
        if ctx.get(SUPPRESS_INSTRUMENTATION_KEY) and not ctx.get(_INTERNAL_KEY):
            return wrapped(*args, **kwargs)
        try:
            name = args[0] if args else kwargs["name"]
            span_name, base = self._publish_base(app, str(name))
            attributes = _call_attributes(base, kwargs)
            beat = ctx.get(_BEAT_KEY)
            if beat is not None:
                attributes[BEAT_ENTRY] = beat
            span = self.tracer.start_span(span_name, context=ctx, kind=_PRODUCER, attributes=attributes)
            values = dict(ctx)
            if _SPAN_KEY is not None:
                values[_SPAN_KEY] = span
            else:  # pragma: no cover
                values = dict(_set_span_in_context(span, ctx))
            values[SUPPRESS_INSTRUMENTATION_KEY] = True
            values[_INTERNAL_KEY] = True
            values[_PUBLISH_KEY] = span
            values.pop(_BEAT_KEY, None)
            token = _attach(Context(values))
        except Exception:
            error_once("celery.publish", "autotrace: internal error in celery.publish; the program continues, this call may be untraced")
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            self._end(span, token, exc)
            raise
        try:
            if MESSAGE_ID not in attributes and span.is_recording():
                result_id = getattr(result, "id", None)
                if result_id:
                    span.set_attribute(MESSAGE_ID, str(result_id))
        except Exception:
            error_once("celery.publish.end", "autotrace: internal error in celery.publish.end")
        self._end(span, token, None)
        return result

    @staticmethod
    def _end(span: Any, token: Any, exc: Optional[BaseException]) -> None:
        close_span(span, token, "celery.end", exc)

    def _create_task_sender(self, wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        send_task_message = wrapped(*args, **kwargs)
        try:
            return _traced_sender(send_task_message)
        except Exception:  # pragma: no cover - building a closure
            return send_task_message

    # -- consume --------------------------------------------------------------------
    def _consume_base(self, task: Any) -> Tuple[str, Dict[str, Any]]:
        name = str(getattr(task, "name", None) or type(task).__name__)
        app = None
        try:
            app = task._get_app()
        except Exception:
            pass
        return (
            "process " + name,
            {
                SYSTEM: _system_for(app) if app is not None else "rabbitmq",
                OPERATION_TYPE: "process",
                OPERATION_NAME: "process",
                TASK_NAME: name,
            },
        )

    def _traced_tracer(self, task: Any, tracer_fn: Callable[..., Any]) -> Callable[..., Any]:
        span_name, base = self._consume_base(task)
        start = self._start_consume
        finish = _finish_consume

        def traced_task(*args: Any, **kwargs: Any) -> Any:
            try:
                request = args[3] if len(args) > 3 else kwargs.get("request")
                span, token = start(span_name, base, args[0] if args else kwargs.get("uuid"), request)
            except Exception:
                error_once("celery.consume", "autotrace: internal error in celery.consume; this task runs untraced")
                return tracer_fn(*args, **kwargs)
            try:
                result = tracer_fn(*args, **kwargs)
            except BaseException as exc:
                finish(span, token, None, exc)
                raise
            finish(span, token, result, None)
            return result

        traced_task.__wrapped__ = tracer_fn  # type: ignore[attr-defined]
        return traced_task

    def _start_consume(self, span_name: str, base: Dict[str, Any], task_id: Any, request: Any) -> Tuple[Any, Any]:
        carrier = request if isinstance(request, dict) else {}
        parent = propagate.extract(carrier, context=Context())
        attributes = dict(base)
        if task_id:
            attributes[MESSAGE_ID] = str(task_id)
        retries = carrier.get("retries")
        if retries:
            attributes[RETRY_COUNT] = retries
        delivery = carrier.get("delivery_info")
        if delivery:
            destination = _destination(delivery.get("routing_key"), None, delivery.get("exchange"))
            if destination:
                attributes[DESTINATION] = destination
        span = self._consumer_span(span_name, parent, attributes)
        return span, _attach(_set_span_in_context(span, parent))

    def _consumer_span(self, span_name: str, parent: Any, attributes: Dict[str, Any]) -> Any:
        if self.link_only:
            producer = trace.get_current_span(parent).get_span_context()
            links = [Link(producer)] if producer.is_valid else None
            return self.tracer.start_span(span_name, context=Context(), kind=_CONSUMER, attributes=attributes, links=links)
        return self.tracer.start_span(span_name, context=parent, kind=_CONSUMER, attributes=attributes)

    def _announce_revoked(self, wrapped: Callable[..., Any], request: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """A revoked/expired/terminated task: a CONSUMER span with the state, ended at once."""
        result = wrapped(*args, **kwargs)
        try:
            reason = args[0] if args else kwargs.get("reason")
            headers = getattr(request, "_request_dict", None)
            carrier = headers if isinstance(headers, dict) else {}
            task = getattr(request, "task", None)
            span_name, base = self._consume_base(task) if task is not None else ("process " + str(request.name), {})
            parent = propagate.extract(carrier, context=Context())
            attributes = dict(base)
            attributes[MESSAGE_ID] = str(request.id)
            attributes[STATE] = "REVOKED"
            if reason:
                attributes[REVOKE_REASON] = str(reason)
            delivery = carrier.get("delivery_info") or {}
            destination = _destination(delivery.get("routing_key"), None, delivery.get("exchange"))
            if destination:
                attributes[DESTINATION] = destination
            self._consumer_span(span_name, parent, attributes).end()
        except Exception:
            error_once("celery.revoked", "autotrace: internal error in celery.revoked; the program continues")
        return result

    # -- eager ------------------------------------------------------------------------
    def _apply(self, wrapped: Callable[..., Any], task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        ctx = _get_current()
        if ctx.get(SUPPRESS_INSTRUMENTATION_KEY) and not ctx.get(_INTERNAL_KEY):
            return wrapped(*args, **kwargs)
        try:
            span_name, base = self._consume_base(task)
            attributes = _call_attributes(base, kwargs)
            task_id = kwargs.get("task_id")
            # Baggage and other values carry on; suppression set by Celery machinery does not.
            values = {k: v for k, v in ctx.items() if k is not SUPPRESS_INSTRUMENTATION_KEY and k is not _INTERNAL_KEY}
            span = self.tracer.start_span(span_name, context=ctx, kind=_CONSUMER, attributes=attributes)
            token = _attach(_set_span_in_context(span, Context(values)))
        except Exception:
            error_once("celery.apply", "autotrace: internal error in celery.apply; the program continues, this call may be untraced")
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            _finish_state(span, token, "FAILURE", exc)
            raise
        state, exc = None, None
        try:
            state = getattr(result, "state", None)
            if task_id is None:
                result_id = getattr(result, "id", None)
                if result_id and span.is_recording():
                    span.set_attribute(MESSAGE_ID, str(result_id))
            if state == "FAILURE":
                failure = getattr(result, "result", None)
                if isinstance(failure, BaseException):
                    exc = failure
        except Exception:
            error_once("celery.apply.end", "autotrace: internal error in celery.apply.end")
        _finish_state(span, token, state, exc)
        return result

    # -- beat, backends, children ---------------------------------------------------------
    def _beat_apply_async(self, wrapped: Callable[..., Any], scheduler: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Each scheduled publish starts a new trace (root PRODUCER span)."""
        try:
            entry = args[0] if args else kwargs.get("entry")
            token = _attach(Context({_BEAT_KEY: str(getattr(entry, "name", "") or "")}))
        except Exception:
            error_once("celery.beat", "autotrace: internal error in celery.beat; the program continues")
            return wrapped(*args, **kwargs)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _detach(token)

    def _get_backend(self, wrapped: Callable[..., Any], app: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        backend = wrapped(*args, **kwargs)
        try:
            self._patch_backend_class(type(backend))
        except Exception:
            error_once("celery.backend", "autotrace: internal error in celery.backend; result-backend calls may be traced")
        return backend

    def _patch_backend_class(self, cls: type) -> None:
        """Suppress the store's I/O methods on ``cls`` and its bases, each definition once."""
        for klass in cls.__mro__:
            if klass is object or klass in self._patched_backends:
                continue
            self._patched_backends.add(klass)
            namespace = klass.__dict__
            for method in _BACKEND_METHODS:
                if method in namespace:
                    self.wrap(klass, method, _run_internal)

    def _patch_known_backends(self) -> None:
        """Backend classes already defined (a backend may have been built before patching)."""
        try:
            from celery.backends.base import BaseBackend
        except Exception:
            return
        pending = [BaseBackend]
        while pending:
            cls = pending.pop()
            try:
                self._patch_backend_class(cls)
                pending.extend(cls.__subclasses__())
            except Exception:
                error_once("celery.backend", "autotrace: internal error in celery.backend; result-backend calls may be traced")

    def _child_exit(self, wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """A pool child is about to ``os._exit``: flush its spans first (bounded)."""
        try:
            from autotrace import tracing

            tracing.shutdown()
        except Exception:
            error_once("celery.child_exit", "autotrace: internal error flushing spans in a pool child")
        return wrapped(*args, **kwargs)


def _traced_sender(send_task_message: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the task sender closure: inject the context, record the destination."""

    def send_task_message_traced(producer: Any, name: Any, message: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = _get_current()
        span = ctx.get(_PUBLISH_KEY)
        if span is not None:
            try:
                carrier: Dict[str, str] = {}
                inject(carrier, ctx)
                if carrier:
                    message[0].update(carrier)
                    extra = kwargs.get("headers")
                    if extra:  # explicit headers win in Celery; ours must reach the worker
                        kwargs["headers"] = {**extra, **carrier}
                if span.is_recording():
                    destination = _destination(kwargs.get("routing_key"), kwargs.get("queue"), kwargs.get("exchange"))
                    if destination:
                        span.set_attribute(DESTINATION, destination)
            except Exception:
                error_once("celery.inject", "autotrace: internal error in celery.inject; the program continues")
        return send_task_message(producer, name, message, *args, **kwargs)

    send_task_message_traced.__wrapped__ = send_task_message  # type: ignore[attr-defined]
    return send_task_message_traced


def _finish_consume(span: Any, token: Any, result: Any, exc: Optional[BaseException]) -> None:
    """End the CONSUMER span from the tracer's ``(retval, info, runtime, retstr)``."""
    if exc is not None:
        state = "REJECTED" if type(exc).__name__ == "Reject" else "FAILURE"
        _finish_state(span, token, state, None if state == "REJECTED" else exc)
        return
    state, failure = "SUCCESS", None
    try:
        info = result[1]
        if info is not None:
            state = info.state
            if state == "FAILURE" and isinstance(info.retval, BaseException):
                failure = info.retval
            elif state == "RETRY" and span.is_recording():
                span.add_event("celery.retry", {"celery.retry.reason": str(info.retval)[:1024]})
    except Exception:
        error_once("celery.consume.end", "autotrace: internal error in celery.consume.end")
    _finish_state(span, token, state, failure)


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


def _finish_state(span: Any, token: Any, state: Optional[str], exc: Optional[BaseException]) -> None:
    if state:
        with guard("celery.finish"):
            span.set_attribute(STATE, str(state))
    close_span(span, token, "celery.finish", exc)
