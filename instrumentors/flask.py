"""Flask: one SERVER span per request.

What is wrapped (on the class, so apps created before patching, app factories
and an early ``from flask import Flask`` are all covered):

* ``flask.app.Flask.wsgi_app`` -- the span (:mod:`autotrace.wsgi`): started
  from the context the global propagator extracts from the WSGI environ,
  current while the request is dispatched, ended when the WSGI response
  iterable is exhausted or closed (so streamed responses are timed to their
  last chunk).
* ``flask.app.Flask.handle_exception`` -- where Flask turns an unhandled
  exception into a 500 (or re-raises it with ``PROPAGATE_EXCEPTIONS``): the
  exception is recorded there, so the span has it in both cases.
* ``flask.app.Flask.process_response`` -- tells whether the body is already
  complete in memory (then the span ends when ``wsgi_app`` returns).

The route template is read from the request context when the response starts
(our ``start_response`` runs inside ``wsgi_app``, with the request context
still pushed), so no extra wrapper is needed on the dispatch path.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable, Dict, Optional, Tuple

from autotrace._log import internal_error
from autotrace.kit import Instrumentor, TracedIterator
from autotrace.wsgi import WsgiRequest, start_request
from autotrace.wsgi import request_attributes as _request_attributes

#: The request being traced in this context (nested wsgi_app calls and
#: handle_exception find it here).
_ACTIVE: "ContextVar[Optional[_Request]]" = ContextVar("autotrace_flask_request", default=None)

#: The response body wrapper (the kit's; ends the span when exhausted or closed).
_TracedBody = TracedIterator


def _request_finder() -> Callable[[], Any]:
    """A function returning the current ``flask.Request`` or None (Flask 2.0 .. 3.x)."""
    import flask.globals as flask_globals

    cv = getattr(flask_globals, "_cv_request", None)  # Flask >= 2.2
    if cv is not None:

        def from_contextvar() -> Any:
            ctx = cv.get(None)
            return None if ctx is None else ctx.request

        return from_contextvar
    stack = getattr(flask_globals, "_request_ctx_stack", None)  # Flask 2.0, 2.1
    if stack is not None:

        def from_stack() -> Any:
            ctx = stack.top
            return None if ctx is None else ctx.request

        return from_stack

    proxy = flask_globals.request

    def from_proxy() -> Any:  # any later layout: the public proxy
        try:
            return proxy._get_current_object()
        except RuntimeError:
            return None

    return from_proxy


class _Request(WsgiRequest):
    """A traced Flask request: the route is the matched ``url_rule`` of Flask's request context."""

    __slots__ = ()
    library = "flask"
    active = _ACTIVE
    body = _TracedBody
    find_request: Callable[[], Any] = staticmethod(lambda: None)  # set at patch time

    def find_route(self) -> Optional[str]:
        request = self.find_request()
        if request is None or request.environ is not self.environ:
            return None
        rule = request.url_rule
        return None if rule is None else rule.rule


class FlaskInstrumentor(Instrumentor):
    name = "flask"
    distribution = "flask"
    supported = ">=2.0,<4"
    covers = ("flask", "wsgi")
    modules = ("flask",)

    def __init__(self) -> None:
        super().__init__()
        self._enabled = False
        # One bound method each, so that patching again finds its own wrapper and adds none.
        self._hooks = {
            "Flask.wsgi_app": self._wsgi_app,
            "Flask.handle_exception": self._handle_exception,
            "Flask.process_response": self._process_response,
        }

    def patch_module(self, module_name: str, module: Any) -> None:
        import flask.app

        _Request.find_request = staticmethod(_request_finder())
        self._enabled = True
        for path, hook in self._hooks.items():
            self.wrap(flask.app, path, hook)

    def unpatch_extra(self) -> None:
        # References captured before unpatching (``app.wsgi_app = Mw(app.wsgi_app)``)
        # still reach our wrapper: they pass straight through from now on.
        self._enabled = False

    # -- wrappers --------------------------------------------------------------
    def _wsgi_app(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = None
        if self._enabled and not kwargs and len(args) == 2:
            # (the reader passed by this module's name: tests replace it to inject a fault)
            request = start_request(_Request, self, args[0], args[1], _request_attributes)
        if request is None:
            return wrapped(*args, **kwargs)
        return request.call(wrapped, args[0])

    def _handle_exception(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        request = _ACTIVE.get()
        if request is not None:
            exc = args[0] if args else kwargs.get("e")
            if isinstance(exc, BaseException):
                try:
                    request.on_exception(exc)
                except Exception:
                    internal_error("flask.handle_exception")
        return wrapped(*args, **kwargs)

    def _process_response(self, wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        response = wrapped(*args, **kwargs)
        request = _ACTIVE.get()
        if request is not None:
            try:
                request.streamed = bool(response.is_streamed)  # False: the body is complete in memory
            except Exception:
                internal_error("flask.process_response")
        return response
