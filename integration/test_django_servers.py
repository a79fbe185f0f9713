"""A ``django-admin startproject`` project under real servers, each started by ``autotrace-run``.

The project (``integration/django_project``: the generated ``project`` package
plus a ``shop`` app) is copied to a temporary directory and migrated once. Its
``wsgi.py`` / ``asgi.py`` / ``manage.py`` set ``DJANGO_SETTINGS_MODULE`` only
after importing Django, so the instrumentor must not read the settings when it
patches. The view makes an ORM INSERT and SELECT and an outgoing ``requests``
call to a second local server (:class:`tests.support.http_server.HTTPTestServer`,
whose ``/echo`` answers with the headers it received).

Each server gets requests carrying a ``traceparent``; the spans are checked at a
real OTLP receiver: one SERVER span per request named by its route, child of
the remote parent, with the three CLIENT spans (two statements, one HTTP call)
below it, and the downstream server saw the HTTP span's context.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.support.http_server import HTTPTestServer
from tests.support.processes import base_env, free_port, start_traced, stop, wait_for_port
from tests.support.receiver import OTLPReceiver

pytest.importorskip("django")
pytest.importorskip("requests")

PROJECT = Path(__file__).parent / "django_project"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
ROUTE = "/shop/orders/<int:pk>/"
ENTRY_POINT = "django = autotrace.instrumentors.django:DjangoInstrumentor"


def _installed(tool: str) -> None:
    if shutil.which(tool, path=os.path.dirname(sys.executable)) is None:
        if os.environ.get("CI", "").lower() == "true":
            raise RuntimeError(f"{tool} is not installed (CI=true: a missing dependency is a failure)")
        pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The migrated project copy, and the environment that points a server at the receiver and downstream."""
    root = tmp_path_factory.mktemp("django_site")
    project = root / "project_copy"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__", "db.sqlite3"))
    env = {}
    if "django" not in {ep.name for ep in entry_points(group="autotrace.instrumentors")}:
        # Not declared in pyproject.toml yet: a throwaway distribution declares it (outside the repository).
        dist_info = root / "entry_point" / "autotrace_django_entry_point-0.0.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: autotrace-django-entry-point\nVersion: 0.0\n")
        (dist_info / "entry_points.txt").write_text(f"[autotrace.instrumentors]\n{ENTRY_POINT}\n")
        env["PYTHONPATH"] = str(dist_info.parent)
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "shop"], cwd=project, env=base_env(), capture_output=True,
        text=True, timeout=60,
    )
    assert migrate.returncode == 0, migrate.stderr
    with OTLPReceiver() as receiver, HTTPTestServer() as downstream:
        env.update(receiver.env())
        env.update({"OTEL_SERVICE_NAME": "django-shop", "DOWNSTREAM_URL": str(downstream.url)})
        yield project, env, receiver, downstream


def fetch(port: int, path: str, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=15) as response:
        return response.status, json.loads(response.read())


SERVERS = {
    "runserver-noreload": lambda port: ["python", "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
    "runserver-autoreload": lambda port: ["python", "manage.py", "runserver", f"127.0.0.1:{port}"],
    "gunicorn": lambda port: ["gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "project.wsgi"],
    "uvicorn": lambda port: ["uvicorn", "--port", str(port), "--no-access-log", "project.asgi:application"],
}


@pytest.mark.parametrize("server", list(SERVERS))
def test_startproject_under_server(site, server):
    project, env, receiver, downstream = site
    if server in ("gunicorn", "uvicorn"):
        _installed(server)
    receiver.clear()
    port = free_port()
    # A session of its own: the autoreloader's server is a child process, stopped with its parent.
    process = start_traced(SERVERS[server](port), env=env, cwd=str(project), start_new_session=True)
    try:
        wait_for_port(port, timeout=30, process=process)
        answers = []
        for pk, parent in ((1, PARENT_ID), (2, "00f067aa0ba902b8")):
            status, body = fetch(port, f"/shop/orders/{pk}/", {"traceparent": f"00-{TRACE_ID}-{parent}-01"})
            assert status == 200, body
            answers.append(body)
        spans = receiver.wait_for(lambda s: len([x for x in s if x.trace_id == TRACE_ID]) >= 8, timeout=20)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)  # the process group started above (the reloader's child too)
        except ProcessLookupError:
            pass
        out, err = stop(process, timeout=20)

    assert "Traceback" not in err and "autotrace: internal error" not in err, err
    server_spans = [s for s in spans if s.kind == "SERVER"]
    assert len(server_spans) == 2, [s.name for s in spans]
    for span, parent, answer in zip(sorted(server_spans, key=lambda s: s.start_ns), (PARENT_ID, "00f067aa0ba902b8"), answers):
        assert span.name == f"GET {ROUTE}"
        assert span.attributes["http.route"] == ROUTE
        assert span.attributes["http.response.status_code"] == 200
        assert span.status != "ERROR"
        assert span.trace_id == TRACE_ID and span.parent_span_id == parent
        assert span.scope == "autotrace.instrumentors.django"
        assert span.resource["service.name"] == "django-shop"
        children = sorted((s for s in spans if s.parent_span_id == span.span_id), key=lambda s: s.start_ns)
        assert [(s.kind, s.name) for s in children] == [
            ("CLIENT", "INSERT shop_order"), ("CLIENT", "SELECT shop_order"), ("CLIENT", "GET"),
        ]
        insert, select, http = children
        assert insert.attributes["db.system.name"] == "sqlite"
        assert insert.attributes["db.namespace"].endswith("db.sqlite3")
        assert "order-" not in insert.attributes["db.query.text"]  # bound values are never read
        assert http.attributes["server.port"] == downstream.port
        # The downstream server got the outgoing call's own context.
        assert answer["downstream_traceparent"] == f"00-{TRACE_ID}-{http.span_id}-01"
    # Outside the requests' trace: only the statements of the server's start-up (runserver's migration check).
    others = [s for s in spans if s.trace_id != TRACE_ID]
    assert len(spans) - len(others) == 8, [s.name for s in spans]
    assert all(s.kind == "CLIENT" and not s.parent_span_id and "db.system.name" in s.attributes for s in others)
