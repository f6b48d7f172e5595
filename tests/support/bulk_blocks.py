"""Evidence bulk blocks for the transcoder's unit tests (its `built` fixture: tests/unit/stream_jobs/conftest.py)."""

from __future__ import annotations

from stream_jobs.bulk import AvroBulk, BulkBlock, bulk_specs


class Msg:
    """What a bulk block reads of a Kafka message besides its value: the offset."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


def evidence_spec() -> AvroBulk:
    return next(s for s in bulk_specs().values() if s.table == "evidence")


def evidence_block(values: list[bytes]) -> BulkBlock:
    """``values`` as one partition's run of evidence messages (offsets from 2**40)."""
    block = BulkBlock(evidence_spec())
    prefix = block.prefix("audit.evidence", 3)
    for offset, value in enumerate(values):
        block.add(Msg(2**40 + offset), value, prefix)
    return block
