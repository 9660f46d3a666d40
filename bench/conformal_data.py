"""Residual streams for bench/conformal.py: one fixed point-forecast stream per case, shared by every method.

A stream is a :class:`Stream`: ``residuals[t, h-1] = y[t] - yhat`` of the h-step forecast that *matures* at step
``t`` (issued at ``t - h``), ``NaN`` where none does. Calibrators see row ``t`` at step ``t`` and then issue the
interval for the forecast made at ``t``, which is scored against ``residuals[t + h, h-1]``. Everything happens in
residual space, where coverage and width equal those around the real point forecast.

Cases (anchors.md, "Sequential conformal prediction"):

* ``elec2``: the SPCI protocol (Xu & Xie, ICML 2023): ELEC2 rows 17760:, 9:00-12:00, X = prices and demands,
  y = transfer, 3,444 rows, first 80 % train; RandomForest(10 trees, depth 1) in a B = 25 bootstrap ensemble;
  the stream is the leave-one-out ensemble residuals on train (warm-up) followed by the test residuals of the
  aggregated out-of-bag predictor (689 scored steps).
* ``ar1``: SPCI's simulator ``Y_t = 0.9 Y_{t-1} + e_t``, ``e_t = 0.9 e_{t-1} + v_t``, ``v_t ~ N(0, 0.1)``,
  2,000 points, first 1,600 warm-up. With the true regression function as point forecast the residual is ``e_t``,
  whose 90 % oracle width given the past is ``2 * 1.645 * sqrt(0.1) = 1.040``.
* ``shift``: i.i.d. N(0, 1) residuals whose scale jumps to 3 and mean to +2 at step 2,500 of 5,000 (500 warm-up).
* ``etth1``: ETTh1 oil temperature, seasonal naive (period 24) and CycleNet (if ``models/cyclenet.py`` is there)
  forecasts at h = 1..24; the whole 17,420-hour stream, the first 720 hours warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():  # a checkout next to shared/ (CI) or inside the workspace
    DATA = Path("/work/shared/data")


@dataclass
class Stream:
    """Matured residuals of one point-forecast stream; ``residuals[t, h-1]`` matures at step ``t``."""

    name: str
    residuals: np.ndarray  # (T, H)
    n_warm: int  # steps whose *issued* intervals are not scored
    horizons: tuple[int, ...] = (1,)  # which columns (h) are scored
    info: dict = field(default_factory=dict)

    @property
    def horizon(self) -> int:
        return self.residuals.shape[1]


def one_step(name: str, residuals: np.ndarray, n_warm: int, **info) -> Stream:
    return Stream(name, np.asarray(residuals, float).reshape(-1, 1), n_warm, (1,), info)


# -- elec2 ------------------------------------------------------------------------------------------
def elec2_xy() -> tuple[np.ndarray, np.ndarray]:
    """The SPCI electricity data set: 3,444 rows of (nswprice, nswdemand, vicprice, vicdemand) -> transfer."""
    df = pd.read_csv(DATA / "elec2.csv").iloc[17760:].reset_index(drop=True)
    period = df["period"].to_numpy()
    keep = (period > period[17]) & (period < period[24])  # 9:00-12:00, as in the SPCI loader
    x = df.loc[keep, ["nswprice", "nswdemand", "vicprice", "vicdemand"]].to_numpy(float)
    y = df.loc[keep, "transfer"].to_numpy(float)
    return x, y


def elec2_stream(seed: int = 0, n_boot: int = 25) -> Stream:
    """LOO bootstrap-ensemble residuals on train, then test residuals (the SPCI / EnbPI construction)."""
    from sklearn.ensemble import RandomForestRegressor

    x, y = elec2_xy()
    n = int(len(y) * 0.8)
    rng = np.random.default_rng(seed)
    boots = rng.integers(0, n, size=(n_boot, n))
    preds = np.empty((n_boot, len(y)))
    in_boot = np.zeros((n_boot, n), bool)
    for b in range(n_boot):
        model = RandomForestRegressor(n_estimators=10, max_depth=1, bootstrap=False, random_state=1103, n_jobs=1)
        model.fit(x[boots[b]], y[boots[b]])
        preds[b] = model.predict(x)
        in_boot[b, boots[b]] = True
    out = ~in_boot  # (B, n): model b did not see training point i
    none = out.sum(0) == 0
    out[:, none] = True  # a point every model saw: aggregate all (SPCI does the same, rarely needed)
    w = out / out.sum(0)
    loo_train = (w * preds[:, :n]).sum(0)
    # Test centre: mean over training points i of the LOO ensemble's test prediction = a weighted model mean.
    test_centre = w.sum(1) @ preds[:, n:] / n
    yhat = np.concatenate([loo_train, test_centre])
    return one_step("elec2", y - yhat, n_warm=n, y=y, yhat=yhat, x=x, n_train=n)


# -- ar1 --------------------------------------------------------------------------------------------
AR1_ORACLE_WIDTH = 2 * 1.6448536269514722 * np.sqrt(0.1)


def ar1_stream(seed: int = 0, n: int = 2000, phi: float = 0.9, beta: float = 0.9) -> Stream:
    """SPCI's state-space simulator; the point forecast is the true ``0.9 * Y_{t-1}``, so residuals are e_t."""
    rng = np.random.default_rng(seed)
    v = rng.normal(scale=np.sqrt(0.1), size=n)
    v[0] = rng.normal()
    eps = np.empty(n)
    eps[0] = v[0]
    for t in range(1, n):
        eps[t] = beta * eps[t - 1] + v[t]
    y = np.empty(n)
    y[0] = eps[0]
    for t in range(1, n):
        y[t] = phi * y[t - 1] + eps[t]
    return one_step("ar1", eps, n_warm=int(0.8 * n), oracle_width_90=AR1_ORACLE_WIDTH)


# -- shift ------------------------------------------------------------------------------------------
def shift_stream(seed: int = 0, n: int = 5000, at: int = 2500, scale: float = 3.0, bias: float = 2.0) -> Stream:
    """N(0, 1) residuals; at step ``at`` the scale jumps to ``scale`` and the mean to ``bias``."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=n)
    r[at:] = bias + scale * r[at:]
    return one_step("shift", r, n_warm=500, change_at=at)


# -- etth1 ------------------------------------------------------------------------------------------
def etth1_target() -> np.ndarray:
    return pd.read_csv(DATA / "ETTh1.csv")["OT"].to_numpy(float)


def horizon_residuals(y: np.ndarray, forecasts: np.ndarray) -> np.ndarray:
    """``forecasts[t, h-1]`` is issued at t for t+h; return matured residuals ``r[t, h-1] = y[t] - f[t-h, h-1]``."""
    T, H = forecasts.shape
    r = np.full((T, H), np.nan)
    for h in range(1, H + 1):
        r[h:, h - 1] = y[h:] - forecasts[: T - h, h - 1]
    return r


def seasonal_naive_forecasts(y: np.ndarray, horizon: int = 24, period: int = 24) -> np.ndarray:
    """Issued at t: ``yhat(t + h) = y[t + h - period * ceil(h / period)]``; NaN before a full period."""
    T = len(y)
    f = np.full((T, horizon), np.nan)
    for h in range(1, horizon + 1):
        back = period * int(np.ceil(h / period)) - h  # how far before t the source value lies
        f[back:, h - 1] = y[: T - back]
        f[: period - 1, h - 1] = np.nan
    return f


CYCLENET_WARM = 2000  # observations before CycleNet's warm-start fit (its default)
_CACHE: dict[tuple[str, int], np.ndarray] = {}


def etth1_stream(model: str = "seasonal-naive", horizon: int = 24, n_warm: int = 720) -> Stream:
    y = etth1_target()
    if model == "seasonal-naive":
        f = seasonal_naive_forecasts(y, horizon)
    elif model == "cyclenet":
        f = cyclenet_forecasts(y, horizon)
        n_warm = CYCLENET_WARM + n_warm  # its calibrators start when its first forecasts mature
    else:
        raise ValueError(model)
    return Stream(f"etth1-{model}", horizon_residuals(y, f), n_warm, (1, horizon), {"model": model})


def cyclenet_available() -> bool:
    return (Path(__file__).resolve().parents[1] / "models" / "cyclenet.py").exists()


def cyclenet_forecasts(y: np.ndarray, horizon: int) -> np.ndarray:
    """CycleNet (models/cyclenet.py: Linear backbone, L = 96, W = 24) served as the engine would: warm start on
    the first 2,000 hours, then one forecast per hour while it keeps learning online (replay every 24 rounds).
    ``f[t, h-1]`` is issued after ``y[t]``. Computed once per process (about a minute on one core)."""
    key = ("cyclenet", horizon)
    if key in _CACHE:
        return _CACHE[key]
    import torch

    from tidecast.models.cyclenet import CycleNetForecaster

    torch.set_num_threads(1)  # the machine is shared
    # A generous step budget: every replay step runs, so the stream does not depend on the machine's speed.
    model = CycleNetForecaster(
        horizon=horizon, lookback=96, cycle=24, warm_start=CYCLENET_WARM, replay_every=24, step_budget=60.0,
        defer=False, seed=0,
    )
    model.resize(1)
    rows = np.array([0])
    f = np.full((y.size, horizon), np.nan)
    for t in range(y.size):
        model.learn_many(rows, np.array([t]), y[t : t + 1])
        if model.fitted_:
            f[t] = model.forecast_many(rows, horizon)[0]
    _CACHE[key] = f
    return f


# -- coldstart ------------------------------------------------------------------------------------------
@dataclass
class Panel:
    """Hourly series for the cold-start case: ``values[i, t]`` (NaN before series i appears at ``start[i]``)."""

    values: np.ndarray  # (N, T)
    start: np.ndarray  # (N,) first hour of each series
    late: np.ndarray  # (N,) bool: appears after the models' warm start

    @property
    def ids(self) -> list[str]:
        return [f"s{i:03d}" for i in range(self.values.shape[0])]


def coldstart_panel(seed: int, n_series: int = 100, hours: int = 3000, late_from: int = 1100,
                    late_to: int = 2200) -> Panel:
    """``n_series`` synthetic hourly series: a random-walk level, daily and weekly cycles of random amplitude and
    phase, AR(1) noise, each multiplied by a scale log-uniform in [0.1, 1000] (heterogeneous scales). The second
    half appears late, at hours uniform in [``late_from``, ``late_to``] (after a warm start of 1,000 hours, and
    early enough for 250 hours of forecasts after seasonal naive's 402-hour detection window)."""
    rng = np.random.default_rng(seed)
    t = np.arange(hours)
    n_late = n_series // 2
    out = np.empty((n_series, hours))
    for i in range(n_series):
        daily, weekly = rng.uniform(0.5, 2.0), rng.uniform(0.2, 1.0)
        sigma, walk = rng.uniform(0.2, 0.6), rng.uniform(0.01, 0.1)
        noise = np.empty(hours)
        noise[0] = rng.normal(scale=sigma)
        shocks = rng.normal(scale=sigma, size=hours)
        for k in range(1, hours):
            noise[k] = 0.5 * noise[k - 1] + shocks[k]
        level = 10.0 + np.cumsum(rng.normal(scale=walk, size=hours))
        shape = (level + daily * np.sin(2 * np.pi * (t / 24 + rng.uniform())) +
                 weekly * np.sin(2 * np.pi * (t / 168 + rng.uniform())) + noise)
        out[i] = 10 ** rng.uniform(-1, 3) * shape
    start = np.zeros(n_series, dtype=np.int64)
    late = np.arange(n_series) >= n_series - n_late
    start[late] = rng.integers(late_from, late_to + 1, size=n_late)
    out[np.arange(hours)[None, :] < start[:, None]] = np.nan
    return Panel(out, start, late)
