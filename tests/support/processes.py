"""Running programs under ``autotrace-run`` in tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

AUTOTRACE_RUN = shutil.which("autotrace-run", path=os.path.dirname(sys.executable)) or "autotrace-run"


def base_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A clean environment for a child: no inherited OTEL_* values, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "AUTOTRACE_"))}
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_traced(args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """``autotrace-run ARGS...`` to completion, capturing output as text."""
    return subprocess.run(
        [AUTOTRACE_RUN, *args], env=base_env(env), capture_output=True, text=True, timeout=timeout, **kwargs
    )


def start_traced(args: Sequence[str], env: Optional[Dict[str, str]] = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [AUTOTRACE_RUN, *args], env=base_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, process: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process exited with {process.returncode} before listening:\n{out}\n{err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def python() -> str:
    return sys.executable


def stop(process: subprocess.Popen, timeout: float = 20.0) -> List[str]:
    """SIGTERM, wait, return [stdout, stderr]."""
    if process.poll() is None:
        process.terminate()
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return [out or "", err or ""]
