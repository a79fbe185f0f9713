"""``autotrace-view FILE...``: the traces in OTLP JSON line files, drawn as trees.

Reads files written by ``OTEL_TRACES_EXPORTER=otlp_file`` (or the OpenTelemetry
Collector's file exporter), merges the spans of every process found in them
by trace id, and prints each distributed trace as one tree, with the
``service.name`` of every span -- so a frontend, a payments service and a
worker run locally show up as one trace across services.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import IO, Dict, Iterable, List, Optional, Sequence

from autotrace.render import DEFAULT_WIDTH, MIN_WIDTH, Renderer, SpanView, spans_from_request


def read_spans(paths: Iterable[str], errors: Optional[IO[str]] = None) -> List[SpanView]:
    """Every span in the files (``-`` is standard input); bad lines are reported to ``errors`` and skipped."""
    errors = errors if errors is not None else sys.stderr
    spans: List[SpanView] = []
    for path in paths:
        try:
            handle = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="replace")
        except OSError as exc:
            print(f"autotrace-view: cannot read {path}: {exc.strerror or exc}", file=errors)
            continue
        try:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    request = json.loads(line)
                    spans.extend(spans_from_request(request))
                except (ValueError, TypeError, AttributeError) as exc:
                    print(f"autotrace-view: {path}:{number}: skipped a line that is not OTLP JSON ({exc})", file=errors)
        finally:
            if handle is not sys.stdin:
                handle.close()
    return spans


def group_traces(spans: Iterable[SpanView]) -> List[List[SpanView]]:
    """Spans grouped by trace id (duplicates by span id dropped), earliest trace first."""
    traces: Dict[int, Dict[int, SpanView]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, {}).setdefault(span.span_id, span)
    groups = [list(group.values()) for group in traces.values()]
    groups.sort(key=lambda group: min(span.start_ns for span in group))
    return groups


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autotrace-view",
        description="Print the traces in OTLP JSON line files (OTEL_TRACES_EXPORTER=otlp_file) as trees, "
        "merging the spans of all processes and services by trace id.",
        epilog="Example: AUTOTRACE_TRACE_FILE=/tmp/t.jsonl autotrace-run --exporter otlp_file python app.py; "
        "autotrace-view /tmp/t.jsonl",
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="trace files ('-' for standard input; "
                        "default: $AUTOTRACE_TRACE_FILE or ./autotrace-traces.jsonl)")
    parser.add_argument("--trace", metavar="ID", help="only the trace whose id starts with ID (hex)")
    parser.add_argument("--service", metavar="NAME", help="only traces with a span of this service.name")
    parser.add_argument("--errors", action="store_true", help="only traces with a span in error")
    parser.add_argument("--last", type=int, metavar="N", help="only the N most recent traces")
    parser.add_argument("--width", type=int, metavar="N", help="line width (default: COLUMNS, the terminal's, or 100)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colour (default: auto)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    files = list(args.files) or [os.environ.get("AUTOTRACE_TRACE_FILE") or "autotrace-traces.jsonl"]
    out = sys.stdout
    traces = group_traces(read_spans(files))
    if args.trace:
        wanted = args.trace.lower()
        traces = [group for group in traces if f"{group[0].trace_id:032x}".startswith(wanted)]
    if args.service:
        traces = [group for group in traces if any(span.service == args.service for span in group)]
    if args.errors:
        traces = [group for group in traces if any(span.status == "ERROR" for span in group)]
    if args.last:
        traces = traces[-args.last :]
    isatty = False
    try:
        isatty = out.isatty()
    except (AttributeError, ValueError):
        pass
    color = args.color == "always" or (args.color == "auto" and isatty and "NO_COLOR" not in os.environ)
    width = args.width or _env_width() or (_terminal_width(out) if isatty else None) or DEFAULT_WIDTH
    encoding = getattr(out, "encoding", None) or "utf-8"
    try:
        "├─│█…✗•µ▏".encode(encoding)
        unicode = True
    except (UnicodeEncodeError, LookupError):
        unicode = False
    renderer = Renderer(width=max(MIN_WIDTH, width), color=color, unicode=unicode, show_service=True)
    if not traces:
        print("autotrace-view: no spans found in " + ", ".join(files), file=sys.stderr)
        return 1
    try:
        out.write("\n".join(renderer.render(group) for group in traces))
        out.flush()
    except BrokenPipeError:  # autotrace-view ... | head
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
    return 0


def _env_width() -> Optional[int]:
    try:
        value = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def _terminal_width(stream: IO[str]) -> Optional[int]:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
