"""The partition table on its own: ownership, checkpoint order, restore, release, with in-memory stores."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tidecast.monitors.metrics import Metrics
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.kafka import OutputError
from tidecast.stream.partitioner import HomePartitions
from tidecast.stream.partitions import PartitionTable
from tidecast.stream.records import REASONS
from tidecast.stream.state import (
    MARKER_KEY,
    SHARED_KEY_PREFIX,
    IncompatibleState,
    Snapshot,
    TailReader,
    marker_record,
    series_record,
    shared_record,
)

CONFIG = EngineConfig(horizon=4, model_params={"seasonal-naive": {"period": 6}})
HOUR = 3_600_000_000_000


class MemoryChangelog:
    """A changelog topic in memory: the real record format, folded back by the real TailReader."""

    topic = "changelog"

    def __init__(self, journal: list) -> None:
        self.log: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        self.journal = journal
        self.reads: list[tuple[int, int]] = []

    def write(self, groups, config):
        self.journal.append(("changelog", sorted(p for p, *_ in groups)))
        ends = {}
        for partition, rows, shared, position in groups:
            log = self.log[partition]
            log += [(sid.encode(), series_record(one.meta[0], one.arrays)) for sid, one in rows.rows()]
            log += [((SHARED_KEY_PREFIX + m).encode(), shared_record(m, a, meta)) for m, (a, meta) in shared.items()]
            log.append((MARKER_KEY.encode(), marker_record(position, config, len(rows))))
            ends[partition] = len(log)
        return ends

    def read(self, partition, start):
        self.reads.append((partition, start))
        reader = TailReader(start)
        log = self.log[partition]
        for offset in range(start, len(log)):
            reader.add(offset, *log[offset])
        return reader.finish(len(log))


class MemoryLocal:
    """Local snapshots in memory, round-tripped through the blob format."""

    def __init__(self, journal: list) -> None:
        self.snapshots: dict[int, bytes] = {}
        self.journal = journal

    def save(self, snapshot: Snapshot) -> None:
        self.journal.append(("local", snapshot.partition))
        self.snapshots[snapshot.partition] = snapshot.to_blob()

    def load(self, partition: int) -> Snapshot | None:
        blob = self.snapshots.get(partition)
        return Snapshot.from_blob(blob) if blob is not None else None

    def path(self, partition: int) -> Path:
        return Path(f"memory/partition-{partition}")


class RecordingSink:
    def __init__(self, journal: list, name: str) -> None:
        self.journal, self.name = journal, name
        self.failure: Exception | None = None

    def flush(self) -> None:
        self.journal.append(("flush", self.name))
        if self.failure is not None:
            raise self.failure


def make_table(changelog: MemoryChangelog | None = None, local: MemoryLocal | None = None,
               config: EngineConfig = CONFIG) -> tuple[PartitionTable, list]:
    journal: list = changelog.journal if changelog is not None else []
    metrics = Metrics(reasons=REASONS)
    sinks = (RecordingSink(journal, "forecasts"), RecordingSink(journal, "dead letters"))
    table = PartitionTable("obs", Engine.from_config(config, metrics), changelog or MemoryChangelog(journal),
                           local or MemoryLocal(journal), metrics, sinks)
    return table, journal


def observations(partition: int, series: list[str], steps: range, offset0: int) -> ObservationBatch:
    rows = [(s, k) for k in steps for s in series]
    return ObservationBatch(np.array([s for s, _ in rows], dtype=object), np.array([k * HOUR for _, k in rows]),
                            np.array([np.sin(k) + len(s) for s, k in rows]), np.full(len(rows), partition, np.int32),
                            np.arange(offset0, offset0 + len(rows)))


def apply(table: PartitionTable, batch: ObservationBatch):
    """What the worker does between decoding and the sinks."""
    for p in set(batch.partitions.tolist()):
        table.advance({p: int(batch.offsets[batch.partitions == p].max()) + 1})
    screened = table.screen(batch)
    kept = batch.take(screened.keep)
    if len(kept):
        table.engine.process(kept)
        known = set(table.engine.series_ids)  # the worker's rule: a new series the engine refused is nobody's
        table.applied(kept, screened.new_owners, {sid for sid in screened.new_owners if sid not in known})
    return screened


def state(engine: Engine) -> dict[str, np.ndarray]:
    return engine.export_series(sorted(engine.series_ids))[1]


def restored_series(table: PartitionTable) -> float:
    return table.metrics.registry.get_sample_value("tidecast_state_restored_series_total")


def test_checkpoint_makes_outputs_then_changelog_then_local_state_durable_and_returns_the_positions():
    table, journal = make_table()
    assert table.restore({0, 1}, {0, 1}) == {0: None, 1: None}  # nothing saved: the committed offsets rule
    apply(table, observations(0, ["a", "b"], range(10), 0))
    apply(table, observations(1, ["c"], range(10), 0))
    assert table.checkpoint() == {0: 20, 1: 10}
    assert journal == [("flush", "forecasts"), ("flush", "dead letters"), ("changelog", [0, 1]),
                       ("local", 0), ("local", 1)]
    assert table.checkpoint() == {}  # nothing changed since: nothing flushed, nothing written
    assert len(journal) == 5
    apply(table, observations(1, ["c"], range(10, 12), 10))
    assert table.checkpoint() == {1: 12} and journal[-1] == ("local", 1)


def test_refused_outputs_stop_the_checkpoint_before_any_state_is_written():
    table, journal = make_table()
    table.restore({0}, {0})
    apply(table, observations(0, ["a"], range(5), 0))
    table.outputs[1].failure = OutputError("the broker refused a dead letter")
    with pytest.raises(OutputError):
        table.checkpoint()
    assert [kind for kind, _ in journal] == ["flush", "flush"]
    assert not any(table.changelog.log.values()) and not table.local.snapshots
    table.outputs[1].failure = None
    assert table.checkpoint() == {0: 5}  # nothing was marked saved: the next checkpoint writes it all


def test_a_series_stays_on_its_first_partition_and_restored_records_are_skipped():
    table, _ = make_table()
    table.restore({0, 1}, {0, 1})
    apply(table, observations(0, ["a"], range(6), 0))
    stray = apply(table, observations(1, ["a", "c"], range(6, 7), 0))
    assert [(row, owner) for row, owner, _ in stray.misrouted] == [(0, 0)]
    assert stray.keep.tolist() == [1] and table.owner_of("c") == 1
    table.checkpoint()

    again, _ = make_table(table.changelog, MemoryLocal([]))  # another machine: changelog only
    assert again.restore({0}, {0}) == {0: 6}
    redelivered = apply(again, observations(0, ["a"], range(3, 8), 3))  # offsets 3..7; a applied up to 5
    assert redelivered.skipped == 3 and redelivered.keep.tolist() == [3, 4]
    assert again.owner_of("a") == 0 and again.owner_of("c") is None  # c lives on partition 1, not restored


def test_restore_merges_the_local_snapshot_with_the_changelog_written_after_it():
    table, journal = make_table()
    table.restore({0}, {0})
    apply(table, observations(0, ["a", "b"], range(20), 0))
    table.checkpoint()
    local = MemoryLocal([])
    local.snapshots = dict(table.local.snapshots)  # this machine saw the first checkpoint only
    first_end = len(table.changelog.log[0])
    apply(table, observations(0, ["a"], range(20, 30), 40))
    table.checkpoint()

    other, _ = make_table(table.changelog, local)
    gauge = other.metrics.registry.get_sample_value
    assert gauge("tidecast_last_checkpoint_timestamp_seconds") == 0
    assert other.restore({0}, {0}) == {0: 50}
    # all it holds is durable: the checkpoint age starts from the restore, not from 1970 (an idle member's panel)
    assert gauge("tidecast_last_checkpoint_timestamp_seconds") > 1e9
    assert table.changelog.reads[-1] == (0, first_end)  # read on from where the snapshot left off
    assert restored_series(other) == 2
    for key, value in state(table.engine).items():
        np.testing.assert_array_equal(state(other.engine)[key], value, err_msg=key)


def test_a_released_partition_comes_back_from_memory_unless_another_member_wrote_since():
    table, _ = make_table()
    table.restore({0}, {0})
    apply(table, observations(0, ["a"], range(8), 0))
    assert table.release({0}) == {0: 8}
    assert not table.owns(0) and 0 in table.released and table.owner_of("a") is None
    assert table.restore({0}, {0}) == {0: 8} and restored_series(table) == 0  # straight back: memory is current

    table.release({0})
    other, _ = make_table(table.changelog, MemoryLocal([]))
    other.restore({0}, {0})
    apply(other, observations(0, ["a"], range(8, 12), 8))
    other.checkpoint()
    assert table.restore({0}, {0}) == {0: 12} and restored_series(table) == 1  # the newer state wins
    for key, value in state(other.engine).items():
        np.testing.assert_array_equal(state(table.engine)[key], value, err_msg=key)


def test_released_partitions_given_to_another_member_and_lost_ones_are_dropped_without_writing():
    table, journal = make_table()
    table.restore({0, 1}, {0, 1})
    apply(table, observations(0, ["a"], range(4), 0))
    apply(table, observations(1, ["c"], range(4), 0))
    table.release({0})
    written = len(journal)
    table.restore(set(), {1})  # the rebalance gave partition 0 to someone else
    assert 0 not in table.released and table.engine.series_ids == ["c"]
    table.forget({1})  # lost: unsaved changes go, whoever owns it next restores from durable state
    assert table.engine.series_ids == [] and table.owner_of("c") is None and len(journal) == written


def test_a_new_series_gets_the_same_row_after_a_restore_as_without_it():
    """Free rows are reused lowest first, a choice that depends only on which rows hold series: a stack gave the
    last dropped row, which a restored engine (whose free rows are the gaps below its highest series) does not
    know, so a new series took another row and row-indexed shared state (cfc's replay draws) diverged."""
    table, _ = make_table()
    table.restore({0, 1}, {0, 1})
    apply(table, observations(0, ["a", "b"], range(4), 0))
    apply(table, observations(1, ["c", "d"], range(4), 0))
    assert table.engine.series_rows() == {"a": 0, "b": 1, "c": 2, "d": 3}
    table.release({1})
    table.restore(set(), {0})  # c and d left: rows 2 and 3 free, 3 freed last
    table.checkpoint()
    other, _ = make_table(table.changelog, MemoryLocal([]))
    other.restore({0}, {0})
    for t in (table, other):
        apply(t, observations(0, ["e", "f"], range(4, 6), 8))
    assert table.engine.series_rows() == other.engine.series_rows() == {"a": 0, "b": 1, "e": 2, "f": 3}


def test_restored_series_beyond_max_series_are_parked_and_ride_along_until_rows_free_up():
    """A scale-in hands a member more series than its max_series (or a narrower allowed_series): the restore
    raised and the member crash-looped. Now the series left out keep their state unchanged in the partition's
    checkpoints, their records are refused, and they are restored once rows free up here or elsewhere."""
    table, _ = make_table()
    table.restore({0, 1}, {0, 1})
    apply(table, observations(0, ["a", "b"], range(10), 0))
    apply(table, observations(1, ["c", "d"], range(10), 0))
    table.checkpoint()
    before = dict(zip(table.engine.series_ids, table.engine.export_series(table.engine.series_ids)[0], strict=True))

    small, _ = make_table(table.changelog, MemoryLocal([]),
                          EngineConfig(horizon=4, model_params={"seasonal-naive": {"period": 6}}, max_series=3))
    assert small.restore({0, 1}, {0, 1}) == {0: 20, 1: 20}
    assert len(small.engine.series_ids) == 3 and restored_series(small) == 3
    parked = [(p, sid) for p in (0, 1) for sid in small.owned[p].parked.series_ids]
    assert len(parked) == 1
    (home, sid), = parked
    apply(small, observations(home, [sid], range(10, 12), 20))  # its records: not taken in
    assert sid not in small.engine.series_ids
    small.checkpoint()

    roomy, _ = make_table(small.changelog, MemoryLocal([]))  # the next member with room: all four, as they were
    roomy.restore({0, 1}, {0, 1})
    assert sorted(roomy.engine.series_ids) == ["a", "b", "c", "d"] and len(before) == 4
    original = table.engine.export_series([sid])[1]
    for key, value in roomy.engine.export_series([sid])[1].items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)

    small.forget({1 - home})  # rows free up here: the parked series is taken in, and checkpointed as its own
    assert sid in small.engine.series_ids and not len(small.owned[home].parked)
    assert small.owner_of(sid) == home and small.checkpoint() == {home: 22}

    narrow, _ = make_table(table.changelog, MemoryLocal([]), EngineConfig(
        horizon=4, model_params={"seasonal-naive": {"period": 6}}, allowed_series=["a", "b", "c"]))
    narrow.restore({0, 1}, {0, 1})  # (it raised too)
    assert sorted(narrow.engine.series_ids) == ["a", "b", "c"] and narrow.owned[1].parked.series_ids == ["d"]


def test_a_parked_series_after_a_rewind_is_refused_not_skipped_and_never_claimed():
    """Found by the serve review (2026-12-04): a rewind (topic recreated) cleared the skip floors of the served
    series only; the parked series' new-log records were skipped against its old offsets (counted as
    re-deliveries), the skip made it its partition's although the engine held no state for it, and the next
    checkpoint raised KeyError on the worker thread: the member stopped, at every restart."""
    table, _ = make_table()
    table.restore({0}, {0})
    apply(table, observations(0, ["a", "b"], range(10), 0))
    table.checkpoint()
    small, _ = make_table(table.changelog, MemoryLocal([]),
                          EngineConfig(horizon=4, model_params={"seasonal-naive": {"period": 6}}, max_series=1))
    small.restore({0}, {0})
    (sid,) = small.owned[0].parked.series_ids
    other = next(s for s in ("a", "b") if s != sid)
    small.rewind(0, 0)  # the log starts again at offset 0
    screened = apply(small, observations(0, [other, sid], range(20, 25), 0))
    assert screened.skipped == 0 and sid in screened.new_owners  # handed on, and refused by the engine
    assert sid not in small.engine.series_ids and small.owner_of(sid) is None
    assert small.owned[0].parked.series_ids == [sid]
    assert small.checkpoint() == {0: 10}


def test_a_lost_partitions_skip_floors_leave_with_it():
    """Found by the serve review (2026-12-04): forget dropped a partition's series but kept their re-delivery floors
    (old-log offsets); when the partition came back after another member had rewound it (topic recreated), the new
    log's records were skipped against them, silently."""
    table, _ = make_table()
    table.restore({0}, {0})
    apply(table, observations(0, ["a", "b"], range(10), 0))
    table.checkpoint()
    member, _ = make_table(table.changelog, MemoryLocal([]))
    member.restore({0}, {0})  # floors at the restored offsets
    member.forget({0})  # lost (no final checkpoint of its own)
    other, _ = make_table(table.changelog, MemoryLocal([]))
    other.restore({0}, {0})
    other.rewind(0, 0)
    other.checkpoint()  # the new owner saw the log go back: the applied offsets are forgotten
    log = table.changelog.log[0]  # a real restore reads the last group only (read_latest); this fake folds the
    last = {key: at for at, (key, _) in enumerate(log)}  # whole log, so compact it: the last record of each key
    log[:] = [(key, value if last[key] == at else None) for at, (key, value) in enumerate(log)]
    member.restore({0}, {0})  # the partition comes back
    screened = apply(member, observations(0, ["a", "b"], range(20, 25), 0))
    assert screened.skipped == 0 and len(screened.keep) == 10


def test_state_written_under_another_engine_configuration_is_refused():
    table, _ = make_table()
    table.restore({0}, {0})
    apply(table, observations(0, ["a"], range(4), 0))
    table.checkpoint()
    other, _ = make_table(MemoryChangelog([]), table.local, EngineConfig(horizon=6))
    with pytest.raises(IncompatibleState, match="horizon"):
        other.restore({0}, {0})


def test_screening_per_series_agrees_with_screening_row_by_row():
    """``screen`` checks a batch once per (series, partition) when every row is applied; whatever the batch, it
    must sort the rows exactly as the row-by-row path does (misrouted series, home partitions, re-deliveries)."""
    rng = np.random.default_rng(0)
    table, _ = make_table()
    table.homes = HomePartitions(2)
    pool = [f"s{i}" for i in range(12)]
    home = {s: table.homes(s) for s in pool}
    table.restore({0, 1}, {0, 1})
    offsets = {0: 0, 1: 0}
    fast_taken = 0

    def check(batch: ObservationBatch) -> None:
        nonlocal fast_taken
        fast_taken += table._screen_all_kept(batch) is not None
        floors = dict(table._floors)  # the row-by-row path drops the floors it passes: both must see them
        want = table._screen_rows(batch)
        table._floors = floors
        got = table.screen(batch)
        assert got.keep.tolist() == want.keep.tolist() and got.skipped == want.skipped
        assert got.new_owners == want.new_owners and got.misrouted == want.misrouted
        kept = batch.take(got.keep)
        if len(kept):
            table.engine.process(kept)
            table.applied(kept, got.new_owners, set())

    for step in range(40):
        series = rng.choice(pool, size=int(rng.integers(1, 6)), replace=False).tolist()
        stray = step % 7 == 3  # now and then a series on a partition it does not live on
        partition = int(rng.integers(0, 2))
        on = [s for s in series if stray or home[s] == partition] or [next(s for s in pool if home[s] == partition)]
        batch = observations(partition, on, range(step, step + 1), offsets[partition])
        offsets[partition] += len(batch)
        table.advance({partition: offsets[partition]})
        check(batch)
    table.checkpoint()
    again, _ = make_table(table.changelog, MemoryLocal([]))  # restored from the changelog: re-delivery floors
    again.homes = table.homes
    table = again
    table.restore({0, 1}, {0, 1})
    for partition in (0, 1):
        own = [s for s in pool if home[s] == partition]
        check(observations(partition, own, range(38, 42), max(0, offsets[partition] - 3 * len(own))))
    assert 10 <= fast_taken < 42  # both paths ran


@pytest.mark.parametrize("reuse", [True, False])
def test_a_restore_puts_every_series_back_in_its_own_row(reuse):
    """Row-indexed shared state (a replay buffer's sampling plan) must find the same series in the same rows after
    a restart: the checkpoint keeps each series' row, not its place in the engine's list of series (which differ
    once a dropped series' row is reused, or left free)."""
    table, _ = make_table()
    table.restore({0, 1}, {0, 1})
    apply(table, observations(0, ["a"], range(4), 0))
    apply(table, observations(1, ["c", "d"], range(4), 0))
    table.release({0})
    table.restore(set(), {1})  # partition 0 went to another member: "a" dropped, its row 0 freed
    if reuse:
        apply(table, observations(1, ["e"], range(4, 8), 8))  # takes row 0
    table.checkpoint()
    rows = table.engine.series_rows()
    assert rows["c"] == 1 and rows["d"] == 2 and (rows.get("e") == 0) == reuse

    other, _ = make_table(table.changelog, MemoryLocal([]))
    other.restore({1}, {1})
    assert other.engine.series_rows() == rows
    apply(other, observations(1, ["f"], range(4, 8), 20))  # a new series still gets a free row
    assert other.engine.series_rows()["f"] not in rows.values()


# -- found by the state review (2026-12-04) --------------------------------------------------------------------
def noisy(partition: int, series: list[str], steps: range, offset0: int, seed: int) -> ObservationBatch:
    """Like :func:`observations`, with noise: river states (JSON) of different lengths per partition."""
    batch = observations(partition, series, steps, offset0)
    batch.values[:] += np.random.default_rng(seed).normal(0, 0.37, len(batch.values))
    return batch


def test_river_lanes_restore_several_partitions_together():
    """Each export pads its river JSON to its own longest state: two partitions' blobs differ in width, and a
    restore of both (or a checkpoint beside a parked series) raised on every restart."""
    config = EngineConfig(horizon=4, models=["holt-winters"], freq="1h")
    table, _ = make_table(config=config)
    table.restore({0, 1}, {0, 1})
    apply(table, noisy(0, ["a", "b"], range(60), 0, seed=1))
    apply(table, noisy(1, ["d"], range(60), 0, seed=2))
    table.checkpoint()
    widths = {p: table.local.load(p).rows.arrays["holt-winters/model/json"].shape[1] for p in (0, 1)}
    assert widths[0] != widths[1]  # the case that failed
    other, _ = make_table(MemoryChangelog([]), table.local, config)
    other.restore({0, 1}, {0, 1})
    assert sorted(other.engine.series_ids) == ["a", "b", "d"]
    for key, value in state(table.engine).items():
        np.testing.assert_array_equal(state(other.engine)[key], value, err_msg=key)


def test_a_changed_drift_detector_restores_a_partition_checkpointed_before_it_and_keeps_parked_state():
    """README: state saved for another detector restores with the watcher's rows afresh. A partition quiet since
    the change kept the old watcher's arrays and a restore with a newer one failed on every restart; a series
    parked meanwhile lost its whole state (model, calibrator, grid) at the next checkpoint."""
    base = {"horizon": 4, "model_params": {"seasonal-naive": {"period": 6}}}
    first, _ = make_table(config=EngineConfig(**base))
    first.restore({0, 1}, {0, 1})
    apply(first, observations(0, ["a", "b", "c"], range(30), 0))
    apply(first, observations(1, ["d"], range(30), 0))
    first.checkpoint()
    changelog, local = first.changelog, first.local
    second, _ = make_table(changelog, local, EngineConfig(**base, drift_detector="d3a", max_series=2))
    second.restore({0, 1}, {0, 1})
    assert sorted(second.engine.series_ids) == ["a", "b"]  # c and d parked: max_series
    apply(second, observations(0, ["a", "b"], range(30, 40), 90))
    second.checkpoint()  # partition 0 (c parked in it) in the new layout; partition 1 (d, nothing new) as it was
    third, _ = make_table(changelog, local, EngineConfig(**base, drift_detector="d3a"))
    third.restore({0, 1}, {0, 1})
    assert sorted(third.engine.series_ids) == ["a", "b", "c", "d"]
    for sid in ("c", "d"):
        before, after = first.engine.export_series([sid])[1], third.engine.export_series([sid])[1]
        for key in ("seasonal-naive/model/buffer", "engine/last_tick"):
            np.testing.assert_array_equal(after[key], before[key], err_msg=f"{sid} {key}")


def test_alpha_and_its_one_level_are_the_same_configuration():
    from tidecast.stream.state import check_fingerprint, config_fingerprint

    as_alpha = config_fingerprint(EngineConfig(alpha=0.1).to_dict())
    as_level = config_fingerprint(EngineConfig(levels=[90]).to_dict())
    check_fingerprint(as_alpha, as_level, "here")
    check_fingerprint(as_level, as_alpha, "here")
    with pytest.raises(IncompatibleState, match=r"'levels': \(\[80.0, 95.0\], \[80.0\]\)"):
        check_fingerprint(config_fingerprint(EngineConfig(levels=[80, 95]).to_dict()),
                          config_fingerprint(EngineConfig(alpha=0.2).to_dict()), "here")


def test_settings_that_name_the_same_grid_or_gap_are_the_same_configuration():
    """``--freq 1h`` and ``60min``, or the default gap limit and ``--max-gap`` set to it (the horizon), were refused
    as a different configuration: the error's only advice was to start over with a new group id."""
    from tidecast.stream.state import check_fingerprint, config_fingerprint

    def fingerprint(**kw):
        return config_fingerprint(EngineConfig(horizon=4, **kw).to_dict())

    check_fingerprint(fingerprint(freq="1h"), fingerprint(freq="60min"), "here")
    check_fingerprint(fingerprint(freq="h"), fingerprint(freq="3600s"), "here")
    check_fingerprint(fingerprint(), fingerprint(max_gap=4), "here")
    with pytest.raises(IncompatibleState, match=r"'freq': \('1h', '30min'\)"):
        check_fingerprint(fingerprint(freq="1h"), fingerprint(freq="30min"), "here")
    with pytest.raises(IncompatibleState, match=r"'max_gap': \(None, 5\)"):
        check_fingerprint(fingerprint(), fingerprint(max_gap=5), "here")
    with pytest.raises(IncompatibleState, match="freq"):
        check_fingerprint(fingerprint(), fingerprint(freq="1h"), "here")


def test_a_new_member_takes_the_highest_model_version_among_its_partitions_not_the_last_restored():
    """Found by the checkpoint review (2026-12-04): the shared state (a backbone) came from the snapshot with the
    latest written_at, and a partition restored from the changelog was stamped at restore time, so a new member
    assigned two partitions took whichever it restored last: an older model version. The version decides now,
    and a restored partition keeps its marker's time."""
    from tidecast.stream.partitions import _newest_shared
    from tidecast.stream.state import SeriesRows, merge

    def snapshot(version: int, written_at: float) -> Snapshot:
        shared = {"cyclenet": ({"w": np.full(3, float(version))}, {"retrain": {"policy": {"version": version}}})}
        rows = SeriesRows([{"series_id": f"s{version}"}], {"engine/applied_offset": np.array([1])})
        return Snapshot("t", version, 1, 0, None, rows, shared, written_at)

    newer_model_written_first, older_model_written_last = snapshot(2, 100.0), snapshot(1, 200.0)
    chosen = _newest_shared([older_model_written_last, newer_model_written_first])
    assert chosen["cyclenet"][0]["w"].tolist() == [2.0, 2.0, 2.0]
    reader = TailReader("changelog[0]")
    reader.add(0, MARKER_KEY, marker_record(5, None, 0))
    tail = reader.finish(1)
    assert 0 < tail.written_at <= merge(None, tail, "t", 0).written_at == tail.written_at


# -- found by the restart-with-changed-settings review (2026-12-05) ---------------------------------------------
@pytest.mark.parametrize("later", [{"retrain": "on", "history": 48}, {"retrain": "off"}, {"retrain": "on",
                                                                                           "history": 0}])
def test_a_changed_retrain_ring_keeps_a_parked_series_state(later):
    """README: the retrain settings are not part of the restore check, and a parked series' state rides along
    unchanged. A ring of another size made every checkpoint beside a parked series raise (serve exited 2 at every
    restart); turning retraining off or on dropped the parked series' whole state at the next checkpoint."""
    def config(retrain: str = "on", history: int = 24, **extra) -> EngineConfig:
        params = {"min_fresh": 24, "shadow_steps": 24, "history": history, "cooldown": 1000}
        return EngineConfig(horizon=4, models=["holt-winters"], freq="1h", retrain=retrain,
                            model_params={"holt-winters": {"period": 24, "warmup": 48}},
                            retrain_params=params if retrain == "on" else {}, **extra)

    first, _ = make_table(config=config())
    first.restore({0}, {0})
    apply(first, noisy(0, ["a", "bb", "ccc"], range(120), 0, seed=3))
    first.checkpoint()
    changelog, local = first.changelog, first.local
    second, _ = make_table(changelog, local, config(**later, max_series=2))
    second.restore({0}, {0})
    assert len(second.owned[0].parked) == 1
    apply(second, noisy(0, ["a", "bb"], range(120, 130), 360, seed=4))
    second.checkpoint()  # raised IncompatibleState (ring size) / dropped the parked state (on <-> off)
    third, _ = make_table(changelog, local, config(**later))
    third.restore({0}, {0})
    assert sorted(third.engine.series_ids) == ["a", "bb", "ccc"]
    (parked,) = second.owned[0].parked.series_ids
    before, after = first.engine.export_series([parked])[1], third.engine.export_series([parked])[1]
    for key in ("holt-winters/model/json", "holt-winters/cal/scale", "engine/last_tick"):
        if key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert {"holt-winters/model/json", "engine/last_tick"} <= set(before)
    if later.get("history"):  # the ring restarts whole: a count kept beside emptied values claimed values
        assert after["holt-winters/model/history_count"].tolist() == [0]  # (a refit then learned NaN)
        assert np.isnan(after["holt-winters/model/history_values"]).all()


def test_a_parked_series_watcher_restarts_whole_when_its_layout_changes():
    """Review (2026-12-05): a D3A window grown from 16 to 32 kept the parked series' count and first 16 losses
    beside 16 zeros it never saw, which its mean of the last window then averaged."""
    base = {"horizon": 4, "model_params": {"seasonal-naive": {"period": 6}}, "drift_detector": "d3a"}
    first, _ = make_table(config=EngineConfig(**base, drift_params={"window": 16}))
    first.restore({0}, {0})
    apply(first, noisy(0, ["a", "bb", "ccc"], range(60), 0, seed=5))
    first.checkpoint()
    changelog, local = first.changelog, first.local
    grown = EngineConfig(**base, drift_params={"window": 32})
    second, _ = make_table(changelog, local, replace(grown, max_series=2))
    second.restore({0}, {0})
    (parked,) = second.owned[0].parked.series_ids
    apply(second, noisy(0, [sid for sid in ("a", "bb", "ccc") if sid != parked], range(60, 70), 180, seed=6))
    second.checkpoint()  # the parked series beside the others, in the new layout
    third, _ = make_table(changelog, local, grown)
    third.restore({0}, {0})
    saved = first.engine.export_series([parked])[1]
    restored = third.engine.export_series([parked])[1]
    assert saved["seasonal-naive/drift/det/n"].item() > 16
    fresh = third.engine._blank
    for key in restored:
        if key.startswith("seasonal-naive/drift/"):
            np.testing.assert_array_equal(restored[key][0], fresh[key][0], err_msg=key)
    np.testing.assert_array_equal(restored["seasonal-naive/model/buffer"], saved["seasonal-naive/model/buffer"])


def test_a_changed_horizon_is_named_alone_not_with_the_max_gap_that_follows_it():
    """Review (2026-12-05): the refusal listed ``'max_gap': (None, None)`` beside the horizon the operator changed."""
    from tidecast.stream.state import check_fingerprint, config_fingerprint

    def fingerprint(**kw):
        return config_fingerprint(EngineConfig(**kw).to_dict())

    with pytest.raises(IncompatibleState) as refused:
        check_fingerprint(fingerprint(horizon=6), fingerprint(horizon=8), "here")
    assert "'horizon': (6, 8)" in str(refused.value) and "max_gap" not in str(refused.value)
    with pytest.raises(IncompatibleState, match=r"'max_gap': \(6, 8\)"):  # set as written: still named
        check_fingerprint(fingerprint(horizon=6, max_gap=6), fingerprint(horizon=8, max_gap=8), "here")
