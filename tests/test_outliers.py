"""Values that break intervals: one absurd but finite value must leave calibrators, scorers and models finite, and
the intervals back at their old width within 2 H steps of the last outlying residual (issue 10).

The engine dead-letters values beyond ``max_abs_value`` (1e15 by default) as ``out_of_range``; values below it
(1e14 on data of scale 10) reach the models and calibrators, and so does anything with the limit off
(``max_abs_value=0``), which is how 1e20 and 1e308 are fed here: the guard must hold without the limit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.monitors.conformal import CALIBRATORS, make_calibrator
from tidecast.monitors.scoring import PrequentialScorer
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine

HOUR = 3_600_000_000_000
T0 = 1_467_331_200_000_000_000
H, PERIOD, N, SPIKE = 12, 24, 1200, 700
#: SPCI fits a forest per cell: small settings keep it to a few seconds.
PARAMS = {"spci": {"window": 8, "history": 200, "refit_every": 25, "n_estimators": 3}}


def series(n: int = N, seed: int = 0) -> np.ndarray:
    t = np.arange(n)
    return 10 + 3 * np.sin(2 * np.pi * t / PERIOD) + np.random.default_rng(seed).normal(size=n)


def replay(values: np.ndarray, calibrator: str = "conformal-pid", max_abs_value: float = 0.0,
           **params) -> tuple[Engine, object]:
    engine = Engine.from_config(EngineConfig(
        horizon=H, models=["seasonal-naive"], freq="1h", calibrator=calibrator, calibrator_params=params,
        model_params={"seasonal-naive": {"period": PERIOD}}, max_abs_value=max_abs_value))
    t = np.arange(values.size)
    result = engine.process(ObservationBatch(np.array(["s"] * values.size, dtype=object), T0 + t * HOUR, values))
    frame = result.forecasts.to_frame()
    frame["tick"] = (frame["issued_at"].astype("int64") - T0) // HOUR
    frame["width"] = frame["upper"] - frame["lower"]
    return engine, frame


@pytest.mark.parametrize("big, limit", [(1e308, 0.0), (1e20, 0.0), (1e14, None)])
@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_one_huge_value_leaves_intervals_finite_and_they_recover_within_2h(name, big, limit):
    values = series()
    values[SPIKE] = big
    kwargs = {} if limit is None else {"max_abs_value": limit}
    if limit is None:  # the engine's default limit (1e15): 1e14 passes it
        kwargs["max_abs_value"] = EngineConfig().max_abs_value
    engine, f = replay(values, name, **kwargs, **PARAMS.get(name, {}))
    assert engine.summary()["n_observations"] == N  # the value reached the models
    after = f[f["tick"] >= SPIKE]
    # No bound is ever NaN after the spike (NaN is "no interval" in Kafka); only ACI-type methods may say "unbounded".
    assert not after["lower"].isna().any() and not after["upper"].isna().any()
    if name not in ("aci", "dtaci"):
        assert np.isfinite(after[["lower", "upper"]].to_numpy()).all()
    # Seasonal naive repeats the value one cycle later, so the last outlying residual matures at SPIKE + PERIOD.
    last = SPIKE + PERIOD
    before = f[(f["tick"] >= SPIKE - 200) & (f["tick"] < SPIKE)]["width"].median()
    recovered = f[(f["tick"] >= last + 2 * H) & (f["tick"] < last + 4 * H)]["width"].median()
    assert np.isfinite(before) and recovered < 2 * before, (before, recovered)
    json.dumps(engine.summary(), allow_nan=False)


@pytest.mark.parametrize("big", [1e50])
@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_an_outlier_among_a_cells_first_residuals_does_not_stay_in_its_intervals(name, big):
    """A value at tick 41 matures while every h-step cell (H = 12, forecasts from tick 24 on) holds 5 to 16
    residuals: inside the guard's warm-up. Clipped there too (it was not before: conformal PID's intervals were
    1e10 wide 500 steps later, and a residual beyond float32 left them NaN for good)."""
    early = 41
    values = series()
    values[early] = big
    _, clean = replay(series(), name, **PARAMS.get(name, {}))
    _, f = replay(values, name, **PARAMS.get(name, {}))
    after = f[f["tick"] > early]
    assert not after["lower"].isna().any() and not after["upper"].isna().any()
    if name not in ("aci", "dtaci"):
        assert np.isfinite(after[["lower", "upper"]].to_numpy()).all()
    # Seasonal naive repeats the value one cycle later: the last outlying residual matures at early + PERIOD.
    window = (f["tick"] >= early + PERIOD + 200) & (f["tick"] < early + PERIOD + 400)
    # SF-OGD and SAOCP size their steps by the largest |r| seen, the clipped one included (30 x the guard), so
    # their thresholds stay noisier and wider (2-2.5 x over these steps; 1e13 wide before the warm-up clipping).
    # SAOCP 3.1 x since the h >= 2 steps of the forecasts that repeat 1e50 are scored too (their float32 offsets
    # overflowed and they went unscored: stream/pending.py), so every horizon's cell learns that miss.
    slack = {"sf-ogd": 3.0, "saocp": 3.5}.get(name, 2.0)
    assert f[window]["width"].median() < slack * clean[window.to_numpy()]["width"].median()


def drive(name: str, residuals: np.ndarray, alphas=(0.2, 0.05)) -> np.ndarray:
    """Covered flags (T, levels) of one 1-step cell fed ``residuals`` through the calibrator's own verbs."""
    cal = make_calibrator(name, 1, list(alphas), **PARAMS.get(name, {}))
    rows, ok = np.array([0]), np.ones((1, 1), bool)
    covered = np.zeros((residuals.size, len(alphas)), bool)
    for t, r in enumerate(residuals):
        lo, hi = cal.intervals(rows, np.zeros((1, 1)))
        covered[t] = (lo[0, 0] <= r) & (r <= hi[0, 0])
        cal.update(rows, np.array([[r]]), ok)
    return covered


SCORE_CALIBRATORS = [name for name in CALIBRATORS if name != "spci"]  # SPCI: a slow reference, no guard of its own


@pytest.mark.parametrize("name", SCORE_CALIBRATORS)
def test_an_outlier_that_is_a_cells_very_first_residual_is_judged_by_its_row(name):
    """H = 12 cells of one row, the h-step cell's first residual arriving at step h (as forecasts mature): 1e12 at
    step 11 is the 12-step cell's very first residual. With nothing of its own to judge it by it was learned as it
    was (intervals 1e10 to 3e11 wide 300-600 steps later); the row's 1-step cell, 11 residuals old, judges it."""
    horizon = 12
    rng = np.random.default_rng(2)
    r = rng.normal(size=700)
    r[horizon - 1] = 1e12
    widths = {}
    for label, residuals in (("clean", np.where(np.arange(700) == horizon - 1, 0.5, r)), ("spiked", r)):
        cal = make_calibrator(name, horizon, [0.05])
        rows, w = np.array([0]), []
        for t, value in enumerate(residuals):
            lo, hi = cal.intervals(rows, np.zeros((1, horizon)))
            w.append(hi[0, -1] - lo[0, -1])
            cal.update(rows, np.full((1, horizon), value), (np.arange(horizon) <= t)[None, :])
        widths[label] = np.median(w[300:])
    slack = 6.0 if name in ("sf-ogd", "saocp", "quantile-tracker") else 2.0  # steps sized by the largest |r| seen
    assert widths["spiked"] < slack * widths["clean"], widths


@pytest.mark.parametrize("name", SCORE_CALIBRATORS)
def test_a_series_that_is_often_exactly_right_keeps_its_coverage(name):
    """70 % of the residuals exactly 0 (quantised loads, night-time zeros): the guard's median of |r| was 0, so every
    other residual was clipped to nothing (coverage 0.59-0.70 at 80 % and at 95 %; ETTh2's LULL 0.51 / 0.62)."""
    rng = np.random.default_rng(0)
    r = np.where(rng.random(3000) < 0.7, 0.0, rng.normal(size=3000))
    covered = drive(name, r)[500:].mean(axis=0)
    assert covered[0] == pytest.approx(0.8, abs=0.03) and covered[1] == pytest.approx(0.95, abs=0.03), covered


@pytest.mark.parametrize("name", SCORE_CALIBRATORS)
def test_intervals_come_back_after_a_stuck_stretch(name):
    """1,000 residuals of exactly 0 (a stuck sensor that seasonal naive forecasts exactly), then ordinary ones: the
    intervals shrank to nothing and stayed there (0 % covered by conformal PID over the next 700 steps); now the
    first residuals beyond them are learned as misses and they widen again."""
    rng = np.random.default_rng(1)
    r = rng.normal(size=2300)
    r[600:1600] = 0.0
    covered = drive(name, r)[1600:].mean(axis=0)
    # ACI's quantile is of its last 500 scores, the stretch's zeros until new ones replace them
    floor = (0.45, 0.8) if name == "aci" else (0.6, 0.85)
    assert covered[0] > floor[0] and covered[1] > floor[1], covered


def test_conformal_pid_keeps_its_prior_through_a_series_that_starts_stuck():
    """Found by the conformal review (2026-12-04): a series stuck from its first value (forecast exactly: the scale is
    exactly 0, every interval of zero width) made each residual of 0 a hit, and p fell by lr * alpha a step without
    end; after 10,000 such hours the intervals stayed at zero width for ~500 steps once the series came alive
    (coverage 0.00 over the first 250). A cell with no scale has nothing to learn p from now."""
    rng = np.random.default_rng(2)
    r = np.concatenate([np.zeros(10_000), rng.normal(size=300)])
    covered = drive("conformal-pid", r)[10_000 + 20:].mean(axis=0)
    assert covered[0] > 0.7 and covered[1] > 0.9, covered


def test_conformal_pid_comes_back_after_a_long_stuck_stretch_that_follows_variation():
    """Found by the conformal review (2026-12-04): a series that varied, then stuck for 20,000 steps. Its scale
    decays geometrically and drops below float32's smallest normal number, where the ring stores every issued
    threshold as 0; each residual of 0 was then a hit on both sides and p fell without end (-25 after the stretch):
    coverage 0.00 over the next 300 steps. A cell whose scale is gone holds the prior, as a new cell does."""
    rng = np.random.default_rng(0)
    r = np.concatenate([rng.normal(size=2000) + 0.3, np.zeros(20_000), rng.normal(size=300)])
    covered = drive("conformal-pid", r)[22_000:].mean(axis=0)
    assert covered[0] > 0.7 and covered[1] > 0.85, covered


def test_conformal_pid_comes_back_after_a_stuck_stretch_of_thousands_of_steps():
    """5,000 stuck steps after ordinary ones: the scale decayed to 6e-24, above float32's floor, so the cell kept
    learning p from residuals of 0 on intervals of near-zero width: p fell to -0.78 below the centre and the 50
    steps after the series moved again covered 0.24 at 90 %, the next 250 0.74. A scale a million times below the
    cell's running median |r| counts as none now (p holds the prior) and restarts from the next residual."""
    rng = np.random.default_rng(1)
    for stuck_at in (0.0, 0.5):  # forecast exactly, or off by a constant the intercept learns
        r = np.concatenate([rng.normal(size=1000), np.full(5000, stuck_at), rng.normal(size=300)])
        covered = drive("conformal-pid", r, alphas=(0.1,))[6000:, 0]
        assert covered[:50].mean() > 0.6 and covered[50:].mean() > 0.85, (stuck_at, covered[:50].mean(),
                                                                           covered[50:].mean())


def test_conformal_pid_symmetric_cells_start_at_the_quantile_of_abs_z():
    """symmetric=True started from the one-sided quantile (1.61 instead of 2.06 units of mean |u| at alpha 0.1):
    ~22 % narrow, 0.80 covered over the first 20 steps instead of ~0.87."""
    from scipy.stats import norm

    one_sided = make_calibrator("conformal-pid", 1, [0.1])
    symmetric = make_calibrator("conformal-pid", 1, [0.1], symmetric=True)
    expected = norm.ppf(0.95) * np.sqrt(np.pi / 2)
    assert np.allclose(symmetric.prior_, expected) and np.allclose(one_sided.prior_, expected)


def test_summary_is_strict_json_after_a_huge_value():
    values = series()
    values[SPIKE] = 1e308
    engine, _ = replay(values)
    summary = engine.summary()
    text = json.dumps(summary, allow_nan=False)  # raised "Out of range float values" before
    m = json.loads(text)["models"]["seasonal-naive"]
    assert m["mae"] > 1e90 and m["rmse"] is not None  # the absurd error still shows, finite
    assert 0.8 < m["coverage"] < 1.0


def test_infinite_intervals_are_counted_and_kept_out_of_the_mean_width():
    # ACI with a large step emits infinite intervals (alpha_t <= 0) after a run of misses.
    values = series(seed=1)
    values[600:640] += np.linspace(0, 40, 40)
    engine, f = replay(values, "aci", gamma=0.2)
    assert np.isinf(f["width"]).any()
    m = engine.summary()["models"]["seasonal-naive"]
    json.dumps(engine.summary(), allow_nan=False)
    matured = f["tick"] + f["h"] <= N - 1
    assert m["n_infinite_interval"] == int(np.isinf(f["width"][matured]).sum()) > 0
    assert np.isfinite(m["mean_width"]) and np.isfinite(m["interval_score"])
    widths = [s.value for s in engine.metrics.width.collect()[0].samples]
    assert widths and np.isfinite(widths).all()


def test_scorer_sums_stay_finite():
    s = PrequentialScorer(horizon=1, alpha=0.1)
    s.resize(1)
    ok = np.array([[True]])
    s.update(np.array([0]), np.array([1e308]), np.array([[-1e308]]), np.array([[-1e308]]), np.array([[1.0]]), ok)
    s.update(np.array([0]), np.array([1.0]), np.array([[0.0]]), np.array([[-np.inf]]), np.array([[np.inf]]), ok)
    summary = s.summary(np.array([0]))
    json.dumps(summary, allow_nan=False)
    assert summary["n_infinite_interval"] == 1 and summary["coverage"] == 0.5
    assert np.isfinite(s.sums_).all()


def test_each_level_keeps_its_own_infinite_steps_out_of_its_mean_width():
    # two levels: the 95 % interval is infinite where the 80 % one is still finite
    s = PrequentialScorer(horizon=1, alpha=(0.2, 0.05))
    s.resize(1)
    ok = np.array([[True]])
    for lo95, hi95 in ((-np.inf, np.inf), (-3.0, 3.0)):
        lower = np.array([[[-1.0, lo95]]])
        upper = np.array([[[1.0, hi95]]])
        s.update(np.array([0]), np.array([0.0]), np.array([[0.0]]), lower, upper, ok)
    summary = s.summary(np.array([0]))
    levels = summary["levels"]
    assert levels["80"]["mean_width"] == pytest.approx(2.0)
    assert levels["95"]["mean_width"] == pytest.approx(6.0)  # the one finite 95 % width, not 6 / 2
    assert s.rolling_width_[:, 0].tolist() == pytest.approx([2.0, 6.0])  # the rolling gauge likewise
    assert summary["n_infinite_interval"] == 0  # the first level's count (the interval in lower / upper)
    # state saved when only the first level was counted: (rows, horizon) reads as that level's count
    state = s.export_rows(np.array([0]))
    assert state["infinite"].shape == (1, 2, 1)
    old = {**state, "infinite": np.array([[1]], np.int32)}
    fresh = PrequentialScorer(horizon=1, alpha=(0.2, 0.05))
    fresh.resize(1)
    fresh.import_rows(np.array([0]), old)
    assert fresh.summary(np.array([0]))["n_infinite_interval"] == 1
    assert fresh.infinite_[0].tolist() == [[1], [0]]


# -- CycleNet: the shared backbone never learns the value ----------------------------------------------------------
@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cyclenet_run(big: float | None, n: int = 520, at: int = 380, **params) -> tuple[np.ndarray, CycleNetForecaster]:
    rng = np.random.default_rng(0)
    t = np.arange(n)
    y = np.stack([5 * k + (1 + k) * np.sin(2 * np.pi * t / 24) + 0.2 * rng.normal(size=n) for k in range(3)], 1)
    model = CycleNetForecaster(horizon=6, lookback=24, cycle=24, warm_start=240, epochs=3, replay_window=64,
                               replay_batch=64, defer=False, step_budget=float("inf"), seed=0, **params)
    rows, out = np.arange(3), []
    for i in range(n):
        v = y[i].copy()
        if big is not None and i == at:
            v[0] = big
        model.learn_many(rows, np.full(3, i), v)
        out.append(model.forecast_many(rows, 6))
    return np.array(out), model


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("big", [1e300, 1e20])
def test_cyclenet_other_series_are_unaffected_by_one_huge_value(big):
    clean, _ = cyclenet_run(None)
    spiked, model = cyclenet_run(big)
    later = slice(380, None)
    assert np.isfinite(clean[later]).all()
    assert np.isfinite(spiked[later]).all()  # every series, every step (NaN for all three before)
    for k in (1, 2):  # the other series: the same forecasts as without the spike, up to the replay batches' mix
        assert np.max(np.abs(spiked[later, k] - clean[later, k])) < 0.05 * (1 + k)
    # the spiked series itself: back to its clean forecasts once the value has left the lookback
    assert np.max(np.abs(spiked[380 + 24 + 6 :, 0] - clean[380 + 24 + 6 :, 0])) < 0.5
    assert all(torch.isfinite(p).all() for p in model.net_.parameters())


@pytest.mark.usefixtures("one_thread")
def test_cyclenet_replay_skips_windows_whose_loss_is_not_finite_or_outlying():
    """With the input clean-up off, the loss filter alone keeps the shared weights finite and counts the windows."""
    clean, _ = cyclenet_run(None, input_limit=None)
    spiked, model = cyclenet_run(1e20, input_limit=None)
    assert model.skipped_windows_ > 0
    assert all(torch.isfinite(p).all() for p in model.net_.parameters())
    for k in (1, 2):
        assert np.isfinite(spiked[380:, k]).all()
        assert np.max(np.abs(spiked[380:, k] - clean[380:, k])) < 0.1 * (1 + k)
    _, meta = model.export_shared()
    assert meta["skipped_windows"] == model.skipped_windows_ and np.isfinite(meta["loss_ema"])


@pytest.mark.parametrize("name", ["conformal-pid", "quantile-tracker", "sf-ogd", "spci"])
def test_a_stuck_start_does_not_leave_the_guard_clipping_ordinary_residuals(name):
    """1,000 residuals of exactly 0 (a sensor stuck from the start, forecast exactly), one tiny one, then ordinary
    ones. The guard's warm-up counted the zeros, so it was over when the series moved: the guard began at the tiny
    residual, crept up 2.5 % a step and clipped the ordinary ones for hundreds of steps (the tracker covered 0.12
    of the next 300 at 80 %, SPCI 0.0). Zeros do not count now: the warm-up starts at the first non-zero one.
    (The tracker and SPCI still adapt slowly after such a start, by their own steps and window: 0.66 and 0.57.)"""
    rng = np.random.default_rng(1)
    r = np.concatenate([np.zeros(1000), [1e-6], rng.normal(size=300)])
    cal = make_calibrator(name, 1, 0.2, **PARAMS.get(name, {}))
    rows, ok, covered = np.array([0]), np.ones((1, 1), bool), []
    for t, value in enumerate(r):
        lo, hi = cal.interval(rows, np.zeros((1, 1)))
        if t > 1001:
            covered.append(lo[0, 0] <= value <= hi[0, 0])
        cal.update(rows, np.array([[value]]), ok)
    assert cal.n_clipped_ == 0 and np.mean(covered) > 0.5, (cal.n_clipped_, np.mean(covered))


def test_a_guard_saved_before_it_counted_its_residuals_imports_warm():
    """State saved before ``guard_n`` existed: a cell whose guard had started counts as past its warm-up."""
    cal = make_calibrator("conformal-pid", 2, 0.1)
    rows = np.array([0])
    for value in np.random.default_rng(0).normal(size=50):
        cal.update(rows, np.array([[value, 0.0]]), np.array([[True, True]]))  # h = 2: zeros only, never started
    state = cal.export_rows(rows)
    assert state["guard_n"][0].tolist() == [50, 0]
    del state["guard_n"]
    fresh = make_calibrator("conformal-pid", 2, 0.1)
    fresh.import_rows(rows, state)
    assert fresh.export_rows(rows)["guard_n"][0].tolist() == [fresh.guard_warmup, 0]


def test_conformal_pid_keeps_its_scale_on_a_steady_offset_with_tiny_noise():
    """Residuals of 1000 +- 1e-4 (naive on a counter with a fixed step): the scorecaster takes the offset out, so
    the scale of what is left is 1e-7 of the median |r|. That is no stuck cell: the intercept holds the offset
    (a first version of the stuck-scale rule reset such cells every step: coverage 0.71)."""
    r = 1000.0 + 1e-4 * np.random.default_rng(0).normal(size=3000)
    covered = drive("conformal-pid", r, alphas=(0.1,))[500:, 0]
    assert abs(covered.mean() - 0.9) < 0.02, covered.mean()


def test_the_rolling_gauges_average_the_first_steps_instead_of_holding_the_first_one():
    """Found by the scoring review (2026-12-04): the first scored step seeded the rolling gauge and each later one
    moved it by 1/window, so the first step (often issued without an interval: a miss) held the coverage gauge
    near 0 for thousands of steps and TidecastCoverageBelowTarget fired on a fresh service at target."""
    s = PrequentialScorer(horizon=1, alpha=0.2, window=1000)
    s.resize(1)
    ok = np.array([[True]])
    s.update(np.array([0]), np.array([0.0]), np.array([[0.0]]), np.array([[np.nan]]), np.array([[np.nan]]), ok)
    for k in range(299):  # then 4 of every 5 steps covered, width 2
        y = 0.0 if k % 5 else 5.0
        s.update(np.array([0]), np.array([y]), np.array([[0.0]]), np.array([[-1.0]]), np.array([[1.0]]), ok)
    assert s.rolling_coverage_[0, 0] == pytest.approx(s.summary(np.array([0]))["coverage"], abs=0.01)
    assert s.rolling_coverage_[0, 0] == pytest.approx(0.8 * 299 / 300, abs=0.01)
    assert s.rolling_width_[0, 0] == pytest.approx(2.0)
