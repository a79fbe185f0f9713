"""The agent in real processes: OTLP export over HTTP and gRPC to a real receiver, children,
sitecustomize chaining, plugins from installed distributions, shutdown flushing, bad config."""

import signal
import subprocess
import textwrap
import time

import pytest

from tests.support.processes import AUTOTRACE_RUN, base_env, run_traced
from tests.support.receiver import OTLPReceiver

MANUAL_SPAN = textwrap.dedent(
    """
    from opentelemetry import trace
    with trace.get_tracer("manual").start_as_current_span("{name}") as span:
        span.set_attribute("answer", 42)
    """
)


@pytest.fixture
def receiver():
    with OTLPReceiver(grpc=True) as r:
        yield r


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_are_exported_over_otlp(receiver, protocol):
    env = dict(receiver.env(protocol), OTEL_SERVICE_NAME="checkout", OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
               OTEL_EXPORTER_OTLP_HEADERS="x-tenant=acme")
    result = run_traced(["python", "-c", MANUAL_SPAN.format(name="work")], env)
    assert result.returncode == 0, result.stderr
    span = receiver.wait_for_count(1)[0]
    assert span.name == "work" and span.attributes == {"answer": 42}
    assert span.resource["service.name"] == "checkout"
    assert span.resource["deployment.environment"] == "test"
    assert span.resource["telemetry.distro.name"] == "autotrace"
    assert span.resource["process.pid"] > 0 and span.resource["host.name"]
    assert receiver.headers[0]["x-tenant"] == "acme"


@pytest.mark.parametrize(
    "first_import",
    [
        "from opentelemetry.sdk.trace.export import BatchSpanProcessor",
        "from opentelemetry.sdk.trace import TracerProvider",
        "from opentelemetry.sdk.resources import Resource",
        "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter",
        "from opentelemetry import propagate",
    ],
)
def test_a_program_importing_the_sdk_first_is_traced(receiver, first_import):
    # The SDK imports the API half-way through its own import: setting up then failed.
    code = first_import + "\n" + MANUAL_SPAN.format(name="after-sdk-import")
    result = run_traced(["python", "-c", code], receiver.env())
    assert result.returncode == 0, result.stderr
    assert "failed" not in result.stderr, result.stderr
    assert receiver.wait_for_count(1)[0].name == "after-sdk-import"


@pytest.mark.parametrize("propagators", ["bogus", "tracecontext,bogus", "none", "b3"])
def test_propagators_that_do_not_load_never_break_importing_the_api(receiver, propagators):
    # opentelemetry.propagate raises at import on a name it cannot load (API 1.27: even "none").
    code = textwrap.dedent(
        """
        from opentelemetry import propagate, trace
        import os
        with trace.get_tracer("t").start_as_current_span("outgoing"):
            headers = {}
            propagate.inject(headers)
        print(sorted(headers), os.environ["OTEL_PROPAGATORS"])
        """
    )
    result = run_traced(["python", "-c", code], dict(receiver.env(), OTEL_PROPAGATORS=propagators))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    expected = {"bogus": [], "tracecontext,bogus": ["traceparent"], "none": [], "b3": ["b3"]}[propagators]
    assert result.stdout.split("]")[0] + "]" == str(expected)
    assert result.stdout.strip().endswith(propagators)  # the user's value, as configured
    if "bogus" in propagators:
        assert "bogus" in result.stderr  # named in a warning
    assert receiver.wait_for_count(1)[0].name == "outgoing"


def test_gzip_compression(receiver):
    env = dict(receiver.env(), OTEL_EXPORTER_OTLP_COMPRESSION="gzip")
    assert run_traced(["python", "-c", MANUAL_SPAN.format(name="zipped")], env).returncode == 0
    receiver.wait_for_count(1)
    assert receiver.headers[0]["content-encoding"] == "gzip"


def test_console_exporter_prints_spans():
    result = run_traced(["--exporter", "console", "python", "-c", MANUAL_SPAN.format(name="to-console")])
    assert result.returncode == 0 and '"name": "to-console"' in result.stdout


def test_child_processes_are_traced(receiver):
    code = textwrap.dedent(
        """
        import multiprocessing, subprocess, sys
        from opentelemetry import trace

        def child(name):
            with trace.get_tracer("mp").start_as_current_span(name):
                pass

        if __name__ == "__main__":
            with trace.get_tracer("parent").start_as_current_span("parent"):
                pass
            subprocess.run([sys.executable, "-c", "from opentelemetry import trace\\nwith trace.get_tracer('s').start_as_current_span('subprocess'): pass"], check=True)
            for method in ("fork", "spawn"):
                p = multiprocessing.get_context(method).Process(target=child, args=(method,))
                p.start(); p.join()
                assert p.exitcode == 0
        """
    )
    script = receiver_script(code)
    assert run_traced(["python", script], receiver.env()).returncode == 0
    spans = receiver.wait_for(lambda s: {"parent", "subprocess", "fork", "spawn"} <= {x.name for x in s})
    assert len({s.resource["process.pid"] for s in spans}) == 4
    assert sorted(s.name for s in spans) == ["fork", "parent", "spawn", "subprocess"]  # nothing twice


def receiver_script(code):
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    handle.write(code)
    handle.close()
    return handle.name


def test_users_sitecustomize_still_runs_once(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os, sys\nprint('user sitecustomize', sys.argv[0], os.getpid())\nMARK = 1\n")
    code = "import os, sitecustomize, autotrace.bootstrap as b; print('main', os.getpid(), sitecustomize.MARK, b.is_initialized())"
    result = run_traced(["python", "-c", code], {"PYTHONPATH": str(tmp_path), "OTEL_TRACES_EXPORTER": "none"})
    assert result.returncode == 0, result.stderr
    main_pid = result.stdout.splitlines()[-1].split()[1]
    # (the autotrace-run launcher is a Python process too and runs it as any Python would)
    in_program = [l for l in result.stdout.splitlines() if l.startswith("user sitecustomize -c ")]
    assert in_program == [f"user sitecustomize -c {main_pid}"]
    assert result.stdout.splitlines()[-1] == f"main {main_pid} 1 True"


def test_sigterm_flushes_finished_spans(receiver):
    code = MANUAL_SPAN.format(name="before-sigterm") + "\nimport time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    env = dict(receiver.env(), OTEL_BSP_SCHEDULE_DELAY="60000")  # only the exit flush can send it
    process = subprocess.Popen([AUTOTRACE_RUN, "python", "-c", code], env=base_env(env), stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == -signal.SIGTERM
    assert [s.name for s in receiver.wait_for_count(1, timeout=5)] == ["before-sigterm"]


@pytest.mark.parametrize("ending", ["", "import sys; sys.exit(4)", "raise SystemExit('bye')", "raise RuntimeError('x')"])
def test_exit_paths_flush(receiver, ending):
    env = dict(receiver.env(), OTEL_BSP_SCHEDULE_DELAY="60000")
    run_traced(["python", "-c", MANUAL_SPAN.format(name="flushed") + ending], env)
    assert [s.name for s in receiver.wait_for_count(1, timeout=5)] == ["flushed"]


def test_dead_collector_warns_once_and_exit_is_bounded():
    from tests.support.processes import free_port

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", "OTEL_BSP_SCHEDULE_DELAY": "50",
           "AUTOTRACE_SHUTDOWN_TIMEOUT": "2000"}
    code = "import time\nfrom opentelemetry import trace\nt = trace.get_tracer('x')\nfor i in range(30):\n    t.start_span('s').end(); time.sleep(0.02)\n"
    started = time.monotonic()
    result = run_traced(["python", "-c", code], env)
    elapsed = time.monotonic() - started
    print(f"exit with a dead collector took {elapsed:.2f}s")
    assert result.returncode == 0
    assert result.stderr.count("cannot export spans to") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 8


def test_garbage_in_every_variable_leaves_the_program_running():
    from autotrace.variables import VARIABLES

    env = {v.name: "\u00e9\x01garbage,,=%zz" for v in VARIABLES if "<" not in v.name}
    env["OTEL_SDK_DISABLED"] = "nonsense"
    code = "from opentelemetry import trace, propagate\nwith trace.get_tracer('x').start_as_current_span('s'): pass\nprint('served')"
    result = run_traced(["python", "-c", code], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "served"
    assert "Traceback" not in result.stderr
    assert "OTEL_BSP_MAX_QUEUE_SIZE" in result.stderr  # named in a warning


def make_distribution(site, dist, module_source, entry_points, module_name):
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    (site / f"{module_name}.py").write_text(textwrap.dedent(module_source))


def test_third_party_plugins_are_found_activated_on_import_and_isolated(tmp_path, receiver):
    site = tmp_path / "site"
    (site).mkdir()
    (site / "shop_lib.py").write_text("class Client:\n    def fetch(self, key):\n        return 'value-' + key\n")
    make_distribution(site, "shop-lib", "", "", "shop_lib_meta")
    make_distribution(
        site,
        "autotrace-shop",
        """
        from autotrace.kit import CallSpan, Instrumentor

        class ShopInstrumentor(Instrumentor):
            name = "shop_lib"
            distribution = "shop-lib"
            supported = ">=1,<2"

            def patch_module(self, module_name, module):
                self.wrap(module, "Client.fetch", CallSpan(self, lambda inst, args, kw: ("shop.fetch", {})))

        class Broken:
            def __init__(self):
                raise RuntimeError("plugin constructor bug")

        class BrokenPatch(Instrumentor):
            name = "json"
            def patch_module(self, module_name, module):
                raise RuntimeError("patch bug")
        """,
        "[autotrace.instrumentors]\nshop_lib = autotrace_shop:ShopInstrumentor\ncsv = autotrace_shop:Broken\njson = autotrace_shop:BrokenPatch\n",
        "autotrace_shop",
    )
    code = "import csv, json, sys\nassert 'shop_lib' not in sys.modules\nimport shop_lib\nprint(shop_lib.Client().fetch('k'))"
    result = run_traced(["python", "-c", code], dict(receiver.env(), PYTHONPATH=str(site)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "value-k"
    assert "'csv'" in result.stderr and "plugin constructor bug" in result.stderr
    assert "'json' failed to patch json" in result.stderr
    assert [s.name for s in receiver.wait_for_count(1)] == ["shop.fetch"]
    info = run_traced(["--info"], {"PYTHONPATH": str(site)}).stdout
    csv_line = next(l for l in info.splitlines() if l.strip().startswith("csv "))
    assert "plugin failed to load" in csv_line and "plugin constructor bug" in csv_line
    shop_line = next(l for l in info.splitlines() if l.strip().startswith("shop_lib"))
    assert "installed=1.0" in shop_line and "supported=>=1,<2" in shop_line and "will patch on import" in shop_line


def test_version_out_of_range_is_not_patched(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "old_lib.py").write_text("class C:\n    def f(self):\n        return 1\n")
    make_distribution(site, "old-lib", "", "", "old_lib_meta")
    make_distribution(
        site,
        "autotrace-old",
        """
        from autotrace.instrumentation import Instrumentor
        class OldInstrumentor(Instrumentor):
            name = "old_lib"
            distribution = "old-lib"
            supported = ">=2"
            def patch_module(self, module_name, module):
                print("PATCHED")
        """,
        "[autotrace.instrumentors]\nold_lib = autotrace_old:OldInstrumentor\n",
        "autotrace_old",
    )
    env = {"PYTHONPATH": str(site), "OTEL_TRACES_EXPORTER": "none"}
    result = run_traced(["python", "-c", "import old_lib"], env)
    assert "PATCHED" not in result.stdout and "old-lib 1.0 is outside the supported range >=2" in result.stderr
    forced = run_traced(["python", "-c", "import old_lib"], dict(env, AUTOTRACE_FORCE_INSTRUMENTATIONS="old_lib"))
    assert "PATCHED" in forced.stdout


def test_upstream_instrumentor_plugins_are_activated_lazily(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "legacy_lib.py").write_text("VALUE = 1\n")
    make_distribution(site, "legacy-lib", "", "", "legacy_lib_meta")
    make_distribution(
        site,
        "opentelemetry-instrumentation-legacy-lib",
        """
        class LegacyInstrumentor:
            def instrumentation_dependencies(self):
                return ["legacy-lib >= 0"]
            def instrument(self, **kwargs):
                import legacy_lib
                print("UPSTREAM INSTRUMENTED", legacy_lib.VALUE)
        """,
        "[opentelemetry_instrumentor]\nlegacy_lib = upstream_legacy:LegacyInstrumentor\nflask = upstream_legacy:LegacyInstrumentor\n",
        "upstream_legacy",
    )
    env = {"PYTHONPATH": str(site), "OTEL_TRACES_EXPORTER": "none"}
    assert "UPSTREAM" not in run_traced(["python", "-c", "pass"], env).stdout
    result = run_traced(["python", "-c", "import legacy_lib"], env)
    assert result.stdout.count("UPSTREAM INSTRUMENTED 1") == 1, result.stderr
    info = run_traced(["--info"], env).stdout
    assert "covered by a built-in" in next(l for l in info.splitlines() if l.strip().startswith("flask ") and "upstream" in l)


def test_burst_drops_are_counted_and_reported(receiver):
    receiver.behaviour.delay_s = 0.5  # a slow collector: the queue fills
    env = dict(receiver.env(), OTEL_BSP_MAX_QUEUE_SIZE="100", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="50", OTEL_BSP_SCHEDULE_DELAY="10")
    code = textwrap.dedent(
        """
        from opentelemetry import trace
        import autotrace.tracing as t
        tracer = trace.get_tracer("burst")
        for i in range(2000):
            tracer.start_span("s").end()
        print("dropped", t.dropped_spans())
        """
    )
    result = run_traced(["python", "-c", code], env)
    dropped = int(result.stdout.split()[-1])
    print(f"burst of 2000 spans into a queue of 100: {dropped} dropped, {len(receiver.spans)} received before exit")
    assert dropped > 0
    assert result.stderr.count("the queue is full") == 1
    assert f"{dropped} spans of this process were dropped" in result.stderr
    assert "Queue full" not in result.stderr and "Traceback" not in result.stderr


def test_program_installing_its_own_provider_gets_an_explanation(receiver):
    code = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())
        with trace.get_tracer("x").start_as_current_span("once"):
            pass
        """
    )
    result = run_traced(["python", "-c", code], receiver.env())
    assert "tried to install its own TracerProvider" in result.stderr
    assert [s.name for s in receiver.wait_for_count(1)] == ["once"]


def test_log_correlation_adds_trace_ids_to_records():
    code = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(stream=sys.stdout, format="%(otelTraceID)s %(otelSpanID)s %(otelServiceName)s %(otelTraceSampled)s %(message)s")
        from opentelemetry import trace
        with trace.get_tracer("x").start_as_current_span("s") as span:
            logging.getLogger("app").warning("inside")
            print("expected", format(span.get_span_context().trace_id, "032x"))
        logging.getLogger("app").warning("outside")
        """
    )
    result = run_traced(["python", "-c", code], {"OTEL_TRACES_EXPORTER": "none", "OTEL_PYTHON_LOG_CORRELATION": "true", "OTEL_SERVICE_NAME": "svc"})
    lines = result.stdout.splitlines()
    expected = lines[1].split()[1]
    assert lines[0].split() == [expected, lines[0].split()[1], "svc", "True", "inside"]
    assert lines[2].split() == ["0", "0", "svc", "False", "outside"]


def test_bootstrap_runs_once_per_process():
    code = "import importlib, sys, autotrace.bootstrap as b\nsys.modules.pop('sitecustomize')\nimport sitecustomize\nprint(b.initialize())"
    result = run_traced(["python", "-c", code], {"OTEL_TRACES_EXPORTER": "none"})
    assert result.stdout.strip() == "False", result.stderr
