"""``OTEL_TRACES_EXPORTER=tree``: each trace printed as a tree with a time bar per span.

The exporter sits behind a ``BatchSpanProcessor``, so spans arrive in batches
and children end before their parents. Spans are buffered by trace id; at the
end of each batch every trace whose *local root* has arrived -- a span whose
parent is absent, or remote and not among the buffered spans -- is printed
with all its buffered spans. Because a whole batch is taken in before anything
is printed, a request a program makes to itself (client span, then the server
span with a remote parent, then the outer root) comes out as one tree when its
spans end close together. Spans still buffered at shutdown (their root never
ended in this process) are printed then, marked as incomplete.

Settings (read once, when the exporter is built):

``AUTOTRACE_TREE_OUTPUT``   ``stderr`` (default), ``stdout``, or a file path (appended to)
``AUTOTRACE_TREE_COLOR``    ``auto`` (default: colour when the output is a terminal and
                            ``NO_COLOR`` is unset), ``always``, ``never``
``AUTOTRACE_TREE_WIDTH``    line width; default ``COLUMNS``, else the terminal's width, else 100
``AUTOTRACE_TREE_MAX_SPANS`` spans drawn per trace before "… N more spans" (default 500)
"""

from __future__ import annotations

import os
import sys
import threading
from typing import IO, Any, Dict, List, Optional, Sequence

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from autotrace._log import logger, warn_every
from autotrace.config import EnvReader
from autotrace.render import DEFAULT_MAX_SPANS, DEFAULT_WIDTH, MIN_WIDTH, Renderer, SpanView, from_readable

#: Buffered spans beyond which the oldest incomplete traces are printed early (bounded memory).
MAX_BUFFERED_SPANS = 20_000


def _stream_width(stream: Any) -> Optional[int]:
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        pass
    return None


def _supports_unicode(stream: Any) -> bool:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        "├─│█…✗•µ▏".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class TreeSpanExporter(SpanExporter):
    """Prints finished traces as trees (see the module docstring for the settings)."""

    def __init__(
        self,
        output: Optional[str] = None,
        color: Optional[str] = None,
        width: Optional[int] = None,
        max_spans: Optional[int] = None,
        stream: Optional[IO[str]] = None,
    ) -> None:
        env = EnvReader()
        self._output = output or env.string("AUTOTRACE_TREE_OUTPUT", "stderr") or "stderr"
        self._color_mode = color or env.choice("AUTOTRACE_TREE_COLOR", ("auto", "always", "never"), "auto")
        self._no_color = env.raw("NO_COLOR") is not None
        self._width = width or env.number("AUTOTRACE_TREE_WIDTH", 0, int, minimum=MIN_WIDTH) or None
        if self._width is None:
            self._width = env.number("COLUMNS", 0, int, minimum=1) or None
        self._max_spans = max_spans or env.number("AUTOTRACE_TREE_MAX_SPANS", DEFAULT_MAX_SPANS, int, minimum=1)
        self._stream = stream
        self._file: Optional[IO[str]] = None
        self._buffer: Dict[int, List[SpanView]] = {}
        self._buffered = 0
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def _forget_parent_spans(self) -> None:
        """After a fork, the buffer holds the parent's spans: the parent prints them, not us."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._buffer = {}
            self._buffered = 0
            self._lock = threading.Lock()
            self._file = None

    # -- output ------------------------------------------------------------

    def _target(self) -> IO[str]:
        if self._stream is not None:
            return self._stream
        choice = self._output.lower()
        if choice == "stderr":
            return sys.stderr
        if choice == "stdout":
            return sys.stdout
        if self._file is None:
            self._file = open(self._output, "a", encoding="utf-8")
        return self._file

    def _renderer(self, stream: IO[str]) -> Renderer:
        isatty = False
        try:
            isatty = bool(stream.isatty())
        except (AttributeError, ValueError):
            pass
        if self._color_mode == "always":
            color = True
        elif self._color_mode == "never":
            color = False
        else:
            color = isatty and not self._no_color
        width = self._width or _stream_width(stream) or DEFAULT_WIDTH
        return Renderer(
            width=width, color=color, unicode=_supports_unicode(stream), show_service=False, max_spans=self._max_spans
        )

    def _write(self, groups: List[List[SpanView]], note: str = "") -> None:
        if not groups:
            return
        try:
            stream = self._target()
            renderer = self._renderer(stream)
            text = "".join(renderer.render(group, note) + "\n" for group in groups)
            stream.write(text)
            stream.flush()
        except Exception as exc:  # a closed or broken stream must not break export
            warn_every("tree-output", 60.0, "autotrace: cannot print traces to %s: %s", self._output, exc)

    # -- SpanExporter ------------------------------------------------------

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        self._forget_parent_spans()
        ready: List[List[SpanView]] = []
        early: List[List[SpanView]] = []
        with self._lock:
            touched: Dict[int, None] = {}
            for span in spans:
                try:
                    view = from_readable(span)
                except Exception:
                    logger.debug("autotrace: tree exporter skipped a span", exc_info=True)
                    continue
                group = self._buffer.get(view.trace_id)
                if group is None:
                    group = self._buffer[view.trace_id] = []
                touched[view.trace_id] = None
                group.append(view)
                self._buffered += 1
            for trace_id in touched:
                group = self._buffer[trace_id]
                if self._has_local_root(group):
                    ready.append(self._buffer.pop(trace_id))
                    self._buffered -= len(group)
            while self._buffered > MAX_BUFFERED_SPANS and self._buffer:
                oldest = next(iter(self._buffer))
                group = self._buffer.pop(oldest)
                self._buffered -= len(group)
                early.append(group)
        ready.sort(key=lambda group: min(span.start_ns for span in group))
        self._write(ready)
        self._write(early, "incomplete: too many spans buffered")
        return SpanExportResult.SUCCESS

    @staticmethod
    def _has_local_root(group: List[SpanView]) -> bool:
        """True when some span's parent is absent, remote, or not among the buffered spans of its trace."""
        ids = {span.span_id for span in group}
        for span in group:
            if span.parent_id is None:
                return True
            if span.parent_remote and span.parent_id not in ids:
                return True
        return False

    def flush_pending(self) -> None:
        """Print every buffered span now (their root has not ended in this process)."""
        with self._lock:
            groups = list(self._buffer.values())
            self._buffer.clear()
            self._buffered = 0
        groups.sort(key=lambda group: min(span.start_ns for span in group))
        self._write(groups, "incomplete: root span not seen")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._forget_parent_spans()
        self.flush_pending()
        self._closed = True
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            stream = self._file or (self._stream if self._stream is not None else None)
            if stream is not None:
                stream.flush()
        except Exception:
            pass
        return True
