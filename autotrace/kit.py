"""The instrumentor kit: the one place where spans are started, made current and ended.

An instrumentor says *what* to wrap and *which facts* to read; this module
does the rest, once, for every library:

* :class:`CallSpan` -- a span around a call. One description (``describe``
  returns the name and attributes, or a :class:`Plan` with a parent context,
  links, a carrier to inject into, replacement arguments) gives both the sync
  and the async wrapper; :meth:`Instrumentor.wrap` picks the right one for the
  target. Our code is guarded, the user's call, result and exception pass
  through untouched, and a started span is always ended.
* :class:`PendingSpan` -- a span that outlives the call (a response body read
  later, a stream, a cursor): ended on close, exhaustion, error or garbage
  collection, through :func:`hold` / :func:`release`, :class:`TracedIterator`
  and :class:`TracedAsyncIterator`.
* :func:`start_server_span` -- SERVER / CONSUMER spans: the remote context
  extracted from a carrier, the span renamed once the route is known, ended
  when the response is complete (:class:`ServerSpan`).
* :func:`error_type` and :func:`record_error` -- the one error policy.
* :func:`arg` / :func:`replace_arg` -- positional-or-keyword argument access.

Why one module: every copy of start/attach/try/except/end in an instrumentor
was a place for the same bugs (a span started and never ended when code after
``start_span`` failed). The wrappers here are also where the cheaper span
path plugs in: instrumentors never touch the span object's class or the
context machinery directly.
"""

from __future__ import annotations

import asyncio
import inspect
import traceback
import weakref
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from autotrace._log import internal_error
from autotrace.instrumentation import (
    SUPPRESS_HTTP_INSTRUMENTATION_KEY,
    SUPPRESS_INSTRUMENTATION_KEY,
    Instrumentor,
    guard,
    guarded,
    inject,
    is_suppressed,
    suppressed,
)
from autotrace.spans import set_attributes

try:  # the context key of the current span (stable since API 1.0; stay defensive)
    from opentelemetry.trace.propagation import _SPAN_KEY
except ImportError:  # pragma: no cover
    _SPAN_KEY = None

__all__ = [
    "Instrumentor", "CallSpan", "Plan", "Suppress", "PendingSpan", "ServerSpan", "TracedIterator",
    "TracedAsyncIterator", "hold", "release", "held", "ends_held", "start_server_span", "extract", "error_type",
    "record_error", "arg", "replace_arg", "span_context", "guard", "guarded", "inject", "is_suppressed",
    "suppressed", "set_attributes", "SUPPRESS_INSTRUMENTATION_KEY", "SUPPRESS_HTTP_INSTRUMENTATION_KEY",
    "SUPPRESS_DB_INSTRUMENTATION_KEY", "CLIENT", "SERVER", "PRODUCER", "CONSUMER", "INTERNAL",
]

CLIENT = SpanKind.CLIENT
SERVER = SpanKind.SERVER
PRODUCER = SpanKind.PRODUCER
CONSUMER = SpanKind.CONSUMER
INTERNAL = SpanKind.INTERNAL

#: Set while a database client span (ORM or driver) is current: a lower-level
#: driver instrumentation adds no second span for the same statement.
SUPPRESS_DB_INSTRUMENTATION_KEY = otel_context.create_key("autotrace-suppress-db-instrumentation")

_get_current = otel_context.get_current
_set_item = dict.__setitem__
_attach = otel_context.attach
_detach = otel_context.detach


# --------------------------------------------------------------------------
# Arguments


def arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    """The argument passed by keyword ``name`` or at position ``index``."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def replace_arg(
    args: Tuple[Any, ...], kwargs: Dict[str, Any], index: int, name: str, value: Any
) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``(args, kwargs)`` with the argument ``name``/``index`` set to ``value``; the caller's are not modified.

    An argument that was not passed is added by keyword.
    """
    if name in kwargs or len(args) <= index:
        kwargs = dict(kwargs)
        kwargs[name] = value
        return args, kwargs
    return args[:index] + (value,) + args[index + 1:], kwargs


# --------------------------------------------------------------------------
# Errors


def error_type(exc: BaseException) -> str:
    """``error.type`` of an exception: its qualified class name, one rule for every instrumentor.

    Built-in exceptions keep their plain name (``TimeoutError``, ``ValueError``);
    asyncio's exceptions are named from the public module
    (``asyncio.CancelledError``, not ``asyncio.exceptions.CancelledError``).
    """
    cls = type(exc)
    module = cls.__module__
    if not module or module in ("builtins", "__main__"):
        return cls.__qualname__
    if module == "asyncio.exceptions" or (isinstance(exc, asyncio.CancelledError) and module.startswith("asyncio")):
        module = "asyncio"
    return f"{module}.{cls.__qualname__}"


def record_error(
    span: Span,
    exc: BaseException,
    message: Optional[str] = None,
    error: Optional[str] = None,
    attributes: Optional[Dict[str, Any]] = None,
) -> None:
    """Mark ``span`` failed by ``exc``: an exception event, ERROR status and ``error.type``.

    ``message`` replaces the exception's own text in the event and the status
    (redis and SQL drivers echo arguments and literals into their messages);
    ``error`` overrides ``error.type`` (an SQLSTATE, an HTTP status);
    ``attributes`` are set on the span with it (``db.response.status_code``).
    """
    if not span.is_recording():
        return
    kind = error_type(exc)
    if message is None:
        span.record_exception(exc)
        text = str(exc)
    else:
        text = message
        stack = "".join(traceback.format_tb(exc.__traceback__))
        span.record_exception(
            exc,
            attributes={
                "exception.type": kind,
                "exception.message": text,
                "exception.stacktrace": f"Traceback (most recent call last):\n{stack}{kind}: {text}",
            },
        )
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {text}"[:1024]))
    extra: Dict[str, Any] = {"error.type": error or kind}
    if attributes:
        extra.update(attributes)
    span.set_attributes(extra)


def _default_record(span: Span, exc: BaseException, state: Any) -> None:
    record_error(span, exc)


# --------------------------------------------------------------------------
# Contexts


def span_context(span: Span, parent: Optional[Context] = None, suppress_key: Any = None) -> Context:
    """``parent`` (default: the current context) with ``span`` current, optionally one suppression key set.

    One dict copy, where ``set_span_in_context`` + ``set_value`` make two.
    """
    if parent is None:
        parent = _get_current()
    if _SPAN_KEY is None:  # pragma: no cover
        ctx = trace.set_span_in_context(span, parent)
        return otel_context.set_value(suppress_key, True, ctx) if suppress_key is not None else ctx
    ctx = Context(parent)
    _set_item(ctx, _SPAN_KEY, span)  # Context forbids item assignment; this copy is ours alone
    if suppress_key is not None:
        _set_item(ctx, suppress_key, True)
    return ctx


class Suppress:
    """What a span suppresses inside its call, and what makes it stand down.

    ``NOTHING``: only full suppression (exporter traffic) skips it.
    ``HTTP``: an HTTP client span -- skipped under an outer HTTP client span,
    and lower HTTP layers (urllib3 under requests, httpcore under httpx) add none.
    ``DB``: the same for database client spans (a driver under an ORM).
    ``ALL``: nothing inside the call is traced at all.
    """

    NOTHING = None
    HTTP = SUPPRESS_HTTP_INSTRUMENTATION_KEY
    DB = SUPPRESS_DB_INSTRUMENTATION_KEY
    ALL = SUPPRESS_INSTRUMENTATION_KEY


# --------------------------------------------------------------------------
# Spans around calls


class Plan:
    """What ``describe`` returns when a ``(name, attributes)`` tuple is not enough.

    ``parent``: the context to start in (default: current). ``links``: span
    links. ``carrier``: a dict-like the configured propagators write into
    (message headers, HTTP headers of a request object). ``args``/``kwargs``:
    replacement arguments for the call (e.g. a copy of the caller's
    properties with headers added -- the caller's objects are never modified).
    ``state``: anything the ``finish`` / ``record`` / ``outlive`` hooks need.
    """

    __slots__ = ("name", "attributes", "parent", "links", "carrier", "args", "kwargs", "state")

    def __init__(
        self,
        name: str,
        attributes: Dict[str, Any],
        parent: Optional[Context] = None,
        links: Optional[Sequence[Any]] = None,
        carrier: Any = None,
        args: Optional[Tuple[Any, ...]] = None,
        kwargs: Optional[Dict[str, Any]] = None,
        state: Any = None,
    ) -> None:
        self.name = name
        self.attributes = attributes
        self.parent = parent
        self.links = links
        self.carrier = carrier
        self.args = args
        self.kwargs = kwargs
        self.state = state


Describe = Callable[[Any, Tuple[Any, ...], Dict[str, Any]], Any]
Finish = Callable[[Span, Any, Any], None]
Record = Callable[[Span, BaseException, Any], None]
Outlive = Callable[["PendingSpan", Any, Any], Any]


class CallSpan:
    """A span around each call of a wrapped function: one description, sync and async wrappers.

    ``describe(instance, args, kwargs)`` returns ``None`` (no span for this
    call), ``(name, attributes)``, ``(name, attributes, state)`` or a
    :class:`Plan`. ``finish(span, result, state)`` adds what the result tells
    (status codes, ids); ``record(span, exc, state)`` records a failure
    (default :func:`record_error`); ``outlive(pending, result, state)``, when
    given, keeps the span open past the call -- it hands ``pending`` to
    whatever ends it later (:func:`hold`, :class:`TracedIterator`) and returns
    the result to give the caller. ``suppress``: see :class:`Suppress`.

    Pass the object to :meth:`Instrumentor.wrap`; it installs :attr:`sync` or
    :attr:`async_` by the target's own nature, so a library's sync and asyncio
    classes share one description.
    """

    __slots__ = ("site", "sync", "async_", "__weakref__")

    def __init__(
        self,
        instrumentor: Instrumentor,
        describe: Describe,
        kind: SpanKind = CLIENT,
        suppress: Any = Suppress.NOTHING,
        finish: Optional[Finish] = None,
        record: Optional[Record] = None,
        outlive: Optional[Outlive] = None,
        site: Optional[str] = None,
    ) -> None:
        self.site = site or f"{instrumentor.name}.{getattr(describe, '__name__', 'call')}"
        self.sync, self.async_ = _call_wrappers(
            instrumentor, describe, kind, suppress, finish, record or _default_record, outlive, self.site
        )

    def for_target(self, target: Any) -> Callable[..., Any]:
        """The wrapper fit for ``target`` (a function or descriptor): async for coroutine functions."""
        function = getattr(target, "__func__", target)
        return self.async_ if inspect.iscoroutinefunction(function) else self.sync


def _call_wrappers(
    instrumentor: Instrumentor,
    describe: Describe,
    kind: SpanKind,
    suppress_key: Any,
    finish: Optional[Finish],
    record: Record,
    outlive: Optional[Outlive],
    site: str,
) -> Tuple[Callable[..., Any], Callable[..., Any]]:
    """Build the two wrappers. Why closures with everything bound locally: they run per call,
    and each attribute or global lookup saved is paid back on every traced operation."""
    suppress_all = SUPPRESS_INSTRUMENTATION_KEY
    stand_down_key = suppress_key if suppress_key is not suppress_all else None
    get_current = _get_current
    attach = _attach
    detach = _detach

    def begin(instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """``(span, token, state, args, kwargs)`` or None; never raises."""
        current = get_current()
        if current.get(suppress_all) or (stand_down_key is not None and current.get(stand_down_key)):
            return None
        span = None
        try:
            plan = describe(instance, args, kwargs)
            if plan is None:
                return None
            tracer = instrumentor._tracer or instrumentor.tracer
            if type(plan) is tuple:
                span = tracer.start_span(plan[0], current, kind, plan[1])
                ctx = span_context(span, current, suppress_key)
                return span, attach(ctx), (plan[2] if len(plan) > 2 else None), args, kwargs
            parent = current if plan.parent is None else plan.parent
            span = tracer.start_span(plan.name, parent, kind, plan.attributes, plan.links)
            ctx = span_context(span, parent, suppress_key)
            if plan.carrier is not None:
                inject(plan.carrier, ctx)
            token = attach(ctx)
            return (
                span, token, plan.state,
                args if plan.args is None else plan.args,
                kwargs if plan.kwargs is None else plan.kwargs,
            )
        except Exception:
            internal_error(site)
            if span is not None:
                _end_quietly(span, site)
            return None

    def failed(span: Span, token: Any, exc: BaseException, state: Any) -> None:
        try:
            detach(token)
            if not span.is_recording():
                return  # ended already (a retry hook ended the attempt), or never sampled
            record(span, exc, state)
        except Exception:
            internal_error(site)
        _end_quietly(span, site)

    def returned(span: Span, token: Any, result: Any, state: Any) -> Any:
        try:
            detach(token)
            if finish is not None:
                finish(span, result, state)
            if outlive is not None:
                return outlive(PendingSpan(span, None, record, state), result, state)
        except Exception:
            internal_error(site)
        _end_quietly(span, site)
        return result

    if outlive is None and finish is None:

        def sync_wrapper(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            started = begin(instance, args, kwargs)
            if started is None:
                return wrapped(*args, **kwargs)
            span, token, state, args, kwargs = started
            try:
                result = wrapped(*args, **kwargs)
            except BaseException as exc:
                failed(span, token, exc, state)
                raise
            try:
                detach(token)
                span.end()
            except Exception:
                internal_error(site)
            return result

    else:

        def sync_wrapper(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            started = begin(instance, args, kwargs)
            if started is None:
                return wrapped(*args, **kwargs)
            span, token, state, args, kwargs = started
            try:
                result = wrapped(*args, **kwargs)
            except BaseException as exc:
                failed(span, token, exc, state)
                raise
            return returned(span, token, result, state)

    async def async_wrapper(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        started = begin(instance, args, kwargs)
        if started is None:
            return await wrapped(*args, **kwargs)
        span, token, state, args, kwargs = started
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            failed(span, token, exc, state)
            raise
        return returned(span, token, result, state)

    return sync_wrapper, async_wrapper


def _end_quietly(span: Span, site: str, end_time: Optional[int] = None) -> None:
    try:
        span.end(end_time=end_time) if end_time is not None else span.end()
    except Exception:
        internal_error(site + ".end")


# --------------------------------------------------------------------------
# Spans that outlive the call


class PendingSpan:
    """A started span waiting for the end of something read later (a body, a stream, a cursor).

    :meth:`end` is idempotent and never raises: whichever comes first --
    exhaustion, close, an error while reading, garbage collection -- ends the
    span once. ``context`` (the span current), when set, is made current again
    while a :class:`TracedIterator` produces each item, so spans started by a
    streaming generator are children of this one.
    """

    __slots__ = ("span", "context", "record", "state", "done", "__weakref__")

    def __init__(self, span: Span, context: Optional[Context] = None, record: Optional[Record] = None, state: Any = None) -> None:
        self.span = span
        self.context = context
        self.record = record or _default_record
        self.state = state
        self.done = False

    def end(self, exc: Optional[BaseException] = None, end_time: Optional[int] = None) -> None:
        if self.done:
            return
        self.done = True
        if exc is not None:
            try:
                self.record(self.span, exc, self.state)
            except Exception:
                internal_error("kit.pending.record")
        _end_quietly(self.span, "kit.pending", end_time)


_HELD = "_autotrace_pending"


def hold(obj: Any, pending: Any, collect: bool = False) -> bool:
    """Keep ``pending`` on ``obj`` until :func:`release` (its close / release / exhaustion hook).

    ``collect=True`` also ends it when ``obj`` is garbage-collected, for
    objects whose deletion does not already call the hook that releases.
    False (and the span ended now) when ``obj`` takes no attributes.
    """
    try:
        namespace = obj.__dict__
        if type(namespace) is dict:
            namespace[_HELD] = pending
        else:  # a class: its __dict__ is a read-only proxy
            setattr(obj, _HELD, pending)
        if collect:
            weakref.finalize(obj, pending.end)
    except AttributeError:
        try:
            setattr(obj, _HELD, pending)  # __slots__ with room for it
            if collect:
                weakref.finalize(obj, pending.end)
        except (AttributeError, TypeError):
            pending.end()
            return False
    except TypeError:  # not weak-referenceable
        pass
    return True


def held(obj: Any) -> Any:
    """The pending span held on ``obj``, or None."""
    return getattr(obj, _HELD, None)


def release(obj: Any, exc: Optional[BaseException] = None) -> bool:
    """End the pending span held on ``obj`` (with ``exc`` recorded), if any; True if there was one."""
    namespace = getattr(obj, "__dict__", None)
    if type(namespace) is dict:
        pending = namespace.pop(_HELD, None)
    else:
        pending = getattr(obj, _HELD, None)
        if pending is not None:
            try:
                delattr(obj, _HELD)
            except Exception:
                pass
    if pending is None:
        return False
    pending.end(exc)
    return True


def ends_held(finish: Optional[Callable[[Span, Any], None]] = None, site: str = "kit.ends_held") -> Callable[..., Any]:
    """A wrapt wrapper ending the span :func:`hold` put on the instance when the wrapped call is over.

    For a span started by one call and ended by a later one on the same object
    (``HTTPConnection.request`` ... ``getresponse``): on an exception the span
    ends with it recorded; on return ``finish(span, result)`` (guarded) sets
    what the result tells, then the span ends. Without a held span the call
    runs untouched.
    """

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        pending = held(instance)
        if pending is None:
            return wrapped(*args, **kwargs)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            release(instance, exc)
            raise
        if finish is not None:
            try:
                finish(pending.span, result)
            except Exception:
                internal_error(site)
        release(instance)
        return result

    return wrapper


class TracedIterator:
    """An iterable body whose span ends when it is exhausted, fails or is closed.

    ``pending``: anything with ``end(exc=None)`` and ``context`` (a
    :class:`PendingSpan`, a :class:`ServerSpan`).
    """

    __slots__ = ("_iterable", "_iterator", "_pending", "__weakref__")

    def __init__(self, iterable: Iterable[Any], pending: Any) -> None:
        self._iterable = iterable
        self._iterator: Any = None
        self._pending = pending

    def __iter__(self) -> "TracedIterator":
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        pending = self._pending
        token = None
        if pending.context is not None:
            try:
                token = _attach(pending.context)
            except Exception:
                token = None
        try:
            return next(self._iterator)
        except StopIteration:
            pending.end()
            raise
        except BaseException as exc:
            pending.end(exc)
            raise
        finally:
            if token is not None:
                _detach(token)

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._pending.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterable, name)


class TracedAsyncIterator:
    """The async twin of :class:`TracedIterator` (``async for`` bodies and streams)."""

    __slots__ = ("_iterable", "_iterator", "_pending", "__weakref__")

    def __init__(self, iterable: Any, pending: Any) -> None:
        self._iterable = iterable
        self._iterator: Any = None
        self._pending = pending

    def __aiter__(self) -> "TracedAsyncIterator":
        if self._iterator is None:
            self._iterator = self._iterable.__aiter__()
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._iterable.__aiter__()
        pending = self._pending
        token = None
        if pending.context is not None:
            try:
                token = _attach(pending.context)
            except Exception:
                token = None
        try:
            return await self._iterator.__anext__()
        except StopAsyncIteration:
            pending.end()
            raise
        except BaseException as exc:
            pending.end(exc)
            raise
        finally:
            if token is not None:
                _detach(token)

    async def aclose(self) -> None:
        try:
            close = getattr(self._iterable, "aclose", None)
            if close is not None:
                await close()
        finally:
            self._pending.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterable, name)


# --------------------------------------------------------------------------
# Server and consumer spans


def extract(carrier: Any, getter: Any = None, context: Optional[Context] = None) -> Context:
    """The remote context in ``carrier`` through the configured propagators; a new trace if a header is bad.

    ``context``: the context to extract into (default: an empty one -- a
    server request or a consumed message starts from the sender's context,
    never from what happens to be current in the worker).
    """
    base = Context() if context is None else context
    try:
        if getter is None:
            return propagate.extract(carrier, context=base)
        return propagate.extract(carrier, context=base, getter=getter)
    except Exception:  # a propagator choking on a header
        return base


class ServerSpan(PendingSpan):
    """The SERVER (or CONSUMER) span of one request or message.

    :meth:`enter` / :meth:`leave` make it current around the handler;
    :meth:`rename` names it by the route once the framework has matched it;
    :meth:`end` ends it once (the response complete, the handler failed).
    """

    __slots__ = ("token",)

    def __init__(self, span: Span, context: Context, record: Optional[Record] = None) -> None:
        self.span = span  # PendingSpan.__init__ inlined: one per request, on every server's hot path
        self.context = context
        self.record = record or _default_record
        self.state = None
        self.done = False
        self.token: Any = None

    def enter(self) -> None:
        self.token = _attach(self.context)

    def leave(self) -> None:
        token = self.token
        if token is not None:
            self.token = None
            _detach(token)

    def rename(self, route: str, method: Optional[str] = None) -> None:
        """``{method} {route}`` as the span name and ``http.route`` (for a task or queue: just the name)."""
        span = self.span
        if not span.is_recording():
            return
        if method is None:
            span.update_name(route)
            return
        span.update_name(f"{method} {route}")
        set_attributes(span, {"http.route": route})


def start_server_span(
    instrumentor: Instrumentor,
    name: str,
    attributes: Dict[str, Any],
    carrier: Any = None,
    getter: Any = None,
    kind: SpanKind = SERVER,
    parent: Optional[Context] = None,
    links: Optional[Sequence[Any]] = None,
    record: Optional[Record] = None,
    cls: Any = None,
) -> Any:
    """Start the span of an incoming request or message, child of the context its ``carrier`` brings.

    ``parent``: an already extracted context (then ``carrier`` is not read).
    The span is not made current: call :meth:`ServerSpan.enter`. ``cls``: a
    :class:`ServerSpan` subclass to build (a framework's request object).
    """
    if parent is None:
        parent = extract(carrier, getter) if carrier is not None else Context()
    tracer = instrumentor._tracer or instrumentor.tracer
    span = tracer.start_span(name, parent, kind, attributes, links)
    try:
        return (cls or ServerSpan)(span, span_context(span, parent), record)
    except BaseException:
        _end_quietly(span, "kit.server")
        raise
