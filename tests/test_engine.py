"""The engine's contract: delayed scoring, ordering rules, gaps, batching invariance and state round trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import CentresInPlace, ListOut, ObjectOut

from tidecast.models.naive import SeasonalNaive
from tidecast.monitors.conformal import make_calibrator
from tidecast.monitors.conformal.base import Calibrator
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import STEP_WINDOW, EngineConfig
from tidecast.stream.engine import Engine, Lane

HOUR = 3_600_000_000_000
T0 = 1_467_331_200_000_000_000  # 2016-07-01T00:00Z


def batch(series, ticks, values, step=HOUR):
    series = [series] * len(ticks) if isinstance(series, str) else series
    return ObservationBatch(np.array(series, dtype=object), T0 + np.asarray(ticks, np.int64) * step,
                            np.asarray(values, float))


class SpyCalibrator(Calibrator):
    """Records every update; intervals are +-1 around the mean."""

    name = "spy"

    def __init__(self, horizon, alpha=0.1):
        super().__init__(horizon, alpha)
        self.updates = []

    def resize(self, n_rows):
        self.n_rows_ = max(self.n_rows_, n_rows)

    def update(self, rows, residuals, mask):
        self.updates.append((rows.copy(), residuals.copy(), mask.copy()))

    def interval(self, rows, means):
        return means - 1.0, means + 1.0

    def export_rows(self, rows):
        return {}

    def import_rows(self, rows, state):
        pass


def spy_engine(horizon=3, period=1, **cfg):
    config = EngineConfig(horizon=horizon, models=["seasonal-naive"], freq="1h", **cfg)
    spy = SpyCalibrator(horizon)
    return Engine(config, [Lane(SeasonalNaive(period=period), spy, horizon, 0.1)]), spy


def test_h_step_residual_arrives_exactly_h_ticks_after_the_forecast():
    engine, spy = spy_engine(horizon=3, period=1)
    y = np.array([1.0, 4.0, 9.0, 16.0, 25.0, 36.0])
    for t, v in enumerate(y):
        engine.process(batch("s", [t], [v]))
    # Naive with period 1 forecasts y[o] for every step from origin o, so at tick t the h-step residual is
    # y[t] - y[t-h]; it must be absent (masked) until a forecast from t-h exists.
    for t, (_rows, residuals, mask) in enumerate(spy.updates):
        for h in (1, 2, 3):
            assert mask[0, h - 1] == (t - h >= 0)
            if t - h >= 0:
                assert residuals[0, h - 1] == y[t] - y[t - h]


def test_forecasts_never_depend_on_later_values():
    def run(tail):
        engine = Engine.from_config(EngineConfig(horizon=4, models=["seasonal-naive"], freq="1h",
                                                 model_params={"seasonal-naive": {"period": 3}}))
        rng = np.random.default_rng(1)
        values = np.concatenate([rng.normal(size=60), tail])
        frames = [engine.process(batch("s", [t], [v])).forecasts.to_frame() for t, v in enumerate(values)]
        return frames

    a, b = run(np.zeros(20)), run(np.full(20, 1e6))
    for t in range(60):  # everything issued before the tails differ is identical, intervals included
        assert a[t].equals(b[t])
    assert not a[70].equals(b[70])


def test_duplicates_are_skipped_and_counted_out_of_order_is_rejected():
    engine, _ = spy_engine()
    r = engine.process(batch("s", [0, 1, 1, 2, 1], [1.0, 2.0, 99.0, 3.0, 5.0]))
    assert r.n_duplicates == 1
    assert [(j.index, j.reason) for j in r.rejections] == [(4, "out_of_order")]
    assert r.n_applied == 3
    s = engine.series_
    assert s["n_applied"][0] == 3 and s["last_value"][0] == 3.0
    assert engine.metrics.duplicates._value.get() == 1
    assert engine.metrics.dead_letters.labels(reason="out_of_order")._value.get() == 1


def test_short_gap_is_interpolated_learned_and_never_scored():
    engine, spy = spy_engine(horizon=3, period=1, max_gap=3)
    engine.process(batch("s", [0, 1], [0.0, 1.0]))
    r = engine.process(batch("s", [4], [4.0]))  # ticks 2 and 3 missing
    assert r.n_gap_filled == 2
    assert engine.series_["n_gap_filled"][0] == 2
    # no forecasts issued from the filled ticks: only origin tick 4 emits
    assert set(r.forecasts.issued_at_ns.tolist()) == {T0 + 4 * HOUR}
    # at tick 4 only the 3-step forecast from the real origin 1 matures; those from filled ticks 2, 3 do not exist
    _rows, residuals, mask = spy.updates[-1]
    assert mask.tolist() == [[False, False, True]]
    assert residuals[0, 2] == 4.0 - 1.0
    # the filled values were learned: the naive forecast after tick 4 repeats 4.0, and tick 3 held 3.0
    assert engine.lanes[0].model.buffer_[0, 0] == 4.0


def test_long_gap_resets_the_series_history():
    engine, spy = spy_engine(horizon=2, period=2, max_gap=2)
    engine.process(batch("s", range(5), np.arange(5.0)))
    r = engine.process(batch("s", [10], [10.0]))
    assert r.n_gap_filled == 0
    assert not spy.updates[-1][2].any()  # nothing matures across a reset
    assert len(r.forecasts) == 0  # seasonal naive needs a full cycle again after the reset
    assert len(engine.process(batch("s", [11], [11.0])).forecasts) == 2
    assert r.n_resets == 1
    resets = engine.metrics.registry.get_sample_value("tidecast_series_resets_total")
    assert resets == 1.0  # the alerts and two dashboard panels read this counter


def test_target_coverage_is_exported_per_model():
    engine, _ = spy_engine(horizon=2)
    value = engine.metrics.registry.get_sample_value("tidecast_interval_target_coverage_ratio",
                                                     {"model": "seasonal-naive", "level": "90"})
    assert value == pytest.approx(0.9)


def test_inferred_grid_holds_the_first_observations_and_anchors_to_the_clock():
    engine = Engine.from_config(EngineConfig(horizon=2, models=["seasonal-naive"],
                                             model_params={"seasonal-naive": {"period": 1}}))
    thirty_min = HOUR // 2
    first = engine.process(batch("s", range(STEP_WINDOW - 1), np.arange(STEP_WINDOW - 1.0), step=thirty_min))
    assert len(first.forecasts) == 0 and first.n_applied == 0  # held: no step yet
    assert engine.held_rows == STEP_WINDOW - 1
    second = engine.process(batch("s", [STEP_WINDOW - 1, STEP_WINDOW], [2.0, 3.0], step=thirty_min))
    assert engine.series_["step_ns"][0] == thirty_min
    assert second.n_applied == STEP_WINDOW + 1 and engine.held_rows == 0
    f = second.forecasts
    assert ((f.target_ns - f.issued_at_ns) == f.h.astype(np.int64) * thirty_min).all()
    assert set(f.issued_at_ns.tolist()) == {T0 + k * thirty_min for k in range(STEP_WINDOW + 1)}
    assert engine.series_["n_applied"][0] == STEP_WINDOW + 1


def test_an_inferred_grid_is_the_series_step_when_values_are_missing():
    """Hourly rows with 30 % missing: the median of the first gaps is 2 h, which would put every other value onto a
    used tick (lost as a collision); the commonest gap is the step. A series with two near-duplicate readings
    among its first rows keeps its own step (the readings collide: that is what a collision is for)."""
    engine = Engine.from_config(EngineConfig(horizon=2, models=["seasonal-naive"],
                                             model_params={"seasonal-naive": {"period": 1}}))
    hours = [0, 3, 5, 8, 9, 10, 11, 13, 14, 16, 17, 20]  # gaps 3, 2, 3, 1, 1, 1, 2: lower median 2, commonest 1
    out = engine.process(batch("gappy", hours, np.arange(len(hours), dtype=float)))
    assert engine.series_["step_ns"][engine._slot_of["gappy"]] == HOUR
    assert out.n_collisions == 0 and out.n_applied == len(hours)
    minutes = [0, 10, 20, 21, 31, 41, 51, 52, 62]  # gaps 10, 10, 1, 10, 10, 10, 1: commonest 10
    engine.process(batch("twice", minutes, np.zeros(len(minutes)), step=HOUR // 60))
    assert engine.series_["step_ns"][engine._slot_of["twice"]] == 10 * (HOUR // 60)


@pytest.mark.parametrize("jitter_ms", [5, 1_000, 30_000])
def test_a_jittered_clock_infers_the_round_step_and_forecasts_stay_on_the_hour(jitter_ms):
    """Hourly readings jittered by up to a few ms, a second or 30 s repeat no gap (or repeat one by chance): the
    lower median (59:59.748, say) became the step, and after 6,000 hours the forecasts' targets were 25 minutes off
    the hour, with gap fills and collisions at 30 s of jitter."""
    from tidecast.stream.engine import inferred_step

    rng = np.random.default_rng(jitter_ms)
    n = 2_000
    stamps = T0 + np.arange(n) * HOUR + rng.integers(-jitter_ms, jitter_ms + 1, n) * 10**6
    assert inferred_step(np.diff(stamps[:8])) == HOUR
    engine = Engine.from_config(EngineConfig(horizon=2, models=["seasonal-naive"],
                                             model_params={"seasonal-naive": {"period": 24}}))
    out = engine.process(ObservationBatch(np.full(n, "j", dtype=object), stamps, np.sin(np.arange(n) / 3.0)))
    assert engine.series_["step_ns"][engine._slot_of["j"]] == HOUR
    assert out.n_collisions == 0 and out.n_applied == n
    off = (out.forecasts.target_ns - stamps[0]) % HOUR  # the grid keeps its first reading's place
    assert len(off) and (off == 0).all()
    for exact in (3_599 * 10**9, 90 * 60 * 10**9, 1_500 * 10**6):  # a clock's own cadence is kept as it is
        assert inferred_step(np.full(7, exact)) == exact
    sidereal = 86_164_090_500_000  # nightly at one sidereal time, cloudy nights missing: 3 of 7 gaps are one step
    assert inferred_step(np.diff(np.array([0, 1, 3, 4, 6, 9, 10, 13]) * sidereal)) == sidereal
    second = 10**9  # ... and with two re-readings a few seconds after a reading (a short gap and its remainder)
    gaps = [sidereal, 5 * second, sidereal - 5 * second, sidereal, 3 * second, sidereal - 3 * second, sidereal]
    assert inferred_step(np.array(gaps)) == sidereal
    minutes_jitter = np.array([3300, 3450, 3590, 3750, 3900, 3420, 3700]) * second  # one gap a whole step by chance
    assert inferred_step(minutes_jitter) == HOUR


def test_allow_list_rejects_unknown_series():
    engine = Engine.from_config(EngineConfig(models=["seasonal-naive"], allowed_series=["a"], freq="1h"))
    r = engine.process(batch(["a", "b", "a"], [0, 0, 1], [1.0, 2.0, 3.0]))
    assert [(j.index, j.reason) for j in r.rejections] == [(1, "unknown_series")]
    assert r.rejections[0].detail == "series 'b' not accepted: not in allowed_series"
    assert engine.series_ids == ["a"]
    capped = Engine.from_config(EngineConfig(models=["seasonal-naive"], max_series=1, freq="1h"))
    (refused,) = capped.process(batch(["a", "b"], [0, 0], [1.0, 2.0])).rejections
    assert refused.detail == "series 'b' not accepted: max_series (1) series are served"  # the limit, not a list


def test_a_model_may_return_a_read_only_forecast_array():
    """The engine never writes into what forecast_many returned (a plug-in may hand out a view of its state)."""

    class Frozen(SeasonalNaive):
        def forecast_many(self, rows, horizon):
            out = super().forecast_many(rows, horizon)
            out.flags.writeable = False
            return out

    lane = Lane(Frozen(period=2), make_calibrator("conformal-pid", 2, 0.1), 2, 0.1)
    engine = Engine(EngineConfig(models=["seasonal-naive"], horizon=2, freq="1h"), [lane])
    out = engine.process(batch(["a"] * 20, list(range(20)), [float(k % 2) for k in range(20)])).forecasts
    assert len(out) > 0


def test_a_model_cannot_write_into_the_inputs_every_lane_shares_and_may_return_a_list():
    """Found by the plug-in review (2026-12-04): one array of values went to every lane and was kept as the actuals,
    so a plug-in centring it in place made the next lane learn values near -945 and the outcomes scored shifted.
    The engine's inputs are read-only views now: such a model fails at its write (a bug, named), never silently.
    And a plug-in's forecasts as nested lists crashed inside the engine's store; they are read as an array."""

    t = np.arange(20)
    values = 55.0 + (t % 2)
    config = EngineConfig(models=["m=seasonal-naive", "g=seasonal-naive"], horizon=2, freq="1h")
    lanes = [Lane(CentresInPlace(period=2), make_calibrator("conformal-pid", 2, 0.1), 2, 0.1, name="m"),
             Lane(SeasonalNaive(period=2), make_calibrator("conformal-pid", 2, 0.1), 2, 0.1, name="g")]
    with pytest.raises(ValueError, match="read-only"):
        Engine(config, lanes).process(batch(["a"] * t.size, t, values))
    for model in (ListOut(period=2), ObjectOut(period=2)):
        lane = Lane(model, make_calibrator("conformal-pid", 2, 0.1), 2, 0.1)
        out = Engine(EngineConfig(horizon=2, freq="1h"), [lane]).process(batch(["a"] * t.size, t, values)).forecasts
        assert len(out) > 0


@pytest.mark.parametrize("freq", ["1800", 1800, "2.5"])
def test_a_grid_step_without_a_unit_is_refused(freq):
    """pandas reads a bare '1800' as 1,800 ns: every value then looked like a gap and reset the history."""
    with pytest.raises(ValueError, match="a number without a unit is no time step"):
        EngineConfig(models=["seasonal-naive"], freq=freq)


def _stream(n_series=3, n=120, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    ids, ticks, values = [], [], []
    for k in range(n_series):
        ids += [f"s{k}"] * n
        ticks += list(t)
        values += list(10 * k + np.sin(2 * np.pi * t / 6) + 0.3 * rng.normal(size=n))
    order = np.argsort(np.array(ticks), kind="stable")
    return [np.array(x, dtype=object if i == 0 else None)[order] for i, x in enumerate((ids, ticks, values))]


def _engine(models=("seasonal-naive",), freq="1h"):
    cfg = EngineConfig(horizon=4, models=list(models), freq=freq,
                       model_params={m: {"period": 6, "warmup": 20} if m != "seasonal-naive" else {"period": 6}
                                     for m in models})
    return Engine.from_config(cfg)


def test_batching_does_not_change_results():
    ids, ticks, values = _stream()
    one = _engine()
    whole = one.process(batch(list(ids), ticks.astype(np.int64), values.astype(float))).forecasts.to_frame()
    other = _engine()
    parts = [other.process(batch([ids[i]], [ticks[i]], [values[i]])).forecasts.to_frame() for i in range(len(ids))]
    pieces = pd.concat(parts, ignore_index=True)
    key = ["series_id", "issued_at", "h"]
    pd.testing.assert_frame_equal(whole.sort_values(key).reset_index(drop=True),
                                  pieces.sort_values(key).reset_index(drop=True))
    assert one.summary()["models"] == other.summary()["models"]


@pytest.mark.parametrize("models", [("seasonal-naive",), ("seasonal-naive", "holt-winters")])
def test_state_round_trip_continues_identically(models):
    ids, ticks, values = _stream(n=150)
    ticks, values = ticks.astype(np.int64), values.astype(float)
    half = len(ids) // 2
    a = _engine(models)
    a.process(batch(list(ids[:half]), ticks[:half], values[:half]))
    meta, arrays = a.export_series(a.series_ids)
    b = _engine(models)
    b.import_series(meta, arrays)
    b.import_shared(a.export_shared())
    rest = batch(list(ids[half:]), ticks[half:], values[half:])
    fa, fb = a.process(rest).forecasts.to_frame(), b.process(rest).forecasts.to_frame()
    assert len(fa) > 0
    assert fa.equals(fb)
    assert a.summary()["models"] == b.summary()["models"]


def test_quantile_tracker_lane_covers_a_stationary_stream():
    engine = Engine(EngineConfig(horizon=1, freq="1h"),
                    [Lane(SeasonalNaive(period=1), make_calibrator("quantile-tracker", 1, 0.1), 1, 0.1)])
    rng = np.random.default_rng(3)
    walk = np.cumsum(rng.normal(size=20_000))
    engine.process(batch("s", np.arange(walk.size), walk))
    coverage = engine.summary()["models"]["seasonal-naive"]["coverage"]
    assert abs(coverage - 0.9) < 0.01


def test_dropped_series_rows_are_blanked_and_reused():
    ids, ticks, values = _stream(n_series=3, n=60)
    engine = _engine(("seasonal-naive", "holt-winters"))
    engine.process(batch(list(ids), ticks.astype(np.int64), values.astype(float)))
    engine.drop_series(["s1", "unknown"])
    assert sorted(engine.series_ids) == ["s0", "s2"]
    # a new series takes the freed row and starts from nothing: no forecast before a cycle is seen
    first = engine.process(batch("new", [0], [1.0]))
    assert engine._slot_of["new"] == 1 and len(first.forecasts) == 0
    assert engine.series_["n_applied"][1] == 1
    fresh = _engine(("seasonal-naive", "holt-winters"))
    fresh.process(batch("new", [0], [1.0]))
    meta, a = engine.export_series(["new"])
    _, b = fresh.export_series(["new"])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("params, seeded", [({}, True), ({"period": 24}, False)])
def test_no_interval_is_claimed_before_the_calibrator_has_data(tmp_path, params, seeded):
    """The bundled sample's first 3,000 rows: the first H origins once gave lower == upper == mean (300 of 62,376
    rows). Such a step now says "no interval yet" (NaN bounds) and the summary counts it, as a coverage miss.
    With cycle detection (the default) seasonal naive hands its detection window's backtest to the calibrator, so
    every step has an interval; with a configured period it holds one cycle, nothing to backtest, and the one
    series has no other series to borrow from."""
    import json

    from tidecast.stream.sources import BUNDLED_SAMPLE, ReplaySpec, load_replay

    sample = tmp_path / "nyc_taxi.csv"
    sample.write_text("\n".join(BUNDLED_SAMPLE.read_text().splitlines()[:3001]) + "\n")
    engine = Engine.from_config(EngineConfig(models=["seasonal-naive"], model_params={"seasonal-naive": params}))
    frames = [engine.process(b).forecasts.to_frame() for b in load_replay(ReplaySpec(path=sample)).batches(500)]
    f = pd.concat(frames, ignore_index=True)
    assert len(f) > 60_000
    assert not ((f["lower"] == f["upper"]) & (f["upper"] == f["mean"])).any()
    none = f["lower"].isna()
    assert (none == f["upper"].isna()).all() and f["mean"].notna().all()
    # unseeded: exactly the steps issued before any h-step residual of the series had matured, step h of the
    # first h origins; seeded: none
    first = f["issued_at"] == f["issued_at"].min()
    expected = 0 if seeded else sum(range(1, 24 + 1))
    assert none[first].sum() == (0 if seeded else 24) and none.sum() == expected
    summary = engine.summary()
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN
    m = summary["models"]["seasonal-naive"]
    assert m["n_no_interval"] == sum(v["n_no_interval"] for v in m["by_horizon"].values()) == expected
    widths = [s.value for s in engine.metrics.width.collect()[0].samples]
    assert widths and np.isfinite(widths).all()


def test_no_interval_counts_as_a_miss_and_is_kept_out_of_widths():
    engine, spy = spy_engine(horizon=1, period=1)
    spy.interval = lambda rows, means: (np.full_like(means, np.nan), np.full_like(means, np.nan))
    engine.process(batch("s", [0, 1, 2], [1.0, 1.0, 1.0]))
    spy.interval = lambda rows, means: (means - 1.0, means + 1.0)
    engine.process(batch("s", [3, 4], [1.0, 1.0]))
    m = engine.summary()["models"]["seasonal-naive"]
    # forecasts from origins 0, 1, 2 (no interval) and 3 (+-1) have matured at ticks 1..4
    assert (m["n_scored"], m["n_no_interval"], m["coverage"], m["mean_width"]) == (4, 3, 0.25, 2.0)


class FilledSpy(SeasonalNaive):
    """Seasonal naive that records the ``filled`` flags it is given."""

    def __init__(self, period=None):
        super().__init__(period=period)
        self.calls = []

    def learn_many(self, rows, ticks, values, filled=None):
        self.calls.append((ticks.tolist(), None if filled is None else filled.tolist()))
        super().learn_many(rows, ticks, values, filled=filled)


def test_learn_many_is_told_which_values_were_filled():
    model = FilledSpy(period=1)
    engine = Engine(EngineConfig(horizon=2, freq="1h", max_gap=3), [Lane(model, SpyCalibrator(2), 2, 0.1)])
    engine.process(batch("s", [0, 1, 4], [0.0, 1.0, 4.0]))  # ticks 2 and 3 interpolated
    ticks = [t[0] - model.calls[0][0][0] for t, _ in model.calls]
    assert ticks == [0, 1, 2, 3, 4]
    assert [flags for _, flags in model.calls] == [[False], [False], [True], [True], [False]]


def _steady_stream(seed, n_series=5, n_ticks=60):
    """Interleaved hourly series in arrival order, with a few gaps, duplicates and late records mixed in."""
    rng = np.random.default_rng(seed)
    ids, ticks, values = [], [], []
    for t in range(n_ticks):
        for k in rng.permutation(n_series):
            if rng.random() < 0.03:  # a missing hour (a gap to fill)
                continue
            ids.append(f"s{k}")
            ticks.append(t)
            values.append(10 * k + np.sin(2 * np.pi * t / 6) + rng.normal())
            fault = rng.random()
            if fault < 0.02:  # the same record again
                ids.append(f"s{k}"), ticks.append(t), values.append(values[-1])
            elif fault < 0.04 and t > 2:  # a late one
                ids.append(f"s{k}"), ticks.append(t - 2), values.append(0.0)
    return ids, np.array(ticks, np.int64), np.array(values)


@pytest.mark.parametrize("seed, freq", [(0, "1h"), (1, "1h"), (2, None), (3, None)])
def test_the_array_path_and_the_record_path_give_the_same_state(seed, freq, monkeypatch):
    """``freq=None``: each series' step is inferred from its first rows, held meanwhile (the record path)."""
    ids, ticks, values = _steady_stream(seed)
    fast, slow = _engine(freq=freq), _engine(freq=freq)
    monkeypatch.setattr(slow, "_place_steady", lambda batch, result, too_big: (None, np.arange(len(batch))))
    taken = []  # per batch: (records the array path took, records left to the record path)
    place_steady = fast._place_steady

    def counted(part, result, too_big):
        steady, rest = place_steady(part, result, too_big)
        taken.append((len(part) - rest.size, rest.size))
        return steady, rest

    monkeypatch.setattr(fast, "_place_steady", counted)
    rng = np.random.default_rng(seed)
    start = 0
    while start < len(ids):
        stop = min(len(ids), start + int(rng.integers(1, 12)))
        part = batch(ids[start:stop], ticks[start:stop], values[start:stop])
        a, b = fast.process(part), slow.process(part)
        key = ["series_id", "issued_at", "h"]  # within a batch the steady series' rounds come first
        pd.testing.assert_frame_equal(a.forecasts.to_frame().sort_values(key).reset_index(drop=True),
                                      b.forecasts.to_frame().sort_values(key).reset_index(drop=True))
        assert (a.n_applied, a.n_duplicates, a.n_gap_filled, a.n_collisions, a.n_resets) == (
            b.n_applied, b.n_duplicates, b.n_gap_filled, b.n_collisions, b.n_resets)
        assert sorted((r.index, r.reason) for r in a.rejections) == sorted((r.index, r.reason) for r in b.rejections)
        start = stop
    assert any(k and r for k, r in taken)  # batches split between the paths
    assert any(k and not r for k, r in taken) and any(r and not k for k, r in taken)
    assert fast.summary() == slow.summary()
    (meta_a, arrays_a), (meta_b, arrays_b) = fast.export_series(fast.series_ids), slow.export_series(slow.series_ids)
    assert meta_a == meta_b and arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


def test_series_warming_up_counts_observed_series_without_a_forecast_yet():
    """Seasonal naive detecting its cycle waits for 402 values: three series count as warming up until then, a
    series that joins later counts alone, and a dropped one stops counting (its row is blank)."""
    engine = Engine.from_config(EngineConfig(models=["seasonal-naive"], horizon=3, freq="1h"))

    def warming() -> float:
        return engine.metrics.registry.get_sample_value("tidecast_series_warming_up", {"model": "seasonal-naive"})

    t = np.arange(450)
    for name in ("a", "b", "c"):
        engine.process(batch(name, t[:100], np.sin(2 * np.pi * t[:100] / 24)))
    assert warming() == 3
    for name in ("a", "b", "c"):
        engine.process(batch(name, t[100:], np.sin(2 * np.pi * t[100:] / 24)))
    assert warming() == 0
    engine.process(batch("late", t[:10], np.ones(10)))
    assert warming() == 1
    engine.drop_series(["late"])
    engine.process(batch("a", [450], [0.0]))
    assert warming() == 0
    inferred = Engine.from_config(EngineConfig(models=["seasonal-naive"], horizon=3))  # the step is inferred
    inferred.process(batch("new", [0, 1], [1.0, 2.0]))  # held until its step is known: it counts all the same
    assert inferred.metrics.registry.get_sample_value("tidecast_series_warming_up", {"model": "seasonal-naive"}) == 1


def test_a_fit_installed_between_rounds_keeps_its_calibration_through_an_export():
    """A deferred fit (serve's trainer thread; maintenance here) queues its validation residuals for the
    calibrators, and the queue is not state: an export drains it first, so an engine restored from that export
    issues the same intervals as the one that ran on (it issued none before: its rows were never seeded)."""
    pytest.importorskip("torch")
    config = EngineConfig(horizon=6, models=["cyclenet"], freq="1h", model_params={"cyclenet": {
        "lookback": 24, "cycle": 24, "warm_start": 200, "epochs": 2, "batch_size": 16, "replay_window": 64,
        "replay_batch": 16, "defer": True, "online": False}})
    rng = np.random.default_rng(0)
    ids = ["a", "b", "c"]
    t = np.arange(300)
    values = {sid: 10 + (i + 1) * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.3, t.size) for i, sid in enumerate(ids)}

    def rows(lo: int, hi: int) -> ObservationBatch:
        k = np.repeat(np.arange(lo, hi), len(ids))
        sid = np.tile(np.array(ids, dtype=object), hi - lo)
        return ObservationBatch(sid, T0 + k * HOUR, np.array([values[s][j] for s, j in zip(sid, k, strict=True)]))

    live = Engine.from_config(config)
    live.process(rows(0, 200))
    model = live.lanes[0].model
    while model.net_ is None:
        live.maintenance(5.0)  # the fit is installed between rounds; its hand-off waits in the queue
    meta, arrays = live.export_series(sorted(live.series_ids))
    restored = Engine.from_config(config)
    restored.import_shared(live.export_shared())
    restored.import_series(meta, arrays)
    for k in range(200, 212):
        a, b = live.process(rows(k, k + 1)).forecasts, restored.process(rows(k, k + 1)).forecasts
        assert np.isfinite(a.lower).all()
        np.testing.assert_array_equal(a.lower, b.lower)
        np.testing.assert_array_equal(a.upper, b.upper)


def test_imported_series_take_the_rows_they_ask_for_when_free():
    engine = Engine.from_config(EngineConfig(horizon=2, freq="1h"))
    ids = np.array(["a", "b", "c"], dtype=object)
    engine.process(ObservationBatch(np.tile(ids, 3), T0 + np.repeat(np.arange(3), 3) * HOUR, np.arange(9.0)))
    meta, arrays = engine.export_series(["b"])
    engine.drop_series(["b"])  # row 1 is free now
    rows = {"a": 0, "c": 2}
    assert engine.series_rows() == rows
    one = {k: v[:1] for k, v in arrays.items()}
    engine.import_series([{"series_id": "x", "row": 1}], one)  # free: taken
    engine.import_series([{"series_id": "y", "row": 0}], one)  # held by "a": the next new row instead
    engine.import_series([{"series_id": "z", "row": 6}], one)  # rows 4 and 5 become free rows
    assert engine.series_rows() == rows | {"x": 1, "y": 3, "z": 6}
    engine.process(ObservationBatch(np.array(["w", "v", "u"], dtype=object), T0 + np.full(3, 9) * HOUR,
                                    np.ones(3)))
    assert {engine.series_rows()[s] for s in "wvu"} == {4, 5, 7}  # free rows first, then the next new one


def test_free_rows_come_out_lowest_first_after_rows_taken_from_the_middle():
    """A restore claims series' saved rows out of the middle of the free rows; that took O(free rows) a series
    (list.remove and a re-heapify: 12 s for 32,000 series). Taken rows must never come out again, the others
    lowest first, whatever the order of pushes, takes and re-frees."""
    from tidecast.stream.engine import FreeRows

    rng = np.random.default_rng(3)
    free, model = FreeRows(), set()
    for _ in range(3_000):
        op = rng.integers(3)
        if op == 0:
            row = int(rng.integers(200))
            free.push(row)
            model.add(row)
        elif op == 1 and model:
            row = int(rng.choice(sorted(model)))
            free.take(row)
            model.remove(row)
        elif model:
            assert free.pop() == min(model)
            model.remove(min(model))
        assert len(free) == len(model)
    assert [free.pop() for _ in range(len(model))] == sorted(model)


def test_a_model_that_returns_the_wrong_shape_is_named():
    """A plug-in's forecasts one step short failed inside the calibrator ('cannot reshape array of size 3 into
    shape (1,4)'), naming neither the lane nor the model."""

    class OneShort(SeasonalNaive):
        def forecast_many(self, rows, horizon):
            return super().forecast_many(rows, horizon)[:, :-1]

    engine = Engine(EngineConfig(horizon=4, freq="1h"),
                    [Lane(OneShort(period=2), make_calibrator("conformal-pid", 4, 0.1), 4, 0.1, name="short")])
    t = np.arange(6)
    with pytest.raises(ValueError, match=r"lane 'short': model OneShort returned forecasts of shape \(1, 3\), "
                                         r"expected \(series, horizon\) = \(1, 4\)"):
        engine.process(batch(["s"] * t.size, t, np.sin(t)))


def test_a_series_that_starts_late_in_a_batch_is_not_learned_ahead_of_the_others():
    """Rounds were the k-th event of every series: b's first value (tick 150) went into round 0 beside a's tick 0,
    so CycleNet's shared fit at a's tick 120 had learned 120 of b's future values, and b joined at the fit rather
    than lookback + horizon values after its start. Rounds follow the grid's time now: the same forecasts whatever
    the batch size."""
    t = np.arange(300)
    ids = np.array(["a"] * t.size + ["b"] * 150, dtype=object)
    ticks = np.concatenate([t, t[150:]])
    values = np.concatenate([np.sin(2 * np.pi * t / 6), 3 + np.cos(2 * np.pi * t[150:] / 6)])
    order = np.argsort(ticks, kind="stable")
    ids, ticks, values = ids[order], ticks[order], values[order]

    def run(size: int) -> pd.DataFrame:
        engine = Engine.from_config(EngineConfig(
            horizon=3, freq="1h", models=["cyclenet"],
            model_params={"cyclenet": {"lookback": 8, "cycle": 6, "warm_start": 120, "epochs": 2, "defer": False}}))
        parts = [engine.process(batch(list(ids[i:i + size]), ticks[i:i + size], values[i:i + size]))
                 for i in range(0, ids.size, size)]
        frame = pd.concat([p.forecasts.to_frame() for p in parts], ignore_index=True)
        return frame.sort_values(["series_id", "issued_at", "h"]).reset_index(drop=True)

    whole, small = run(ids.size), run(10)
    first_b = (small[small["series_id"] == "b"]["issued_at"].min() - pd.Timestamp(T0, unit="ns", tz="UTC"))
    assert first_b == pd.Timedelta(hours=150 + 8 + 3 - 1)  # lookback + horizon values after b's start
    pd.testing.assert_frame_equal(whole, small)


# -- times more than 292 years apart (an int64 of nanoseconds spans 292 years) -------------------------------
def _placeholder_replay(first: str) -> pd.DataFrame:
    import tidecast

    ds = [pd.Timestamp(first, tz="UTC"), *pd.date_range("2024-01-01", periods=200, freq="h", tz="UTC")]
    y = [500.0, *(10 * np.sin(np.arange(200) * 2 * np.pi / 24)).round(3)]
    result = tidecast.replay(pd.DataFrame({"unique_id": "a", "ds": ds, "y": y}), models=["seasonal-naive"],
                             horizon=3, freq="1h", batch_size=100, model_params={"seasonal-naive": {"period": 24}})
    result.summary()  # worked out in integers too: it raised ValueError (negative dimensions)
    return result.forecasts[result.forecasts["cutoff"].dt.year == 2024].reset_index(drop=True)


def test_a_placeholder_row_centuries_before_the_rest_is_applied_first():
    """A 1700-01-01 placeholder in the same batch as 2024 rows: the round of each row, (grid - min) // step,
    wrapped around in int64, so the placeholder was learned after the 2024 rows and its value forecast for 2024."""
    pd.testing.assert_frame_equal(_placeholder_replay("1700-01-01"), _placeholder_replay("1800-01-01"))


def test_held_rows_centuries_apart_infer_a_positive_step():
    """Two held rows 324 years apart: np.diff wrapped to a negative step and the second row became a collision."""
    config = EngineConfig(horizon=2, models=["seasonal-naive"])
    engine = Engine(config, [Lane(SeasonalNaive(period=2), make_calibrator("conformal-pid", 2, 0.1), 2, 0.1)])
    times = [pd.Timestamp(t, tz="UTC").value for t in ("1700-01-01", "2024-01-01")]
    engine.process(ObservationBatch(np.array(["a", "a"], dtype=object), np.array(times), np.array([1.0, 2.0])))
    result = engine.flush()
    assert int(engine.series_["step_ns"][0]) > 0
    assert (result.n_applied, result.n_collisions) == (2, 0)


def test_a_row_whose_nearest_grid_time_is_past_2262_snaps_to_the_one_before():
    """A weekly series' last row, 2262-04-10, is nearest the grid time 2262-04-12, past int64's nanoseconds:
    its outcome was dated 1677 and the summary raised IndexError."""
    import tidecast

    ds = pd.date_range("2261-12-15", periods=17, freq="7D", tz="UTC")
    frame = pd.DataFrame({"unique_id": "a", "ds": [*ds, pd.Timestamp("2262-04-10", tz="UTC")], "y": range(18)})
    for batch_size in (None, 5):  # in a later batch the row takes the steady path (array arithmetic)
        result = tidecast.replay(frame, models=["seasonal-naive"], horizon=1, freq="7D", batch_size=batch_size,
                                 model_params={"seasonal-naive": {"period": 2}})
        assert result.actuals["ds"].min() == ds[0] and result.actuals["ds"].max() == ds[-1]
        assert (result.run["n_collisions"], result.run["n_observations"]) == (1, 17)
        result.summary()
