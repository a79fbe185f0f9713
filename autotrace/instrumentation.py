"""What every instrumentor stands on: the contract, class-level patching, error
isolation, suppression and the span-around-a-call template.

An instrumentor file should only say *what* to wrap and *which attributes* to
set. Everything that must be right once for all libraries lives here:

* ``Instrumentor`` -- the per-library contract (name, distribution, supported
  version range, target modules, ``patch``/``unpatch``), in the spirit of
  upstream's ``BaseInstrumentor`` and ddtrace's patch/unpatch modules.
* ``wrap`` / ``unwrap`` -- patch a *method on a class* (never rebind a module
  attribute, so ``from flask import Flask`` done early still sees the patch) and
  restore the original exactly.
* ``guard`` / ``guarded`` -- our code never raises into the host program: an
  error is logged once per site and the user's call proceeds.
* The span lifecycle itself (spans around calls, spans that outlive them,
  server spans, the error policy) is :mod:`autotrace.kit`'s.
"""

from __future__ import annotations

import functools
import inspect
from typing import (
    Any,
    Callable,
    ClassVar,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

import wrapt
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

from autotrace import __version__
from autotrace._log import error_once

try:  # present in every API version we support, but stay defensive
    from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY
except ImportError:  # pragma: no cover
    _SUPPRESS_HTTP_INSTRUMENTATION_KEY = otel_context.create_key("suppress_http_instrumentation")

F = TypeVar("F", bound=Callable[..., Any])

SUPPRESS_INSTRUMENTATION_KEY = _SUPPRESS_INSTRUMENTATION_KEY
SUPPRESS_HTTP_INSTRUMENTATION_KEY = _SUPPRESS_HTTP_INSTRUMENTATION_KEY

_MISSING = object()


# --------------------------------------------------------------------------
# Error isolation


class guard:
    """``with guard("redis.start"):`` -- swallow and report errors of *our* code.

    Use it only around instrumentation code, never around the user's call:
    the user's own exceptions must propagate unchanged.
    """

    __slots__ = ("site",)

    def __init__(self, site: str) -> None:
        self.site = site

    def __enter__(self) -> "guard":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            return False
        if not issubclass(exc_type, Exception):
            return False  # KeyboardInterrupt, SystemExit, GeneratorExit: not ours to swallow
        error_once(
            self.site,
            "autotrace: internal error in %s; the program continues, this call may be untraced",
            self.site,
        )
        return True


def guarded(site: str, default: Any = None) -> Callable[[F], F]:
    """Decorator form of :class:`guard`: on error, log once and return ``default``."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except Exception:
                error_once(
                    site,
                    "autotrace: internal error in %s; the program continues, this call may be untraced",
                    site,
                )
                return default

        return run  # type: ignore[return-value]

    return decorate


# --------------------------------------------------------------------------
# Suppression


def is_suppressed(http: bool = False) -> bool:
    """True while instrumentation must stay silent (exporter traffic, nested calls).

    The BatchSpanProcessor sets the OTel suppress key while exporting; HTTP
    client instrumentors also set the HTTP key so that a lower-level HTTP
    instrumentor (urllib3, http.client plugins) does not add a duplicate span.
    """
    current = otel_context.get_current()
    if current.get(_SUPPRESS_INSTRUMENTATION_KEY):
        return True
    return http and bool(current.get(_SUPPRESS_HTTP_INSTRUMENTATION_KEY))


class suppressed:
    """``with suppressed():`` -- nothing inside produces spans (``http=True``: only HTTP clients)."""

    __slots__ = ("key", "token")

    def __init__(self, http: bool = False) -> None:
        self.key = _SUPPRESS_HTTP_INSTRUMENTATION_KEY if http else _SUPPRESS_INSTRUMENTATION_KEY
        self.token: Any = None

    def __enter__(self) -> "suppressed":
        self.token = otel_context.attach(otel_context.set_value(self.key, True))
        return self

    def __exit__(self, *exc: Any) -> None:
        otel_context.detach(self.token)


# --------------------------------------------------------------------------
# Propagation

_W3C_ONLY: Tuple[Any, bool] = (None, False)  # (global propagator last checked, whether it is W3C only)


def inject(carrier: Any, context: Any) -> None:
    """``propagate.inject(carrier, context=context)`` into a dict-like carrier.

    Why: with the default propagators (``tracecontext,baggage``), the API's
    path -- composite, per-propagator getters and setters -- cost an outgoing
    request about a third of what starting its span costs. When the global propagator is
    the composite the agent installed with exactly those W3C propagators,
    ``traceparent`` and ``tracestate`` are written here as the W3C propagator
    writes them, and only non-empty baggage goes through its propagator. Any
    other propagator (B3, Jaeger, a plugin, one the program installed) is
    called as it is.
    """
    global _W3C_ONLY
    textmap = propagate.get_global_textmap()
    checked, w3c_only = _W3C_ONLY
    if checked is not textmap:
        w3c_only = _is_w3c_only(textmap)
        _W3C_ONLY = (textmap, w3c_only)
    if not w3c_only:
        textmap.inject(carrier, context=context)
        return
    span_context = trace.get_current_span(context).get_span_context()
    if span_context != trace.INVALID_SPAN_CONTEXT:
        # %-formatting: TraceFlags (an int subclass) formats slowly through an f-string.
        carrier["traceparent"] = "00-%032x-%016x-%02x" % (span_context.trace_id, span_context.span_id, span_context.trace_flags)
        if span_context.trace_state:
            carrier["tracestate"] = span_context.trace_state.to_header()
    if baggage.get_all(context):
        for propagator in textmap._propagators:
            if type(propagator) is W3CBaggagePropagator:
                propagator.inject(carrier, context=context)


def _is_w3c_only(textmap: Any) -> bool:
    """The composite of ``tracecontext`` (and optionally ``baggage``), exactly the SDK's classes."""
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if type(textmap) is not CompositePropagator:
        return False
    kinds = [type(p) for p in getattr(textmap, "_propagators", ())]
    return kinds in ([TraceContextTextMapPropagator], [TraceContextTextMapPropagator, W3CBaggagePropagator])


# --------------------------------------------------------------------------
# Class-level wrapping


def _resolve(owner: Any, path: str) -> Tuple[Any, str]:
    """``(module_or_class, "Class.method")`` -> ``(Class, "method")``."""
    parts = path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


class Patch:
    """One applied wrapper, remembering exactly what it replaced."""

    __slots__ = ("owner", "name", "original", "wrapper")

    def __init__(self, owner: Any, name: str, original: Any, wrapper: Any) -> None:
        self.owner = owner
        self.name = name
        self.original = original
        self.wrapper = wrapper

    def undo(self) -> None:
        if self.owner.__dict__.get(self.name) is not self.wrapper:
            return  # someone wrapped on top of us; leave their wrapper in place
        if self.original is _MISSING:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.original)


def wrap(owner: Any, path: str, wrapper: Callable[..., Any]) -> Patch:
    """Wrap ``owner.path`` (e.g. ``(redis.client, "Redis.execute_command")``) in place.

    ``wrapper(wrapped, instance, args, kwargs)`` follows wrapt's convention. The
    wrapped attribute keeps its name, signature, docstring and async nature.
    Wrapping the same target twice is refused (returns the existing patch).
    """
    target, name = _resolve(owner, path)
    namespace = getattr(target, "__dict__", {})
    original = namespace.get(name, _MISSING)
    if getattr(original, "_self_autotrace_wrapper", None) is wrapper:
        return Patch(target, name, original, original)
    # An inherited attribute is wrapped as its raw descriptor, found statically.
    descriptor = original if original is not _MISSING else inspect.getattr_static(target, name)
    function_wrapper = wrapt.FunctionWrapper(descriptor, wrapper)
    function_wrapper._self_autotrace_wrapper = wrapper  # type: ignore[attr-defined]
    setattr(target, name, function_wrapper)
    return Patch(target, name, original, function_wrapper)


def _unwrapped(descriptor: Any) -> Any:
    """The function under a (possibly wrapt-wrapped) descriptor."""
    while isinstance(descriptor, wrapt.FunctionWrapper) or isinstance(descriptor, wrapt.ObjectProxy):
        descriptor = descriptor.__wrapped__
    return descriptor


def unwrap(patch: Patch) -> None:
    """Restore what :func:`wrap` replaced."""
    patch.undo()


def is_wrapped(owner: Any, path: str) -> bool:
    target, name = _resolve(owner, path)
    return isinstance(target.__dict__.get(name), wrapt.FunctionWrapper)


# --------------------------------------------------------------------------
# The instrumentor contract


class Instrumentor:
    """Base class of every autotrace instrumentor (built-in or plugin).

    Subclasses set the class attributes and implement :meth:`patch_module`
    (called once for each module in :attr:`modules` when it is first imported,
    or at once if it already is), using :meth:`wrap` so that :meth:`unpatch`
    can undo everything.
    """

    #: Name used in ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` and ``--info``.
    name: ClassVar[str] = ""
    #: Distribution whose installed version is checked (``pip`` name).
    distribution: ClassVar[str] = ""
    #: Supported versions as a PEP 440 specifier, e.g. ``">=4,<9"``.
    supported: ClassVar[str] = ""
    #: Modules whose first import triggers :meth:`patch_module`.
    modules: ClassVar[Sequence[str]] = ()
    #: Upstream instrumentation names (entry points of ``opentelemetry_instrumentor``) whose
    #: library this instrumentor traces itself: those plugins are never activated.
    covers: ClassVar[Sequence[str]] = ()

    def __init__(self) -> None:
        self._patches: List[Patch] = []
        self._tracer: Optional[trace.Tracer] = None
        self.patched_modules: List[str] = []

    # -- to implement -----------------------------------------------------
    def patch_module(self, module_name: str, module: Any) -> None:
        """Install wrappers for ``module`` (one of :attr:`modules`)."""
        raise NotImplementedError

    def unpatch_extra(self) -> None:
        """Undo anything not done with :meth:`wrap` (event listeners, ...)."""

    # -- helpers ------------------------------------------------------------
    def instrument(self) -> "Instrumentor":
        """Import and patch every target module now (tests, programmatic use).

        The agent itself never calls this: it patches lazily on first import.
        A target module this version of the library does not have (e.g.
        ``redis.asyncio.cluster`` before redis-py 4.3) is skipped; the first
        one must import.
        """
        import importlib

        for position, module_name in enumerate(self.modules or (self.name,)):
            if module_name in self.patched_modules:
                continue
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                if position == 0:
                    raise
                continue
            self.patch_module(module_name, module)
            self.patched_modules.append(module_name)
        return self

    def wrap(self, owner: Any, path: str, wrapper: Any) -> None:
        """Class-level :func:`wrap`, remembered for :meth:`unpatch`.

        ``wrapper`` is a wrapt-style function or a :class:`autotrace.kit.CallSpan`
        (its sync or async wrapper is chosen by the target's nature). A target
        missing in this library version is skipped (logged at debug): one
        absent method must not stop the rest of the instrumentor.
        """
        try:
            if hasattr(wrapper, "for_target"):
                target, name = _resolve(owner, path)
                wrapper = wrapper.for_target(_unwrapped(inspect.getattr_static(target, name)))
            self._patches.append(wrap(owner, path, wrapper))
        except AttributeError:
            from autotrace._log import logger

            logger.debug("autotrace: %s: %s not found on %r; skipped", self.name, path, owner)

    def unpatch(self) -> None:
        """Restore every original; safe to call twice."""
        while self._patches:
            self._patches.pop().undo()
        self.unpatch_extra()
        self.patched_modules.clear()

    @property
    def tracer(self) -> trace.Tracer:
        if self._tracer is None:
            from autotrace.spans import starter_for

            self._tracer = starter_for(trace.get_tracer(f"autotrace.instrumentors.{self.name}", __version__))[0]
        return self._tracer

    def reset_tracer(self) -> None:
        self._tracer = None
