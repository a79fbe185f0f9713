"""``autotrace-view``: spans of several processes, read from OTLP JSON line files, drawn as one trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap


from autotrace.exporters.otlp_file import OTLPFileSpanExporter
from autotrace.view import main
from opentelemetry.trace import Status, StatusCode

from tests.test_tree import make, sequential

SERVICE = textwrap.dedent("""\
    import subprocess, sys
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from autotrace.exporters.otlp_file import OTLPFileSpanExporter

    service, path, traceparent, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    provider = TracerProvider(resource=Resource({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPFileSpanExporter(path)))
    tracer = provider.get_tracer(service)
    propagator = TraceContextTextMapPropagator()
    parent = propagator.extract({"traceparent": traceparent}) if traceparent != "-" else None
    entry = {
        "frontend": ("GET /checkout", SpanKind.SERVER, {"http.route": "/checkout", "http.response.status_code": 200}),
        "payments": ("POST /charge", SpanKind.SERVER, {"http.route": "/charge", "http.response.status_code": 202}),
        "worker": ("notify process", SpanKind.CONSUMER, {"messaging.destination.name": "notify"}),
    }[service]
    call = {"frontend": ("POST", SpanKind.CLIENT), "payments": ("notify publish", SpanKind.PRODUCER)}.get(service)


    def downstream():
        carrier = {}
        propagator.inject(carrier)
        subprocess.run([sys.executable, __file__, rest[0], rest[1], carrier["traceparent"], *rest[2:]], check=True)


    with tracer.start_as_current_span(entry[0], context=parent, kind=entry[1], attributes=entry[2]):
        with tracer.start_as_current_span("load " + service):
            pass
        if call:
            with tracer.start_as_current_span(call[0], kind=call[1]):
                downstream()
        if service == "worker":
            try:
                with tracer.start_as_current_span("send email"):
                    raise ConnectionError("smtp down")
            except ConnectionError:
                pass
    provider.shutdown()
    """)


def run_three_services(tmp_path):
    """frontend -> payments (HTTP) -> worker (queue): three processes, three services, one trace, two files."""
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    web, queue = tmp_path / "web.jsonl", tmp_path / "worker.jsonl"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run(
        [sys.executable, str(script), "frontend", str(web), "-", "payments", str(web), "worker", str(queue)],
        check=True, env=env, timeout=60,
    )
    return web, queue


def strip_bars(text):
    """Lines without the duration and time-bar columns (their values depend on real timing)."""
    span_line = re.compile(r"^(.*?)\s+\S+ │[^│]*│$")  # "name kind · service   12.3ms │ ███ │"
    return [span_line.sub(r"\1", line).rstrip() for line in text.splitlines()]


def test_spans_of_three_processes_merge_into_one_trace_across_services(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    web, queue = run_three_services(tmp_path)
    assert main([str(web), str(queue)]) == 0
    out = capsys.readouterr().out
    assert out.count("trace ") == 1, out
    lines = strip_bars(out)
    assert lines[0].startswith("trace ") and lines[0].endswith("· 9 spans · " + lines[0].split(" · ")[2]
                                                               + " · 1 error · frontend, payments, worker")
    assert lines[1:] == [
        "GET /checkout server · frontend",
        "│  http.route=/checkout  http.response.status_code=200",
        "├─ load frontend internal · frontend",
        "└─ POST client · frontend",
        "   └─ POST /charge server · payments",
        "      │  http.route=/charge  http.response.status_code=202",
        "      ├─ load payments internal · payments",
        "      └─ notify publish producer · payments",
        "         └─ notify process consumer · worker",
        "            │  messaging.destination.name=notify",
        "            ├─ load worker internal · worker",
        "            └─ ✗ send email internal · worker",
        "                  ✗ ConnectionError: smtp down  (+" + lines[-1].split("(+")[1],
    ]
    assert all(len(line) <= 100 for line in out.splitlines())
    assert "\x1b[" not in out


def test_each_file_alone_shows_its_part(tmp_path, capsys):
    web, queue = run_three_services(tmp_path)
    assert main([str(queue)]) == 0
    lines = strip_bars(capsys.readouterr().out)
    assert lines[1] == "notify process consumer · worker"  # its parent lives in the other file


def write(path, *batches):
    exporter = OTLPFileSpanExporter(str(path))
    for batch in batches:
        exporter.export(batch)


def test_filters_and_bad_lines(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write(path, sequential(), [make("other", 5, None, 100, 101, trace_id=7)])
    with open(path, "a") as handle:
        handle.write("not json\n\n")
    # A later batch of the same trace (another process, say): merged into it.
    write(path, [make("retry later", 20, 1, 41, 45, status=Status(StatusCode.ERROR, "gave up"))])
    write(path, sequential()[:1])  # the same span again (e.g. a retried export): drawn once
    assert main([str(path), "--width", "80"]) == 0
    captured = capsys.readouterr()
    assert f"{path}:3: skipped a line that is not OTLP JSON" in captured.err
    assert captured.out.count("trace ") == 2
    assert "· 5 spans ·" in captured.out and "└─ ✗ retry later internal · shop" in captured.out
    assert main([str(path), "--trace", "0000000000000000000000000000000"]) == 0
    out = capsys.readouterr().out
    assert out.count("trace ") == 1 and "other internal" in out
    assert main([str(path), "--errors"]) == 0
    out = capsys.readouterr().out
    assert out.count("trace ") == 1 and "retry later" in out
    assert main([str(path), "--service", "nobody"]) == 1
    assert "no spans found" in capsys.readouterr().err


def test_missing_file_and_default_path(tmp_path, capsys, monkeypatch):
    assert main([str(tmp_path / "nope.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOTRACE_TRACE_FILE", raising=False)
    write(tmp_path / "autotrace-traces.jsonl", sequential())
    assert main([]) == 0
    assert "GET /checkout server · shop" in capsys.readouterr().out


def test_command_line_reads_stdin_and_colours_on_request(tmp_path):
    path = tmp_path / "t.jsonl"
    write(path, sequential())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("NO_COLOR", None)
    command = [sys.executable, "-m", "autotrace.view", "-", "--color", "always"]
    result = subprocess.run(command, input=path.read_text(), capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "\x1b[1mGET /checkout\x1b[0m" in result.stdout
    result = subprocess.run(command[:-2], input=path.read_text(), capture_output=True, text=True, env=env, timeout=60)
    assert "GET /checkout server · shop" in result.stdout and "\x1b[" not in result.stdout
