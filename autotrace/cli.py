"""``autotrace-run [options] COMMAND [ARGS...]``.

Puts the bootstrap directory first on ``PYTHONPATH`` and ``exec``s the command,
so the program keeps its pid, its signals and its exit status. Options are
shorthands for the ``OTEL_*`` variables (upstream ``opentelemetry-instrument``
spellings such as ``--traces_exporter`` work too).
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False  # (not importing typing: ~2 ms of every start-up)

if TYPE_CHECKING:  # the launcher's own start-up is part of every traced start-up
    import argparse
    from typing import Dict, List, Optional, Sequence


def bootstrap_dir() -> str:
    """The directory holding our ``sitecustomize.py``."""
    import autotrace._sitecustomize as package

    return os.path.dirname(os.path.abspath(package.__file__))


def _parser() -> "argparse.ArgumentParser":
    import argparse

    from autotrace import __version__
    from autotrace.variables import VARIABLES, cli_spellings

    lines = [f"  {v.name:58} default: {v.default or '(unset)'}\n      {v.help}" for v in VARIABLES]
    parser = argparse.ArgumentParser(
        prog="autotrace-run",
        usage="autotrace-run [options] COMMAND [ARGS...]",
        description="Run COMMAND with OpenTelemetry tracing, without code changes. "
        "Example: autotrace-run --exporter tree python app.py",
        epilog="Environment variables (each option above sets the one it names):\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"autotrace {__version__}")
    parser.add_argument("--info", action="store_true", help="print the effective configuration and the instrumentors, then exit")
    for variable in VARIABLES:
        spellings = cli_spellings(variable)
        if spellings:
            parser.add_argument(*spellings, dest=variable.name, metavar="VALUE", help=f"sets {variable.name}")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the program to run, with its arguments")
    return parser


def prepend_pythonpath(environ: "Dict[str, str]", directory: str) -> None:
    """Put ``directory`` first on PYTHONPATH, keeping what was there (and not twice)."""
    existing = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != directory]
    environ["PYTHONPATH"] = os.pathsep.join([directory] + existing)


def main(argv: "Optional[Sequence[str]]" = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and not arguments[0].startswith("-"):
        return run(arguments)  # no options: skip argparse (about 20 ms of start-up)
    from autotrace.variables import VARIABLES

    parser = _parser()
    args = parser.parse_args(arguments)
    for variable in VARIABLES:
        value = getattr(args, variable.name, None)
        if value is not None:
            os.environ[variable.name] = value
    if args.info:
        from autotrace.info import print_info

        print_info(sys.stdout)
        return 0
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.print_usage(sys.stderr)
        print("autotrace-run: error: no command given (try: autotrace-run python app.py)", file=sys.stderr)
        return 2
    return run(command)


def run(command: "List[str]") -> int:
    """Exec ``command`` with the bootstrap directory first on PYTHONPATH."""
    import shutil

    prepend_pythonpath(os.environ, bootstrap_dir())  # type: ignore[arg-type]
    executable = shutil.which(command[0])
    if executable is None:
        print(f"autotrace-run: {command[0]}: command not found", file=sys.stderr)
        return 127
    try:
        os.execv(executable, command)
    except OSError as exc:
        print(f"autotrace-run: cannot run {command[0]}: {exc}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
