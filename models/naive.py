"""Seasonal naive: tomorrow looks like today. The floor every other model has to beat.

``yhat[t + h] = y[t + h - P * ceil(h / P)]`` — the value one cycle P earlier. P comes from configuration or is
detected per series (:func:`tidecast.models.seasonality.detect_period`) once ``detect_after`` observations have been
seen; a series without a detectable cycle uses P = 1 (repeat the last value). Fully vectorised: one ring buffer
row per series, one gather per forecast call.

**Calibration.** When a row's cycle is detected it starts forecasting; the detection window it holds is also a
backtest: the residuals seasonal naive would have made there (:func:`seasonal_backtest`) go to the engine as a
:class:`~tidecast.models.base.Calibration`, so the row's calibrator cells start from ``detect_after - P ceil(h/P)``
residuals each instead of none. With a configured period the ring holds one cycle only: nothing to backtest.

**Outliers.** Seasonal naive repeats whatever it saw one cycle earlier, an absurd value included: a ``1e20``
comes back once as a forecast one cycle later (and its residual is absurd too), then leaves the ring. The
calibrators clip both residuals (:mod:`tidecast.monitors.conformal.base`).

>>> import numpy as np
>>> m = SeasonalNaive(period=3)
>>> m.resize(1)
>>> for tick, y in enumerate([1.0, 2.0, 3.0, 4.0]):
...     m.learn_many(np.array([0]), np.array([tick]), np.array([y]))
>>> m.forecast_many(np.array([0]), 4).tolist()
[[2.0, 3.0, 4.0, 2.0]]
>>> SeasonalNaive(period=0)
Traceback (most recent call last):
...
ValueError: period = 0: a whole number of ticks from 1 to 100000, or None (null) to detect it
"""

from __future__ import annotations

import threading

import numpy as np

from tidecast.models.base import ArrayDict, BatchForecaster, Calibration, require
from tidecast.models.bootstrap import ResidualRing, check_bootstrap
from tidecast.models.rows import Column, Field, RowTable
from tidecast.models.seasonality import detect_period

#: Longest cycle, in ticks, a model keeps a ring buffer row for (8 bytes per tick and series): a week of minutes
#: is 10,080; a bigger number is a mistake that would take gigabytes.
MAX_PERIOD = 100_000


def check_ticks(name: str, value: int | None, low: int = 1, optional: bool = False) -> None:
    """A whole number of ticks in ``[low, MAX_PERIOD]`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_PERIOD
    require(ok, name, value, f"a whole number of ticks from {low} to {MAX_PERIOD}"
                             + (", or None (null) to detect it" if optional and name == "period" else
                                ", or None (null) for the default" if optional else ""))


def seasonal_backtest(history: np.ndarray, period: np.ndarray, horizon: int) -> np.ndarray:
    """Residuals of seasonal naive (``yhat[t] = y[t - P ceil(h / P)]``) over each row of ``history`` (n, T),
    laid out as :class:`Calibration` residuals (n, T, horizon): ``out[i, t, h-1] = y[t] - y[t - P ceil(h/P)]``,
    ``NaN`` where the source lies before the history or is not finite.

    >>> seasonal_backtest(np.array([[1.0, 2.0, 4.0, 7.0]]), np.array([1]), 2)[0].tolist()
    [[nan, nan], [1.0, nan], [2.0, 3.0], [3.0, 5.0]]
    """
    history = np.asarray(history, dtype=float)
    n, t = history.shape
    period = np.maximum(np.asarray(period, dtype=np.int64), 1)[:, None]
    h = np.arange(1, horizon + 1)[None, :]
    back = period * ((h + period - 1) // period)  # (n, H)
    src = np.arange(t)[None, :, None] - back[:, None, :]  # (n, T, H)
    values = np.take_along_axis(history[:, :, None], np.clip(src, 0, t - 1), axis=1) if t else history[:, :, None]
    with np.errstate(invalid="ignore"):
        return np.where(src >= 0, history[:, :, None] - values, np.nan)


class SeasonalNaive(BatchForecaster):
    name = "seasonal-naive"

    buffer_ = Column("buffer")  # ring of the last buffer_len values, indexed by tick
    count_ = Column("count")  # observations since the last reset
    last_tick_ = Column("last_tick")
    period_ = Column("period")  # 0 = not known yet

    def __init__(self, period: int | None = None, max_period: int = 200, detect_after: int | None = None,
                 bootstrap: int = 0) -> None:
        check_ticks("period", period, optional=True)
        check_ticks("max_period", max_period)
        check_ticks("detect_after", detect_after, low=2, optional=True)
        check_bootstrap(bootstrap)
        self.period = period
        self.bootstrap = bootstrap
        # residual bootstrap: the in-sample one-cycle differences y[t] - y[t - P], resampled per replica
        self.ring_ = ResidualRing(bootstrap) if bootstrap else None
        self.max_period = max_period
        self.detect_after = detect_after if detect_after is not None else 2 * max_period + 2
        # The ring must hold one cycle to forecast and, while detecting, the detection window.
        self.buffer_len = period if period is not None else max(self.detect_after, max_period)
        self.table_ = RowTable(
            buffer=Field((self.buffer_len,), np.float64, np.nan),
            count=Field((), np.int64, 0),
            last_tick=Field((), np.int64, 0),
            period=Field((), np.int64, period or 0),
        )
        self._lock = threading.Lock()
        self._detected: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, window, period) to hand off

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)
        if self.ring_ is not None:
            self.ring_.resize(n_rows)

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        if self.ring_ is not None:  # the residual of the one-step forecast this value answers
            self.ring_.add(rows, values - self.forecast_many(rows, 1)[:, 0])
        # A grid model: interpolated values keep the ring contiguous, so they are learned like real ones.
        self.buffer_[rows, ticks % self.buffer_len] = values
        self.last_tick_[rows] = ticks
        self.count_[rows] += 1
        if self.period is None:
            period, count = self.period_[rows], self.count_[rows]
            # No cycle found (period 1, the last value): look again after 2, 4, 8, ... detect_after values, on a
            # window that no longer holds what hid it (a meter idle at first, a glitch); it used to be final. The
            # looks thin out so that their false cycles (~2 % a look on noise) and their cost stay bounded.
            windows = count // self.detect_after
            again = (period == 1) & (count % self.detect_after == 0) & (windows >= 2) & (windows & (windows - 1) == 0)
            due = ((period == 0) & (count >= self.detect_after)) | again
            found = []
            for row in rows[due].tolist():
                new = detect_period(self._window(np.array([row]))[0], self.max_period) or 1
                if new != self.period_[row]:
                    self.period_[row] = new
                    found.append(row)
            if found:  # the detection window, backtested when the engine asks, seeds the rows' calibrators
                found = np.array(found, dtype=np.int64)
                with self._lock:
                    self._detected.append((found, self._window(found), self.period_[found].copy()))

    def _window(self, rows: np.ndarray) -> np.ndarray:
        """The detection window of ``rows`` (n, detect_after), oldest first."""
        ticks = self.last_tick_[rows][:, None] + np.arange(1 - self.detect_after, 1)[None, :]
        return self.buffer_[rows[:, None], ticks % self.buffer_len]

    def pop_calibration(self, horizon: int) -> Calibration | None:
        if not self._detected:
            return None
        with self._lock:
            detected, self._detected = self._detected, []
        return Calibration.concat([Calibration(rows, seasonal_backtest(window, period, horizon))
                                   for rows, window, period in detected])

    def first_forecast_after(self) -> tuple[int, str]:
        if self.period is not None:
            return self.period, f"period={self.period}: one cycle"
        return self.detect_after, (f"detect_after={self.detect_after}: its cycle is detected then; given a period, "
                                   "it starts after one cycle")

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        period = self.period_[rows][:, None]
        h = np.arange(1, horizon + 1)[None, :]
        cycles = (h + np.maximum(period, 1) - 1) // np.maximum(period, 1)
        source = self.last_tick_[rows][:, None] + h - period * cycles
        out = self.buffer_[rows[:, None], source % self.buffer_len]
        ready = (period > 0) & (self.count_[rows][:, None] >= period)
        return np.where(ready, out, np.nan)

    def spread_many(self, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        """Residual bootstrap: the h-step error of seasonal naive is a sum of ``ceil(h / P)`` one-cycle
        differences, each replica resamples them from the row's recent ones."""
        if self.ring_ is None:
            return None
        period = np.maximum(self.period_[rows], 1)[:, None]
        steps = (np.arange(1, horizon + 1)[None, :] + period - 1) // period
        last = self.last_tick_[rows]
        spread = self.ring_.spread(rows, last, steps, keys=self.buffer_[rows, last % self.buffer_len])
        return np.where(self.period_[rows][:, None] > 0, spread, np.nan)

    def reset_rows(self, rows: np.ndarray) -> None:
        # A known period is kept: the clock-based grid keeps it aligned.
        self.table_.blank(rows, ("buffer", "count"))
        if self.ring_ is not None:
            self.ring_.reset_rows(rows)

    def drop_rows(self, rows: np.ndarray) -> None:
        with self._lock:  # a hand-off still waiting would seed the rows' next series
            self._detected = [(r[keep], w[keep], p[keep]) for r, w, p in self._detected
                              if (keep := ~np.isin(r, rows)).any()]

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        state = self.table_.export_rows(rows)
        return state if self.ring_ is None else {**state, **self.ring_.export_rows(rows)}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.table_.import_rows(rows, state)
        if self.ring_ is not None:
            self.ring_.import_rows(rows, state)
