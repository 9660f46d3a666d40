"""Partition state for ``serve``: which input partitions this member owns, which series live on each, and how
their state is checkpointed, restored and handed over.

Ownership
---------
Producers key observations by series id, so a series has a *home partition*: the one the producers' partitioner
maps its id to (:class:`~tidecast.stream.partitioner.HomePartitions`, the ``partitioner`` setting). Every member
computes it the same way, so a record on another partition is refused as ``wrong_partition`` by whichever member
reads it (the detail names the expected partition), never taken as a new series. A series' state lives on the
partition that first brought it — its home — and a record on its home partition whose state lives on another one
(state written under another partitioner) is refused too. Without ``homes`` (tests on in-memory stores) the first
partition that brought a series is its home. A re-delivered record at or below the offset its series had applied
when restored is skipped.

Checkpoint order
----------------
For the partitions that changed: (1) outputs durable (every sink's ``flush``); (2) the changelog group durable
(every series of each changed partition, changed shared model state, a marker with the partition's *position*); (3)
the local snapshot durable; (4) the positions are returned as the offsets now safe to commit. The *position* is the
next input offset: every record below it has been applied, skipped as a duplicate or dead-lettered.

Restore
-------
The newest state per series from the local snapshot and the changelog written after it (:func:`merge`), imported
into the engine; the partition then resumes at the restored position. A partition released in the same rebalance
is kept in memory when nobody wrote to its changelog since.

:class:`PartitionTable` does no Kafka I/O of its own: it is handed the engine, the changelog and local stores, and
the output sinks, so it runs on fakes in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tidecast.monitors.metrics import Metrics
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.engine import Engine, StateMismatch, shared_version
from tidecast.stream.partitioner import HomePartitions
from tidecast.stream.state import (
    ChangelogStore,
    ChangelogTail,
    IncompatibleState,
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


class Durable(Protocol):
    """The sinks' durability hook (:mod:`tidecast.stream.sinks`)."""

    def flush(self) -> None: ...


@dataclass
class PartitionState:
    """What this member knows about one owned input partition."""

    partition: int
    series: set[str] = field(default_factory=set)
    dirty: set[str] = field(default_factory=set)
    position: int | None = None  # next input offset; everything below is reflected in the state
    checkpointed: int | None = None  # position of the last durable checkpoint
    changelog_offset: int = 0  # changelog read or written up to here
    shared_digests: dict[str, str] = field(default_factory=dict)
    # each retrained lane's model version in the partition's last checkpoint: one written before a promotion is
    # rewritten at the next checkpoint even if none of its series moved, or a member restoring it alone would take
    # the older model back (versions went 1 -> 0 when a quiet partition came back by itself)
    model_versions: dict[str, int] = field(default_factory=dict)
    # restored series this member's engine does not accept (max_series reached, e.g. after a scale-in; not in
    # allowed_series): their state rides along unchanged in every checkpoint of the partition, so the member that
    # takes them next (or this one, once rows free up) continues them; meanwhile their records are dead-lettered
    parked: SeriesRows = field(default_factory=lambda: SeriesRows([], {}))

    @property
    def changed(self) -> bool:
        return self.position is not None and (bool(self.dirty) or self.position != self.checkpointed)


@dataclass
class CheckpointJob:
    """One checkpoint of some partitions: what :meth:`PartitionTable.prepare` copied, what :meth:`~PartitionTable.
    write` made of it."""

    started: float
    shared: SharedState
    digests: dict[str, str]
    groups: list[tuple[int, SeriesRows, SharedState, int]] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)
    changelog_bytes: int = 0


@dataclass
class Screened:
    """Which rows of a decoded batch to apply (:meth:`PartitionTable.screen`)."""

    keep: np.ndarray  # row indices, in order
    misrouted: list[tuple[int, int, str]]  # (row, the partition its series belongs on, why: the dead letter's detail)
    skipped: int  # re-deliveries of records already applied
    new_owners: dict[str, int]  # series seen for the first time -> their partition


_KEY_UNREAD = object()  # a record key not read (the caller gave no ``key_of``)


class PartitionTable:
    """Owned partitions and their series; checkpoint, restore, release (see the module docstring)."""

    _MAX_WARNED = 1_000  # series named in a wrong_partition warning (later ones are only dead-lettered and counted)

    def __init__(self, topic: str, engine: Engine, changelog: ChangelogStore, local: LocalStateStore,
                 metrics: Metrics, outputs: Sequence[Durable] = (), homes: HomePartitions | None = None) -> None:
        self.topic = topic
        self.engine = engine
        self.changelog = changelog
        self.local = local
        self.metrics = metrics
        self.outputs = outputs
        self.homes = homes
        self._warned: set[str] = set()
        self.owned: dict[int, PartitionState] = {}
        self.released: dict[int, PartitionState] = {}  # checkpointed at revocation, still in engine memory
        self._checkpointed = False  # this process wrote a checkpoint (tidecast_last_checkpoint_timestamp_seconds)
        self._owner: dict[str, int] = {}  # series -> input partition holding its state
        self._floors: dict[str, int] = {}  # series -> applied offset at restore (skip re-deliveries up to it)
        self.fingerprint = config_fingerprint(engine.config.to_dict())

    # -- ownership ------------------------------------------------------------------------------------------
    def owns(self, partition: int) -> bool:
        return partition in self.owned

    def owner_of(self, series_id: str) -> int | None:
        """The input partition holding the series' state, if this member has it."""
        return self._owner.get(series_id)

    def advance(self, ends: dict[int, int]) -> None:
        """Positions move past every record handled, whatever became of it (applied, skipped, dead-lettered)."""
        for partition, end in ends.items():
            self.owned[partition].position = end

    def screen(self, batch: ObservationBatch, key_of: Callable[[int], bytes | None] | None = None) -> Screened:
        """Sort decoded observations into apply, wrong partition and already applied. ``key_of(row)``: the row's
        record key, read only for a row on the wrong partition (to tell a key that is not the series id from a
        producer that hashes differently)."""
        everything = self._screen_all_kept(batch)
        return everything if everything is not None else self._screen_rows(batch, key_of)

    def _screen_rows(self, batch: ObservationBatch, key_of: Callable[[int], bytes | None] | None = None) -> Screened:
        """:meth:`screen`, row by row."""
        keep, misrouted, skipped, new_owners = [], [], 0, {}
        rows = zip(batch.series_ids.tolist(), batch.partitions.tolist(), batch.offsets.tolist(), strict=True)
        for i, (sid, partition, offset) in enumerate(rows):
            home = self.homes(sid) if self.homes is not None else None
            if home is not None and home != partition:
                key = key_of(i) if key_of is not None else _KEY_UNREAD
                misrouted.append((i, home, self._not_home(sid, partition, home, key)))
                continue
            owner = self._owner.get(sid, new_owners.get(sid, partition))
            if owner != partition:
                misrouted.append((i, owner, f"series {sid!r} lives on partition {owner} (its state), not "
                                            f"{partition}"))
                continue
            floor = self._floors.get(sid)
            if floor is not None:
                if offset <= floor:
                    skipped += 1
                    continue
                del self._floors[sid]
            if sid not in self._owner:  # only a row handed on makes a series its partition's: a parked series whose
                new_owners[sid] = partition  # rows were all skipped joined it, and the next checkpoint failed on it
            keep.append(i)
        return Screened(np.array(keep, np.int64), misrouted, skipped, new_owners)

    def _screen_all_kept(self, batch: ObservationBatch) -> Screened | None:
        """The usual case, checked once per (series, partition) instead of once per row: every row is applied (each
        series on its home and owning partition, none with a re-delivery floor). ``None`` when any is not, for
        the row-by-row :meth:`screen` to sort out."""
        new_owners: dict[str, int] = {}
        pairs = zip(batch.series_ids.tolist(), batch.partitions.tolist(), strict=True)
        for sid, partition in dict.fromkeys(pairs):
            if sid in self._floors or (self.homes is not None and self.homes(sid) != partition):
                return None
            owner = self._owner.get(sid, new_owners.get(sid))
            if owner is None:
                new_owners[sid] = partition
            elif owner != partition:
                return None
        return Screened(np.arange(len(batch), dtype=np.int64), [], 0, new_owners)

    def _not_home(self, sid: str, partition: int, home: int, key: bytes | None | object = _KEY_UNREAD) -> str:
        assert self.homes is not None
        if key is None:  # a keyless record lands on any partition: not the partitioner's fault
            return (f"series {sid!r} belongs on partition {home}, not {partition}: the record has no key; key "
                    "records by series_id (README, message schema)")
        if key is not _KEY_UNREAD and key != sid.encode("utf-8", "surrogatepass"):
            # not the partitioner's fault either: this record is keyed by something else than its series id
            return (f"series {sid!r} belongs on partition {home}, not {partition}: the record's key "
                    f"{key[:64]!r} is not its series_id; key records by series_id (README, message schema)")
        detail = (f"series {sid!r} belongs on partition {home} (partitioner {self.homes.describe()}), not "
                  f"{partition}: the producer hashes keys differently; set --partitioner to the producers' "
                  "(or produce with tidecast produce --partitioner)")
        if sid not in self._warned and len(self._warned) < self._MAX_WARNED:
            self._warned.add(sid)
            log.warning("wrong_partition: %s", detail)
        return detail

    def applied(self, batch: ObservationBatch, new_owners: dict[str, int], refused: set[str]) -> None:
        """After the engine applied ``batch``: new series it accepted join their partition; every series in
        ``batch`` (but the ``refused``) has changed."""
        for sid, partition in new_owners.items():
            if sid not in refused:
                self._owner[sid] = partition
                self.owned[partition].series.add(sid)
        for sid in set(batch.series_ids.tolist()) - refused:
            self.owned[self._owner[sid]].dirty.add(sid)

    def rewind(self, partition: int, offset: int) -> None:
        """The partition's log went back (topic recreated, log truncated, consumer reset): continue at ``offset``
        and judge its records by their timestamps (the engine's duplicate and order checks) instead of skipping
        every offset the series had applied in the old log."""
        st = self.owned.get(partition)
        if st is None:
            return
        st.position = offset
        for sid in [*st.series, *st.parked.series_ids]:  # parked ones too: their records go
            self._floors.pop(sid, None)  # to unknown_series, not silently skipped against the old log's offsets
        # and in the state the next checkpoint writes: an old-log offset restored as a floor skipped as many of the
        # new log's records of a series that had not yet spoken in it (silently: counted as re-deliveries)
        self.engine.forget_applied_offsets(st.series)
        if len(st.parked) and "engine/applied_offset" in st.parked.arrays:
            st.parked.arrays["engine/applied_offset"] = np.full(len(st.parked), -1, np.int64)
        st.dirty.update(st.series)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """Outputs, then state durable for ``partitions`` (default: all owned), now; the offsets safe to commit."""
        job = self.prepare(partitions)
        if job is None:
            return {}
        self.write(job)
        return self.finish(job)

    def prepare(self, partitions: Iterable[int] | None = None) -> CheckpointJob | None:
        """The worker's part of a checkpoint (a copy of the state, taken between two batches): every series of
        each partition that changed, the shared model state and the positions. :meth:`write` can then run on
        another thread while the worker goes on; :meth:`finish` (worker thread again) records it.

        Every group holds the whole partition, so a restore needs only the last complete group (see
        :meth:`~tidecast.stream.state.ChangelogStore.read_latest`); how often groups are written is the
        worker's choice (``changelog_bytes_per_record``)."""
        chosen = list(self.owned) if partitions is None else partitions
        versions = self.engine.model_versions()
        todo = [self.owned[p] for p in chosen if p in self.owned and (self.owned[p].changed
                                                                     or _behind(self.owned[p], versions))]
        if not todo:
            return None
        started = time.perf_counter()
        shared = nonempty_shared(self.engine.export_shared())
        digests = {name: shared_digest(*state) for name, state in shared.items()}
        slots = self.engine.series_rows()
        job = CheckpointJob(started, shared, digests)
        for st in todo:
            rows = self._with_parked(self._export(sorted(st.series), slots), st)
            job.groups.append((st.partition, rows, shared, st.position))
            job.positions[st.partition] = st.position
            self.metrics.checkpoint_series.inc(len(rows))
            st.dirty.clear()  # in the copy now; what changes from here is dirty again
        return job

    def write(self, job: CheckpointJob) -> None:
        """Make ``job`` durable, in order: outputs flushed, changelog group acknowledged, local snapshot fsynced.
        Touches no engine state: safe on a thread of its own."""
        for sink in self.outputs:
            sink.flush()
        before = self.changelog.bytes_written if hasattr(self.changelog, "bytes_written") else 0
        job.next_offsets = self.changelog.write(job.groups, self.fingerprint)
        job.changelog_bytes = getattr(self.changelog, "bytes_written", 0) - before
        for partition, rows, shared, position in job.groups:
            self.local.save(Snapshot(self.topic, partition, position, job.next_offsets[partition], self.fingerprint,
                                     rows, shared, time.time()))
        self.metrics.checkpoint.observe(time.perf_counter() - job.started)
        self.metrics.last_checkpoint.set(time.time())
        self._checkpointed = True

    def finish(self, job: CheckpointJob) -> dict[int, int]:
        """Record a written ``job`` (worker thread); the offsets now safe to commit (partitions still owned)."""
        offsets = {}
        for partition, position in job.positions.items():
            st = self.owned.get(partition)
            if st is None:  # lost meanwhile: whoever owns it restores from what was written
                continue
            st.changelog_offset = job.next_offsets[partition]
            st.checkpointed = position
            st.shared_digests = dict(job.digests)
            st.model_versions = model_versions_of(job.shared)
            offsets[partition] = position
        return offsets

    def _with_parked(self, rows: SeriesRows, st: PartitionState) -> SeriesRows:
        if not len(st.parked):
            return rows
        try:
            return SeriesRows.concat([rows, st.parked])
        except IncompatibleState:  # parked in an older layout than the engine now exports: cannot be one group
            pass
        conformed = self.engine.fresh_restartable_state(st.parked.arrays, len(st.parked))
        if conformed is not None:  # only a watcher or the retrain ring changed: they restart, the rest is kept
            st.parked = SeriesRows(st.parked.meta, conformed)
            return SeriesRows.concat([rows, st.parked])
        log.warning("partition %d: dropping the parked state of %d series (an older state layout)",
                    st.partition, len(st.parked))
        st.parked = SeriesRows([], {})
        return rows

    def _export(self, series_ids: list[str], slots: dict[str, int]) -> SeriesRows:
        if not series_ids:
            return SeriesRows([], {})
        meta, arrays = self.engine.export_series(series_ids)
        for item in meta:
            item["slot"] = slots[item["series_id"]]
        return SeriesRows(meta, arrays)

    # -- handing partitions over ----------------------------------------------------------------------------
    def release(self, partitions: Iterable[int]) -> dict[int, int]:
        """Revoked: a final checkpoint; the state stays in memory in case the partitions come straight back.
        Returns the offsets to commit."""
        owned = [p for p in partitions if p in self.owned]
        self.checkpoint(owned)
        offsets = {}
        for p in owned:
            st = self.owned.pop(p)
            if st.checkpointed is not None:
                offsets[p] = st.checkpointed
            self.released[p] = st
            for sid in st.series:
                self._owner.pop(sid, None)
        return offsets

    def forget(self, partitions: Iterable[int]) -> None:
        """Lost (or released and gone): drop the series; unsaved changes go with them, and whoever owns the
        partition next restores from durable state."""
        leaving = set(partitions)
        # a series another partition held here also lists (state written under another --partitioner) stays:
        # dropping it restarted it empty there, and that partition's next checkpoint made the loss durable
        kept = {sid for q, st in [*self.owned.items(), *self.released.items()] if q not in leaving for sid in st.series}
        for p in partitions:
            st = self.owned.pop(p, None) or self.released.pop(p, None)
            if st is not None:
                for sid in st.series:
                    if self._owner.get(sid) == p:
                        del self._owner[sid]
                for sid in [*(st.series - kept), *st.parked.series_ids]:
                    self._floors.pop(sid, None)  # from a log that may be gone when the partition comes back
                self.engine.drop_series(sorted(st.series - kept))
        self._unpark()  # rows freed: parked series of the partitions kept may fit now

    def _unpark(self) -> None:
        """Import the parked series that the engine accepts now; the rest stay parked."""
        for st in self.owned.values():
            if not len(st.parked):
                continue
            refused = self.engine.import_series(st.parked.meta, st.parked.arrays)
            left = set(refused)
            taken = [sid for i, sid in enumerate(st.parked.series_ids) if i not in left]
            if taken:
                self.metrics.restored_series.inc(len(taken))
                st.parked = st.parked.take(refused)
                for sid in taken:
                    st.series.add(sid)
                    st.dirty.add(sid)
                    self._owner[sid] = st.partition
                log.info("partition %d: %d parked series restored (%d still parked)", st.partition, len(taken),
                         len(st.parked))

    def restore(self, partitions: Iterable[int], assignment: Iterable[int]) -> dict[int, int | None]:
        """Take ``partitions`` (newly assigned; ``assignment`` is all this member now holds) with their state.

        Returns each partition's restored position (``None``: no state, or already owned; the committed offset
        rules).
        """
        started = time.perf_counter()
        partitions, assignment = set(partitions), set(assignment)
        self.forget([p for p in self.released if p not in assignment])  # gone to another member: free its rows
        already = {p for p in partitions if p in self.owned}
        snapshots: dict[int, Snapshot | None] = {}
        tails: dict[int, ChangelogTail] = {}
        with_local: set[int] = set()  # partitions whose state came partly from a local snapshot
        for p in sorted(partitions - already):
            kept = self.released.pop(p, None)
            if kept is not None and self.changelog.read(p, kept.changelog_offset).empty:
                self._own(kept)  # nobody wrote since our own last checkpoint: memory is current
                continue
            snapshots[p], tails[p], local = self._read(p)  # (a stale kept state is overwritten by the import)
            if local:
                with_local.add(p)
        refused, unfit = self._import(snapshots)
        for p, err in unfit.items():
            snapshots[p], tails[p], more = self._without_local(p, err, snapshots[p], tails[p], p in with_local)
            refused |= more
        for p, snap in snapshots.items():
            self._own(self._state_of(p, snap, tails[p], refused))
        # rows freed by the partitions that left: the parked series of those kept in memory (which the forget
        # above ran before they were owned again) fit now; else their records started a fresh copy of the series
        self._unpark()
        if snapshots:
            self.metrics.restore_seconds.observe(time.perf_counter() - started)
        if not self._checkpointed and not any(st.dirty for st in self.owned.values()):
            # restored from durable state and nothing applied since: all of it is checkpointed as of now (an idle
            # member after a restart showed a checkpoint age of 56 years until its first write)
            self.metrics.last_checkpoint.set(time.time())
        return {p: self.owned[p].position if p in self.owned and p not in already else None
                for p in sorted(partitions)}

    def _read(self, p: int, use_local: bool = True) -> tuple[Snapshot | None, ChangelogTail, bool]:
        """The partition's newest saved state, its changelog tail, and whether a local snapshot is part of it."""
        skipped = getattr(self.local, "skipped", 0)
        local = self.local.load(p) if use_local else None
        if getattr(self.local, "skipped", 0) > skipped:  # unreadable, or another partition's, topic's or group's
            self.metrics.state_skipped.labels(source="snapshot").inc()
        if local is not None:
            check_fingerprint(local.config, self.fingerprint, str(self.local.path(p)))
        reader = getattr(self.changelog, "read_latest", self.changelog.read)
        tail = reader(p, local.changelog_offset if local is not None else 0)
        self.metrics.restore_bytes.inc(tail.n_bytes)
        if tail.n_skipped:
            self.metrics.state_skipped.labels(source="changelog").inc(tail.n_skipped)
        if local is not None and tail.end_offset < local.changelog_offset:
            log.warning("changelog %s[%d] ends at %d, before the local snapshot's offset %d: the changelog topic was "
                        "recreated or truncated; restoring from the local snapshot", self.changelog.topic, p,
                        tail.end_offset, local.changelog_offset)
        check_fingerprint(tail.config, self.fingerprint, f"changelog {self.changelog.topic}[{p}]")
        return merge(local, tail, self.topic, p), tail, local is not None

    def _state_of(self, p: int, snap: Snapshot | None, tail: ChangelogTail, refused: set[str]) -> PartitionState:
        st = PartitionState(p, changelog_offset=tail.end_offset)
        if snap is not None:
            ids = snap.rows.series_ids
            st.series = set(ids) - refused
            st.parked = snap.rows.take([i for i, sid in enumerate(ids) if sid in refused])
            st.position = st.checkpointed = snap.position
            st.shared_digests = {m: shared_digest(*s) for m, s in snap.shared.items()}
            st.model_versions = model_versions_of(snap.shared)
            for sid, (_part, offset) in snap.rows.applied_offsets().items():
                if offset >= 0:
                    self._floors[sid] = offset
            if self.homes is not None:
                away = [sid for sid in st.series if self.homes(sid) != p]
                if away:
                    log.warning("partition %d holds the state of %d series whose home under the %s partitioner is "
                                "another partition (e.g. %r): state written under another --partitioner; their "
                                "records will be dead-lettered as wrong_partition", p, len(away),
                                self.homes.partitioner, sorted(away)[0])
        return st

    def _own(self, st: PartitionState) -> None:
        self.owned[st.partition] = st
        for sid in st.series:
            self._owner[sid] = st.partition

    def _without_local(self, p: int, err: Exception, snap: Snapshot | None, tail: ChangelogTail,
                       with_local: bool) -> tuple[Snapshot | None, ChangelogTail, set[str]]:
        """Partition ``p``'s state after it did not fit the engine (``err``), alone or with others' (shared state
        that does not fit cannot be told apart): imported alone, read again from the changelog alone if a local
        snapshot had a part in it, the likelier culprit; if that does not fit either, the partition starts without
        state (logged and counted, never a crash loop on the same bytes)."""
        if with_local:
            log.warning("the saved state of partition %d does not fit this engine (%s); restoring it from the "
                        "changelog alone", p, err)
            self.metrics.state_skipped.labels(source="snapshot").inc()
            snap, tail, _ = self._read(p, use_local=False)
        refused, unfit = self._import({p: snap})
        if unfit:
            log.error("the changelog state of partition %d does not fit this engine (%s); the partition starts "
                      "without state, from its committed offset", p, unfit[p])
            self.metrics.state_skipped.labels(source="changelog").inc()
            return None, tail, set()
        return snap, tail, refused

    def _import(self, snapshots: dict[int, Snapshot | None]) -> tuple[set[str], dict[int, Exception]]:
        """Restore the snapshots' series into the engine; returns those it does not accept (see ``parked``) and
        the partitions whose state does not fit it (nothing of theirs imported)."""
        found = [s for s in snapshots.values() if s is not None and len(s.rows)]
        if not found:
            return set(), {}
        fresh = not self.engine.series_ids
        shared = _newest_shared(found)
        if shared:
            try:
                if fresh:
                    self.engine.import_shared(shared)
                else:  # a member already serving adopts a newer retrained model version (README: versions)
                    adopted = self.engine.adopt_newer(shared)
                    if adopted:
                        log.info("adopted newer model versions of %s from partitions %s", adopted,
                                 sorted(s.partition for s in found))
            except StateMismatch as err:  # whose it is cannot be told: each partition is imported again alone
                return set(), {snap.partition: err for snap in found}
        # One import per state layout: a partition checkpointed before a change of watcher (--drift-detector) and
        # not since holds the old watcher's arrays, which the engine restarts afresh, but which cannot be one table
        # with the new ones (a restore of both failed on every restart)
        layouts: dict[frozenset[str], list[Snapshot]] = {}
        for snap in found:
            layouts.setdefault(frozenset(snap.rows.arrays), []).append(snap)
        refused: set[str] = set()
        unfit: dict[int, Exception] = {}
        n_rows = 0
        for group in layouts.values():
            n, out = self._import_group(group, fresh, unfit)
            n_rows, refused = n_rows + n, refused | out
        self.metrics.restored_series.inc(n_rows - len(refused))
        log.info("restored %d series of partitions %s", n_rows - len(refused),
                 sorted(s.partition for s in found if s.partition not in unfit))
        if refused:
            log.warning("%d restored series are not accepted by this member (%s): their state is kept unchanged in "
                        "the partitions' checkpoints and their records are dead-lettered as unknown_series until "
                        "rows free up here or another member takes them; raise --max-series (or widen "
                        "--allowed-series) to serve them", len(refused), self.engine.refusal(sorted(refused)[0]))
        return refused, unfit

    def _import_group(self, group: list[Snapshot], fresh: bool, unfit: dict[int, Exception]) -> tuple[int, set[str]]:
        """Import snapshots of one layout in one go; if they do not fit, one partition at a time, to find the one at
        fault (noted in ``unfit``, nothing of it imported). Returns rows imported and ids refused."""
        try:
            return self._import_rows([snap.rows for snap in group], fresh)
        except (StateMismatch, IncompatibleState) as err:
            if len(group) == 1:
                unfit[group[0].partition] = err
                return 0, set()
        alone = [self._import_group([snap], fresh, unfit) for snap in group]
        return sum(n for n, _ in alone), set().union(*(out for _, out in alone))

    def _import_rows(self, parts: list[SeriesRows], fresh: bool) -> tuple[int, set[str]]:
        """Import rows of one layout; returns how many and the ids the engine did not accept."""
        rows = SeriesRows.concat(parts)
        # Import in the exporter's row order ("slot"), and into those very rows when this engine held no series:
        # a process restoring its own state gets every series back where it was, which keeps row-indexed
        # shared state (e.g. a replay buffer's plan) pointing at the right series.
        rows = rows.take(np.argsort([_slot(m) or 0 for m in rows.meta], kind="stable"))
        wanted = [{"series_id": m["series_id"]} | ({"row": _slot(m)} if fresh and _slot(m) is not None else {})
                  for m in rows.meta]
        return len(rows), {wanted[i]["series_id"] for i in self.engine.import_series(wanted, rows.arrays)}


def _slot(item: dict[str, Any]) -> int | None:
    """The exporter's row of a series in saved meta (JSON, so anything: only a plain int in int64 counts)."""
    slot = item.get("slot")
    return slot if type(slot) is int and 0 <= slot < 2**63 else None


def model_versions_of(shared: SharedState) -> dict[str, int]:
    """Each lane's model version in saved shared state."""
    return {model: shared_version(meta) for model, (_arrays, meta) in shared.items()}


def _behind(st: PartitionState, versions: dict[str, int]) -> bool:
    """Whether the partition's last checkpoint holds an older model version of a lane than the engine serves."""
    return st.position is not None and any(st.model_versions.get(m, 0) < v for m, v in versions.items())


def _newest_shared(snapshots: list[Snapshot]) -> SharedState:
    """Per model, the shared state (a backbone) of the highest model version among the snapshots, the one written
    last on a tie. The version decides, not the time: a partition restored from the changelog is stamped when it
    was restored, so a new member assigned an older partition last took its older model."""
    chosen: SharedState = {}
    for snap in sorted(snapshots, key=lambda s: s.written_at):
        for model, (arrays, meta) in nonempty_shared(snap.shared).items():
            if model not in chosen or shared_version(meta) >= shared_version(chosen[model][1]):
                chosen[model] = (arrays, meta)
    return chosen
