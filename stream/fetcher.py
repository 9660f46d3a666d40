"""The poll thread's side of ``serve``: the group consumer, and nothing else touches it.

:class:`Fetcher` polls and hands records to the worker; it pauses every partition when the worker's queue holds
``max_queued_records`` and resumes below half of that (it never stops polling, so the member is never removed
from the group for a slow stage); it seeks and resumes partitions the worker restored; it passes the offsets the
worker made durable to the :class:`OffsetCommitter`; and it keeps the lag gauges. The rebalance listener
(:func:`rebalance_listener`, on kafka-python's IO thread) turns assignments and revocations into worker commands.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tidecast.monitors.metrics import Metrics
from tidecast.stream.health import Heartbeat, Readiness
from tidecast.stream.kafka import HighwaterProbe
from tidecast.stream.messages import (
    AbandonPartitions,
    AssignPartitions,
    CommitOffsets,
    FetchedRecords,
    PartitionRestored,
    ReleasePartitions,
)
from tidecast.stream.worker import Worker

log = logging.getLogger(__name__)


class OffsetCommitter:
    """Commits offsets the worker made durable: forward only, and only for partitions still assigned in the epoch
    they were checkpointed in. Poll thread only (the consumer is not thread-safe)."""

    def __init__(self, consumer: Any, topic: str, metrics: Metrics, epochs: dict[int, int]) -> None:
        self.consumer = consumer
        self.topic = topic
        self.metrics = metrics
        self.epochs = epochs
        self._committed: dict[int, int] = {}

    def commit(self, request: CommitOffsets) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        assigned = self.consumer.assignment()
        todo = {}
        for p, offset in request.offsets.items():
            tp = TopicPartition(self.topic, p)
            current = self.epochs.get(p, 0) == request.epochs.get(p)
            if tp in assigned and current and offset > self._committed.get(p, -1):
                todo[tp] = OffsetAndMetadata(offset, "", -1)
        if not todo:
            return
        try:
            self.consumer.commit(todo, timeout_ms=10_000)
        except Exception as err:  # e.g. a rebalance started: the revoke path commits instead
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); the next checkpoint retries", err)
            return
        self.metrics.commits.inc()
        for tp, om in todo.items():
            self._committed[tp.partition] = om.offset

    def forget(self, partition: int) -> None:
        self._committed.pop(partition, None)


class Fetcher:
    """One :meth:`poll_once` per turn of the poll loop; the rebalance callbacks land here too."""

    def __init__(self, cfg: Any, consumer: Any, worker: Worker, outbox: queue.Queue, epochs: dict[int, int],
                 readiness: Readiness, probe: HighwaterProbe, metrics: Metrics,
                 heartbeat: Heartbeat | None = None) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.worker = worker
        self.outbox = outbox
        self.epochs = epochs
        self.readiness = readiness  # also the set of partitions waiting for the worker's restore
        self.probe = probe
        self.metrics = metrics
        self.heartbeat = heartbeat or Heartbeat()
        self.committer = OffsetCommitter(consumer, cfg.topic, metrics, epochs)
        self._enqueued = 0
        self._dropped_from: dict[int, int] = {}  # restoring partition -> first offset fetched and dropped
        self._backpressure = False
        self._gauges_at = 0.0
        self._lag_partitions: set[int] = set()
        self._rate_mark = (time.monotonic(), 0)

    def poll_once(self) -> None:
        self.heartbeat.tick()
        polled = self.consumer.poll(timeout_ms=100)
        for tp, records in polled.items():
            if not records:
                continue
            if self.readiness.is_restoring(tp.partition):  # not expected (paused); never lose them: seek back
                self._dropped_from.setdefault(tp.partition, records[0].offset)
                continue
            self.worker.inbox.put(FetchedRecords(tp.partition, self.epochs.get(tp.partition, 0), records))
            self._enqueued += len(records)
            self.metrics.consumer_records.inc(len(records))
        self.drain()
        self._apply_backpressure()
        self._update_gauges()

    def drain(self) -> None:
        """Act on what the worker reported: restored partitions, durable offsets."""
        while True:
            try:
                message = self.outbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, PartitionRestored):
                self._on_restored(message)
            elif isinstance(message, CommitOffsets):
                self.committer.commit(message)

    def pause_all(self) -> None:
        self.consumer.pause(*self.consumer.assignment())

    def _on_restored(self, restored: PartitionRestored) -> None:
        from kafka import TopicPartition

        p = restored.partition
        tp = TopicPartition(self.cfg.topic, p)
        if tp not in self.consumer.assignment() or self.epochs.get(p, 0) != restored.epoch:
            return  # revoked while restoring
        dropped = self._dropped_from.pop(p, None)
        position = restored.position if restored.position is not None else dropped
        if position is not None:
            self.consumer.seek(tp, position)
        self.readiness.end_restore(p)
        if not self._backpressure:
            self.consumer.resume(tp)

    def _apply_backpressure(self) -> None:
        queued = self._enqueued - self.worker.dequeued
        self.metrics.queued_records.set(queued)
        high = self.cfg.max_queued_records
        if not self._backpressure and queued >= high:
            self._backpressure = True
            self.pause_all()
        elif self._backpressure and queued <= high // 2:
            self._backpressure = False
            resumable = [tp for tp in self.consumer.assignment() if not self.readiness.is_restoring(tp.partition)]
            self.consumer.resume(*resumable)

    def _update_gauges(self) -> None:
        now = time.monotonic()
        if now - self._gauges_at < 0.25:
            return
        self._gauges_at = now
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 1.0:
            self.metrics.consumer_rate.set((self.worker.processed - mark_n) / (now - mark_t))
            self._rate_mark = (now, self.worker.processed)
        assigned = set(self.consumer.assignment())
        paused = self.consumer.paused()
        self.metrics.assigned_partitions.set(len(assigned))
        self.metrics.paused_partitions.set(len(paused & assigned))
        positions = {}
        for tp in assigned:
            if self.readiness.is_restoring(tp.partition):
                continue
            try:
                positions[tp.partition] = self.consumer.position(tp, timeout_ms=1_000)
            except Exception:  # e.g. revoked meanwhile; the gauge catches up on the next round
                continue
        paused_ids = {tp.partition for tp in paused}
        self.probe.want({p: pos for p, pos in positions.items() if p in paused_ids})
        current = set()
        for tp in assigned:
            pos = positions.get(tp.partition)
            highs = [h for h in (self.consumer.highwater(tp), self.probe.highwater(tp.partition)) if h is not None]
            if pos is None or not highs:
                continue
            self.metrics.consumer_lag.labels(partition=str(tp.partition)).set(max(0, max(highs) - pos))
            current.add(tp.partition)
        for p in self._lag_partitions - current:  # bounded labels: assigned partitions only
            self.metrics.consumer_lag.remove(str(p))
        self._lag_partitions = current

    # -- rebalance callbacks (kafka-python's IO thread) ---------------------------------------------------------
    def on_assigned(self, partitions: set[int]) -> None:
        """Pause the new partitions and let the worker restore them; the poll thread seeks and resumes."""
        from kafka import TopicPartition

        self.metrics.rebalances.inc()
        self.consumer.pause(*[TopicPartition(self.cfg.topic, p) for p in partitions])
        self.readiness.begin_restore(partitions)
        assignment = frozenset(tp.partition for tp in self.consumer.assignment())
        epochs = {p: self.epochs.get(p, 0) for p in partitions}
        self.worker.inbox.put(AssignPartitions(frozenset(partitions), assignment, epochs))

    def begin_release(self, partitions: set[int]) -> ReleasePartitions:
        self._forget_locally(partitions)
        release = ReleasePartitions(frozenset(partitions))
        self.worker.inbox.put(release)
        return release

    def on_lost(self, partitions: set[int]) -> None:
        self._forget_locally(partitions)
        self.worker.inbox.put(AbandonPartitions(frozenset(partitions)))

    def _forget_locally(self, partitions: set[int]) -> None:
        for p in partitions:
            self.epochs[p] = self.epochs.get(p, 0) + 1  # queued records of p become stale
            self.readiness.end_restore(p)
            self._dropped_from.pop(p, None)
            self.committer.forget(p)

    def release_deadline(self, stopping: bool) -> float:
        """When the revoke listener stops waiting for the worker's checkpoint (monotonic time)."""
        budget = max(1.0, min(self.cfg.max_poll_interval_ms / 1000 / 2, 60.0))
        if stopping:  # shutting down: stay inside the shutdown budget
            budget = min(budget, self.cfg.shutdown_timeout * 0.75)
        return time.monotonic() + budget


def rebalance_listener(fetcher: Fetcher, stopping: threading.Event, worker_failed: Callable[[], bool]) -> Any:
    """An async rebalance listener: it awaits the worker's checkpoint without blocking heartbeats.

    kafka-python 3 runs listeners on its IO thread, where a blocking call (or a blocking consumer API) would
    stall heartbeats or raise; an async listener may ``await``. Waiting for another thread needs a sleep the
    client's own event loop understands: ``KernelEvent("_sleep", s)`` from ``kafka.net.selector`` (3.0.x).
    """
    from kafka import AsyncConsumerRebalanceListener
    from kafka.net.selector import KernelEvent
    from kafka.structs import OffsetAndMetadata, TopicPartition

    metrics = fetcher.metrics

    class Listener(AsyncConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked: set) -> None:
            partitions = {tp.partition for tp in revoked}
            if not partitions:
                return
            release = fetcher.begin_release(partitions)
            deadline = fetcher.release_deadline(stopping.is_set())
            while not release.done.is_set():
                late = time.monotonic() > deadline or worker_failed()
                if late and release.abandon():
                    log.warning("worker did not checkpoint revoked partitions %s in time; not committing",
                                sorted(partitions))
                    return
                await KernelEvent("_sleep", 0.01)  # yields to kafka-python's loop: heartbeats go on
            offsets = {TopicPartition(fetcher.cfg.topic, p): OffsetAndMetadata(o, "", -1)
                       for p, o in release.offsets.items()}
            if not offsets:
                return
            try:
                await fetcher.consumer.commit_async(offsets)
                metrics.commits.inc()
            except Exception as err:
                metrics.commit_failures.inc()
                log.warning("commit of revoked partitions failed: %s", err)

        async def on_partitions_assigned(self, assigned: set) -> None:
            if assigned:
                fetcher.on_assigned({tp.partition for tp in assigned})

        async def on_partitions_lost(self, lost: set) -> None:
            if lost:
                fetcher.on_lost({tp.partition for tp in lost})

    return Listener()
