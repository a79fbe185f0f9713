"""kvstore: a tiny in-memory key-value client -- the library the example plugin traces.

``Client`` and ``AsyncClient`` talk to a "server" (a dict per namespace shared
by every client of that namespace).
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict

__all__ = ["Client", "AsyncClient", "KeyNotFound"]

_SERVERS: Dict[str, Dict[str, Any]] = {}


class KeyNotFound(KeyError):
    """No value under that key (the message names the key)."""


def _get(data: Dict[str, Any], key: str) -> Any:
    try:
        return data[key]
    except KeyError:
        raise KeyNotFound(f"no value for key {key!r}") from None


class Client:
    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self._data = _SERVERS.setdefault(namespace, {})

    def get(self, key: str) -> Any:
        return _get(self._data, key)

    def set(self, key: str, value: Any) -> bool:
        self._data[key] = value
        return True


class AsyncClient:
    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self._data = _SERVERS.setdefault(namespace, {})

    async def get(self, key: str) -> Any:
        await asyncio.sleep(0)  # a round trip
        return _get(self._data, key)

    async def set(self, key: str, value: Any) -> bool:
        await asyncio.sleep(0)
        self._data[key] = value
        return True
