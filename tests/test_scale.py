"""Serve at scale: the compact pending layout, the compact output format, bounded restores and the checkpoint
budget (issue 15). Speed and memory targets are in bench/serve_throughput.py, not here."""

from __future__ import annotations

import numpy as np
import pytest

from tidecast.models.rows import grow
from tidecast.stream.batch import ForecastBatch
from tidecast.stream.kafka import encode_compact, forecast_messages, is_compact, read_compact, read_forecasts
from tidecast.stream.pending import NO_TICK, PendingForecasts
from tidecast.stream.state import ChangelogStore, SeriesRows, encode_blob, series_blocks

HOUR = 3_600_000_000_000


class SquarePending:
    """The layout before: every origin's H steps in float64, in a ring of H origins (the reference)."""

    def __init__(self, horizon: int, levels: int = 1) -> None:
        self.h = horizon
        self.levels = levels
        self.origin: dict[int, dict[int, int]] = {}
        self.values: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def store(self, rows, origins, mean, lower, upper):
        for i, (row, o) in enumerate(zip(rows.tolist(), origins.tolist(), strict=True)):
            self.origin.setdefault(row, {})[o % self.h] = o
            self.values[(row, o % self.h)] = (mean[i].copy(), lower[i].copy(), upper[i].copy())

    def matured(self, rows, targets):
        n = len(rows)
        out = [np.full((n, self.h), np.nan), *(np.full((n, self.h, self.levels), np.nan) for _ in range(2))]
        valid = np.zeros((n, self.h), bool)
        for i, (row, t) in enumerate(zip(rows.tolist(), targets.tolist(), strict=True)):
            for k in range(self.h):
                o = t - k - 1
                if self.origin.get(row, {}).get(o % self.h) == o:
                    m, lo, hi = self.values[(row, o % self.h)]
                    for arr, src in zip(out, (m, lo, hi), strict=True):
                        arr[i, k] = src[k]
                    valid[i, k] = np.isfinite(m[k])
        return (*out, valid)

    def invalidate(self, rows):
        for row in rows.tolist():
            self.origin.pop(row, None)


def test_pending_triangle_matches_the_square_layout_through_gaps_resets_and_missing_bounds():
    rng = np.random.default_rng(5)
    horizon, n_rows = 6, 4
    new, ref = PendingForecasts(horizon, n_levels=2), SquarePending(horizon, levels=2)
    new.resize(n_rows)
    ticks = np.zeros(n_rows, np.int64)
    level = 1e7  # a float32 mean would lose the unit digit here
    for _ in range(300):
        rows = np.sort(rng.choice(n_rows, size=rng.integers(1, n_rows + 1), replace=False))
        ticks[rows] += rng.choice([1, 1, 1, 2, 5], size=len(rows))  # gaps: some targets never issued
        t = ticks[rows]
        got, want = new.matured(rows, t), ref.matured(rows, t)
        np.testing.assert_array_equal(got[3], want[3])
        for g, w in zip(got[:3], want[:3], strict=True):
            np.testing.assert_allclose(g[want[3]], w[want[3]], rtol=0, atol=1e-3)
        if rng.random() < 0.05:
            new.invalidate(rows)
            ref.invalidate(rows)
        mean = level + rng.normal(size=(len(rows), horizon)).cumsum(axis=1)
        mean[rng.random(mean.shape) < 0.05] = np.nan  # not ready
        width = rng.uniform(0.5, 2, size=(*mean.shape, 1)) * np.array([1.0, 2.0])  # two levels
        lower, upper = mean[..., None] - width, mean[..., None] + width
        lower[rng.random(lower.shape) < 0.1] = np.nan  # no interval yet
        upper[rng.random(upper.shape) < 0.05] = np.inf  # unbounded
        new.store(rows, t, mean, lower, upper)
        ref.store(rows, t, mean, lower, upper)


def test_pending_state_in_the_square_layout_is_upgraded_on_import():
    horizon = 4
    old = {"origin": np.full((1, horizon), NO_TICK), "mean": np.full((1, horizon, horizon), np.nan),
           "lower": np.full((1, horizon, horizon), np.nan), "upper": np.full((1, horizon, horizon), np.nan)}
    for o in (7, 8, 9):  # three origins, in the square ring at o % H
        old["origin"][0, o % horizon] = o
        old["mean"][0, o % horizon] = 100.0 * o + np.arange(horizon)
        old["lower"][0, o % horizon] = 100.0 * o - 1
        old["upper"][0, o % horizon] = 100.0 * o + 9
    pending = PendingForecasts(horizon)
    pending.import_rows(np.array([0]), old)
    mean, lower, upper, valid = pending.matured(np.array([0]), np.array([10]))
    assert valid.tolist() == [[True, True, True, False]]  # from origins 9, 8, 7; origin 6 was never issued
    assert mean[0, :3].tolist() == [900.0, 801.0, 702.0] and lower[0, :3, 0].tolist() == [899.0, 799.0, 699.0]


def scored_run(keep_bounds: bool, levels: list[float] | None = None) -> np.ndarray:
    """Scorer sums after a gap-free stream through seasonal naive + conformal PID, H = 6."""
    from tidecast.stream.batch import ObservationBatch
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine

    engine = Engine.from_config(EngineConfig(horizon=6, model_params={"seasonal-naive": {"period": 4}},
                                             levels=levels))
    lane = engine.lanes[0]
    if keep_bounds:  # the reference: the pending forecasts keep the bounds as issued
        lane.pending = PendingForecasts(6, len(levels or [0]), bounds=True)
        lane.pending.resize(8)  # as many rows as the engine starts with (it grows every lane beyond)
    rng = np.random.default_rng(1)
    ids = np.array(["a", "b", "c"], dtype=object)
    for t in range(150):
        values = 5 * np.sin(t / 3 + np.arange(3)) + rng.normal(size=3)
        engine.process(ObservationBatch(ids, np.full(3, t * HOUR, np.int64), values))
    return lane.scorer.export_rows(np.arange(3))["sums"]


@pytest.mark.parametrize("levels", [None, [80.0, 95.0]])
def test_a_pid_lane_scores_the_intervals_it_issued_without_keeping_their_bounds_twice(levels):
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine

    lane = Engine.from_config(EngineConfig(horizon=6)).lanes[0]
    assert not lane.pending.bounds and set(lane.pending.table_.fields) == {"origin", "anchor", "delta"}
    got, want = scored_run(False, levels), scored_run(True, levels)
    assert want[:, 3].sum() > 0.5 * want[:, 0].sum()  # intervals were issued and scored
    # the same intervals: only float32 rounding differs (the ring keeps thresholds, the table kept offsets)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_grown_tables_leave_zero_filled_spare_rows_untouched():
    grown = grow(np.ones((3, 2)), 5, 0.0)
    assert grown.shape == (8, 2) and grown[:3].tolist() == [[1.0, 1.0]] * 3 and not grown[3:].any()
    assert np.isnan(grow(np.ones((3, 2)), 5, np.nan)[3:]).all()


def forecasts() -> ForecastBatch:
    return ForecastBatch(
        series_id=np.array(["a", "a", "b", "b", "b"], dtype=object), issued_at_ns=np.array([0, 0, 0, 0, HOUR]),
        model=np.array(["m"] * 5, dtype=object), h=np.array([1, 2, 1, 2, 1]),
        target_ns=np.array([HOUR, 2 * HOUR, HOUR, 2 * HOUR, 2 * HOUR]), mean=np.array([1.0, 2.0, 3.0, 4.0, 5.0]),
        lower=np.array([0.5, -np.inf, np.nan, 3.5, 4.5]), upper=np.array([1.5, np.inf, np.nan, 4.5, 5.5]),
        alpha=0.1)


def test_compact_message_round_trips_through_the_reader_like_the_json_messages():
    batch = forecasts()
    value = encode_compact(batch)
    assert is_compact(value) and not any(is_compact(v) for _, v in forecast_messages(batch))
    table = read_compact(value)
    assert table.num_rows == 3 and table.column("series_id").to_pylist() == ["a", "b", "b"]  # one row a forecast
    back = read_forecasts([value])
    for name in ("issued_at_ns", "h", "target_ns", "mean", "lower", "upper"):
        np.testing.assert_array_equal(getattr(back, name), getattr(batch, name), err_msg=name)
    assert back.series_id.tolist() == batch.series_id.tolist() and back.alpha == 0.1
    from_json = read_forecasts(v for _, v in forecast_messages(batch))
    np.testing.assert_array_equal(from_json.mean, batch.mean)
    np.testing.assert_array_equal(from_json.lower[np.isfinite(batch.lower)], batch.lower[np.isfinite(batch.lower)])
    assert np.isneginf(from_json.lower[1]) and np.isposinf(from_json.upper[1])  # null: unbounded


def test_compact_compression_changes_the_bytes_not_what_the_reader_gets():
    rng = np.random.default_rng(0)
    n_series, horizon = 200, 24
    ids = np.array([f"s{i:04d}" for i in range(n_series)], object)
    batch = ForecastBatch(
        np.repeat(ids, horizon), np.zeros(n_series * horizon, np.int64),
        np.full(n_series * horizon, "m", object), np.tile(np.arange(1, horizon + 1), n_series),
        np.tile(np.arange(1, horizon + 1) * HOUR, n_series), rng.normal(size=n_series * horizon),
        np.full(n_series * horizon, -1.0), np.full(n_series * horizon, 1.0), 0.1)
    sizes = {}
    for compression in ("none", "lz4", "zstd"):
        value = encode_compact(batch, compression)
        sizes[compression] = len(value)
        assert is_compact(value)
        back = read_forecasts([value])
        for name in ("issued_at_ns", "h", "target_ns", "mean", "lower", "upper"):
            np.testing.assert_array_equal(getattr(back, name), getattr(batch, name), err_msg=f"{compression} {name}")
    assert sizes["zstd"] < sizes["lz4"] < 0.8 * sizes["none"]  # steps and timestamps repeat; means do not
    with pytest.raises(ValueError, match="compact compression 'gzip'"):
        encode_compact(batch, "gzip")


def test_a_value_that_is_not_a_compact_message_is_refused():
    with pytest.raises(Exception):  # noqa: B017 - pyarrow's own error for bytes that are no Arrow stream
        read_compact(b"\xff\xff\xff\xffnot arrow")


class ListChangelog(ChangelogStore):
    """The real writer and reader over an in-memory log, counting what each read fetched."""

    def __init__(self, block_bytes: int = 80) -> None:  # rows_of's series are 16 bytes: 5 a block
        super().__init__("cl", None, lambda: None, block_bytes=block_bytes)
        self.log: list[tuple[bytes, bytes]] = []
        self.fetched = 0

    def _send(self, key, value, partition):
        self.bytes_written += len(key) + len(value)
        self.log.append((key, value))

        class Done:
            def get(self_inner, timeout=None):
                return type("Meta", (), {"offset": len(self.log) - 1})

        return Done()

    def write(self, groups, config):
        self.producer = type("P", (), {"flush": lambda *a, **k: None})()
        return super().write(groups, config)

    def _fetch(self, partition, start, sink, stop=None):
        for offset in range(start, len(self.log) if stop is None else min(stop, len(self.log))):
            self.fetched += 1
            sink(offset, *self.log[offset])
        return len(self.log)

    def _end(self, partition):
        return len(self.log)


def rows_of(ids: list[str], offset: int) -> SeriesRows:
    return SeriesRows([{"series_id": s} for s in ids], {"engine/applied_offset": np.full(len(ids), offset),
                                                         "x": np.arange(len(ids), dtype=float) + offset})


def test_a_restore_reads_only_the_last_complete_group():
    changelog = ListChangelog()
    ids = [f"s{k}" for k in range(50)]
    for k in range(20):  # twenty checkpoints of the whole partition
        changelog.write([(0, rows_of(ids, k), {}, 100 * (k + 1))], None)
    group = len(changelog.log) // 20
    assert group == 50 // 5 + 1  # series in blocks of five, then the marker
    changelog.log += [(b"\x00series/s0", b"a group cut off by a crash")] * 3
    changelog.fetched = 0
    tail = changelog.read_latest(0)
    assert tail.position == 2000 and sorted(tail.rows) == sorted(ids)
    assert tail.rows["s3"].arrays["x"].tolist() == [22.0]  # the last group's state
    assert tail.n_incomplete == 0  # the read stopped at the group's marker
    assert changelog.fetched <= 64 + group  # one window of the scan for the marker, then one group
    full = changelog.read(0, 0)
    assert full.position == tail.position and changelog.fetched > 20 * group
    assert sorted(full.rows) == sorted(ids) and full.rows["s3"].arrays["x"].tolist() == [22.0]


@pytest.mark.kafka
def test_on_a_real_broker_a_restore_scans_back_past_a_cut_off_checkpoint_and_stops_at_the_last_marker(kafka, unique):
    from kafka import KafkaConsumer

    topic = unique("changelog")
    kafka.create_topic(topic, 1)
    store = ChangelogStore(topic, kafka.producer, lambda: KafkaConsumer(bootstrap_servers=kafka.bootstrap),
                           block_bytes=160)  # ten series a block
    ids = [f"s{k:03d}" for k in range(200)]
    for k in range(3):
        store.write([(0, rows_of(ids, k), {}, 1000 * (k + 1))], None)
    cut_off = list(series_blocks(rows_of(ids, 3), 160))  # a fourth group's blocks, the member killed before its marker
    kafka.send(topic, cut_off * 4)  # 80 records: more than the scan's first window
    tail = store.read_latest(0)
    store.close()
    assert tail.position == 3000 and sorted(tail.rows) == ids
    assert tail.rows["s007"].arrays["x"].tolist() == [9.0]  # the third group's state (offset 2 + index 7)
    assert tail.n_records == 21 and tail.n_incomplete == 0  # its 20 blocks and marker, nothing after


def test_a_block_record_whose_arrays_do_not_match_its_series_is_skipped():
    changelog = ListChangelog()
    changelog.write([(0, rows_of(["a", "b"], 1), {}, 10)], None)
    (key, good), marker = changelog.log
    bad = encode_blob({"kind": "series", "series": [{"series_id": "a"}, {"series_id": "b"}]},
                      {"engine/applied_offset": np.array([2]), "x": np.array([5.0])})
    changelog.log = [(key, good), (key, bad), marker]
    tail = changelog.read(0, 0)
    assert tail.n_skipped == 1 and tail.rows["a"].arrays["x"].tolist() == [1.0]


def test_the_group_consumer_asks_the_broker_for_short_fetch_waits():
    """kafka-python's 500 ms default let a fetch sit on the broker for up to half a second (p50 latency 171 ms at half
    load in bench/serve_throughput.py); serve sets its own, which a setting changes."""
    from kafka import KafkaConsumer

    from tidecast.monitors.metrics import Metrics
    from tidecast.stream.config import ServeConfig
    from tidecast.stream.serve import Service

    def wait_ms(**settings) -> int:
        service = Service(ServeConfig({"bootstrap_servers": "a:1", "topic": "t", **settings}), metrics=Metrics())
        return service._consumer_settings(KafkaConsumer)["fetch_max_wait_ms"]

    assert wait_ms() == 20 < KafkaConsumer.DEFAULT_CONFIG["fetch_max_wait_ms"]
    assert wait_ms(fetch_max_wait_ms=250) == 250


def test_every_interval_level_round_trips_through_both_formats():
    base = forecasts()
    lowers = np.stack([base.lower, base.lower - 1.0], axis=1)
    uppers = np.stack([base.upper, base.upper + 1.0], axis=1)
    batch = ForecastBatch(base.series_id, base.issued_at_ns, base.model, base.h, base.target_ns, base.mean,
                          base.lower, base.upper, base.alpha, levels=("90", "95"), lowers=lowers, uppers=uppers)
    for values in ([encode_compact(batch)], [v for _, v in forecast_messages(batch)]):
        back = read_forecasts(values)
        assert back.levels == ("90", "95")
        np.testing.assert_array_equal(back.bounds()[0], lowers)
        np.testing.assert_array_equal(back.bounds()[1], uppers)
        np.testing.assert_array_equal(back.lower, base.lower)  # NaN: no interval yet, inf: unbounded, as sent
