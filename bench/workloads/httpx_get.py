"""httpx GET to a plain (uninstrumented) http.server in a thread: 1 client span per op.

One httpx.Client is reused (HTTP/1.1 keep-alive): the op is the request
through httpx's full stack (httpcore pool), without a TCP connect each time.
Same server, URL and body as requests_get, so the two clients compare directly.
"""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

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


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/users/42?page=1"
    client = httpx.Client()

    def op(i):
        response = client.get(url)
        assert response.status_code == 200

    run("httpx_get", op, 2000)
    client.close()
    server.shutdown()
