"""Finding instrumentors and patching their libraries when first imported.

Discovery reads entry-point *metadata* only: at start-up no plugin module and no
instrumented library is imported. The entry point's name is the instrumentation
name *and* the module whose first import triggers it (``redis = pkg:Cls`` is
activated when ``import redis`` runs); that is what keeps start-up free of
plugin imports. The instrumentor class is loaded inside the post-import hook,
where its version gate runs against the installed distribution's metadata.

Two groups are read:

* ``autotrace.instrumentors`` -- our own contract (:class:`Instrumentor`); the
  built-ins register here exactly like third-party plugins.
* ``opentelemetry_instrumentor`` -- upstream ``BaseInstrumentor`` plugins such
  as ``opentelemetry-instrumentation-urllib3``, activated lazily the same way
  unless a built-in already covers that library.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Dict, List, Optional

from autotrace._importhook import when_imported
from autotrace._log import logger
from autotrace.config import Settings

GROUP = "autotrace.instrumentors"
UPSTREAM_GROUP = "opentelemetry_instrumentor"


#: Upstream entry-point names that are not the name of the module to wait for.
UPSTREAM_TRIGGER_MODULES = {
    "tortoiseorm": "tortoise",
    "aio-pika": "aio_pika",
    "aiohttp-server": "aiohttp.web",
    "aiohttp-client": "aiohttp",
    "grpc_client": "grpc",
    "grpc_server": "grpc",
    "grpc_aio_client": "grpc",
    "grpc_aio_server": "grpc",
    "mysql": "mysql.connector",
    "elasticsearch": "elasticsearch",
    "confluent_kafka": "confluent_kafka",
    "kafka": "kafka",
    "system_metrics": "psutil",
    "aws-lambda": "",
    "openai": "openai",
}

# States reported by ``--info``.
WILL_PATCH = "will patch on import"
PATCHED = "patched"
NOT_INSTALLED = "not installed"
OUT_OF_RANGE = "version out of range"
DISABLED = "disabled by env"
FAILED = "plugin failed to load"
PATCH_FAILED = "patch failed"
COVERED = "skipped (covered by a built-in)"


class Plugin:
    """One discovered instrumentation and what became of it."""

    def __init__(self, name: str, value: str, group: str, provider: str, entry_point: Any = None) -> None:
        self.name = name
        self.value = value
        self.group = group
        self.provider = provider  # distribution that declares the entry point
        self.entry_point = entry_point
        self.state = WILL_PATCH
        self.reason = ""
        self.instrumentor: Any = None
        self.distribution = ""
        self.supported = ""
        self.installed_version: Optional[str] = None
        self.modules: List[str] = []

    @property
    def trigger_module(self) -> str:
        if self.group == UPSTREAM_GROUP:
            return UPSTREAM_TRIGGER_MODULES.get(self.name, self.name.replace("-", "_"))
        return self.name


def _entry_points(group: str) -> List[Any]:
    if sys.version_info >= (3, 10):
        from importlib.metadata import entry_points
    else:  # pragma: no cover - Python 3.9
        from importlib_metadata import entry_points
    return list(entry_points(group=group))


def _provider(entry_point: Any) -> str:
    dist = getattr(entry_point, "dist", None)
    return getattr(dist, "name", "") or "?"


def discover(settings: Settings) -> List[Plugin]:
    """Every plugin of both groups, with its initial state; imports nothing."""
    plugins: List[Plugin] = []
    seen = set()
    for entry_point in _entry_points(GROUP):
        if entry_point.name in seen:
            continue  # an editable and a regular install may both declare it
        seen.add(entry_point.name)
        plugins.append(Plugin(entry_point.name, entry_point.value, GROUP, _provider(entry_point), entry_point))
    if settings.upstream_plugins:
        for entry_point in _entry_points(UPSTREAM_GROUP):
            plugin = Plugin(entry_point.name, entry_point.value, UPSTREAM_GROUP, _provider(entry_point), entry_point)
            if entry_point.name in seen:
                plugin.state, plugin.reason = COVERED, "autotrace instruments this library itself"
            elif not plugin.trigger_module:
                plugin.state, plugin.reason = COVERED, "not a library instrumentation"
            plugins.append(plugin)
    for plugin in plugins:
        if plugin.state == WILL_PATCH and settings.instrumentation_disabled(plugin.name):
            plugin.state, plugin.reason = DISABLED, "OTEL_PYTHON_DISABLED/ENABLED_INSTRUMENTATIONS"
    return plugins


def covering(plugins: List[Plugin], name: str) -> Optional[str]:
    """The autotrace instrumentor whose ``covers`` names the upstream plugin ``name``, if any.

    Reads the classes' declarations, so it imports the instrumentor modules (not
    their libraries): called when an upstream plugin is about to activate, or
    for ``--info``, never at start-up.
    """
    for plugin in plugins:
        if plugin.group != GROUP or plugin.entry_point is None:
            continue
        try:
            cls = plugin.entry_point.load()
        except Exception:
            continue
        if name in (getattr(cls, "covers", None) or ()):
            return plugin.name
    return None


def installed_version(distribution: str) -> Optional[str]:
    if not distribution:
        return None
    if sys.version_info >= (3, 10):
        from importlib.metadata import PackageNotFoundError, version
    else:  # pragma: no cover
        from importlib_metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def version_allowed(version: str, supported: str) -> bool:
    if not supported:
        return True
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(supported).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return False


def load_instrumentor(plugin: Plugin, quiet: bool = False) -> bool:
    """Import the plugin's class and read its declarations; False on failure."""
    try:
        cls = plugin.entry_point.load()
        plugin.instrumentor = cls()
    except Exception as exc:
        plugin.state, plugin.reason = FAILED, f"{type(exc).__name__}: {exc}"
        if not quiet:
            logger.error(
                "autotrace: instrumentor %r (%s) failed to load; it is skipped",
                plugin.name, plugin.value, exc_info=True,
            )
        return False
    if plugin.group == GROUP:
        inst = plugin.instrumentor
        plugin.distribution = inst.distribution
        plugin.supported = inst.supported
        plugin.modules = list(inst.modules) or [plugin.name]
    else:
        plugin.modules = [plugin.trigger_module]
        try:
            deps = list(plugin.instrumentor.instrumentation_dependencies())
        except Exception:
            deps = []
        if deps:
            from packaging.requirements import Requirement

            try:
                requirement = Requirement(deps[0])
                plugin.distribution, plugin.supported = requirement.name, str(requirement.specifier)
            except Exception:
                pass
    plugin.installed_version = installed_version(plugin.distribution)
    return True


class Activator:
    """Registers the post-import hooks and patches when they fire."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.plugins: List[Plugin] = []
        self._lock = threading.RLock()

    def activate(self) -> List[Plugin]:
        self.plugins = discover(self.settings)
        for plugin in self.plugins:
            if plugin.state != WILL_PATCH:
                continue
            try:
                when_imported(plugin.trigger_module, self._hook_for(plugin))
            except Exception:
                plugin.state, plugin.reason = FAILED, "could not register the import hook"
                logger.error("autotrace: could not register the import hook for %r", plugin.name, exc_info=True)
        return self.plugins

    def _hook_for(self, plugin: Plugin) -> Any:
        def on_import(module: Any) -> None:
            try:
                self._on_trigger(plugin, module)
            except Exception:  # never let an import of the user's fail
                plugin.state, plugin.reason = PATCH_FAILED, "internal error"
                logger.error("autotrace: instrumenting %r failed; the library runs untraced", plugin.name, exc_info=True)

        return on_import

    def _on_trigger(self, plugin: Plugin, module: Any) -> None:
        from autotrace.bootstrap import ensure_sdk

        ensure_sdk()  # the SDK is set up when the first traced library arrives
        with self._lock:
            if plugin.state != WILL_PATCH or plugin.instrumentor is not None:
                return
            if plugin.group == UPSTREAM_GROUP:
                ours = covering(self.plugins, plugin.name)
                if ours is not None:
                    plugin.state, plugin.reason = COVERED, f"autotrace's {ours!r} instrumentor covers it"
                    return
            if not load_instrumentor(plugin):
                return
            if not self._version_ok(plugin):
                return
            if plugin.group == UPSTREAM_GROUP:
                self._activate_upstream(plugin)
                return
        for module_name in plugin.modules:
            when_imported(module_name, self._module_hook(plugin, module_name))

    def _version_ok(self, plugin: Plugin) -> bool:
        if not plugin.distribution or not plugin.supported:
            return True
        if plugin.installed_version is None:
            plugin.state, plugin.reason = NOT_INSTALLED, f"distribution {plugin.distribution!r} not found"
            logger.warning(
                "autotrace: %r is imported but the version of distribution %r cannot be read; it is not instrumented",
                plugin.trigger_module, plugin.distribution,
            )
            return False
        if version_allowed(plugin.installed_version, plugin.supported):
            return True
        forced = self.settings.forced_instrumentations
        if plugin.name in forced or "*" in forced:
            logger.warning(
                "autotrace: %s %s is outside the supported range %s; patching anyway (AUTOTRACE_FORCE_INSTRUMENTATIONS)",
                plugin.distribution, plugin.installed_version, plugin.supported,
            )
            return True
        plugin.state = OUT_OF_RANGE
        plugin.reason = f"{plugin.distribution} {plugin.installed_version} not in {plugin.supported}"
        logger.warning(
            "autotrace: %s %s is outside the supported range %s; %r is not instrumented "
            "(set AUTOTRACE_FORCE_INSTRUMENTATIONS=%s to try anyway)",
            plugin.distribution, plugin.installed_version, plugin.supported, plugin.name, plugin.name,
        )
        return False

    def _module_hook(self, plugin: Plugin, module_name: str) -> Any:
        def on_import(module: Any) -> None:
            instrumentor = plugin.instrumentor
            try:
                instrumentor.patch_module(module_name, module)
                instrumentor.patched_modules.append(module_name)
                plugin.state = PATCHED
            except Exception as exc:
                plugin.state, plugin.reason = PATCH_FAILED, f"{type(exc).__name__}: {exc}"
                logger.error(
                    "autotrace: instrumentor %r failed to patch %s; that module runs untraced",
                    plugin.name, module_name, exc_info=True,
                )

        return on_import

    def _activate_upstream(self, plugin: Plugin) -> None:
        try:
            plugin.instrumentor.instrument()
            plugin.state = PATCHED
        except Exception as exc:
            plugin.state, plugin.reason = PATCH_FAILED, f"{type(exc).__name__}: {exc}"
            logger.error("autotrace: upstream instrumentor %r failed; it is skipped", plugin.name, exc_info=True)

    def unpatch_all(self) -> None:
        for plugin in self.plugins:
            if plugin.state != PATCHED or plugin.instrumentor is None:
                continue
            try:
                if plugin.group == GROUP:
                    plugin.instrumentor.unpatch()
                else:
                    plugin.instrumentor.uninstrument()
            except Exception:
                logger.error("autotrace: unpatching %r failed", plugin.name, exc_info=True)


_activator: Optional[Activator] = None


def activate(settings: Settings) -> Activator:
    """Discover plugins and register their lazy hooks (once per process)."""
    global _activator
    if _activator is None:
        _activator = Activator(settings)
        _activator.activate()
    return _activator


def current() -> Optional[Activator]:
    return _activator


def plugin_table(settings: Settings) -> List[Dict[str, str]]:
    """What ``--info`` prints: every plugin, loaded (not patched) to read its declarations."""
    rows = []
    plugins = discover(settings)
    for plugin in plugins:
        if plugin.group == UPSTREAM_GROUP and plugin.state in (WILL_PATCH, DISABLED):
            ours = covering(plugins, plugin.name)
            if ours is not None:
                plugin.state, plugin.reason = COVERED, f"autotrace's {ours!r} instrumentor covers it"
        initial_state = plugin.state
        loaded = plugin.state in (WILL_PATCH, DISABLED) and load_instrumentor(plugin, quiet=True)
        if initial_state == DISABLED:
            plugin.state = DISABLED
        if loaded:
            if plugin.state == WILL_PATCH and plugin.distribution:
                if plugin.installed_version is None:
                    plugin.state = NOT_INSTALLED
                elif not version_allowed(plugin.installed_version, plugin.supported):
                    if plugin.name in settings.forced_instrumentations or "*" in settings.forced_instrumentations:
                        plugin.reason = "forced by AUTOTRACE_FORCE_INSTRUMENTATIONS"
                    else:
                        plugin.state = OUT_OF_RANGE
        rows.append(
            {
                "name": plugin.name,
                "group": "autotrace" if plugin.group == GROUP else "upstream",
                "provider": plugin.provider,
                "library": plugin.distribution or plugin.trigger_module,
                "installed": plugin.installed_version or "-",
                "supported": plugin.supported or "any",
                "state": plugin.state,
                "reason": plugin.reason,
            }
        )
    return rows
