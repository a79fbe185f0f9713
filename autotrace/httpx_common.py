"""What httpx and its fork httpx2 need beyond the kit: response bodies that end their span.

An httpx response's body is ``response.stream``: :func:`body_types` gives, for
one library module (``httpx``, ``httpx2``), the two wrappers the instrumentor
(:mod:`autotrace.instrumentors.httpx`, which httpx2's subclasses) puts in its
place. A wrapped body ends its :class:`~autotrace.kit.PendingSpan` once,
whichever comes first: read to the end, reading failed (the error recorded: a
``ReadTimeout``, a connection dropped mid-body), its iteration abandoned, the
body closed, or -- a streamed response dropped unread and unclosed -- the body
garbage-collected (``__del__``: a body that ended normally pays one call when
freed, where ``hold(..., collect=True)`` would cost every response a
``weakref.finalize`` registration).

Why not the kit's :class:`~autotrace.kit.TracedIterator` /
:class:`~autotrace.kit.TracedAsyncIterator`:

* httpx checks ``isinstance(response.stream, SyncByteStream)`` (or
  ``AsyncByteStream``) before reading or closing: the wrappers are subclasses
  of the module's own stream types;
* they iterate themselves (``__iter__`` returns ``self``), so the library's
  body generator would live as long as the response. httpx closes that
  generator when the loop reading it is dropped (httpcore then returns the
  connection to the pool; httpx2's ``aiter_raw`` ``aclose``\\ s it
  explicitly, being an async generator). Here ``__iter__`` / ``__aiter__`` are
  generators wrapping the library's: whoever closed the library's generator
  closes ours, which closes the library's -- at the same moment as without us.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, AsyncIterator, Iterator, Tuple

__all__ = ["body_types"]


def body_types(module: Any) -> Tuple[type, type]:
    """``(SyncBody, AsyncBody)`` for ``module`` (``httpx`` or ``httpx2``): ``SyncBody(stream, pending)``.

    ``stream``: the response's body (the module's ``SyncByteStream`` /
    ``AsyncByteStream``), whose other attributes (httpx2's ``elapsed``) the
    wrapper passes through; ``pending``: the span's :class:`~autotrace.kit.PendingSpan`.
    """

    class SyncBody(_Body, module.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            pending = self._pending
            try:
                yield from self._stream
            except GeneratorExit:  # the reading loop was dropped or closed: not an error
                pending.end()
                raise
            except BaseException as exc:
                pending.end(exc)
                raise
            pending.end()

        def close(self) -> None:
            try:
                self._stream.close()
            finally:
                self._pending.end()

    class AsyncBody(_Body, module.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            pending = self._pending
            stream = self._stream.__aiter__()
            try:
                async for chunk in stream:
                    yield chunk
            except GeneratorExit:
                pending.end()
                raise
            except BaseException as exc:
                pending.end(exc)
                raise
            finally:
                if isinstance(stream, AsyncGenerator):  # as httpx2 closes the body generator it iterates
                    await stream.aclose()
            pending.end()

        async def aclose(self) -> None:
            try:
                await self._stream.aclose()
            finally:
                self._pending.end()

    for body in (SyncBody, AsyncBody):
        body.__qualname__ = f"{module.__name__}.{body.__name__}"
    return SyncBody, AsyncBody


class _Body:
    """What both wrappers share: the wrapped body, the pending span, pass-through attributes."""

    def __init__(self, stream: Any, pending: Any) -> None:
        self._stream = stream
        self._pending = pending

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never our own (missing if __init__ did not run)
            raise AttributeError(name)
        return getattr(self._stream, name)

    def __del__(self) -> None:
        pending = self.__dict__.get("_pending")
        if pending is not None:
            pending.end()
