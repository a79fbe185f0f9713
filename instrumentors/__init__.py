"""The built-in instrumentors, installed as ``autotrace.instrumentors``.

Each module holds only what is specific to its library (what to wrap, which
attributes to set) and is registered through the ``autotrace.instrumentors``
entry-point group, exactly like a third-party plugin.
"""
