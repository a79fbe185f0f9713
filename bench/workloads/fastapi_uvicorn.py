"""FastAPI over real HTTP: uvicorn in a thread, client on http.client (keep-alive).

The client is the standard library's http.client, which neither autotrace nor
upstream instruments, so the spans per op are the server side only.
"""
import http.client
import threading

import uvicorn
from fastapi import FastAPI

from _common import free_port, run, wait_for_port

app = FastAPI()


@app.get("/users/{user_id}")
async def user(user_id: int):
    return {"id": user_id, "name": "bench"}


if __name__ == "__main__":
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    conn = http.client.HTTPConnection("127.0.0.1", port)

    def op(i):
        conn.request("GET", "/users/42?page=1")
        response = conn.getresponse()
        response.read()
        assert response.status == 200

    run("fastapi_uvicorn", op, 2000)
    conn.close()
    server.should_exit = True
    thread.join(5)
