"""Counting the spans a full queue drops, and telling the user without flooding the log.

The SDK logs one terse line per dropped span; here the user gets a warning
when a burst starts dropping (at most once a minute), one when it is over with
the count, and the total at exit (:func:`autotrace.tracing.shutdown`).
"""

from __future__ import annotations

import time

from autotrace._log import logger, warn_every


class DropCounter:
    """Mixin for span processors with a bounded queue of ``capacity`` spans."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.dropped = 0
        self.dropped_in_burst = 0
        self._last_drop = 0.0

    def count_drop(self) -> None:
        self.dropped += 1
        self.dropped_in_burst += 1
        self._last_drop = time.monotonic()
        warn_every(
            "queue-full",
            60.0,
            "autotrace: spans are produced faster than they can be exported; the queue is full "
            "(OTEL_BSP_MAX_QUEUE_SIZE=%d) and new spans are dropped",
            self.capacity,
        )

    def check_burst_over(self) -> None:
        """Called when a span was queued again after drops: report the burst once it is a second old."""
        if self.dropped_in_burst and time.monotonic() - self._last_drop > 1.0:
            count, self.dropped_in_burst = self.dropped_in_burst, 0
            logger.warning("autotrace: the span queue has room again; %d spans were dropped during the burst", count)
