"""The documented environment variables: one table for ``--help``, the CLI options and the README."""

from __future__ import annotations

from typing import List, NamedTuple, Tuple


class Variable(NamedTuple):
    name: str
    default: str
    help: str
    aliases: Tuple[str, ...] = ()  # extra CLI spellings besides --name_without_otel


VARIABLES: List[Variable] = [
    Variable("OTEL_SDK_DISABLED", "false", "true: nothing is set up or patched", ("--sdk-disabled",)),
    Variable("OTEL_SERVICE_NAME", "unknown_service:<executable>", "service.name of the resource", ("--service-name",)),
    Variable("OTEL_RESOURCE_ATTRIBUTES", "", "extra resource attributes, key=value,key2=value2 (percent-encoded)", ("--resource-attributes",)),
    Variable("OTEL_TRACES_EXPORTER", "otlp", "comma list of otlp, console, none, or an opentelemetry_traces_exporter entry point", ("--exporter", "--traces-exporter")),
    Variable("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318 (grpc: http://localhost:4317)", "base URL; /v1/traces is appended for http/protobuf", ("--endpoint",)),
    Variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "", "full URL for traces, used as is"),
    Variable("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", "http/protobuf or grpc (also _TRACES_PROTOCOL)", ("--protocol",)),
    Variable("OTEL_EXPORTER_OTLP_HEADERS", "", "headers for every export, key=value,... (also _TRACES_HEADERS); masked in --info", ("--headers",)),
    Variable("OTEL_EXPORTER_OTLP_TIMEOUT", "10000", "export timeout in milliseconds, per the spec (also _TRACES_TIMEOUT)"),
    Variable("OTEL_EXPORTER_OTLP_COMPRESSION", "none", "none or gzip (also _TRACES_COMPRESSION)"),
    Variable("OTEL_EXPORTER_OTLP_INSECURE", "false", "grpc: plaintext even for a non-http:// endpoint (also _TRACES_INSECURE)"),
    Variable("OTEL_EXPORTER_OTLP_CERTIFICATE", "", "CA bundle for TLS (also _TRACES_CERTIFICATE)"),
    Variable("OTEL_EXPORTER_OTLP_CLIENT_KEY", "", "client key for mTLS (also _TRACES_CLIENT_KEY)"),
    Variable("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "", "client certificate for mTLS (also _TRACES_CLIENT_CERTIFICATE)"),
    Variable("OTEL_TRACES_SAMPLER", "parentbased_always_on", "always_on, always_off, traceidratio, parentbased_*, or an entry point", ("--sampler",)),
    Variable("OTEL_TRACES_SAMPLER_ARG", "1.0", "ratio for the traceidratio samplers", ("--sampler-arg",)),
    Variable("OTEL_PROPAGATORS", "tracecontext,baggage", "tracecontext, baggage, b3, b3multi, jaeger, none, or entry points"),
    Variable("OTEL_BSP_SCHEDULE_DELAY", "5000 (200 when tree is the only exporter)", "ms between batch exports"),
    Variable("OTEL_BSP_EXPORT_TIMEOUT", "30000", "ms allowed for one export"),
    Variable("OTEL_BSP_MAX_QUEUE_SIZE", "2048", "spans buffered before new ones are dropped"),
    Variable("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512", "spans per export request"),
    Variable("OTEL_ATTRIBUTE_COUNT_LIMIT", "128", "attributes per span (OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT wins)"),
    Variable("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "no limit", "max length of a string attribute (OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT wins)"),
    Variable("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "128", "attributes per span"),
    Variable("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "no limit", "max length of a span string attribute"),
    Variable("OTEL_SPAN_EVENT_COUNT_LIMIT", "128", "events per span"),
    Variable("OTEL_SPAN_LINK_COUNT_LIMIT", "128", "links per span"),
    Variable("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "128", "attributes per event"),
    Variable("OTEL_LINK_ATTRIBUTE_COUNT_LIMIT", "128", "attributes per link"),
    Variable("OTEL_LOG_LEVEL", "info", "level of the 'autotrace' logger: debug, info, warning, error", ("--log-level",)),
    Variable("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "", "instrumentations not to activate (names, or *)", ("--disabled-instrumentations",)),
    Variable("OTEL_PYTHON_ENABLED_INSTRUMENTATIONS", "all", "if set, only these instrumentations are activated", ("--enabled-instrumentations",)),
    Variable("OTEL_PYTHON_EXCLUDED_URLS", "", "comma list of regexes; a matching URL (re.search) makes no span"),
    Variable("OTEL_PYTHON_<LIB>_EXCLUDED_URLS", "", "the same for one library (FLASK, FASTAPI, REQUESTS); wins over the general one"),
    Variable("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "", "request headers recorded on SERVER spans (names or regexes)"),
    Variable("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "", "response headers recorded on SERVER spans"),
    Variable("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", "", "request headers recorded on CLIENT spans"),
    Variable("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE", "", "response headers recorded on CLIENT spans"),
    Variable("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "", "regexes of captured headers recorded as REDACTED (Authorization, Cookie, Set-Cookie, Proxy-Authorization always are)"),
    Variable("OTEL_SEMCONV_STABILITY_OPT_IN", "", "http/dup and/or database/dup: also emit the pre-stable attribute names"),
    Variable("OTEL_PYTHON_LOG_CORRELATION", "false", "add otelTraceID, otelSpanID, otelServiceName, otelTraceSampled to log records"),
    Variable("AUTOTRACE_TREE_OUTPUT", "stderr", "tree exporter: stderr, stdout or a file path"),
    Variable("AUTOTRACE_TREE_COLOR", "auto", "tree exporter: auto (terminal and no NO_COLOR), always, never"),
    Variable("AUTOTRACE_TREE_WIDTH", "COLUMNS, terminal or 100", "tree exporter: line width"),
    Variable("AUTOTRACE_TREE_MAX_SPANS", "500", "tree exporter: spans drawn per trace"),
    Variable("AUTOTRACE_TRACE_FILE", "./autotrace-traces.jsonl", "otlp_file exporter: OTLP JSON lines file (autotrace-view reads it)"),
    Variable("AUTOTRACE_SQL_RAW_QUERY", "false", "SQLAlchemy: record the SQL text and error messages with their literals"),
    Variable("AUTOTRACE_SQL_MAX_LENGTH", "2048", "SQLAlchemy: db.query.text is truncated to this many characters"),
    Variable("AUTOTRACE_REDIS_CAPTURE_ARGS", "false", "Redis: raw command arguments in db.query.text (AUTH/HELLO/CONFIG/ACL/MIGRATE never)"),
    Variable("AUTOTRACE_CELERY_LINK_ONLY", "false", "Celery: the CONSUMER span starts a new trace linked to the PRODUCER span"),
    Variable("AUTOTRACE_FASTAPI_INTERNAL_SPANS", "false", "FastAPI 0.144+: keep FastAPI's own dependency/endpoint/serialization spans, under ours"),
    Variable("AUTOTRACE_FASTAPI_ASGI_MESSAGE_SPANS", "false", "FastAPI/Starlette: one INTERNAL span per ASGI send/receive message"),
    Variable("AUTOTRACE_FORCE_INSTRUMENTATIONS", "", "instrument these even when the library version is outside the supported range (names, or *)"),
    Variable("AUTOTRACE_REDACT_QUERY_PARAMS", "", "extra query parameter names whose values are redacted in URLs"),
    Variable("AUTOTRACE_CAPTURE_RAW_URLS", "false", "true: do not redact query values (userinfo is always removed)"),
    Variable("AUTOTRACE_DIRECT_EXPORT", "true", "OTLP/HTTP: encode spans as they end and send full batches from the program's thread without waiting; false: the SDK's batch thread does it all"),
    Variable("AUTOTRACE_SHUTDOWN_TIMEOUT", "5000", "ms the exit flush may take before giving up"),
    Variable("AUTOTRACE_UPSTREAM_PLUGINS", "true", "false: do not activate installed opentelemetry_instrumentor plugins"),
]


def cli_spellings(variable: Variable) -> List[str]:
    """``--traces_exporter`` (upstream's spelling) and ``--traces-exporter``, plus aliases."""
    if "<" in variable.name:
        return []
    base = variable.name[5:].lower() if variable.name.startswith("OTEL_") else variable.name.lower()
    spellings = [f"--{base}", f"--{base.replace('_', '-')}"] + list(variable.aliases)
    return list(dict.fromkeys(spellings))
