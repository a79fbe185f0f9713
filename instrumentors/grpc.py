"""grpcio (1.60+): a CLIENT span per call made through a channel, a SERVER span per call served; sync and ``grpc.aio``.

What is wrapped (at class level, each module when it is first imported, so
channels, stubs and servers made before or after work alike):

* ``grpc._channel``: ``_UnaryUnaryMultiCallable`` and ``_StreamUnaryMultiCallable``
  ``__call__`` / ``with_call`` (the span covers the blocking call) and
  ``future``; ``_UnaryStreamMultiCallable``, ``_SingleThreadedUnaryStreamMultiCallable``
  and ``_StreamStreamMultiCallable`` ``__call__``. ``grpc.aio._channel``: the
  four ``*MultiCallable.__call__``. Futures, response streams and aio calls end
  their span when the RPC terminates (exhausted, failed, cancelled, collected),
  through the call's completion callback -- the call object handed back is the
  library's own, untouched.
* ``grpc._server._Server`` and ``grpc.aio._server.Server``: ``__init__``,
  ``add_generic_rpc_handlers`` and ``add_registered_method_handlers`` register
  traced copies of the handlers (generated code, ``method_handlers_generic_handler``
  and custom ``GenericRpcHandler``s alike); each behaviour keeps its nature
  (function, generator, coroutine, async generator) -- see :mod:`autotrace.rpc`.

Context: the client injects through the configured propagators into a *copy*
of the call's metadata; the server extracts from the invocation metadata.
Message bodies and metadata values are never recorded.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from autotrace.kit import CallSpan, Instrumentor, Plan, arg, guard, record_error, replace_arg
from autotrace.rpc import (GRPC_SERVER_ERRORS, CallEnd, Conventions, MetadataCarrier, RpcServer, as_text, done_value,
                           parse_grpc_peer, registering, status_name)

_BLOCKING = ("_UnaryUnaryMultiCallable.__call__", "_UnaryUnaryMultiCallable.with_call",
             "_StreamUnaryMultiCallable.__call__", "_StreamUnaryMultiCallable.with_call")
_OUTLIVING = ("_UnaryUnaryMultiCallable.future", "_StreamUnaryMultiCallable.future", "_UnaryStreamMultiCallable.__call__",
              "_SingleThreadedUnaryStreamMultiCallable.__call__", "_StreamStreamMultiCallable.__call__")
_AIO = ("UnaryUnaryMultiCallable.__call__", "UnaryStreamMultiCallable.__call__",
        "StreamUnaryMultiCallable.__call__", "StreamStreamMultiCallable.__call__")
_BEHAVIORS = (("unary_unary", False), ("unary_stream", True), ("stream_unary", False), ("stream_stream", True))


def _target(callable_: Any) -> Any:
    target = getattr(callable_, "_target", None)  # sync, grpcio >= 1.6x: the configured target
    if target is None:
        references = getattr(callable_, "_references", None)  # aio: [its Channel], which remembers it
        target = getattr(references[0], "_autotrace_target", None) if references else None
    if target is None:
        target = getattr(callable_._channel, "target", None)  # cygrpc: a method (sync), bytes (aio 1.8x)
        target = target() if callable(target) else target
    return target


def _remember_target(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """``grpc.aio`` ``Channel.__init__``: keep the configured target (the aio channel has no ``target`` before 1.8x)."""
    result = wrapped(*args, **kwargs)
    with guard("grpc.channel"):
        instance._autotrace_target = arg(args, kwargs, 0, "target")
    return result


def _sync_status(state: Any) -> Tuple[str, Optional[str]]:
    return status_name(state.code) or "UNKNOWN", as_text(state.details)


def _aio_status(cython_call: Any) -> Tuple[str, Optional[str]]:
    status = cython_call._status
    if status is None:
        return "CANCELLED" if cython_call.cancelled() else "UNKNOWN", None
    return status_name(status.code()) or "UNKNOWN", status.details()


def _done_status(call: Any) -> Tuple[str, Optional[str]]:
    """A terminated aio call through interceptors: its (already resolved) ``code()`` and ``details()``."""
    return status_name(done_value(call.code())) or "UNKNOWN", done_value(call.details())


def _cancelled(context: Any) -> bool:
    cancelled = getattr(context, "cancelled", None)  # aio
    return cancelled() if cancelled is not None else not context.is_active()


def _aborted(exc: BaseException) -> bool:
    """``context.abort()`` raised: a bare ``Exception`` (sync) or ``grpc.aio.AbortError`` -- a status, not a failure."""
    return (type(exc) is Exception and not exc.args) or type(exc).__name__ == "AbortError"


def _watch(context: Any, callback: Any) -> None:
    add = getattr(context, "add_done_callback", None)  # aio; sync: add_callback
    (add or context.add_callback)(callback)


class _Handlers:
    """A registered ``GenericRpcHandler`` whose method handlers come back traced (cached per method)."""

    __slots__ = ("_inner", "_trace", "_cache")

    def __init__(self, inner: Any, trace: Any) -> None:
        self._inner, self._trace, self._cache = inner, trace, {}

    def service(self, details: Any) -> Any:
        handler = self._inner.service(details)
        if handler is None:
            return None
        entry = self._cache.get(details.method)
        if entry is None or entry[0] is not handler:
            entry = (handler, self._trace(handler, details.method))
            if len(self._cache) < 1024:
                self._cache[details.method] = entry
        return entry[1]


class GrpcInstrumentor(Instrumentor):
    name = "grpc"
    distribution = "grpcio"
    supported = ">=1.60,<2"
    covers = ("grpc_client", "grpc_server", "grpc_aio_client", "grpc_aio_server")
    modules = ("grpc._channel", "grpc._server", "grpc.aio._channel", "grpc.aio._server")

    def __init__(self) -> None:
        super().__init__()
        self._conventions: Optional[Conventions] = None
        self._server: Optional[RpcServer] = None
        self._blocking = CallSpan(self, self._describe, finish=self._finish, record=self._record, site="grpc.call")
        self._outliving = CallSpan(self, self._describe, record=self._record, outlive=self._outlive, site="grpc.stream")
        self._init = registering(1, "generic_handlers", self._traced_handlers, "grpc.register")
        self._add = registering(0, "generic_rpc_handlers", self._traced_handlers, "grpc.register")
        self._methods = registering(1, "method_handlers", self._traced_methods, "grpc.register")

    def _describe(self, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        name, attrs = self._conventions.client(instance._method, _target(instance))  # type: ignore[union-attr]
        carrier = MetadataCarrier(arg(args, kwargs, 2, "metadata"))
        args, kwargs = replace_arg(args, kwargs, 2, "metadata", carrier)
        return Plan(name, attrs, carrier=carrier, args=args, kwargs=kwargs)

    def _finish(self, span: Any, result: Any, state: Any) -> None:
        self._conventions.client_status(span, "OK")  # type: ignore[union-attr]

    def _record(self, span: Any, exc: BaseException, state: Any) -> None:
        code = getattr(exc, "code", None)  # grpc.RpcError raised for a status
        code = status_name(code()) if callable(code) and callable(getattr(exc, "details", None)) else None
        if code is None:
            record_error(span, exc)
        else:
            self._conventions.client_status(span, code, as_text(exc.details()) or code, exc)  # type: ignore

    def _outlive(self, pending: Any, call: Any, state: Any) -> Any:
        cython_call = getattr(call, "_cython_call", None)
        if cython_call is not None:  # aio: its callback must not hold the call (a dropped call is cancelled)
            cython_call.add_done_callback(CallEnd(pending, cython_call, _aio_status, self._conventions))
        elif hasattr(call, "_interceptors_task"):  # aio with client interceptors
            call.add_done_callback(CallEnd(pending, None, _done_status, self._conventions))
        elif not call.add_callback(CallEnd(pending, call._state, _sync_status, self._conventions)):
            CallEnd(pending, call._state, _sync_status, self._conventions)()  # already terminated
        return call

    def _trace(self, handler: Any, method: str) -> Any:
        with guard("grpc.handler"):
            for attribute, streaming in _BEHAVIORS:
                behavior = getattr(handler, attribute, None)
                if behavior is not None and hasattr(handler, "_replace"):
                    return handler._replace(**{attribute: self._server.handler(behavior, method, streaming)})  # type: ignore
        return handler

    def _traced_handlers(self, handlers: Any, args: Any, kwargs: Any) -> Any:
        if not isinstance(handlers, (list, tuple)):
            return handlers
        return type(handlers)(_Handlers(h, self._trace) if callable(getattr(h, "service", None)) else h for h in handlers)

    def _traced_methods(self, handlers: Dict[str, Any], args: Any, kwargs: Any) -> Dict[str, Any]:
        service = arg(args, kwargs, 0, "service_name")
        return {method: self._trace(h, f"/{service}/{method}") for method, h in handlers.items()}

    def patch_module(self, module_name: str, module: Any) -> None:
        if self._conventions is None:
            self._conventions = Conventions("grpc", "rpc.grpc.status_code", GRPC_SERVER_ERRORS)
            self._server = RpcServer(
                self, self._conventions, metadata=lambda context: context.invocation_metadata(),
                code=lambda context: status_name(context.code()), details=lambda context: context.details(),
                cancelled=_cancelled, aborted=_aborted, watch=_watch, peer=lambda context: parse_grpc_peer(context.peer()))
        if module_name == "grpc._channel":
            for path in _BLOCKING:
                self.wrap(module, path, self._blocking)
            for path in _OUTLIVING:
                self.wrap(module, path, self._outliving)
        elif module_name == "grpc.aio._channel":
            self.wrap(module, "Channel.__init__", _remember_target)
            for path in _AIO:
                self.wrap(module, path, self._outliving)
        else:
            server = "_Server" if module_name == "grpc._server" else "Server"
            self.wrap(module, f"{server}.__init__", self._init)
            self.wrap(module, f"{server}.add_generic_rpc_handlers", self._add)
            self.wrap(module, f"{server}.add_registered_method_handlers", self._methods)
