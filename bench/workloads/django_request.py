"""Django GET through the WSGI handler, in process (1 server span per op): Django's flask_wsgi.

The op calls the ``WSGIHandler`` of ``get_wsgi_application()`` directly with a
fresh environ (no server, no test client), so whatever a tracer hooks --
``WSGIHandler.__call__``, the handler's middleware chain, the URL resolver --
is on the path. One URL pattern with a converter: ``items/<int:pk>/``.

This file is also the settings module and the URLconf (``DJANGO_SETTINGS_MODULE
=django_request``). A real Django deployment names its settings module in the
environment, and upstream's DjangoInstrumentor, run by opentelemetry-instrument
before this script starts, reads ``settings.MIDDLEWARE`` at that moment to put
its middleware first (with no settings it configures empty ones, and then this
script could not configure its own). So when the variable is not set the script
sets it, puts its own directory on PYTHONPATH and re-execs itself, under the
same launcher (the launchers' bootstrap is on PYTHONPATH and is kept). Every
launcher goes through the same re-exec; it happens before the timed part.
"""
import os
import sys

SETTINGS_MODULE = "django_request"

# -- settings (read by django.conf when this module is DJANGO_SETTINGS_MODULE)
DEBUG = False
SECRET_KEY = "autotrace-bench-not-a-secret"
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = SETTINGS_MODULE
MIDDLEWARE = []
INSTALLED_APPS = []
DATABASES = {}
USE_TZ = True

# -- URLconf
if os.environ.get("DJANGO_SETTINGS_MODULE") == SETTINGS_MODULE:
    from django.http import JsonResponse
    from django.urls import path

    def item(request, pk):
        return JsonResponse({"id": pk, "name": "bench"})

    urlpatterns = [path("items/<int:pk>/", item)]


def reexec_with_settings():
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    os.environ["PYTHONPATH"] = os.pathsep.join(pythonpath + [here])
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + sys.argv)


if __name__ == "__main__":
    if os.environ.get("DJANGO_SETTINGS_MODULE") != SETTINGS_MODULE:
        reexec_with_settings()

    import io

    from django.core.wsgi import get_wsgi_application

    from _common import run

    application = get_wsgi_application()
    base = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/items/42/",
        "QUERY_STRING": "page=1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    statuses = []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)

    def op(i):
        environ = dict(base)
        environ["wsgi.input"] = io.BytesIO(b"")
        result = application(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            result.close()
        assert statuses.pop() == "200 OK" and body, body

    run("django_request", op, 3000)
