"""autotrace.instrumentation.inject writes exactly what the configured propagators would."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from requests.structures import CaseInsensitiveDict

from autotrace.instrumentation import inject


@pytest.fixture
def textmap() -> Iterator[Any]:
    previous = propagate.get_global_textmap()

    def install(*propagators: Any) -> None:
        propagate.set_global_textmap(CompositePropagator(list(propagators)))

    yield install
    propagate.set_global_textmap(previous)


def contexts() -> List[Context]:
    span_contexts = [
        SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0x00F067AA0BA902B7, False, TraceFlags(TraceFlags.SAMPLED)),
        SpanContext(1, 2, True, TraceFlags(TraceFlags.DEFAULT)),
        SpanContext(3, 4, False, TraceFlags(TraceFlags.SAMPLED), TraceState([("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")])),
        trace.INVALID_SPAN_CONTEXT,
        SpanContext(0, 5, False),  # invalid, yet not *the* invalid context
    ]
    out: List[Context] = [Context()]
    for span_context in span_contexts:
        ctx = trace.set_span_in_context(NonRecordingSpan(span_context))
        out.append(ctx)
        out.append(baggage.set_baggage("user id", "a b,c", context=baggage.set_baggage("k", "v", context=ctx)))
    return out


def written(carrier_type: Any, ctx: Context, ours: bool) -> Dict[str, str]:
    carrier = carrier_type({"User-Agent": "x"})
    if ours:
        inject(carrier, ctx)
    else:
        propagate.inject(carrier, context=ctx)
    return dict(carrier.items())


@pytest.mark.parametrize(
    "propagators",
    [
        [TraceContextTextMapPropagator()],
        [TraceContextTextMapPropagator(), W3CBaggagePropagator()],
        [W3CBaggagePropagator()],  # not the fast case: the API's path
        [TraceContextTextMapPropagator(), W3CBaggagePropagator(), B3MultiFormat()],
        [],
    ],
    ids=["tracecontext", "tracecontext+baggage", "baggage", "with-b3", "none"],
)
def test_same_headers_as_the_api(textmap: Any, propagators: List[Any]) -> None:
    textmap(*propagators)
    for carrier_type in (dict, CaseInsensitiveDict):
        for ctx in contexts():
            assert written(carrier_type, ctx, ours=True) == written(carrier_type, ctx, ours=False), ctx


def test_a_propagator_the_program_installs_later_is_used(textmap: Any) -> None:
    textmap(TraceContextTextMapPropagator())
    ctx = contexts()[1]
    assert "traceparent" in written(dict, ctx, ours=True)
    propagate.set_global_textmap(B3MultiFormat())
    headers = {k.lower(): v for k, v in written(dict, ctx, ours=True).items()}
    assert "traceparent" not in headers and headers["x-b3-traceid"] == "0af7651916cd43dd8448eb211c80319c"
