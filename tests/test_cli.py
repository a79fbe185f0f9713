"""autotrace-run as a user runs it: exit status, signals, PYTHONPATH, --info, --help, bad input."""

import os
import signal
import subprocess
import textwrap

from autotrace.cli import prepend_pythonpath
from autotrace.variables import VARIABLES
from tests.support.processes import AUTOTRACE_RUN, base_env, run_traced

NO_EXPORT = {"OTEL_TRACES_EXPORTER": "none"}


def test_exit_status_passes_through():
    result = run_traced(["python", "-c", "import sys; sys.exit(7)"], NO_EXPORT)
    assert result.returncode == 7


def test_unhandled_exception_behaves_as_without_autotrace():
    result = run_traced(["python", "-c", "raise ValueError('boom')"], NO_EXPORT)
    assert result.returncode == 1
    assert "ValueError: boom" in result.stderr and "autotrace" not in result.stderr


def test_same_pid_and_sigterm_default_kills_like_before():
    process = subprocess.Popen(
        [AUTOTRACE_RUN, "python", "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(30)"],
        env=base_env(NO_EXPORT), stdout=subprocess.PIPE, text=True,
    )
    child_pid = int(process.stdout.readline())
    assert child_pid == process.pid  # exec, not a wrapper process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == -signal.SIGTERM


def test_program_sigterm_handler_is_respected():
    code = textwrap.dedent(
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (print("handled", flush=True), sys.exit(3)))
        print("ready", flush=True)
        time.sleep(30)
        """
    )
    process = subprocess.Popen([AUTOTRACE_RUN, "python", "-c", code], env=base_env(NO_EXPORT), stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 3
    assert "handled" in process.stdout.read()


def test_pythonpath_is_kept_and_bootstrap_first(tmp_path):
    env = dict(NO_EXPORT, PYTHONPATH=str(tmp_path))
    result = run_traced(["python", "-c", "import os; print(os.environ['PYTHONPATH'])"], env)
    parts = result.stdout.strip().split(os.pathsep)
    assert parts[0].endswith("sitecustomize") and parts[1:] == [str(tmp_path)]


def test_prepend_pythonpath_does_not_duplicate():
    env = {"PYTHONPATH": "/boot:/a"}
    prepend_pythonpath(env, "/boot")
    assert env["PYTHONPATH"] == "/boot:/a"


def test_python_dash_m_and_console_scripts():
    result = run_traced(["python", "-m", "json.tool", "--help"], NO_EXPORT)
    assert result.returncode == 0 and "usage" in result.stdout.lower()
    result = run_traced(["pytest", "--version"], NO_EXPORT)
    assert result.returncode == 0


def test_command_not_found_and_no_command():
    result = run_traced(["definitely-not-a-command-xyz"], NO_EXPORT)
    assert result.returncode == 127 and "command not found" in result.stderr
    result = run_traced([], NO_EXPORT)
    assert result.returncode == 2 and "no command" in result.stderr


def test_options_set_variables_including_upstream_spellings():
    code = "import os; print(os.environ['OTEL_SERVICE_NAME'], os.environ['OTEL_TRACES_EXPORTER'], os.environ['OTEL_TRACES_SAMPLER'])"
    result = run_traced(["--service-name", "shop", "--traces_exporter", "none", "--sampler", "always_off", "python", "-c", code])
    assert result.stdout.split() == ["shop", "none", "always_off"]


def test_help_documents_every_variable():
    result = run_traced(["--help"])
    assert result.returncode == 0
    for variable in VARIABLES:
        assert variable.name in result.stdout


def test_version():
    result = run_traced(["--version"])
    assert result.returncode == 0 and result.stdout.startswith("autotrace ")


def test_info_masks_secrets_and_lists_instrumentors():
    result = run_traced(["--info"], {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=supersecret", "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "redis"})
    assert result.returncode == 0
    assert "supersecret" not in result.stdout and "api-key" in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.split("Instrumentors:")[1].strip().splitlines()}
    for name in ("flask", "fastapi", "requests", "sqlalchemy", "redis", "celery"):
        assert name in lines, result.stdout
    assert "disabled by env" in lines["redis"]


def test_sdk_disabled_patches_nothing_and_imports_no_opentelemetry():
    code = "import sys, json; import flask; print(json.dumps(sorted(m for m in sys.modules if m.startswith(('opentelemetry','autotrace.instrumentors')))))"
    result = run_traced(["python", "-c", code], {"OTEL_SDK_DISABLED": "true"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_startup_imports_no_instrumented_library_nor_the_sdk():
    code = (
        "import sys; libs = ('flask','fastapi','requests','sqlalchemy','redis','celery','opentelemetry.sdk','grpc','google.protobuf');"
        "print([m for m in libs if m in sys.modules]); print('autotrace.bootstrap' in sys.modules)"
    )
    result = run_traced(["python", "-c", code])
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stdout + result.stderr


def test_library_is_patched_on_first_import_even_with_early_from_import():
    code = textwrap.dedent(
        """
        from flask import Flask
        import autotrace.plugins as p
        states = {x.name: x.state for x in p.current().plugins}
        print(states["flask"])
        from opentelemetry import trace
        print(type(trace.get_tracer_provider()).__module__)
        """
    )
    result = run_traced(["python", "-c", code], NO_EXPORT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["patched", "opentelemetry.sdk.trace"], result.stdout + result.stderr


def test_readme_documents_every_variable():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for variable in VARIABLES:
        assert f"`{variable.name}`" in readme, variable.name
