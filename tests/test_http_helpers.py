"""Redaction, header capture, method normalisation and URL exclusion shared by HTTP instrumentors."""

from autotrace import http


def test_userinfo_and_secret_query_values_are_redacted():
    url = "https://user:hunter2@api.example.com/v1/pay?amount=5&access_token=abc&API_KEY=k&sig=s&page=2"
    redacted = http.redact_url(url)
    assert "hunter2" not in redacted and "abc" not in redacted and "=k" not in redacted
    assert redacted.startswith("https://REDACTED:REDACTED@api.example.com/v1/pay?")
    assert "amount=5" in redacted and "page=2" in redacted and "sig=REDACTED" in redacted


def test_plain_urls_are_returned_unchanged_and_bytes_are_accepted():
    assert http.redact_url("http://a/b") == "http://a/b"
    assert http.redact_url(b"http://a/b?password=x") == "http://a/b?password=REDACTED"
    assert http.redact_url("http://[::1/x?token=1") == "http://[::1/x"


def test_extra_sensitive_params_and_raw_switch(monkeypatch):
    monkeypatch.setenv("AUTOTRACE_REDACT_QUERY_PARAMS", "ssn")
    http.reset_caches()
    assert http.redact_query("ssn=123&q=a") == "ssn=REDACTED&q=a"
    monkeypatch.setenv("AUTOTRACE_CAPTURE_RAW_URLS", "true")
    http.reset_caches()
    assert http.redact_query("token=1") == "token=1"


def test_method_normalisation():
    assert http.normalize_method("get") == ("GET", "get")
    assert http.normalize_method("POST") == ("POST", None)
    assert http.normalize_method("PURGE") == ("_OTHER", "PURGE")
    assert http.normalize_method(b"PUT") == ("PUT", None)
    assert http.normalize_method(None)[0] == "_OTHER"


def test_header_capture_with_always_and_configured_sanitising(monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-request-id,authorization,x-.*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "x-secret-.*")
    http.reset_caches()
    captured = http.capture_headers(
        "server_request",
        [("X-Request-Id", "r1"), ("Authorization", "Bearer t"), (b"x-secret-token", b"s"), ("x-request-id", "r2"), ("Accept", "a")],
    )
    assert captured == {
        "http.request.header.x-request-id": ["r1", "r2"],
        "http.request.header.authorization": ["REDACTED"],
        "http.request.header.x-secret-token": ["REDACTED"],
    }
    assert http.capture_headers("client_request", [("x-request-id", "1")]) == {}


def test_excluded_urls_library_specific_wins(monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "healthz")
    monkeypatch.setenv("OTEL_PYTHON_FLASK_EXCLUDED_URLS", "ping$")
    http.reset_caches()
    assert http.excluded_urls("flask").match("http://a/ping")
    assert not http.excluded_urls("flask").match("http://a/healthz")
    assert http.excluded_urls("requests").match("http://a/healthz?x=1")
