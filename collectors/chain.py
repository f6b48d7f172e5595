"""Collector chain stamping: ``collector = {id, epoch, seq, prev_hash}`` on every event.

Each record's hash covers its canonical JSON, which includes the previous record's hash,
so an edited, deleted or reordered record breaks the chain and a missing sequence number
shows a lost event (checked by ``scopewatch verify``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, cast

from schemas import Collector, Event, record_hash

E = TypeVar("E", bound=Event)


__all__ = ["ChainStamper", "record_hash"]


@dataclass
class ChainStamper:
    """Stamps events of one collector epoch in the order they are emitted."""

    collector_id: str
    epoch: int
    seq: int = 0
    prev_hash: str | None = field(default=None)

    def stamp(self, event: E) -> E:
        self.seq += 1
        collector = Collector(id=self.collector_id, epoch=self.epoch, seq=self.seq, prev_hash=self.prev_hash)
        stamped = cast(E, event.model_copy(update={"collector": collector}))
        self.prev_hash = record_hash(stamped)
        return stamped
