"""examples/plugin as a third-party distribution: pip-installed into a fresh venv, traced by autotrace-run.

The venv sees this test venv's packages (autotrace, pip, setuptools) through a
``.pth`` file, and the plugin is installed offline (``--no-index --no-deps
--no-build-isolation``) from a copy of examples/plugin. The traced child runs
there, exporting to a real OTLP receiver.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from tests.support.processes import AUTOTRACE_RUN, base_env
from tests.support.receiver import OTLPReceiver
from tests.support.services import in_ci

PLUGIN_SOURCE = Path(__file__).resolve().parent.parent / "examples" / "plugin"


def _can_build_wheels() -> bool:
    """setuptools builds wheels itself from 70.1; older ones need the ``wheel`` package."""
    try:
        import setuptools
        from packaging.version import Version

        if Version(setuptools.__version__) >= Version("70.1"):
            return True
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: Any) -> Iterator[Path]:
    """A venv with the example plugin installed, seeing this venv's packages; its bin directory."""
    if not _can_build_wheels():
        message = "the test venv cannot build wheels offline: install 'wheel' or setuptools>=70.1"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip()
    # addsitedir (not a bare path line) so that the parent's own .pth files run: the editable autotrace.
    Path(purelib, "_parent_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", str(source)],
        capture_output=True, text=True, timeout=120, cwd=root,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    yield venv


CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    early = [name for name in ("kvstore", "autotrace_example_plugin") if name in sys.modules]
    from autotrace import plugins
    def state():
        activator = plugins.current()
        return {p.name: [p.state, p.provider] for p in (activator.plugins if activator else [])}.get("kvstore")
    before = state()

    import kvstore
    from opentelemetry import trace

    async def run_async(client):
        await client.set("a", 1)
        return await client.get("a")

    with trace.get_tracer("app").start_as_current_span("job"):
        client = kvstore.Client("orders")
        results = [client.set("secret-key", "secret-value"), client.get("secret-key")]
        try:
            client.get("missing-secret-key")
        except kvstore.KeyNotFound as exc:
            results.append(type(exc).__name__)
        results.append(asyncio.run(run_async(kvstore.AsyncClient("carts"))))
    print(json.dumps({
        "early": early,
        "before": before,
        "after": state(),
        "plugin_loaded": "autotrace_example_plugin" in sys.modules,
        "kvstore_file": kvstore.__file__,
        "prefix": sys.prefix,
        "wrapped": [type(vars(cls)[op]).__name__ for cls in (kvstore.Client, kvstore.AsyncClient) for op in ("get", "set")],
        "coroutines": [asyncio.iscoroutinefunction(kvstore.AsyncClient.get), asyncio.iscoroutinefunction(kvstore.AsyncClient.set)],
        "results": results,
    }))
    """
)


def _run_child(venv: Path, receiver: OTLPReceiver) -> Dict[str, Any]:
    env = base_env(receiver.env())
    env["PATH"] = str(venv / "bin") + os.pathsep + env["PATH"]  # "python" is the plugin venv's
    child = subprocess.run(
        [AUTOTRACE_RUN, "python", "-c", CHILD], env=env, capture_output=True, text=True, timeout=60, cwd=venv.parent,
    )
    assert child.returncode == 0, child.stdout + child.stderr
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_installed_plugin_is_lazy_and_its_spans_arrive(plugin_venv: Path) -> None:
    with OTLPReceiver() as receiver:
        report = _run_child(plugin_venv, receiver)
        spans = receiver.wait_for(lambda got: len([s for s in got if s.kind == "CLIENT"]) >= 5 and any(s.name == "job" for s in got))

    # Installed in the new venv (not the source tree), discovered, and nothing imported at start-up.
    assert Path(report["prefix"]).resolve() == plugin_venv.resolve()
    assert Path(report["kvstore_file"]).resolve().is_relative_to(plugin_venv.resolve())
    assert report["early"] == []
    assert report["before"] == ["will patch on import", "autotrace-example-plugin"]
    # Patched on first import; the user's results and async nature untouched.
    assert report["after"][0] == "patched" and report["plugin_loaded"]
    assert report["wrapped"] == ["FunctionWrapper"] * 4
    assert report["coroutines"] == [True, True]
    assert report["results"] == [True, "secret-value", "KeyNotFound", 1]

    job = next(s for s in spans if s.name == "job")
    client_spans = [s for s in spans if s.kind == "CLIENT"]
    assert [(s.name, s.attributes["db.namespace"]) for s in client_spans] == [
        ("SET", "orders"), ("GET", "orders"), ("GET", "orders"), ("SET", "carts"), ("GET", "carts"),
    ]
    for span in client_spans:
        assert span.scope == "autotrace.instrumentors.kvstore"
        assert span.trace_id == job.trace_id
        assert span.attributes["db.system.name"] == "kvstore"
        assert span.attributes["db.operation.name"] == span.name
    assert all(s.parent_span_id == job.span_id for s in client_spans)  # async ones too
    ok, failed = client_spans[1], client_spans[2]
    assert ok.status == "UNSET" and "error.type" not in ok.attributes
    assert failed.status == "ERROR"
    assert failed.attributes["error.type"] == "kvstore.KeyNotFound"
    assert [e["name"] for e in failed.events] == ["exception"]
    assert failed.events[0]["attributes"]["exception.message"] == "KeyNotFound"
    exported = json.dumps([s.attributes for s in client_spans] + [e for s in client_spans for e in s.events])
    assert "secret" not in exported + failed.status_message, "a key or value was exported"
