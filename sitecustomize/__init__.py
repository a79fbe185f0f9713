"""The directory ``autotrace-run`` puts first on ``PYTHONPATH``.

It holds only ``sitecustomize.py``; it is installed as ``autotrace._sitecustomize``
so that no top-level ``sitecustomize`` module is ever installed.
"""
