"""Checkpoint format, local store and changelog folding (no broker needed)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.state import (
    MARKER_KEY,
    STALE_TEMP_SECONDS,
    ChangelogTail,
    CorruptState,
    IncompatibleState,
    LatestRows,
    LocalStateStore,
    SeriesRows,
    Snapshot,
    TailReader,
    check_fingerprint,
    config_fingerprint,
    decode_blob,
    encode_blob,
    marker_record,
    merge,
    series_record,
)

CONFIG = EngineConfig(horizon=6, model_params={"seasonal-naive": {"period": 12}})


def batch(n_steps: int, start: int = 0, series: int = 3, offset0: int = 0) -> ObservationBatch:
    ids, times, values = [], [], []
    for k in range(start, start + n_steps):
        for s in range(series):
            ids.append(f"s{s}")
            times.append(k * 3_600_000_000_000)
            values.append(np.sin(k / 2 + s) + s)
    n = len(ids)
    return ObservationBatch(np.array(ids, dtype=object), np.array(times), np.array(values),
                            np.zeros(n, np.int32), np.arange(offset0, offset0 + n))


def exported(engine: Engine) -> SeriesRows:
    meta, arrays = engine.export_series(sorted(engine.series_ids))
    return SeriesRows(meta, arrays)


def test_blob_round_trip_keeps_meta_arrays_and_dtypes():
    arrays = {"f": np.arange(6.0).reshape(2, 3), "i": np.array([1, -2], np.int32), "b": np.array([True, False]),
              "empty": np.zeros((0, 4)), "nan": np.array([np.nan, np.inf])}
    meta, back = decode_blob(encode_blob({"kind": "x", "n": [1, 2]}, arrays))
    assert meta == {"kind": "x", "n": [1, 2]}
    assert back.keys() == arrays.keys()
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
    (lambda b: b"NOTSTATE" + b[8:], "magic"),
    (lambda b: b[:8] + (99).to_bytes(2, "little") + b[10:], "version"),
    (lambda b: b[:20], "checksum|short"),
])
def test_a_damaged_blob_is_refused(damage, message):
    blob = encode_blob({"kind": "x"}, {"a": np.ones(3)})
    with pytest.raises(CorruptState, match=message):
        decode_blob(damage(blob))


def test_snapshot_restores_an_engine_that_continues_exactly_like_the_original(tmp_path):
    original = Engine.from_config(CONFIG)
    original.process(batch(40))
    store = LocalStateStore(tmp_path, "group", "topic/with:odd chars")
    store.save(Snapshot("topic/with:odd chars", 0, 120, 7, config_fingerprint(CONFIG.to_dict()), exported(original),
                        {}, 1.0))
    snap = store.load(0)
    assert (snap.position, snap.changelog_offset, snap.partition) == (120, 7, 0)
    restored = Engine.from_config(CONFIG)
    restored.import_series(snap.rows.meta, snap.rows.arrays)

    nxt = batch(20, start=40, offset0=120)
    a, b = original.process(nxt), restored.process(nxt)
    np.testing.assert_array_equal(a.forecasts.mean, b.forecasts.mean)
    np.testing.assert_array_equal(a.forecasts.lower, b.forecasts.lower)
    for key, value in exported(original).arrays.items():
        np.testing.assert_array_equal(exported(restored).arrays[key], value, err_msg=key)


def test_local_store_writes_atomically_and_ignores_a_corrupt_file(tmp_path):
    store = LocalStateStore(tmp_path, "g", "t")
    rows = SeriesRows([{"series_id": "a"}], {"engine/applied_offset": np.array([3])})
    store.save(Snapshot("t", 2, 4, 0, None, rows))
    assert [p.name for p in store.dir.iterdir()] == ["partition-00002.tcs"]  # no temporary file left
    store.path(2).write_bytes(store.path(2).read_bytes()[:-3])
    assert store.load(2) is None  # logged; the changelog takes over
    crashed = store.dir / ".partition-00002.tcs.tmp-123"
    crashed.write_bytes(b"half")
    os.utime(crashed, (time.time() - STALE_TEMP_SECONDS - 60,) * 2)
    LocalStateStore(tmp_path, "g", "t")  # a restart clears writes a crash interrupted
    assert not list(store.dir.glob(".*tmp*"))


def test_a_starting_member_leaves_a_fresh_temp_file_alone(tmp_path):
    """Members sharing a state directory: a start deleted every temp file, a live member's snapshot half-way
    included, and that member's rename (so its checkpoint, so its service) failed. A pid cannot tell a live
    writer across containers (both are often pid 1), so only an old temp file is a crash's leftover."""
    store = LocalStateStore(tmp_path, "g", "t")
    live = store.dir / f".partition-00001.tcs.tmp-{os.getpid()}"
    crashed = store.dir / ".partition-00002.tcs.tmp-99999999999999999999"  # any suffix: never parsed
    for path in (live, crashed):
        path.write_bytes(b"half")
    os.utime(crashed, (time.time() - STALE_TEMP_SECONDS - 60,) * 2)
    LocalStateStore(tmp_path, "g", "t")
    assert live.exists() and not crashed.exists()


def one(sid: str, applied: int, value: float) -> tuple[bytes, bytes]:
    arrays = {"engine/applied_offset": np.array([applied]), "x": np.array([value])}
    return sid.encode(), series_record({"series_id": sid}, arrays)


def test_changelog_keeps_complete_groups_and_the_most_advanced_state_per_series():
    reader = TailReader(start=10)
    records = [
        one("a", 5, 1.0), one("b", 6, 1.0), (MARKER_KEY.encode(), marker_record(7, None, 2)),
        one("a", 9, 2.0), (MARKER_KEY.encode(), marker_record(10, None, 1)),
        one("b", 4, 0.5), (MARKER_KEY.encode(), marker_record(8, None, 1)),  # a late writer with older state
        one("a", 12, 3.0),  # a checkpoint interrupted before its marker
    ]
    for offset, (key, value) in enumerate(records, start=10):
        reader.add(offset, key, value)
    tail = reader.finish(end_offset=18)
    assert tail.position == 10 and tail.next_offset == 17 and tail.n_incomplete == 1
    assert float(tail.rows["a"].arrays["x"][0]) == 2.0  # the unfinished group is ignored
    assert float(tail.rows["b"].arrays["x"][0]) == 1.0  # applied 6 beats the later write of applied 4


def test_merge_lets_newer_changelog_state_win_over_the_local_snapshot():
    base_rows = SeriesRows([{"series_id": "a"}, {"series_id": "b"}],
                           {"engine/applied_offset": np.array([5, 6]), "x": np.array([1.0, 1.0])})
    base = Snapshot("t", 0, 7, 3, None, base_rows)
    changed = LatestRows()
    changed.add(SeriesRows([{"series_id": "a"}], {"engine/applied_offset": np.array([9]), "x": np.array([2.0])}))
    tail = ChangelogTail(rows=changed, position=10, next_offset=5, end_offset=5)
    merged = merge(base, tail, "t", 0)
    values = dict(zip(merged.rows.series_ids, merged.rows.arrays["x"].tolist(), strict=True))
    assert values == {"a": 2.0, "b": 1.0} and merged.position == 10 and merged.changelog_offset == 5
    assert merge(base, ChangelogTail(), "t", 0) is base
    assert merge(None, ChangelogTail(), "t", 0) is None


def test_the_higher_applied_offset_wins_and_the_later_on_ties():
    old = SeriesRows([{"series_id": "a"}], {"engine/applied_offset": np.array([3]), "x": np.array([0.0])})
    new = SeriesRows([{"series_id": "a"}], {"engine/applied_offset": np.array([3]), "x": np.array([1.0])})
    ahead = SeriesRows([{"series_id": "a"}], {"engine/applied_offset": np.array([4]), "x": np.array([2.0])})

    def winner(*states: SeriesRows) -> float:
        latest = LatestRows()
        for state in states:
            latest.add(state)
        return float(latest["a"].arrays["x"][0])

    assert winner(old, new) == 1.0 and winner(new, old) == 0.0 and winner(old) == 0.0
    assert winner(ahead, new) == 2.0


def test_state_from_another_configuration_is_refused():
    saved = config_fingerprint(CONFIG.to_dict())
    check_fingerprint(saved, saved, "here")
    other = config_fingerprint(EngineConfig(horizon=12).to_dict())
    with pytest.raises(IncompatibleState, match="horizon"):
        check_fingerprint(saved, other, "here")


def test_non_finite_floats_in_meta_round_trip():
    """Found by the checkpoint review (2026-12-04): a CycleNet or cfc fit on absurd data reports an infinite
    validation error, and input_limit=inf is a valid setting; strict JSON refused both, so every checkpoint failed
    and serve stopped, on each restart at the same data."""
    meta = {"fit_report": {"val_mse": [float("inf"), float("nan")]}, "params": {"input_limit": float("-inf")}}
    back, _ = decode_blob(encode_blob(meta, {}))
    assert back["fit_report"]["val_mse"][0] == np.inf and np.isnan(back["fit_report"]["val_mse"][1])
    assert back["params"]["input_limit"] == -np.inf
    config = EngineConfig(horizon=6, models=["cyclenet"], model_params={"cyclenet": {"input_limit": float("inf")}})
    fingerprint = config_fingerprint(config.to_dict())
    saved = Snapshot.from_blob(Snapshot("t", 0, 1, 0, fingerprint, SeriesRows([], {})).to_blob())
    check_fingerprint(saved.config, fingerprint, "snapshot")  # the same configuration: no IncompatibleState


def test_a_blob_whose_tensors_are_damaged_behind_a_valid_checksum_is_corrupt_state(tmp_path):
    """safetensors' own error is no ValueError: a forged header length escaped as a raw SafetensorError and stopped
    the restore, on every restart."""
    import hashlib

    from tidecast.stream import state

    blob = encode_blob({"kind": "x"}, {"a": np.ones(3)})
    body = bytearray(blob[state._HEADER.size:])
    (meta_len,) = state._META_LEN.unpack_from(body)
    at = state._META_LEN.size + meta_len
    body[at:at + 8] = (2**40).to_bytes(8, "little")  # safetensors' header length
    forged = state._HEADER.pack(state.MAGIC, state.FORMAT_VERSION, hashlib.sha256(body).digest()) + bytes(body)
    with pytest.raises(CorruptState, match="unreadable"):
        decode_blob(forged)
    store = LocalStateStore(tmp_path, "g", "t")
    store.path(0).write_bytes(forged)
    assert store.load(0) is None  # logged; the changelog takes over
    store.path(0).unlink()
    store.path(0).mkdir()  # a directory where the snapshot should be: raised IsADirectoryError
    assert store.load(0) is None


@pytest.mark.parametrize("alpha, level", [(0.001, 99.9), (0.0001, 99.99), (0.003, 99.7), (0.1, 90)])
def test_alpha_and_its_level_are_the_same_configuration_at_restore(alpha, level):
    """README: --alpha 0.1 and --level 90 are the same configuration. (100 - 99.9) / 100 is 0.0009999999999999432,
    not 0.001: state saved with --alpha 0.001 was refused under --level 99.9."""
    by_alpha = config_fingerprint(EngineConfig(horizon=6, alpha=alpha).to_dict())
    by_level = config_fingerprint(EngineConfig(horizon=6, levels=(level,)).to_dict())
    check_fingerprint(by_alpha, by_level, "snapshot")
    check_fingerprint(by_level, by_alpha, "snapshot")
