"""autotrace: a zero-code OpenTelemetry tracing agent for Python services.

Importing this package is cheap on purpose: it is imported by the bootstrap of
every traced interpreter, so heavy modules are only imported where used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
