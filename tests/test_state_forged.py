"""State that passes its checksum but is malformed (a writer bug, a layout from elsewhere, a forged file): refused
and restored from elsewhere, never a traceback that stops serve on every restart (no broker needed)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from test_serve_worker import FakeProducer, assign, feed, make_worker, records, sample

from tidecast.stream import state
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine, StateMismatch
from tidecast.stream.messages import AssignPartitions, Stop
from tidecast.stream.state import (
    CorruptState,
    LocalStateStore,
    SeriesRows,
    Snapshot,
    TailReader,
    decode_blob,
    encode_blob,
    marker_record,
    series_record,
)


def raw_blob(meta_bytes: bytes) -> bytes:
    """A blob with these metadata bytes and a valid checksum (encode_blob only writes JSON objects)."""
    body = state._META_LEN.pack(len(meta_bytes)) + meta_bytes
    return state._HEADER.pack(state.MAGIC, state.FORMAT_VERSION, hashlib.sha256(body).digest()) + body


@pytest.mark.parametrize("meta", [b"[1]", b'"text"', b"1", b"[" * 100_000 + b"]" * 100_000])
def test_metadata_that_is_no_json_object_is_corrupt_state(meta):
    with pytest.raises(CorruptState):
        decode_blob(raw_blob(meta))


def snapshot_blob(meta_change=None, arrays_change=None) -> bytes:
    rows = SeriesRows([{"series_id": "a"}, {"series_id": "b"}], {"engine/x": np.zeros(2), "engine/y": np.ones((2, 3))})
    meta, arrays = decode_blob(Snapshot("t", 0, 5, 3, None, rows, group="g").to_blob())
    if meta_change:
        meta_change(meta)
    if arrays_change:
        arrays = arrays_change(arrays)
    return encode_blob(meta, arrays)


FORGED = {
    "no series": (lambda m: m.pop("series"), None),
    "series an int": (lambda m: m.update(series=3), None),
    "an item without an id": (lambda m: m["series"][0].pop("series_id"), None),
    "an id twice": (lambda m: m["series"][1].update(series_id="a"), None),
    "shared a list": (lambda m: m.update(shared=[1]), None),
    "negative position": (lambda m: m.update(position=-5), None),
    "position past int64": (lambda m: m.update(position=10**30), None),
    "arrays of one series": (None, lambda a: {k: v[:1] for k, v in a.items()}),
    "arrays of three series": (None, lambda a: {k: np.concatenate([v, v[:1]]) for k, v in a.items()}),
}


@pytest.mark.parametrize("name", FORGED)
def test_a_malformed_snapshot_behind_a_valid_checksum_is_refused_by_the_store(tmp_path, name):
    blob = snapshot_blob(*FORGED[name])
    with pytest.raises(CorruptState):
        Snapshot.from_blob(blob)
    store = LocalStateStore(tmp_path, "g", "t")
    store.path(0).write_bytes(blob)
    assert store.load(0) is None and store.skipped == 1  # logged; the changelog takes over


def test_a_changelog_record_with_malformed_metadata_is_skipped_and_the_rest_restored():
    reader = TailReader(0, quiet=True)
    good = series_record({"series_id": "a"}, {"engine/x": np.zeros(1)})
    reader.add(0, b"a", good)
    reader.add(1, b"x", raw_blob(b"[1]"))  # a list where an object belongs: AttributeError escaped before
    reader.add(2, state._MARKER, raw_blob(b"[" * 50_000 + b"]" * 50_000))  # RecursionError escaped before
    reader.add(3, state._MARKER, encode_blob({"kind": "checkpoint", "position": 10**30}, {}))
    reader.add(4, b"\x00checkpoint", marker_record(7, None, 1, 2))
    tail = reader.finish(5)
    assert tail.n_skipped == 3 and list(tail.rows) == ["a"] and tail.position == 7


def test_an_engine_import_that_does_not_fit_leaves_no_series_behind():
    engine = Engine.from_config(EngineConfig(horizon=6, model_params={"seasonal-naive": {"period": 12}}))
    good_meta = [{"series_id": "a"}, {"series_id": "b"}]
    blank = engine._blank
    arrays = {k: np.repeat(v, 2, axis=0) for k, v in blank.items()}
    broken = dict(arrays)
    broken.pop(sorted(k for k in broken if not k.startswith("engine/"))[0])
    with pytest.raises(StateMismatch):
        engine.import_series(good_meta, broken)
    assert engine.series_ids == []  # nothing half-imported
    engine.import_series(good_meta, arrays)  # the rows it freed take a good import
    assert sorted(engine.series_ids) == ["a", "b"]


def test_an_implausible_saved_row_is_not_honoured():
    """A forged row of 10**9 pushed 10**9 free rows (minutes and gigabytes) before the import."""
    engine = Engine.from_config(EngineConfig(horizon=6, model_params={"seasonal-naive": {"period": 12}}))
    arrays = {k: v.copy() for k, v in engine._blank.items()}
    engine.import_series([{"series_id": "a", "row": 10**9}], arrays)
    assert engine.series_rows() == {"a": 0}


@pytest.mark.parametrize("how", ["missing array", "misshapen array", "wrong row count"])
def test_serve_restores_from_the_changelog_when_the_local_snapshot_does_not_fit(tmp_path, how):
    producer = FakeProducer()
    first, results = make_worker(tmp_path, producer)
    assign(first, results, {0, 1})
    feed(first, 0, records(0, ["a", "b"], range(30), 0))
    assert first.table.checkpoint([0]) == {0: 60}
    expected = first.engine.export_series(["a", "b"])[1]
    path = first.table.local.path(0)
    meta, arrays = decode_blob(path.read_bytes())
    key = sorted(k for k in arrays if k.startswith("series/") and arrays[k].ndim == 2)[-1]
    if how == "missing array":  # one no layout of any version lacks (some have upgrades: no_interval, guard_n)
        arrays.pop(next(k for k in arrays if k.endswith("/score/sums")))
    elif how == "misshapen array":
        arrays[key] = np.zeros((len(arrays[key]), arrays[key].shape[1] + 1), arrays[key].dtype)
    else:
        arrays = {k: (v[:1] if k.startswith("series/") else v) for k, v in arrays.items()}
    path.write_bytes(encode_blob(meta, arrays))  # valid magic, version and checksum

    second, results = make_worker(tmp_path, producer)  # a restart on the same state directory
    second.inbox.put(AssignPartitions(frozenset({0, 1}), frozenset({0, 1}), {0: 0, 1: 0}))
    second.inbox.put(Stop())
    second.run()
    assert second.error is None  # it stopped serve before, and again at every restart
    assert sorted(second.engine.series_ids) == ["a", "b"]
    restored = second.engine.export_series(["a", "b"])[1]
    assert all(np.array_equal(restored[k], v, equal_nan=True) for k, v in expected.items())
    assert sample(second, "tidecast_state_skipped_total", source="snapshot") == 1


def test_serve_starts_a_partition_without_state_when_no_saved_state_fits(tmp_path):
    producer = FakeProducer()
    first, results = make_worker(tmp_path, producer, state_dir="a")
    assign(first, results, {0, 1})
    feed(first, 0, records(0, ["a", "b"], range(30), 0))
    first.table.checkpoint([0])
    log = producer.log[(first.table.changelog.topic, 0)]
    for i, (key, value) in enumerate(log):  # every series record of the changelog loses one array
        meta, arrays = decode_blob(value)
        if meta.get("kind") == "series":
            arrays.pop(sorted(arrays)[-1])
            log[i] = (key, encode_blob(meta, arrays))
    second, results = make_worker(tmp_path, producer, state_dir="b")  # no local snapshot: the changelog alone
    assert assign(second, results, {0, 1}) == {0: None, 1: None}  # the committed offset rules
    assert second.engine.series_ids == []
    assert sample(second, "tidecast_state_skipped_total", source="changelog") == 1
    feed(second, 0, records(0, ["a", "b"], range(30, 40), 60))  # and it serves on
    assert sorted(second.engine.series_ids) == ["a", "b"]


@pytest.mark.parametrize("names", [("..", "."), ("team/a", "team_a", "team a", "team:a")])
def test_group_names_get_distinct_folders_inside_the_state_directory(tmp_path, names):
    root = (tmp_path / "state").resolve()
    dirs = [LocalStateStore(root, name, "t").dir.resolve() for name in names]
    assert len(set(dirs)) == len(names)
    assert all(root in d.parents for d in dirs)
    assert LocalStateStore(root, "plain-group_1.x", "t").dir == root / "plain-group_1.x" / "t"  # unchanged




def test_a_snapshot_in_the_folder_of_an_earlier_version_is_still_read(tmp_path):
    """Group names with other characters than letters, digits and ._- moved to a hashed folder: their snapshots
    in the earlier folder were silently not found (restored from the changelog alone, slower)."""
    old = LocalStateStore(tmp_path, "team_forecast", "t")  # the folder "team/forecast" had before
    old.save(Snapshot("t", 0, 5, 3, None, SeriesRows([], {})))
    meta, arrays = decode_blob(old.path(0).read_bytes())
    meta["group"] = "team/forecast"  # written by that group
    old.path(0).write_bytes(encode_blob(meta, arrays))
    new = LocalStateStore(tmp_path, "team/forecast", "t")
    assert new.dir != old.dir and new.load(0).position == 5
    assert LocalStateStore(tmp_path, "team:forecast", "t").load(0) is None  # another group's: refused


@pytest.mark.parametrize("shared", [[1, 2], {"lane_clock": 5}, {"retrain": "x"}])
def test_a_snapshot_whose_shared_state_has_the_wrong_shape_is_refused(tmp_path, shared):
    """A lane's shared entry that is a list, or a retrain entry that is a number, stopped serve at every restart
    (AttributeError / TypeError out of the engine's import)."""
    blob = snapshot_blob(lambda m: m.update(shared={"seasonal-naive": shared}))
    with pytest.raises(CorruptState, match="shared state of lane 'seasonal-naive'"):
        Snapshot.from_blob(blob)


def test_shared_state_the_engine_cannot_import_is_a_state_mismatch():
    engine = Engine.from_config(EngineConfig(horizon=6, models=["cyclenet"]))
    with pytest.raises(StateMismatch):
        engine.import_shared({"cyclenet": ({"backbone/weight": np.zeros((2, 2))}, {"fitted": True, "junk": [1]})})


def test_a_refused_shared_import_keeps_nothing_of_it():
    """Lanes imported before the one that failed kept the refused state: a clock far in the future stopped the
    seasonal-naive lane's learning and retrain rounds for good."""
    engine = Engine.from_config(EngineConfig(horizon=6, models=["seasonal-naive", "cyclenet"]))
    before = {lane.name: lane.clock.export() for lane in engine.lanes}
    far = 4 * 10**18
    with pytest.raises(StateMismatch):
        engine.import_shared({"seasonal-naive": ({}, {"lane_clock": {"last_ns": far, "ahead_ns": None}}),
                              "cyclenet": ({"backbone/weight": np.zeros((2, 2))}, {"fitted": True, "junk": [1]})})
    assert {lane.name: lane.clock.export() for lane in engine.lanes} == before


@pytest.mark.parametrize("retrain", [{"policy": [1]}, {"policy": {"version": "x"}}])
def test_a_retrain_entry_whose_version_cannot_be_read_is_refused(retrain):
    """The version picks the newest of several partitions' shared states, outside any import: a string or a list
    there stopped every restore of two partitions."""
    with pytest.raises(CorruptState, match="shared state of lane"):
        Snapshot.from_blob(snapshot_blob(lambda m: m.update(shared={"seasonal-naive": {"retrain": retrain}})))


def test_healthy_partitions_are_restored_when_another_ones_shared_state_does_not_fit(tmp_path, monkeypatch):
    """Shared state that does not fit marked every partition of the restore unfit, and those without a local
    snapshot started without state: one bad partition wiped its healthy neighbours."""
    producer = FakeProducer()
    first, results = make_worker(tmp_path, producer, state_dir="a")
    assign(first, results, {0, 1})
    feed(first, 0, records(0, ["a", "b"], range(30), 0))
    feed(first, 1, records(1, ["d"], range(30), 0))
    first.table.checkpoint([0, 1])
    second, results = make_worker(tmp_path, producer, state_dir="b")  # no local snapshots: the changelog alone
    real = second.engine.import_shared
    calls = []

    def joint_import_unfit(shared):  # the two partitions' shared state together does not fit; each alone does
        calls.append(1)
        if len(calls) == 1:
            raise StateMismatch("forged")
        return real(shared)

    monkeypatch.setattr(second.engine, "import_shared", joint_import_unfit)
    assert assign(second, results, {0, 1}) == {0: 60, 1: 30}
    assert sorted(second.engine.series_ids) == ["a", "b", "d"]  # none before: both started without state


def test_a_skipped_series_block_in_the_last_group_is_caught_up_from_the_group_before(tmp_path):
    """A changelog record of the last group skipped (a broken checksum) took its whole block of series back to the
    group before, while the partition resumed at the last group's position: the input in between was never applied
    to them again (150 series reset their models at the next record)."""
    from tidecast.stream.partitioner import home_partition

    ids = [s for s in (f"s{i}" for i in range(400)) if home_partition(s.encode(), 2, "murmur2") == 0][:150]
    producer = FakeProducer()
    first, results = make_worker(tmp_path, producer, state_dir="a")
    assign(first, results, {0, 1})
    early, late = records(0, ids, range(20), 0), records(0, ids, range(20, 40), 20 * len(ids))
    feed(first, 0, early)
    first.table.checkpoint([0])
    feed(first, 0, late)
    first.table.checkpoint([0])
    log = producer.log[(first.table.changelog.topic, 0)]
    kinds = [decode_blob(value)[0].get("kind") for _, value in log]
    last = max(i for i, kind in enumerate(kinds) if kind == "checkpoint")
    block = max(i for i, kind in enumerate(kinds[:last]) if kind == "series")  # of the last group
    key, value = log[block]
    log[block] = (key, value[:-10] + b"x" * 10)  # its checksum fails: skipped

    second, results = make_worker(tmp_path, producer, state_dir="b")
    position = assign(second, results, {0, 1})[0]
    assert position == 20 * len(ids)  # the group before's, not the last one's (40 * 150)
    feed(second, 0, late[position - 20 * len(ids):])  # what the consumer reads again from there
    expected = first.engine.export_series(ids)[1]
    restored = second.engine.export_series(ids)[1]
    assert all(np.array_equal(restored[k], v, equal_nan=True) for k, v in expected.items())


def test_a_refused_newer_model_version_leaves_the_served_series_as_they_were():
    """adopt_newer put the lane's own shared state back after a refused one, but CycleNet's import_shared starts a
    blank cycle table: every served series lost its cycle rows, silently, and forecast otherwise."""
    import copy

    config = EngineConfig(horizon=3, models=["cyclenet"], freq="1h", retrain="on",
                          model_params={"cyclenet": {"warm_start": 60, "lookback": 24, "epochs": 1, "cycle": 24}},
                          retrain_params={"min_fresh": 24, "shadow_steps": 24, "history": 0, "epochs": 1})
    hours = 120
    values = 10 + 3 * np.sin(2 * np.pi * np.arange(hours) / 24)[:, None] + np.random.default_rng(0).normal(
        0, 0.3, (hours, 2))
    ids = np.tile(np.array(["a", "b"], dtype=object), hours)
    stamps = np.repeat(1_500_000_000 * 10**9 + np.arange(hours) * 3_600 * 10**9, 2)

    def served() -> Engine:
        engine = Engine.from_config(config)
        for k in range(0, hours, 10):
            rows = slice(2 * k, 2 * (k + 10))
            engine.process(ObservationBatch(ids[rows], stamps[rows], values.reshape(-1)[rows]))
            engine.maintenance()
        return engine

    engine = served()
    newer = copy.deepcopy(engine.export_shared())
    newer["cyclenet"][1]["params"]["lookback"] = 48  # a newer version this engine cannot take
    newer["cyclenet"][1].setdefault("retrain", {}).setdefault("policy", {})["version"] = 3
    before = engine.export_series(["a", "b"])[1]
    with pytest.raises(StateMismatch):
        engine.adopt_newer(newer)
    after = engine.export_series(["a", "b"])[1]
    assert all(np.array_equal(after[k], v, equal_nan=True) for k, v in before.items())
