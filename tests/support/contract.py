"""The instrumentor contract, as generated pytest tests (after ddtrace's ``tests/contrib/patch.py``).

An instrumentor's test module declares what it patches and gets the checks
every instrumentor owes its host program::

    from tests.support.contract import Contract

    Contract(
        instrumentor="autotrace.instrumentors.redis:RedisInstrumentor",
        module="redis",
        targets=["redis.client:Redis.execute_command", ...],
        async_targets=["redis.asyncio.client:Redis.execute_command", ...],
        calls=[one_real_command, one_async_command],   # each makes one real traced call
        error_call=a_command_the_server_rejects,       # optional: the user's exception must pass unchanged
        spans_per_call=1,
        requires=[REDIS],
    ).install(globals())                               # adds the class TestRedisContract

The checks rely only on public behaviour: the instrumentor's class path, the
``module:Class.attribute`` paths it patches, the spans it makes, its
``tracer`` (``_tracer`` is the documented slot a test may fill) and the
hooks of :class:`autotrace.kit.CallSpan`. Nothing of an instrumentor's
internals is touched, so a rewrite keeps the same contract.

What is checked:

* unpatching restores every original attribute exactly (identity), twice is harmless;
* patching twice (``instrument()`` again, then ``patch_module`` again for every
  patched module) adds no second wrapper and no second span per call;
* under ``autotrace-run`` nothing (library, instrumentor module, target
  modules) is imported at start-up and the library is patched when first imported;
* our own failures never reach the program and never leave a span open:
  the tracer's ``start_span`` raising; every span method raising after the
  start (the attribute / status / rename steps); the ``describe`` /
  ``finish`` / ``record`` / ``outlive`` hooks of every CallSpan the
  instrumentor builds raising; and ``describe_fault``, when given -- each time
  the call's result (or exception) is what the unpatched library gives;
* inside ``autotrace.instrumentation.suppressed()`` no span is made;
* async targets stay coroutine functions (every target keeps its nature) and
  every target keeps its ``inspect.signature``;
* results and exceptions are those of the unpatched library, and each call
  makes the declared number of spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import json
import logging
import re
import sys
import textwrap
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest
import wrapt
from opentelemetry import trace

from autotrace.instrumentation import suppressed
from tests.support.processes import run_traced
from tests.support.services import require

__all__ = ["Contract", "resolve", "raw_attribute", "wrapper_layers", "FAULT"]

MISSING = object()
FAULT = "autotrace contract: injected fault"


class InjectedFault(RuntimeError):
    """The exception the contract raises inside our code (never the user's)."""


# --------------------------------------------------------------------------
# Targets


def resolve(target: str) -> Tuple[Any, str]:
    """``"pkg.mod:Class.attr"`` -> ``(Class, "attr")`` (the module is imported)."""
    module_name, _, path = target.partition(":")
    if not path:
        raise ValueError(f"target {target!r} is not 'module:Class.attribute'")
    owner: Any = importlib.import_module(module_name)
    *parents, attribute = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attribute


def raw_attribute(target: str) -> Any:
    """What the owner's own ``__dict__`` holds for the target (``MISSING`` if inherited/absent)."""
    owner, attribute = resolve(target)
    return vars(owner).get(attribute, MISSING)


#: wrapt 2's ``wrapt.ObjectProxy`` is a pure-Python subclass of the C proxy that
#: ``FunctionWrapper`` derives from: check against both.
PROXY_TYPES = tuple({wrapt.ObjectProxy, *(c for c in wrapt.FunctionWrapper.__mro__ if c.__name__ == "ObjectProxy")})


def wrapper_layers(value: Any) -> int:
    """How many wrapt proxies are stacked on ``value``."""
    layers = 0
    while isinstance(value, PROXY_TYPES):
        layers += 1
        value = value.__wrapped__
    return layers


def _nature(value: Any) -> Tuple[bool, bool, bool]:
    function = getattr(value, "__func__", value)
    return (
        inspect.iscoroutinefunction(function),
        inspect.isasyncgenfunction(function),
        inspect.isgeneratorfunction(function),
    )


def _signature(value: Any) -> Optional[str]:
    try:
        return str(inspect.signature(value))
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------
# Calls and their outcomes

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def outcome(call: Callable[[], Any]) -> Tuple[Any, ...]:
    """``("returned", value)`` or ``("raised", type, message)`` -- comparable across runs."""
    try:
        result = call()
        if inspect.isawaitable(result):
            result = _run(result)
    except BaseException as exc:  # noqa: BLE001 - the user's exceptions are the subject
        if isinstance(exc, InjectedFault) or FAULT in str(exc):
            raise AssertionError(f"our injected fault reached the program: {exc!r}") from exc
        return ("raised", type(exc), _ADDRESS.sub("0x?", str(exc)))
    return ("returned", result)


def _run(awaitable: Any) -> Any:
    async def main() -> Any:
        return await awaitable

    return asyncio.run(main())


# --------------------------------------------------------------------------
# Fault injection


class _RecordedSpan(trace.Span):
    """A span handed out by :class:`_Recorder`; with ``failing``, the methods that change it raise
    when called from our code (a library may be handed the span -- FastAPI's own telemetry sets
    ``http.route`` on it -- and an SDK span never raises at it).

    An API ``Span`` (``trace.get_current_span`` returns only those), not the
    SDK's: whatever an instrumentor does with it goes through these methods
    (``autotrace.spans.set_attributes`` falls back to ``span.set_attributes``
    for an object without the SDK's fields).
    """

    def __init__(self, span: Any, recorder: "_Recorder") -> None:
        self._span = span
        self._recorder = recorder
        self.ends = 0

    def end(self, *args: Any, **kwargs: Any) -> None:
        self.ends += 1
        self._span.end(*args, **kwargs)

    def get_span_context(self) -> Any:
        return self._span.get_span_context()

    def is_recording(self) -> bool:
        return self._span.is_recording()

    def _mutate(name: str) -> Any:  # type: ignore[misc]
        def method(self: "_RecordedSpan", *args: Any, **kwargs: Any) -> Any:
            if self._recorder.failing and self._recorder.ours(sys._getframe(1)):
                self._recorder.faults += 1
                raise InjectedFault(f"{FAULT}: span.{name}")
            return getattr(self._span, name)(*args, **kwargs)

        method.__name__ = name
        return method

    set_attribute = _mutate("set_attribute")
    set_attributes = _mutate("set_attributes")
    add_event = _mutate("add_event")
    add_link = _mutate("add_link")
    set_status = _mutate("set_status")
    record_exception = _mutate("record_exception")
    update_name = _mutate("update_name")
    del _mutate

    def __getattr__(self, name: str) -> Any:  # kind, name, attributes, ... of the real span
        if name == "_span":
            raise AttributeError(name)
        return getattr(self._span, name)


class _Recorder:
    """Stands in front of the instrumentor's tracer: counts the spans started and checks they end.

    ``start``: ``start_span`` raises. ``failing``: every span method that
    changes the span raises (the steps after the start).
    """

    def __init__(self, tracer: Any, ours: Sequence[str], start: bool = False, failing: bool = False) -> None:
        self._tracer = tracer
        self._ours = tuple(ours)
        self.start = start
        self.failing = failing
        self.calls = 0
        self.faults = 0
        self.spans: List[_RecordedSpan] = []

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.start:
            self.faults += 1
            raise InjectedFault(f"{FAULT}: start_span")
        span = _RecordedSpan(self._tracer.start_span(*args, **kwargs), self)
        self.spans.append(span)
        return span

    @contextlib.contextmanager
    def start_as_current_span(self, *args: Any, end_on_exit: bool = True, **kwargs: Any) -> Iterator[Any]:
        span = self.start_span(*args, **kwargs)
        with trace.use_span(span, end_on_exit=end_on_exit):
            yield span

    def ours(self, frame: Any) -> bool:
        """Whether ``frame`` runs our code (autotrace's or the instrumentor's package), not the library's."""
        name = frame.f_globals.get("__name__", "")
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self._ours)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracer, name)

    def unended(self) -> List[str]:
        return [f"{s._span.name!r} ended {s.ends} times" for s in self.spans if s.ends != 1]


_HOOKS = ("describe", "finish", "record", "outlive")


class _CallSpanHooks:
    """While active, every :class:`autotrace.kit.CallSpan` built gets its hooks behind switches.

    ``failing``: the name of the hook that raises (or None). ``hits`` counts
    the raises per hook -- a fault that never fired proves nothing.
    """

    def __init__(self) -> None:
        self.failing: Optional[str] = None
        self.hits: Dict[str, int] = {name: 0 for name in _HOOKS}
        self.built = 0

    def _switch(self, hook: str, function: Any) -> Any:
        @functools.wraps(function)
        def switched(*args: Any, **kwargs: Any) -> Any:
            if self.failing == hook:
                self.hits[hook] += 1
                raise InjectedFault(f"{FAULT}: CallSpan {hook}")
            return function(*args, **kwargs)

        return switched

    @contextlib.contextmanager
    def installed(self) -> Iterator["_CallSpanHooks"]:
        from autotrace.kit import CallSpan

        original = CallSpan.__init__
        hooks = self

        @functools.wraps(original)
        def init(span_self: Any, instrumentor: Any, describe: Any, *args: Any, **kwargs: Any) -> None:
            bound = inspect.signature(original).bind(span_self, instrumentor, describe, *args, **kwargs)
            arguments = bound.arguments
            hooks.built += 1
            for hook in _HOOKS:
                if arguments.get(hook) is not None:
                    arguments[hook] = hooks._switch(hook, arguments[hook])
            original(*bound.args, **bound.kwargs)

        CallSpan.__init__ = init  # type: ignore[method-assign]
        try:
            yield self
        finally:
            CallSpan.__init__ = original  # type: ignore[method-assign]


def _load(path: str) -> type:
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


# --------------------------------------------------------------------------
# The declaration


class Contract:
    """The declaration of one instrumentor's patching; :meth:`install` adds its tests to a test module.

    ``instrumentor``: ``"module:Class"`` (as in the entry point). ``module``:
    the library's import name (its first import triggers the patch).
    ``targets`` / ``async_targets``: ``"module:Class.attribute"`` paths the
    instrumentor replaces (async ones must be coroutine functions).
    ``state``: a Python expression (``mod`` is ``importlib.import_module``),
    evaluated in-process and in the ``autotrace-run`` child, whose value
    changes while patched -- for what is not an attribute (event listeners).
    ``call`` / ``calls``: zero-argument callables (or coroutine functions)
    making one real traced call each and returning a comparable value.
    ``error_call``: one whose library call raises. ``spans_per_call``: the
    exact number of spans one call makes, or one number per call (default:
    at least one).
    ``suppression``: ``False`` with a reason string instead when the
    instrumentor's spans are meant to ignore ``suppressed()``.
    ``describe_fault(instrumentor)``: a context manager making one of the
    instrumentor's own steps raise through public means. ``requires``:
    services for :func:`tests.support.services.require`. ``env``: extra
    environment for the ``autotrace-run`` child.
    """

    def __init__(
        self,
        instrumentor: str,
        module: str,
        targets: Sequence[str] = (),
        async_targets: Sequence[str] = (),
        call: Optional[Callable[[], Any]] = None,
        calls: Sequence[Callable[[], Any]] = (),
        error_call: Optional[Callable[[], Any]] = None,
        spans_per_call: Union[None, int, Sequence[Optional[int]]] = None,
        state: Optional[str] = None,
        suppression: Any = True,
        describe_fault: Optional[Callable[[Any], Any]] = None,
        requires: Sequence[tuple] = (),
        env: Optional[Dict[str, str]] = None,
        name: Optional[str] = None,
    ) -> None:
        self.instrumentor = instrumentor
        self.module = module
        self.async_targets = list(async_targets)
        self.targets = list(targets) + [t for t in self.async_targets if t not in targets]
        self.calls = ([call] if call is not None else []) + list(calls)
        self.error_call = error_call
        if spans_per_call is None or isinstance(spans_per_call, int):
            spans_per_call = [spans_per_call] * len(self.calls)
        if len(spans_per_call) != len(self.calls):
            raise ValueError("spans_per_call: one number per call")
        self.spans_per_call = list(spans_per_call)
        self.state = state
        self.suppression = suppression
        self.describe_fault = describe_fault
        self.requires = list(requires)
        self.env = dict(env or {})
        self.name = name or module.replace(".", "_")
        if not self.targets and not self.state:
            raise ValueError("a contract needs targets or a state expression")

    # -- helpers used by the generated tests ------------------------------------
    def originals(self) -> Dict[str, Any]:
        return {target: raw_attribute(target) for target in self.targets}

    def current_state(self) -> Any:
        return eval(self.state, {"mod": importlib.import_module}) if self.state else None  # noqa: S307

    def baseline(self) -> List[Tuple[Any, ...]]:
        """Outcomes of the calls (and the error call) with nothing patched."""
        return [outcome(call) for call in self._all_calls()]

    def _all_calls(self) -> List[Callable[[], Any]]:
        return self.calls + ([self.error_call] if self.error_call is not None else [])

    def _require(self) -> None:
        for service in self.requires:
            require(service)

    def _need_calls(self) -> None:
        if not self.calls:
            pytest.skip("the contract declares no call")
        self._require()

    @contextlib.contextmanager
    def patched(
        self, start_fails: bool = False, spans_fail: bool = False, hooks: Optional[_CallSpanHooks] = None
    ) -> Iterator[Tuple[Any, _Recorder]]:
        """A fresh instrumentor, its tracer behind a :class:`_Recorder`, patched now; unpatched after."""
        for target in self.targets:
            resolve(target)  # the library is imported before patching, as in a program that imported it
        hooks = hooks or _CallSpanHooks()
        with hooks.installed():
            instrumentor = _load(self.instrumentor)()
            ours = {"autotrace", self.instrumentor.partition(":")[0].split(".")[0]}
            recorder = _Recorder(instrumentor.tracer, sorted(ours), start=start_fails, failing=spans_fail)
            instrumentor._tracer = recorder
            try:
                instrumentor.instrument()
            except BaseException:
                instrumentor.unpatch()
                raise
        try:
            yield instrumentor, recorder
        finally:
            instrumentor.unpatch()

    def _count_spans(self, spans: Any, call: Callable[[], Any]) -> Tuple[Tuple[Any, ...], int]:
        spans.clear()
        result = outcome(call)
        return result, len(spans.get())

    def _check_span_count(self, count: int, call: Callable[[], Any]) -> None:
        label = getattr(call, "__name__", repr(call))
        expected = self.spans_per_call[self.calls.index(call)]
        if expected is None:
            assert count >= 1, f"{label}: the patched call made no span"
        else:
            assert count == expected, f"{label}: {count} spans, expected {expected}"

    # -- the lazy-patching child ----------------------------------------------------
    def lazy_script(self) -> str:
        modules = [t.partition(":")[0] for t in self.targets]
        watched = sorted({self.module, self.module.split(".")[0], self.instrumentor.partition(":")[0]}
                         | set(modules) | {m.split(".")[0] for m in modules})
        return textwrap.dedent(
            f"""
            import importlib, json, sys
            early = [name for name in {watched!r} if name in sys.modules]
            import {self.module}
            from autotrace import plugins

            def raw(target):
                module_name, _, path = target.partition(":")
                owner = importlib.import_module(module_name)
                *parents, attribute = path.split(".")
                for name in parents:
                    owner = getattr(owner, name)
                return vars(owner).get(attribute)

            def state():
                expression = {self.state!r}
                return repr(eval(expression, {{"mod": importlib.import_module}})) if expression else None

            targets = {self.targets!r}
            patched = [raw(t) for t in targets]
            patched_state = state()
            activator = plugins.current()
            states = {{p.value: p.state for p in (activator.plugins if activator else [])}}
            if activator is not None:
                activator.unpatch_all()
            restored = [raw(t) for t in targets]
            print(json.dumps({{
                "early": early,
                "plugin": states.get({self.instrumentor!r}),
                "unchanged": [t for t, p, r in zip(targets, patched, restored) if p is r],
                "state_changed": patched_state != state(),
                "plugins": states,
            }}))
            """
        )

    # -- the tests ---------------------------------------------------------------------
    def install(self, namespace: Dict[str, Any]) -> type:
        """Add the generated test class ``Test<Name>Contract`` to ``namespace`` (a module's ``globals()``)."""
        cls = self.test_class()
        namespace[cls.__name__] = cls
        return cls

    def test_class(self) -> type:
        contract = self

        class Generated:
            def test_unpatch_restores_every_original(self) -> None:
                originals = contract.originals()
                state = contract.current_state()
                with contract.patched() as (instrumentor, _):
                    unchanged = [t for t in contract.targets if raw_attribute(t) is originals[t]]
                    assert not unchanged, f"targets not patched: {unchanged}"
                    if contract.state:
                        assert contract.current_state() != state, f"state {contract.state!r} did not change"
                    instrumentor.unpatch()
                    instrumentor.unpatch()  # twice is harmless
                    changed = [t for t in contract.targets if raw_attribute(t) is not originals[t]]
                    assert not changed, f"not restored exactly: {changed}"
                    assert contract.current_state() == state

            def test_patching_twice_adds_no_second_wrapper(self, spans: Any) -> None:
                contract._need_calls()
                with contract.patched() as (instrumentor, _):
                    once = {t: (raw_attribute(t), wrapper_layers(raw_attribute(t))) for t in contract.targets}
                    state = contract.current_state()
                    counts = [contract._count_spans(spans, call)[1] for call in contract.calls]
                    instrumentor.instrument()
                    for module_name in list(instrumentor.patched_modules):
                        instrumentor.patch_module(module_name, importlib.import_module(module_name))
                    twice = {t: wrapper_layers(raw_attribute(t)) for t in contract.targets}
                    extra = [t for t in contract.targets if twice[t] != once[t][1]]
                    assert not extra, f"a second wrapper on {extra}"
                    assert contract.current_state() == state, "patching twice changed the state again"
                    again = [contract._count_spans(spans, call)[1] for call in contract.calls]
                    assert again == counts, f"spans per call: {counts} patched once, {again} patched twice"
                    for count, call in zip(again, contract.calls):
                        contract._check_span_count(count, call)

            def test_patched_lazily_under_autotrace_run(self) -> None:
                env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", **contract.env}
                child = run_traced(["python", "-c", contract.lazy_script()], env=env, timeout=60)
                assert child.returncode == 0, child.stderr
                report = json.loads(child.stdout.strip().splitlines()[-1])
                assert report["early"] == [], f"imported at start-up: {report['early']}"
                assert report["plugin"] == "patched", f"plugin state {report['plugin']!r}: {report['plugins']}"
                assert report["unchanged"] == [], f"not patched on first import: {report['unchanged']}"
                if contract.state:
                    assert report["state_changed"], f"state {contract.state!r} unchanged on first import"

            def test_failing_start_span_never_reaches_the_program(self, spans: Any, caplog: Any) -> None:
                contract._need_calls()
                expected = contract.baseline()
                caplog.set_level(logging.ERROR, logger="autotrace")
                with contract.patched(start_fails=True) as (_, recorder):
                    spans.clear()
                    got = [outcome(call) for call in contract._all_calls()]
                assert recorder.calls >= 1, "the calls never reached the instrumentor's tracer"
                assert got == expected
                assert spans.get() == [], "spans despite start_span failing"
                reported = [r for r in caplog.records if r.name.startswith("autotrace") and r.levelno >= logging.ERROR]
                assert reported, "our failure was not reported on the 'autotrace' logger"

            def test_failing_span_methods_never_reach_the_program(self, spans: Any) -> None:
                contract._need_calls()
                expected = contract.baseline()
                with contract.patched(spans_fail=True) as (_, recorder):
                    got = [outcome(call) for call in contract._all_calls()]
                assert got == expected
                assert recorder.spans, "no span was started"
                assert not recorder.unended(), f"spans not ended exactly once: {recorder.unended()}"

            def test_failing_hooks_never_reach_the_program(self, spans: Any) -> None:
                contract._need_calls()
                expected = contract.baseline()
                fired = []
                hooks = _CallSpanHooks()
                with contract.patched(hooks=hooks) as (instrumentor, recorder):
                    for hook in _HOOKS:
                        hooks.failing = hook
                        got = [outcome(call) for call in contract._all_calls()]
                        assert got == expected, f"with CallSpan {hook} failing"
                        if hooks.hits[hook]:
                            fired.append(hook)
                    hooks.failing = None
                    if contract.describe_fault is not None:
                        with contract.describe_fault(instrumentor):
                            got = [outcome(call) for call in contract._all_calls()]
                        assert got == expected, "with describe_fault"
                        fired.append("describe_fault")
                assert not recorder.unended(), f"spans not ended exactly once: {recorder.unended()}"
                if not fired:
                    pytest.skip(f"no hook fault fired: {hooks.built} CallSpan built, describe_fault not given")

            def test_suppressed_calls_make_no_span(self, spans: Any) -> None:
                contract._need_calls()
                if contract.suppression is not True:
                    pytest.skip(f"declared: {contract.suppression}")
                expected = contract.baseline()
                with contract.patched():
                    spans.clear()
                    with suppressed():
                        got = [outcome(call) for call in contract._all_calls()]
                    assert [s.name for s in spans.get()] == []
                    assert got == expected
                    for call in contract.calls:  # and the same calls do make spans unsuppressed
                        contract._check_span_count(contract._count_spans(spans, call)[1], call)

            def test_async_targets_stay_coroutine_functions(self) -> None:
                natures = {}
                for target in contract.targets:
                    owner, attribute = resolve(target)
                    natures[target] = _nature(getattr(owner, attribute, None))
                for target in contract.async_targets:
                    assert natures[target][0], f"{target} is not a coroutine function unpatched"
                with contract.patched():
                    for target in contract.targets:
                        owner, attribute = resolve(target)
                        assert _nature(getattr(owner, attribute, None)) == natures[target], target

            def test_signatures_unchanged(self) -> None:
                before = {}
                for target in contract.targets:
                    owner, attribute = resolve(target)
                    before[target] = _signature(getattr(owner, attribute, None))
                with contract.patched():
                    for target in contract.targets:
                        owner, attribute = resolve(target)
                        assert _signature(getattr(owner, attribute, None)) == before[target], target

            def test_results_and_errors_unchanged(self, spans: Any) -> None:
                contract._need_calls()
                expected = contract.baseline()
                with contract.patched():
                    got = []
                    for call in contract.calls:
                        result, count = contract._count_spans(spans, call)
                        got.append(result)
                        contract._check_span_count(count, call)
                    if contract.error_call is not None:
                        got.append(outcome(contract.error_call))
                assert got == expected
                if contract.error_call is not None:
                    assert expected[-1][0] == "raised", "error_call did not raise"

        title = "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", contract.name) if part)
        Generated.__name__ = Generated.__qualname__ = f"Test{title}Contract"
        Generated.__doc__ = f"The instrumentor contract of {contract.instrumentor}."
        return Generated
