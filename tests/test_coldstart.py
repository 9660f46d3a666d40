"""Intervals right from the first forecast (issue 11): calibrators seeded from a model's own residuals, young cells
pooled across the lane's series, and the hand-off between the two (models.base.Calibration)."""

from __future__ import annotations

import runpy
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tidecast.models.base import Calibration, CalibrationQueue
from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.models.naive import SeasonalNaive, seasonal_backtest
from tidecast.monitors.conformal import CALIBRATORS, make_calibrator
from tidecast.monitors.conformal.pool import Pool
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine, Lane

HOUR = 3_600_000_000_000
T0 = 1_467_331_200_000_000_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models, two CI cores


def ar_residuals(n: int, horizon: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = np.zeros((n, horizon))
    for t in range(1, n):
        e[t] = 0.8 * e[t - 1] + scale * rng.normal(size=horizon)
    return e


# -- seeding -------------------------------------------------------------------------------------------------------
def first_pass(name: str, r: np.ndarray, **params):
    """conformal-pid seeds in two passes: its scorecaster from a first one (see monitors/conformal/pid.py)."""
    cal = make_calibrator(name, horizon=1, alpha=0.1, **params)
    if name != "conformal-pid" or params.get("scorecaster", "ar") is None:
        return cal
    scout = make_calibrator(name, horizon=1, alpha=0.1, **params)
    for t in range(r.shape[0]):
        scout.update(np.array([0]), r[t : t + 1], np.ones((1, 1), bool))
    cal.resize(1)
    state = cal.export_rows(np.array([0]))
    learned = scout.export_rows(np.array([0]))
    cal.import_rows(np.array([2]), {**state, **{k: learned[k] for k in ("xx", "xy", "coef")}})
    return cal


@pytest.mark.parametrize("name, params", [(n, {}) for n in CALIBRATORS if n != "spci"]
                         + [("conformal-pid", {"scorecaster": None})])
def test_seeding_one_step_cells_is_exactly_having_seen_the_residuals(name, params):
    """At h = 1 nothing is on its way when the seeds end: seed + live == live from the start, bit for bit (for
    conformal-pid: with the scorecaster its first pass over the seeds learned)."""
    r = ar_residuals(400, 1)
    live = first_pass(name, r[:300], **params)
    seeded = make_calibrator(name, horizon=1, alpha=0.1, **params)
    rows, ok = np.array([2]), np.ones((1, 1), bool)
    seeded.update(rows, np.full((1, 1), 50.0), ok)  # state from before: seeding starts the row afresh
    seeded.seed(rows, r[None, :300])
    for t in range(300):
        live.update(rows, r[t : t + 1], ok)
    if name == "conformal-pid" and params.get("scorecaster", "ar") is not None:
        # The seeds were scored by a scorecaster fitted on them: the seeded scale is widened by the in-sample ->
        # out-of-sample factor sqrt((m + k) / (m - k)), k = 2 (slope, intercept), m = 299 pairs, at most the
        # 1 / (1 - forget) = 200 the fit remembers.
        m = 1.0 / (1.0 - 0.995)
        live.state_[live._layout["scale"][0].start, rows] *= np.sqrt((m + 2) / (m - 2))
        live._refresh_offsets(rows)
    for t in range(300, 400):
        np.testing.assert_array_equal(seeded.interval(rows, np.zeros((1, 1))), live.interval(rows, np.zeros((1, 1))))
        for cal in (live, seeded):
            cal.update(rows, r[t : t + 1], ok)


def _coverage_after_short_seeds(cal, n_rows=400, horizon=24, n_seed=96, n_after=48):
    """Coverage of the intervals issued over ``n_after`` steps after seeding ``n_rows`` rows with ``n_seed`` steps
    of h-step residuals of an AR(0.8) process (each scored when it matures, h steps after its interval)."""
    rng = np.random.default_rng(0)
    T = n_seed + n_after + horizon
    e = np.zeros((n_rows, T + horizon))
    for t in range(1, T + horizon):
        e[:, t] = 0.8 * e[:, t - 1] + rng.normal(size=n_rows)
    r = np.stack([e[:, horizon:] - 0.8 ** (h + 1) * e[:, horizon - h - 1: horizon - h - 1 + T]
                  for h in range(horizon)], axis=2)
    rows = np.arange(n_rows)
    cal.seed(rows, r[:, :n_seed])
    issued, covered = [], []
    for t in range(n_after + horizon):
        lo, hi = cal.interval(rows, np.zeros((n_rows, horizon)))
        issued.append((lo.reshape(n_rows, horizon), hi.reshape(n_rows, horizon)))
        res = r[:, n_seed + t]
        cal.update(rows, res, np.broadcast_to(np.arange(1, horizon + 1) <= t, (n_rows, horizon)).copy())
        for h in range(1, horizon + 1):
            if 0 <= t - h < n_after:
                lo_h, hi_h = issued[t - h]
                covered.append((lo_h[:, h - 1] <= res[:, h - 1]) & (res[:, h - 1] <= hi_h[:, h - 1]))
    return float(np.mean(covered))


def test_a_pid_seeded_from_few_residuals_widens_for_its_in_sample_scorecaster(monkeypatch):
    """96 seeds (a promoted model's shadow window) scored by a scorecaster fitted on them look better than live
    residuals will: without the out-of-sample factor the intervals that follow cover below target."""
    corrected = _coverage_after_short_seeds(make_calibrator("conformal-pid", horizon=24, alpha=0.1))
    plain = make_calibrator("conformal-pid", horizon=24, alpha=0.1)
    monkeypatch.setattr(plain, "_out_of_sample_factor", lambda pairs: 1.0)
    uncorrected = _coverage_after_short_seeds(plain)
    assert uncorrected < corrected
    assert abs(corrected - 0.9) < abs(uncorrected - 0.9)
    assert abs(corrected - 0.9) < 0.015


def test_a_reseeded_pid_mixes_what_it_learned_with_the_new_residuals():
    """A promotion re-seeds the lane's calibrator from the new model's shadow residuals: every learned statistic
    (thresholds ``p``, scale, intercept, scorecaster) is a ``reseed_keep`` mean of the one learned from them and the
    cell's own; a cell that had learned nothing is seeded from them alone."""
    horizon, rows = 3, np.array([0, 1])
    old, new = ar_residuals(600, horizon, seed=1), ar_residuals(96, horizon, seed=2, scale=3.0)
    cal = make_calibrator("conformal-pid", horizon=horizon, alpha=0.1)
    cal.seed(rows[:1], old[None])  # row 0 has a life behind it, row 1 has learned nothing
    fields = {name: cal._layout[name][0] for name in ("p", "scale", "mean", "xx", "xy", "coef")}
    before = {name: cal.state_[f, 0].copy() for name, f in fields.items()}
    only_new = make_calibrator("conformal-pid", horizon=horizon, alpha=0.1)
    only_new.seed(rows, np.stack([new, new]))
    cal.reseed(rows, np.stack([new, new]))
    keep = cal.reseed_keep
    assert 0 < keep < 1
    for name, f in fields.items():
        np.testing.assert_allclose(cal.state_[f, 0], (1 - keep) * only_new.state_[f, 0] + keep * before[name],
                                   err_msg=name)
        np.testing.assert_array_equal(cal.state_[f, 1], only_new.state_[f, 1], err_msg=name)
    scale = fields["scale"].start
    old_size = make_scale(old, horizon)
    # the new model's errors are 3x larger: the mixed size lies between the two, above the old one
    assert (cal.state_[scale, 0] > 1.2 * old_size).all() and (cal.state_[scale, 0] < only_new.state_[scale, 0]).all()
    lo, hi = cal.interval(rows, np.zeros((2, horizon)))  # what is issued is what the state says
    centre = cal.offsets_[rows][..., 0]
    p_now = cal.state_[fields["p"], rows]  # (K, n, H): upper, lower
    np.testing.assert_allclose(hi, centre + p_now[0] * cal.state_[scale, rows], rtol=1e-12)
    np.testing.assert_allclose(lo, centre - p_now[1] * cal.state_[scale, rows], rtol=1e-12)
    lo_new, hi_new = only_new.interval(rows[1:], np.zeros((1, horizon)))
    np.testing.assert_array_equal(lo[1:], lo_new)
    np.testing.assert_array_equal(hi[1:], hi_new)


def make_scale(residuals: np.ndarray, horizon: int) -> np.ndarray:
    cal = make_calibrator("conformal-pid", horizon=horizon, alpha=0.1)
    cal.seed(np.array([0]), residuals[None])
    return cal.state_[cal._layout["scale"][0].start, 0]


def test_a_seeded_pid_cell_scores_its_first_live_residual_against_the_interval_it_issued():
    """After the seeds, the h-step cell issues h - 1 more intervals before its first live residual arrives; they are
    recorded in its ring, so that residual is scored against the interval issued for it, as in a live cell."""
    horizon = 4
    cal = make_calibrator("conformal-pid", horizon=horizon, alpha=0.1)
    seeds = ar_residuals(200, horizon)
    cal.seed(np.array([0]), seeds[None])
    issued = cal.offsets_[0].copy()  # (H, 1 + K): what the engine issues from now until the first live residual
    counts = cal.cell_counts(np.array([0]))[0]
    np.testing.assert_array_equal(counts, 200 + np.arange(horizon))  # 200 seeds + h - 1 recorded intervals
    width = 2 + cal.n_targets_
    ring = cal.ring_[0].reshape(-1, width)
    pos = cal.state_[cal._layout["pos"][0].start, 0].astype(int)
    for h in range(horizon):  # the slot the next live residual reads holds the interval issued for it
        slot = ring[cal.ring_start_[h] + pos[h]]
        np.testing.assert_allclose(slot[1:], issued[h], rtol=1e-6)


def test_seasonal_backtest_is_what_seasonal_naive_would_have_forecast():
    y = np.random.default_rng(0).normal(size=(2, 60))
    period = np.array([7, 1])
    r = seasonal_backtest(y, period, 10)
    for i in range(2):
        for h in range(1, 11):
            back = period[i] * int(np.ceil(h / period[i]))
            for t in range(60):
                expected = y[i, t] - y[i, t - back] if t >= back else np.nan
                np.testing.assert_equal(r[i, t, h - 1], expected)


def test_seasonal_naive_hands_its_detection_window_over_when_it_starts_forecasting():
    model = SeasonalNaive(max_period=12, detect_after=60)
    model.resize(2)
    rows = np.array([0, 1])
    t = np.arange(100)
    y = np.stack([np.sin(2 * np.pi * t / 6), 5 + np.cos(2 * np.pi * t / 6)], 1)
    for k in range(100):
        model.learn_many(rows, np.array([k, k]), y[k])
        forecast = model.forecast_many(rows, 4)
        handed = model.pop_calibration(4)
        if k < 59:
            assert handed is None and np.isnan(forecast).all()
        elif k == 59:  # the round of the first forecast: the detection window, backtested
            assert np.isfinite(forecast).all()
            np.testing.assert_array_equal(handed.rows, rows)
            np.testing.assert_array_equal(handed.residuals, seasonal_backtest(y[:60].T, np.array([6, 6]), 4))
        else:
            assert handed is None  # once per row


def test_calibration_queue_is_a_thread_safe_mailbox():
    queue = CalibrationQueue()
    assert queue.pop() is None

    def put(k: int) -> None:
        for j in range(50):
            queue.put(Calibration(np.array([k * 100 + j]), np.full((1, 3 + k, 2), float(k))))

    threads = [threading.Thread(target=put, args=(k,)) for k in range(4)]
    got = []
    for th in threads:
        th.start()
    while True:
        alive = any(th.is_alive() for th in threads)
        handed = queue.pop()
        if handed is not None:
            got.append(handed)
        elif not alive:
            break
    rows = np.concatenate([c.rows for c in got])
    assert sorted(rows.tolist()) == sorted(k * 100 + j for k in range(4) for j in range(50))
    queue.put(Calibration(np.array([1, 2]), np.zeros((2, 3, 2))))
    queue.discard(np.array([1]))
    assert queue.pop().rows.tolist() == [2]


# -- pooling -------------------------------------------------------------------------------------------------------
def test_a_young_cell_borrows_the_lane_estimate_in_its_own_scale_and_lets_go_after_n0():
    horizon, n0 = 3, 20
    cal, pool = make_calibrator("conformal-pid", horizon=horizon, alpha=0.1), Pool(horizon, n0=n0)
    rng = np.random.default_rng(1)
    seasoned = np.arange(10)
    scales = np.exp(rng.uniform(-2, 2, size=10))
    for _ in range(300):  # residuals of scale s_i on series whose one-step changes have scale s_i too
        pool.observe(seasoned, scales * rng.normal(size=10))
        cal.update(seasoned, scales[:, None] * rng.normal(size=(10, horizon)), np.ones((10, horizon), bool))
    new = np.array([10])
    for _ in range(30):  # the late series' first window: 50x the first series' scale
        pool.observe(new, 50 * scales[0] * rng.normal(size=1))
    means = np.zeros((1, horizon))
    lo, hi = cal.interval(new, means)
    assert np.isnan(lo).all()  # nothing of its own
    lo, hi = pool.interval(cal, new, means, lo, hi)
    ratio = (hi - lo)[0] / (50 * scales[0])
    reference = (np.diff(np.stack(cal.interval(seasoned, np.zeros((10, horizon)))), axis=0)[0] / scales[:, None])
    assert np.all(np.abs(ratio / np.median(reference, axis=0) - 1) < 0.4)
    # its own residuals take over linearly; from n0 on the pool is out of the way
    for k in range(1, n0 + 2):
        cal.update(new, 50 * scales[0] * rng.normal(size=(1, horizon)), np.ones((1, horizon), bool))
        own = cal.interval(new, means)
        pooled = pool.interval(cal, new, means, *own)
        if k >= n0:
            np.testing.assert_array_equal(pooled, own)
        else:
            assert not np.allclose(pooled, own)


def test_without_seasoned_cells_or_scales_nothing_is_borrowed():
    cal, pool = make_calibrator("conformal-pid", horizon=2, alpha=0.1), Pool(2, n0=10)
    rows, means = np.array([0, 1]), np.zeros((2, 2))
    lo, hi = cal.interval(rows, means)
    out = pool.interval(cal, rows, means, lo, hi)
    assert np.isnan(out).all()  # "no interval" stays "no interval"
    off_lo, off_hi = Pool(2, n0=0).interval(cal, rows, means, lo, hi)
    np.testing.assert_array_equal(np.stack([off_lo, off_hi]), np.stack([lo, hi]))


def test_pool_state_is_per_row_and_blank_rows_forget_their_scale():
    pool = Pool(2)
    pool.observe(np.array([0, 1]), np.array([1.0, 10.0]))
    pool.observe(np.array([0, 1]), np.array([2.0, 30.0]))
    state = pool.export_rows(np.array([1]))
    other = Pool(2)
    other.import_rows(np.array([5]), state)
    assert other.scales(np.array([5])).tolist() == [20.0]
    other.import_rows(np.array([5]), {})  # state from before pooling: a blank row
    assert np.isnan(other.scale_[5])


# -- through the engine --------------------------------------------------------------------------------------------
def panel(n_series: int = 12, hours: int = 900, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(hours)
    scale = 10 ** rng.uniform(-1, 2, size=(n_series, 1))
    shape = 10 + np.sin(2 * np.pi * t / 24) + 0.3 * rng.normal(size=(n_series, hours))
    return scale * shape


def run_engine(values: np.ndarray, model: str, params: dict, start: np.ndarray | None = None, **lane) -> dict:
    n, hours = values.shape
    start = np.zeros(n, int) if start is None else start
    config = EngineConfig(horizon=6, models=[model], freq="1h", model_params={model: params})
    engine = Engine.from_config(config)
    if lane:
        old = engine.lanes[0]
        engine = Engine(config, [Lane(old.model, old.calibrator, 6, 0.1, name=model, **lane)])
    ids = np.array([f"s{i}" for i in range(n)], dtype=object)
    first: dict[str, int] = {}
    no_interval_first = 0
    for t in range(hours):
        present = np.flatnonzero(start <= t)
        out = engine.process(ObservationBatch(ids[present], np.full(present.size, T0 + t * HOUR), values[present, t]))
        f = out.forecasts
        for sid in set(f.series_id.tolist()) - set(first):
            first[sid] = t
            no_interval_first += int(np.isnan(f.lower[f.series_id == sid]).sum())
    return {"summary": engine.summary()["models"][model], "first": first, "no_interval_first": no_interval_first}


def test_seasonal_naive_lane_has_intervals_from_every_series_first_forecast():
    values = panel()
    start = np.r_[np.zeros(6, int), np.full(6, 400)]
    seeded = run_engine(values, "seasonal-naive", {"max_period": 30, "detect_after": 62}, start)
    assert len(seeded["first"]) == 12 and seeded["no_interval_first"] == 0
    assert seeded["summary"]["n_no_interval"] == 0
    assert abs(seeded["summary"]["coverage"] - 0.9) < 0.03
    # with a configured period there is nothing to backtest; series of seasonal naive stay independent by default
    alone = run_engine(values, "seasonal-naive", {"period": 24}, start)
    assert alone["no_interval_first"] == 6 * 12
    # asked to pool, the late series borrow from the first ones
    pooled = run_engine(values, "seasonal-naive", {"period": 24}, start, pool=Pool(6, n0=50))
    assert pooled["no_interval_first"] == 6 * 6  # only the first series, with nothing to borrow from yet


def test_lanes_pool_by_default_only_where_the_model_already_couples_its_series():
    cal = make_calibrator("conformal-pid", 4, 0.1)
    assert Lane(SeasonalNaive(period=6), cal, 4, 0.1).pool.n0 == 0
    assert Lane(CycleNetForecaster(horizon=4, lookback=8, warm_start=40), cal, 4, 0.1).pool.n0 > 0


def test_coldstart_bench_replays_through_the_lane_the_engine_would_build():
    # The bench records each model once and replays its forecasts through every method's lane; its default method
    # must pool exactly where the engine does (a replay wrapper without ``couples_rows`` once pooled nothing).
    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "conformal.py"), run_name="bench")
    cal = make_calibrator("conformal-pid", 4, 0.1)
    for model in (SeasonalNaive(period=6), CycleNetForecaster(horizon=4, lookback=8, warm_start=40)):
        replayer = bench["_Replayer"](bench["_Recorder"](model), seeded=True)
        assert Lane(replayer, cal, 4, 0.1).pool.n0 == Lane(model, cal, 4, 0.1).pool.n0


def test_cyclenet_lane_is_seeded_at_the_fit_and_late_series_from_their_first_window():
    values = panel(n_series=8, hours=700)
    start = np.r_[np.zeros(4, int), np.full(4, 450)]
    params = {"lookback": 24, "cycle": 24, "warm_start": 240, "epochs": 3, "replay_window": 64, "defer": False,
              "step_budget": 60.0}
    out = run_engine(values, "cyclenet", params, start)
    assert len(out["first"]) == 8
    assert out["no_interval_first"] == 0  # the first forecast of every series, early and late, has intervals
    assert out["summary"]["n_no_interval"] == 0


def fit_until_installed(model, deadline_seconds: float = 120.0) -> None:
    stop = time.monotonic() + deadline_seconds
    while model.net_ is None and time.monotonic() < stop:
        model.maintenance(1.0)


def test_a_fit_finished_on_another_thread_seeds_the_rows_before_their_first_interval():
    values = panel(n_series=4, hours=400)
    model = CycleNetForecaster(horizon=6, lookback=24, cycle=24, warm_start=200, epochs=2, replay_window=32,
                               defer=True, seed=0)
    engine = Engine(EngineConfig(horizon=6, freq="1h", models=["cyclenet"]),
                    [Lane(model, make_calibrator("conformal-pid", 6, 0.1), 6, 0.1, pool=Pool(6, n0=0))])
    ids = np.array([f"s{i}" for i in range(4)], dtype=object)
    worker = None
    first_round = None
    for t in range(400):
        out = engine.process(ObservationBatch(ids, np.full(4, T0 + t * HOUR), values[:, t]))
        if t == 199:  # the fit runs on a trainer thread, as in serve, while rounds go on here
            worker = threading.Thread(target=fit_until_installed, args=(model,))
            worker.start()
        if t == 300:  # however slow the machine, the fit is in before the last 100 rounds
            worker.join(timeout=120)
        if len(out.forecasts) and first_round is None:
            first_round = out.forecasts
    worker.join()
    assert first_round is not None and np.isfinite(first_round.lower).all()


def test_series_that_start_together_do_not_depend_on_how_far_the_others_got():
    """The lane estimate is taken once per series, at its first interval: series that start together find no
    seasoned cell then, so batching (how far the others got between two of a series' steps) changes nothing.
    A live median would have made young cells borrow from whichever series happened to be ahead (a kill -9 replay
    in serve did not reproduce its uninterrupted run that way)."""
    rng = np.random.default_rng(5)
    n, hours = 5, 120
    values = 10 * (1 + np.arange(n))[:, None] * (1 + 0.3 * np.sin(2 * np.pi * np.arange(hours) / 6)[None, :]
                                                 + 0.1 * rng.normal(size=(n, hours)))
    ids = np.array([f"s{i}" for i in range(n)], dtype=object)

    def run(batches):
        engine = Engine(EngineConfig(horizon=3, freq="1h", models=["seasonal-naive"]),
                        [Lane(SeasonalNaive(period=6), make_calibrator("conformal-pid", 3, 0.1), 3, 0.1,
                              pool=Pool(3, n0=30))])
        out = [engine.process(ObservationBatch(ids[s], T0 + t * HOUR, values[s, t])).forecasts.to_frame()
               for s, t in batches]
        import pandas as pd

        frame = pd.concat(out, ignore_index=True).sort_values(["series_id", "issued_at", "h"])
        return frame.reset_index(drop=True), engine.export_series(list(ids))[1]

    everything = [(np.repeat(np.arange(n), hours), np.tile(np.arange(hours), n))]  # series by series, one batch
    one_by_one = [(np.array([i]), np.array([t])) for t in range(hours) for i in rng.permutation(n)]
    a, state_a = run(everything)
    b, state_b = run(one_by_one)
    assert len(a) > 0
    np.testing.assert_array_equal(a[["mean", "lower", "upper"]].to_numpy(), b[["mean", "lower", "upper"]].to_numpy())
    for key, value in state_a.items():
        if not key.startswith("engine/applied"):  # batch positions differ, by construction
            np.testing.assert_array_equal(state_b[key], value, err_msg=key)


def test_one_absurd_value_seen_by_a_young_series_leaves_its_borrowed_interval_sane():
    """1e14 as a young series' sixth value inflated its step scale, and so the interval it borrows from the lane,
    by 1e13 for the rest of its youth (168 values); now the step is learned as at most 30 scales."""
    from tidecast.monitors.conformal import make_calibrator
    from tidecast.monitors.conformal.pool import Pool

    widths = {}
    for outlier in (False, True):
        rng = np.random.default_rng(0)
        calibrator, pool = make_calibrator("conformal-pid", 1, 0.1), Pool(horizon=1, n0=168)
        level = np.zeros(21)
        for t in range(420):
            rows = np.arange(20) if t < 300 else np.arange(21)  # row 20 arrives at t = 300
            level[rows] += rng.normal(size=rows.size)
            values = level[rows].copy()
            if outlier and t == 305:
                values[-1] = 1e14
            pool.observe(rows, values)
            if t:
                calibrator.update(rows, rng.normal(size=(rows.size, 1)), np.ones((rows.size, 1), bool))
            lower, upper = calibrator.intervals(rows, np.zeros((rows.size, 1)))
            lower, upper = pool.intervals(calibrator, rows, np.zeros((rows.size, 1)), lower, upper)
        widths[outlier] = float(upper[-1, 0, 0] - lower[-1, 0, 0])
    assert widths[True] < 3 * widths[False], widths
