"""The collectors' spools as the sink's metrics see them (scopewatch/spools.py; no services)."""

from __future__ import annotations

from pathlib import Path

from scopewatch.spools import spool_dirs


def test_spool_dirs_follow_the_collectors_settings(tmp_path: Path) -> None:
    assert spool_dirs({"SCOPEWATCH_HOME": str(tmp_path)}) == [tmp_path.resolve() / "spool"]
    assert spool_dirs({"SCOPEWATCH_SPOOL_DIR": str(tmp_path / "s")}) == [(tmp_path / "s").resolve()]
    (tmp_path / "other" / "spool").mkdir(parents=True)
    env = {"SCOPEWATCH_HOME": str(tmp_path)}
    assert spool_dirs(env, tmp_path / "other") == [tmp_path.resolve() / "spool", (tmp_path / "other/spool").resolve()]
    assert spool_dirs(env, tmp_path) == [tmp_path.resolve() / "spool"]  # the same one once
