"""Run a callback when a module is first imported (a post-import hook).

Why not ``wrapt.register_post_import_hook``: importing wrapt 2.x pulls in
asyncio and costs 15-35 ms, and this runs at the start of every traced
interpreter, where our budget is small. This finder is the same mechanism in
little: for a watched name it lets the other finders find the module, wraps
the loader's ``exec_module`` and, once the module has executed, puts the real
loader back on the module and runs the callbacks. Unwatched imports cost one
dict lookup.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from autotrace._log import logger

Callback = Callable[[Any], None]

_hooks: Dict[str, List[Callback]] = {}
_before: Dict[str, List[Callback]] = {}
_prefix_hooks: Dict[str, Callback] = {}
_lock = threading.RLock()
_searching: Set[Tuple[int, str]] = set()


def when_imported(module_name: str, callback: Callback) -> None:
    """Call ``callback(module)`` after ``module_name`` is imported (now, if it already is)."""
    with _lock:
        module = sys.modules.get(module_name)
        if module is None:
            _hooks.setdefault(module_name, []).append(callback)
            _install()
            return
    _run(module_name, module, [callback])


def around_import(module_name: str, before: Callback, after: Callback) -> None:
    """``before(module)`` just before ``module_name``'s code runs, ``after(module)`` once it has run.

    Nothing happens if the module is already imported.
    """
    with _lock:
        if module_name in sys.modules:
            return
        _before.setdefault(module_name, []).append(before)
        _hooks.setdefault(module_name, []).append(after)
        _install()


def after_each_import(prefix: str, callback: Callback) -> None:
    """``callback(module)`` after every module whose name starts with ``prefix`` is imported,
    until :func:`stop_after_each_import`."""
    with _lock:
        _prefix_hooks[prefix] = callback
        _install()


def stop_after_each_import(prefix: str) -> None:
    with _lock:
        _prefix_hooks.pop(prefix, None)


def pending() -> List[str]:
    with _lock:
        return sorted(_hooks)


def _run(module_name: str, module: Any, callbacks: List[Callback]) -> None:
    for callback in callbacks:
        try:
            callback(module)
        except Exception:
            logger.error("autotrace: a post-import hook for %s failed", module_name, exc_info=True)


def _fire(module_name: str, module: Any) -> None:
    with _lock:
        callbacks = _hooks.pop(module_name, [])
        callbacks += [hook for prefix, hook in _prefix_hooks.items() if module_name.startswith(prefix)]
    _run(module_name, sys.modules.get(module_name, module), callbacks)


class _HookLoader:  # duck-typed: importlib.abc costs ~8 ms to import
    def __init__(self, loader: Any, module_name: str) -> None:
        self._loader = loader
        self._module_name = module_name

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: Any) -> None:
        # Put the real loader back first, so the module looks as if never hooked.
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        with _lock:
            before = _before.pop(self._module_name, [])
        _run(self._module_name, module, before)
        self._loader.exec_module(module)
        _fire(self._module_name, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PostImportFinder:
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if fullname not in _hooks and fullname not in _before and not _has_prefix_hook(fullname):
            return None
        key = (threading.get_ident(), fullname)
        if key in _searching:
            return None
        _searching.add(key)
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            _searching.discard(key)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookLoader(spec.loader, fullname)
        return spec


def _has_prefix_hook(fullname: str) -> bool:
    return any(fullname.startswith(prefix) for prefix in _prefix_hooks)


_finder: Optional[_PostImportFinder] = None


def _install() -> None:
    global _finder
    if _finder is None or _finder not in sys.meta_path:
        _finder = _finder or _PostImportFinder()
        sys.meta_path.insert(0, _finder)
