"""pytest plugin (entry point ``pytest11``): the ``autotrace_spans`` fixture.

Importing this plugin imports only pytest: the OpenTelemetry SDK is imported,
and a span processor added to the global provider, only by a test that uses
the fixture -- and removed again when that test ends. When such a test fails,
the spans it captured are added to the failure report as trees.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

_CAPTURE = pytest.StashKey[Any]()


@pytest.fixture
def autotrace_spans(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Spans that end during this test: ``.spans``, ``.find()``, ``.one()``, ``.assert_child_of()``, ``.tree()``."""
    from autotrace.testing import SpanCapture

    capture = SpanCapture().start()
    request.node.stash[_CAPTURE] = capture
    try:
        yield capture
    finally:
        capture.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    capture = item.stash.get(_CAPTURE, None)
    if capture is None:
        return
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        try:
            text = capture.tree() or "(no spans were captured)\n"
        except Exception as exc:  # never hide the test's own failure
            text = f"(could not draw the captured spans: {exc!r})\n"
        report.sections.append(("Captured spans (autotrace)", text))
