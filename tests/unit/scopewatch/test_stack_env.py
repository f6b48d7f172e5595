"""The environment `scopewatch up` gives its children (``settings_env``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scopewatch.stack.stack import settings_env
from stream_jobs.runtime.settings import Settings


def test_children_get_every_setting_but_a_default_pager_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A default pager group must not reach the pager as SCOPEWATCH_PAGER_GROUP: that variable
    overrides the `group` its routes file names."""
    monkeypatch.delenv("SCOPEWATCH_PAGER_GROUP", raising=False)
    env = settings_env(Settings(home=tmp_path, grace_seconds=7))
    assert "SCOPEWATCH_PAGER_GROUP" not in env
    assert env["SCOPEWATCH_GRACE_SECONDS"] == "7.0"
    assert env["SCOPEWATCH_WORKER_GROUP"] == "scopewatch-decisions", "defaults of other settings still go"


def test_an_explicit_pager_group_reaches_the_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCOPEWATCH_PAGER_GROUP", raising=False)
    assert settings_env(Settings(home=tmp_path, pager_group="soc-pager"))["SCOPEWATCH_PAGER_GROUP"] == "soc-pager"
    monkeypatch.setenv("SCOPEWATCH_PAGER_GROUP", "from-env")
    assert settings_env(Settings(home=tmp_path))["SCOPEWATCH_PAGER_GROUP"] == "from-env"
