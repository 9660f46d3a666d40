"""Calibrators: delayed feedback without leakage, vectorised == per-series, state round trip, coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tidecast.monitors.conformal import CALIBRATORS, DEFAULT_CALIBRATOR, make_calibrator

FAST = ["conformal-pid", "quantile-tracker", "aci", "dtaci", "sf-ogd", "saocp"]
ALL = [*FAST, "spci"]
SMALL = {"spci": {"window": 10, "history": 60, "refit_every": 5, "n_estimators": 3}}


def make(name: str, horizon: int = 3, alpha=0.1, **params):
    return make_calibrator(name, horizon, alpha, **{**SMALL.get(name, {}), **params})


def ar_residuals(n: int, horizon: int, seed: int = 0, rows: int = 1) -> np.ndarray:
    """(n, rows, horizon) autocorrelated residuals with a per-row scale."""
    rng = np.random.default_rng(seed)
    e = np.zeros((n, rows, horizon))
    scale = rng.uniform(0.5, 3.0, size=(rows, 1))
    for t in range(1, n):
        e[t] = 0.7 * e[t - 1] + scale * rng.normal(size=(rows, horizon))
    return e


def feed(cal, res: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Update then issue, step by step; returns the issued (lo, hi) per step, shape (n, rows, H)."""
    n, _, horizon = res.shape
    los, his = [], []
    for t in range(n):
        cal.update(rows, res[t], np.ones((rows.size, horizon), bool))
        lo, hi = cal.interval(rows, np.zeros((rows.size, horizon)))
        los.append(lo)
        his.append(hi)
    return np.array(los), np.array(his)


def test_registry_and_default():
    assert DEFAULT_CALIBRATOR in CALIBRATORS
    assert set(ALL) <= set(CALIBRATORS)
    with pytest.raises(ValueError):
        make_calibrator("nope", 1, 0.1)
    with pytest.raises(ValueError):
        make_calibrator(DEFAULT_CALIBRATOR, 1, 1.5)


@pytest.mark.parametrize("name", ALL)
def test_no_leakage_interval_ignores_later_residuals(name):
    """The interval issued at t depends only on residuals fed up to t: altering later ones changes nothing."""
    res = ar_residuals(80, 3, seed=1)
    a, b = make(name), make(name)
    rows = np.array([0])
    lo_a, hi_a = feed(a, res, rows)
    res2 = res.copy()
    res2[50:] = 100.0 * np.random.default_rng(9).normal(size=res2[50:].shape)
    lo_b, hi_b = feed(b, res2, rows)
    np.testing.assert_array_equal(lo_a[:50], lo_b[:50])
    np.testing.assert_array_equal(hi_a[:50], hi_b[:50])
    assert not np.array_equal(hi_a[50:], hi_b[50:])


@pytest.mark.parametrize("name", ALL)
def test_masked_cells_untouched(name):
    cal = make(name)
    rows = np.array([0, 1])
    res = ar_residuals(30, 3, rows=2)
    for t in range(30):
        cal.update(rows, res[t], np.ones((2, 3), bool))
    before = cal.export_rows(rows)
    mask = np.array([[True, False, False], [False, False, False]])
    cal.update(rows, np.full((2, 3), 5.0), mask)
    after = cal.export_rows(rows)
    for k in before:
        np.testing.assert_array_equal(before[k][1], after[k][1])  # row 1: nothing matured
        np.testing.assert_array_equal(before[k][0, 1:], after[k][0, 1:])  # row 0, h = 2, 3


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("name", FAST)
def test_vectorised_equals_per_series(name, chunk):
    """One table of 4 rows fed together == 4 tables fed one by one (also with rows out of order, and with a big
    update learned in chunks that cut rows apart)."""
    res = ar_residuals(120, 3, seed=2, rows=4)
    table = make(name)
    if chunk:
        table.chunk_cells = chunk
    rows = np.array([2, 0, 3, 1])
    lo_v, hi_v = feed(table, res, rows)
    for i in range(rows.size):
        single = make(name)
        lo_s, hi_s = feed(single, res[:, i : i + 1], np.array([0]))
        np.testing.assert_allclose(lo_v[:, i], lo_s[:, 0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(hi_v[:, i], hi_s[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip(name):
    """export_rows -> JSON params + arrays -> import_rows into a fresh table: identical later intervals."""
    res = ar_residuals(160, 3, seed=3, rows=2)
    cal = make(name, **({"refit_every": 1} if name == "spci" else {}))  # SPCI's forest cache is not state
    rows = np.array([0, 1])
    feed(cal, res[:100], rows)
    state = cal.export_rows(np.array([1]))
    assert all(isinstance(v, np.ndarray) and v.shape[0] == 1 for v in state.values())
    params = json.loads(json.dumps(cal.get_params()))
    fresh = type(cal)(**params)
    fresh.import_rows(np.array([4]), state)  # moved to another row of another table
    end = 130 if name == "spci" else 160  # SPCI refits a forest per cell and step: keep it short
    lo_a, hi_a = feed(cal, res[100:end], rows)
    lo_b, hi_b = feed(fresh, res[100:end, 1:2], np.array([4]))
    np.testing.assert_allclose(lo_a[:, 1], lo_b[:, 0], rtol=1e-12)
    np.testing.assert_allclose(hi_a[:, 1], hi_b[:, 0], rtol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_no_interval_before_a_cell_has_data(name):
    """A cell that has learned nothing says so (NaN bounds), never a zero-width interval around the forecast."""
    cal = make(name)
    rows = np.array([0, 1])
    lo, hi = cal.interval(rows, np.ones((2, 3)))
    assert np.isnan(lo).all() and np.isnan(hi).all()
    mask = np.array([[True, False, False], [False, False, False]])
    cal.update(rows, np.full((2, 3), 0.5), mask)  # only row 0, h = 1 matured
    lo, hi = cal.interval(rows, np.ones((2, 3)))
    assert not np.isnan(lo[0, 0]) and not np.isnan(hi[0, 0])
    assert np.isnan(lo[~mask]).all() and np.isnan(hi[~mask]).all()
    lo3, hi3 = cal.intervals(rows, np.ones((2, 3)))
    np.testing.assert_array_equal(lo3[..., 0], lo)
    np.testing.assert_array_equal(hi3[..., 0], hi)


def test_legacy_state_without_data_imports_as_no_interval():
    """Checkpoints written before NaN meant "not ready" hold zero offsets (a point) in cells that never learned."""
    cal = make("conformal-pid")
    cal.update(np.array([0]), np.ones((1, 3)), np.array([[True, False, False]]))
    state = cal.export_rows(np.array([0]))
    state["offsets"] = np.nan_to_num(state["offsets"])  # as the old code saved it
    fresh = make("conformal-pid")
    fresh.import_rows(np.array([2]), state)
    lo, hi = fresh.interval(np.array([2]), np.zeros((1, 3)))
    assert np.isfinite(lo[0, 0]) and np.isnan(lo[0, 1:]).all() and np.isnan(hi[0, 1:]).all()


@pytest.mark.parametrize("name", [n for n in FAST if n not in ("aci", "dtaci")])
def test_never_infinite_or_nan_once_cells_have_data(name):
    cal = make(name)
    rows = np.array([0, 1])
    lo, hi = feed(cal, ar_residuals(50, 3, rows=2) * 1e3, rows)
    assert np.isfinite(lo).all() and np.isfinite(hi).all() and (hi >= lo).all()


def test_aci_unclipped_goes_infinite_clipped_does_not():
    rows = np.array([0])
    rng = np.random.default_rng(0)
    shift = np.concatenate([rng.normal(size=300), 10 + 5 * rng.normal(size=200)])
    res = shift.reshape(-1, 1, 1)
    _, hi = feed(make("aci", horizon=1, gamma=0.05), res, rows)
    assert np.isinf(hi).any()
    _, hi_c = feed(make("aci", horizon=1, gamma=0.05, clip=True), res, rows)
    assert np.isfinite(hi_c[5:]).all()


@pytest.mark.parametrize("name", ["conformal-pid", "quantile-tracker", "sf-ogd"])
def test_long_run_coverage_stationary(name):
    """Stationary AR(1) stream, 1,000 series x 100 steps after warm-up: coverage within 0.01 of 0.9."""
    horizon, n_rows, n = 1, 1000, 300
    res = ar_residuals(n, horizon, seed=4, rows=n_rows)
    cal = make(name, horizon=horizon)
    rows = np.arange(n_rows)
    covered = []
    lo, hi = cal.interval(rows, np.zeros((n_rows, horizon)))
    for t in range(n):
        if t >= 200:
            covered.append((lo <= res[t]) & (res[t] <= hi))
        cal.update(rows, res[t], np.ones((n_rows, horizon), bool))
        lo, hi = cal.interval(rows, np.zeros((n_rows, horizon)))
    cov = np.mean(covered)
    assert abs(cov - 0.9) < 0.01, cov


def test_pid_scorecaster_beats_plain_tracker_on_autocorrelated_errors():
    res = ar_residuals(1500, 1, seed=5)
    rows = np.array([0])
    widths = {}
    for sc in ("ar", None):
        lo, hi = feed(make("conformal-pid", horizon=1, scorecaster=sc), res, rows)
        y = res[1:, 0, 0]
        cov = np.mean((lo[:-1, 0, 0] <= y) & (y <= hi[:-1, 0, 0]))
        assert abs(cov - 0.9) < 0.03
        widths[sc] = np.mean(hi[300:, 0, 0] - lo[300:, 0, 0])
    assert widths["ar"] < 0.85 * widths[None]


def test_horizon_delay_uses_lag_h():
    """For h = 3 the scorecaster regresses on the residual 3 steps back: a lag-1-only process gives no centre."""
    rng = np.random.default_rng(6)
    n = 3000
    e = np.zeros(n)
    z = rng.normal(size=n)
    e[1:] = z[1:] + 0.95 * z[:-1]  # MA(1): correlated at lag 1, independent at lag >= 2
    res = np.stack([e, e, e], axis=1)[:, None, :]
    cal = make("conformal-pid", horizon=3)
    feed(cal, res, np.array([0]))
    coef = cal.export_rows(np.array([0]))["coef"][0, :, 0]
    assert coef[0] > 0.3 and abs(coef[2]) < 0.1


def test_multiple_alphas_in_one_pass():
    cal = make("conformal-pid", horizon=2, alpha=(0.2, 0.1, 0.05))
    res = ar_residuals(400, 2, seed=7)
    rows = np.array([0])
    feed(cal, res, rows)
    lo, hi = cal.intervals(rows, np.zeros((1, 2)))
    assert lo.shape == (1, 2, 3)
    width = hi - lo
    assert (np.diff(width, axis=-1) > 0).all()  # nested: wider for smaller alpha
    lo1, hi1 = cal.interval(rows, np.zeros((1, 2)))
    np.testing.assert_array_equal(lo1, lo[..., 0])


def test_symmetric_option():
    cal = make("conformal-pid", horizon=1, symmetric=True, scorecaster=None)
    res = np.random.default_rng(8).normal(size=(2000, 1, 1)) + 3.0  # biased: symmetric cannot shift
    lo, hi = feed(cal, res, np.array([0]))
    np.testing.assert_allclose(-lo[-1], hi[-1])


def test_saocp_and_dtaci_basics():
    res = ar_residuals(600, 1, seed=9)
    for name in ("saocp", "dtaci", "sf-ogd"):
        lo, hi = feed(make(name, horizon=1), res, np.array([0]))
        y = res[1:, 0, 0]
        cov = np.mean((lo[100:-1, 0, 0] <= y[100:]) & (y[100:] <= hi[100:-1, 0, 0]))
        assert 0.8 < cov < 0.97, (name, cov)


def test_delayed_feedback_keeps_coverage_at_long_horizons():
    """Persistent stochastic volatility, h = 12: the default scores each residual against the interval it issued
    12 steps earlier, so the intervals actually shown still cover at the target rate (scoring against the current
    threshold, as SF-OGD does, gives 0.88 here)."""
    rng = np.random.default_rng(11)
    n_rows, n, horizon = 50, 3000, 12
    log_vol = np.zeros((n, n_rows, 1))
    for t in range(1, n):
        log_vol[t] = 0.98 * log_vol[t - 1] + 0.15 * rng.normal(size=(n_rows, 1))
    res = np.repeat(np.exp(log_vol) * rng.normal(size=(n, n_rows, 1)), horizon, axis=2)
    cal = make("conformal-pid", horizon=horizon)
    lo, hi = feed(cal, res, np.arange(n_rows))
    for h in (1, horizon):
        y = res[h + 500 :, :, h - 1]  # what the interval issued at t (for t + h) is scored against
        cov = np.mean((lo[500:-h, :, h - 1] <= y) & (y <= hi[500:-h, :, h - 1]))
        assert abs(cov - 0.9) < 0.01, (h, cov)


def test_pid_scorecaster_stays_bounded_after_a_degenerate_start():
    """Near-constant first residuals then a jump once gave AR slopes of ~1e6 and widths of 1e10 (NYC taxi)."""
    from tidecast.monitors.conformal import make_calibrator

    cal = make_calibrator("conformal-pid", 1, 0.1)
    cal.resize(1)
    rows, mask = np.array([0]), np.ones((1, 1), bool)
    stream = np.concatenate([[5.0, 5.0 + 1e-9, 5.0, 4000.0, -3500.0], np.random.default_rng(0).normal(0, 2000, 300)])
    widths = []
    for r in stream:
        cal.update(rows, np.array([[r]]), mask)
        lo, hi = cal.interval(rows, np.zeros((1, 1)))
        widths.append(hi[0, 0] - lo[0, 0])
    assert np.all(np.isfinite(widths))
    assert max(widths) < 20 * np.abs(stream).max()


@pytest.mark.parametrize(("name", "params"), [
    ("aci", {"window": 10**9}), ("spci", {"window": 10**9, "history": 10**9}), ("saocp", {"slots": 10**8}),
    ("conformal-pid", {"scorecaster": "seasonal", "period": 10**9}),
])
def test_window_sizes_that_would_exhaust_memory_are_a_settings_error(name, params):
    """Found by the conformal review (2026-12-04): a billion passed the check and the run died at its first forecast
    ('Unable to allocate 179. GiB'), a traceback and exit 1 instead of one line and exit 2."""
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.settings import SettingsError

    with pytest.raises(SettingsError, match="a whole number from [12] to 100,000"):
        EngineConfig(calibrator=name, calibrator_params=params)


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("aci", "dtaci")])
def test_young_cells_issue_no_point_intervals(name):
    """A cell that has seen residuals issues an interval of positive width from the first one on. The tracker's
    thresholds started at 0 and stayed there until its first issued interval was scored (h steps), SF-OGD's and
    SAOCP's started at 0 and SPCI's were the quantiles of one residual: each issued the point forecast itself,
    which misses, as the first interval of every cell (and SF-OGD / SAOCP on ~2 % of the first 40 steps)."""
    horizon, n_rows = 6, 3
    rng = np.random.default_rng(4)
    cal, rows = make(name, horizon), np.arange(n_rows)
    widths = []
    for t in range(40):
        matured = (np.arange(horizon) <= t)[None, :].repeat(n_rows, 0)  # the h-step cell's first residual at t = h - 1
        cal.update(rows, rng.normal(size=(n_rows, horizon)), matured)
        lo, hi = cal.interval(rows, np.zeros((n_rows, horizon)))
        widths.append(np.where(matured, hi - lo, np.inf))
    widths = np.array(widths)
    first = widths[np.arange(horizon), :, np.arange(horizon)]  # each cell's interval after its first residual
    assert (first > 0).all(), first
    assert (widths > 0).all() if name in ("quantile-tracker", "spci") else (widths == 0).mean() < 0.01


@pytest.mark.parametrize(("name", "params", "says"), [
    ("conformal-pid", {"order": 100_000}, "a whole number from 1 to 64"),  # an order x order matrix a cell: 74.5 GiB
    ("saocp", {"slots": 1}, "a whole number from 2 to"),  # its one expert replaced every step: 2 % coverage at 90 %
])
def test_calibrator_sizes_that_cannot_work_are_a_settings_error(name, params, says):
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.settings import SettingsError

    with pytest.raises(SettingsError, match=says):
        EngineConfig(calibrator=name, calibrator_params=params)


def test_conformal_pid_without_forgetting_can_be_seeded():
    """forget = 1 (remember every pair) is accepted; its seed divided by 1 - forget and stopped the run."""
    residuals = np.random.default_rng(0).normal(size=(1, 50, 2))
    cells = [make_calibrator("conformal-pid", horizon=2, alpha=0.1, forget=f) for f in (1.0, 0.999999)]
    for cal in cells:
        cal.resize(1)
        cal.seed(np.array([0]), residuals)
    bounds = [cal.interval(np.array([0]), np.zeros((1, 2))) for cal in cells]
    assert np.isfinite(bounds[0][0]).all() and np.isfinite(bounds[0][1]).all()
    np.testing.assert_allclose(bounds[0][1], bounds[1][1], rtol=0.05)  # as good as remembering nearly everything


def test_conformal_pid_publishes_the_interval_it_scores_even_far_from_zero():
    """Interval review (2026-12-05): the ring of issued intervals is float32, the published offsets were float64. On
    a residual bias 1e8 times its noise the centre rounds to float32's steps of 8: the controller scored misses of
    an interval up to 4 sd away from the one shown, and the shown ones covered 0.79 at 90 %."""
    rng = np.random.default_rng(0)
    residuals = 1e8 + rng.normal(size=4000)
    cal = make_calibrator("conformal-pid", 1, 0.1)
    rows, zero = np.array([0]), np.zeros((1, 1))
    hits, issued = [], None
    for t, r in enumerate(residuals):
        if issued is not None and t > 1000:
            scored = cal.issued_intervals(rows, zero)
            assert (scored[0][0, 0, 0], scored[1][0, 0, 0]) == issued
            hits.append(issued[0] <= r <= issued[1])
        cal.update(rows, np.array([[r]]), np.ones((1, 1), bool))
        lower, upper = cal.interval(rows, zero)
        issued = (lower[0, 0], upper[0, 0])
    assert abs(np.mean(hits) - 0.9) < 0.02
