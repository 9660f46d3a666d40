"""Typed messages between serve's threads (see :mod:`tidecast.stream.serve` for who runs where).

Poll thread and rebalance listener -> worker (its inbox, in order): :class:`FetchedRecords`,
:class:`AssignPartitions`, :class:`ReleasePartitions`, :class:`AbandonPartitions`, :class:`RewindPartition`,
:class:`Stop`.
Worker -> poll thread (its outbox): :class:`PartitionRestored`, :class:`CommitOffsets`.

An *epoch* counts how often a partition left this member: records fetched before a revocation carry the old epoch,
so the worker drops them instead of applying them to state it no longer owns.

>>> release = ReleasePartitions(frozenset({0}))
>>> release.abandon(), release.start()  # the listener gave up first: the worker must not checkpoint
(True, False)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from tidecast.stream.kafka_source import DecodedRecords


@dataclass(frozen=True)
class FetchedRecords:
    """Records of one input partition, as polled: kafka-python ``ConsumerRecord`` objects, or what a fetch process
    decoded them to already (a :class:`~tidecast.stream.kafka_source.DecodedRecords`)."""

    partition: int
    epoch: int
    records: Any

    @property
    def count(self) -> int:
        """How many records."""
        return self.records.count if isinstance(self.records, DecodedRecords) else len(self.records)


@dataclass(frozen=True)
class AssignPartitions:
    """Partitions newly assigned to this member: restore their state. ``assignment`` is the member's whole
    assignment after the rebalance (released partitions outside it are freed)."""

    partitions: frozenset[int]
    assignment: frozenset[int]
    epochs: dict[int, int]


@dataclass(frozen=True)
class AbandonPartitions:
    """Partitions lost without a clean handover: forget them, write nothing."""

    partitions: frozenset[int]


@dataclass
class ReleasePartitions:
    """Revoked partitions: a final checkpoint, unless the listener gave up waiting first.

    The listener waits on ``done``; the worker fills ``offsets`` (partition -> offset safe to commit).
    ``start`` and ``abandon`` race under a lock, so exactly one side wins: the worker checkpoints, or the
    listener returns without committing and the worker forgets the partitions without writing.
    """

    partitions: frozenset[int]
    offsets: dict[int, int] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    #: Whether the partitions' state may stay in memory in case they come straight back (eager rebalancing: the
    #: assignment that follows says). Cooperative rebalancing revokes only what moves, and no assignment follows a
    #: revocation alone, so kept state held its rows for good (new series refused as unknown_series).
    keep: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _state: str = field(default="pending", init=False)

    def start(self) -> bool:
        """Worker side: True if it may still checkpoint."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "started"
            return True

    def abandon(self) -> bool:
        """Listener side: True if the worker had not started, so nothing will be written."""
        with self._lock:
            if self._state == "pending":
                self._state = "abandoned"
                return True
            return False


@dataclass(frozen=True)
class RewindPartition:
    """``partition``'s log went back under the consumer: its position lay past the log end and the poll thread
    sought it to ``offset``, or the consumer itself reset to ``offset`` (kafka-python does after OffsetOutOfRange).
    The topic was recreated or its log truncated; the worker continues the partition at ``offset``."""

    partition: int
    epoch: int
    offset: int


@dataclass(frozen=True)
class Stop:
    """The worker's last message: return from its loop."""


@dataclass(frozen=True)
class PartitionRestored:
    """The worker restored ``partition``: seek it to ``position`` (``None``: keep the committed offset) and
    resume it, if it is still assigned in ``epoch``."""

    partition: int
    position: int | None
    epoch: int


@dataclass(frozen=True)
class CommitOffsets:
    """Offsets the worker made durable (partition -> next offset), with the epochs they belong to."""

    offsets: dict[int, int]
    epochs: dict[int, int]


WorkerCommand = AssignPartitions | ReleasePartitions | AbandonPartitions | RewindPartition
