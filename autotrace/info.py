"""``autotrace-run --info``: the effective configuration and every instrumentor's state."""

from __future__ import annotations

from typing import Any, Dict, TextIO

from autotrace import __version__
from autotrace.config import load_settings
from autotrace.plugins import plugin_table


def _mask(value: str) -> str:
    return "****" if value else value


def effective_configuration() -> Dict[str, Any]:
    settings = load_settings()
    data = settings._asdict()
    data["otlp"] = settings.otlp._asdict()
    data["otlp"]["headers"] = {key: _mask(value) for key, value in settings.otlp.headers.items()}
    data["limits"] = settings.limits._asdict()
    data.pop("invalid_variables", None)
    return data


def print_info(out: TextIO) -> None:
    config = effective_configuration()
    out.write(f"autotrace {__version__}\n\nEffective configuration:\n")
    for key, value in config.items():
        if isinstance(value, dict) and key in ("otlp", "limits"):
            for sub_key, sub_value in value.items():
                out.write(f"  {key}.{sub_key} = {_render(sub_value)}\n")
        else:
            out.write(f"  {key} = {_render(value)}\n")
    out.write("\nInstrumentors:\n")
    rows = plugin_table(load_settings())
    if not rows:
        out.write("  (none found: is autotrace installed in this environment?)\n")
    for row in rows:
        line = (
            f"  {row['name']:<14} {row['group']:<9} library={row['library']:<18} installed={row['installed']:<10} "
            f"supported={row['supported']:<14} state={row['state']}"
        )
        if row["reason"]:
            line += f" ({row['reason']})"
        out.write(line + "\n")


def _render(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(sorted(str(v) for v in value)) if value else "(none)"
    if value is None:
        return "(unset)"
    return str(value)
