"""Label-based drift detectors (tidecast.monitors.drift): behaviour on small synthetic residual streams."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import numpy as np
import pytest
from river import drift as river_drift

from tidecast.monitors.drift import D3A, Alarms, DriftEvent, HorizonPool, ResidualCUSUM, make_detector
from tidecast.monitors.drift_river import RiverDetector


def ar1(rng: np.random.Generator, steps: int, rows: int, phi: float = 0.8) -> np.ndarray:
    """(steps, rows) AR(1) noise of unit variance: autocorrelated like forecast residuals."""
    innov = rng.normal(scale=np.sqrt(1 - phi**2), size=(steps, rows))
    x = np.zeros((steps, rows))
    for t in range(1, steps):
        x[t] = phi * x[t - 1] + innov[t]
    return x


def feed(detector, x: np.ndarray, covered: np.ndarray | None = None, rows: np.ndarray | None = None) -> list:
    """Feed (steps, rows) residuals one step at a time; return (step, row, kind, statistic) per alarm."""
    rows = np.arange(x.shape[1]) if rows is None else rows
    out = []
    for t in range(x.shape[0]):
        alarms = detector.update(rows, x[t], None if covered is None else covered[t])
        out += [(t, int(r), str(k), float(s)) for r, k, s in
                zip(alarms.rows, alarms.kind, alarms.statistic, strict=True)]
    return out


def first_after(alarms: list, start: int, row: int = 0) -> tuple | None:
    return next((a for a in alarms if a[1] == row and a[0] >= start), None)


# -- ResidualCUSUM: fires on changes ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_level_shift_fires_mean_within_40_steps(seed: int) -> None:
    x = ar1(np.random.default_rng(seed), 800, 1)
    x[600:] += 3.0
    hit = first_after(feed(ResidualCUSUM(), x), 600)
    assert hit is not None and hit[0] - 600 < 40 and hit[2] == "mean" and hit[3] > 0


@pytest.mark.parametrize("seed", range(5))
def test_variance_jump_fires_variance_up_and_a_frozen_input_fires_it_down(seed: int) -> None:
    x = ar1(np.random.default_rng(seed), 800, 2)
    x[600:, 0] *= 3.0  # noisier
    x[600:, 1] = 0.0  # the residual of a frozen input collapses
    alarms = feed(ResidualCUSUM(), x)
    up, down = first_after(alarms, 600, row=0), first_after(alarms, 600, row=1)
    assert up is not None and up[0] - 600 < 30 and up[2] == "variance" and up[3] > 0
    assert down is not None and down[0] - 600 < 60 and down[2] == "variance" and down[3] < 0


def test_a_wide_miss_rate_is_watched_too() -> None:
    """A 50 % interval (alpha 0.5) cannot miss three times as often: the alternative is capped below 1, so
    the watcher builds, stays quiet at its target and fires when the interval stops covering."""
    rng = np.random.default_rng(0)
    x = ar1(rng, 800, 1)
    covered = rng.random((800, 1)) > 0.5  # 50 % coverage ...
    assert first_after(feed(ResidualCUSUM(alpha=0.5), x, covered), 0) is None
    covered[600:] = rng.random((200, 1)) > 0.9  # ... then 10 %
    hit = first_after(feed(ResidualCUSUM(alpha=0.5), x, covered), 600)  # a miss weighs log 1.5: ~40 of them
    assert hit is not None and hit[0] - 600 < 80 and hit[2] == "coverage"


def test_coverage_drop_fires_coverage_when_residuals_look_unchanged() -> None:
    rng = np.random.default_rng(0)
    x = ar1(rng, 800, 1)
    covered = rng.random((800, 1)) > 0.1  # 90 % coverage ...
    covered[600:] = rng.random((200, 1)) > 0.5  # ... then 50 %
    hit = first_after(feed(ResidualCUSUM(), x, covered), 600)
    assert hit is not None and hit[0] - 600 < 40 and hit[2] == "coverage"
    assert first_after(feed(ResidualCUSUM(), x), 600) is None  # without the flags nothing moved


def test_quiet_on_stationary_autocorrelated_noise_where_a_raw_cusum_is_not() -> None:
    x = ar1(np.random.default_rng(3), 2500, 100)  # 250,000 residuals, lag-1 autocorrelation 0.8
    whitened = feed(ResidualCUSUM(), x)
    raw = feed(ResidualCUSUM(whiten=False), x)
    assert len(whitened) <= 50  # <= 2 per 10,000
    assert len(raw) > 20 * max(len(whitened), 1)


def feed_values(detector, y: np.ndarray, residuals: np.ndarray | None = None) -> list:
    """Feed (steps, rows) observed values with their residuals (white noise if None); return (step, row, kind,
    statistic) per alarm."""
    if residuals is None:
        residuals = np.random.default_rng(9).normal(size=y.shape)
    rows = np.arange(y.shape[1])
    out = []
    for t in range(y.shape[0]):
        alarms = detector.update(rows, residuals[t], values=y[t])
        out += [(t, int(r), str(k), float(s)) for r, k, s in zip(alarms.rows, alarms.kind, alarms.statistic,
                                                                strict=True)]
    return out


def test_a_frozen_sensor_alarms_once_after_a_run_as_unlikely_as_the_rows_own_repeats_allow() -> None:
    rng = np.random.default_rng(8)
    continuous = rng.normal(size=600)
    quantised = np.round(rng.normal(size=600).cumsum() * 0.7)  # a coarse reading: ~ half the values repeat
    y = np.stack([continuous, quantised], axis=1)
    share = np.mean(quantised[1:400] == quantised[:399])
    y[400:, :] = y[399, :]  # both freeze at step 400 (the values repeat from 400 on)
    alarms = [a for a in feed_values(ResidualCUSUM(), y) if a[2] == "freeze"]
    assert [a[:3] for a in alarms if a[1] == 0] == [(403, 0, "freeze")]  # 4 repeats: 0.05^4 < 1e-5
    quantised_alarms = [a for a in alarms if a[1] == 1]
    expected = int(np.ceil(np.log(1e-5) / np.log(share)))
    assert len(quantised_alarms) == 1 and abs(quantised_alarms[0][3] - expected) <= 2  # one alarm per run
    before = [a for a in feed_values(ResidualCUSUM(), y[:400]) if a[2] == "freeze" and a[1] == 1]
    assert before == []  # its own shorter runs never alarm


def test_a_series_that_never_moves_alarms_at_most_once_and_alarms_resume_when_it_moves() -> None:
    # A learning model on a stuck value makes tiny errors that wander (its weights keep moving): without the
    # one-alarm-per-run rule every step change of those errors is a "drift" (tidecast replay of a constant
    # series under cfc raised 89 alarms on 7 series in 1,500 steps).
    rng = np.random.default_rng(4)
    steps = 3000
    wander = np.repeat(rng.normal(scale=1e-3, size=steps // 100), 100)  # the errors' level moves every 100 steps
    residuals = (wander + rng.normal(scale=1e-4, size=steps))[:, None]
    values = np.full((steps, 1), 5.0)
    values[2000:, 0] = 5.0 + rng.normal(size=1000)  # the sensor comes back
    residuals[2000:, 0] = rng.normal(size=1000)
    residuals[2500:, 0] += 4.0  # and a real level shift follows

    without_values = feed(ResidualCUSUM(), residuals)  # the detector cannot tell the input is stuck
    assert len([a for a in without_values if a[0] < 2000]) >= 5  # what the rule removes
    alarms = [t for t, _, _, _ in feed_values(ResidualCUSUM(), values, residuals)]
    assert len([t for t in alarms if t < 2000]) <= 1
    assert any(2000 <= t < 2030 for t in alarms)  # the sensor's return is a change of the residuals
    assert any(2500 <= t < 2560 for t in alarms)  # and once it moves, a shift is seen


def test_an_alarm_during_an_ordinary_repeat_does_not_silence_a_freeze_that_continues_it() -> None:
    rng = np.random.default_rng(5)
    residuals = rng.normal(size=(700, 1))
    residuals[500:] += 5.0  # a level shift: its alarm comes a few steps after 500
    values = rng.normal(size=(700, 1))
    first = next(t for t, _, _, _ in feed_values(ResidualCUSUM(), values, residuals) if t >= 500)
    values[first:] = values[first - 1]  # the value repeats at the alarm's step and stays stuck from there
    alarms = feed_values(ResidualCUSUM(), values, residuals)
    assert first in [t for t, _, _, _ in alarms]  # the shift's alarm, at the repeat
    freeze = [t for t, _, k, _ in alarms if k == "freeze"]
    assert freeze and first + 3 <= freeze[0] <= first + 4  # 4 repeats, as for any continuous series
    assert len([t for t, _, _, _ in alarms if t > freeze[0]]) == 0  # and the stuck run alarms no more


def test_unknown_coverage_is_no_evidence() -> None:
    x = ar1(np.random.default_rng(0), 400, 1)
    misses = np.zeros((400, 1))  # every interval missed ...
    unknown = np.full((400, 1), np.nan)  # ... or no interval at all
    assert any(k == "coverage" for _, _, k, _ in feed(ResidualCUSUM(), x, misses))
    assert feed(ResidualCUSUM(), x, unknown) == feed(ResidualCUSUM(), x)


def test_horizon_pool_scales_each_horizon_by_its_own_past_and_skips_what_did_not_mature() -> None:
    rng = np.random.default_rng(3)
    r = rng.normal(size=(500, 2, 3)) * np.array([1.0, 10.0, 100.0])  # horizons on very different scales
    r[::5, 1, 2] = np.nan
    pool = HorizonPool(horizon=3, memory=50)
    pooled = np.array([pool.pool(np.array([0, 1]), r[t]) for t in range(500)])
    assert np.isnan(pooled[0]).all() and np.isfinite(pooled[1:]).all()
    # by hand: each horizon over its running mean |r| (before this step), averaged over the finite ones
    scale = np.zeros((2, 3))
    count = np.zeros((2, 3))
    for t in range(1, 500):
        ok = np.isfinite(r[t - 1])
        count += ok
        rate = np.maximum(1 / np.maximum(count, 1), 1 / 50)
        scale = np.where(ok, scale + rate * (np.abs(np.nan_to_num(r[t - 1])) - scale), scale)
        np.testing.assert_allclose(pooled[t], np.nanmean(np.where(count > 0, r[t] / np.maximum(scale, 1e-300),
                                                                  np.nan), axis=1))
    assert 0.5 < np.std(pooled[100:]) < 2  # unit-free, whatever each horizon's scale


# -- ResidualCUSUM: arrays over rows --------------------------------------------------------------------------
def test_vectorised_equals_one_detector_per_series_in_any_row_order() -> None:
    rng = np.random.default_rng(1)
    x = ar1(rng, 700, 6)
    x[400:, 1] += 3.0
    x[300:, 4] *= 3.0
    covered = rng.random(x.shape) > 0.1
    together = feed(ResidualCUSUM(), x, covered)
    alone = []
    for row in range(6):
        single = feed(ResidualCUSUM(), x[:, [row]], covered[:, [row]])
        alone += [(t, row, k, s) for t, _, k, s in single]
    assert sorted(together) == sorted(alone) and len(together) >= 2
    # the same series on scattered, permuted rows of a bigger table
    rows = np.array([17, 3, 40, 8, 25, 11])
    scattered = feed(ResidualCUSUM(), x, covered, rows=rows)
    assert sorted((t, int(np.flatnonzero(rows == r)[0]), k, s) for t, r, k, s in scattered) == sorted(together)


def test_nan_residuals_are_skipped_and_learn_nothing() -> None:
    x = ar1(np.random.default_rng(2), 300, 2)
    with_gaps = x.copy()
    with_gaps[::7, 1] = np.nan  # row 1 misses some residuals
    a, b = ResidualCUSUM(), ResidualCUSUM()
    feed(a, with_gaps)
    feed(b, x[np.isfinite(with_gaps[:, 1]), 1:2])  # the same row fed only its finite residuals
    np.testing.assert_array_equal(a.export_rows(np.array([1]))["n"], b.export_rows(np.array([0]))["n"])
    for name, value in b.export_rows(np.array([0])).items():
        np.testing.assert_allclose(a.export_rows(np.array([1]))[name], value, err_msg=name)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_an_infinite_residual_beside_a_finite_value_is_skipped_like_a_nan(bad: float) -> None:
    """A row stays in the update for its value (the freeze watcher); its infinite residual (or one divided by a
    zero scale) was clipped to an absurd real one, learned into the variance, and raised a variance alarm."""
    rng = np.random.default_rng(0)
    residuals, values = rng.normal(size=400), np.arange(400.0) + rng.normal(size=400)
    states, alarms = [], []
    for missing in (np.nan, bad):
        det, fired = ResidualCUSUM(), []
        for t in range(400):
            r = missing if t == 100 else residuals[t]
            fired += [(t, str(k)) for k in det.update(np.array([0]), np.array([r]), values=values[t : t + 1]).kind]
        states.append(det.export_rows(np.array([0])))
        alarms.append(fired)
    assert alarms[1] == alarms[0] == []
    for name, value in states[0].items():
        np.testing.assert_array_equal(states[1][name], value, err_msg=name)


@pytest.mark.parametrize("make", [ResidualCUSUM, D3A])
def test_state_round_trip_continues_bit_for_bit_on_other_rows(make) -> None:
    rng = np.random.default_rng(4)
    x = ar1(rng, 900, 3)
    x[500:, 0] += 3.0
    x[550:, 2] *= 3.0
    covered = rng.random(x.shape) > 0.1
    original = make()
    feed(original, x[:450], covered[:450])
    state = original.export_rows(np.arange(3))
    assert all(v.shape[0] == 3 and v.dtype.kind == "f" for v in state.values())  # arrays only, rows first
    restored = make()
    restored.import_rows(np.array([5, 6, 7]), state)
    after_original = feed(original, x[450:], covered[450:])
    after_restored = feed(restored, x[450:], covered[450:], rows=np.array([5, 6, 7]))
    assert [(t, r + 5, k, s) for t, r, k, s in after_original] == after_restored and after_original


def test_reset_rows_restarts_the_reference_and_an_alarm_resets_its_row() -> None:
    det = ResidualCUSUM()
    x = ar1(np.random.default_rng(5), 300, 2)
    feed(det, x)
    det.reset_rows(np.array([0]))
    fresh = ResidualCUSUM()
    fresh.resize(1)
    for name, value in det.export_rows(np.array([0])).items():
        np.testing.assert_array_equal(value, fresh.export_rows(np.array([0]))[name])
    assert det.export_rows(np.array([1]))["n"][0] == 300  # the other row kept its reference
    # an alarm resets only the row that fired
    for _ in range(40):
        alarms = det.update(np.arange(2), np.array([0.0, 20.0]))
        if len(alarms):
            break
    assert alarms.rows.tolist() == [1]
    assert det.export_rows(np.array([1]))["n"][0] == 0 and det.export_rows(np.array([0]))["n"][0] > 0


def test_constructor_stores_params_and_rejects_bad_ones() -> None:
    det = ResidualCUSUM(h=12.0, warmup=50)
    params = det.get_params()
    assert params["h"] == 12.0 and params["warmup"] == 50
    assert ResidualCUSUM(**params).get_params() == params
    json.dumps(params)
    with pytest.raises(ValueError):
        ResidualCUSUM(coverage_ratio=1.0)  # no change to detect
    with pytest.raises(ValueError):
        ResidualCUSUM(variance_ratio=1.0)
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("nope")


# -- D3A --------------------------------------------------------------------------------------------------------
def d3a_reference(losses: list[float], window: int = 16, z: float = 2.97, max_age: int = 1000) -> list[int]:
    """The published test step by step over plain lists (np.mean / np.std since the reset)."""
    data: list[float] = []
    fired = []
    for t, loss in enumerate(losses):
        data.append(loss)
        if len(data) >= window:
            std = np.std(data)
            stat = (np.mean(data[-window:]) - np.mean(data)) / (std / np.sqrt(len(data))) if std > 0 else 0.0
            if stat > z:
                fired.append(t)
                data = []
                continue
        if len(data) >= max_age:
            data = []
    return fired


def test_d3a_matches_the_published_test_including_the_forced_reset() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3000, 2))
    x[1500:, 1] *= 2.0
    alarms = feed(D3A(), x)
    for row in range(2):
        ours = [t for t, r, _, _ in alarms if r == row]
        assert ours == d3a_reference((x[:, row] ** 2).tolist())
    assert any(t >= 1500 for t, r, _, _ in alarms if r == 1)
    assert {k for _, _, k, _ in alarms} == {"loss"}
    # a falling loss never fires; the reference restarts after 1,000 losses anyway (D3A's forced reset)
    det = D3A()
    falling = np.linspace(3.0, 1.0, 1000)[:, None]
    assert feed(det, falling[:999]) == [] and det.export_rows(np.array([0]))["n"][0] == 999
    assert feed(det, falling[999:]) == [] and det.export_rows(np.array([0]))["n"][0] == 0


# -- river references -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,cls", [("adwin", "ADWIN"), ("pagehinkley", "PageHinkley"), ("kswin", "KSWIN")])
def test_river_wrapper_fires_where_river_itself_does(method: str, cls: str) -> None:
    rng = random.Random(12345)
    stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)  # river's docstring stream
    direct = getattr(river_drift, cls)(**({"seed": 0} if method == "kswin" else {}))
    expected = []
    for t, v in enumerate(stream):
        direct.update(v)
        if direct.drift_detected:
            expected.append(t)
    wrapped = RiverDetector(method, value="signed")
    got = [t for t, *_ in feed(wrapped, np.array(stream, dtype=float)[:, None])]
    assert got == expected and any(t >= 1000 for t in got)
    with pytest.raises(NotImplementedError):
        wrapped.export_rows(np.array([0]))


def test_make_detector_builds_every_benchmarked_name() -> None:
    for name in ("cusum", "d3a", "river-adwin", "river-pagehinkley", "river-kswin"):
        assert make_detector(name).name == name


# -- events ---------------------------------------------------------------------------------------------------
def test_alarms_become_json_round_tripping_events() -> None:
    alarms = Alarms(np.array([2]), np.array(["variance"]), np.array([-47.5]))
    ids = np.array(["a", "b", "ETTh2/OT"], dtype=object)
    stamps = np.array([0, 0, 1_483_228_800_000_000_000])  # 2017-01-01 in ns
    (event,) = alarms.events(ids, "cyclenet", "cusum", stamps)
    assert event == DriftEvent("ETTh2/OT", "cyclenet", "cusum", "variance", datetime(2017, 1, 1, tzinfo=UTC), -47.5)
    wire = json.dumps(event.to_dict())
    assert DriftEvent.from_dict(json.loads(wire)) == event
    assert json.loads(wire)["detected_at"] == "2017-01-01T00:00:00Z"


def test_d3a_statistics_do_not_depend_on_the_rows_a_series_sits_in():
    """The same series in rows 0, 1, 2 (a contiguous run, updated through a view) and in rows 2, 0, 1 (gathered):
    the same alarms with bit-identical statistics, so a restore into other rows changes no event."""
    rng = np.random.default_rng(0)
    straight, shuffled = D3A(), D3A()
    straight.resize(3)
    shuffled.resize(3)
    place = np.array([2, 0, 1])  # series k sits in row k of `straight`, row place[k] of `shuffled`
    seen_straight, seen_shuffled = [], []
    for t in range(400):
        x = rng.normal(size=3) * (1 + 3 * (t > 200))
        a, b = straight.update(np.arange(3), x), shuffled.update(place, x)
        seen_straight += [(t, int(r), s) for r, s in zip(a.rows, a.statistic, strict=True)]
        seen_shuffled += [(t, int(np.flatnonzero(place == r)[0]), s) for r, s in zip(b.rows, b.statistic, strict=True)]
    assert len(seen_straight) > 5 and sorted(seen_straight) == sorted(seen_shuffled)


def test_one_absurd_residual_neither_disables_the_cusum_nor_inflates_the_pooled_scale():
    """1e200 once: the variance's square overflowed and left every statistic of the row NaN (no alarm ever again);
    1e14 once moved the pooled scale by 1e11, which decayed over thousands of steps and faked variance alarms."""
    rng = np.random.default_rng(0)
    detector = ResidualCUSUM()
    row = np.array([0])
    for t in range(2600):
        x = rng.normal() + (5.0 if t >= 2000 else 0.0)
        alarms = detector.update(row, np.array([1e200 if t == 500 else x]))
        state = detector.export_rows(row)
        assert all(np.isfinite(state[key]).all() for key in ("mean", "var", "cov1", "mean_up", "var_up")), t
        if t >= 2000 and len(alarms):
            break
    else:
        pytest.fail("the 5-sigma shift at 2000 raised no alarm")
    pool = HorizonPool(horizon=1)
    for t in range(100):
        pool.pool(row, np.array([[1e14 if t == 50 else rng.normal()]]))
    assert pool.scale_[0, 0] < 5.0  # 30 x the scale at most, learned at the rate of one step


def test_a_constant_residual_raises_no_variance_collapse_alarms():
    """Seasonal naive on a counter rising at a fixed rate errs by the same amount every step: its reference has no
    variance to collapse from. Every step used to count as a collapse: a `variance` alarm every ~70 steps."""
    from tidecast.monitors.drift import DriftMonitor

    monitor = DriftMonitor(ResidualCUSUM(), 4)
    monitor.resize(1)
    alarms = 0
    for t in range(2000):
        y = np.array([float(t)])  # a ramp: no value repeats, so the freeze rule plays no part
        mean = y[:, None] - 2.5
        alarms += len(monitor.matured(np.array([0]), np.array([t]), y, mean, mean - 1, mean + 3,
                                      np.ones((1, 4), bool)))
    assert alarms == 0


# -- found by the drift review (2026-12-04) ------------------------------------------------------------------
def _monitor_alarms(y: np.ndarray, mean: np.ndarray) -> list[tuple[int, str, float]]:
    """A horizon-1 DriftMonitor with the default detector over one series: (step, kind, statistic) per alarm."""
    from tidecast.monitors.drift import DriftMonitor

    monitor = DriftMonitor(ResidualCUSUM(), 1)
    monitor.resize(1)
    out = []
    for t in range(y.size):
        m = np.array([[mean[t]]])
        alarms = monitor.matured(np.array([0]), np.array([t]), y[t : t + 1], m, m - 1, m + 1, np.ones((1, 1), bool))
        out += [(t, str(k), float(s)) for k, s in zip(alarms.kind, alarms.statistic, strict=True)]
    return out


def test_an_intermittent_series_runs_of_zeros_are_no_collapse():
    """90 % zeros, i.i.d.: every long run of zeros counted as a variance collapse (7 alarms in 4,000 steps), and
    the reference relearned from the run made the next spike a variance-up alarm."""
    rng = np.random.default_rng(5)
    y = rng.gamma(2.0, 5.0, 4000)
    y[rng.random(4000) < 0.9] = 0.0
    seasonal_naive = np.concatenate([np.full(24, y[:24].mean()), y[:-24]])  # exactly right on two zeros
    alarms = _monitor_alarms(y, seasonal_naive)
    assert not [a for a in alarms if a[1] == "variance" and a[2] < 0]  # 4 on the old code
    assert len(alarms) <= 8  # 15 on the old code


def test_a_step_on_a_series_that_was_exactly_constant_is_caught_at_once():
    """Residuals all exactly 0 left the pooled scale at 0 and every value was skipped: the watcher learned nothing
    before the step and took the step for its reference (only a coverage alarm 44 steps later)."""
    y = np.where(np.arange(700) < 500, 5.0, 6.0)
    alarms = _monitor_alarms(y, np.full(700, 5.0))
    assert alarms and 500 <= alarms[0][0] <= 503 and alarms[0][1] in ("mean", "variance")
    assert not _monitor_alarms(np.full(700, 5.0), np.full(700, 5.0))  # and a constant that stays is quiet


def test_watcher_parameters_refuse_sizes_that_exhaust_memory_and_read_inf():
    with pytest.raises(ValueError, match="window = 100000000: at most 1,000"):
        D3A(window=100_000_000, max_age=100_000_000)
    from tidecast.models.registry import check_keywords, keyword_parameters

    given = check_keywords(keyword_parameters(ResidualCUSUM), {"h": "inf"}, "drift detector parameter ", "cusum")
    assert given["h"] == float("inf")  # "that statistic never alarms": JSON has no inf, the CLI sends text
    for kw in ({"delta": 0}, {"delta": float("nan")}):
        with pytest.raises(ValueError, match="delta"):
            make_detector("river-adwin", **kw)  # never alarmed
    with pytest.raises(ValueError, match="threshold = -1"):
        make_detector("river-pagehinkley", threshold=-1)  # alarmed every ~30 steps
    with pytest.raises(ValueError, match="unexpected keyword"):
        make_detector("river-kswin", windw=100)
