"""One typed settings object, read once from the ``OTEL_*`` environment.

Every variable is parsed here so that a malformed value anywhere produces one
warning naming the variable, the bad value and the default used -- and never a
traceback. The SDK classes are then built with explicit values, so their own
(raising) environment parsing never runs.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, FrozenSet, Mapping, NamedTuple, Optional, Tuple, TypeVar
from urllib.parse import unquote

from autotrace._log import warn_once

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}

PROTOCOLS = ("http/protobuf", "grpc")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s]+\S*$")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
COMPRESSIONS = ("none", "gzip")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "critical", "fatal")


class EnvReader:
    """Reads typed values from an environment, warning about malformed ones."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        self.environ = os.environ if environ is None else environ
        #: Names of variables whose value was rejected (the bootstrap scrubs
        #: them so that SDK code reading the environment itself cannot crash).
        self.invalid: set = set()

    def raw(self, name: str) -> Optional[str]:
        value = self.environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def _invalid(self, name: str, value: str, default: object, why: str = "") -> None:
        reason = f" ({why})" if why else ""
        self.invalid.add(name)
        warn_once(
            f"env:{name}:{value}",
            "autotrace: invalid value %r for %s%s; using the default %r",
            value,
            name,
            reason,
            default,
        )

    def string(self, name: str, default: Optional[str] = None) -> Optional[str]:
        value = self.raw(name)
        return default if value is None else value

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        self._invalid(name, value, default, "expected true or false")
        return default

    def number(
        self,
        name: str,
        default: T,
        convert: Callable[[str], T] = int,  # type: ignore[assignment]
        minimum: Optional[float] = None,
        maximum: Optional[float] = None,
    ) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = convert(value)
        except (TypeError, ValueError):
            self._invalid(name, value, default, "not a number")
            return default
        if parsed != parsed:  # NaN
            self._invalid(name, value, default, "not a number")
            return default
        if minimum is not None and parsed < minimum:  # type: ignore[operator]
            self._invalid(name, value, default, f"must be at least {minimum}")
            return default
        if maximum is not None and parsed > maximum:  # type: ignore[operator]
            self._invalid(name, value, default, f"must be at most {maximum}")
            return default
        return parsed

    def optional_int(self, name: str, minimum: int = 0) -> Optional[int]:
        """An int limit where unset means 'no limit'."""
        value = self.raw(name)
        if value is None:
            return None
        try:
            parsed = int(value)
        except ValueError:
            self._invalid(name, value, "no limit", "not an integer")
            return None
        if parsed < minimum:
            self._invalid(name, value, "no limit", f"must be at least {minimum}")
            return None
        return parsed

    def choice(self, name: str, choices: Tuple[str, ...], default: str) -> str:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in choices:
            return lowered
        self._invalid(name, value, default, "expected one of " + ", ".join(choices))
        return default

    def names(self, name: str, default: Tuple[str, ...] = ()) -> Tuple[str, ...]:
        """A comma-separated list of names, lower-cased, empty items dropped."""
        value = self.raw(name)
        if value is None:
            return default
        items = tuple(item.strip().lower() for item in value.split(",") if item.strip())
        return items

    def key_values(self, name: str) -> Dict[str, str]:
        """``k1=v1,k2=v2`` with percent-encoded values (W3C baggage style)."""
        value = self.raw(name)
        result: Dict[str, str] = {}
        if value is None:
            return result
        for item in value.split(","):
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            key = key.strip()
            if not sep or not key:
                warn_once(
                    f"env:{name}:item:{item}",
                    "autotrace: ignoring malformed entry %r in %s (expected key=value)",
                    item,
                    name,
                )
                continue
            try:
                result[unquote(key)] = unquote(val.strip())
            except Exception:  # pragma: no cover - unquote rarely fails
                warn_once(f"env:{name}:item:{item}", "autotrace: ignoring undecodable entry %r in %s", item, name)
        return result

    def patterns(self, name: str) -> Tuple["re.Pattern[str]", ...]:
        """Comma-separated regular expressions; invalid ones are skipped with a warning."""
        value = self.raw(name)
        if value is None:
            return ()
        compiled = []
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                compiled.append(re.compile(item))
            except re.error as exc:
                warn_once(f"env:{name}:re:{item}", "autotrace: ignoring invalid pattern %r in %s: %s", item, name, exc)
        return tuple(compiled)


class OTLPSettings(NamedTuple):
    protocol: str = "http/protobuf"
    endpoint: str = "http://localhost:4318/v1/traces"
    headers: Mapping[str, str] = {}
    timeout_s: float = 10.0
    compression: str = "none"
    insecure: bool = False
    certificate: Optional[str] = None
    client_key: Optional[str] = None
    client_certificate: Optional[str] = None


class Limits(NamedTuple):
    attribute_count: Optional[int] = 128
    attribute_value_length: Optional[int] = None
    event_count: Optional[int] = 128
    link_count: Optional[int] = 128
    event_attribute_count: Optional[int] = 128
    link_attribute_count: Optional[int] = 128


class Settings(NamedTuple):
    """Immutable; NamedTuple rather than dataclass (dataclasses costs ~7 ms at start-up)."""

    sdk_disabled: bool = False
    service_name: Optional[str] = None
    resource_attributes: Mapping[str, str] = {}
    traces_exporters: Tuple[str, ...] = ("otlp",)
    otlp: OTLPSettings = OTLPSettings()
    sampler: str = "parentbased_always_on"
    sampler_arg: Optional[str] = None
    propagators: Tuple[str, ...] = ("tracecontext", "baggage")
    bsp_schedule_delay_ms: float = 5000
    bsp_export_timeout_ms: float = 30000
    bsp_max_queue_size: int = 2048
    bsp_max_export_batch_size: int = 512
    limits: Limits = Limits()
    log_level: str = "info"
    disabled_instrumentations: FrozenSet[str] = frozenset()
    enabled_instrumentations: Optional[FrozenSet[str]] = None
    forced_instrumentations: FrozenSet[str] = frozenset()
    log_correlation: bool = False
    semconv_opt_in: FrozenSet[str] = frozenset()
    shutdown_timeout_ms: float = 5000
    direct_export: bool = True
    upstream_plugins: bool = True
    invalid_variables: FrozenSet[str] = frozenset()

    def instrumentation_disabled(self, name: str) -> bool:
        """True when the env lists turn the named instrumentation off."""
        name = name.lower()
        if "*" in self.disabled_instrumentations or name in self.disabled_instrumentations:
            return True
        if self.enabled_instrumentations is not None and name not in self.enabled_instrumentations:
            return True
        return False


def _otlp_settings(env: EnvReader) -> OTLPSettings:
    def pick(suffix: str) -> str:
        specific = f"OTEL_EXPORTER_OTLP_TRACES_{suffix}"
        return specific if env.raw(specific) is not None else f"OTEL_EXPORTER_OTLP_{suffix}"

    protocol = env.choice(pick("PROTOCOL"), PROTOCOLS + ("http/json",), "http/protobuf")
    if protocol == "http/json":
        warn_once(
            "env:protocol:http/json",
            "autotrace: OTLP protocol http/json is not supported; using http/protobuf",
        )
        protocol = "http/protobuf"

    def url(name: str) -> Optional[str]:
        value = env.raw(name)
        if value is not None and not _URL.match(value):
            env._invalid(name, value, "the default endpoint", "expected a URL such as http://host:port")
            return None
        return value

    specific_endpoint = url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    generic_endpoint = url("OTEL_EXPORTER_OTLP_ENDPOINT")
    if protocol == "grpc":
        endpoint = specific_endpoint or generic_endpoint or "http://localhost:4317"
    elif specific_endpoint:
        endpoint = specific_endpoint  # used as is, per the spec
    elif generic_endpoint:
        endpoint = generic_endpoint.rstrip("/") + "/v1/traces"
    else:
        endpoint = "http://localhost:4318/v1/traces"

    headers = dict(env.key_values("OTEL_EXPORTER_OTLP_HEADERS"))
    headers.update(env.key_values("OTEL_EXPORTER_OTLP_TRACES_HEADERS"))
    # The spec gives the timeout in milliseconds.
    timeout_ms = env.number(pick("TIMEOUT"), 10000.0, float, minimum=1)
    return OTLPSettings(
        protocol=protocol,
        endpoint=endpoint,
        headers=headers,
        timeout_s=timeout_ms / 1000.0,
        compression=env.choice(pick("COMPRESSION"), COMPRESSIONS, "none"),
        insecure=env.flag(pick("INSECURE"), False),
        certificate=env.string(pick("CERTIFICATE")),
        client_key=env.string(pick("CLIENT_KEY")),
        client_certificate=env.string(pick("CLIENT_CERTIFICATE")),
    )


def _limits(env: EnvReader) -> Limits:
    def count(specific: str, general: Optional[str] = None) -> Optional[int]:
        value = env.optional_int(specific)
        if value is None and general:
            value = env.optional_int(general)
        return 128 if value is None else value

    length = env.optional_int("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT")
    if length is None:
        length = env.optional_int("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT")
    return Limits(
        attribute_count=count("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT"),
        attribute_value_length=length,
        event_count=count("OTEL_SPAN_EVENT_COUNT_LIMIT"),
        link_count=count("OTEL_SPAN_LINK_COUNT_LIMIT"),
        event_attribute_count=count("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT"),
        link_attribute_count=count("OTEL_LINK_ATTRIBUTE_COUNT_LIMIT"),
    )


def _exporters(env: EnvReader) -> Tuple[str, ...]:
    names = env.names("OTEL_TRACES_EXPORTER", ("otlp",))
    if not names:
        return ("otlp",)
    if "none" in names:
        return ()
    return tuple(dict.fromkeys(names))


def _sampler(env: EnvReader) -> str:
    value = env.raw("OTEL_TRACES_SAMPLER")
    if value is None:
        return "parentbased_always_on"
    # Known names are validated here; anything else may be an entry point and
    # is checked when the SDK is set up.
    return value.strip().lower() if value.strip().lower() in SAMPLERS else value.strip()


def load_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Parse the environment into :class:`Settings`, warning about bad values."""
    env = EnvReader(environ)
    enabled = env.names("OTEL_PYTHON_ENABLED_INSTRUMENTATIONS")
    batch = env.number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, int, minimum=1)
    queue = env.number("OTEL_BSP_MAX_QUEUE_SIZE", 2048, int, minimum=1)
    if batch > queue:
        env._invalid("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", str(batch), min(512, queue), "larger than the queue size")
        batch = min(512, queue)
    exporters = _exporters(env)
    # The terminal view is for people watching: show traces promptly.
    default_delay = 200.0 if exporters == ("tree",) else 5000.0
    settings = Settings(
        sdk_disabled=env.flag("OTEL_SDK_DISABLED", False),
        service_name=env.string("OTEL_SERVICE_NAME"),
        resource_attributes=env.key_values("OTEL_RESOURCE_ATTRIBUTES"),
        traces_exporters=exporters,
        otlp=_otlp_settings(env),
        sampler=_sampler(env),
        sampler_arg=env.string("OTEL_TRACES_SAMPLER_ARG"),
        propagators=env.names("OTEL_PROPAGATORS", ("tracecontext", "baggage")) or ("tracecontext", "baggage"),
        bsp_schedule_delay_ms=env.number("OTEL_BSP_SCHEDULE_DELAY", default_delay, float, minimum=0),
        bsp_export_timeout_ms=env.number("OTEL_BSP_EXPORT_TIMEOUT", 30000.0, float, minimum=0),
        bsp_max_queue_size=queue,
        bsp_max_export_batch_size=batch,
        limits=_limits(env),
        log_level=env.choice("OTEL_LOG_LEVEL", LOG_LEVELS, "info"),
        disabled_instrumentations=frozenset(env.names("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS")),
        enabled_instrumentations=frozenset(enabled) if enabled else None,
        forced_instrumentations=frozenset(env.names("AUTOTRACE_FORCE_INSTRUMENTATIONS")),
        log_correlation=env.flag("OTEL_PYTHON_LOG_CORRELATION", False),
        semconv_opt_in=frozenset(env.names("OTEL_SEMCONV_STABILITY_OPT_IN")),
        shutdown_timeout_ms=env.number("AUTOTRACE_SHUTDOWN_TIMEOUT", 5000.0, float, minimum=0),
        upstream_plugins=env.flag("AUTOTRACE_UPSTREAM_PLUGINS", True),
        direct_export=env.flag("AUTOTRACE_DIRECT_EXPORT", True),
    )
    return settings._replace(invalid_variables=frozenset(env.invalid))


_settings: Optional[Settings] = None


def get_settings() -> Settings:
    """The process-wide settings, parsed on first use."""
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def reset_settings(settings: Optional[Settings] = None) -> None:
    """Replace (or forget) the cached settings; for tests and the bootstrap."""
    global _settings
    _settings = settings


def env() -> EnvReader:
    """An :class:`EnvReader` over ``os.environ`` for instrumentor-specific switches."""
    return EnvReader()


def semconv_dup(domain: str) -> bool:
    """True when ``OTEL_SEMCONV_STABILITY_OPT_IN`` asks for old attribute names too (``http``, ``database``)."""
    return f"{domain}/dup" in get_settings().semconv_opt_in
