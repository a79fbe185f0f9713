"""FastAPI under real uvicorn (multi-worker and --reload) run by ``autotrace-run``, exporting OTLP/HTTP."""

from __future__ import annotations

import textwrap
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.support.processes import free_port, start_traced, stop, wait_for_port  # noqa: E402
from tests.support.receiver import OTLPReceiver  # noqa: E402

APP = textwrap.dedent(
    '''
    from fastapi import APIRouter, FastAPI

    app = FastAPI()
    router = APIRouter(prefix="/api")

    @router.get("/charge/{order_id}")
    async def charge(order_id: int) -> dict:
        return {"order": order_id}

    app.include_router(router)
    '''
)


def get(port: int, path: str, headers=None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as response:
        response.read()
        return response.status


def wait_until_serving(port: int, process, timeout: float = 30.0) -> None:
    wait_for_port(port, timeout=timeout, process=process)
    import time

    deadline = time.monotonic() + timeout
    while True:  # the port may be bound by the supervisor before a worker is ready
        try:
            get(port, "/api/charge/0")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


MODES = pytest.mark.parametrize("mode", [["--workers", "2"], ["--reload"]], ids=["workers2", "reload"])


@MODES
@pytest.mark.parametrize(
    "delay", ["100", "60000"], ids=["periodic-export", "shutdown-flush-only"]
)
def test_uvicorn_server_spans_arrive_after_sigterm(tmp_path, mode, delay):
    (tmp_path / "svc.py").write_text(APP)
    port = free_port()
    with OTLPReceiver() as receiver:
        env = dict(receiver.env(), OTEL_SERVICE_NAME="fastapi-it", OTEL_BSP_SCHEDULE_DELAY=delay)
        process = start_traced(
            ["uvicorn", "svc:app", "--host", "127.0.0.1", "--port", str(port), *mode],
            env=env, cwd=str(tmp_path),
        )
        try:
            wait_until_serving(port, process)
            traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            for n in range(1, 11):
                assert get(port, f"/api/charge/{n}?token=secret", {"traceparent": traceparent}) == 200
        finally:
            out, err = stop(process)
        # With the 60 s schedule delay, spans can only arrive through the shutdown flush.
        spans = receiver.wait_for(
            lambda s: len([x for x in s if x.kind == "SERVER" and x.attributes.get("url.path", "").startswith("/api/charge/") and x.attributes["url.path"] != "/api/charge/0"]) >= 10,
            timeout=10,
        )
    server = [s for s in spans if s.kind == "SERVER"]
    traced = [s for s in server if s.trace_id == "0af7651916cd43dd8448eb211c80319c"]
    assert len(traced) == 10, (out, err)
    for span in traced:
        assert span.name == "GET /api/charge/{order_id}"
        assert span.attributes["http.route"] == "/api/charge/{order_id}"
        assert span.attributes["url.query"] == "token=REDACTED"
        assert span.attributes["http.response.status_code"] == 200
        assert span.scope == "autotrace.instrumentors.fastapi"
        assert span.resource["service.name"] == "fastapi-it"
    assert not [s for s in spans if s.scope == "fastapi"]  # FastAPI's built-in spans stay off
    assert "Traceback" not in err
