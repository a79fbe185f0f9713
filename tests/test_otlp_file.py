"""``OTEL_TRACES_EXPORTER=otlp_file``: OTLP JSON lines, safe for several processes appending to one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from autotrace.exporters.otlp_file import DEFAULT_PATH, OTLPFileSpanExporter
from autotrace.render import from_readable, spans_from_request
from tests.test_tree import RESOURCE, _tree_entry_point_env, make, sequential


def read_lines(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_one_line_per_batch_in_the_otlp_json_encoding(tmp_path):
    path = tmp_path / "t.jsonl"
    exporter = OTLPFileSpanExporter(str(path))
    error = make("charge", 9, 1, 1, 8, SpanKind.CLIENT, {"retries": 2, "ratio": 0.5, "ok": False, "tags": ("a", "b")},
                 events=[("exception", 4, {"exception.type": "ValueError", "exception.message": "no"})],
                 status=Status(StatusCode.ERROR, "declined"))
    assert exporter.export(sequential()).name == "SUCCESS"
    assert exporter.export([error]).name == "SUCCESS"
    raw = path.read_text(encoding="utf-8")
    assert raw.count("\n") == 2 and raw.endswith("\n")
    first, second = read_lines(path)
    resource = first["resourceSpans"][0]["resource"]["attributes"]
    assert {"key": "service.name", "value": {"stringValue": "shop"}} in resource
    spans = first["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert len(spans) == 4
    root = spans[0]
    # OTLP JSON: hex ids (not protobuf's base64), integer enums, lowerCamelCase, 64-bit ints as strings.
    assert root["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert root["spanId"] == "0000000000000001"
    assert "parentSpanId" not in root
    assert spans[1]["parentSpanId"] == "0000000000000001"
    assert root["kind"] == 2 and spans[1]["kind"] == 3
    assert root["startTimeUnixNano"] == "1700000000000000000"
    assert {"key": "http.response.status_code", "value": {"intValue": "200"}} in root["attributes"]
    charge = second["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert charge["status"] == {"code": 2, "message": "declined"}
    assert charge["events"][0]["name"] == "exception"
    # Decoding gives back what the tree renderer draws from the SDK span.
    decoded = spans_from_request(second)[0]
    expected = from_readable(error)
    for field in expected.__slots__:
        assert getattr(decoded, field) == getattr(expected, field), field


def test_settings_path_from_env_and_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOTRACE_TRACE_FILE", raising=False)
    assert OTLPFileSpanExporter().path == str(tmp_path / DEFAULT_PATH)
    monkeypatch.setenv("AUTOTRACE_TRACE_FILE", str(tmp_path / "sub.jsonl"))
    exporter = OTLPFileSpanExporter()
    exporter.export(sequential())
    assert len(read_lines(tmp_path / "sub.jsonl")) == 1


def test_a_file_that_cannot_be_written_fails_the_batch_quietly(tmp_path):
    exporter = OTLPFileSpanExporter(str(tmp_path / "no-such-dir" / "t.jsonl"))
    assert exporter.export(sequential()).name == "FAILURE"
    exporter.shutdown()
    assert exporter.export(sequential()).name == "FAILURE"


def test_spans_from_the_sdk_batch_processor(tmp_path):
    path = tmp_path / "t.jsonl"
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(BatchSpanProcessor(OTLPFileSpanExporter(str(path)), max_export_batch_size=7))
    tracer = provider.get_tracer("test")
    for number in range(20):
        with tracer.start_as_current_span(f"op {number}"):
            with tracer.start_as_current_span("inner"):
                pass
    provider.shutdown()
    lines = read_lines(path)
    names = [s["name"] for line in lines for rs in line["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    assert len(names) == 40 and names.count("inner") == 20
    assert len(lines) >= 6  # batches of at most 7


WRITER = textwrap.dedent("""\
    import random, sys
    sys.path.insert(0, sys.argv[4])
    from opentelemetry.sdk.resources import Resource
    from tests.test_tree import make
    from autotrace.exporters.otlp_file import OTLPFileSpanExporter

    path, process, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource = Resource({"service.name": f"writer-{process}"})
    exporter = OTLPFileSpanExporter(path)
    rng = random.Random(process)
    spans = []
    for number in range(count):
        # Some spans carry a big attribute, so that many lines are far larger than PIPE_BUF.
        attrs = {"n": number, "blob": "x" * rng.choice((0, 10, 3000))}
        spans.append(make(f"op {number}", process * 100000 + number + 1, None, 0, 1, attrs=attrs,
                          trace_id=process + 1, resource=resource))
    start = 0
    while start < count:
        size = rng.randint(1, 12)
        assert exporter.export(spans[start:start + size]).name == "SUCCESS"
        start += size
    """)


def test_several_processes_appending_to_one_file_lose_and_mix_nothing(tmp_path):
    path = tmp_path / "shared.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes = [
        subprocess.Popen([sys.executable, str(script), str(path), str(process), "500", root])
        for process in range(4)
    ]
    assert [process.wait(timeout=60) for process in processes] == [0, 0, 0, 0]
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert max(len(line) for line in lines) > 4 * 4096  # well above PIPE_BUF
    seen = {}
    for line in lines:
        request = json.loads(line)  # every line is one whole JSON document
        for span in spans_from_request(request):
            seen.setdefault(span.service, []).append(span.span_id)
    assert sorted(seen) == ["writer-0", "writer-1", "writer-2", "writer-3"]
    for process in range(4):
        ids = seen[f"writer-{process}"]
        assert sorted(ids) == [process * 100000 + number + 1 for number in range(500)]


def test_autotrace_run_with_the_otlp_file_exporter(tmp_path):
    path = tmp_path / "run.jsonl"
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""\
        from opentelemetry import trace
        tracer = trace.get_tracer("app")
        with tracer.start_as_current_span("main", kind=trace.SpanKind.SERVER):
            with tracer.start_as_current_span("step"):
                pass
        """))
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "AUTOTRACE_"))}
    env.update(_tree_entry_point_env(tmp_path))
    env.update({"PATH": bindir + os.pathsep + env.get("PATH", ""), "OTEL_SERVICE_NAME": "runner",
                "AUTOTRACE_TRACE_FILE": str(path)})
    result = subprocess.run(
        [os.path.join(bindir, "autotrace-run"), "--exporter", "otlp_file", sys.executable, str(script)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    spans = [span for line in read_lines(path) for span in spans_from_request(line)]
    assert sorted(span.name for span in spans) == ["main", "step"]
    assert {span.service for span in spans} == {"runner"}
