"""redis-py (4.x - 8.x): one CLIENT span per command, per pipeline and per transaction.

What is wrapped (at class level, each module when it is first imported):

* ``redis.client``: ``Redis.execute_command`` (one span per command),
  ``Pipeline.immediate_execute_command`` (commands run at once while a
  pipeline WATCHes keys) and ``Pipeline.execute`` (one ``PIPELINE`` or
  ``MULTI`` span for the whole batch).
* ``redis.asyncio.client``: the same three, as coroutines: the span covers the
  awaited round trip, not the creation of the coroutine.
* ``redis.cluster`` / ``redis.asyncio.cluster``: ``RedisCluster.execute_command``
  and ``ClusterPipeline.execute``.

Privacy: ``db.query.text`` holds the command and one ``?`` per argument
(``SET ? ?``), never keys or values, unless ``AUTOTRACE_REDIS_CAPTURE_ARGS`` is
on -- and even then the arguments of AUTH, HELLO, CONFIG, ACL and MIGRATE stay
hidden. Server error messages that echo arguments (unknown commands, pipeline
errors) are trimmed before they reach the exception event.

Hot path: the connection attributes are built once per connection pool (or
cluster client) and cached on it; the per-call work is one dict copy and two
cached lookups; the span itself is the kit's (:class:`autotrace.kit.CallSpan`).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from autotrace.config import env, semconv_dup
from autotrace.kit import CallSpan, Instrumentor, record_error

CAPTURE_ARGS_ENV = "AUTOTRACE_REDIS_CAPTURE_ARGS"

#: ``db.query.text`` placeholders for N arguments (capped; longer lists end in "...").
_MAX_PLACEHOLDERS = 64
_PLACEHOLDERS = tuple(" ?" * n for n in range(_MAX_PLACEHOLDERS + 1))
_MANY_PLACEHOLDERS = _PLACEHOLDERS[-1] + " ..."
#: Commands listed in a batch's ``db.query.text`` (the size attribute has the full count).
_MAX_BATCH_TEXT = 128
_BATCH_SEPARATOR = "; "
#: Arguments never exported, even with AUTOTRACE_REDIS_CAPTURE_ARGS=true (first word of the command).
_SENSITIVE = frozenset({"AUTH", "HELLO", "CONFIG", "ACL", "MIGRATE"})
_MAX_CAPTURED = 1024
_NAME_CACHE_LIMIT = 1024

#: Redis error prefixes (the first word of an error reply), for ``db.response.status_code``.
_ERROR_CODES = frozenset(
    {
        "ERR", "WRONGTYPE", "NOSCRIPT", "BUSY", "BUSYKEY", "BUSYGROUP", "MOVED", "ASK", "TRYAGAIN",
        "CLUSTERDOWN", "CROSSSLOT", "LOADING", "MASTERDOWN", "MISCONF", "NOAUTH", "NOPERM", "NOPROTO",
        "NOREPLICAS", "OOM", "READONLY", "UNBLOCKED", "WRONGPASS", "EXECABORT", "NOGOODSLAVE",
        "NOTBUSY", "UNKILLABLE", "NOGROUP", "NOTREADY", "INPROG", "ERRWRONGTYPE",
    }
)
_PIPELINE_ERROR = re.compile(r"^Command # (\d+) \((\S*)")
_PIPELINE_ERROR_MARK = ") of pipeline caused error: "
_ECHOED_ARGS = re.compile(r",? with args beginning with:.*$", re.DOTALL)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class _Config:
    """What is read once at patch time (env switches, semconv opt-in)."""

    __slots__ = ("capture_args", "dup")

    def __init__(self) -> None:
        self.capture_args = env().flag(CAPTURE_ARGS_ENV, False)
        self.dup = semconv_dup("database")


# --------------------------------------------------------------------------
# Attributes


def _connection_attributes(kwargs: Dict[str, Any], dup: bool) -> Dict[str, Any]:
    """Static attributes of one connection pool, from its ``connection_kwargs``."""
    db = kwargs.get("db", 0)
    try:
        db_index = int(db or 0)
    except (TypeError, ValueError):
        db_index = 0
    attrs: Dict[str, Any] = {"db.system.name": "redis", "db.namespace": str(db_index)}
    path = kwargs.get("path")
    host = kwargs.get("host")
    port = kwargs.get("port")
    if path:
        attrs["server.address"] = str(path)
        attrs["network.transport"] = "unix"
    elif host:
        attrs["server.address"] = str(host)
        if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
            attrs["server.port"] = int(port)
    if dup:
        attrs["db.system"] = "redis"
        attrs["db.redis.database_index"] = db_index
        if path:
            attrs["net.peer.name"] = str(path)
            attrs["net.transport"] = "other"
        elif host:
            attrs["net.peer.name"] = str(host)
            if "server.port" in attrs:
                attrs["net.peer.port"] = attrs["server.port"]
    return attrs


def _cluster_attributes(dup: bool) -> Dict[str, Any]:
    # A cluster command goes to the node owning its slot, chosen inside the
    # call: no single server to name. Cluster mode has only database 0.
    attrs: Dict[str, Any] = {"db.system.name": "redis", "db.namespace": "0"}
    if dup:
        attrs["db.system"] = "redis"
        attrs["db.redis.database_index"] = 0
    return attrs


def _base_attributes(instance: Any, config: _Config) -> Dict[str, Any]:
    """Cached static attributes for a client (kept on its connection pool)."""
    pool = getattr(instance, "connection_pool", None)
    holder = instance if pool is None else pool
    cached = getattr(holder, "_autotrace_redis_attrs", None)
    if cached is not None and cached[0] is config:
        return cached[1]
    kwargs = getattr(pool, "connection_kwargs", None) if pool is not None else None
    if isinstance(kwargs, dict):
        attrs = _connection_attributes(kwargs, config.dup)
    else:
        attrs = _cluster_attributes(config.dup)
    try:
        holder._autotrace_redis_attrs = (config, attrs)
    except Exception:  # __slots__ or a read-only proxy: rebuild per call
        pass
    return attrs


def _to_text(value: Any, limit: int = _MAX_CAPTURED) -> str:
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:limit]).decode("utf-8", "replace")
    return str(value)[:limit]


_names: Dict[Any, str] = {}


def _operation_name(command: Any) -> str:
    """``"get"``/``b"GET"`` -> ``"GET"`` (cached: a bounded set of command names)."""
    try:
        name = _names.get(command)
    except TypeError:  # unhashable command name: redis-py will reject it anyway
        name = None
        hashable = False
    else:
        hashable = True
    if name is None:
        name = " ".join(_to_text(command).split()).upper() or "REDIS"
        if hashable and len(_names) < _NAME_CACHE_LIMIT:
            _names[command] = name
    return name


_sensitive_names: Dict[str, bool] = {}


def _is_sensitive(name: str) -> bool:
    """True for commands whose arguments are never exported (cached per name)."""
    sensitive = _sensitive_names.get(name)
    if sensitive is None:
        sensitive = name.split(" ", 1)[0] in _SENSITIVE
        if len(_sensitive_names) < _NAME_CACHE_LIMIT:
            _sensitive_names[name] = sensitive
    return sensitive


def _query_text(name: str, args: Tuple[Any, ...], capture: bool) -> str:
    """``SET ? ?`` (default), or the raw arguments when capture is on and safe."""
    count = len(args) - 1
    if capture and not _is_sensitive(name):
        parts = [name]
        size = len(name)
        for arg in args[1:]:
            part = _to_text(arg)
            parts.append(part)
            size += len(part) + 1
            if size > _MAX_CAPTURED:
                break
        text = " ".join(parts)
        return text if len(text) <= _MAX_CAPTURED else text[:_MAX_CAPTURED] + "..."
    if count <= _MAX_PLACEHOLDERS:
        return name + _PLACEHOLDERS[count] if count > 0 else name
    return name + _MANY_PLACEHOLDERS


def _command_attributes(instance: Any, args: Tuple[Any, ...], config: _Config) -> Tuple[str, Dict[str, Any], bool]:
    """``(span name, attributes, sensitive)`` for one command."""
    name = _operation_name(args[0])
    text = _query_text(name, args, config.capture_args)
    attrs = _base_attributes(instance, config).copy()
    attrs["db.operation.name"] = name
    attrs["db.query.text"] = text
    if config.dup:
        attrs["db.statement"] = text
    return name, attrs, _is_sensitive(name)


def _batch_commands(instance: Any) -> Optional[List[Any]]:
    """The queued commands of a (cluster) pipeline, as a list of args tuples."""
    stack = None
    strategy = getattr(instance, "_execution_strategy", None)  # cluster pipelines, redis-py >= 6
    if strategy is not None:
        stack = getattr(strategy, "command_queue", None)
        if stack is None:
            stack = getattr(strategy, "_command_queue", None)
    if stack is None:
        stack = getattr(instance, "command_stack", None)
    if stack is None:
        stack = getattr(instance, "_command_stack", None)
    if stack is None:
        return None
    commands = []
    for item in stack:
        args = item[0] if isinstance(item, tuple) else getattr(item, "args", None)
        if args:
            commands.append(args)
    return commands


def _is_transaction(instance: Any) -> bool:
    if getattr(instance, "explicit_transaction", False):
        return True
    for attribute in ("transaction", "is_transaction", "_transaction"):
        value = getattr(instance, attribute, None)
        if isinstance(value, bool):
            return value
    strategy = getattr(instance, "_execution_strategy", None)
    return strategy is not None and type(strategy).__name__ == "TransactionStrategy"


def _batch_attributes(instance: Any, config: _Config) -> Optional[Tuple[str, Dict[str, Any], bool]]:
    commands = _batch_commands(instance)
    if not commands and not (
        getattr(instance, "watching", False) or getattr(getattr(instance, "_execution_strategy", None), "_watching", False)
    ):
        return None  # redis-py returns [] without a round trip
    name = "MULTI" if _is_transaction(instance) else "PIPELINE"
    attrs = _base_attributes(instance, config).copy()
    attrs["db.operation.name"] = name
    commands = commands or []
    size = len(commands)
    if size >= 2:  # semconv: a batch has two or more operations
        attrs["db.operation.batch.size"] = size
    names = [_operation_name(args[0]) for args in commands]
    sensitive = any(_is_sensitive(op) for op in names)
    texts = [_query_text(op, args, config.capture_args) for op, args in zip(names[:_MAX_BATCH_TEXT], commands)]
    if texts:
        first = texts[0]
        if all(text == first for text in texts):
            text = first  # semconv: identical operations share one query text
        else:
            text = _BATCH_SEPARATOR.join(texts)
            if size > _MAX_BATCH_TEXT:
                text += _BATCH_SEPARATOR + "..."
        attrs["db.query.text"] = text
        if config.dup:
            attrs["db.statement"] = text
    return name, attrs, sensitive


# --------------------------------------------------------------------------
# Errors


def _status_code(exc: BaseException, message: str) -> Optional[str]:
    """The Redis error prefix (``WRONGTYPE``, ``ERR``...) of a server error reply."""
    code = getattr(exc, "status_code", None)  # redis-py >= 8 keeps the stripped prefix
    if isinstance(code, str) and code:
        return code
    try:
        from redis.exceptions import ResponseError
    except Exception:  # pragma: no cover
        return None
    if not isinstance(exc, ResponseError):
        return None
    marker = message.rfind(_PIPELINE_ERROR_MARK)
    if marker >= 0:
        message = message[marker + len(_PIPELINE_ERROR_MARK):]
    first = message.split(" ", 1)[0]
    if first in _ERROR_CODES:
        return first
    return _CLASS_CODES.get(type(exc).__name__, "ERR")


#: redis-py strips the prefix of the errors it maps to classes.
_CLASS_CODES = {
    "ExecAbortError": "EXECABORT",
    "NoScriptError": "NOSCRIPT",
    "ReadOnlyError": "READONLY",
    "NoPermissionError": "NOPERM",
    "OutOfMemoryError": "OOM",
    "AskError": "ASK",
    "MovedError": "MOVED",
    "TryAgainError": "TRYAGAIN",
    "ClusterDownError": "CLUSTERDOWN",
    "ClusterCrossSlotError": "CROSSSLOT",
    "MasterDownError": "MASTERDOWN",
}


def _sanitize_message(message: str, sensitive: bool) -> str:
    """Drop the arguments redis-py or the server echo into an error message.

    For AUTH/HELLO/CONFIG/ACL/MIGRATE every quoted word goes too (servers quote
    the offending argument: ``Unknown option ... for CONFIG SET - 'name'``).
    """
    marker = message.rfind(_PIPELINE_ERROR_MARK)
    if marker >= 0:
        match = _PIPELINE_ERROR.match(message)
        prefix = f"Command # {match.group(1)} ({match.group(2)} ...)" if match else "Command (...)"
        message = prefix + " of pipeline caused error: " + message[marker + len(_PIPELINE_ERROR_MARK):]
    if "with args beginning with:" in message:
        message = _ECHOED_ARGS.sub("", message)
    if sensitive:
        message = _QUOTED.sub("'?'", message)
    return message


def _fail(span: Any, exc: BaseException, config: _Config, sensitive: bool) -> None:
    """Record ``exc`` on ``span`` without exporting echoed arguments."""
    if not span.is_recording():
        return
    message = str(exc)
    code = _status_code(exc, message)
    if sensitive or not config.capture_args:
        message = _sanitize_message(message, sensitive)
    record_error(span, exc, message=message, attributes={"db.response.status_code": code} if code else None)


# --------------------------------------------------------------------------
# The instrumentor


class RedisInstrumentor(Instrumentor):
    name = "redis"
    distribution = "redis"
    supported = ">=4.0,<9"
    covers = ("redis",)
    modules = ("redis.client", "redis.asyncio.client", "redis.cluster", "redis.asyncio.cluster")

    def __init__(self) -> None:
        super().__init__()
        self._config: Optional[_Config] = None
        self._command = CallSpan(self, self._describe_command, record=self._record, site="redis.command")
        self._batch = CallSpan(self, self._describe_batch, record=self._record, site="redis.pipeline")

    @property
    def config(self) -> _Config:
        if self._config is None:
            self._config = _Config()
        return self._config

    def _describe_command(self, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if not args:
            return None  # redis-py raises its own error for this
        return _command_attributes(instance, args, self._config or self.config)

    def _describe_batch(self, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        return _batch_attributes(instance, self._config or self.config)

    def _record(self, span: Any, exc: BaseException, sensitive: bool) -> None:
        _fail(span, exc, self.config, bool(sensitive))

    def patch_module(self, module_name: str, module: Any) -> None:
        if module_name.endswith(".client"):
            self.wrap(module, "Redis.execute_command", self._command)
            self.wrap(module, "Pipeline.immediate_execute_command", self._command)
            self.wrap(module, "Pipeline.execute", self._batch)
        elif module_name.endswith(".cluster"):
            self.wrap(module, "RedisCluster.execute_command", self._command)
            self.wrap(module, "ClusterPipeline.execute", self._batch)

    def unpatch_extra(self) -> None:
        # The next patch re-reads the environment (and invalidates the per-pool caches).
        self._config = None


__all__ = ["RedisInstrumentor", "CAPTURE_ARGS_ENV"]
