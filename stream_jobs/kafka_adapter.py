"""The runner's :class:`~stream_jobs.runner.Consumer` over aiokafka.

A group member with explicit commits (no auto-commit), our own assignor, optional static
membership (``group_instance_id``: a restart reclaims its partitions at once) with an explicit
leave on an orderly stop (aiokafka sends none for a static member, so its partitions would wait a
whole session timeout), and fetches that wait in the broker for ``fetch_min_bytes`` or
``fetch_max_wait_ms`` (the 1-byte default sends a fetch request every few messages).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from stream_jobs.runner import TP, CommitFailed, Listener, Record

FETCH_MIN_BYTES = 64 * 1024
FETCH_WAIT_MS = 40


class _Hooks(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.listener.revoked({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.listener.assigned({(tp.topic, tp.partition) for tp in assigned})


class KafkaConsumer:
    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: Sequence[str],
        *,
        assignor: Any = None,
        instance_id: str | None = None,
        session_timeout: float = 30.0,
        fetch_min_bytes: int = FETCH_MIN_BYTES,
        fetch_max_wait_ms: int = FETCH_WAIT_MS,
        max_partition_fetch_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.topics = list(topics)
        session_ms = int(session_timeout * 1000)
        options: dict[str, Any] = {
            "bootstrap_servers": bootstrap,
            "group_id": group,
            "group_instance_id": instance_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": session_ms,
            "heartbeat_interval_ms": min(3000, session_ms // 3),
            "fetch_min_bytes": fetch_min_bytes,
            "fetch_max_wait_ms": fetch_max_wait_ms,
            "max_partition_fetch_bytes": max_partition_fetch_bytes,
        }
        if assignor is not None:
            options["partition_assignment_strategy"] = (assignor,)
        self._options = options
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: dict[TP, TopicPartition] = {}

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "start() first"
        return self._consumer

    def _tp(self, tp: TP) -> TopicPartition:
        out = self._tps.get(tp)
        if out is None:
            out = self._tps[tp] = TopicPartition(*tp)
        return out

    def new(self) -> AIOKafkaConsumer:
        """The aiokafka consumer these options make (not started; call inside the running loop)."""
        return AIOKafkaConsumer(**self._options)

    async def start(self, listener: Listener) -> None:
        self._consumer = self.new()
        await self._consumer.start()
        self._consumer.subscribe(self.topics, listener=_Hooks(listener))

    async def getmany(self, timeout_ms: int, max_records: int) -> Mapping[TP, Sequence[Record]]:
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return {(tp.topic, tp.partition): records for tp, records in batches.items()}

    async def commit(self, offsets: Mapping[TP, int]) -> None:
        try:
            await self.consumer.commit({self._tp(tp): offset for tp, offset in offsets.items()})
        except (CommitFailedError, IllegalStateError) as exc:  # the group moved the partitions meanwhile
            raise CommitFailed(f"{type(exc).__name__}: {exc}") from exc

    def seek(self, tp: TP, offset: int) -> None:
        self.consumer.seek(self._tp(tp), offset)

    def pause(self, tps: Iterable[TP]) -> None:
        self.consumer.pause(*map(self._tp, tps))

    def resume(self, tps: Iterable[TP]) -> None:
        self.consumer.resume(*map(self._tp, tps))

    async def committed(self, tp: TP) -> int | None:
        """The group's committed offset of ``tp`` (None: none yet)."""
        offset: int | None = await self.consumer.committed(self._tp(tp))
        return offset

    async def lag(self) -> dict[str, int]:
        """Per topic, the high watermark minus the committed offset, over the assigned partitions."""
        lag: dict[str, int] = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            committed = await self.consumer.committed(tp)
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - (committed or 0))
        return lag

    def assignment(self) -> set[TP]:
        if self._consumer is None:
            return set()
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        leave_on_stop(consumer)
        await consumer.stop()


def leave_on_stop(consumer: Any) -> None:
    """Make an aiokafka consumer's stop send a LeaveGroup even when it is a static member.

    aiokafka sends none for a member with a group instance id, so its partitions would wait a whole
    session timeout for the next owner; an orderly stop should hand them over at once (a restart
    after a crash still reclaims the slot by its instance id). Call just before ``stop()``.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None:
        coordinator._group_instance_id = None
