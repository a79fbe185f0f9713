"""A program that imports the six instrumented libraries and exits.

The runner measures process wall time and peak RSS; the in-process import time
is printed too.
"""
import json
import time

t0 = time.perf_counter()
import redis  # noqa: E402,F401
import requests  # noqa: E402,F401
from celery import Celery  # noqa: E402,F401
from fastapi import FastAPI  # noqa: E402,F401
from flask import Flask  # noqa: E402,F401
from sqlalchemy import create_engine  # noqa: E402,F401

print(json.dumps({"workload": "startup_imports", "import_ms": (time.perf_counter() - t0) * 1e3}))
