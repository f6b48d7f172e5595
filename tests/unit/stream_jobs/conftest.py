"""Fixtures shared by the stream_jobs unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_jobs import rowbinary


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The transcoder built from this tree's source into a temporary folder, loaded instead of the venv's."""
    path = rowbinary.build(tmp_path_factory.mktemp("rb") / rowbinary.LIBRARY_NAME)
    mp = pytest.MonkeyPatch()
    mp.setenv("SCOPEWATCH_AVRO_ROWBINARY_LIB", str(path))
    mp.setattr(rowbinary, "_LIB", [])
    yield path
    mp.undo()
