"""grpcio unary-unary call to an in-process server: client span + server span per op.

The server is ``grpc.server`` on a thread pool with one generic handler
(``/bench.Bench/Get``, bytes in and out: no protoc, no generated code); the
client is one ``insecure_channel`` and one ``unary_unary`` callable, both
reused. Tracers that instrument both sides make 2 spans per op. No deadline on
the call: under callgrind on a loaded machine one call took over 10 s.
"""
from concurrent import futures

import grpc

from _common import run

METHOD = "/bench.Bench/Get"
REPLY = b'{"id": 42, "name": "bench"}'


def get(request, context):
    return REPLY


def identity(data):
    return data


if __name__ == "__main__":
    handler = grpc.method_handlers_generic_handler(
        "bench.Bench",
        {"Get": grpc.unary_unary_rpc_method_handler(get, request_deserializer=identity, response_serializer=identity)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(METHOD, request_serializer=identity, response_deserializer=identity)
    grpc.channel_ready_future(channel).result(timeout=20)

    def op(i):
        assert call(b"42") == REPLY

    run("grpc_unary", op, 2000)
    channel.close()
    server.stop(None)
