"""RPC domain helpers: what every RPC instrumentor (gRPC, and the next one) shares.

Semantic conventions followed: RPC spans of semconv **v1.44.0**, status
*Release Candidate* (``span.rpc.call.client`` / ``span.rpc.call.server`` and
their gRPC refinements). Names used by default:

* ``rpc.system.name`` (was ``rpc.system``), ``rpc.method`` -- the
  fully-qualified ``{service}/{method}`` (it absorbed ``rpc.service``),
  ``rpc.response.status_code`` -- a string such as ``"OK"`` (was the integer
  ``rpc.grpc.status_code``), ``server.address`` / ``server.port`` from the
  client's configuration, ``network.peer.address`` / ``network.peer.port`` on
  the server, ``error.type`` -- the status code when it is an error.
* Span name: ``{rpc.method}``, else ``{rpc.system.name}``.
* ``OTEL_SEMCONV_STABILITY_OPT_IN=rpc/dup`` adds the old names too:
  ``rpc.system``, ``rpc.service`` and the system's old integer status key
  (``rpc.grpc.status_code``). ``rpc.method`` keeps the new (fully-qualified)
  value: one key cannot hold both.

What is here:

* :class:`Conventions` -- attributes and span names (cached per method and
  target), and client / server status -> span status.
* :func:`parse_grpc_target` / :func:`parse_grpc_peer` -- the gRPC naming
  rules (also used by other gRPC stacks).
* :func:`status_name`, :func:`as_text`, :func:`done_value` -- status facts
  as the libraries hand them (enums, bytes, async getters of a finished call).
* :func:`registering` -- a wrapper for handler-registration methods that
  registers traced copies in place of the caller's handlers.
* :class:`MetadataCarrier` and :data:`METADATA_GETTER` -- inject into a copy
  of the caller's metadata (a sequence of key/value pairs), extract from the
  incoming one.
* :class:`CallEnd` -- ends a client span that outlived its call once the RPC
  terminates (a completion callback), with the status read from the call.
* :class:`RpcServer` / :class:`ServerCall` -- server handlers wrapped in a
  SERVER span of the same nature (sync function, iterator-returning function,
  coroutine function, async generator function), ended once: when the
  handler returns or raises, when its response stream ends, or when the RPC
  terminates first (cancellation, deadline) -- whichever comes first.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, Status, StatusCode

from autotrace._log import internal_error
from autotrace.config import semconv_dup
from autotrace.kit import (
    TracedAsyncIterator,
    TracedIterator,
    arg,
    record_error,
    replace_arg,
    set_attributes,
    start_server_span,
)

#: gRPC status code names by number (grpc/doc/statuscodes.md).
GRPC_STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
#: Server-side statuses that are errors (semconv gRPC server span); on the client every non-OK status is.
GRPC_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})

_CACHE_LIMIT = 1024


def status_name(code: Any, names: Tuple[str, ...] = GRPC_STATUS_NAMES) -> Optional[str]:
    """A status code as its name: an enum member (``grpc.StatusCode.NOT_FOUND``) or a number -> ``"NOT_FOUND"``."""
    if code is None:
        return None
    name = getattr(code, "name", None)
    if isinstance(name, str):
        return name
    return names[code] if isinstance(code, int) and 0 <= code < len(names) else "UNKNOWN"


def as_text(value: Any) -> Optional[str]:
    """Status details as text (some libraries keep them as bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def done_value(coroutine: Any) -> Any:
    """The value of a coroutine that completes without waiting (an async getter of a finished call), else None."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()  # it would have waited: not finished after all
    return None


def grpc_status_number(name: str) -> Optional[int]:
    try:
        return GRPC_STATUS_NAMES.index(name)
    except ValueError:
        return None


# --------------------------------------------------------------------------
# Addresses


def _host_port(text: str) -> Optional[Tuple[str, Optional[int]]]:
    """``host:port`` / ``[v6]:port`` / ``host`` -> ``(host, port)``; None if it is not one."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if not rest:
            return host, None
        if not rest.startswith(":") or not rest[1:].isdigit():
            return None
        return host, int(rest[1:])
    if text.count(":") > 1:  # a bare IPv6 address (no port)
        return text, None
    host, colon, port = text.partition(":")
    if not host or "/" in host or "," in host:
        return None
    if not colon:
        return host, None
    return (host, int(port)) if port.isdigit() else None


def parse_grpc_target(target: Any) -> Tuple[str, Optional[int]]:
    """``server.address`` / ``server.port`` of a gRPC channel target (gRPC Name Resolution rules).

    ``grpc.io:50051`` and ``dns://1.2.3.4/grpc.io:50051`` -> ``("grpc.io", 50051)``;
    ``ipv4:10.0.0.1:50051`` -> ``("10.0.0.1", 50051)``; ``unix:///run/x.sock`` ->
    ``("/run/x.sock", None)``; anything else (several addresses, ``zk://``, ``xds:///``)
    -> ``(whole target, None)``, as the conventions ask.
    """
    if isinstance(target, bytes):
        target = target.decode("utf-8", "replace")
    text = str(target)
    scheme, colon, rest = text.partition(":")
    if colon:
        if scheme in ("unix", "unix-abstract"):
            return (rest[2:] if rest.startswith("//") else rest) or text, None
        if scheme == "dns":
            text_part = rest[2:].partition("/")[2] if rest.startswith("//") else rest
            return _host_port(text_part) or (text, None)
        if scheme in ("ipv4", "ipv6"):
            return (None if "," in rest else _host_port(rest)) or (text, None)
        if rest.startswith("//"):  # another resolver (zk://, xds:///): no single server to name
            return text, None
    return _host_port(text) or (text, None)


def parse_grpc_peer(peer: Any) -> Optional[Tuple[str, Optional[int]]]:
    """``network.peer.address`` / ``.port`` of a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``)."""
    if not isinstance(peer, str) or ":" not in peer:
        return None
    scheme, _, rest = peer.partition(":")
    if scheme == "unix":
        return (rest or peer), None
    if scheme not in ("ipv4", "ipv6"):
        return None
    return _host_port(rest)


# --------------------------------------------------------------------------
# Attributes and status


class Conventions:
    """The RPC span attributes, names and status rules of one RPC system, for one configuration.

    ``old_status_key``: the system's pre-1.38 integer status attribute, added
    with ``rpc/dup`` (``rpc.grpc.status_code``). ``server_errors``: the status
    codes that make a SERVER span an error (on CLIENT spans every status but
    ``ok_status`` is one).
    """

    __slots__ = ("system", "dup", "old_status_key", "server_errors", "ok_status", "_client", "_server")

    def __init__(
        self,
        system: str,
        old_status_key: Optional[str] = None,
        server_errors: Iterable[str] = (),
        ok_status: str = "OK",
        dup: Optional[bool] = None,
    ) -> None:
        self.system = system
        self.dup = semconv_dup("rpc") if dup is None else dup
        self.old_status_key = old_status_key
        self.server_errors = frozenset(server_errors)
        self.ok_status = ok_status
        self._client: Dict[Any, Dict[Any, Tuple[str, Dict[str, Any]]]] = {}
        self._server: Dict[Any, Tuple[str, Dict[str, Any]]] = {}

    def attributes(self, method: Any, address: Optional[str] = None, port: Optional[int] = None) -> Tuple[str, Dict[str, Any]]:
        """``(span name, attributes)`` for ``method`` (``/pkg.Service/Method`` or ``pkg.Service/Method``)."""
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        full = str(method or "").lstrip("/")
        attrs: Dict[str, Any] = {"rpc.system.name": self.system}
        if full:
            attrs["rpc.method"] = full
        if address:
            attrs["server.address"] = address
            if port is not None:
                attrs["server.port"] = port
        if self.dup:
            attrs["rpc.system"] = self.system
            service, slash, _ = full.rpartition("/")
            if slash and service:
                attrs["rpc.service"] = service
        return full or self.system, attrs

    def client(self, method: Any, target: Any, parse: Callable[[Any], Tuple[str, Optional[int]]] = parse_grpc_target) -> Tuple[str, Dict[str, Any]]:
        """Cached :meth:`attributes` of a client call to ``method`` through a channel to ``target``."""
        by_target = self._client.get(method)
        if by_target is not None:
            facts = by_target.get(target)
            if facts is not None:
                return facts
        elif len(self._client) < _CACHE_LIMIT:
            by_target = self._client[method] = {}
        address, port = parse(target) if target else (None, None)
        facts = self.attributes(method, address, port)
        if by_target is not None and len(by_target) < _CACHE_LIMIT:
            by_target[target] = facts
        return facts

    def server(self, method: Any) -> Tuple[str, Dict[str, Any]]:
        """Cached :meth:`attributes` of an incoming call of ``method``."""
        facts = self._server.get(method)
        if facts is None:
            facts = self.attributes(method)
            if len(self._server) < _CACHE_LIMIT:
                self._server[method] = facts
        return facts

    def client_status(self, span: Span, code: str, message: Optional[str] = None, exc: Optional[BaseException] = None) -> None:
        """The status a client call ended with: every status but OK is an error."""
        self._status(span, code, message, exc, code != self.ok_status)

    def server_status(self, span: Span, code: str, message: Optional[str] = None, exc: Optional[BaseException] = None) -> None:
        """The status a server call ended with: an error only for :attr:`server_errors`.

        ``exc``: an exception the handler raised (recorded as an event even when
        its status is not an error).
        """
        self._status(span, code, message, exc, code in self.server_errors)

    def _status(self, span: Span, code: str, message: Optional[str], exc: Optional[BaseException], error: bool) -> None:
        if not span.is_recording():
            return
        attrs: Dict[str, Any] = {"rpc.response.status_code": code}
        if self.dup and self.old_status_key:
            number = grpc_status_number(code)
            if number is not None:
                attrs[self.old_status_key] = number
        if exc is not None and error:
            record_error(span, exc, message=message, error=code, attributes=attrs)
            return
        if exc is not None:
            span.record_exception(exc)
        if error:
            attrs["error.type"] = code
            span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"[:1024] if message else code))
        set_attributes(span, attrs)


# --------------------------------------------------------------------------
# Metadata


class MetadataCarrier(list):
    """A copy of the caller's metadata (key/value pairs) that propagators write into.

    ``carrier[key] = value`` (what ``inject`` does) replaces any pair with that
    key (lower-cased: gRPC metadata keys are); the caller's own sequence is
    never modified. Pass it where the metadata went (it is a list of pairs).
    """

    __slots__ = ()

    def __init__(self, metadata: Any = None) -> None:
        super().__init__(metadata or ())

    def __setitem__(self, key: Any, value: Any) -> None:  # type: ignore[override]
        if not isinstance(key, str):
            list.__setitem__(self, key, value)
            return
        key = key.lower()
        if any(pair[0] == key for pair in self):
            list.__setitem__(self, slice(None), [pair for pair in self if pair[0] != key])
        self.append((key, value))


class _MetadataGetter(Getter):
    """Reads propagation headers from incoming metadata (a sequence of key/value pairs)."""

    def get(self, carrier: Any, key: str) -> Optional[List[str]]:
        values = [pair[1] for pair in carrier or () if pair[0] == key and isinstance(pair[1], str)]
        return values or None

    def keys(self, carrier: Any) -> List[str]:
        return [pair[0] for pair in carrier or ()]


METADATA_GETTER = _MetadataGetter()


# --------------------------------------------------------------------------
# Registration


def registering(index: int, name: str, convert: Callable[[Any, Tuple[Any, ...], Dict[str, Any]], Any], site: str) -> Callable[..., Any]:
    """A wrapt-style wrapper for a method registering handlers (a server's ``add_handlers``, its ``__init__``).

    The argument ``name`` (or at ``index``) is replaced by ``convert(value,
    args, kwargs)`` -- traced copies of the handlers; the caller's objects are
    not modified. If ``convert`` fails, the caller's argument is passed as it is.
    Build it once per instrumentor: wrapping twice is recognised by identity.
    """

    def register(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            value = arg(args, kwargs, index, name)
            if value is not None:
                args, kwargs = replace_arg(args, kwargs, index, name, convert(value, args, kwargs))
        except Exception:
            internal_error(site)
        return wrapped(*args, **kwargs)

    return register


# --------------------------------------------------------------------------
# Client calls that outlive the call


class CallEnd:
    """Completion callback ending the client span of an RPC (a future, a response stream).

    ``read(source) -> (status code, message)`` reads the terminated call's
    status from ``source`` -- something that is not the user's call object
    when that object must not be kept alive by its own callback; with
    ``source=None``, from the first argument the callback is called with.
    """

    __slots__ = ("pending", "source", "read", "conventions")

    def __init__(self, pending: Any, source: Any, read: Callable[[Any], Tuple[str, Optional[str]]], conventions: Conventions) -> None:
        self.pending = pending
        self.source = source
        self.read = read
        self.conventions = conventions

    def __call__(self, *args: Any) -> None:
        try:
            code, message = self.read(self.source if self.source is not None else args[0])
            self.conventions.client_status(self.pending.span, code, message)
        except Exception:
            internal_error("rpc.client.end")
        self.pending.end()


# --------------------------------------------------------------------------
# Server calls


class ServerCall:
    """One incoming RPC: its SERVER span (a kit ``ServerSpan``), ended once with the framework's status.

    Usable as a kit pending span (``TracedIterator`` / ``TracedAsyncIterator``
    end it through :meth:`end`).
    """

    __slots__ = ("server", "context", "state", "rpc", "done")

    def __init__(self, server: Any, rpc: "RpcServer", state: Any) -> None:
        self.server = server
        self.context = server.context
        self.state = state
        self.rpc = rpc
        self.done = False

    def enter(self) -> None:
        self.server.enter()

    def leave(self) -> None:
        self.server.leave()

    def end(self, exc: Optional[BaseException] = None, end_time: Optional[int] = None) -> None:
        self._finish(exc, False)

    def terminated(self, *unused: Any) -> None:
        """The RPC terminated (the framework's completion callback)."""
        self._finish(None, True)

    def _finish(self, exc: Optional[BaseException], terminated: bool) -> None:
        if self.done:
            return
        self.done = True
        try:
            code, message, failure = self.rpc.outcome(self.state, exc, terminated)
            self.rpc.conventions.server_status(self.server.span, code, message, failure)
        except Exception:
            internal_error("rpc.server.status")
        self.server.end()


_Read = Callable[[Any], Any]


class RpcServer:
    """Traces the handlers of one RPC framework's servers.

    What is read from the framework's per-call context (``state``), each a
    function of it: ``metadata`` -- the incoming metadata pairs; ``code`` --
    the status code name set so far (``set_code``, ``abort``) or None;
    ``details`` -- its message; ``cancelled`` -- whether the call was cancelled
    (by the client, by its deadline); ``peer`` -- ``(address, port)`` or None;
    ``watch(state, callback)`` registers ``callback`` for the RPC's
    termination (a cancelled stream still ends its span). ``aborted(exc)``:
    whether an exception the handler raised is the framework's abort with a
    status (then not recorded as a failure).

    The status a call ends with: the handler returned or its stream ended --
    ``code``, else ``ok`` (``cancelled_status`` if it was cancelled); the
    framework reported the end first -- ``code``, else ``cancelled_status``;
    the handler raised -- an abort: ``code``; an ``asyncio.CancelledError`` /
    ``GeneratorExit`` (not an ``Exception``) or a cancelled call:
    ``cancelled_status``; anything else: ``failed_status`` with the exception
    recorded. The wrapped handlers stand down once ``instrumentor`` is unpatched.
    """

    __slots__ = ("instrumentor", "conventions", "metadata", "code", "details", "cancelled", "aborted", "watch", "peer",
                 "ok", "cancelled_status", "failed_status")

    def __init__(
        self,
        instrumentor: Any,
        conventions: Conventions,
        metadata: _Read,
        code: _Read,
        details: Optional[_Read] = None,
        cancelled: Optional[_Read] = None,
        aborted: Optional[Callable[[BaseException], bool]] = None,
        watch: Optional[Callable[[Any, Callable[..., None]], Any]] = None,
        peer: Optional[_Read] = None,
        ok: str = "OK",
        cancelled_status: str = "CANCELLED",
        failed_status: str = "UNKNOWN",
    ) -> None:
        self.instrumentor = instrumentor
        self.conventions = conventions
        self.metadata = metadata
        self.code = code
        self.details = details
        self.cancelled = cancelled
        self.aborted = aborted
        self.watch = watch
        self.peer = peer
        self.ok = ok
        self.cancelled_status = cancelled_status
        self.failed_status = failed_status

    def outcome(self, state: Any, exc: Optional[BaseException], terminated: bool) -> Tuple[str, Optional[str], Optional[BaseException]]:
        """``(status code, message, failure to record)`` of a call ending now (see the class)."""
        code = self.code(state)
        cancelled = self.cancelled
        if exc is not None and not (code is not None and self.aborted is not None and self.aborted(exc)):
            if not isinstance(exc, Exception) or (cancelled is not None and cancelled(state)):
                return self.cancelled_status, None, None
            return self.failed_status, None, exc
        if code is None:
            code = self.cancelled_status if terminated or (cancelled is not None and cancelled(state)) else self.ok
        return code, as_text(self.details(state)) if self.details is not None else None, None

    def start(self, name: str, attributes: Dict[str, Any], state: Any) -> Optional[ServerCall]:
        """Start the SERVER span of one call (None: untraced); never raises."""
        if not self.instrumentor.patched_modules:
            return None
        call = None
        try:
            peer = self.peer(state) if self.peer is not None else None
            if peer is not None:
                attributes = dict(attributes)
                attributes["network.peer.address"] = peer[0]
                if peer[1] is not None:
                    attributes["network.peer.port"] = peer[1]
            server = start_server_span(self.instrumentor, name, attributes, self.metadata(state), METADATA_GETTER)
            call = ServerCall(server, self, state)
            if self.watch is not None:
                self.watch(state, call.terminated)
        except Exception:
            internal_error("rpc.server.start")
        return call

    def handler(self, behavior: Callable[..., Any], method: Any, streaming: bool) -> Callable[..., Any]:
        """``behavior(request, context, ...)`` wrapped in a SERVER span, keeping its nature and attributes.

        ``streaming``: the response is a stream (an iterator, an async
        generator, or writes through the context from a coroutine).
        """
        if getattr(behavior, "_autotrace_rpc", False):
            return behavior
        name, attrs = self.conventions.server(method)
        start = self.start
        if inspect.isasyncgenfunction(behavior):

            async def traced(request: Any, context: Any, *more: Any) -> Any:
                call = start(name, attrs, context)
                stream = behavior(request, context, *more)
                if call is not None:
                    stream = TracedAsyncIterator(stream, call)
                try:
                    async for item in stream:
                        yield item
                finally:
                    await stream.aclose()

        elif inspect.iscoroutinefunction(behavior):

            async def traced(request: Any, context: Any, *more: Any) -> Any:  # type: ignore[misc]
                call = start(name, attrs, context)
                if call is None:
                    return await behavior(request, context, *more)
                call.enter()
                try:
                    result = await behavior(request, context, *more)
                except BaseException as exc:
                    call.leave()
                    call.end(exc)
                    raise
                call.leave()
                call.end()
                return result

        else:

            def traced(request: Any, context: Any, *more: Any) -> Any:  # type: ignore[misc]
                call = start(name, attrs, context)
                if call is None:
                    return behavior(request, context, *more)
                call.enter()
                try:
                    result = behavior(request, context, *more)
                except BaseException as exc:
                    call.leave()
                    call.end(exc)
                    raise
                call.leave()
                if not streaming:
                    call.end()
                elif hasattr(result, "__next__"):
                    return TracedIterator(result, call)
                # else: a callback-style stream, or not an iterator (the framework fails
                # the call): the termination callback ends the span.
                return result

        try:
            functools.update_wrapper(traced, behavior)  # keeps the framework's markers (experimental_*)
        except Exception:  # a callable without the usual attributes
            pass
        traced._autotrace_rpc = True  # type: ignore[attr-defined]
        return traced
