"""Django instrumentor, in process: the test Client, raw WSGI and ASGI calls, the ORM on real databases.

Settings are configured once for the test process (``settings.configure`` in a
module fixture); this module is the URLconf. Django is imported before any
patching (import-order proof); each test patches and unpatches.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from wsgiref.util import setup_testing_defaults

import django
import pytest
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path, re_path
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

import django.core.handlers.asgi
import django.core.handlers.base
import django.core.handlers.wsgi
import django.db.backends.utils
from autotrace.instrumentors.django import DjangoInstrumentor
from autotrace.instrumentors.sqlite3 import Sqlite3Instrumentor
from tests.support.services import MARIADB, POSTGRES, require

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET = "SECRET-LITERAL-4111"
SCOPE = "autotrace.instrumentors.django"
tracer = trace.get_tracer("test")


class Boom(Exception):
    pass


# -- views and URLconf ------------------------------------------------------------


def item(request, *args, **kwargs):
    return JsonResponse(kwargs)


def boom(request):
    raise Boom("kaput")


def missing(request):
    raise Http404("no such thing")


def forbidden(request):
    raise PermissionDenied


def fail(request):
    return HttpResponse("backend down", status=503)


def headers(request):
    response = HttpResponse("ok")
    response["X-Resp"] = "r1"
    response["Set-Cookie"] = "sid=secret"
    return response


def stream(request):
    def chunks():
        yield b"first\n"
        with tracer.start_as_current_span("chunk"):
            time.sleep(0.15)
        yield b"second\n"

    return StreamingHttpResponse(chunks())


def current(request):
    span_id = trace.get_current_span().get_span_context().span_id
    return JsonResponse({"span_id": format(span_id, "016x")})


async def async_item(request, slug):
    with tracer.start_as_current_span("inside"):
        await asyncio.sleep(0)
    return HttpResponse(slug)


async def async_boom(request):
    raise Boom("async kaput")


def nested(request):
    from django.test import Client

    inner = Client().get("/items/1/")  # Django called from inside a Django view
    return HttpResponse(str(inner.status_code))


def orm(request):
    item = Item.objects.create(name=request.GET["name"])
    return JsonResponse({"count": Item.objects.filter(pk=item.pk).count()})


orders = [
    path("<slug:ref>/", item),
    path("lines/", include([path("<int:pk>/", item)])),
]
urlpatterns = [
    path("", item, {"pk": 0}),
    path("items/<int:pk>/", item),
    path("api/v1/orders/", include(orders)),
    re_path(r"^archive/(?P<year>[0-9]{4})/$", item),
    re_path(r"^v(?P<version>[12])/", include([path("things/<int:pk>", item)])),
    path("boom/", boom),
    path("missing/", missing),
    path("forbidden/", forbidden),
    path("fail/", fail),
    path("headers/", headers),
    path("stream/", stream),
    path("current/", current),
    path("health/", item, {"pk": 1}),
    path("async/<slug:slug>/", async_item),
    path("async-boom/", async_boom),
    path("orm/", orm),
    path("nested/", nested),
]

Item = None  # the model, made once the apps are ready


@pytest.fixture(scope="module", autouse=True)
def django_settings():
    global Item
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="autotrace-tests",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            USE_TZ=True,
            DATABASES={
                "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
                "pg": {"ENGINE": "django.db.backends.postgresql", "NAME": "test", "USER": "postgres",
                       "HOST": "127.0.0.1", "PORT": "5432"},
                "maria": {"ENGINE": "django.db.backends.mysql", "NAME": "test", "USER": "root",
                          "HOST": "127.0.0.1", "PORT": "3306"},
            },
        )
    django.setup()
    if Item is None:
        from django.db import models

        class Item(models.Model):  # noqa: F811 (the module global)
            name = models.CharField(max_length=64, unique=True)

            class Meta:
                app_label = "autotrace_tests"

        globals()["Item"] = Item
    yield


@pytest.fixture
def traced(instrument):
    return instrument(DjangoInstrumentor)


@pytest.fixture
def client(traced):
    from django.test import Client

    return Client(raise_request_exception=False)


def server_spans(spans):
    return [s for s in spans.get() if s.kind is SpanKind.SERVER]


def exported_text(found):
    parts = []
    for s in found:
        parts += [s.name, json.dumps(dict(s.attributes), default=str), s.status.description or ""]
        parts += [json.dumps(dict(e.attributes), default=str) for e in s.events]
    return "\n".join(parts)


# -- the test client: names, routes, attributes -----------------------------------------


def test_route_name_and_stable_attributes(client, spans):
    response = client.get("/items/42/?page=2&token=abc", HTTP_USER_AGENT="pytest-agent")
    assert response.status_code == 200 and response.json() == {"pk": 42}
    span = spans.one()
    assert span.kind is SpanKind.SERVER
    assert span.name == "GET /items/<int:pk>/"
    assert span.instrumentation_scope.name == SCOPE
    attrs = dict(span.attributes)
    assert attrs == {
        "http.request.method": "GET",
        "http.route": "/items/<int:pk>/",
        "http.response.status_code": 200,
        "url.path": "/items/42/",
        "url.query": "page=2&token=REDACTED",
        "url.scheme": "http",
        "server.address": "testserver",
        "server.port": 80,
        "client.address": "127.0.0.1",
        "network.protocol.version": "1.1",
        "user_agent.original": "pytest-agent",
    }
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    "url, route",
    [
        ("/", "/"),
        ("/api/v1/orders/a-1/", "/api/v1/orders/<slug:ref>/"),
        ("/api/v1/orders/lines/7/", "/api/v1/orders/lines/<int:pk>/"),
        ("/archive/2024/", "/^archive/(?P<year>[0-9]{4})/$"),
        ("/v2/things/3", "/^v(?P<version>[12])/things/<int:pk>"),
    ],
    ids=["root", "include", "nested-include", "re_path", "re_path-include"],
)
def test_route_templates(client, spans, url, route):
    assert client.get(url).status_code == 200
    span = spans.one()
    assert span.attributes["http.route"] == route
    assert span.name == f"GET {route}"


def test_post_and_other_method(client, spans):
    assert client.post("/items/1/", data={"a": "b"}).status_code == 200
    assert client.generic("PURGE", "/items/1/").status_code == 200
    post, other = spans.get()
    assert post.name == "POST /items/<int:pk>/"
    assert other.name == "_OTHER /items/<int:pk>/"  # (the WSGI core's name for an unknown method)
    assert other.attributes["http.request.method"] == "_OTHER"
    assert other.attributes["http.request.method_original"] == "PURGE"


def test_no_route_404_is_named_by_method_only(client, spans):
    assert client.get("/nowhere/at/all").status_code == 404
    span = spans.one()
    assert span.name == "GET"
    assert "http.route" not in span.attributes
    assert span.attributes["http.response.status_code"] == 404
    assert span.status.status_code is StatusCode.UNSET


def test_http404_and_permission_denied_are_not_errors(client, spans):
    assert client.get("/missing/").status_code == 404
    assert client.get("/forbidden/").status_code == 403
    for span, code in zip(spans.get(), (404, 403)):
        assert span.attributes["http.response.status_code"] == code
        assert span.status.status_code is StatusCode.UNSET
        assert not span.events and "error.type" not in span.attributes
    assert [s.attributes["http.route"] for s in spans.get()] == ["/missing/", "/forbidden/"]


def test_5xx_response_is_an_error(client, spans):
    assert client.get("/fail/").status_code == 503
    span = spans.one()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "503"
    assert not span.events


def test_view_exception_turned_into_500_is_recorded(client, spans):
    assert client.get("/boom/").status_code == 500
    span = spans.one()
    assert span.name == "GET /boom/"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["error.type"] == f"{__name__}.Boom"
    [event] = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == f"{__name__}.Boom"
    assert event.attributes["exception.message"] == "kaput"
    assert "def boom" in event.attributes["exception.stacktrace"] or "boom" in event.attributes["exception.stacktrace"]


def test_exception_reraised_by_the_client_is_recorded_once(traced, spans):
    from django.test import Client

    with pytest.raises(Boom):
        Client().get("/boom/")  # raise_request_exception=True: the client re-raises it
    span = spans.one()
    assert [e.name for e in span.events] == ["exception"]
    assert span.attributes["error.type"] == f"{__name__}.Boom"


def test_valid_traceparent_joins_the_trace(client, spans):
    body = client.get("/current/", HTTP_TRACEPARENT=TRACEPARENT).json()
    span = spans.one()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.parent.is_remote
    assert body["span_id"] == format(span.context.span_id, "016x")  # current inside the view


@pytest.mark.parametrize("header", ["garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"])
def test_malformed_traceparent_starts_a_new_trace(client, spans, header):
    assert client.get("/items/1/", HTTP_TRACEPARENT=header).status_code == 200
    span = spans.one()
    assert span.parent is None
    assert span.context.is_valid


def test_excluded_urls(client, spans, monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_DJANGO_EXCLUDED_URLS", "health,archive/19")
    assert client.get("/health/").status_code == 200
    assert client.get("/archive/1999/").status_code == 200
    assert client.get("/archive/2024/").status_code == 200
    assert [s.attributes["url.path"] for s in spans.get()] == ["/archive/2024/"]


def test_header_capture_with_redaction(client, spans, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-req,authorization")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "x-resp,set-cookie")
    client.get("/headers/", HTTP_X_REQ="q1", HTTP_AUTHORIZATION="Bearer secret")
    attrs = spans.one().attributes
    assert attrs["http.request.header.x-req"] == ("q1",)
    assert attrs["http.request.header.authorization"] == ("REDACTED",)
    assert attrs["http.response.header.x-resp"] == ("r1",)
    assert attrs["http.response.header.set-cookie"] == ("REDACTED",)
    assert "secret" not in exported_text(spans.get())


def test_no_header_capture_by_default(client, spans):
    client.get("/headers/", HTTP_X_REQ="q1")
    assert not [k for k in spans.one().attributes if ".header." in k]


def test_http_dup_adds_old_names(client, spans, monkeypatch):
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http/dup")
    client.get("/items/5/")
    attrs = spans.one().attributes
    assert attrs["http.method"] == "GET" and attrs["http.status_code"] == 200
    assert attrs["http.target"] == "/items/5/"
    assert attrs["http.route"] == "/items/<int:pk>/"


def test_django_called_inside_a_view_is_not_a_second_request(client, spans):
    assert client.get("/nested/").content == b"200"
    span = spans.one()  # the inner request is not traced again, nor does it rename the outer span
    assert span.name == "GET /nested/"
    assert span.attributes["url.path"] == "/nested/"


def test_no_context_left_after_requests(client, spans):
    before = otel_context.get_current()
    client.get("/items/1/")
    client.get("/boom/")
    client.get("/nowhere/")
    assert otel_context.get_current() == before
    assert not trace.get_current_span().get_span_context().is_valid


# -- a raw WSGI call (what gunicorn and runserver do) --------------------------------------------


def wsgi_environ(path_info, script_name="", **extra):
    environ = {"PATH_INFO": path_info, "SCRIPT_NAME": script_name, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO(b"")}
    environ.update(extra)
    setup_testing_defaults(environ)
    return environ


def test_wsgi_call_under_a_mount_point(traced, spans):
    from django.core.wsgi import get_wsgi_application

    application = get_wsgi_application()
    statuses = []
    environ = wsgi_environ("/items/9/", "/shop", HTTP_TRACEPARENT=TRACEPARENT, HTTP_HOST="shop.example:8080")
    body = application(environ, lambda status, headers, exc_info=None: statuses.append(status))
    span = spans.one()  # an HttpResponse is complete in memory: ended when the application returned
    assert b"".join(body) == b'{"pk": 9}' and statuses == ["200 OK"]
    body.close()
    assert span.name == "GET /shop/items/<int:pk>/"
    assert span.attributes["http.route"] == "/shop/items/<int:pk>/"
    assert span.attributes["url.path"] == "/shop/items/9/"
    assert span.attributes["server.address"] == "shop.example" and span.attributes["server.port"] == 8080
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_wsgi_streaming_response_ends_with_its_body(traced, spans):
    from django.core.wsgi import get_wsgi_application

    body = get_wsgi_application()(wsgi_environ("/stream/"), lambda *args: None)
    assert server_spans(spans) == []  # still streaming
    assert list(body) == [b"first\n", b"second\n"]
    body.close()
    server = spans.one("GET /stream/")
    chunk = spans.one("chunk")
    assert chunk.parent.span_id == server.context.span_id
    assert server.end_time - server.start_time >= 0.15e9


def test_wsgi_exception_recorded(traced, spans):
    from django.core.wsgi import get_wsgi_application

    statuses = []
    body = get_wsgi_application()(wsgi_environ("/boom/"), lambda status, headers, exc_info=None: statuses.append(status))
    body.close()
    span = spans.one()
    assert statuses == ["500 Internal Server Error"]
    assert span.attributes["error.type"] == f"{__name__}.Boom"
    assert [e.name for e in span.events] == ["exception"]


def test_wsgi_propagated_exception_recorded_once_and_reraised(traced, spans):
    from django.core.wsgi import get_wsgi_application
    from django.test import override_settings

    with override_settings(DEBUG_PROPAGATE_EXCEPTIONS=True), pytest.raises(Boom):
        get_wsgi_application()(wsgi_environ("/boom/"), lambda *args: None)
    span = spans.one()
    assert [e.name for e in span.events] == ["exception"]
    assert span.attributes["error.type"] == f"{__name__}.Boom"
    assert span.name == "GET /boom/"


# -- an ASGI call (what uvicorn does) -----------------------------------------------------------


def asgi_call(path, headers=(), root_path="", method="GET", application=None):
    """Run one request through Django's ASGI application (or ``application``); the messages it sent."""
    from django.core.asgi import get_asgi_application

    application = application or get_asgi_application()
    messages = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": root_path + path, "raw_path": (root_path + path).encode(), "root_path": root_path,
        "query_string": b"", "headers": [(b"host", b"127.0.0.1:8000"), *headers],
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
    }

    async def run():
        delivered = []

        async def receive():
            if delivered:  # Django listens for a disconnect after the body: wait until cancelled
                await asyncio.Event().wait()
            delivered.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            messages.append(message)

        await application(scope, receive, send)

    asyncio.run(run())
    return messages


def test_asgi_call_route_and_trace(traced, spans):
    messages = asgi_call("/async/abc/", headers=[(b"traceparent", TRACEPARENT.encode())])
    assert messages[0]["status"] == 200
    server = spans.one("GET /async/<slug:slug>/")
    assert server.attributes["http.route"] == "/async/<slug:slug>/"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["server.address"] == "127.0.0.1" and server.attributes["server.port"] == 8000
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert spans.one("inside").parent.span_id == server.context.span_id


def test_asgi_sync_view_under_root_path(traced, spans):
    assert asgi_call("/items/4/", root_path="/shop")[0]["status"] == 200
    span = spans.one()
    assert span.name == "GET /shop/items/<int:pk>/"
    assert span.attributes["http.route"] == "/shop/items/<int:pk>/"


@pytest.mark.parametrize("url", ["/boom/", "/async-boom/"], ids=["sync-view", "async-view"])
def test_asgi_exception_turned_into_500_is_recorded(traced, spans, url):
    assert asgi_call(url)[0]["status"] == 500
    span = spans.one()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["error.type"] == f"{__name__}.Boom"
    assert [e.name for e in span.events] == ["exception"]


def test_asgi_404_and_excluded(traced, spans, monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_DJANGO_EXCLUDED_URLS", "health")
    assert asgi_call("/nowhere/")[0]["status"] == 404
    assert asgi_call("/health/")[0]["status"] == 200
    span = spans.one()
    assert span.name == "GET" and "http.route" not in span.attributes


def test_asgi_mounted_in_a_traced_starlette_app_adds_no_second_span(traced, instrument, spans):
    pytest.importorskip("starlette")
    from django.core.asgi import get_asgi_application
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from autotrace.instrumentors.fastapi import FastAPIInstrumentor

    instrument(FastAPIInstrumentor)
    outer = Starlette(routes=[Mount("/dj", app=get_asgi_application())])
    assert asgi_call("/dj/items/3/", application=outer)[0]["status"] == 200
    span = spans.one()
    assert span.instrumentation_scope.name == "autotrace.instrumentors.fastapi"
    assert span.attributes["url.path"] == "/dj/items/3/"


def test_asgi_lifespan_is_passed_through(traced, spans):
    from django.core.asgi import get_asgi_application

    with pytest.raises(ValueError, match="lifespan"):
        asyncio.run(get_asgi_application()({"type": "lifespan"}, None, None))
    assert spans.get() == []


# -- the ORM -------------------------------------------------------------------------------


@pytest.fixture
def db(traced, instrument):
    """A fresh in-memory SQLite database (with the Item table), connected with the sqlite3 driver traced too."""
    from django.db import connection
    from django.db.backends.base.base import BaseDatabaseWrapper

    instrument(Sqlite3Instrumentor)
    BaseDatabaseWrapper.close(connection)  # (SQLite's own close() keeps an in-memory database open)
    with connection.schema_editor() as editor:
        editor.create_model(Item)
    yield connection
    BaseDatabaseWrapper.close(connection)


def test_orm_statements_one_span_each_no_literals(db, spans):
    spans.clear()
    Item.objects.create(name=SECRET)
    assert Item.objects.filter(name=SECRET).count() == 1
    with db.cursor() as cursor:
        cursor.execute(f"SELECT id FROM autotrace_tests_item WHERE name = '{SECRET}' AND id > 41")
    insert, select, raw = spans.get()
    assert insert.name == "INSERT autotrace_tests_item" and insert.kind is SpanKind.CLIENT
    assert insert.instrumentation_scope.name == SCOPE
    assert insert.attributes["db.system.name"] == "sqlite"
    assert insert.attributes["db.namespace"] == ":memory:"
    assert insert.attributes["db.operation.name"] == "INSERT"
    assert insert.attributes["db.collection.name"] == "autotrace_tests_item"
    assert select.name == "SELECT autotrace_tests_item"
    assert raw.attributes["db.query.text"] == "SELECT id FROM autotrace_tests_item WHERE name = ? AND id > ?"
    assert SECRET not in exported_text(spans.get()) and "41" not in raw.attributes["db.query.text"]


def test_no_duplicate_driver_span(db, traced, spans):
    spans.clear()
    Item.objects.filter(name="x").exists()
    assert [s.instrumentation_scope.name for s in spans.get()] == [SCOPE]
    # Django opens its connections under suppression: they are the driver's own classes, with no
    # per-statement driver layer under the ORM (docs/dbapi.md).
    import sqlite3

    assert type(db.connection) is sqlite3.Connection


def test_connection_setup_makes_no_span(db, spans):
    from django.db.backends.base.base import BaseDatabaseWrapper

    BaseDatabaseWrapper.close(db)
    spans.clear()
    db.ensure_connection()  # PRAGMA statements through the traced sqlite3 connection
    assert spans.get() == []


def test_debug_query_log_makes_no_span(db, spans):
    db.force_debug_cursor = True  # as under DEBUG=True: every query is logged
    spans.clear()
    try:
        assert not Item.objects.filter(name=SECRET, pk__gt=3).exists()
    finally:
        db.force_debug_cursor = False
    assert [s.name for s in spans.get()] == ["SELECT autotrace_tests_item"]
    assert SECRET in db.queries[-1]["sql"]  # Django's own log (SELECT QUOTE(?) ran, untraced)


def test_executemany_is_one_batch_span(db, spans):
    spans.clear()
    with db.cursor() as cursor:
        cursor.executemany("INSERT INTO autotrace_tests_item (name) VALUES (%s)", [("a",), ("b",), ("c",)])
    span = spans.one()
    assert span.name == "BATCH INSERT autotrace_tests_item"
    assert span.attributes["db.operation.batch.size"] == 3


def test_failed_statement_recorded_scrubbed(db, spans):
    from django.db import IntegrityError, transaction

    Item.objects.create(name=SECRET)
    spans.clear()
    with pytest.raises(IntegrityError), transaction.atomic():
        with db.cursor() as cursor:
            cursor.execute(f"INSERT INTO autotrace_tests_item (name) VALUES ('{SECRET}')")
    span = spans.one("INSERT autotrace_tests_item")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "django.db.utils.IntegrityError"
    assert [e.name for e in span.events] == ["exception"]
    assert SECRET not in exported_text(spans.get())


def test_orm_spans_are_children_of_the_request_span(db, client, spans):
    spans.clear()
    assert client.get("/orm/", {"name": SECRET}).json() == {"count": 1}
    server = spans.one("GET /orm/")
    statements = [s for s in spans.get() if s.kind is SpanKind.CLIENT]
    assert [s.name for s in statements] == ["INSERT autotrace_tests_item", "SELECT autotrace_tests_item"]
    assert all(s.parent.span_id == server.context.span_id for s in statements)
    assert SECRET not in exported_text(statements)


def test_postgresql_backend(traced, instrument, spans):
    require(POSTGRES)
    from autotrace.instrumentors.psycopg import PsycopgInstrumentor
    from django.db import connections

    instrument(PsycopgInstrumentor)
    connection = connections["pg"]
    connection.close()
    table = "at_django_" + uuid.uuid4().hex[:10]
    spans.clear()
    try:
        with connection.cursor() as cursor:  # connecting (SET TIME ZONE, type probes) makes no span
            cursor.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, card TEXT)")
            cursor.execute(f"INSERT INTO {table} VALUES (%s, '{SECRET}')", [1])
            cursor.execute(f"SELECT card FROM {table} WHERE id = %s", [1])
            assert cursor.fetchone() == (SECRET,)
        create, insert, select = spans.get()
        assert {s.instrumentation_scope.name for s in spans.get()} == {SCOPE}
        assert select.name == f"SELECT {table}"
        assert dict(select.attributes) == {
            "db.system.name": "postgresql", "db.namespace": "test", "server.address": "127.0.0.1",
            "server.port": 5432, "db.operation.name": "SELECT", "db.collection.name": table,
            "db.query.text": f"SELECT card FROM {table} WHERE id = %s",
        }
        assert SECRET not in exported_text(spans.get())
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {table}")
        connection.close()


def test_mariadb_backend(traced, instrument, spans):
    require(MARIADB)
    from autotrace.instrumentors.mysqldb import MySQLdbInstrumentor
    from django.db import connections

    instrument(MySQLdbInstrumentor)
    connection = connections["maria"]
    connection.close()
    spans.clear()
    try:
        with connection.cursor() as cursor:  # the connection's set-up queries make no span
            cursor.execute("SELECT %s", [1])
        span = spans.one()
        assert span.instrumentation_scope.name == SCOPE
        assert span.attributes["db.system.name"] == "mariadb"
        assert span.attributes["server.address"] == "127.0.0.1" and span.attributes["server.port"] == 3306
    finally:
        connection.close()


# -- patching ----------------------------------------------------------------------------------


def test_unpatch_restores_originals(instrument, spans):
    from django.core.signals import got_request_exception
    from django.test import Client

    targets = [
        (django.core.handlers.wsgi.WSGIHandler, "__call__"),
        (django.core.handlers.asgi.ASGIHandler, "__call__"),
        (django.core.handlers.base.BaseHandler, "resolve_request"),
        (django.db.backends.utils.CursorWrapper, "_execute"),
    ]
    originals = [cls.__dict__[name] for cls, name in targets]
    receivers = len(got_request_exception.receivers)
    instrumentor = instrument(DjangoInstrumentor)
    assert not any(cls.__dict__[name] is original for (cls, name), original in zip(targets, originals))
    assert len(got_request_exception.receivers) == receivers + 1
    instrumentor.unpatch()
    assert all(cls.__dict__[name] is original for (cls, name), original in zip(targets, originals))
    assert len(got_request_exception.receivers) == receivers
    Client(raise_request_exception=False).get("/boom/")
    assert spans.get() == []


def test_patching_never_reads_the_settings(tmp_path):
    """As a startproject's wsgi.py does: Django imported (and patched) before DJANGO_SETTINGS_MODULE is set."""
    (tmp_path / "late_settings.py").write_text("SECRET_KEY = 'x'\nROOT_URLCONF = 'late_settings'\nALLOWED_HOSTS = ['*']\n"
                                               "from django.http import HttpResponse\nfrom django.urls import path\n"
                                               "urlpatterns = [path('hi/<int:n>', lambda r, n: HttpResponse('hi'))]\n")
    script = SHIM + textwrap.dedent(
        """
        import os
        from autotrace.instrumentors.django import DjangoInstrumentor
        DjangoInstrumentor().instrument()   # imports and patches every Django module we hook
        from django.conf import settings
        assert not settings.configured
        from django.core.wsgi import get_wsgi_application
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "late_settings")
        application = get_wsgi_application()
        from wsgiref.util import setup_testing_defaults
        environ = {"PATH_INFO": "/hi/3"}
        setup_testing_defaults(environ)
        b"".join(application(environ, lambda *a: None))
        print([s.name for s in spans()])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE" and not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['GET /hi/<int:n>']"


SHIM = textwrap.dedent(
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    _exporter = InMemorySpanExporter()
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(_provider)
    spans = _exporter.get_finished_spans
    """
)
