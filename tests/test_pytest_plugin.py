"""The pytest kit: the ``autotrace_spans`` fixture, its helpers, and trees in failure reports."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 10):
    from importlib.metadata import entry_points
else:  # pragma: no cover
    from importlib_metadata import entry_points

pytest_plugins = ["pytester"]

PLUGIN = "autotrace.testing.pytest_plugin"


def plugin_args():
    """``-p`` the plugin unless the installed entry point registers it already (twice would be an error)."""
    if any(ep.value == PLUGIN for ep in entry_points(group="pytest11")):
        return []
    return ["-p", PLUGIN]


TESTS = '''
import re
import sys

import pytest
from opentelemetry import trace


def test_1_plugin_import_is_cheap_and_installs_nothing():
    assert "autotrace.testing.pytest_plugin" in sys.modules
    assert "opentelemetry.sdk.trace" not in sys.modules
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"


def make_spans():
    tracer = trace.get_tracer("shop")
    with tracer.start_as_current_span("POST /checkout", kind=trace.SpanKind.SERVER,
                                      attributes={"http.route": "/checkout", "http.response.status_code": 201}):
        with tracer.start_as_current_span("SELECT carts", kind=trace.SpanKind.CLIENT,
                                          attributes={"db.operation.name": "SELECT", "db.collection.name": "carts"}):
            pass
        with tracer.start_as_current_span("charge"):
            pass


def test_2_helpers(autotrace_spans):
    make_spans()
    assert [span.name for span in autotrace_spans.spans] == ["SELECT carts", "charge", "POST /checkout"]
    server = autotrace_spans.one(name="POST /checkout", kind="server", http_route="/checkout")
    assert server is autotrace_spans.one(attributes={"http.response.status_code": 201})
    query = autotrace_spans.one(kind=trace.SpanKind.CLIENT, db_operation_name="SELECT", db_collection_name="carts")
    autotrace_spans.assert_child_of(query, server)
    autotrace_spans.assert_same_trace(query, server)
    assert autotrace_spans.find(name=re.compile("^ch")) == [autotrace_spans.one(name="charge")]
    assert autotrace_spans.children(server) == [query, autotrace_spans.one(name="charge")]
    assert autotrace_spans.find(kind="consumer") == []
    assert autotrace_spans.find(http_route=re.compile("check")) == [server]
    with pytest.raises(AssertionError, match="expected exactly one span with name='nope', found 0"):
        autotrace_spans.one(name="nope")
    with pytest.raises(AssertionError, match="found 3"):
        autotrace_spans.one()
    with pytest.raises(AssertionError, match=r"'POST /checkout' \\(server, span \\w+\\) to be a child of 'SELECT carts'.*it is a root span"):
        autotrace_spans.assert_child_of(server, query)
    assert "├─ SELECT carts client" in autotrace_spans.tree()


def test_3_each_test_sees_only_its_own_spans(autotrace_spans):
    provider = trace.get_tracer_provider()
    assert len(provider._active_span_processor._span_processors) == 1  # the last test's was removed
    assert autotrace_spans.spans == []
    make_spans()
    assert len(autotrace_spans) == 3


def test_4_nothing_is_left_installed_after_a_test():
    provider = trace.get_tracer_provider()
    assert provider._active_span_processor._span_processors == ()
    make_spans()  # ends into nothing, breaks nothing


def test_5_failure_shows_the_trees(autotrace_spans):
    make_spans()
    assert autotrace_spans.one(name="charge").attributes.get("amount") == 12, "charge has no amount"


def test_6_passing_tests_print_no_trees(autotrace_spans):
    make_spans()
'''


def test_fixture_helpers_cleanup_and_failure_report(pytester):
    pytester.makepyfile(test_shop=TESTS)
    result = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, failed=1)
    out = result.stdout.str()
    assert out.count("Captured spans (autotrace)") == 1, out
    section = out[out.index("Captured spans (autotrace)"):]
    lines = [line for line in section.splitlines()[1:6]]
    assert lines[0].startswith("trace ") and "· 3 spans ·" in lines[0]
    assert lines[1].startswith("POST /checkout server ")
    assert lines[2] == "│  http.route=/checkout  http.response.status_code=201"
    assert lines[3].startswith("├─ SELECT carts client ")
    assert lines[4] == "│     db.operation.name=SELECT  db.collection.name=carts"
    assert "charge has no amount" in out


def test_an_sdk_provider_already_installed_is_used(pytester):
    pytester.makeconftest('''
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

PROVIDER = TracerProvider(resource=Resource({"service.name": "mine"}))
trace.set_tracer_provider(PROVIDER)
''')
    pytester.makepyfile(test_it='''
from opentelemetry import trace
import conftest

def test_it(autotrace_spans):
    with trace.get_tracer("t").start_as_current_span("work"):
        pass
    assert trace.get_tracer_provider() is conftest.PROVIDER
    assert autotrace_spans.one(name="work").resource.attributes["service.name"] == "mine"
''')
    result = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_with_the_flask_instrumentor(pytester):
    pytester.makepyfile(test_web='''
import pytest
from opentelemetry import trace

flask = pytest.importorskip("flask")
FlaskInstrumentor = pytest.importorskip("autotrace.instrumentors.flask").FlaskInstrumentor


@pytest.fixture
def client():
    instrumentor = FlaskInstrumentor().instrument()
    app = flask.Flask("shop")

    @app.get("/items/<int:number>")
    def item(number):
        with trace.get_tracer("shop").start_as_current_span("load item"):
            if number == 0:
                raise ValueError("no item zero")
            return {"number": number}

    yield app.test_client()
    instrumentor.unpatch()


def test_route(client, autotrace_spans):
    response = client.get("/items/3")
    response.close()  # the server span ends when the WSGI response is closed
    assert response.status_code == 200
    server = autotrace_spans.one(kind="server", http_route="/items/<int:number>")
    assert server.attributes["http.response.status_code"] == 200
    autotrace_spans.assert_child_of(autotrace_spans.one(name="load item"), server)


def test_failing_route_shows_the_exception_in_the_report(client, autotrace_spans):
    client.get("/items/0").close()
    assert autotrace_spans.one(kind="server").attributes["http.response.status_code"] == 200
''')
    result = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    section = out[out.index("Captured spans (autotrace)"):]
    assert "GET /items/<int:number> server" in section
    assert "ValueError: no item zero" in section
