"""The floor: what one hand-made SDK span costs, with nothing but the SDK around it.

Run in the autotrace venv (it has the SDK and upstream's OTLP encoder):

    bench/.venvs/autotrace/bin/python bench/floor.py [--spans N] [--repeats R]

Each span is what a Redis GET instrumentation would make: a CLIENT span named
"GET" with six attributes (the dict built once, as the instrumentors are asked
to), started and ended on the caller's thread. It goes through the same
BatchSpanProcessor (queue 20000, batch 512) and the same OTLP encoding an
exporter does per batch (``encode_spans(batch).SerializeToString()``); the
bytes are discarded instead of sent. The time counted is the caller's loop plus
the flush of the last batch, so the encoding of every span is included (the
export thread competes for the GIL exactly as in a real program).

Prints one JSON line: {"floor_us_per_span": median, "min": .., "max": .., ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

ATTRIBUTES = {
    "db.system.name": "redis",
    "db.operation.name": "GET",
    "db.namespace": "4",
    "db.query.text": "GET ?",
    "server.address": "127.0.0.1",
    "server.port": 6379,
}


class EncodeOnlyExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0
        self.bytes = 0

    def export(self, spans):  # type: ignore[no-untyped-def]
        body = encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        self.bytes += len(body)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def measure(spans: int, repeats: int) -> dict:
    exporter = EncodeOnlyExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-floor"}), shutdown_on_exit=False)
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=20000, max_export_batch_size=512, schedule_delay_millis=5000)
    )
    tracer = provider.get_tracer("bench.floor")
    start_span = tracer.start_span
    client = SpanKind.CLIENT
    attributes = ATTRIBUTES

    def batch(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            span = start_span("GET", kind=client, attributes=attributes)
            span.end()
        provider.force_flush()
        return (time.perf_counter() - t0) * 1e6 / n

    batch(max(200, spans // 10))  # warm-up
    results = [batch(spans) for _ in range(repeats)]
    provider.shutdown()
    return {
        "floor_us_per_span": statistics.median(results),
        "min": min(results),
        "max": max(results),
        "spans": spans,
        "repeats": repeats,
        "bytes_per_span": round(exporter.bytes / max(1, exporter.spans), 1),
        "exported": exporter.spans,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.spans, args.repeats)))


if __name__ == "__main__":
    main()
