"""Settings: every variable parsed, malformed values warned about by name, never raised."""

import logging

import pytest

from autotrace.config import load_settings


def settings_from(caplog, **environ):
    caplog.set_level(logging.WARNING, logger="autotrace")
    return load_settings(environ)


def test_defaults_follow_the_spec(caplog):
    s = settings_from(caplog)
    assert s.traces_exporters == ("otlp",)
    assert s.otlp.protocol == "http/protobuf"
    assert s.otlp.endpoint == "http://localhost:4318/v1/traces"
    assert s.otlp.timeout_s == 10.0
    assert s.sampler == "parentbased_always_on"
    assert s.propagators == ("tracecontext", "baggage")
    assert (s.bsp_schedule_delay_ms, s.bsp_export_timeout_ms) == (5000, 30000)
    assert (s.bsp_max_queue_size, s.bsp_max_export_batch_size) == (2048, 512)
    assert s.limits.attribute_count == 128 and s.limits.attribute_value_length is None
    assert not caplog.records


def test_endpoints_and_protocols(caplog):
    s = settings_from(caplog, OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318/")
    assert s.otlp.endpoint == "http://collector:4318/v1/traces"
    s = settings_from(caplog, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://c:1/custom")
    assert s.otlp.endpoint == "http://c:1/custom"
    s = settings_from(caplog, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert s.otlp.endpoint == "http://localhost:4317"
    s = settings_from(caplog, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc",
                      OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4317")
    assert s.otlp.protocol == "grpc" and s.otlp.endpoint == "http://c:4317"


def test_headers_and_resource_attributes_are_percent_decoded(caplog):
    s = settings_from(
        caplog,
        OTEL_EXPORTER_OTLP_HEADERS="api-key=a%20b,x=1",
        OTEL_EXPORTER_OTLP_TRACES_HEADERS="x=2",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=prod,team=a%2Cb,broken",
    )
    assert s.otlp.headers == {"api-key": "a b", "x": "2"}
    assert s.resource_attributes == {"deployment.environment": "prod", "team": "a,b"}
    assert "broken" in caplog.text and "OTEL_RESOURCE_ATTRIBUTES" in caplog.text


def test_exporter_lists(caplog):
    assert settings_from(caplog, OTEL_TRACES_EXPORTER="otlp, console,otlp").traces_exporters == ("otlp", "console")
    assert settings_from(caplog, OTEL_TRACES_EXPORTER="none").traces_exporters == ()


def test_instrumentation_lists(caplog):
    s = settings_from(caplog, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="redis, Flask")
    assert s.instrumentation_disabled("redis") and s.instrumentation_disabled("flask")
    assert not s.instrumentation_disabled("celery")
    assert settings_from(caplog, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="*").instrumentation_disabled("celery")
    s = settings_from(caplog, OTEL_PYTHON_ENABLED_INSTRUMENTATIONS="flask")
    assert not s.instrumentation_disabled("flask") and s.instrumentation_disabled("redis")


GARBAGE = {
    "OTEL_SDK_DISABLED": ("maybe", "sdk_disabled", False),
    "OTEL_EXPORTER_OTLP_PROTOCOL": ("carrier-pigeon", None, None),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("not a url", None, None),
    "OTEL_EXPORTER_OTLP_TIMEOUT": ("soon", None, None),
    "OTEL_EXPORTER_OTLP_COMPRESSION": ("zstd-ultra", None, None),
    "OTEL_EXPORTER_OTLP_INSECURE": ("perhaps", None, None),
    "OTEL_BSP_SCHEDULE_DELAY": ("-5", "bsp_schedule_delay_ms", 5000),
    "OTEL_BSP_EXPORT_TIMEOUT": ("x", "bsp_export_timeout_ms", 30000),
    "OTEL_BSP_MAX_QUEUE_SIZE": ("lots", "bsp_max_queue_size", 2048),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("0", "bsp_max_export_batch_size", 512),
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": ("-1", None, None),
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": ("long", None, None),
    "OTEL_SPAN_EVENT_COUNT_LIMIT": ("1e99", None, None),
    "OTEL_LOG_LEVEL": ("chatty", "log_level", "info"),
    "OTEL_PYTHON_LOG_CORRELATION": ("yes please", "log_correlation", False),
    "AUTOTRACE_SHUTDOWN_TIMEOUT": ("nan", "shutdown_timeout_ms", 5000),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_malformed_value_warns_with_name_value_and_default(caplog, name):
    value, field, default = GARBAGE[name]
    s = settings_from(caplog, **{name: value})
    assert name in caplog.text and repr(value) in caplog.text and "default" in caplog.text
    if field:
        assert getattr(s, field) == default
    assert name in s.invalid_variables


def test_excluded_url_patterns_skip_invalid_regex(caplog):
    from autotrace.config import EnvReader

    caplog.set_level(logging.WARNING, logger="autotrace")
    patterns = EnvReader({"X": "health,([bad"}).patterns("X")
    assert [p.pattern for p in patterns] == ["health"]
    assert "([bad" in caplog.text
