"""schema_entries: what a reader that decodes message bodies itself needs (the sink's columnar path)."""

from __future__ import annotations

import json

from schemas import ToolResult, register_schema
from schemas.codec import AVRO_DIR, MODELS, fingerprint_of, schema_entries


def test_every_shipped_schema_is_listed_as_current_with_its_source() -> None:
    entries = {e.fingerprint: e for e in schema_entries()}
    for stem, model in MODELS.items():
        entry = entries[fingerprint_of(stem)]
        assert entry.model is model and entry.current
        assert entry.schema == json.loads((AVRO_DIR / f"{stem}.avsc").read_text())


def test_an_older_registered_version_is_listed_but_not_current() -> None:
    older = json.loads((AVRO_DIR / "tool_result.avsc").read_text())
    older["fields"] = [f for f in older["fields"] if f["name"] != "result_digest"]
    fingerprint = register_schema(older, ToolResult)
    entry = next(e for e in schema_entries() if e.fingerprint == fingerprint)
    assert entry.model is ToolResult and not entry.current and entry.schema == older
    entry.schema["fields"].clear()  # a copy: the registry keeps its own
    assert next(e for e in schema_entries() if e.fingerprint == fingerprint).schema == older
