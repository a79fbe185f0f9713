"""OTLP/HTTP export that does not make the program wait for a background thread.

Why: with the SDK's BatchSpanProcessor, a thread encodes and sends each batch.
That thread competes with the program for the GIL, and every time it needs the
GIL back while the program runs (woken by a full batch, after each socket call)
the hand-over costs the program far more than the work itself: measured on
this machine, +20 us per span on a SQLite INSERT with an exporter that does
nothing at all, against +6 us for encoding on the program's own thread.

So here:

* the thread that ends a span encodes it at once (the span is freed at once,
  caches are warm) and appends the bytes to the current batch;
* the thread that fills a batch hands it to the collector over a non-blocking
  socket -- a ``send`` that never waits -- and reads the previous batch's
  answer the same way at the next batch;
* the background thread only wakes on its timer (a partial batch of a quiet
  program is sent after ``OTEL_BSP_SCHEDULE_DELAY``) and when the direct path
  cannot go on: no connection yet, a collector slower than the program, an
  error answer, HTTPS. It then sends with the exporter's full logic (retries,
  backoff, ``Retry-After``, TLS), and reconnects the direct path.

Batch size, queue size (spans waiting, counted and dropped when full) and the
schedule delay keep their OTEL_BSP_* meaning.
"""

from __future__ import annotations

import collections
import errno
import gzip
import os
import random
import select
import socket
import threading
import time
import weakref
from typing import Any, Deque, List, Optional, Tuple

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.trace import SpanProcessor

from autotrace._log import error_once, logger
from autotrace.exporters.encoding import SpanEncoder
from autotrace.exporters.otlp_http import RETRYABLE_STATUS, OTLPHttpSpanExporter, _describe, _retry_after
from autotrace.queue_drops import DropCounter

#: An answer larger than this is not a collector talking OTLP.
_MAX_ANSWER = 1 << 20
#: Spans between two extra attempts to move a backlog of batches on, between full batches.
_PUMP_EVERY = 32
#: Batches waiting beyond which the background thread helps (the collector is slower than the program).
_BACKLOG_FOR_THREAD = 4
Result = Tuple[int, str, Optional[float]]


class _Unusable(Exception):
    """The direct connection cannot go on; the batch goes to the background thread."""


class DirectConnection:
    """One keep-alive HTTP/1.1 connection to a plain-HTTP collector, driven without blocking.

    ``start`` queues one request, ``step`` moves it on as far as it can go now and
    returns the answer once complete (else ``None``), ``wait`` does the same
    with ``select`` until a deadline (background thread, flushes).
    """

    def __init__(self, host: str, port: int, path: str, headers: Any) -> None:
        self.address = (host, port)
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self.sock: Optional[socket.socket] = None
        #: ``(family, sockaddr)`` of the collector once resolved: reconnecting then never blocks.
        self.peer: Optional[Tuple[int, Any]] = None
        self._connecting = False
        self.inflight: Optional[Batch] = None
        self._out: Optional[memoryview] = None
        self._in = bytearray()

    @staticmethod
    def usable_for(exporter: OTLPHttpSpanExporter) -> bool:
        """Plain HTTP, and headers that can be written as they are."""
        if exporter._https:
            return False
        for name, value in exporter._headers.items():
            text = f"{name}{value}"
            if "\r" in text or "\n" in text:
                return False
            try:
                text.encode("latin-1")
            except UnicodeEncodeError:
                return False
        return True

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def resolve(self) -> None:
        """Find the collector's address (may block on DNS: background thread, or at start for literals)."""
        host, port = self.address
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        self.peer = (family, sockaddr)

    def resolves_at_once(self) -> bool:
        """An IP literal or ``localhost``: resolving cannot wait on a DNS server."""
        host = self.address[0]
        if host == "localhost":
            return True
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(family, host)
                return True
            except OSError:
                continue
        return False

    def connect_nowait(self) -> bool:
        """Start connecting to the already resolved collector without blocking; False if not resolved yet."""
        if self.peer is None:
            return False
        family, address = self.peer
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            sock.close()
            raise OSError(error, os.strerror(error))
        self._use(sock)
        self._connecting = error != 0
        return True

    def _use(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        sock.setblocking(False)
        self.sock = sock
        self._connecting = False
        self._out = None
        self._in.clear()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self._out = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def start(self, batch: "Batch") -> None:
        self.inflight = batch
        self._out = memoryview(self._head + b"%d\r\n\r\n" % len(batch.body) + batch.body)
        self._in.clear()

    def take_back(self) -> Optional["Batch"]:
        """The request in flight, to be sent another way; the connection is closed."""
        inflight, self.inflight = self.inflight, None
        self.close()
        return inflight

    def step(self) -> Optional[Result]:
        """Send and read what can be sent and read now; the answer once it is complete."""
        sock = self.sock
        if sock is None:
            raise _Unusable("not connected")
        if self._connecting:
            if not select.select([], [sock], [], 0)[1]:
                return None
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
            self._connecting = False
        if self._out:
            try:
                sent = sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            self._out = self._out[sent:]
            if self._out:
                return None
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return self._answer(eof=False)
            if not data:
                return self._answer(eof=True)
            self._in += data
            if len(self._in) > _MAX_ANSWER:
                raise _Unusable("answer too large")

    def wait(self, deadline: float) -> Result:
        while True:
            result = self.step()
            if result is not None:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            sock = self.sock
            assert sock is not None
            writing = [sock] if self._out else []
            select.select([sock], writing, [sock], min(remaining, 1.0))

    def _answer(self, eof: bool) -> Optional[Result]:
        buffer = self._in
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if eof:
                raise _Unusable("connection closed by the collector")
            return None
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise _Unusable(f"not an HTTP answer: {lines[0][:80]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise _Unusable("bad Content-Length")
            if len(buffer) < start + int(length):
                if eof:
                    raise _Unusable("connection closed by the collector")
                return None
            rest = len(buffer) - start - int(length)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            rest = _chunked_rest(buffer, start)
            if rest is None:
                if eof:
                    raise _Unusable("connection closed by the collector")
                return None
        elif status in (204, 304):
            rest = len(buffer) - start
        elif eof:
            rest = 0  # the body ran to the end of the connection
        else:
            return None
        self._in.clear()
        if eof or rest or headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0":
            self.close()
        reason = parts[2] if len(parts) > 2 else ""
        return status, f"HTTP {status} {reason}".strip(), _retry_after(headers.get("retry-after"))


def _chunked_rest(buffer: bytearray, position: int) -> Optional[int]:
    """Bytes left after a complete chunked body starting at ``position``; None if incomplete."""
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size_text = bytes(buffer[position:line_end]).split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Unusable("bad chunk size") from None
        position = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", line_end)
            if buffer[position:position + 2] == b"\r\n":
                return len(buffer) - position - 2
            if trailer_end < 0:
                return None
            return len(buffer) - trailer_end - 4
        if len(buffer) < position + size + 2:
            return None
        position += size + 2


class Batch:
    """One encoded ExportTraceServiceRequest waiting to be sent."""

    __slots__ = ("body", "count", "sealed_at", "retry", "not_before")

    def __init__(self, body: bytes, count: int) -> None:
        self.body = body
        self.count = count
        self.sealed_at = time.monotonic()
        self.retry = False  # the direct way failed: the background thread sends it, with retries
        self.not_before = 0.0  # a retryable answer's Retry-After (or backoff), as a monotonic time


class DirectOTLPSpanProcessor(SpanProcessor, DropCounter):
    """Span processor for our OTLP/HTTP exporter: encode on end, send full batches without waiting."""

    def __init__(
        self,
        exporter: OTLPHttpSpanExporter,
        max_queue_size: int = 2048,
        schedule_delay_millis: float = 5000,
        max_export_batch_size: int = 512,
        export_timeout_millis: float = 30000,
    ) -> None:
        DropCounter.__init__(self, max(max_queue_size, 1))
        self._exporter = exporter
        self._encoder = SpanEncoder()
        self._batch_size = max(1, min(max_export_batch_size, self.capacity))
        self._delay_s = max(0.0, schedule_delay_millis / 1000.0)
        self._direct_allowed = DirectConnection.usable_for(exporter)
        self._stopped = False
        self._reset()
        self._start_worker()  # it connects now, before the program's first batch
        if hasattr(os, "register_at_fork"):
            weak = weakref.WeakMethod(self._reset)
            os.register_at_fork(after_in_child=lambda: _call_if_alive(weak))

    def _reset(self) -> None:
        """Fresh state (also in a forked child: the parent's queued spans are the parent's to send)."""
        self._lock = threading.Lock()  # guards the queue; never held during I/O
        self._io_lock = threading.Lock()  # held by whoever sends
        self._current: List[Tuple[Tuple[Any, Any], bytes]] = []
        self._current_since = 0.0
        self._batches: Deque[Batch] = collections.deque()
        self._queued = 0
        self._wake = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._direct: Optional[DirectConnection] = None
        if self._direct_allowed:
            exporter = self._exporter
            previous = self.__dict__.get("_direct_peer")
            direct = self._direct = DirectConnection(exporter._host, exporter._port, exporter._path, exporter._headers)
            direct.peer = previous
            if direct.peer is None and direct.resolves_at_once():
                try:
                    direct.resolve()
                except OSError:
                    pass  # the background thread tries again
            self._direct_peer = direct.peer

    # -- SpanProcessor ----------------------------------------------------------------
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: Any) -> None:
        try:
            if not span.context.trace_flags.sampled or self._stopped:
                return
            entry = self._encoder.span_entry(span)
            full = None
            with self._lock:
                full_queue = self._queued >= self.capacity
                if not full_queue:
                    current = self._current
                    if not current:
                        self._current_since = time.monotonic()
                    current.append(entry)
                    self._queued += 1
                    size = len(current)
                    if size >= self._batch_size:
                        full, self._current = current, []
            if full_queue:
                self.count_drop()  # logs: never while holding the lock (a log handler may make spans)
                return
            if self._worker is None:
                self._start_worker()
            if self.dropped_in_burst:
                self.check_burst_over()
            if full is not None:
                self._seal(full)
                self._pump()
            elif size % _PUMP_EVERY == 0 and self._batches:
                self._pump()  # a backlog: move it on between batches too
        except Exception:  # span.end() runs in the program's code: never raise there
            error_once("processor.on_end", "autotrace: internal error while queueing a span")

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        worker = self._worker
        if worker is not None and worker.is_alive() and worker is not threading.current_thread():
            worker.join()
        else:
            self._safe_drain(everything=True)
        if self._direct is not None:
            self._direct.close()
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._stopped:
            return False
        return self._safe_drain(everything=True)

    # -- the program's thread -----------------------------------------------------------
    def _seal(self, entries: List[Tuple[Tuple[Any, Any], bytes]]) -> None:
        body = self._encoder.request(entries)
        if self._exporter._gzip:
            body = gzip.compress(body, compresslevel=6)
        batch = Batch(body, len(entries))
        with self._lock:
            self._batches.append(batch)

    def _pump(self) -> None:
        """Hand batches to the collector without waiting; what cannot go now waits for the next try."""
        direct = self._direct
        if direct is None:
            self._wake.set()  # HTTPS: the background thread sends
            return
        if not self._io_lock.acquire(blocking=False):
            return  # the background thread is sending
        try:
            if not direct.connected and not self._reconnect(direct):
                return
            self._advance(direct)
        finally:
            self._io_lock.release()
        if len(self._batches) > _BACKLOG_FOR_THREAD:
            self._wake.set()  # the collector is slower than the program: let the thread wait for it

    def _reconnect(self, direct: DirectConnection) -> bool:
        try:
            if direct.connect_nowait():
                return True
        except OSError as exc:
            logger.debug("autotrace: direct export connection failed: %s", _describe(exc))
        self._wake.set()  # not resolved yet, or refused: the background thread sends, with retries
        return False

    @staticmethod
    def _connect_quietly(direct: DirectConnection) -> bool:
        try:
            return direct.connect_nowait()
        except OSError:
            return False

    def _advance(self, direct: DirectConnection) -> None:
        while True:
            if direct.inflight is not None:
                try:
                    result = direct.step()
                except Exception as exc:
                    self._give_back(direct, _reason(exc))
                    return
                if result is None:
                    return  # the answer is not there yet: read it at the next try
                if not self._settle(direct, result):
                    return
            with self._lock:
                if not self._batches or self._batches[0].retry:
                    return
                batch = self._batches.popleft()
            direct.start(batch)

    def _settle(self, direct: DirectConnection, result: Result) -> bool:
        """Account the answer to the request in flight; an error answer goes to the background thread."""
        batch, direct.inflight = direct.inflight, None
        if batch is None:
            return True
        status, reason, retry_after = result
        if 200 <= status < 300:
            self._done(batch.count, True, "")
            return True
        if status not in RETRYABLE_STATUS:
            self._done(batch.count, False, reason)  # the OTLP rules: not retried
            return True
        # Retried by the background thread, first after Retry-After (or a backoff), as the exporter would.
        self._exporter._warn(reason + ", retrying")
        delay = retry_after if retry_after is not None else 0.5 * random.uniform(0.5, 1.0)
        batch.not_before = time.monotonic() + delay
        self._requeue(batch)
        return False

    def _give_back(self, direct: DirectConnection, reason: str) -> None:
        batch = direct.take_back()
        logger.debug("autotrace: direct export interrupted (%s); the background thread takes over", reason)
        if batch is not None:
            self._requeue(batch)
        else:
            self._wake.set()

    def _requeue(self, batch: Batch) -> None:
        batch.retry = True
        with self._lock:
            self._batches.appendleft(batch)
        self._wake.set()

    def _done(self, count: int, ok: bool, reason: str) -> None:
        with self._lock:
            self._queued -= count
        if ok:
            self._exporter.stats.spans_sent += count
        else:
            self._exporter._failed(count, reason)

    # -- the background thread ---------------------------------------------------------------
    def _start_worker(self) -> None:
        with self._lock:
            if self._worker is not None:
                return
            worker = self._worker = threading.Thread(target=self._run, name="autotrace-export", daemon=True)
        worker.start()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._next_wait())
            self._wake.clear()
            self._safe_drain(everything=self._stopped)
        self._safe_drain(everything=True)

    def _next_wait(self) -> float:
        oldest = self._current_since if self._current else None
        if self._batches:
            sealed = self._batches[0].sealed_at
            oldest = sealed if oldest is None else min(oldest, sealed)
        if oldest is None:
            return self._delay_s if self._delay_s > 0 else 1.0
        return max(0.01, oldest + self._delay_s - time.monotonic())

    def _safe_drain(self, everything: bool) -> bool:
        # The export's own HTTP calls must never become spans (an http.client plugin could trace them).
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            return self._drain(everything)
        except Exception:
            error_once("export.drain", "autotrace: internal error while exporting spans; export continues")
            return False
        finally:
            detach(token)

    def _drain(self, everything: bool) -> bool:
        """Connect the direct way, and send what the program's thread will not: True when nothing is left.

        That is: everything (flush, exit), batches whose direct attempt failed
        (sent with the exporter's retries), and batches older than the
        schedule delay (a quiet program, or no connection). A busy program's
        fresh batches are left to it: this thread, short of the GIL while the
        program runs, would only slow both down.
        """
        direct = self._direct
        if direct is not None and direct.peer is None and not self._stopped:
            try:
                direct.resolve()
                self._direct_peer = direct.peer
            except OSError as exc:
                logger.debug("autotrace: cannot resolve the collector's address: %s", _describe(exc))
        if not everything and not self._work_due():
            return not self._current and not self._batches
        with self._io_lock:
            now = time.monotonic()
            with self._lock:
                entries: List[Tuple[Tuple[Any, Any], bytes]] = []
                if self._current and (everything or now - self._current_since >= self._delay_s):
                    entries, self._current = self._current, []
            if entries:
                self._seal(entries)
            inflight = direct.inflight if direct is not None else None
            if inflight is not None and (everything or now - inflight.sealed_at >= self._delay_s):
                self._wait_for_answer(direct)
            while True:
                with self._lock:
                    if not self._batches:
                        break
                    batch = self._batches[0]
                    if not (everything or batch.retry or now - batch.sealed_at >= self._delay_s):
                        break
                    self._batches.popleft()
                self._send_waiting(direct, batch)
            return not self._current and not self._batches

    def _work_due(self) -> bool:
        """Anything the program's thread will not send by itself (checked without the lock)."""
        now = time.monotonic()
        if self._current and now - self._current_since >= self._delay_s:
            return True
        batches = self._batches
        if batches and (batches[0].retry or now - batches[0].sealed_at >= self._delay_s):
            return True
        direct = self._direct
        if direct is None:
            return bool(batches)
        inflight = direct.inflight
        return inflight is not None and now - inflight.sealed_at >= self._delay_s

    def _wait_for_answer(self, direct: DirectConnection) -> bool:
        try:
            return self._settle(direct, direct.wait(time.monotonic() + self._exporter._timeout_s))
        except Exception as exc:
            self._give_back(direct, _reason(exc))
            return False

    def _send_waiting(self, direct: Optional[DirectConnection], batch: Batch) -> None:
        """One batch: over the direct connection if it works, else with the exporter's retry logic."""
        if not batch.retry and direct is not None and (direct.connected or self._connect_quietly(direct)):
            direct.start(batch)
            if self._wait_for_answer(direct):
                return
            with self._lock:  # requeued by the failed attempt: take it back for the retry below
                if self._batches and self._batches[0] is batch:
                    self._batches.popleft()
        exporter = self._exporter
        pause = batch.not_before - time.monotonic()
        if pause > 0:
            exporter._shutdown.wait(pause)  # cut short at exit: one last attempt at once
        with exporter._lock:
            ok, reason = exporter._send_with_retries(batch.body)
        self._done(batch.count, ok, reason)


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _Unusable) else _describe(exc)


def _call_if_alive(weak_method: Any) -> None:
    method = weak_method()
    if method is not None:
        method()
