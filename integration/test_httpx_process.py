"""httpx / httpx2 across processes: a client process and a Flask server process, both under
``autotrace-run``, exporting to a real OTLP receiver -> one trace, every server span the child of
the client span of the same physical request.

Needs the ``httpx`` and ``httpx2`` entry points in pyproject.toml (``autotrace.instrumentors``
group): without them the agent does not load the instrumentors (skipped locally, a failure under
CI=true). httpx2 needs Python 3.11+.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from typing import Any, List

import pytest

from tests.support.processes import free_port, run_traced, start_traced, stop, wait_for_port
from tests.support.receiver import OTLPReceiver
from tests.support.services import in_ci

SECRET = "SECRET-KEY-27182"

SERVER = textwrap.dedent(
    """
    import sys
    from flask import Flask, Response, redirect

    app = Flask("hello-server")

    @app.route("/hello")
    def hello():
        return "hello"

    @app.route("/redirect")
    def moved():
        return redirect("/hello")

    @app.route("/stream")
    def stream():
        return Response(iter([b"a", b"b", b"c"]))

    @app.route("/fail")
    def fail():
        return "no", 500

    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
    """
)

CLIENT = textwrap.dedent(
    """
    import asyncio, importlib, sys
    from opentelemetry import trace

    httpx, base = importlib.import_module(sys.argv[1]), sys.argv[2]
    with trace.get_tracer("client-app").start_as_current_span("client-work"):
        assert httpx.get(base + "/hello?api_key=%SECRET%").text == "hello"
        assert httpx.get(base + "/redirect", follow_redirects=True).text == "hello"
        with httpx.Client() as client:
            with client.stream("GET", base + "/stream") as response:
                assert b"".join(response.iter_bytes()) == b"abc"
            assert client.get(base + "/fail").status_code == 500

        async def main():
            async with httpx.AsyncClient() as client:
                return (await client.get(base + "/hello?async=1")).text

        assert asyncio.run(main()) == "hello"
    print("done", flush=True)
    """
).replace("%SECRET%", SECRET)


def _entry_points_registered(names: List[str]) -> bool:
    from importlib.metadata import entry_points

    try:
        found = entry_points(group="autotrace.instrumentors")
    except TypeError:  # Python 3.9
        found = entry_points().get("autotrace.instrumentors", [])
    return set(names) <= {e.name for e in found}


@pytest.fixture(params=["httpx", "httpx2"])
def library(request: Any) -> str:
    if request.param == "httpx2" and sys.version_info < (3, 11):
        pytest.skip("httpx2 needs Python 3.11+")
    if in_ci():
        importlib.import_module(request.param)  # missing under CI: a failure
    else:
        pytest.importorskip(request.param)
    if not _entry_points_registered([request.param, "flask"]):
        message = f"the {request.param} entry point is not in pyproject.toml (autotrace.instrumentors)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return request.param


def test_client_and_server_processes_make_one_trace(library: str, tmp_path: Any) -> None:
    pytest.importorskip("flask")
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "client.py").write_text(CLIENT)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with OTLPReceiver() as receiver:
        env = receiver.env()
        server = start_traced(["python", str(tmp_path / "server.py"), str(port)],
                              env=dict(env, OTEL_SERVICE_NAME="hello-server"))
        try:
            wait_for_port(port, process=server)
            client = run_traced(["python", str(tmp_path / "client.py"), library, base],
                                env=dict(env, OTEL_SERVICE_NAME="hello-client"), timeout=60)
            assert client.returncode == 0, client.stderr
            assert "done" in client.stdout

            def complete(spans: List[Any]) -> bool:
                kinds = [(s.resource.get("service.name"), s.kind) for s in spans]
                return kinds.count(("hello-client", "CLIENT")) >= 6 and kinds.count(("hello-server", "SERVER")) >= 6

            spans = receiver.wait_for(complete, timeout=20)
        finally:
            out, err = stop(server)
    assert "Traceback" not in err, err

    [root] = [s for s in spans if s.name == "client-work"]
    clients = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_ns)
    servers = [s for s in spans if s.kind == "SERVER"]
    assert len(clients) == len(servers) == 6, sorted((s.kind, s.name) for s in spans)
    assert {s.trace_id for s in spans} == {root.trace_id}  # one trace across the two processes
    assert {s.scope for s in clients} == {f"autotrace.instrumentors.{library}"}
    assert [c.attributes["url.full"] for c in clients] == [
        base + "/hello?api_key=REDACTED", base + "/redirect", base + "/hello", base + "/stream", base + "/fail",
        base + "/hello?async=1",
    ]
    assert [c.attributes.get("http.request.resend_count") for c in clients] == [None, None, 1, None, None, None]
    assert [c.attributes["http.response.status_code"] for c in clients] == [200, 302, 200, 200, 500, 200]
    for client_span in clients:
        assert client_span.parent_span_id == root.span_id  # siblings under the caller's span
    by_id = {c.span_id: c for c in clients}
    for server_span in servers:
        parent = by_id[server_span.parent_span_id]  # the right parent: the CLIENT span of the same request
        assert parent.attributes["url.full"].split("?")[0] == base + server_span.attributes["url.path"]
        assert parent.attributes["http.response.status_code"] == server_span.attributes["http.response.status_code"]
    assert len({s.parent_span_id for s in servers}) == 6  # one server span per client span
    # the agent's own export is never traced
    assert not [c for c in clients if str(receiver.http_port) in c.attributes["url.full"]]
    exported = json.dumps([[s.name, s.attributes, s.events, s.status_message] for s in spans], default=str)
    assert SECRET not in exported
