"""gRPC across processes: a client process and a server process under ``autotrace-run``, both
exporting to a real OTLP receiver (over gRPC too, whose own calls must never be traced).

Needs the ``grpc`` entry point in pyproject.toml (``autotrace.instrumentors`` group): without it
the agent does not load the instrumentor (skipped locally, a failure under CI=true).
"""

from __future__ import annotations

import textwrap
from typing import Any, List

import pytest

pytest.importorskip("grpc")

from tests.support.processes import free_port, start_traced, stop, run_traced, wait_for_port  # noqa: E402
from tests.support.receiver import OTLPReceiver  # noqa: E402
from tests.support.services import in_ci  # noqa: E402

SERVICE = "autotrace.test.Echo"

SERVER = textwrap.dedent(
    """
    import sys, time
    from concurrent import futures
    import grpc

    ident = lambda value: value

    def unary(request, context):
        if request == b"abort":
            context.abort(grpc.StatusCode.INTERNAL, "server says no")
        return request

    def stream(request, context):
        for i in range(3):
            yield b"%d" % i

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("SERVICE", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, ident, ident),
    }),))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()
    """
).replace("SERVICE", SERVICE)

CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import grpc, grpc.aio
    from opentelemetry import trace

    target = "localhost:" + sys.argv[1]
    with trace.get_tracer("client-app").start_as_current_span("client-work"):
        with grpc.insecure_channel(target) as channel:
            assert channel.unary_unary("/SERVICE/Unary")(b"hello", metadata=(("k", "v"),)) == b"hello"
            try:
                channel.unary_unary("/SERVICE/Unary")(b"abort")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.INTERNAL

        async def aio():
            async with grpc.aio.insecure_channel(target) as channel:
                return [r async for r in channel.unary_stream("/SERVICE/Stream")(b"")]

        assert asyncio.run(aio()) == [b"0", b"1", b"2"]
    print("done", flush=True)
    """
).replace("SERVICE", SERVICE)


def _entry_point_registered() -> bool:
    from importlib.metadata import entry_points

    try:
        found = entry_points(group="autotrace.instrumentors")
    except TypeError:  # Python 3.9
        found = entry_points().get("autotrace.instrumentors", [])
    return any(e.name == "grpc" for e in found)


@pytest.fixture
def receiver() -> Any:
    if not _entry_point_registered():
        message = "the grpc entry point is not in pyproject.toml (autotrace.instrumentors)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    with OTLPReceiver(grpc=True) as r:
        yield r


@pytest.mark.parametrize("protocol, propagators", [
    ("grpc", "tracecontext,baggage"),
    ("grpc", "b3multi"),
    ("http/protobuf", "b3"),
])
def test_client_and_server_processes_make_one_trace(receiver: Any, tmp_path: Any, protocol: str, propagators: str) -> None:
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "client.py").write_text(CLIENT)
    env = dict(receiver.env(protocol), OTEL_PROPAGATORS=propagators)
    port = free_port()
    server = start_traced(["python", str(tmp_path / "server.py"), str(port)],
                          env=dict(env, OTEL_SERVICE_NAME="echo-server"))
    try:
        wait_for_port(port, process=server)
        client = run_traced(["python", str(tmp_path / "client.py"), str(port)],
                            env=dict(env, OTEL_SERVICE_NAME="echo-client"), timeout=60)
        assert client.returncode == 0, client.stderr
        assert "done" in client.stdout
        unary, streamed = f"{SERVICE}/Unary", f"{SERVICE}/Stream"

        def complete(spans: List[Any]) -> bool:
            names = [(s.resource.get("service.name"), s.kind, s.name) for s in spans]
            return (names.count(("echo-client", "CLIENT", unary)) == 2 and names.count(("echo-server", "SERVER", unary)) == 2
                    and ("echo-client", "CLIENT", streamed) in names and ("echo-server", "SERVER", streamed) in names)

        spans = receiver.wait_for(complete, timeout=20)
    finally:
        out, err = stop(server)
    assert "Traceback" not in err, err

    root = [s for s in spans if s.name == "client-work"]
    assert len(root) == 1
    trace_id = root[0].trace_id
    clients = [s for s in spans if s.kind == "CLIENT"]
    servers = [s for s in spans if s.kind == "SERVER"]
    assert len(clients) == len(servers) == 3, sorted((s.kind, s.name) for s in spans)
    for client_span in clients:
        assert client_span.trace_id == trace_id and client_span.parent_span_id == root[0].span_id
        assert client_span.attributes["rpc.system.name"] == "grpc"
        assert client_span.attributes["server.address"] == "localhost"
        assert client_span.attributes["server.port"] == port
    by_id = {s.span_id: s for s in clients}
    for server_span in servers:
        assert server_span.trace_id == trace_id  # one trace across the two processes
        parent = by_id[server_span.parent_span_id]  # the right parent: the CLIENT span of the same call
        assert parent.name == server_span.name
        assert parent.attributes["rpc.response.status_code"] == server_span.attributes["rpc.response.status_code"]
    failed = [s for s in servers if s.attributes["rpc.response.status_code"] == "INTERNAL"]
    assert len(failed) == 1 and failed[0].status == "ERROR"
    # the exporter's own calls (OTLP/gRPC Export) are never traced, in either process
    assert not [s for s in spans if "TraceService" in s.name or "TraceService" in str(s.attributes.get("rpc.method", ""))]
    assert {s.resource["service.name"] for s in spans} == {"echo-client", "echo-server"}


def test_agent_patches_grpc_lazily(receiver: Any) -> None:
    code = textwrap.dedent(
        """
        import sys
        print("grpc" in sys.modules)
        import grpc, grpc._channel
        print(type(vars(grpc._channel._UnaryUnaryMultiCallable)["__call__"]).__name__)
        """
    )
    result = run_traced(["python", "-c", code], receiver.env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "FunctionWrapper"]
