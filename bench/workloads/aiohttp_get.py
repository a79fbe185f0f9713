"""aiohttp ClientSession GET to a plain (uninstrumented) http.server in a thread: 1 client span per op.

One event loop and one ClientSession (keep-alive connector) for the whole run;
each op is one ``session.get`` + ``read()`` driven by ``loop.run_until_complete``
(the same loop hand-off for every launcher). Same server, URL and body as
requests_get and httpx_get.
"""
import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp

from _common import run

BODY = b'{"id": 42, "name": "bench"}'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: avoid the 40 ms delayed-ACK stall

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


async def fetch(session, url):
    async with session.get(url) as response:
        await response.read()
        assert response.status == 200


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/users/42?page=1"
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def open_session():
        return aiohttp.ClientSession()

    session = loop.run_until_complete(open_session())

    def op(i):
        loop.run_until_complete(fetch(session, url))

    run("aiohttp_get", op, 2000)
    loop.run_until_complete(session.close())
    loop.close()
    server.shutdown()
