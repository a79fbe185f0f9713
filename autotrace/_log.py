"""The agent's own logging.

Everything goes to the ``autotrace`` logger; we never configure the root logger
(that belongs to the host program). Without any handler configured, Python's
last-resort handler still shows WARNING and above on stderr, which is what a
user who has not set up logging needs to see.

Errors inside the agent are reported once per *site* so that a bug in a wrapper
on a hot path cannot flood the program's logs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Set

logger = logging.getLogger("autotrace")

_reported: Set[str] = set()
_last_report: Dict[str, float] = {}
_lock = threading.Lock()


def _first_time(site: str) -> bool:
    with _lock:
        if site in _reported:
            return False
        _reported.add(site)
        return True


def warn_once(site: str, message: str, *args: Any) -> None:
    """Log a warning the first time ``site`` is seen in this process."""
    if _first_time(site):
        logger.warning(message, *args)


def error_once(site: str, message: str, *args: Any, exc_info: bool = True) -> None:
    """Log an error (with traceback) the first time ``site`` fails in this process."""
    if _first_time(site):
        logger.error(message + " (further errors at this site are not logged)", *args, exc_info=exc_info)


INTERNAL_ERROR = "autotrace: internal error in %s; the program continues, this call may be untraced"


def internal_error(site: str) -> None:
    """Report a failure of the agent's own code at ``site`` (once, with its traceback)."""
    error_once(site, INTERNAL_ERROR, site)


def warn_every(site: str, interval_s: float, message: str, *args: Any) -> bool:
    """Log a warning at most once per ``interval_s`` for ``site``; True when logged."""
    now = time.monotonic()
    with _lock:
        last = _last_report.get(site)
        if last is not None and now - last < interval_s:
            return False
        _last_report[site] = now
    logger.warning(message, *args)
    return True


def reset_reports() -> None:
    """Forget which sites were reported (tests use this)."""
    with _lock:
        _reported.clear()
        _last_report.clear()
