"""Fixtures of the collector integration tests."""

from __future__ import annotations

import pytest

from collectors.native_relay import find_binary


@pytest.fixture(params=["native", "python"])
def wrap_relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with each relay of `scopewatch wrap` forced (``SCOPEWATCH_WRAP_RELAY``).

    The native one must be built (``make install``): a test that asks for it fails without it."""
    mode = str(request.param)
    if mode == "native":
        assert find_binary() is not None, "the native relay is not built: run `make install`"
    monkeypatch.setenv("SCOPEWATCH_WRAP_RELAY", mode)
    return mode
