"""Fixtures shared by every suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where Kafka jars and npm servers are cached (shared with `scopewatch up`)."""
    base = os.environ.get("SCOPEWATCH_CACHE_DIR")
    if base:
        return Path(base).resolve()
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scopewatch").resolve()
