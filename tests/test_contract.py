"""The instrumentor contract (tests/support/contract.py) applied to the six built-ins.

Each declaration lists what the instrumentor patches (its documented class
paths) and one real call per entry point: Redis db 10, SQLite in memory,
Flask's test client, Starlette/FastAPI over httpx's ASGI transport, a local
HTTP server, Celery eager execution.
"""

from __future__ import annotations

import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict

from tests.support.contract import Contract
from tests.support.processes import free_port
from tests.support.services import REDIS

_lazy: Dict[str, Any] = {}


def _once(key: str, make: Any) -> Any:
    """Objects built at the first (unpatched) call and reused: created before patching, as in a program."""
    if key not in _lazy:
        _lazy[key] = make()
    return _lazy[key]


class Boom(Exception):
    pass


# --------------------------------------------------------------------------
# redis (db 10)

_KEY = f"contract:{uuid.uuid4().hex}"


def _redis() -> Any:
    import redis

    return _once("redis", lambda: redis.Redis(host=REDIS[0], port=REDIS[1], db=10, socket_timeout=5))


def redis_set() -> Any:
    return _redis().set(_KEY, "v", ex=60)


def redis_pipeline() -> Any:
    with _redis().pipeline() as pipe:
        return pipe.set(_KEY, "w", ex=60).get(_KEY).execute()


async def redis_async_set() -> Any:
    import redis.asyncio

    client = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1], db=10, socket_timeout=5)
    try:
        return await client.set(_KEY + ":async", "v", ex=60)
    finally:
        await client.aclose()


def redis_unknown_command() -> Any:
    return _redis().execute_command("NO_SUCH_COMMAND_CONTRACT", "x")


Contract(
    instrumentor="autotrace.instrumentors.redis:RedisInstrumentor",
    module="redis",
    targets=[
        "redis.client:Redis.execute_command",
        "redis.client:Pipeline.immediate_execute_command",
        "redis.client:Pipeline.execute",
        "redis.cluster:RedisCluster.execute_command",
        "redis.cluster:ClusterPipeline.execute",
    ],
    async_targets=[
        "redis.asyncio.client:Redis.execute_command",
        "redis.asyncio.client:Pipeline.immediate_execute_command",
        "redis.asyncio.client:Pipeline.execute",
        "redis.asyncio.cluster:RedisCluster.execute_command",
        "redis.asyncio.cluster:ClusterPipeline.execute",
    ],
    calls=[redis_set, redis_pipeline, redis_async_set],
    error_call=redis_unknown_command,
    spans_per_call=1,
    requires=[REDIS],
).install(globals())


# --------------------------------------------------------------------------
# sqlalchemy (SQLite in memory): listeners on Engine, no attribute replaced


def _engine() -> Any:
    import sqlalchemy

    return _once("engine", lambda: sqlalchemy.create_engine("sqlite://"))


def sql_select() -> Any:
    import sqlalchemy

    with _engine().connect() as connection:
        return connection.execute(sqlalchemy.text("SELECT 1 + :x"), {"x": 1}).scalar()


def sql_missing_table() -> Any:
    import sqlalchemy

    with _engine().connect() as connection:
        return connection.execute(sqlalchemy.text("SELECT * FROM no_such_table_contract")).all()


Contract(
    instrumentor="autotrace.instrumentors.sqlalchemy:SQLAlchemyInstrumentor",
    module="sqlalchemy",
    state="[len(getattr(mod('sqlalchemy').create_engine('sqlite://').dispatch, event))"
    " for event in ('before_cursor_execute', 'after_cursor_execute')]",
    calls=[sql_select],
    error_call=sql_missing_table,
    spans_per_call=1,
).install(globals())


# --------------------------------------------------------------------------
# flask (test client)


def _flask_app() -> Any:
    def make() -> Any:
        from flask import Flask

        app = Flask("contract")
        app.config["PROPAGATE_EXCEPTIONS"] = True

        @app.route("/orders/<int:order_id>")
        def order(order_id: int) -> Any:
            return {"id": order_id}

        @app.route("/boom")
        def boom() -> Any:
            raise Boom("kaput")

        return app

    return _once("flask", make)


def flask_get() -> Any:
    with _flask_app().test_client() as client:
        response = client.get("/orders/7", buffered=True)
        return response.status_code, response.get_json()


def flask_boom() -> Any:
    with _flask_app().test_client() as client:
        return client.get("/boom", buffered=True).status_code


Contract(
    instrumentor="autotrace.instrumentors.flask:FlaskInstrumentor",
    module="flask",
    targets=["flask.app:Flask.wsgi_app", "flask.app:Flask.handle_exception", "flask.app:Flask.process_response"],
    calls=[flask_get],
    error_call=flask_boom,
    spans_per_call=1,
).install(globals())


# --------------------------------------------------------------------------
# fastapi / starlette (httpx over the ASGI transport)


def _asgi_get(app: Any, path: str) -> Any:
    import httpx

    async def go() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get(path)
            return response.status_code, response.text

    return go()


def _fastapi_app() -> Any:
    def make() -> Any:
        from fastapi import FastAPI

        app = FastAPI()

        @app.get("/items/{item_id}")
        async def item(item_id: int) -> Dict[str, int]:
            return {"item": item_id}

        @app.get("/boom")
        async def boom() -> None:
            raise Boom("kaput")

        @app.get("/later")
        async def later() -> Any:
            return PlainTextResponse("queued", background=BackgroundTask(_LATER.append, "done"))

        return app

    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse

    return _once("fastapi", make)


_LATER: list = []


def _starlette_app() -> Any:
    def make() -> Any:
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        return Starlette(routes=[Route("/plain/{x}", lambda request: PlainTextResponse("plain"))])

    return _once("starlette", make)


def fastapi_get() -> Any:
    return _asgi_get(_fastapi_app(), "/items/3")


def starlette_get() -> Any:
    return _asgi_get(_starlette_app(), "/plain/1")


def fastapi_background() -> Any:
    """The response, then its background task (a span of its own, child of the request's)."""
    return _asgi_get(_fastapi_app(), "/later")


def fastapi_boom() -> Any:
    return _asgi_get(_fastapi_app(), "/boom")


Contract(
    instrumentor="autotrace.instrumentors.fastapi:FastAPIInstrumentor",
    module="fastapi",
    async_targets=[
        "starlette.applications:Starlette.__call__",
        "fastapi.applications:FastAPI.__call__",
        "starlette.background:BackgroundTask.__call__",
    ],
    calls=[fastapi_get, starlette_get, fastapi_background],
    error_call=fastapi_boom,
    spans_per_call=[1, 1, 2],
).install(globals())


# --------------------------------------------------------------------------
# requests (a local HTTP server)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = b"hello " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _server_url() -> str:
    def start() -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    return _once("http", start)


def requests_get() -> Any:
    import requests

    response = requests.get(_server_url() + "/ok", timeout=5)
    return response.status_code, response.text


def requests_refused() -> Any:
    import requests

    port = _once("closed", free_port)
    return requests.get(f"http://127.0.0.1:{port}/", timeout=5)


Contract(
    instrumentor="autotrace.instrumentors.requests:RequestsInstrumentor",
    module="requests",
    targets=[
        "requests.sessions:Session.send",
        "requests.adapters:HTTPAdapter.send",
        "urllib3.connectionpool:HTTPConnectionPool.urlopen",
        "urllib3.util.retry:Retry.increment",
        "urllib3.response:HTTPResponse.release_conn",
        "urllib3.response:HTTPResponse.close",
    ],
    calls=[requests_get],
    error_call=requests_refused,
    spans_per_call=1,
).install(globals())


# --------------------------------------------------------------------------
# celery (eager execution: no broker)


def _celery_app() -> Any:
    def make() -> Any:
        from celery import Celery

        app = Celery("contract", broker="memory://", backend="cache+memory://", set_as_current=False)
        app.conf.task_always_eager = True
        app.conf.task_store_eager_result = False

        @app.task(name="contract.add", shared=False)
        def add(x: int, y: int) -> int:
            return x + y

        @app.task(name="contract.fail", shared=False)
        def fail() -> None:
            raise Boom("eager boom")

        return app

    return _once("celery", make)


def celery_apply() -> Any:
    result = _celery_app().tasks["contract.add"].apply((2, 3))
    return result.state, result.get()


def celery_fail() -> Any:
    return _celery_app().tasks["contract.fail"].apply().get()


Contract(
    instrumentor="autotrace.instrumentors.celery:CeleryInstrumentor",
    module="celery",
    targets=[
        "celery.app.base:Celery.send_task",
        "celery.app.base:Celery._get_backend",
        "celery.app.amqp:AMQP._create_task_sender",
        "celery.app.task:Task.__trace__",
        "celery.app.task:Task.apply",
        "celery.app.control:Control.broadcast",
        "celery.app.control:Control.purge",
        "celery.worker.worker:WorkController.start",
        "celery.worker.worker:WorkController.stop",
        "celery.worker.request:Request._announce_revoked",
        "celery.beat:Service.start",
        "celery.beat:Scheduler.apply_async",
        "celery.backends.base:Backend.store_result",
        "celery.backends.base:Backend.get_task_meta",
        "billiard.pool:Worker._do_exit",
    ],
    calls=[celery_apply],
    error_call=celery_fail,
    spans_per_call=1,
).install(globals())
