"""The direct OTLP/HTTP processor: spans encoded as they end, full batches sent by the program's thread.

Against the real OTLP receiver of the test kit (real HTTP, real protobuf
decoding); faults the receiver cannot make (a half-written answer, chunked
answers, garbage) are served by a raw socket server in the test.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable, Iterator, List

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from autotrace.exporters.direct import DirectConnection, DirectOTLPSpanProcessor, _Unusable
from autotrace.exporters.otlp_http import OTLPHttpSpanExporter
from tests.support.receiver import OTLPReceiver


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as r:
        yield r


def make(endpoint: str, **options: Any) -> Any:
    exporter = OTLPHttpSpanExporter(endpoint + "/v1/traces", timeout_s=options.pop("timeout_s", 5.0),
                                    compression=options.pop("compression", "none"))
    settings = dict(max_queue_size=20000, schedule_delay_millis=5000, max_export_batch_size=100)
    settings.update(options)
    processor = DirectOTLPSpanProcessor(exporter, **settings)
    provider = TracerProvider(resource=Resource.create({"service.name": "direct-test"}), shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return provider, processor, exporter


def emit(provider: Any, count: int, name: str = "op") -> None:
    tracer = provider.get_tracer("test")
    for i in range(count):
        tracer.start_span(name, kind=SpanKind.CLIENT, attributes={"i": i}).end()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def count_blocking_sends(exporter: OTLPHttpSpanExporter) -> List[int]:
    calls: List[int] = []
    original = exporter._send_with_retries

    def counting(body: bytes) -> Any:
        calls.append(len(body))
        return original(body)

    exporter._send_with_retries = counting  # type: ignore[method-assign]
    return calls


# -- the happy path ------------------------------------------------------------------


def test_every_span_arrives_once_and_full_batches_go_from_the_program_thread(receiver: OTLPReceiver) -> None:
    provider, processor, exporter = make(receiver.http_endpoint)
    blocking = count_blocking_sends(exporter)
    emit(provider, 1050)
    # ten full batches were handed over by this thread; the 50 left wait for the timer or a flush
    assert wait_for(lambda: len(receiver.spans) >= 900)
    assert blocking == []  # none of them through the background thread's blocking path
    assert provider.force_flush()
    provider.shutdown()
    values = sorted(span.attributes["i"] for span in receiver.spans)
    assert values == list(range(1050))
    assert exporter.stats.spans_sent == 1050 and exporter.stats.spans_failed == 0
    assert {span.resource["service.name"] for span in receiver.spans} == {"direct-test"}
    assert all(span.scope == "test" for span in receiver.spans)


def test_a_partial_batch_is_sent_after_the_schedule_delay(receiver: OTLPReceiver) -> None:
    provider, _, _ = make(receiver.http_endpoint, schedule_delay_millis=100)
    emit(provider, 7)
    started = time.monotonic()
    assert wait_for(lambda: len(receiver.spans) == 7, timeout=5)
    assert time.monotonic() - started < 3
    provider.shutdown()


def test_shutdown_sends_what_is_left(receiver: OTLPReceiver) -> None:
    provider, processor, _ = make(receiver.http_endpoint)
    emit(provider, 130)
    provider.shutdown()
    assert len(receiver.spans) == 130
    emit(provider, 5)  # after shutdown: ignored, no error
    assert processor.force_flush() is False


def test_gzip_bodies(receiver: OTLPReceiver) -> None:
    provider, _, _ = make(receiver.http_endpoint, compression="gzip")
    emit(provider, 250)
    provider.shutdown()
    assert len(receiver.spans) == 250
    assert {h.get("content-encoding") for h in receiver.headers} == {"gzip"}


def test_spans_from_many_threads(receiver: OTLPReceiver) -> None:
    provider, _, exporter = make(receiver.http_endpoint)
    threads = [threading.Thread(target=emit, args=(provider, 400, f"t{n}")) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    provider.shutdown()
    assert len(receiver.spans) == 1600
    assert len({(s.trace_id, s.span_id) for s in receiver.spans}) == 1600


# -- a collector that fails ------------------------------------------------------------


def test_error_answer_goes_to_the_retrying_path(receiver: OTLPReceiver) -> None:
    provider, _, exporter = make(receiver.http_endpoint, timeout_s=3.0)
    receiver.behaviour.status = 503
    receiver.behaviour.retry_after = "0"
    blocking = count_blocking_sends(exporter)

    def recover() -> None:
        time.sleep(0.3)
        receiver.behaviour.status = 200

    threading.Thread(target=recover).start()
    emit(provider, 200)
    assert wait_for(lambda: len(receiver.spans) == 200)
    assert blocking  # the retries ran in the background thread
    provider.shutdown()
    assert exporter.stats.spans_failed == 0 and exporter.stats.spans_sent == 200


def test_non_retryable_answer_is_counted_as_failed(receiver: OTLPReceiver) -> None:
    provider, _, exporter = make(receiver.http_endpoint)
    receiver.behaviour.status = 400
    emit(provider, 100)
    provider.shutdown()
    assert receiver.spans == []
    assert exporter.stats.spans_failed == 100


def test_collector_down_then_up() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider, _, exporter = make(f"http://127.0.0.1:{port}", timeout_s=0.5)
    emit(provider, 100)  # refused: counted as failed, the program is not affected
    assert wait_for(lambda: exporter.stats.spans_failed == 100)
    from http.server import ThreadingHTTPServer

    receiver = OTLPReceiver()
    receiver.start()
    try:
        receiver._http.server_close()  # type: ignore[union-attr]
        receiver._http.shutdown()  # type: ignore[union-attr]
        receiver._http = ThreadingHTTPServer(("127.0.0.1", port), receiver._http.RequestHandlerClass)  # type: ignore[union-attr]
        threading.Thread(target=receiver._http.serve_forever, daemon=True).start()
        emit(provider, 300)
        provider.shutdown()
        assert len(receiver.spans) == 300
    finally:
        receiver.stop()


def test_queue_full_drops_and_counts() -> None:
    # A collector that accepts the connection and never answers: nothing can leave.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        provider, processor, exporter = make(f"http://127.0.0.1:{port}", max_queue_size=300, timeout_s=0.3)
        emit(provider, 1000)
        assert processor.dropped >= 600
        provider.shutdown()
    assert processor.dropped + exporter.stats.spans_failed + exporter.stats.spans_sent == 1000


# -- fork -------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_sends_its_own_spans_only(receiver: OTLPReceiver) -> None:
    provider, _, _ = make(receiver.http_endpoint)
    emit(provider, 150, "parent")  # one batch sent, 50 queued at the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            emit(provider, 120, "child")
            provider.shutdown()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    provider.shutdown()
    names = [span.name for span in receiver.spans]
    assert names.count("parent") == 150
    assert names.count("child") == 120


# -- the connection's answer parsing -------------------------------------------------------


class RawServer:
    """Accepts one connection and answers every request with ``reply(request_number)``."""

    def __init__(self, reply: Callable[[int], List[bytes]]) -> None:
        self.reply = reply
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        number = 0
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                buffer = b""
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buffer += data
                    while b"\r\n\r\n" in buffer:
                        head, _, rest = buffer.partition(b"\r\n\r\n")
                        length = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
                        if len(rest) < length:
                            break
                        buffer = rest[length:]
                        for piece in self.reply(number):
                            conn.sendall(piece)
                            time.sleep(0.01)
                        number += 1

    def close(self) -> None:
        self.server.close()


def roundtrip(reply: Callable[[int], List[bytes]], requests: int = 1) -> List[Any]:
    server = RawServer(reply)
    try:
        connection = DirectConnection("127.0.0.1", server.port, "/v1/traces", {"Content-Type": "application/x-protobuf"})
        connection.resolve()
        results = []
        from autotrace.exporters.direct import Batch

        for _ in range(requests):
            if not connection.connected:
                assert connection.connect_nowait()
            connection.start(Batch(b"x" * 100, 1))
            results.append(connection.wait(time.monotonic() + 5))
        return results
    finally:
        server.close()


def test_answer_split_across_reads() -> None:
    answer = [b"HTTP/1.1 200 OK\r\nContent-", b"Length: 3\r\n\r\nab", b"c"]
    assert roundtrip(lambda n: answer, requests=3) == [(200, "HTTP 200 OK", None)] * 3


def test_chunked_answer() -> None:
    answer = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"3\r\nabc\r\n", b"0\r\n\r\n"]
    assert roundtrip(lambda n: answer, requests=2) == [(200, "HTTP 200 OK", None)] * 2


def test_error_answer_with_retry_after() -> None:
    answer = [b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n"]
    assert roundtrip(lambda n: answer) == [(503, "HTTP 503 Service Unavailable", 2.0)]


def test_connection_close_answer_closes() -> None:
    answer = [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"]
    assert roundtrip(lambda n: answer, requests=2) == [(200, "HTTP 200 OK", None)] * 2


def test_garbage_answer_is_unusable() -> None:
    with pytest.raises(_Unusable):
        roundtrip(lambda n: [b"SSH-2.0-OpenSSH\r\n\r\n"])


def test_headers_that_cannot_be_written_disable_the_direct_way() -> None:
    exporter = OTLPHttpSpanExporter("http://127.0.0.1:1/v1/traces", headers={"x-key": "a\r\nInjected: 1"})
    assert not DirectConnection.usable_for(exporter)
    assert not DirectConnection.usable_for(OTLPHttpSpanExporter("https://127.0.0.1:1/v1/traces"))
    assert DirectConnection.usable_for(OTLPHttpSpanExporter("http://127.0.0.1:1/v1/traces", headers={"api-key": "k"}))
