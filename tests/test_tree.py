"""The tree renderer (golden outputs) and the ``tree`` exporter (buffering, output, colour)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from autotrace.exporters.tree import TreeSpanExporter
from autotrace.render import Renderer, format_duration, from_readable

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
BASE = 1_700_000_000_000_000_000
MS = 1_000_000
RESOURCE = Resource({"service.name": "shop"})


def make(name, span_id, parent=None, start=0.0, end=0.0, kind=SpanKind.INTERNAL, attrs=None, events=(),
         status=None, remote_parent=False, trace_id=TRACE, resource=RESOURCE):
    """A finished ``ReadableSpan`` with fixed times (``start``/``end`` in ms after BASE)."""
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1))
    parent_context = (
        SpanContext(trace_id, parent, is_remote=remote_parent, trace_flags=TraceFlags(1)) if parent else None
    )
    return ReadableSpan(
        name=name,
        context=context,
        parent=parent_context,
        resource=resource,
        attributes=attrs or {},
        events=[Event(event, attributes=attributes, timestamp=BASE + int(at * MS)) for event, at, attributes in events],
        kind=kind,
        status=status or Status(StatusCode.UNSET),
        start_time=BASE + int(start * MS),
        end_time=BASE + int(end * MS),
    )


def render(spans, **options):
    return Renderer(**options).render([from_readable(span) for span in spans])


def sequential():
    return [
        make("GET /checkout", 1, None, 0, 40, SpanKind.SERVER, {"http.route": "/checkout", "http.response.status_code": 200}),
        make("SELECT shop.carts", 2, 1, 2, 10, SpanKind.CLIENT, {"db.operation.name": "SELECT", "db.collection.name": "carts"}),
        make("POST", 3, 1, 12, 30, SpanKind.CLIENT,
             {"url.full": "http://payments:8080/charge", "server.address": "payments", "http.response.status_code": 201}),
        make("render", 4, 1, 31, 38),
    ]


def error_spans():
    return [
        make("POST /pay", 1, None, 0, 10, SpanKind.SERVER, {"http.route": "/pay", "http.response.status_code": 500},
             status=Status(StatusCode.ERROR),
             events=[("exception", 9, {"exception.type": "ValueError", "exception.message": "card declined\nretry later",
                                       "exception.stacktrace": "Traceback ..."})]),
        make("charge", 2, 1, 1, 8, status=Status(StatusCode.ERROR, "gateway timeout"),
             events=[("retry", 4, {"attempt": 2, "delay.ms": 100})]),
    ]


# --------------------------------------------------------------------------
# Golden outputs


def test_sequential_children_line_up_one_after_the_other():
    # Arrival order must not matter: children end before their parent.
    assert render(list(reversed(sequential())), width=80) == textwrap.dedent("""\
        trace 4bf92f3577b34da6a3ce929d0e0e4736 · 4 spans · 40.0ms · shop
        GET /checkout server                               40.0ms │████████████████████│
        │  http.route=/checkout  http.response.status_code=200
        ├─ SELECT shop.carts client                        8.00ms │ ████               │
        │     db.operation.name=SELECT  db.collection.name=carts
        ├─ POST client                                     18.0ms │      █████████     │
        │     http.response.status_code=201  url.full=http://payments:8080/charge
        └─ render internal                                 7.00ms │               ███▌ │
        """)


def test_nested_spans_indent_and_shrink():
    spans = [
        make("job", 1, None, 0, 80, SpanKind.CONSUMER,
             {"celery.task.name": "shop.tasks.ship", "messaging.destination.name": "celery"}),
        make("step a", 2, 1, 5, 70),
        make("step b", 3, 2, 10, 60),
        make("GET", 4, 3, 20, 50, SpanKind.CLIENT, {"server.address": "carrier.example"}),
    ]
    assert render(spans, width=80) == textwrap.dedent("""\
        trace 4bf92f3577b34da6a3ce929d0e0e4736 · 4 spans · 80.0ms · shop
        job consumer                                       80.0ms │████████████████████│
        │  celery.task.name=shop.tasks.ship  messaging.destination.name=celery
        └─ step a internal                                 65.0ms │ ████████████████▎  │
           └─ step b internal                              50.0ms │  ████████████▌     │
              └─ GET client                                30.0ms │     ███████▌       │
                    server.address=carrier.example
        """)


def test_concurrent_spans_overlap_on_the_timeline():
    spans = [
        make("GET /report", 1, None, 0, 20, SpanKind.SERVER),
        make("fetch users", 2, 1, 1, 15),
        make("fetch orders", 3, 1, 2, 19),
        make("fetch stock", 4, 1, 3, 8),
    ]
    assert render(spans, width=60) == textwrap.dedent("""\
        trace 4bf92f3577b34da6a3ce929d0e0e4736 · 4 spans · 20.0ms
        GET /report server                  20.0ms │███████████████│
        ├─ fetch users internal             14.0ms │██████████▌    │
        ├─ fetch orders internal            17.0ms │ ████████████▊ │
        └─ fetch stock internal             5.00ms │  ███▊         │
        """)


def test_errors_and_events():
    assert render(error_spans(), width=80) == textwrap.dedent("""\
        trace 4bf92f3577b34da6a3ce929d0e0e4736 · 2 spans · 10.0ms · 2 errors · shop
        ✗ POST /pay server                                 10.0ms │████████████████████│
        │  http.route=/pay  http.response.status_code=500
        │  ✗ ValueError: card declined\\nretry later  (+9.00ms)
        └─ ✗ charge internal                               7.00ms │  ██████████████    │
              status=gateway timeout
              • retry  (+3.00ms)  attempt=2  delay.ms=100
        """)


def test_ascii_fallback():
    assert render(error_spans(), width=80, unicode=False) == textwrap.dedent("""\
        trace 4bf92f3577b34da6a3ce929d0e0e4736 - 2 spans - 10.0ms - 2 errors - shop
        x POST /pay server                                 10.0ms |####################|
        |  http.route=/pay  http.response.status_code=500
        |  x ValueError: card declined\\nretry later  (+9.00ms)
        `- x charge internal                               7.00ms |  ##############    |
              status=gateway timeout
              * retry  (+3.00ms)  attempt=2  delay.ms=100
        """)


def test_long_names_values_and_deep_trees_are_truncated_to_the_width():
    spans = [
        make("GET /" + "very-long-path-segment/" * 6, 1, None, 0, 0.004, SpanKind.SERVER, {"http.route": "/" + "x" * 90}),
        make("deep", 2, 1, 0.001, 0.002),
    ]
    parent = 2
    for number in range(3, 8):
        spans.append(make(f"level {number}", number, parent, 0.001, 0.002))
        parent = number
    text = render(spans, width=50)
    assert text == textwrap.dedent("""\
        trace 4bf92f3577b34da6a3ce929d0e0e4736 · 7 spans…
        GET /very-long-pat… server    4.0µs │████████████│
        │  http.route=/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…
        └─ deep internal              1.0µs │   ███      │
           └─ level 3 internal        1.0µs │   ███      │
              └─ level 4 internal     1.0µs │   ███      │
        …      └─ level 5 internal    1.0µs │   ███      │
        …      └─ level 6 internal    1.0µs │   ███      │
        …      └─ level 7 internal    1.0µs │   ███      │
        """)
    assert all(len(line) <= 50 for line in text.splitlines())


def test_wide_trace_stops_after_max_spans():
    text = render(sequential(), width=80, max_spans=2)
    assert text.splitlines()[-1] == "… 2 more spans not shown"
    assert "render" not in text


def test_colour_codes_only_when_asked():
    plain = render(sequential(), width=80)
    coloured = render(sequential(), width=80, color=True)
    assert "\x1b[" not in plain
    assert "\x1b[36m████████████████████\x1b[0m" in coloured  # server bar in cyan
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain


def test_orphans_without_their_parent_are_drawn_as_roots():
    spans = [make("child a", 2, 99, 0, 5), make("child b", 3, 99, 6, 10), make("grandchild", 4, 3, 7, 8)]
    lines = render(spans, width=80).splitlines()
    assert lines[1].startswith("child a internal")
    assert lines[2].startswith("child b internal")
    assert lines[3].startswith("└─ grandchild internal")


@pytest.mark.parametrize(
    "ns, text",
    [(850, "850ns"), (4_500, "4.5µs"), (12_000, "12µs"), (3_450_000, "3.45ms"), (12_340_000, "12.3ms"),
     (123_400_000, "123ms"), (1_250_000_000, "1.25s"), (123_000_000_000, "2m03s")],
)
def test_durations(ns, text):
    assert format_duration(ns) == text


# --------------------------------------------------------------------------
# The exporter


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_exporter_prints_a_trace_when_its_local_root_arrives_with_the_spans_buffered_before():
    out = io.StringIO()
    exporter = TreeSpanExporter(stream=out, width=80)
    spans = sequential()
    exporter.export(spans[1:3])  # children end first, in an earlier batch
    assert out.getvalue() == ""
    exporter.export([spans[3], spans[0]])
    assert out.getvalue() == render(sequential(), width=80) + "\n"
    exporter.shutdown()
    assert out.getvalue() == render(sequential(), width=80) + "\n"  # nothing left over


def test_exporter_never_colours_a_stream_that_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = io.StringIO()
    TreeSpanExporter(stream=out).export(sequential())
    assert "GET /checkout" in out.getvalue() and "\x1b[" not in out.getvalue()
    tty = TTY()
    TreeSpanExporter(stream=tty).export(sequential())
    assert "\x1b[" in tty.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    tty = TTY()
    TreeSpanExporter(stream=tty).export(sequential())
    assert "GET /checkout" in tty.getvalue() and "\x1b[" not in tty.getvalue()
    monkeypatch.setenv("AUTOTRACE_TREE_COLOR", "always")
    out = io.StringIO()
    TreeSpanExporter(stream=out).export(sequential())
    assert "\x1b[" in out.getvalue()


def test_exporter_uses_ascii_on_a_stream_that_cannot_encode_box_characters():
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    TreeSpanExporter(stream=out, width=80).export(error_spans())
    out.flush()
    assert raw.getvalue().decode("ascii") == render(error_spans(), width=80, unicode=False) + "\n"


def test_remote_parent_is_a_local_root_but_a_self_call_in_one_batch_is_one_tree():
    out = io.StringIO()
    exporter = TreeSpanExporter(stream=out, width=80)
    # A service handling a request from elsewhere: printed at once.
    exporter.export([make("POST /pay", 7, 0xAA, 0, 5, SpanKind.SERVER, remote_parent=True, trace_id=2)])
    assert "POST /pay server" in out.getvalue()
    out.truncate(0), out.seek(0)
    # The program calling itself: the inner server span's parent is remote, but it is in the batch.
    exporter.export([
        make("GET /stock", 3, 2, 2, 8, SpanKind.SERVER, remote_parent=True),
        make("GET", 2, 1, 1, 9, SpanKind.CLIENT),
        make("GET /orders", 1, None, 0, 10, SpanKind.SERVER),
    ])
    assert out.getvalue() == textwrap.dedent("""\
        trace 4bf92f3577b34da6a3ce929d0e0e4736 · 3 spans · 10.0ms · shop
        GET /orders server                                 10.0ms │████████████████████│
        └─ GET client                                      8.00ms │  ████████████████  │
           └─ GET /stock server                            6.00ms │    ████████████    │

        """)


def test_orphans_are_flushed_at_shutdown_marked_incomplete(tmp_path, monkeypatch):
    path = tmp_path / "trees.txt"
    monkeypatch.setenv("AUTOTRACE_TREE_OUTPUT", str(path))
    exporter = TreeSpanExporter()
    exporter.export([make("SELECT", 2, 1, 1, 2, SpanKind.CLIENT), make("worker step", 5, 4, 0, 3, trace_id=9)])
    assert not path.exists() or path.read_text() == ""
    exporter.shutdown()
    text = path.read_text()
    assert text.count("incomplete: root span not seen") == 2
    assert "SELECT client" in text and "worker step internal" in text
    assert "\x1b[" not in text
    assert exporter.export([make("late", 1)]).name == "FAILURE"


def test_output_stdout_and_width_from_columns(monkeypatch, capsys):
    monkeypatch.setenv("AUTOTRACE_TREE_OUTPUT", "stdout")
    monkeypatch.setenv("COLUMNS", "70")
    TreeSpanExporter().export(sequential())
    captured = capsys.readouterr()
    assert captured.err == ""
    assert max(len(line) for line in captured.out.splitlines()) == 70


def test_default_output_is_stderr(monkeypatch, capsys):
    monkeypatch.delenv("AUTOTRACE_TREE_OUTPUT", raising=False)
    TreeSpanExporter().export(sequential())
    captured = capsys.readouterr()
    assert captured.out == "" and "GET /checkout server" in captured.err


def test_a_broken_output_does_not_break_export(tmp_path):
    exporter = TreeSpanExporter(output=str(tmp_path / "missing-dir" / "trees.txt"))
    assert exporter.export(sequential()).name == "SUCCESS"


def test_with_the_sdk_batch_processor_and_threads():
    """Real spans through a BatchSpanProcessor: nesting and concurrency come out as one tree."""
    import threading

    from opentelemetry import context as otel_context

    out = io.StringIO()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(BatchSpanProcessor(TreeSpanExporter(stream=out, width=90), schedule_delay_millis=50))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("handle", kind=SpanKind.SERVER, attributes={"http.route": "/r"}):
        ctx = otel_context.get_current()

        def work(name):
            token = otel_context.attach(ctx)
            try:
                with tracer.start_as_current_span(name):
                    pass
            finally:
                otel_context.detach(token)

        threads = [threading.Thread(target=work, args=(f"worker {i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        try:
            with tracer.start_as_current_span("fails"):
                raise KeyError("nope")
        except KeyError:
            pass
    provider.shutdown()
    text = out.getvalue()
    assert text.count("trace ") == 1, text
    assert "handle server" in text.splitlines()[1]
    assert sum("worker" in line and line.startswith(("├─", "└─")) for line in text.splitlines()) == 3
    assert "✗ KeyError: 'nope'" in text


def _tree_entry_point_env(tmp_path: Path) -> dict:
    """Declare the exporter entry points in a throwaway dist-info when the install does not yet."""
    from autotrace.plugins import _entry_points

    env = {}
    if not any(ep.name == "tree" for ep in _entry_points("opentelemetry_traces_exporter")):
        info = tmp_path / "site" / "autotrace_tree_test-0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: autotrace-tree-test\nVersion: 0\n")
        (info / "entry_points.txt").write_text(
            "[opentelemetry_traces_exporter]\n"
            "tree = autotrace.exporters.tree:TreeSpanExporter\n"
            "otlp_file = autotrace.exporters.otlp_file:OTLPFileSpanExporter\n"
        )
        env["PYTHONPATH"] = str(tmp_path / "site")
    return env


def test_autotrace_run_with_the_tree_exporter(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""\
        from opentelemetry import trace
        tracer = trace.get_tracer("app")
        with tracer.start_as_current_span("main", kind=trace.SpanKind.SERVER):
            with tracer.start_as_current_span("step one"):
                pass
            with tracer.start_as_current_span("step two"):
                pass
        print("done")
        """))
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "AUTOTRACE_"))}
    env.update(_tree_entry_point_env(tmp_path))
    env.update({"PATH": bindir + os.pathsep + env.get("PATH", ""), "OTEL_SERVICE_NAME": "demo", "COLUMNS": "80"})
    result = subprocess.run(
        [os.path.join(bindir, "autotrace-run"), "--exporter", "tree", sys.executable, str(script)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    lines = result.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trace "))
    assert lines[header].endswith("· 3 spans · " + lines[header].split(" · ")[2] + " · demo")
    assert lines[header + 1].startswith("main server ")
    assert lines[header + 2].startswith("├─ step one internal ")
    assert lines[header + 3].startswith("└─ step two internal ")
    assert "\x1b[" not in result.stderr


def test_a_forked_child_does_not_print_the_parents_pending_spans(tmp_path):
    path = tmp_path / "trees.txt"
    exporter = TreeSpanExporter(output=str(path))
    exporter.export([make("pending child", 2, 1, 1, 2)])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            exporter.export([make("child's own", 5, None, 0, 1, trace_id=3)])
            exporter.shutdown()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    exporter.shutdown()
    text = path.read_text()
    assert text.count("pending child") == 1 and text.count("child's own") == 1
