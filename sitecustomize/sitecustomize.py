"""autotrace bootstrap: set up tracing, then run the next sitecustomize, if any.

Python imports the first ``sitecustomize`` on ``sys.path`` at start-up;
``autotrace-run`` puts this directory first on ``PYTHONPATH``, so this module
runs in every Python process started under it (children included). It must
never stop the program: every error is caught and logged.
"""


def _autotrace_bootstrap() -> None:
    try:
        from autotrace.bootstrap import initialize

        initialize()
    except Exception:  # autotrace itself not importable, or a bug: run untraced
        import logging

        logging.getLogger("autotrace").error("autotrace: bootstrap failed; the program runs untraced", exc_info=True)


def _chain_next_sitecustomize() -> None:
    """Import the sitecustomize this one shadows (the user's or the distribution's)."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    search_path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", search_path)
        if spec is None or spec.loader is None:
            return
        if spec.origin and os.path.dirname(os.path.abspath(spec.origin)) == here:
            return
        module = importlib.util.module_from_spec(spec)
        # While it runs, ``sitecustomize`` is the user's module, as without us.
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)
    except Exception:
        import logging

        logging.getLogger("autotrace").error("autotrace: the next sitecustomize on sys.path raised", exc_info=True)


_autotrace_bootstrap()
_chain_next_sitecustomize()
