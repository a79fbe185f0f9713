"""wrap/unwrap, the never-raise guard and the kit's CallSpan: the mechanics every instrumentor uses."""

import asyncio
import inspect
import logging

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from autotrace.instrumentation import Instrumentor, guard, is_suppressed, suppressed, unwrap, wrap
from autotrace.kit import CallSpan, Suppress


class Base:
    def method(self, a, b=2, *, c=3):
        """doc"""
        return ("base", a, b, c)

    @staticmethod
    def static(x):
        return ("static", x)

    @classmethod
    def klass(cls, x):
        return (cls.__name__, x)

    async def coro(self, x):
        await asyncio.sleep(0)
        return ("coro", x)


class Child(Base):
    pass


def passthrough(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)


@pytest.mark.parametrize("name", ["method", "static", "klass", "coro"])
def test_wrap_unwrap_round_trip_restores_the_exact_object(name):
    original = Base.__dict__[name]
    patch = wrap(Base, name, passthrough)
    assert Base.__dict__[name] is not original
    unwrap(patch)
    assert Base.__dict__[name] is original


def test_wrapped_keeps_signature_docs_and_async_nature():
    patches = [wrap(Base, n, passthrough) for n in ("method", "coro", "static", "klass")]
    try:
        assert inspect.signature(Base.method) == inspect.signature(Base.__dict__["method"].__wrapped__)
        assert Base.method.__doc__ == "doc" and Base.method.__name__ == "method"
        assert inspect.iscoroutinefunction(Base.coro)
        assert Base().method(1, c=4) == ("base", 1, 2, 4)
        assert Base.static(5) == ("static", 5) and Child.klass(6) == ("Child", 6)
        assert asyncio.run(Base().coro(7)) == ("coro", 7)
    finally:
        for p in patches:
            unwrap(p)


def test_wrapping_an_inherited_method_on_the_subclass_and_removing_it():
    patch = wrap(Child, "method", passthrough)
    assert "method" in Child.__dict__
    assert Child().method(1) == ("base", 1, 2, 3)
    unwrap(patch)
    assert "method" not in Child.__dict__


def test_wrap_module_path_reaches_the_class():
    import sys

    patch = wrap(sys.modules[__name__], "Base.method", passthrough)
    try:
        assert Base().method(9)[1] == 9
    finally:
        unwrap(patch)
    assert Base.__dict__["method"].__name__ == "method"


def test_guard_swallows_our_errors_once_and_lets_base_exceptions_through(caplog):
    caplog.set_level(logging.ERROR, logger="autotrace")
    for _ in range(3):
        with guard("test.site"):
            raise ValueError("bug in instrumentation")
    assert caplog.text.count("internal error in test.site") == 1
    with pytest.raises(KeyboardInterrupt):
        with guard("test.site2"):
            raise KeyboardInterrupt


class _Shop(Instrumentor):
    name = "t"


def describe(instance, args, kwargs):
    return "call", {}


def call_span(site="t", describe=describe, **options):
    return CallSpan(_Shop(), describe, kind=SpanKind.CLIENT, site=site, **options)


def test_call_span_passes_results_and_exceptions_through(spans):
    wrapper = call_span().sync
    assert wrapper(lambda x: x * 2, None, (21,), {}) == 42
    error = RuntimeError("user error")

    def fail():
        raise error

    with pytest.raises(RuntimeError) as raised:
        wrapper(fail, None, (), {})
    assert raised.value is error
    ok, failed = spans.get()
    assert ok.status.status_code == StatusCode.UNSET
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["error.type"] == "RuntimeError"
    assert failed.events[0].name == "exception"


def test_call_span_survives_a_broken_describe_and_finish(spans, caplog):
    def broken_describe(instance, args, kwargs):
        raise KeyError("bug")

    def broken_finish(span, result, state):
        raise KeyError("bug")

    assert call_span("broken.start", broken_describe).sync(lambda: "ok", None, (), {}) == "ok"
    assert call_span("broken.finish", finish=broken_finish).sync(lambda: "ok", None, (), {}) == "ok"
    assert len(spans.get()) == 1  # the span whose finish failed still ended
    assert "broken.start" in caplog.text and "broken.finish" in caplog.text


def test_call_span_async_covers_the_awaited_work_and_current_span(spans):
    seen = {}

    async def work():
        seen["current"] = trace.get_current_span()
        await asyncio.sleep(0.05)
        return "done"

    wrapper = call_span().for_target(work)
    result = wrapper(work, None, (), {})
    assert inspect.iscoroutine(result)
    assert asyncio.run(result) == "done"
    span = spans.one()
    assert seen["current"].get_span_context().span_id == span.context.span_id
    assert (span.end_time - span.start_time) / 1e9 >= 0.045
    assert not trace.get_current_span().get_span_context().is_valid


def test_suppression_skips_spans_and_http_key_nests(spans):
    wrapper = call_span().sync
    with suppressed():
        assert is_suppressed()
        wrapper(lambda: None, None, (), {})
    assert spans.get() == []
    http_wrapper = call_span("h", suppress=Suppress.HTTP).sync
    inner_results = []
    http_wrapper(lambda: inner_results.append(is_suppressed(http=True)), None, (), {})
    assert inner_results == [True] and len(spans.get()) == 1
    assert not is_suppressed(http=True)
