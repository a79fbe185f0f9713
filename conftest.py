"""Fixtures shared by tests/ and integration/.

In-process tests use one global SDK TracerProvider (set once, as in a real
process) whose spans land in memory; each test sees only its own spans.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Type

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from autotrace import config, http
from autotrace._log import reset_reports

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
trace.set_tracer_provider(_PROVIDER)


class Spans:
    """The spans finished during the current test."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter

    def get(self) -> List[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> List[ReadableSpan]:
        return [s for s in self.get() if s.name == name]

    def one(self, name: str = None) -> ReadableSpan:  # type: ignore[assignment]
        found = self.get() if name is None else self.named(name)
        assert len(found) == 1, f"expected one span{' named ' + name if name else ''}, got {[s.name for s in self.get()]}"
        return found[0]

    def clear(self) -> None:
        self.exporter.clear()


@pytest.fixture
def spans() -> Iterator[Spans]:
    _EXPORTER.clear()
    yield Spans(_EXPORTER)
    _EXPORTER.clear()


@pytest.fixture(autouse=True)
def _fresh_configuration() -> Iterator[None]:
    """Env-derived settings are cached per process; tests change the env."""
    config.reset_settings()
    http.reset_caches()
    reset_reports()
    yield
    config.reset_settings()
    http.reset_caches()


@pytest.fixture
def instrument() -> Iterator[Callable[[Type[Any]], Any]]:
    """``instrument(FlaskInstrumentor)`` patches now; everything is unpatched after the test."""
    active: List[Any] = []

    def patch(cls: Type[Any]) -> Any:
        instrumentor = cls().instrument()
        active.append(instrumentor)
        return instrumentor

    yield patch
    for instrumentor in reversed(active):
        instrumentor.unpatch()
