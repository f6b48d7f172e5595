"""Helpers shared by the test suites (no fixtures here: see conftest.py)."""
