"""Shared test support: the OTLP receiver, service checks and subprocess helpers."""
