"""The in-memory :class:`~chainfold.log.EventLog`: same contract as the Pulsar log, no broker (unit tests)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator

from . import Entry, EventLog, LogReader, MessageId, full_topic_name
from ..errors import BadInput

__all__ = ["MemoryLog"]


class _MemoryReader(LogReader):
    def __init__(self, entries: list[Entry], redeliver_every: int, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._entries = entries
        self._redeliver_every = redeliver_every

    def _raw(self) -> Iterator[Entry]:
        entries = self._entries
        every = self._redeliver_every
        i = 0
        while i < len(entries) or self.follow:  # sees appends made while reading, like a broker reader
            if i >= len(entries):
                time.sleep(0.01)  # following: wait for another thread's appends
                continue
            yield entries[i]
            if every and i % every == every - 1:
                yield entries[i]  # re-delivery, as pulsar-lite does
                if i > 0:
                    yield entries[i - 1]
            i += 1


class MemoryLog(EventLog):
    """An in-memory log for unit tests: same contract as the Pulsar log, no broker.

    ``partitions=N`` (N > 0) makes a partitioned topic whose messages are routed by a hash of the key.
    ``redeliver_every=K`` makes readers re-deliver every K-th entry (and its predecessor) to exercise
    the duplicate filter. Message ids are ``0:<index>:<partition>:-1``.
    """

    def __init__(self, topic: str = "memory", *, partitions: int = 0, redeliver_every: int = 0) -> None:
        self.topic = full_topic_name(topic)
        self._n = partitions
        self._redeliver_every = redeliver_every
        names = [f"{self.topic}-partition-{i}" for i in range(partitions)] or [self.topic]
        self._parts: dict[str, list[Entry]] = {name: [] for name in names}
        self._clock = 1_700_000_000_000

    def partitions(self) -> list[str]:
        return list(self._parts)

    def exists(self) -> bool:
        return True

    def _resolve(self, partition: str | None) -> str:
        if partition is None:
            if len(self._parts) != 1:
                raise BadInput(f"{self.topic} is partitioned: name a partition")
            return next(iter(self._parts))
        if partition not in self._parts:
            raise BadInput(f"no partition {partition!r} in {self.topic}")
        return partition

    def read(self, partition: str | None = None, **kw: object) -> LogReader:  # type: ignore[override]
        name = self._resolve(partition)
        return _MemoryReader(self._parts[name], self._redeliver_every, **kw)

    def append_payloads(self, items: Iterable[tuple[bytes, str | None, int | None]]) -> list[MessageId]:
        ids = []
        names = list(self._parts)
        for payload, key, event_time in items:
            if self._n:
                p = zlib.crc32((key or "").encode()) % self._n
                name = names[p]
            else:
                p, name = -1, names[0]
            entries = self._parts[name]
            self._clock += 1
            mid = MessageId(0, len(entries), p, -1)
            entries.append(Entry(mid, key, self._clock, event_time, bytes(payload)))
            ids.append(mid)
        return ids

    # test helpers: rewrite history the way faults do --------------------------------------------

    def entries(self, partition: str | None = None) -> list[Entry]:
        """The stored entries of one partition (a copy)."""
        return list(self._parts[self._resolve(partition)])
