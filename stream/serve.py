"""``tidecast serve``: a Kafka consumer-group member with checkpointed per-series state.

Threads
-------
* **poll thread** (the caller of :meth:`Service.run`): owns the group consumer. It polls, hands records to the
  worker through an in-memory queue, pauses every partition when the queue holds ``max_queued_records`` and
  resumes below half of that (it never stops polling, so the member is never kicked for a slow stage), commits
  offsets the worker reports durable, seeks partitions the worker restored, and updates the lag gauges.
* **worker**: owns the :class:`~tidecast.stream.engine.Engine` (which is not thread-safe) and everything that reads or
  writes it: decoding, ``process``, ``maintenance``, checkpoints and restores. Forecasts and dead letters go to
  a thread-safe producer.
* kafka-python's IO thread runs the rebalance listener, which hands revoked partitions to the worker for a
  final checkpoint, awaits it without blocking heartbeats, and commits.
* a lag probe (:class:`~tidecast.stream.kafka.HighwaterProbe`) refreshes the end of paused partitions.

Effectively-once state
----------------------
For each input partition the worker keeps the *position*: every record below it has been applied, skipped as a
duplicate or dead-lettered. A checkpoint (every ``checkpoint_records`` records or ``checkpoint_interval``
seconds, on revocation and at shutdown) makes, in order: outputs durable (producer flush, all acknowledged),
the changelog group durable (changed series + marker with the position), the local snapshot durable; only then
are offsets committed. A restore takes the newest state per series (local snapshot, then changelog) and seeks
to the checkpoint's position; records a series already applied (offset at or below its applied offset) are
skipped. Outputs are at-least-once: a crash re-sends forecasts issued after the last checkpoint, byte-identical.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidecast.monitors.metrics import Metrics
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig, ServeConfig
from tidecast.stream.engine import Engine, EngineResult
from tidecast.stream.kafka import (
    HighwaterProbe,
    assignors,
    client_settings,
    dead_letter_message,
    ensure_topics,
    forecast_messages,
    partition_count,
    warn_without_crc32c,
)
from tidecast.stream.records import REASONS, InvalidRecord, decode
from tidecast.stream.state import (
    ChangelogStore,
    ChangelogTail,
    LocalStateStore,
    SeriesRows,
    SharedState,
    Snapshot,
    check_fingerprint,
    config_fingerprint,
    merge,
    nonempty_shared,
    shared_digest,
)

log = logging.getLogger(__name__)

#: Rejections decided by the service (on top of :data:`tidecast.stream.records.REASONS`): a series seen on a partition
#: other than the one that holds its state (the producer did not key by series_id, or the topic was resized).


# -- worker messages ------------------------------------------------------------------------------------------
@dataclass
class _Records:
    partition: int
    epoch: int
    records: list[Any]


@dataclass
class _Assign:
    partitions: set[int]
    assignment: set[int]
    epochs: dict[int, int]


@dataclass
class _Abandon:
    """Partitions lost without a clean handover: forget them, write nothing."""

    partitions: set[int]


class _Release:
    """Revoked partitions: a final checkpoint, unless the listener gave up waiting first."""

    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions
        self.offsets: dict[int, int] = {}
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._state = "pending"

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


_STOP = object()


@dataclass
class PartitionState:
    """What the worker knows about one owned input partition."""

    partition: int
    series: set[str] = field(default_factory=set)
    dirty: set[str] = field(default_factory=set)
    position: int | None = None  # next input offset; everything below is reflected in the state
    checkpointed: int | None = None  # position of the last durable checkpoint
    changelog_offset: int = 0  # changelog read or written up to here
    shared_digests: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.position is not None and (bool(self.dirty) or self.position != self.checkpointed)


class OutputError(RuntimeError):
    """The broker refused forecasts or dead letters; offsets are not committed past them."""


# -- the worker --------------------------------------------------------------------------------------------------
class Worker(threading.Thread):
    """Owns the engine. Everything that touches it runs here, in queue order."""

    def __init__(self, config: ServeConfig, engine: Engine, metrics: Metrics, producer: Any,
                 changelog: ChangelogStore, local: LocalStateStore, results: queue.Queue,
                 output_partitions: dict[str, int], input_partitions: int) -> None:
        super().__init__(name="tidecast-worker", daemon=True)
        self.cfg = config
        self.engine = engine
        self.metrics = metrics
        self.producer = producer
        self.changelog = changelog
        self.local = local
        self.results = results
        self.inbox: queue.Queue = queue.Queue()
        self.epochs: dict[int, int] = {}  # written by the poll/IO threads, read here
        self.partitions: dict[int, PartitionState] = {}
        self.released: dict[int, PartitionState] = {}  # checkpointed at revocation, still in engine memory
        self.owner: dict[str, int] = {}  # series -> input partition holding its state
        self.floors: dict[str, int] = {}  # series -> applied offset at restore (skip re-deliveries up to it)
        self.dequeued = 0  # records taken off the queue (the poll thread reads it)
        self.processed = 0
        self.error: BaseException | None = None
        self._send_failure: BaseException | None = None
        self._fingerprint = config_fingerprint(engine.config.to_dict())
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._co_partitioned = {name: n == input_partitions for name, n in output_partitions.items()}

    # -- loop --------------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # the poll thread sees it and stops the service
            log.exception("worker failed")
            self.error = err

    def _loop(self) -> None:
        while True:
            try:
                item = self.inbox.get(timeout=0.1)
            except queue.Empty:  # idle: give models time, and checkpoint on schedule
                self.engine.maintenance()
                self._maybe_checkpoint()
                continue
            if isinstance(item, _Records):
                item = self._process_records(item)  # a command taken off the queue meanwhile, if any
            if item is _STOP:
                return
            if item is not None:
                self._handle(item)
            self._maybe_checkpoint()

    def _handle(self, item: Any) -> None:
        if isinstance(item, _Assign):
            self._restore(item)
        elif isinstance(item, _Release):
            self._release(item)
        elif isinstance(item, _Abandon):
            self._forget(item.partitions)

    def stop(self) -> None:
        self.inbox.put(_STOP)

    # -- records -------------------------------------------------------------------------------------------------
    def _process_records(self, first: _Records) -> Any:
        """Process ``first`` plus queued record items up to ``batch_size``; returns a command taken meanwhile."""
        items, size, pending = [first], len(first.records), None
        while size < self.cfg.batch_size:
            try:
                nxt = self.inbox.get_nowait()
            except queue.Empty:
                break
            if not isinstance(nxt, _Records):
                pending = nxt
                break
            items.append(nxt)
            size += len(nxt.records)
        self._apply(items)
        self.engine.maintenance()
        return pending

    def _apply(self, items: list[_Records]) -> None:
        live = []
        for item in items:
            self.dequeued += len(item.records)
            if item.partition in self.partitions and self.epochs.get(item.partition, 0) == item.epoch:
                live.append(item)
        if not live:
            return
        batch, refs, new_owner, letters, skipped = self._decode(live)
        if skipped:
            self.metrics.consumer_skipped.inc(skipped)
        for rec, reason, detail in letters:
            self._dead_letter(rec, reason, detail)
            self.metrics.dead_letters.labels(reason=reason).inc()
        if len(batch):
            result = self.engine.process(batch)
            self._route(batch, refs, new_owner, result)
        n = sum(len(i.records) for i in live)
        self.processed += n
        self._since_checkpoint += n

    def _decode(self, items: list[_Records]) -> tuple[ObservationBatch, list[Any], dict[str, int], list, int]:
        """Decode and screen records; positions advance past every record, whatever becomes of it."""
        sids, times, values, parts, offsets, refs = [], [], [], [], [], []
        new_owner: dict[str, int] = {}
        letters: list[tuple[Any, str, str]] = []
        skipped = 0
        max_bytes = self.cfg.max_record_bytes
        for item in items:
            p = item.partition
            state = self.partitions[p]
            for rec in item.records:
                state.position = rec.offset + 1
                try:
                    obs = decode(rec.value, max_bytes)
                except InvalidRecord as err:
                    letters.append((rec, err.reason, err.detail))
                    continue
                sid = obs.series_id
                owner = self.owner.get(sid, new_owner.get(sid))
                if owner is None:
                    new_owner[sid] = owner = p
                if owner != p:
                    letters.append((rec, "wrong_partition", f"series {sid!r} lives on partition {owner}, not {p}"))
                    continue
                floor = self.floors.get(sid)
                if floor is not None:
                    if rec.offset <= floor:
                        skipped += 1
                        continue
                    del self.floors[sid]
                sids.append(sid)
                times.append(obs.timestamp_ns)
                values.append(obs.value)
                parts.append(p)
                offsets.append(rec.offset)
                refs.append(rec)
        batch = ObservationBatch(np.array(sids, dtype=object), np.array(times, np.int64), np.array(values),
                                 np.array(parts, np.int32), np.array(offsets, np.int64))
        return batch, refs, new_owner, letters, skipped

    def _route(self, batch: ObservationBatch, refs: list[Any], new_owner: dict[str, int],
               result: EngineResult) -> None:
        refused = set()
        for rej in result.rejections:  # the engine counted these in its metrics already
            self._dead_letter(refs[rej.index], rej.reason, rej.detail)
            if rej.reason == "unknown_series":
                refused.add(batch.series_ids[rej.index])
        for sid, p in new_owner.items():
            if sid not in refused:
                self.owner[sid] = p
                self.partitions[p].series.add(sid)
        for sid in set(batch.series_ids.tolist()) - refused:
            self.partitions[self.owner[sid]].dirty.add(sid)
        self._send_forecasts(result)

    def _send_forecasts(self, result: EngineResult) -> None:
        topic = self.cfg.forecast_topic
        co_partitioned = self._co_partitioned.get(topic, False)
        for sid, value in forecast_messages(result.forecasts):
            partition = self.owner[sid] if co_partitioned else None
            future = self.producer.send(topic, key=sid.encode(), value=value, partition=partition)
            future.add_errback(self._on_send_error)

    def _dead_letter(self, rec: Any, reason: str, detail: str) -> None:
        msg = dead_letter_message(rec, reason, detail, self.cfg.dead_letter_max_bytes)
        topic = self.cfg.dead_letter_topic
        partition = rec.partition if self._co_partitioned.get(topic, False) else None
        future = self.producer.send(topic, key=msg.key, value=msg.value, headers=msg.headers, partition=partition)
        future.add_errback(self._on_send_error)

    def _on_send_error(self, err: BaseException) -> None:  # runs on the producer's IO thread
        self.metrics.output_errors.inc()
        self._send_failure = self._send_failure or err

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        due_records = self._since_checkpoint >= self.cfg.checkpoint_records
        due_time = time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_interval
        if not (due_records or due_time):
            return
        offsets = self.checkpoint(list(self.partitions))
        if offsets:
            self.results.put(("commit", offsets, {p: self.epochs.get(p, 0) for p in offsets}))

    def checkpoint(self, partitions: Iterable[int]) -> dict[int, int]:
        """Make outputs, then state durable for ``partitions``; returns the offsets now safe to commit."""
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        todo = [self.partitions[p] for p in partitions if p in self.partitions and self.partitions[p].changed]
        if not todo:
            return {}
        started = time.perf_counter()
        self.producer.flush(timeout=self.cfg.shutdown_timeout * 4)
        if self._send_failure is not None:
            raise OutputError(f"the broker refused output messages: {self._send_failure!r}")
        shared = nonempty_shared(self.engine.export_shared())
        digests = {name: shared_digest(*state) for name, state in shared.items()}
        slots = {sid: i for i, sid in enumerate(self.engine.series_ids)}
        exported = {st.partition: self._export(sorted(st.series), slots) for st in todo}
        groups = []
        for st in todo:
            rows = exported[st.partition]
            dirty = [i for i, sid in enumerate(rows.series_ids) if sid in st.dirty]
            changed = {m: s for m, s in shared.items() if st.shared_digests.get(m) != digests[m]}
            groups.append((st.partition, rows.take(dirty), changed, st.position))
            self.metrics.checkpoint_series.inc(len(dirty))
        next_offsets = self.changelog.write(groups, self._fingerprint)
        for st in todo:
            st.changelog_offset = next_offsets[st.partition]
            self.local.save(Snapshot(self.cfg.topic, st.partition, st.position, st.changelog_offset,
                                     self._fingerprint, exported[st.partition], shared, time.time()))
            st.dirty.clear()
            st.checkpointed = st.position
            st.shared_digests = dict(digests)
        self.metrics.checkpoint.observe(time.perf_counter() - started)
        self.metrics.last_checkpoint.set(time.time())
        return {st.partition: st.position for st in todo}

    def _export(self, series_ids: list[str], slots: dict[str, int]) -> SeriesRows:
        if not series_ids:
            return SeriesRows([], {})
        meta, arrays = self.engine.export_series(series_ids)
        for item in meta:
            item["slot"] = slots[item["series_id"]]
        return SeriesRows(meta, arrays)

    def _release(self, release: _Release) -> None:
        try:
            if not release.start():
                self._forget(release.partitions)
                return
            owned = [p for p in release.partitions if p in self.partitions]
            self.checkpoint(owned)
            release.offsets = {p: self.partitions[p].checkpointed for p in owned
                               if self.partitions[p].checkpointed is not None}
            for p in owned:
                st = self.partitions.pop(p)
                self.released[p] = st
                for sid in st.series:
                    self.owner.pop(sid, None)
        finally:
            release.done.set()

    def _forget(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            st = self.partitions.pop(p, None) or self.released.pop(p, None)
            if st is not None:
                for sid in st.series:
                    if self.owner.get(sid) == p:
                        del self.owner[sid]
                # unchecked changes are lost with the partition: whoever owns it next restores from durable state
                self.engine.drop_series(sorted(st.series))

    # -- restore -------------------------------------------------------------------------------------------------
    def _restore(self, assign: _Assign) -> None:
        for p in list(self.released):
            if p not in assign.assignment:  # gone to another member: free its rows
                self.engine.drop_series(sorted(self.released.pop(p).series))
        snapshots: dict[int, Snapshot | None] = {}
        tails: dict[int, ChangelogTail] = {}
        already = {p for p in assign.partitions if p in self.partitions}
        for p in sorted(assign.partitions - already):
            kept = self.released.pop(p, None)
            if kept is not None:
                tail = self.changelog.read(p, kept.changelog_offset)
                if tail.empty:  # nobody wrote since our own last checkpoint: memory is current
                    self._own(kept)
                    continue
            local = self.local.load(p)
            if local is not None:
                check_fingerprint(local.config, self._fingerprint, str(self.local.path(p)))
            tail = self.changelog.read(p, local.changelog_offset if local is not None else 0)
            check_fingerprint(tail.config, self._fingerprint, f"changelog {self.cfg.changelog_topic}[{p}]")
            snapshots[p] = merge(local, tail, self.cfg.topic, p)
            tails[p] = tail
        self._import(snapshots)
        for p, snap in snapshots.items():
            st = PartitionState(p, changelog_offset=tails[p].end_offset)
            if snap is not None:
                st.series = set(snap.rows.series_ids)
                st.position = st.checkpointed = snap.position
                st.shared_digests = {m: shared_digest(*s) for m, s in snap.shared.items()}
            self._own(st)
            if snap is not None:
                for sid, (_part, offset) in snap.rows.applied_offsets().items():
                    if offset >= 0:
                        self.floors[sid] = offset
        for p in sorted(assign.partitions):
            st = self.partitions.get(p)
            position = st.position if st is not None and p not in already else None
            self.results.put(("restored", p, position, assign.epochs.get(p, 0)))

    def _own(self, st: PartitionState) -> None:
        self.partitions[st.partition] = st
        for sid in st.series:
            self.owner[sid] = st.partition

    def _import(self, snapshots: dict[int, Snapshot | None]) -> None:
        found = [s for s in snapshots.values() if s is not None and len(s.rows)]
        if not found:
            return
        rows = SeriesRows.concat([s.rows for s in found])
        # Import in the exporter's slot order: a process restoring its own state gets the same rows back,
        # which keeps any row-indexed shared state (e.g. a replay buffer) pointing at the right series.
        rows = rows.take(np.argsort([m.get("slot", 0) for m in rows.meta], kind="stable"))
        if not self.engine.series_ids:
            shared = _newest_shared(found)
            if shared:
                self.engine.import_shared(shared)
        self.engine.import_series([{"series_id": m["series_id"]} for m in rows.meta], rows.arrays)
        self.metrics.restored_series.inc(len(rows))
        log.info("restored %d series of partitions %s", len(rows), sorted(s.partition for s in found))


def _newest_shared(snapshots: list[Snapshot]) -> SharedState:
    newest = max(snapshots, key=lambda s: s.written_at)
    return nonempty_shared(newest.shared)


# -- the service (poll thread) ---------------------------------------------------------------------------------
class Service:
    """A ``tidecast serve`` process: :meth:`run` blocks until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, config: ServeConfig, metrics: Metrics | None = None,
                 engine_factory: Callable[[EngineConfig, Metrics], Engine] | None = None) -> None:
        self.cfg = config
        self.metrics = metrics or Metrics(reasons=REASONS)
        self._engine_factory = engine_factory or Engine.from_config
        self._stop = threading.Event()
        self._results: queue.Queue = queue.Queue()
        self._enqueued = 0
        self._restoring: set[int] = set()
        self._dropped_from: dict[int, int] = {}  # restoring partition -> first offset fetched and dropped
        self._gauges_at = 0.0
        self._backpressure = False
        self._committed: dict[int, int] = {}
        self._lag_partitions: set[int] = set()
        self._rate_mark = (time.monotonic(), 0)
        self.consumer: Any = None
        self.producer: Any = None
        self.worker: Worker | None = None
        self.probe: HighwaterProbe | None = None
        self._metrics_server: Any = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask for a graceful stop (thread- and signal-safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> int:
        """Serve until stopped; 0 after a clean stop, 1 if the worker failed."""
        try:
            self._start()
            while not self._stop.is_set():
                if self.worker is not None and self.worker.error is not None:
                    raise RuntimeError("engine worker failed") from self.worker.error
                self._poll_once()
            return 0
        except Exception:
            log.exception("serve stopped on an error")
            return 1
        finally:
            self._shutdown()

    def _start(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.admin import KafkaAdminClient

        from tidecast.models.runtime import set_torch_threads

        cfg = self.cfg
        self._serve_metrics()
        self.consumer = KafkaConsumer(**self._consumer_settings(KafkaConsumer))
        n_input = partition_count(self.consumer, cfg.topic)
        output_partitions = self._prepare_topics(KafkaAdminClient, n_input)
        self.producer = KafkaProducer(**client_settings(
            cfg.options, KafkaProducer, cfg.kafka_extra, max_request_size=cfg.max_request_size, linger_ms=5,
            batch_size=256 * 1024, acks="all"))
        reader_settings = self._reader_settings(KafkaConsumer)
        changelog = ChangelogStore(cfg.changelog_topic, self.producer, lambda: KafkaConsumer(**reader_settings))
        local = LocalStateStore(cfg.state_dir, cfg.group_id, cfg.topic)
        engine = self._engine_factory(cfg.engine, self.metrics)
        set_torch_threads(cfg.torch_threads)  # after the models exist: a no-op unless one of them imported torch
        self.worker = Worker(cfg, engine, self.metrics, self.producer, changelog, local, self._results,
                             output_partitions, n_input)
        self.worker.start()
        # The probe only wants the fetch response's highwater: keep what it drags along small.
        probe_settings = {**reader_settings, "max_partition_fetch_bytes": 65_536, "fetch_max_bytes": 1_048_576}
        self.probe = HighwaterProbe(cfg.topic, lambda: KafkaConsumer(**probe_settings), cfg.lag_interval)
        self.probe.start()
        self.consumer.subscribe([cfg.topic], listener=_make_listener(self))
        log.info("serving %s as group %s -> %s (dead letters %s, changelog %s)", cfg.topic, cfg.group_id,
                 cfg.forecast_topic, cfg.dead_letter_topic, cfg.changelog_topic)

    def _consumer_settings(self, client: type) -> dict[str, Any]:
        cfg = self.cfg
        return client_settings(
            cfg.options, client, cfg.kafka_extra, group_id=cfg.group_id, enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset, session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms, max_poll_interval_ms=cfg.max_poll_interval_ms,
            max_poll_records=cfg.max_poll_records, max_partition_fetch_bytes=cfg.max_partition_fetch_bytes,
            fetch_max_bytes=cfg.fetch_max_bytes, partition_assignment_strategy=assignors(cfg.assignment_strategy))

    def _reader_settings(self, client: type) -> dict[str, Any]:
        """A group-less consumer (changelog restore, lag probe): short fetch waits, never commits."""
        cfg = self.cfg
        return client_settings(cfg.options, client, cfg.kafka_extra, group_id=None, enable_auto_commit=False,
                               auto_offset_reset="earliest", fetch_max_wait_ms=100,
                               max_partition_fetch_bytes=max(cfg.max_partition_fetch_bytes, cfg.max_request_size),
                               fetch_max_bytes=max(cfg.fetch_max_bytes, cfg.max_request_size))

    def _prepare_topics(self, admin_cls: type, n_input: int) -> dict[str, int]:
        cfg = self.cfg
        if cfg.create_topics:
            admin = admin_cls(**client_settings(cfg.options, admin_cls, cfg.kafka_extra))
            try:
                changelog_configs = {"cleanup.policy": "compact", "max.message.bytes": str(cfg.max_request_size)}
                created = ensure_topics(admin, {cfg.forecast_topic: (n_input, {}),
                                                cfg.dead_letter_topic: (n_input, {}),
                                                cfg.changelog_topic: (n_input, changelog_configs)},
                                        cfg.replication_factor)
            finally:
                admin.close()
            if created:
                log.info("created topics %s", created)
        counts = {t: partition_count(self.consumer, t) for t in (cfg.forecast_topic, cfg.dead_letter_topic,
                                                                  cfg.changelog_topic)}
        if counts[cfg.changelog_topic] != n_input:
            raise ValueError(f"changelog {cfg.changelog_topic} has {counts[cfg.changelog_topic]} partitions, the "
                             f"input {n_input}; they must match (state of input partition P lives in changelog P)")
        return counts

    def _serve_metrics(self) -> None:
        if self.cfg.metrics_port is None:
            return
        from prometheus_client import start_http_server

        self._metrics_server, _ = start_http_server(self.cfg.metrics_port, self.cfg.metrics_address,
                                                    registry=self.metrics.registry)
        log.info("metrics on http://%s:%d/metrics", self.cfg.metrics_address, self.cfg.metrics_port)

    def _shutdown(self) -> None:
        """Stop fetching, let the worker finish its batch, final checkpoint + commit (via the revoke
        listener that ``close`` runs), leave the group, close clients, stop /metrics."""
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        if self.consumer is not None:
            try:
                self.consumer.pause(*self.consumer.assignment())
                self._drain_results()
                self.consumer.close(timeout_ms=int(max(1.0, deadline - time.monotonic()) * 1000))
            except Exception:
                log.exception("closing the consumer")
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(timeout=max(0.5, deadline - time.monotonic()))
            self.worker.changelog.close()
        if self.probe is not None:
            self.probe.stop()
        if self.producer is not None:
            try:
                self.producer.close(timeout=max(0.5, deadline - time.monotonic()))
            except Exception:
                log.exception("closing the producer")
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("stopped")

    # -- one poll ------------------------------------------------------------------------------------------------
    def _poll_once(self) -> None:
        polled = self.consumer.poll(timeout_ms=100)
        assert self.worker is not None
        for tp, records in polled.items():
            if not records:
                continue
            if tp.partition in self._restoring:  # not expected (paused), but never lose them: seek back later
                self._dropped_from.setdefault(tp.partition, records[0].offset)
                continue
            self.worker.inbox.put(_Records(tp.partition, self.worker.epochs.get(tp.partition, 0), records))
            self._enqueued += len(records)
            self.metrics.consumer_records.inc(len(records))
        self._drain_results()
        self._apply_backpressure()
        self._update_gauges()

    def _drain_results(self) -> None:
        while True:
            try:
                kind, *payload = self._results.get_nowait()
            except queue.Empty:
                return
            if kind == "restored":
                self._on_restored(*payload)
            elif kind == "commit":
                self._commit(*payload)

    def _on_restored(self, partition: int, position: int | None, epoch: int | None) -> None:
        from kafka import TopicPartition

        assert self.worker is not None
        tp = TopicPartition(self.cfg.topic, partition)
        if tp not in self.consumer.assignment() or self.worker.epochs.get(partition, 0) != epoch:
            return  # revoked while restoring
        dropped = self._dropped_from.pop(partition, None)
        if position is None:
            position = dropped
        if position is not None:
            self.consumer.seek(tp, position)
        self._restoring.discard(partition)
        if not self._backpressure:
            self.consumer.resume(tp)

    def _commit(self, offsets: dict[int, int], epochs: dict[int, int | None]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        assert self.worker is not None
        assigned = self.consumer.assignment()
        todo = {}
        for p, offset in offsets.items():
            tp = TopicPartition(self.cfg.topic, p)
            current = self.worker.epochs.get(p, 0) == epochs.get(p)
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

    def _apply_backpressure(self) -> None:
        assert self.worker is not None
        queued = self._enqueued - self.worker.dequeued
        self.metrics.queued_records.set(queued)
        high = self.cfg.max_queued_records
        if not self._backpressure and queued >= high:
            self._backpressure = True
            self.consumer.pause(*self.consumer.assignment())
        elif self._backpressure and queued <= high // 2:
            self._backpressure = False
            resumable = [tp for tp in self.consumer.assignment() if tp.partition not in self._restoring]
            self.consumer.resume(*resumable)

    def _update_gauges(self) -> None:
        assert self.worker is not None and self.probe is not None
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
            if tp.partition in self._restoring:
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

        assert self.worker is not None
        self.metrics.rebalances.inc()
        tps = [TopicPartition(self.cfg.topic, p) for p in partitions]
        self.consumer.pause(*tps)
        self._restoring |= partitions
        assignment = {tp.partition for tp in self.consumer.assignment()}
        epochs = {p: self.worker.epochs.get(p, 0) for p in partitions}
        self.worker.inbox.put(_Assign(set(partitions), assignment, epochs))

    def begin_release(self, partitions: set[int]) -> _Release:
        assert self.worker is not None
        self._forget_locally(partitions)
        release = _Release(partitions)
        self.worker.inbox.put(release)
        return release

    def on_lost(self, partitions: set[int]) -> None:
        assert self.worker is not None
        self._forget_locally(partitions)
        self.worker.inbox.put(_Abandon(partitions))

    def _forget_locally(self, partitions: set[int]) -> None:
        assert self.worker is not None
        for p in partitions:
            self.worker.epochs[p] = self.worker.epochs.get(p, 0) + 1  # queued records of p become stale
            self._restoring.discard(p)
            self._dropped_from.pop(p, None)
            self._committed.pop(p, None)

    def release_deadline(self) -> float:
        """When the revoke listener stops waiting for the worker's checkpoint (monotonic time)."""
        budget = max(1.0, min(self.cfg.max_poll_interval_ms / 1000 / 2, 60.0))
        if self._stop.is_set():  # shutting down: stay inside the shutdown budget
            budget = min(budget, self.cfg.shutdown_timeout * 0.75)
        return time.monotonic() + budget

    def worker_failed(self) -> bool:
        return self.worker is None or self.worker.error is not None or not self.worker.is_alive()


def _make_listener(service: Service) -> Any:
    """An async rebalance listener: it awaits the worker's checkpoint without blocking heartbeats.

    kafka-python 3 runs listeners on its IO thread, where a blocking call (or a blocking consumer API) would
    stall heartbeats or raise; an async listener may ``await``. Waiting for another thread needs a sleep the
    client's own event loop understands: ``KernelEvent("_sleep", s)`` from ``kafka.net.selector`` (3.0.x).
    """
    from kafka import AsyncConsumerRebalanceListener
    from kafka.net.selector import KernelEvent
    from kafka.structs import OffsetAndMetadata, TopicPartition

    class Listener(AsyncConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked: set) -> None:
            partitions = {tp.partition for tp in revoked}
            if not partitions:
                return
            release = service.begin_release(partitions)
            deadline = service.release_deadline()
            while not release.done.is_set():
                late = time.monotonic() > deadline or service.worker_failed()
                if late and release.abandon():
                    log.warning("worker did not checkpoint revoked partitions %s in time; not committing",
                                sorted(partitions))
                    return
                await KernelEvent("_sleep", 0.01)  # yields to kafka-python's loop: heartbeats go on
            offsets = {TopicPartition(service.cfg.topic, p): OffsetAndMetadata(o, "", -1)
                       for p, o in release.offsets.items()}
            if not offsets:
                return
            try:
                await service.consumer.commit_async(offsets)
                service.metrics.commits.inc()
            except Exception as err:
                service.metrics.commit_failures.inc()
                log.warning("commit of revoked partitions failed: %s", err)

        async def on_partitions_assigned(self, assigned: set) -> None:
            if assigned:
                service.on_assigned({tp.partition for tp in assigned})

        async def on_partitions_lost(self, lost: set) -> None:
            if lost:
                service.on_lost({tp.partition for tp in lost})

    return Listener()


def run_serve(config: ServeConfig) -> int:
    """Run the service in this process with signal handlers; the exit status."""
    level = getattr(logging, str(config.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(max(level, logging.WARNING))  # its INFO is per-connection chatter
    warn_without_crc32c()
    service = Service(config)
    service.install_signal_handlers()
    return service.run()
