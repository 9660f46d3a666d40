"""Adapters that bring one-series forecasters (river's, or anyone's) into the engine.

* :class:`Standardised` wraps a river forecaster with what it needs to behave on a live stream: it waits for a
  warm-up window, detects the cycle length there (unless configured), fixes a standardisation from the same
  window — river's linear learners diverge on raw-scale targets (see ../shared/reference/anchors.md) — and
  then replays the window into the model. Forecasts are ``NaN`` until then.
* :class:`PerSeries` turns a factory of one-series forecasters into a :class:`~tidecast.models.base.BatchForecaster`:
  one object per row, a Python loop per call. Fine for baselines; vectorised models implement the batch
  protocol directly.

Warm-up: a forecaster is asked for forecasts only once it is ready, decided *before* the call (:func:`is_ready`),
never by catching what it raises, so an exception from a ready forecaster is a bug and propagates. A
forecaster that knows says so with an ``is_ready`` attribute (:class:`Standardised`,
:class:`~tidecast.models.holt_winters.AdditiveHoltWinters`); for river's own forecasters the number of
observations they need is known (:func:`river_min_history`); anything else must be given ``min_history``.

State is JSON (:mod:`tidecast.models.river_state`), stored per row as UTF-8 bytes in a padded ``uint8`` array.
"""

from __future__ import annotations

import json
import logging
import math
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from tidecast.models.base import ArrayDict, BatchForecaster, Forecaster, Params
from tidecast.models.bootstrap import ResidualRing, check_bootstrap, poisson_counts
from tidecast.models.history import HistoryRing
from tidecast.models.river_state import dump_state, load_state
from tidecast.models.seasonality import detect_period

log = logging.getLogger(__name__)


def river_min_history(model: Any) -> int | None:
    """Observations one of river's own forecasters needs before ``forecast`` works; ``None`` for any other.

    river's ``HoltWinters`` raises ``IndexError`` before its first ``max(2, seasonality)`` values (it starts
    from them); ``SNARIMAX`` forecasts from zeros until its differencing and every lag feature have values.

    >>> from river import time_series
    >>> river_min_history(time_series.HoltWinters(0.3, 0.1, 0.5, seasonality=24))
    24
    >>> river_min_history(time_series.SNARIMAX(p=2, d=1, q=1, m=24, sp=1))
    25
    """
    from tidecast.models.holt_winters import AdditiveHoltWinters

    if isinstance(model, AdditiveHoltWinters):  # river's recursion after a two-cycle start
        return 2 * model.seasonality
    if not type(model).__module__.startswith("river."):
        return None
    from river import time_series

    if isinstance(model, time_series.HoltWinters):
        return max(2, model.seasonality)
    if isinstance(model, time_series.SNARIMAX):
        m = model.m
        return model.d + m * model.sd + max(model.p, m * model.sp, model.q, m * model.sq, 1)
    return None


def _one_forecast(model: Any, horizon: int) -> np.ndarray:
    """``model.forecast(horizon)`` as ``horizon`` floats: one value, or a list of another length, was broadcast
    over every step (forecasts the model never made) or failed in numpy naming nobody."""
    got = model.forecast(horizon)
    out = np.asarray([np.nan] * horizon if got is None else got, dtype=float)
    if out.shape != (horizon,):
        raise ValueError(f"{type(model).__name__}.forecast({horizon}) returned {np.shape(got) or 'one value'}; "
                         f"{horizon} values (one per step) are expected")
    return out


def is_ready(model: Any, n_learned: int, min_history: int | None = None) -> bool:
    """Whether ``model``, having learned ``n_learned`` observations, may be asked for a forecast.

    The model's own ``is_ready`` attribute if it has one; else ``n_learned`` against the larger of
    :func:`river_min_history` and ``min_history``. A model that declares nothing and is given no
    ``min_history`` is an error (:class:`PerSeries` checks that at construction).
    """
    ready = getattr(model, "is_ready", None)
    if callable(ready):  # written as a method: a bound method is always truthy, which read as "always ready"
        ready = ready()
    if ready is not None:
        return bool(ready)
    needs = [n for n in (river_min_history(model), min_history) if n is not None]
    if not needs:
        raise ValueError(f"cannot tell when a {type(model).__name__} is ready to forecast: give it an `is_ready` "
                         "attribute, or give PerSeries `min_history` (observations it needs first)")
    return n_learned >= max(needs)


#: A standardised forecast further out than this many warm-up standard deviations is a diverged model's.
DIVERGED = 1e3


#: (model, error, message) of each river failure logged (:meth:`Standardised._fail`): once per process.
_FAILURES_LOGGED: set[tuple[str, str, str]] = set()


class Standardised(Params):
    """A river forecaster behind a warm-up window, cycle detection and a fixed standardisation.

    build: ``build(period) -> Forecaster`` makes the river model once the cycle length is known.
    period: cycle length in ticks; ``None`` detects it on the warm-up window (no cycle found -> 1).
    warmup: observations buffered before the model starts; default ``2 * max_period + 2``.
    center: subtract the window's mean as well as dividing by its deviation; ``False`` for a model whose forecasts
    scale with its input but that needs the level kept (river's ``HoltWinters`` starts its seasonal terms as
    ``y / level``).

    Forecasts are ``NaN`` until the warm-up window is full and the river model is ready (:func:`is_ready`). When no
    cycle is found (period 1), the last ``warmup`` values are kept and looked at again after 2, 4, 8, ... warm-up
    windows, as seasonal naive does: a cycle found there (a meter idle at first) starts the model over on them.
    river's own ``HoltWinters`` starts its additive seasonal terms as ``y / level``, which a standardised level
    near 0 blows up: build :class:`~tidecast.models.holt_winters.AdditiveHoltWinters` instead.

    >>> from tidecast.models.holt_winters import AdditiveHoltWinters
    >>> f = Standardised(lambda p: AdditiveHoltWinters(0.3, 0.01, 0.2, seasonality=p), period=4, warmup=8)
    >>> for i in range(40):
    ...     f.learn_one(10.0 + (i % 4))
    >>> [round(v, 2) for v in f.forecast(4)]
    [10.0, 11.0, 12.0, 13.0]
    """

    def __init__(self, build: Callable[[int], Forecaster], period: int | None = None, max_period: int = 200,
                 warmup: int | None = None, center: bool = True) -> None:
        self.build = build
        self.period = period
        self.max_period = max_period
        self.warmup = warmup if warmup is not None else 2 * max_period + 2
        self.center = center
        self.buffer_: list[float] = []
        self.model_: Forecaster | None = None
        self.n_model_ = 0  # observations the model has learned
        self.period_ = 0
        self.mean_ = 0.0
        self.level_ = 0.0  # the warm-up window's mean (= mean_ when centred): where the divergence guard measures from
        self.scale_ = 1.0
        self.recent_ = array("d")  # period 1 found: the last `warmup` values, for the next look (_look_again)

    @property
    def is_ready(self) -> bool:
        """Past the warm-up window, and the river model ready too (a model of unknown needs: at once)."""
        return self.model_ is not None and is_ready(self.model_, self.n_model_, min_history=0)

    def learn_one(self, y: float, x: dict | None = None) -> None:
        if self.model_ is not None:
            try:
                self.model_.learn_one((y - self.mean_) / self.scale_)
            except Exception as err:  # noqa: BLE001 - the river model's own failure: see _fail
                self._fail(err)
                return
            self.n_model_ += 1
            if self.period is None and self.period_ == 1:
                self._look_again(y)
            return
        self.buffer_.append(y)
        if len(self.buffer_) >= self.warmup:
            self._start()

    def _start(self) -> None:
        fenced = _fenced(np.asarray(self.buffer_))
        self.period_ = self.period or detect_period(fenced, self.max_period) or 1
        self.level_, std = float(fenced.mean()), float(fenced.std())
        self.mean_ = self.level_ if self.center else 0.0
        self.scale_ = std if std > 0 and math.isfinite(std) else 1.0
        try:
            self.model_ = self.build(self.period_)
            for y in fenced.tolist():  # a spike's huge step would leave SGD's weights off for thousands of steps
                self.model_.learn_one((y - self.mean_) / self.scale_)
        except Exception as err:  # noqa: BLE001 - see _fail
            self._fail(err)
            return
        self.n_model_ = len(self.buffer_)
        self.buffer_ = []

    def _look_again(self, y: float) -> None:
        """Keep ``y`` in the window of the next look for a cycle, due after 2, 4, 8, ... warm-up windows (the looks
        thin out so that their false cycles, ~2 % a look on noise, and their cost stay bounded); a cycle found
        starts the model over on that window, with its standardisation."""
        self.recent_.append(y)
        if len(self.recent_) > self.warmup:
            del self.recent_[0]
        windows, rest = divmod(self.n_model_, self.warmup)
        if rest or windows < 2 or windows & (windows - 1) or len(self.recent_) < self.warmup:
            return
        if (detect_period(np.asarray(self.recent_), self.max_period) or 1) > 1:
            self.buffer_, self.recent_ = list(self.recent_), array("d")
            self._start()

    def restart(self) -> None:
        """Start over after a gap that reset the series' history: a fresh river model on the cycle length and
        standardisation already learned (the series', not the lost history's), so the row forecasts again once
        the model's own start is past (two cycles for Holt-Winters) instead of after a whole new warm-up window
        (402 observations by default). A row still in its warm-up starts that over."""
        self.buffer_ = []
        self.recent_ = array("d")  # values before the gap are off the clock's phase for the next look
        if self.model_ is None:
            return
        try:
            self.model_ = self.build(self.period_)
        except Exception as err:  # noqa: BLE001 - see _fail
            self._fail(err)
            return
        self.n_model_ = 0

    def _fail(self, err: Exception) -> None:
        """A river model that raises is treated as one that diverged: it starts over with a new warm-up window and
        its series has no forecast meanwhile. A value river's constructor accepts but cannot use (``alpha="0,3"``,
        ``seasonality=-1``) or a multiplicative Holt-Winters on a constant series (a division by zero) stopped the
        whole replay after the warm-up; now each distinct failure is logged once."""
        name = type(self.model_).__name__ if self.model_ is not None else "river model"
        seen = (name, type(err).__name__, str(err)[:200])
        if seen not in _FAILURES_LOGGED:
            _FAILURES_LOGGED.add(seen)
            log.warning("a %s failed (%s: %s): it starts over with a new warm-up window of %d observations, and its "
                        "series has no forecast until then (check the lane's --model-param values)", name,
                        type(err).__name__, err, self.warmup)
        self._start_over()

    def _start_over(self) -> None:
        """Drop the river model: a new warm-up window follows."""
        self.model_, self.n_model_, self.buffer_, self.recent_ = None, 0, [], array("d")

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        """The river model's forecast on the raw scale; ``NaN`` in the warm-up. A model that has diverged (a
        forecast not finite, or more than :data:`DIVERGED` warm-up deviations out: river's plain SGD, e.g.
        SNARIMAX's default regressor, reached 1e36 on the bundled sample) starts over with a new warm-up window."""
        if not self.is_ready:
            return [math.nan] * horizon
        try:
            standard = [float(v) for v in self.model_.forecast(horizon)]  # None or junk: raises here
        except Exception as err:  # noqa: BLE001 - see _fail
            self._fail(err)
            return [math.nan] * horizon
        level = (self.level_ - self.mean_) / self.scale_  # 0 when centred; level / deviation when not
        if not all(math.isfinite(v) and abs(v - level) <= DIVERGED for v in standard):
            log.warning("a %s diverged (forecast %.3g warm-up deviations out): it starts over with a new warm-up "
                        "window of %d observations", type(self.model_).__name__,
                        max((abs(v) if math.isfinite(v) else math.inf) for v in standard), self.warmup)
            self._start_over()
            return [math.nan] * horizon
        return [v * self.scale_ + self.mean_ for v in standard]

    def get_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer_, "period": self.period_, "mean": self.mean_, "scale": self.scale_,
                "level": self.level_,
                "n_model": self.n_model_, "recent": self.recent_.tolist(),
                "model": dump_state(self.model_) if self.model_ is not None else None}

    def set_state(self, state: dict[str, Any]) -> None:
        self.buffer_ = list(state["buffer"])
        self.period_, self.mean_, self.scale_ = int(state["period"]), state["mean"], state["scale"]
        self.level_ = state.get("level", self.mean_)  # older states were centred
        self.n_model_ = int(state.get("n_model", self.warmup))  # older states: the model had the warm-up window
        self.recent_ = array("d", state.get("recent", []))  # older states: the next look's window starts now
        self.model_ = None
        if state["model"] is not None:
            self.model_ = self.build(self.period_)
            load_state(self.model_, state["model"])


def learn_times(model: Forecaster, y: float, k: int) -> None:
    """Learn ``y`` with weight ``k`` (online bagging's Poisson count). A forecaster built on a regressor of lagged
    values (river's SNARIMAX, also inside :class:`Standardised`) learns the value once, so its lags advance one
    step a tick, and only the regressor takes the k updates: learning the value k times pushed it k times onto
    the lags (k = 0: none), so a replica's "seasonal lag" no longer pointed one cycle back and its errors (0.71-0.79
    against the point model's 0.32) made the spread. Other forecasters learn the value k times."""
    inner = getattr(model, "model_", model)  # Standardised holds the river model (None in its warm-up)
    regressor = getattr(inner, "regressor", None)
    if regressor is None or not hasattr(inner, "y_hist"):
        for _ in range(k):
            model.learn_one(y)
        return
    learn = regressor.learn_one
    # an instance attribute shadows the method for this one call (the model calls self.regressor.learn_one)
    regressor.learn_one = lambda x, target, **kw: [learn(x, target, **kw) for _ in range(k)]
    try:
        model.learn_one(y)
    finally:
        del regressor.learn_one


def _fenced(values: np.ndarray) -> np.ndarray:
    """``values`` clipped to Tukey's far-out fences (3 IQR beyond the quartiles), for the warm-up window's
    standardisation and the model's first steps: one spike of 1e12 in a window of values near 10 set a scale that
    left the model learning a flat line for the rest of the series (the divergence guard, in warm-up deviations,
    never fired). Only spikes are clipped: runs of one or two values outside, at most 1 % of the window (more
    are the series' own peaks). A run of more is a level the series moved to inside the window (clipped, it left
    snarimax's error 50x its own for thousands of steps); a window with no spread (IQR 0: intermittent zeros) is
    taken as it is."""
    q1, q3 = np.percentile(values, [25, 75])
    spread = 3 * (q3 - q1)
    if not (spread > 0 and math.isfinite(spread)):
        return values
    low, high = q1 - spread, q3 + spread
    outside = np.concatenate([[False], (values < low) | (values > high), [False]])
    edges = np.flatnonzero(np.diff(outside.astype(np.int8)))
    spikes = np.zeros(len(values), bool)
    for start, end in zip(edges[::2], edges[1::2], strict=True):  # runs of values outside the fences
        spikes[start:end] = end - start <= 2  # longer: a level the series moved to within the window
    if np.count_nonzero(spikes) > max(1, len(values) // 100):  # peaks this common are the series' own
        return values
    return np.where(spikes, np.clip(values, low, high), values)


def _restarted(model: Forecaster | None) -> Forecaster | None:
    """``model`` started over after a reset (:meth:`Standardised.restart`), or ``None`` (built afresh at the next
    value) for one that keeps nothing of the series."""
    restart = getattr(model, "restart", None)
    if restart is None:
        return None
    restart()
    return model


class PerSeries(BatchForecaster):
    """One forecaster object per row, built by ``factory()``; state via ``get_state``/``set_state`` or
    :mod:`tidecast.models.river_state`.

    A row forecasts ``NaN`` until its forecaster is ready (:func:`is_ready`): its own ``is_ready``, else
    ``min_history`` observations and at least what river's forecasters need (:func:`river_min_history`).
    A factory whose forecasters declare neither is refused here, before any data, rather than crashing later.

    ``history=N`` keeps each row's last N learned values (:class:`~tidecast.models.history.HistoryRing`) so that
    :meth:`refit` can rebuild the row's forecaster on recent data; the engine sets it when retraining is on.

    ``bootstrap=B`` adds B replicas per row (:meth:`spread_many`): with ``bootstrap_kind="bagging"`` B more
    forecasters from the factory, each fed every value ``k ~ Poisson(1)`` times (online bagging; the spread is
    their standard deviation); with ``"residual"`` a residual bootstrap of the row's recent in-sample one-step
    residuals (:class:`~tidecast.models.bootstrap.ResidualRing`, ``h`` draws summed for horizon h), for models
    whose few smoothing constants make bagged copies nearly identical (Holt-Winters).

    >>> from river import time_series
    >>> model = PerSeries("hw", lambda: time_series.HoltWinters(0.3, 0.1, 0.5, seasonality=3))
    >>> model.resize(1)
    >>> for tick, y in enumerate([1.0, 2.0]):
    ...     model.learn_many(np.array([0]), np.array([tick]), np.array([y]))
    >>> model.forecast_many(np.array([0]), 2)  # river would raise IndexError here: it starts after 3 values
    array([[nan, nan]])
    """

    def __init__(self, name: str, factory: Callable[[], Forecaster], min_history: int | None = None,
                 bootstrap: int = 0, bootstrap_kind: str = "bagging", history: int = 0) -> None:
        check_bootstrap(bootstrap)
        if history < 0:
            raise ValueError(f"history = {history}: values kept per series, >= 0")
        if bootstrap_kind not in ("bagging", "residual"):
            raise ValueError(f"bootstrap_kind = {bootstrap_kind!r}: 'bagging' or 'residual'")
        self.name = name
        self.factory = factory
        self.min_history = min_history
        self.bootstrap = bootstrap
        self.bootstrap_kind = bootstrap_kind
        self.history = history
        self.history_ = HistoryRing(history) if history else None
        self.models_: list[Forecaster | None] = []
        self.n_learned_ = np.zeros(0, dtype=np.int64)
        self.last_tick_ = np.zeros(0, dtype=np.int64)
        bagging = bootstrap and bootstrap_kind == "bagging"
        self.replicas_: list[list[Forecaster] | None] = []  # bagging: B forecasters per row
        self.replica_learned_ = np.zeros((0, bootstrap if bagging else 0), dtype=np.int64)
        self.ring_ = ResidualRing(bootstrap) if bootstrap and not bagging else None
        self.next_one_ = np.zeros(0)  # residual bootstrap: the last one-step forecast, for the tick after last_tick_
        is_ready(factory(), 0, min_history)  # raises now if readiness cannot be told

    def resize(self, n_rows: int) -> None:
        if n_rows > len(self.models_):
            extra = n_rows - len(self.models_)
            self.models_.extend([None] * extra)
            self.replicas_.extend([None] * extra)
            self.n_learned_ = np.concatenate([self.n_learned_, np.zeros(extra, np.int64)])
            self.last_tick_ = np.concatenate([self.last_tick_, np.zeros(extra, np.int64)])
            self.next_one_ = np.concatenate([self.next_one_, np.full(extra, np.nan)])
            self.replica_learned_ = np.concatenate(
                [self.replica_learned_, np.zeros((extra, self.replica_learned_.shape[1]), np.int64)])
        if self.ring_ is not None:
            self.ring_.resize(n_rows)
        if self.history_ is not None:
            self.history_.resize(n_rows)

    @property
    def fitted_(self) -> bool:
        """Some row's forecaster is ready (forecasts): before that a retrain job has nothing to refit. Once true it
        stays true (the scan over rows stops)."""
        if not getattr(self, "_fitted", False):
            self._fitted = any(m is not None and is_ready(m, int(n), self.min_history)
                               for m, n in zip(self.models_, self.n_learned_, strict=True))
        return self._fitted

    def _model(self, row: int) -> Forecaster:
        model = self.models_[row]
        if model is None:
            model = self.models_[row] = self.factory()
        return model

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        # One-series forecasters assume a regular grid: interpolated values are learned like real ones.
        if self.ring_ is not None:  # the in-sample one-step residual, where the last forecast was for this tick
            follows = (self.n_learned_[rows] > 0) & (ticks == self.last_tick_[rows] + 1)
            self.ring_.add(rows, np.where(follows, values - self.next_one_[rows], np.nan))
            self.next_one_[rows] = np.nan
        for row, y in zip(rows.tolist(), values.tolist(), strict=True):
            self._model(row).learn_one(y)
        self.n_learned_[rows] += 1
        self.last_tick_[rows] = ticks
        if self.history_ is not None:
            self.history_.add(rows, values)
        if self.replica_learned_.shape[1]:
            self._learn_replicas(rows, ticks, values)

    def _learn_replicas(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray) -> None:
        """Online bagging: replica b of a row learns the value k ~ Poisson(1) times, once it is ready; until
        then exactly once, so a warm-up window (cycle detection, standardisation) sees the series as it is."""
        counts = poisson_counts(ticks, values, self.bootstrap)
        for i, (row, y) in enumerate(zip(rows.tolist(), values.tolist(), strict=True)):
            replicas = self.replicas_[row]
            if replicas is None:
                replicas = self.replicas_[row] = [self.factory() for _ in range(self.bootstrap)]
            learned = self.replica_learned_[row]
            for b, replica in enumerate(replicas):
                if not is_ready(replica, int(learned[b]), self.min_history):
                    counts[i, b] = 1
                learn_times(replica, y, int(counts[i, b]))
        self.replica_learned_[rows] += counts

    def first_forecast_after(self) -> tuple[int, str] | None:
        probe = self.factory()
        warmup = getattr(probe, "warmup", None)  # Standardised: it starts its river model on a warm-up window
        if isinstance(warmup, int):
            period = getattr(probe, "period", None)  # known: the model it builds may need more than the window
            model = probe.build(period) if period else None
            model_needs = river_min_history(model) if model is not None else None
            if model_needs is not None and model_needs > warmup:
                # a river: lane builds its class with period 1, a constant: its own settings set the need
                setting = f"with period={period}" if period > 1 else "with its settings"
                return model_needs, (f"{type(model).__name__} {setting} starts from its first "
                                     f"{model_needs} observations, more than warmup={warmup}")
            if period:
                return warmup, f"warmup={warmup}: the standardising window"
            # the cycle is detected on that window: a model with seasonal lags (snarimax's sp) needs sp cycles
            return warmup, (f"warmup={warmup}: the standardising window, and more where the model needs seasonal "
                            "lags of the cycle it detects there")
        if getattr(probe, "is_ready", None) is not None:  # its own verdict comes first (is_ready): not known ahead
            return None
        needs = [n for n in (river_min_history(probe), self.min_history) if n is not None]
        return (max(needs), "the forecaster's minimum history") if needs else None

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        out = np.full((len(rows), horizon), np.nan)
        for i, row in enumerate(rows.tolist()):
            model = self.models_[row] if row < len(self.models_) else None
            if model is not None and is_ready(model, int(self.n_learned_[row]), self.min_history):
                out[i] = _one_forecast(model, horizon)
        if self.ring_ is not None and len(rows):
            self.next_one_[rows] = out[:, 0]
        return out

    def spread_many(self, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        """Bagging: the standard deviation of the ready replicas' forecasts (NaN with fewer than 2 ready);
        residual: the resampled residuals' root mean square perturbation of the point forecast."""
        if not self.bootstrap:
            return None
        rows = np.asarray(rows, dtype=np.int64)
        if self.ring_ is not None:
            steps = np.broadcast_to(np.arange(1, horizon + 1)[None, :], (rows.size, horizon))
            spread = self.ring_.spread(rows, self.last_tick_[rows], steps, keys=self.next_one_[rows])
            return np.where(np.isfinite(self.next_one_[rows])[:, None], spread, np.nan)
        out = np.full((rows.size, horizon), np.nan)
        for i, row in enumerate(rows.tolist()):
            replicas = self.replicas_[row] if row < len(self.replicas_) else None
            if replicas is None:
                continue
            ready = [r.forecast(horizon) for r, n in zip(replicas, self.replica_learned_[row].tolist(), strict=True)
                     if is_ready(r, n, self.min_history)]
            if len(ready) >= 2:
                out[i] = np.std(np.asarray(ready, dtype=float), axis=0)
        return out

    def reset_rows(self, rows: np.ndarray) -> None:
        for row in rows.tolist():  # a forecaster that keeps what it learned of the series restarts on it
            self.models_[row] = _restarted(self.models_[row])
            replicas = self.replicas_[row]
            restarted = None if replicas is None else [_restarted(r) for r in replicas]
            self.replicas_[row] = restarted if restarted is not None and None not in restarted else None
        self.n_learned_[rows] = 0
        self.replica_learned_[rows] = 0
        self.next_one_[rows] = np.nan
        if self.ring_ is not None:
            self.ring_.reset_rows(rows)
        if self.history_ is not None:
            self.history_.reset_rows(rows)

    def refit(self, recent: int, epochs: int = 1, **unused: Any) -> dict[str, Any]:
        """Rebuild each row's forecaster from scratch on the row's last ``recent`` values (the retrain job's hook).

        A fresh forecaster from the factory learns them in order, once: a one-series online learner must see the
        series as one sequence, so a second pass (``epochs``) would show it jumping back in time, and the other
        keywords (a torch model's learning rates) mean nothing here. The rebuild re-runs the model's own warm-up
        on the recent values (:class:`Standardised`: cycle length and standardisation from them), what can repair
        a forecaster whose fixed standardisation no longer fits the series (``bench/retrain_river.py`` measures
        whether it pays: not for Holt-Winters, not reliably for SNARIMAX). Where ``recent`` values are fewer than
        that warm-up needs, the rebuild takes every value the row holds; a row still not ready keeps the forecaster
        it had. Needs ``history > 0``."""
        if self.history_ is None:
            raise ValueError(f"{self.name} keeps no history (history=0): nothing to refit on")
        rows = np.flatnonzero(self.history_.count(np.arange(len(self.models_))) > 0)
        rebuilt = 0
        for row in rows.tolist():
            model, n = self._rebuilt(row, max(int(recent), 1))
            if model is not None:
                self.models_[row], self.n_learned_[row] = model, n
                rebuilt += 1
        return {"rows": int(rows.size), "rebuilt": rebuilt}

    def _rebuilt(self, row: int, recent: int) -> tuple[Forecaster | None, int]:
        """A fresh forecaster that learned the row's last ``recent`` values, or all it holds if those are fewer
        than its warm-up needs; ``None`` if even that leaves it unready."""
        for n in dict.fromkeys((recent, self.history)):  # the wider try only if the first falls short
            values = self.history_.recent(row, n)
            model = self.factory()
            for y in values.tolist():
                model.learn_one(y)
            if is_ready(model, len(values), self.min_history):
                return model, len(values)
            if len(values) < n:  # the ring holds no more than this
                break
        return None, 0

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        data, lengths = _pack([self._state_of(self.models_[r]) for r in rows.tolist()])
        state = {"json": data, "json_len": lengths, "n_learned": self.n_learned_[rows].copy()}
        if self.bootstrap:
            state["boot_last_tick"] = self.last_tick_[rows].copy()
            state["boot_next_one"] = self.next_one_[rows].copy()
        if self.replica_learned_.shape[1]:
            replicas = [None if self.replicas_[r] is None else [self._state_of(m) for m in self.replicas_[r]]
                        for r in rows.tolist()]
            state["boot_json"], state["boot_json_len"] = _pack(replicas)
            state["boot_n_learned"] = self.replica_learned_[rows].copy()
        if self.ring_ is not None:
            state.update(self.ring_.export_rows(rows))
        if self.history_ is not None:
            state.update(self.history_.export_rows(rows))
        return state

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.resize(int(rows.max()) + 1 if len(rows) else 0)
        for row, item in zip(rows.tolist(), _unpack(state["json"], state["json_len"]), strict=True):
            self.models_[row] = None if item is None else self._restore(item)
        # states written before the count existed: 0, i.e. a count-based forecaster warms up again
        self.n_learned_[rows] = state.get("n_learned", np.zeros(len(rows), np.int64))
        if self.history_ is not None:
            self.history_.import_rows(rows, state)
        if not self.bootstrap:
            return
        # saved without replicas: they start again from this row's next value (the spread is NaN meanwhile)
        self.last_tick_[rows] = state.get("boot_last_tick", np.zeros(len(rows), np.int64))
        self.next_one_[rows] = state.get("boot_next_one", np.full(len(rows), np.nan))
        if self.ring_ is not None:
            self.ring_.import_rows(rows, state)
            return
        if "boot_json" not in state:
            items: list[Any] = [None] * len(rows)
            self.replica_learned_[rows] = 0
        else:
            items = _unpack(state["boot_json"], state["boot_json_len"])
            self.replica_learned_[rows] = state["boot_n_learned"]
        for row, item in zip(rows.tolist(), items, strict=True):
            self.replicas_[row] = None if item is None else [self._restore(s) for s in item]

    @staticmethod
    def _state_of(model: Forecaster | None) -> Any:
        if model is None:
            return None
        return model.get_state() if hasattr(model, "get_state") else dump_state(model)

    def _restore(self, state: Any) -> Forecaster:
        model = self.factory()
        if hasattr(model, "set_state"):
            model.set_state(state)
        else:
            load_state(model, state)
        return model


def _pack(items: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """JSON-able items -> one padded ``uint8`` array of their UTF-8 JSON, and the lengths."""
    blobs = [json.dumps(item, separators=(",", ":")).encode() for item in items]
    data = np.zeros((len(blobs), max((len(b) for b in blobs), default=0)), np.uint8)
    for i, blob in enumerate(blobs):
        data[i, : len(blob)] = np.frombuffer(blob, np.uint8)
    return data, np.array([len(b) for b in blobs], np.int64)


def _unpack(data: np.ndarray, lengths: np.ndarray) -> list[Any]:
    return [json.loads(data[i, : int(n)].tobytes()) for i, n in enumerate(np.asarray(lengths).tolist())]
