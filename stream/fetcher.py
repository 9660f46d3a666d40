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
from tidecast.stream.fetch_process import Chunk, FetchProcess
from tidecast.stream.health import Heartbeat, Readiness
from tidecast.stream.kafka import BrokerLink, HighwaterProbe, is_unavailable
from tidecast.stream.messages import (
    AbandonPartitions,
    AssignPartitions,
    CommitOffsets,
    FetchedRecords,
    PartitionRestored,
    ReleasePartitions,
    RewindPartition,
)
from tidecast.stream.worker import Worker

log = logging.getLogger(__name__)


class OffsetCommitter:
    """Commits offsets the worker made durable: forward only, and only for partitions still assigned in the epoch
    they were checkpointed in. Poll thread only (the consumer is not thread-safe)."""

    def __init__(self, consumer: Any, topic: str, metrics: Metrics, epochs: dict[int, int],
                 link: BrokerLink | None = None) -> None:
        self.consumer = consumer
        self.topic = topic
        self.metrics = metrics
        self.epochs = epochs
        self.link = link
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
            if self.link is not None and is_unavailable(err):
                self.link.failed("committing offsets", err, enforce=False)
            log.warning("offset commit failed (%s); the next checkpoint retries", err)
            return
        if self.link is not None:
            self.link.ok()
        self.metrics.commits.inc()
        for tp, om in todo.items():
            self._committed[tp.partition] = om.offset

    def forget(self, partition: int) -> None:
        self._committed.pop(partition, None)


class Fetcher:
    """One :meth:`poll_once` per turn of the poll loop; the rebalance callbacks land here too.

    Two watches besides. A partition's log going back under the consumer is said loudly (an error log and
    ``tidecast_consumer_offset_resets_total``) and handed to the worker before the records from there
    (:class:`RewindPartition`: it stops skipping offsets its series applied in the old log): a position that stays
    past the log end (the topic was recreated, e.g. by a broker that lost its data; the fetches return nothing,
    forever, and the lag reads 0) is reset per ``auto_offset_reset``, and records below the offset the poll thread
    expects next mean the consumer reset itself (kafka-python does after OffsetOutOfRange). And when no other
    operation reached the cluster for a while, a cheap request checks that it is still reachable
    (``tidecast_broker_up`` follows an outage even while nothing is written), within the outage budget of the
    :class:`BrokerLink`.
    """

    PAST_END_SECONDS = 1.0  # how long a position must stay past the log end (stale highwater after a seek)
    PROBE_SECONDS = 5.0  # how quiet the link must be before the poll thread probes the cluster

    #: With a fetch process, how often the group consumer is polled (membership only: its partitions stay paused).
    GROUP_POLL_SECONDS = 0.05

    def __init__(self, cfg: Any, consumer: Any, worker: Worker, outbox: queue.Queue, epochs: dict[int, int],
                 readiness: Readiness, probe: HighwaterProbe, metrics: Metrics,
                 heartbeat: Heartbeat | None = None, link: BrokerLink | None = None,
                 fetch_process: FetchProcess | None = None) -> None:
        self.cfg = cfg
        self.consumer = consumer
        # Where records come from: the group consumer itself, or a fetch process (--fetch-process) that answers the
        # same calls (poll, pause, resume, seek, position, highwater, paused) while the group consumer, all
        # partitions paused, keeps the membership and commits.
        self.fetch_process = fetch_process
        self.data: Any = fetch_process if fetch_process is not None else consumer
        self._group_polled = 0.0
        self.worker = worker
        self.outbox = outbox
        self.epochs = epochs
        self.readiness = readiness  # also the set of partitions waiting for the worker's restore
        self.probe = probe
        self.metrics = metrics
        self.heartbeat = heartbeat or Heartbeat()
        self.link = link
        self.committer = OffsetCommitter(consumer, cfg.topic, metrics, epochs, link)
        self._past_end: dict[int, float] = {}  # partition -> since when its position is past the log end
        self._expected: dict[int, int] = {}  # partition -> offset the next fetched record should have (or more)
        self._enqueued = 0
        self._dropped_from: dict[int, int] = {}  # restoring partition -> first offset fetched and dropped
        self._backpressure = False
        self._gauges_at = 0.0
        self._lag_partitions: set[int] = set()
        self._rate_mark = (time.monotonic(), 0)

    def poll_once(self) -> None:
        self.heartbeat.tick()
        if not self.readiness.started and _joined(self.consumer) and not self.consumer.assignment():
            # joined with nothing assigned: cooperative-sticky calls no listener for an empty assignment, and a
            # spare member (more members than partitions) must be ready too (with partitions the listener marks
            # it, after their restore has begun)
            self.readiness.mark_started()
        wait_ms = 100
        if self.fetch_process is not None:
            # The membership: nothing to fetch, every partition is paused here. A join or rejoin needs polls that
            # wait, back to back (with 1 ms polls a join took 7-20 s against 4.5 s); a settled member's poll returns
            # at once, every GROUP_POLL_SECONDS.
            settled = _settled(self.consumer)
            if not settled or time.monotonic() - self._group_polled >= self.GROUP_POLL_SECONDS:
                self.consumer.poll(timeout_ms=1 if settled else 100)
                self._group_polled = time.monotonic()
            wait_ms = 100 if settled else 10
        polled = self.data.poll(timeout_ms=wait_ms)  # a fetch process answers (partition, chunk) pairs in arrival order
        for tp, records in (polled.items() if isinstance(polled, dict) else polled):
            if not records:
                continue
            first, end, count, epoch, payload = self._span(tp.partition, records)
            if self.readiness.is_restoring(tp.partition):  # not expected (paused); never lose them: seek back
                if self.fetch_process is None:  # (a fetch process's chunk from before the restore is stale)
                    self._dropped_from.setdefault(tp.partition, first)
                continue
            expected = self._expected.get(tp.partition)
            if expected is not None and first < expected:
                self._rewound(tp.partition, f"the consumer went back from offset {expected} to "
                                            f"{first} (it resets after OffsetOutOfRange)", first)
            self._expected[tp.partition] = end
            self.worker.inbox.put(FetchedRecords(tp.partition, epoch, payload))
            self._enqueued += count
            self.metrics.consumer_records.inc(count)
            self.metrics.last_record.set(time.time())
        self.drain()
        self._apply_backpressure()
        self._update_gauges()
        self._probe_cluster()

    def _span(self, partition: int, records: Any) -> tuple[int, int, int, int, Any]:
        """A poll's records of one partition: first offset, the offset after the last, how many, their epoch, and
        what the worker gets (the records, or what a fetch process decoded them to, with the epoch its fetch of
        the partition began in)."""
        if isinstance(records, Chunk):
            return records.first, records.next, records.count, records.epoch, records.decoded
        epoch = self.epochs.get(partition, 0)
        return records[0].offset, records[-1].offset + 1, len(records), epoch, records

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
        assignment = self.consumer.assignment()
        self.consumer.pause(*assignment)
        if self.fetch_process is not None:
            self.fetch_process.pause(*assignment)

    def _on_restored(self, restored: PartitionRestored) -> None:
        from kafka import TopicPartition

        p = restored.partition
        tp = TopicPartition(self.cfg.topic, p)
        if tp not in self.consumer.assignment() or self.epochs.get(p, 0) != restored.epoch:
            return  # revoked while restoring
        dropped = self._dropped_from.pop(p, None)
        position = restored.position if restored.position is not None else dropped
        if position is not None:
            self.data.seek(tp, position)
            self._expected[p] = position
        self.readiness.end_restore(p)
        if not self._backpressure:
            self.data.resume(tp)

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
            self.data.resume(*resumable)

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
        paused = self.data.paused()
        self.metrics.assigned_partitions.set(len(assigned))
        self.metrics.paused_partitions.set(len(paused & assigned))
        positions = {}
        for tp in assigned:  # restoring ones too: their backlog (from the committed offset) is what waits
            try:
                positions[tp.partition] = self.data.position(tp, timeout_ms=1_000)
            except Exception:  # e.g. revoked meanwhile; the gauge catches up on the next round
                continue
        paused_ids = {tp.partition for tp in paused}
        # A fetch process reports the highwater of its last fetch of each partition, fresh within its back-pressure
        # pauses (a fraction of a second): probing them here would parse fetches in the engine's interpreter.
        probed = {} if self.fetch_process is not None else positions
        self.probe.want({p: pos for p, pos in probed.items() if p in paused_ids})
        current = set()
        for tp in assigned:
            pos = positions.get(tp.partition)
            fetched_end = self.data.highwater(tp)
            if pos is not None and tp not in paused:
                pos = self._watch_log_end(tp, pos, fetched_end, now)
            highs = [h for h in (fetched_end, self.probe.highwater(tp.partition)) if h is not None]
            if pos is None or not highs:
                continue
            self.metrics.consumer_lag.labels(partition=str(tp.partition)).set(max(0, max(highs) - pos))
            current.add(tp.partition)
        for p in self._lag_partitions - current:  # bounded labels: assigned partitions only
            self.metrics.consumer_lag.remove(str(p))
        self._lag_partitions = current

    def _watch_log_end(self, tp: Any, position: int, log_end: int | None, now: float) -> int:
        """Reset a position that stays past the log end; returns the position to report."""
        p = tp.partition
        if log_end is None or position <= log_end:
            self._past_end.pop(p, None)
            return position
        since = self._past_end.setdefault(p, now)
        if now - since < self.PAST_END_SECONDS:
            return position
        del self._past_end[p]
        target = 0 if self.cfg.auto_offset_reset == "earliest" else log_end
        self._rewound(p, f"position {position} is past the log end {log_end}, so nothing new would ever be read; "
                         f"resetting to {target} (auto_offset_reset={self.cfg.auto_offset_reset})", target)
        self.data.seek(tp, target)
        self._expected[p] = target
        return target

    def _rewound(self, p: int, what: str, offset: int) -> None:
        """Say it, count it, and tell the worker before any record from ``offset`` reaches it."""
        log.error("input partition %s[%d]: %s. The topic was recreated or its log truncated (a broker that lost its "
                  "data?); series keep their state and the engine judges the records from offset %d by their "
                  "timestamps", self.cfg.topic, p, what, offset)
        self.metrics.offset_resets.inc()
        self.worker.inbox.put(RewindPartition(p, self.epochs.get(p, 0), offset))
        self.committer.forget(p)  # the new log's offsets are lower than those committed: commit them all the same

    def _probe_cluster(self) -> None:
        """When nothing reached the cluster for a while, ask it something cheap (the committed offset of
        partition 0): an outage shows in ``tidecast_broker_up`` and counts against the budget even when idle.
        The group coordinator does not answer while the group rebalances (a join waiting out a killed member's
        session), so an unanswered probe asks partition 0's leader for its log end before it counts as an outage:
        that silence once read as one, up to stopping a healthy member. (The leader alone is no probe either:
        kafka-python retries a moved leader without refreshing its metadata until the request times out.)"""
        if self.link is None or self.link.quiet_seconds < self.PROBE_SECONDS:
            return
        from kafka import TopicPartition

        partition = TopicPartition(self.cfg.topic, 0)
        try:
            self.consumer.committed(partition, timeout_ms=2_000)
        except Exception as err:
            if not is_unavailable(err):
                log.debug("cluster probe: %s", err)
                return
            try:
                self.consumer.end_offsets([partition], timeout_ms=2_000)
            except Exception as second:
                if is_unavailable(second):
                    self.link.failed("probing the cluster", err)  # raises once the outage outlasts the budget
                    return
        self.link.ok()

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

    def on_assigned_nothing(self) -> None:
        """An eager rebalance left this member no partition (a spare member): the worker forgets the partitions it
        kept in memory at the revocation, which only a next assignment did, so their series held rows and counted
        in ``tidecast_series`` beside their new owner's until then."""
        self.worker.inbox.put(AssignPartitions(frozenset(), frozenset(), {}))

    def begin_release(self, partitions: set[int]) -> ReleasePartitions:
        self._forget_locally(partitions)
        release = ReleasePartitions(frozenset(partitions), keep=self.cfg.assignment_strategy != "cooperative-sticky")
        self.worker.inbox.put(release)
        return release

    def on_lost(self, partitions: set[int]) -> None:
        self._forget_locally(partitions)
        self.worker.inbox.put(AbandonPartitions(frozenset(partitions)))

    def _forget_locally(self, partitions: set[int]) -> None:
        if self.fetch_process is not None:
            self.fetch_process.forget(partitions)
        for p in partitions:
            self.epochs[p] = self.epochs.get(p, 0) + 1  # queued records of p become stale
            self.readiness.end_restore(p)
            self._dropped_from.pop(p, None)
            self._expected.pop(p, None)
            self._past_end.pop(p, None)
            self.committer.forget(p)

    def release_deadline(self, stopping: bool) -> float:
        """When the revoke listener stops waiting for the worker's checkpoint (monotonic time)."""
        budget = max(1.0, min(self.cfg.max_poll_interval_ms / 1000 / 2, 60.0))
        if stopping:  # shutting down: stay inside the shutdown budget
            budget = min(budget, self.cfg.shutdown_timeout * 0.75)
        return time.monotonic() + budget


def _settled(consumer: Any) -> bool:
    """Whether the group consumer holds an assignment, is a stable member and no rebalance is pending
    (kafka-python's coordinator says; a client without that answer counts as never settled)."""
    try:
        return _joined(consumer) and bool(consumer.assignment())
    except Exception:
        return False


def _joined(consumer: Any) -> bool:
    """Whether the group consumer is a stable member with no rebalance pending, holding partitions or none."""
    coordinator = getattr(consumer, "_coordinator", None)
    try:
        stable = getattr(coordinator, "state", None) == "<stable>"  # kafka.structs.MemberState.STABLE
        return stable and not coordinator.need_rejoin()
    except Exception:
        return False


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
            # Bounded like the checkpoint wait: a commit to a hanging cluster would wait out kafka-python's request
            # timeout (30 s and more), past the shutdown budget and the platform's grace period; records left
            # uncommitted are re-read and skipped after a restart.
            future = fetcher.consumer.commit_async(offsets)
            deadline = fetcher.release_deadline(stopping.is_set())
            while not future.is_done:
                if time.monotonic() > deadline:
                    metrics.commit_failures.inc()
                    log.warning("commit of revoked partitions %s not answered in time; leaving it", sorted(partitions))
                    return
                await KernelEvent("_sleep", 0.01)
            if future.exception is None:
                metrics.commits.inc()
            else:
                metrics.commit_failures.inc()
                log.warning("commit of revoked partitions failed: %s", future.exception)

        async def on_partitions_assigned(self, assigned: set) -> None:
            if assigned:
                fetcher.on_assigned({tp.partition for tp in assigned})  # their restore begins: not ready
            elif fetcher.cfg.assignment_strategy != "cooperative-sticky":  # eager: this is the whole assignment
                fetcher.on_assigned_nothing()
            fetcher.readiness.mark_started()  # joined the group (an empty assignment too: a spare member is ready)

        async def on_partitions_lost(self, lost: set) -> None:
            if lost:
                fetcher.on_lost({tp.partition for tp in lost})

    return Listener()
