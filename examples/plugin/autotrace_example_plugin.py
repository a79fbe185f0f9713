"""An autotrace instrumentor for kvstore, built on ``autotrace.kit`` alone.

One CLIENT span per ``Client`` / ``AsyncClient`` ``get`` and ``set``, named by
the operation, with the database attributes of the stable semantic
conventions. Keys and values are never recorded.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from autotrace.kit import CallSpan, Instrumentor, record_error


class KVStoreInstrumentor(Instrumentor):
    name = "kvstore"  # as the entry point: ``import kvstore`` activates the plugin
    distribution = "autotrace-example-plugin"  # whose installed version is checked...
    supported = ">=0.1,<1"  # ...against this range
    modules = ("kvstore",)  # patch_module runs when each is first imported

    def __init__(self) -> None:
        super().__init__()
        # Built once, so patching twice finds the same wrappers and adds none.
        self._spans = {op: CallSpan(self, _describe(op), record=_record, site=f"kvstore.{op}") for op in ("get", "set")}

    def patch_module(self, module_name: str, module: Any) -> None:
        for cls in ("Client", "AsyncClient"):
            for op, span in self._spans.items():
                self.wrap(module, f"{cls}.{op}", span)  # the sync or async wrapper, by the target


def _describe(op: str) -> Any:
    name = op.upper()

    def describe(client: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        cache = client.__dict__.setdefault("_autotrace_attrs", {})  # per client: no dict built per call
        attrs = cache.get(name)
        if attrs is None:
            attrs = cache[name] = {"db.system.name": "kvstore", "db.operation.name": name, "db.namespace": client.namespace}
        return name, attrs

    describe.__name__ = op
    return describe


def _record(span: Any, exc: BaseException, state: Any) -> None:
    record_error(span, exc, message=type(exc).__name__)  # kvstore's messages name the key: keep it out
