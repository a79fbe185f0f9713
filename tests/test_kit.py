"""Unit tests of autotrace/kit.py: CallSpan, Plan, PendingSpan and its holders, iterators, server spans,
the error policy and argument helpers -- with the real SDK (the ``spans`` fixture)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from typing import Any, Dict, List, Tuple

import pytest
import wrapt
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Link, SpanKind, StatusCode

from autotrace import kit
from autotrace.kit import (
    CONSUMER,
    INTERNAL,
    SERVER,
    SUPPRESS_DB_INSTRUMENTATION_KEY,
    SUPPRESS_HTTP_INSTRUMENTATION_KEY,
    SUPPRESS_INSTRUMENTATION_KEY,
    CallSpan,
    Instrumentor,
    PendingSpan,
    Plan,
    Suppress,
    TracedAsyncIterator,
    TracedIterator,
    arg,
    error_type,
    extract,
    held,
    hold,
    record_error,
    release,
    replace_arg,
    span_context,
    start_server_span,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
app_tracer = trace.get_tracer("test.app")


class Kit(Instrumentor):
    name = "kittest"


class Boom(Exception):
    pass


@pytest.fixture
def inst() -> Kit:
    return Kit()


def run_sync(call_span: CallSpan, wrapped: Any, *args: Any, **kwargs: Any) -> Any:
    return call_span.sync(wrapped, None, args, kwargs)


def run_async(call_span: CallSpan, wrapped: Any, *args: Any, **kwargs: Any) -> Any:
    return asyncio.run(call_span.async_(wrapped, None, args, kwargs))


def current_span_id() -> int:
    return trace.get_current_span().get_span_context().span_id


def internal_errors(caplog: Any) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "autotrace" and r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------
# CallSpan, sync and async


def test_sync_span_is_current_during_the_call_and_child_of_the_caller(inst, spans) -> None:
    seen = {}

    def wrapped(x, y=0):
        seen["current"] = current_span_id()
        return x + y

    call_span = CallSpan(inst, lambda i, a, k: ("op", {"k": "v"}))
    with app_tracer.start_as_current_span("caller") as caller:
        assert run_sync(call_span, wrapped, 1, y=2) == 3
    span = spans.one("op")
    assert span.kind is SpanKind.CLIENT
    assert dict(span.attributes) == {"k": "v"}
    assert span.parent.span_id == caller.get_span_context().span_id
    assert seen["current"] == span.context.span_id
    assert span.instrumentation_scope.name == "autotrace.instrumentors.kittest"
    assert current_span_id() == 0  # detached after the call


def test_describe_none_means_no_span_and_the_call_runs(inst, spans) -> None:
    call_span = CallSpan(inst, lambda i, a, k: None)
    assert run_sync(call_span, lambda: "r") == "r"
    assert run_async(call_span, _async_value("a")) == "a"
    assert spans.get() == []


def _async_value(value: Any) -> Any:
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return value

    return wrapped


def test_async_span_covers_the_awaited_work(inst, spans) -> None:
    seen = {}

    async def wrapped(x):
        await asyncio.sleep(0.01)
        seen["current"] = current_span_id()
        return x * 2

    call_span = CallSpan(inst, lambda i, a, k: ("aop", {}), kind=INTERNAL)
    assert run_async(call_span, wrapped, 21) == 42
    span = spans.one("aop")
    assert span.kind is SpanKind.INTERNAL
    assert seen["current"] == span.context.span_id
    assert span.end_time - span.start_time >= 10_000_000


def test_user_exceptions_pass_through_unchanged_and_are_recorded(inst, spans) -> None:
    error = Boom("kaput")

    def wrapped():
        raise error

    async def awrapped():
        raise error

    call_span = CallSpan(inst, lambda i, a, k: ("op", {}))
    with pytest.raises(Boom) as raised:
        run_sync(call_span, wrapped)
    assert raised.value is error
    with pytest.raises(Boom) as raised:
        run_async(call_span, awrapped)
    assert raised.value is error
    for span in spans.named("op"):
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["error.type"] == "tests.test_kit.Boom"
        assert [e.name for e in span.events] == ["exception"]
    assert len(spans.named("op")) == 2


def test_wrap_picks_the_async_wrapper_by_the_target(inst, spans) -> None:
    class Store:
        def get(self, key):
            return ("sync", key)

        async def aget(self, key):
            return ("async", key)

        @staticmethod
        async def static(key):
            return ("static", key)

    call_span = CallSpan(inst, lambda i, a, k: ("op " + str(a[0]), {}))
    signature = inspect.signature(Store.get)
    for name in ("get", "aget", "static"):
        inst.wrap(Store, name, call_span)
    try:
        assert inspect.iscoroutinefunction(Store.aget) and not inspect.iscoroutinefunction(Store.get)
        assert inspect.iscoroutinefunction(Store.static)
        assert inspect.signature(Store.get) == signature
        assert Store().get(1) == ("sync", 1)
        assert asyncio.run(Store().aget(2)) == ("async", 2)
        assert asyncio.run(Store.static(3)) == ("static", 3)
    finally:
        inst.unpatch()
    # Each span ended after the awaited work (not when the coroutine was created).
    assert sorted(s.name for s in spans.get()) == ["op 1", "op 2", "op 3"]
    assert Store().get(4) == ("sync", 4) and len(spans.get()) == 3


def test_wrap_picks_async_for_a_target_someone_else_already_wrapped(inst, spans) -> None:
    class Store:
        async def aget(self, key):
            await asyncio.sleep(0.01)
            return key

    def theirs(wrapped, instance, args, kwargs):
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(Store, "aget", theirs)
    inst.wrap(Store, "aget", CallSpan(inst, lambda i, a, k: ("op", {})))
    try:
        assert asyncio.run(Store().aget(5)) == 5
    finally:
        inst.unpatch()
    span = spans.one("op")
    assert span.end_time - span.start_time >= 10_000_000  # the async wrapper awaited the call


# --------------------------------------------------------------------------
# Plan


def test_plan_parent_links_and_carrier(inst, spans) -> None:
    remote = extract({"traceparent": TRACEPARENT})
    linked = app_tracer.start_span("linked")
    carrier: Dict[str, str] = {}
    plan = Plan("publish", {"a": 1}, parent=remote, links=[Link(linked.get_span_context())], carrier=carrier)
    call_span = CallSpan(inst, lambda i, a, k: plan, kind=kit.PRODUCER)
    with app_tracer.start_as_current_span("unrelated"):
        assert run_sync(call_span, lambda: "sent") == "sent"
    linked.end()
    span = spans.one("publish")
    assert span.kind is SpanKind.PRODUCER
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    assert [link.context.span_id for link in span.links] == [linked.get_span_context().span_id]
    assert carrier["traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"


def test_plan_replaces_the_arguments_without_touching_the_callers(inst, spans) -> None:
    caller_args = (1, {"h": "v"})
    caller_kwargs = {"flag": True}
    received = {}

    def describe(instance, args, kwargs):
        headers = dict(args[1], traceparent="x")
        new_args, new_kwargs = replace_arg(args, kwargs, 1, "headers", headers)
        new_args, new_kwargs = replace_arg(new_args, new_kwargs, 5, "extra", "added")
        return Plan("op", {}, args=new_args, kwargs=new_kwargs)

    def wrapped(*args, **kwargs):
        received["args"], received["kwargs"] = args, kwargs
        return "ok"

    assert CallSpan(inst, describe).sync(wrapped, None, caller_args, caller_kwargs) == "ok"
    assert received["args"] == (1, {"h": "v", "traceparent": "x"})
    assert received["kwargs"] == {"flag": True, "extra": "added"}
    assert caller_args == (1, {"h": "v"}) and caller_kwargs == {"flag": True}
    assert spans.one("op")


def test_state_reaches_finish_and_record(inst, spans) -> None:
    calls: List[Tuple[str, Any, Any]] = []

    def finish(span, result, state):
        calls.append(("finish", result, state))
        span.set_attribute("result", result)

    def record(span, exc, state):
        calls.append(("record", type(exc).__name__, state))
        span.set_attribute("recorded", True)

    call_span = CallSpan(inst, lambda i, a, k: ("op", {}, {"token": a[0]}), finish=finish, record=record)
    assert run_sync(call_span, lambda x: x + 1, 1) == 2
    with pytest.raises(Boom):
        run_sync(call_span, _raise(Boom("x")), 2)
    assert run_async(call_span, _async_value(7), 3) == 7
    assert calls == [("finish", 2, {"token": 1}), ("record", "Boom", {"token": 2}), ("finish", 7, {"token": 3})]
    first, second, third = spans.named("op")
    assert first.attributes["result"] == 2 and third.attributes["result"] == 7
    assert second.attributes["recorded"] is True
    assert "error.type" not in second.attributes  # a custom record replaces the default one
    assert second.status.status_code is StatusCode.UNSET


def _raise(exc: BaseException) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return wrapped


def test_outlive_keeps_the_span_open_until_the_pending_ends(inst, spans) -> None:
    kept: List[PendingSpan] = []

    def outlive(pending, result, state):
        kept.append(pending)
        return ("wrapped", result, state)

    call_span = CallSpan(inst, lambda i, a, k: ("stream", {}, "st"), outlive=outlive)
    assert run_sync(call_span, lambda: "body") == ("wrapped", "body", "st")
    assert spans.get() == []
    kept[0].end()
    kept[0].end()
    assert len(spans.named("stream")) == 1


# --------------------------------------------------------------------------
# Our failures


def test_a_failing_describe_or_tracer_never_reaches_the_caller(inst, spans, caplog) -> None:
    def describe(instance, args, kwargs):
        raise RuntimeError("ours")

    call_span = CallSpan(inst, describe, site="kittest.describe")
    assert run_sync(call_span, lambda: 1) == 1
    assert run_sync(call_span, lambda: 2) == 2
    assert run_async(call_span, _async_value(3)) == 3
    assert internal_errors(caplog) == [
        "autotrace: internal error in kittest.describe; the program continues, this call may be untraced"
        " (further errors at this site are not logged)"
    ]

    class BrokenTracer:
        def start_span(self, *args, **kwargs):
            raise RuntimeError("tracer")

    inst._tracer = BrokenTracer()
    assert run_sync(CallSpan(inst, lambda i, a, k: ("op", {})), lambda: 4) == 4
    assert spans.get() == []


class _RaisingCarrier(dict):
    def __setitem__(self, key: str, value: str) -> None:
        raise RuntimeError("carrier")


@pytest.mark.parametrize("where", ["carrier", "finish", "outlive", "record"])
def test_the_span_is_ended_when_our_code_fails_after_start_span(inst, spans, where) -> None:
    def fail(*args):
        raise RuntimeError(where)

    plan = Plan("op", {}, carrier=_RaisingCarrier() if where == "carrier" else None)
    call_span = CallSpan(
        inst,
        lambda i, a, k: plan,
        finish=fail if where == "finish" else None,
        outlive=fail if where == "outlive" else None,
        record=fail if where == "record" else None,
    )
    before = otel_context.get_current()
    if where == "record":
        with pytest.raises(Boom):
            run_sync(call_span, _raise(Boom("user")))
    else:
        assert run_sync(call_span, lambda: "result") == "result"
    assert otel_context.get_current() == before  # nothing left attached
    span = spans.one("op")
    assert span.end_time is not None


# --------------------------------------------------------------------------
# Suppression


def _nested(inst: Kit, outer_suppress: Any, inner_suppress: Any, under: Any = None) -> List[str]:
    """Names of the spans made by an outer CallSpan around an inner one, optionally under a key."""
    inner = CallSpan(inst, lambda i, a, k: ("inner", {}), suppress=inner_suppress)
    outer = CallSpan(inst, lambda i, a, k: ("outer", {}), suppress=outer_suppress)
    token = otel_context.attach(otel_context.set_value(under, True)) if under is not None else None
    try:
        assert run_sync(outer, lambda: run_sync(inner, lambda: "deep")) == "deep"
    finally:
        if token is not None:
            otel_context.detach(token)
    return sorted(s.name for s in trace_spans())


_SPANS: List[Any] = []


def trace_spans() -> List[Any]:
    found = list(_SPANS[0].get())
    _SPANS[0].clear()
    return found


@pytest.fixture
def nested(spans, inst) -> Any:
    _SPANS[:] = [spans]
    yield lambda *args: _nested(inst, *args)
    _SPANS.clear()


def test_suppress_nothing_nests_and_stands_down_only_under_full_suppression(nested) -> None:
    assert nested(Suppress.NOTHING, Suppress.NOTHING) == ["inner", "outer"]
    assert nested(Suppress.NOTHING, Suppress.NOTHING, SUPPRESS_HTTP_INSTRUMENTATION_KEY) == ["inner", "outer"]
    assert nested(Suppress.NOTHING, Suppress.NOTHING, SUPPRESS_DB_INSTRUMENTATION_KEY) == ["inner", "outer"]
    assert nested(Suppress.NOTHING, Suppress.NOTHING, SUPPRESS_INSTRUMENTATION_KEY) == []


def test_suppress_http_silences_lower_http_layers_only(nested) -> None:
    assert nested(Suppress.HTTP, Suppress.HTTP) == ["outer"]
    assert nested(Suppress.HTTP, Suppress.DB) == ["inner", "outer"]
    assert nested(Suppress.HTTP, Suppress.NOTHING) == ["inner", "outer"]
    assert nested(Suppress.HTTP, Suppress.NOTHING, SUPPRESS_HTTP_INSTRUMENTATION_KEY) == ["inner"]


def test_suppress_db_silences_lower_database_layers_only(nested) -> None:
    assert nested(Suppress.DB, Suppress.DB) == ["outer"]
    assert nested(Suppress.DB, Suppress.HTTP) == ["inner", "outer"]
    assert nested(Suppress.DB, Suppress.NOTHING, SUPPRESS_DB_INSTRUMENTATION_KEY) == ["inner"]


def test_suppress_all_silences_everything_inside(nested) -> None:
    assert nested(Suppress.ALL, Suppress.NOTHING) == ["outer"]
    assert nested(Suppress.ALL, Suppress.HTTP) == ["outer"]
    # ALL stands down only under full suppression, not under an outer HTTP or DB span.
    assert nested(Suppress.ALL, Suppress.NOTHING, SUPPRESS_HTTP_INSTRUMENTATION_KEY) == ["outer"]
    assert nested(Suppress.ALL, Suppress.NOTHING, SUPPRESS_INSTRUMENTATION_KEY) == []


def test_suppressed_context_manager_is_honoured(inst, spans) -> None:
    call_span = CallSpan(inst, lambda i, a, k: ("op", {}), suppress=Suppress.HTTP)
    with kit.suppressed():
        assert run_sync(call_span, lambda: 1) == 1
    with kit.suppressed(http=True):
        assert run_sync(call_span, lambda: 2) == 2
        assert kit.is_suppressed(http=True) and not kit.is_suppressed()
    assert spans.get() == []
    run_sync(call_span, lambda: 3)
    assert len(spans.get()) == 1


def test_span_context_sets_the_span_and_one_key_without_touching_the_parent(spans) -> None:
    parent = otel_context.set_value("other", "kept")
    span = app_tracer.start_span("s")
    ctx = span_context(span, parent, SUPPRESS_DB_INSTRUMENTATION_KEY)
    assert trace.get_current_span(ctx) is span
    assert ctx.get(SUPPRESS_DB_INSTRUMENTATION_KEY) is True and ctx.get("other") == "kept"
    assert trace.get_current_span(parent) is not span and parent.get(SUPPRESS_DB_INSTRUMENTATION_KEY) is None
    with app_tracer.start_as_current_span("current") as current:
        assert trace.get_current_span(span_context(span)) is span
        assert trace.get_current_span() is current
    span.end()


# --------------------------------------------------------------------------
# PendingSpan and its holders


class _Spy:
    def __init__(self) -> None:
        self.recorded: List[Tuple[str, Any]] = []

    def __call__(self, span: Any, exc: BaseException, state: Any) -> None:
        self.recorded.append((type(exc).__name__, state))


def test_pending_span_end_is_idempotent_and_records_once(spans) -> None:
    spy = _Spy()
    pending = PendingSpan(app_tracer.start_span("p"), record=spy, state="st")
    pending.end(Boom("first"), end_time=123_000_000_000)
    pending.end(Boom("second"))
    pending.end()
    (span,) = spans.named("p")
    assert span.end_time == 123_000_000_000
    assert spy.recorded == [("Boom", "st")]


def test_pending_span_ends_even_when_recording_fails(spans, caplog) -> None:
    def record(span, exc, state):
        raise RuntimeError("ours")

    PendingSpan(app_tracer.start_span("p"), record=record).end(Boom("x"))
    assert len(spans.named("p")) == 1
    assert internal_errors(caplog)


def test_pending_span_default_record_is_record_error(spans) -> None:
    PendingSpan(app_tracer.start_span("p")).end(ValueError("bad"))
    span = spans.one("p")
    assert span.status.status_code is StatusCode.ERROR and span.attributes["error.type"] == "ValueError"


class Holder:
    pass


def test_hold_held_release(spans) -> None:
    obj = Holder()
    pending = PendingSpan(app_tracer.start_span("held"))
    assert held(obj) is None and release(obj) is False
    hold(obj, pending)
    assert held(obj) is pending
    assert spans.get() == []
    assert release(obj, Boom("x")) is True
    assert release(obj) is False and held(obj) is None
    span = spans.one("held")
    assert span.attributes["error.type"] == "tests.test_kit.Boom"


def test_hold_collect_ends_the_span_when_the_object_is_collected(spans) -> None:
    kept, collected = Holder(), Holder()
    hold(kept, PendingSpan(app_tracer.start_span("kept")), collect=False)
    hold(collected, PendingSpan(app_tracer.start_span("collected")), collect=True)
    del kept, collected
    gc.collect()
    assert [s.name for s in spans.get()] == ["collected"]


def test_hold_collect_after_release_ends_once(spans) -> None:
    obj = Holder()
    hold(obj, PendingSpan(app_tracer.start_span("once")), collect=True)
    release(obj)
    del obj
    gc.collect()
    assert len(spans.named("once")) == 1


class Slotted:
    __slots__ = ("_autotrace_pending", "__weakref__")


@pytest.mark.parametrize("make", [Slotted, lambda: type("Cls", (), {})], ids=["slots", "class"])
def test_release_finds_what_hold_stored_without_a_dict(spans, make) -> None:
    obj = make()
    pending = PendingSpan(app_tracer.start_span("slotted"))
    hold(obj, pending)
    assert held(obj) is pending
    assert release(obj) is True
    assert pending.done and len(spans.named("slotted")) == 1


# --------------------------------------------------------------------------
# Iterators


def _pending(name: str, current: bool = False, record: Any = None) -> PendingSpan:
    span = app_tracer.start_span(name)
    return PendingSpan(span, span_context(span) if current else None, record)


def test_traced_iterator_ends_on_exhaustion_with_the_span_current_per_item(spans) -> None:
    seen = []
    pending = _pending("body", current=True)

    def body():
        for chunk in (b"a", b"b"):
            seen.append(current_span_id())
            yield chunk

    iterator = TracedIterator(body(), pending)
    assert list(iterator) == [b"a", b"b"]
    span = spans.one("body")
    assert seen == [span.context.span_id] * 2
    assert current_span_id() == 0
    assert list(iterator) == [] and len(spans.get()) == 1


def test_traced_iterator_error_is_recorded_and_reraised(spans) -> None:
    error = Boom("mid-stream")

    def body():
        yield b"a"
        raise error

    iterator = TracedIterator(body(), _pending("body"))
    assert next(iterator) == b"a"
    with pytest.raises(Boom) as raised:
        next(iterator)
    assert raised.value is error
    span = spans.one("body")
    assert span.status.status_code is StatusCode.ERROR


def test_traced_iterator_close_ends_and_closes_the_iterable(spans) -> None:
    closed = []

    def body():
        try:
            yield b"a"
            yield b"b"
        finally:
            closed.append(True)

    iterator = TracedIterator(body(), _pending("body"))
    assert next(iterator) == b"a"
    assert spans.get() == []
    iterator.close()
    assert closed == [True]
    assert spans.one("body").status.status_code is StatusCode.UNSET
    plain = TracedIterator([1, 2], _pending("plain"))  # an iterable without close()
    plain.close()
    assert len(spans.named("plain")) == 1


def test_traced_iterator_delegates_attributes() -> None:
    class Body(list):
        content_length = 3

    iterator = TracedIterator(Body([1]), _pending("attrs"))
    assert iterator.content_length == 3
    iterator.close()


def test_traced_async_iterator_exhaustion_error_and_aclose(spans) -> None:
    seen = []

    async def body(fail: bool):
        for chunk in ("a", "b"):
            seen.append(current_span_id())
            await asyncio.sleep(0)
            yield chunk
        if fail:
            raise Boom("async")

    async def main() -> Tuple[List[str], str, str]:
        pending = _pending("ok", current=True)
        items = [item async for item in TracedAsyncIterator(body(False), pending)]
        failing = TracedAsyncIterator(body(True), _pending("failed"))
        try:
            async for _ in failing:
                pass
        except Boom as exc:
            error = str(exc)
        closing = TracedAsyncIterator(body(False), _pending("closed"))
        first = await closing.__anext__()
        await closing.aclose()
        return items, error, first

    items, error, first = asyncio.run(main())
    assert items == ["a", "b"] and error == "async" and first == "a"
    ok = spans.one("ok")
    assert seen[:2] == [ok.context.span_id] * 2
    assert spans.one("failed").status.status_code is StatusCode.ERROR
    assert spans.one("closed").status.status_code is StatusCode.UNSET


# --------------------------------------------------------------------------
# Server spans and extraction


def test_server_span_continues_the_remote_trace_and_renames(inst, spans, caplog) -> None:
    server = start_server_span(inst, "GET", {"http.request.method": "GET"}, carrier={"traceparent": TRACEPARENT})
    assert current_span_id() == 0  # not current until entered
    server.enter()
    assert current_span_id() == server.span.get_span_context().span_id
    server.rename("/orders/{id}", "GET")
    server.leave()
    server.leave()  # twice: nothing to detach, nothing logged
    assert current_span_id() == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    server.end()
    server.end(Boom("late"))
    span = spans.one("GET /orders/{id}")
    assert span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TRACE_ID and span.parent.is_remote
    assert span.attributes["http.route"] == "/orders/{id}"
    assert span.status.status_code is StatusCode.UNSET  # the late end recorded nothing


def test_server_span_with_a_bad_traceparent_starts_a_new_trace(inst, spans) -> None:
    with app_tracer.start_as_current_span("ambient") as ambient:
        server = start_server_span(inst, "task", {}, carrier={"traceparent": "00-zzz-bad-01"}, kind=CONSUMER)
        server.rename("process add")
        server.end(Boom("failed"))
    span = spans.one("process add")
    assert span.kind is SpanKind.CONSUMER and span.parent is None
    assert span.context.trace_id != ambient.get_span_context().trace_id  # never the worker's ambient context
    assert span.status.status_code is StatusCode.ERROR and "http.route" not in span.attributes


def test_server_span_with_a_given_parent_and_getter(inst, spans) -> None:
    class Getter:
        def get(self, carrier, key):
            value = carrier.get("x-" + key)
            return [value] if value is not None else None

        def keys(self, carrier):
            return list(carrier)

    ctx = extract({"x-traceparent": TRACEPARENT}, getter=Getter())
    assert trace.get_current_span(ctx).get_span_context().span_id == int(PARENT_ID, 16)
    start_server_span(inst, "given", {}, parent=ctx, kind=SERVER).end()
    assert f"{spans.one('given').parent.span_id:016x}" == PARENT_ID


def test_extract_never_raises(monkeypatch) -> None:
    class Choking(TextMapPropagator):
        def extract(self, carrier, context=None, getter=None):
            raise ValueError("bad header")

        def inject(self, carrier, context=None, setter=None):
            pass

        @property
        def fields(self):
            return set()

    monkeypatch.setattr(propagate, "get_global_textmap", lambda: Choking())
    base = otel_context.set_value("k", "v", Context())
    assert extract({"traceparent": TRACEPARENT}, context=base) is base
    assert extract({"traceparent": TRACEPARENT}) == Context()


# --------------------------------------------------------------------------
# The error policy


class Outer:
    class Inner(Exception):
        pass


class MyCancelled(asyncio.CancelledError):
    pass


def test_error_type_rules() -> None:
    assert error_type(ValueError("x")) == "ValueError"
    assert error_type(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert error_type(TimeoutError()) == "TimeoutError"
    assert error_type(asyncio.TimeoutError()) == ("TimeoutError" if asyncio.TimeoutError is TimeoutError else "asyncio.TimeoutError")
    assert error_type(asyncio.CancelledError()) == "asyncio.CancelledError"
    assert error_type(asyncio.InvalidStateError()) == "asyncio.InvalidStateError"
    assert error_type(Outer.Inner()) == "tests.test_kit.Outer.Inner"
    assert error_type(MyCancelled()) == "tests.test_kit.MyCancelled"
    main = type("MainError", (Exception,), {"__module__": "__main__"})
    assert error_type(main()) == "MainError"


def test_cancelled_call_is_recorded_as_asyncio_cancelled_error(inst, spans) -> None:
    call_span = CallSpan(inst, lambda i, a, k: ("op", {}))

    async def slow():
        await asyncio.sleep(10)

    async def main():
        task = asyncio.ensure_future(call_span.async_(slow, None, (), {}))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert spans.one("op").attributes["error.type"] == "asyncio.CancelledError"


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_record_error_default(spans) -> None:
    span = app_tracer.start_span("e")
    record_error(span, _raised(ValueError("bad value 42")))
    span.end()
    (got,) = spans.get()
    assert got.status.status_code is StatusCode.ERROR
    assert got.status.description == "ValueError: bad value 42"
    assert got.attributes["error.type"] == "ValueError"
    (event,) = got.events
    assert event.attributes["exception.message"] == "bad value 42"


def test_record_error_with_a_scrubbed_message(spans) -> None:
    span = app_tracer.start_span("e")
    record_error(span, _raised(Outer.Inner("password=hunter2")), message="password=?", error="28P01",
                 attributes={"db.response.status_code": "28P01"})
    span.end()
    (got,) = spans.get()
    (event,) = got.events
    assert event.attributes["exception.message"] == "password=?"
    assert event.attributes["exception.type"] == "tests.test_kit.Outer.Inner"
    assert event.attributes["exception.stacktrace"].startswith("Traceback (most recent call last):\n")
    assert event.attributes["exception.stacktrace"].endswith("tests.test_kit.Outer.Inner: password=?")
    assert got.status.description == "Inner: password=?"
    assert got.attributes["error.type"] == "28P01" and got.attributes["db.response.status_code"] == "28P01"
    everything = repr(dict(got.attributes)) + repr([dict(e.attributes) for e in got.events]) + got.status.description
    assert "hunter2" not in everything


def test_record_error_truncates_the_status_and_skips_non_recording_spans(spans) -> None:
    span = app_tracer.start_span("e")
    record_error(span, ValueError("x" * 5000))
    span.end()
    assert len(spans.one("e").status.description) == 1024
    record_error(trace.INVALID_SPAN, ValueError("ignored"))  # no error, nothing to record


# --------------------------------------------------------------------------
# Arguments


def test_arg_reads_keyword_then_position_then_default() -> None:
    assert arg((1, 2), {}, 1, "b") == 2
    assert arg((1, 2), {"b": 3}, 1, "b") == 3
    assert arg((1,), {}, 1, "b", default="d") == "d"
    assert arg((), {"b": None}, 0, "b", default="d") is None


def test_replace_arg_never_mutates_the_callers_arguments() -> None:
    args, kwargs = (1, 2, 3), {"k": "v"}
    new_args, new_kwargs = replace_arg(args, kwargs, 1, "b", "B")
    assert new_args == (1, "B", 3) and new_kwargs is kwargs and args == (1, 2, 3)
    new_args, new_kwargs = replace_arg(args, kwargs, 0, "k", "K")
    assert new_args is args and new_kwargs == {"k": "K"} and kwargs == {"k": "v"} and new_kwargs is not kwargs
    new_args, new_kwargs = replace_arg(args, kwargs, 7, "headers", {"h": 1})
    assert new_args is args and new_kwargs == {"k": "v", "headers": {"h": 1}} and kwargs == {"k": "v"}


def test_baggage_and_context_values_survive_a_call_span(inst, spans) -> None:
    seen = {}

    def wrapped():
        seen["baggage"] = baggage.get_baggage("user")
        return True

    token = otel_context.attach(baggage.set_baggage("user", "u1"))
    try:
        run_sync(CallSpan(inst, lambda i, a, k: ("op", {}), suppress=Suppress.DB), wrapped)
    finally:
        otel_context.detach(token)
    assert seen["baggage"] == "u1"


# --------------------------------------------------------------------------
# ends_held: a span started by one call, ended by a later one on the same object


class _Connection:
    def getresponse(self, fail: bool = False) -> str:
        if fail:
            raise ConnectionResetError("peer gone")
        return "response"


def test_ends_held_finishes_and_ends_on_return_and_records_an_error(spans) -> None:
    seen = []
    wrapper = kit.ends_held(lambda span, result: seen.append(result))
    conn = _Connection()
    assert wrapper(conn.getresponse, conn, (), {}) == "response"  # nothing held: untouched
    assert seen == [] and spans.get() == []
    hold(conn, PendingSpan(app_tracer.start_span("request")))
    assert wrapper(conn.getresponse, conn, (), {}) == "response"
    assert seen == ["response"] and held(conn) is None and len(spans.named("request")) == 1
    hold(conn, PendingSpan(app_tracer.start_span("failing")))
    with pytest.raises(ConnectionResetError):
        wrapper(conn.getresponse, conn, (True,), {})
    failed = spans.one("failing")
    assert failed.attributes["error.type"] == "ConnectionResetError" and held(conn) is None


def test_ends_held_survives_a_broken_finish(spans) -> None:
    def broken(span, result):
        raise KeyError("bug")

    conn = _Connection()
    hold(conn, PendingSpan(app_tracer.start_span("request")))
    assert kit.ends_held(broken)(conn.getresponse, conn, (), {}) == "response"
    assert len(spans.named("request")) == 1
