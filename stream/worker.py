"""The worker thread of ``serve``: it owns the :class:`~tidecast.stream.engine.Engine` (which is not thread-safe).

It reads like ``replay``: decode (:mod:`tidecast.stream.kafka_source`) -> screen by partition ownership ->
``Engine.process`` -> sinks (forecasts, drift events, dead letters) -> checkpoint
(:class:`~tidecast.stream.partitions.PartitionTable`).

Data never stops the worker. Bad input is dead-lettered with its reason before the engine sees it; if the engine
still raises on a batch, or a forecast cannot be encoded, the records concerned are dead-lettered as
``processing_error`` (with the exception in the detail), ``tidecast_processing_errors_total`` counts it, an error is
logged (with the traceback at most once a minute) and the worker goes on. That is a bug, in tidecast or in the
validation that let the record through, and the alert on the counter says so; stopping instead would turn one bad
record into a crash loop of the whole member. A series the failed batch touched keeps whatever the engine had
already changed, and is checkpointed as it is. Broker trouble is not data: a refused output
(:class:`~tidecast.stream.kafka.OutputError`) or an outage longer than the budget
(:class:`~tidecast.stream.kafka.BrokerUnavailable`) still stops the member.

Commands from the poll thread and the rebalance listener (assign, release, abandon, rewind) arrive on the same queue as
records, so they run in order with them. Model maintenance (fits, replay training) is not run here but on the
trainer thread (:class:`Trainer`), so the worker's loop never waits for a fit and its heartbeat keeps ticking.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tidecast.monitors.metrics import Metrics
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.engine import Engine
from tidecast.stream.health import Heartbeat
from tidecast.stream.kafka import BrokerUnavailable, OutputError, UnsendableForecasts
from tidecast.stream.kafka_source import (
    PROCESSING_ERROR,
    DecodedRecords,
    dead_letter,
    decode_records,
    take_records,
)
from tidecast.stream.messages import (
    AbandonPartitions,
    AssignPartitions,
    CommitOffsets,
    FetchedRecords,
    PartitionRestored,
    ReleasePartitions,
    RewindPartition,
    Stop,
    WorkerCommand,
)
from tidecast.stream.partitions import CheckpointJob, PartitionTable
from tidecast.stream.sinks import DeadLetterSink, EventSink, ForecastSink
from tidecast.stream.sources import DeadLetter
from tidecast.stream.state import IncompatibleState

log = logging.getLogger(__name__)

#: The changelog budget postpones a checkpoint by at most this many checkpoint intervals, so that a trickle of
#: records is still made durable (5 minutes with the default interval of 10 s).
BUDGET_WAIT_INTERVALS = 30


def checkpoint_deadline(cfg: Any) -> float:
    """Seconds a checkpoint may be postponed while records keep arriving: ``checkpoint_interval``, or
    ``BUDGET_WAIT_INTERVALS`` of them when the changelog budget can postpone it. A checkpoint older than this on a
    consuming member is stale (the TidecastCheckpointStale alert compares the two)."""
    budget = getattr(cfg, "changelog_bytes_per_record", 0)
    return cfg.checkpoint_interval * (BUDGET_WAIT_INTERVALS if budget else 1)


class Worker(threading.Thread):
    """Everything that touches the engine runs here, in queue order.

    Reads ``cfg.batch_size``, ``cfg.max_record_bytes``, ``cfg.checkpoint_records`` and ``cfg.checkpoint_interval``.
    ``epochs`` (partition -> epoch) is written by the poll thread and the rebalance listener: records fetched in an
    older epoch are dropped.
    """

    def __init__(self, cfg: Any, engine: Engine, table: PartitionTable, forecasts: ForecastSink,
                 dead_letters: DeadLetterSink, outbox: queue.Queue, metrics: Metrics,
                 epochs: dict[int, int] | None = None, heartbeat: Heartbeat | None = None,
                 after_batch: Callable[[], None] | None = None, events: EventSink | None = None) -> None:
        super().__init__(name="tidecast-worker", daemon=True)
        self.cfg = cfg
        self.engine = engine
        self.table = table
        self.forecasts = forecasts
        self.events = events
        self.dead_letters = dead_letters
        self.outbox = outbox
        self.metrics = metrics
        self.epochs = epochs if epochs is not None else {}
        self.heartbeat = heartbeat or Heartbeat()
        self._after_batch = after_batch
        self.inbox: queue.Queue = queue.Queue()
        self.dequeued = 0  # records taken off the queue (the poll thread reads it)
        self.processed = 0
        self.error: BaseException | None = None
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._traced_at = -float("inf")  # when a processing error's traceback was last logged
        # The checkpoint being written on its own thread (one at a time), and what the last one wrote.
        self._job: CheckpointJob | None = None
        self._job_thread: threading.Thread | None = None
        self._job_error: BaseException | None = None
        self._last_changelog_bytes = 0
        self.metrics.checkpoint_deadline.set(checkpoint_deadline(cfg))

    # -- loop ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except (BrokerUnavailable, IncompatibleState) as err:  # the service logs it, in one line
            self.error = err
        except BaseException as err:  # the poll thread sees it and stops the service
            log.exception("worker failed")
            self.error = err

    def stop(self) -> None:
        self.inbox.put(Stop())

    def _loop(self) -> None:
        while True:
            self.heartbeat.tick()
            try:
                message = self.inbox.get(timeout=0.1)
            except queue.Empty:  # idle: checkpoint on schedule
                self._maybe_checkpoint()
                continue
            if isinstance(message, FetchedRecords):
                fetched, message = self._gather(message)
                self.process(fetched)
            if isinstance(message, Stop):
                self._collect_job(wait=True)
                return
            if message is not None:
                self.handle(message)
            self._maybe_checkpoint()

    def _gather(self, first: FetchedRecords) -> tuple[list[FetchedRecords], Any]:
        """``first`` plus queued records up to ``batch_size``; also returns a command taken off meanwhile."""
        fetched, size = [first], first.count
        while size < self.cfg.batch_size:
            try:
                nxt = self.inbox.get_nowait()
            except queue.Empty:
                break
            if not isinstance(nxt, FetchedRecords):
                return fetched, nxt
            fetched.append(nxt)
            size += nxt.count
        return fetched, None

    # -- records: decode -> screen -> engine -> sinks -----------------------------------------------------------
    def process(self, fetched: list[FetchedRecords]) -> None:
        """Apply fetched records of owned partitions in the current epoch; others are stale and dropped."""
        self.dequeued += sum(f.count for f in fetched)
        live = [f for f in fetched if self.table.owns(f.partition) and self.epochs.get(f.partition, 0) == f.epoch]
        if not live:
            return
        if any(isinstance(f.records, DecodedRecords) for f in live):  # a fetch process decoded them
            decoded = DecodedRecords.concat([f.records if isinstance(f.records, DecodedRecords)
                                             else decode_records(f.records, self.cfg.max_record_bytes) for f in live])
        else:
            decoded = decode_records((r for f in live for r in f.records), self.cfg.max_record_bytes)
        self.table.advance(decoded.ends)
        screened = self.table.screen(decoded.batch, key_of=lambda row: decoded.records[row].key)
        if screened.skipped:
            self.metrics.consumer_skipped.inc(screened.skipped)
        letters = decoded.letters + [dead_letter(decoded.records[i], "wrong_partition", detail)
                                     for i, _home, detail in screened.misrouted]
        self._write_letters(letters)
        batch = decoded.batch.take(screened.keep)
        if len(batch):
            self._apply(batch, take_records(decoded.records, screened.keep), screened.new_owners)
        n = sum(f.count for f in live)
        self.processed += n
        self._since_checkpoint += n
        if self._after_batch is not None:
            self._after_batch()

    def _apply(self, batch: ObservationBatch, records: Sequence[Any], new_owners: dict[str, int]) -> None:
        """Engine, then forecasts and drift events; a failure of either dead-letters the records concerned (module
        docstring)."""
        try:
            result = self.engine.process(batch)
        except Exception as err:
            known = set(self.engine.series_ids)
            self.table.applied(batch, new_owners, {sid for sid in new_owners if sid not in known})
            self._processing_failed(records, range(len(records)), "the engine", err)
            return
        for rej in result.rejections:  # the engine counted these in its metrics already
            self.dead_letters.write(dead_letter(records[rej.index], rej.reason, rej.detail))
        self.table.applied(batch, new_owners, _never_accepted(batch, new_owners, result.rejections))
        try:
            self.forecasts.write(result.forecasts)
        except UnsendableForecasts as err:  # the other forecasts went out
            for sid, cause in err.series.items():
                rows = _rows_of(batch, sid, err.origins.get(sid, set()))
                self._processing_failed(records, rows, f"encoding the forecast of series {sid!r}", cause)
        except (OutputError, BrokerUnavailable):
            raise
        except Exception as err:
            self._processing_failed(records, range(len(records)), "publishing the batch's forecasts", err)
        if self.events is None or not result.events:
            return
        try:
            self.events.write(result.events)
        except (OutputError, BrokerUnavailable):
            raise
        except Exception as err:
            self._processing_failed(records, range(len(records)), "publishing the batch's drift events", err)

    def _processing_failed(self, records: Sequence[Any], rows: Any, what: str, err: BaseException) -> None:
        rows = list(rows)
        self.metrics.processing_errors.inc()
        detail = (f"{what} raised {type(err).__name__}: {err} (a tidecast bug or a gap in input validation; "
                  "re-drive the record once fixed)")
        now = time.monotonic()
        traced = now - self._traced_at >= 60.0
        if traced:
            self._traced_at = now
        log.error("processing_error: %s raised %s: %s; %d record(s) dead-lettered, the worker goes on%s", what,
                  type(err).__name__, err, len(rows), "" if traced else " (traceback logged at most once a minute)",
                  exc_info=err if traced else None)
        self._write_letters([dead_letter(records[i], PROCESSING_ERROR, detail) for i in rows])

    def _write_letters(self, letters: list[DeadLetter]) -> None:
        for letter in sorted(letters, key=lambda d: d.position):
            self.dead_letters.write(letter)
            self.metrics.dead_letters.labels(reason=letter.reason).inc()

    # -- commands -----------------------------------------------------------------------------------------------
    def handle(self, command: WorkerCommand) -> None:
        """Run one partition command (assign, release, abandon); a checkpoint being written finishes first."""
        self._collect_job(wait=True)
        if isinstance(command, AssignPartitions):
            positions = self.table.restore(command.partitions, command.assignment)
            for p, position in positions.items():
                self.outbox.put(PartitionRestored(p, position, command.epochs.get(p, 0)))
        elif isinstance(command, ReleasePartitions):
            self._release(command)
        elif isinstance(command, AbandonPartitions):
            self.table.forget(command.partitions)
        elif isinstance(command, RewindPartition):
            if self.epochs.get(command.partition, 0) == command.epoch:
                self.table.rewind(command.partition, command.offset)
        else:
            raise TypeError(f"unknown worker command {command!r}")

    def _release(self, release: ReleasePartitions) -> None:
        try:
            if not release.start():  # the listener gave up: the partitions are someone else's already
                self.table.forget(release.partitions)
                return
            release.offsets = self.table.release(release.partitions)
            if not release.keep:  # checkpointed above; nothing will tell us later that they are gone
                self.table.forget(release.partitions)
        finally:
            release.done.set()

    def _maybe_checkpoint(self) -> None:
        """Start a checkpoint when one is due: after ``checkpoint_records`` records or ``checkpoint_interval``
        seconds, but no sooner than the changelog budget allows (``changelog_bytes_per_record``: the last group's
        bytes spread over the records since), and never two at once. The worker only copies the state
        (:meth:`PartitionTable.prepare`); flushing outputs, the changelog group and the local snapshot are
        written on a thread of their own while the worker goes on, and the offsets are committed when they are
        durable."""
        self._collect_job()
        if self._job is not None:
            return
        due_records = self._since_checkpoint >= self.cfg.checkpoint_records
        elapsed = time.monotonic() - self._last_checkpoint
        if not (due_records or elapsed >= self.cfg.checkpoint_interval):
            return
        budget = getattr(self.cfg, "changelog_bytes_per_record", 0)
        over_budget = budget and self._since_checkpoint * budget < self._last_changelog_bytes
        if over_budget and elapsed < checkpoint_deadline(self.cfg):
            return
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        job = self.table.prepare()
        if job is None:
            return
        self._job = job
        self._job_thread = threading.Thread(target=self._write_job, args=(job,), name="tidecast-checkpoint",
                                            daemon=True)
        self._job_thread.start()

    def _write_job(self, job: CheckpointJob) -> None:
        try:
            self.table.write(job)
        except BaseException as err:  # the worker raises it on its own thread: the service stops as before
            self._job_error = err

    def _collect_job(self, wait: bool = False) -> None:
        """Record the checkpoint written on its thread (``wait``: wait for it) and pass its offsets on for
        committing; its error, if it failed, is raised here, on the worker's thread."""
        if self._job is None or self._job_thread is None:
            return
        while wait and self._job_thread.is_alive():
            self.heartbeat.tick()
            self._job_thread.join(0.1)
        if self._job_thread.is_alive():
            return
        job, self._job, self._job_thread = self._job, None, None
        if self._job_error is not None:
            err, self._job_error = self._job_error, None
            raise err
        self._last_changelog_bytes = job.changelog_bytes
        offsets = self.table.finish(job)
        if offsets:
            self.outbox.put(CommitOffsets(offsets, {p: self.epochs.get(p, 0) for p in offsets}))


def _never_accepted(batch: ObservationBatch, new_owners: dict[str, int], rejections: list[Any]) -> set[str]:
    """New series whose every row the engine rejected (unknown_series, out_of_range, ...): it holds no state for
    them, so their partition must not claim them."""
    if not new_owners or not rejections:
        return set()
    rejected = {rej.index for rej in rejections}
    accepted = {sid for i, sid in enumerate(batch.series_ids.tolist()) if i not in rejected}
    return {sid for sid in new_owners if sid not in accepted}


def _rows_of(batch: ObservationBatch, series_id: str, origins: set[int]) -> list[int]:
    """Rows of ``batch`` whose observation issued one of ``origins`` (a forecast's ``issued_at`` is its
    observation's timestamp); all the series' rows if none matches (the origin was held over from a batch
    before)."""
    rows = [i for i, sid in enumerate(batch.series_ids.tolist()) if sid == series_id]
    issued = [i for i in rows if int(batch.timestamps_ns[i]) in origins]
    return issued or rows


class Trainer(threading.Thread):
    """Runs the engine's deferred model work (warm-start fits, replay training) off the worker thread.

    ``Engine.maintenance`` only calls the models' thread-safe ``maintenance`` hooks (CycleNet switches to
    deferred mode when called from a thread other than the one that learns). A call that used most of its budget
    left work undone, so the next follows at once; otherwise the trainer waits for the worker's next batch or
    ``idle_seconds``.
    """

    def __init__(self, engine: Engine, idle_seconds: float = 0.1) -> None:
        super().__init__(name="tidecast-trainer", daemon=True)
        self.engine = engine
        self.idle_seconds = idle_seconds
        self.error: BaseException | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def wake(self) -> None:
        """New data was learned: deferred work may be due."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def run(self) -> None:
        budget = self.engine.config.maintenance_budget_seconds
        try:
            while not self._stopping.is_set():
                started = time.perf_counter()
                self.engine.maintenance(budget)
                if time.perf_counter() - started < 0.5 * budget:
                    self._wake.wait(self.idle_seconds)
                    self._wake.clear()
        except BaseException as err:  # the poll thread sees it and stops the service
            log.exception("trainer failed")
            self.error = err
