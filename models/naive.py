"""Seasonal naive: tomorrow looks like today. The floor every other model has to beat.

``yhat[t + h] = y[t + h - P * ceil(h / P)]`` — the value one cycle P earlier. P comes from configuration or is
detected per series (:func:`tidecast.models.seasonality.detect_period`) once ``detect_after`` observations have been
seen; a series without a detectable cycle uses P = 1 (repeat the last value). Fully vectorised: one ring buffer
row per series, one gather per forecast call.

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
ValueError: period = 0: a whole number of ticks from 1 to 100000, or None to detect it
"""

from __future__ import annotations

import numpy as np

from tidecast.models.base import ArrayDict, BatchForecaster
from tidecast.models.seasonality import detect_period
from tidecast.monitors.conformal.base import grow

#: Longest cycle, in ticks, a model keeps a ring buffer row for (8 bytes per tick and series): a week of minutes
#: is 10,080; a bigger number is a mistake that would take gigabytes.
MAX_PERIOD = 100_000


def require(ok: bool, name: str, value: object, rule: str) -> None:
    """``ValueError("name = value: rule")`` unless ``ok``: constructors check their parameters with it."""
    if not ok:
        raise ValueError(f"{name} = {value!r}: {rule}")


def check_ticks(name: str, value: int | None, low: int = 1, optional: bool = False) -> None:
    """A whole number of ticks in ``[low, MAX_PERIOD]`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_PERIOD
    require(ok, name, value, f"a whole number of ticks from {low} to {MAX_PERIOD}"
                             + (", or None to detect it" if optional and name == "period" else
                                ", or None for the default" if optional else ""))


class SeasonalNaive(BatchForecaster):
    name = "seasonal-naive"

    def __init__(self, period: int | None = None, max_period: int = 200, detect_after: int | None = None) -> None:
        check_ticks("period", period, optional=True)
        check_ticks("max_period", max_period)
        check_ticks("detect_after", detect_after, low=2, optional=True)
        self.period = period
        self.max_period = max_period
        self.detect_after = detect_after if detect_after is not None else 2 * max_period + 2
        # The ring must hold one cycle to forecast and, while detecting, the detection window.
        self.buffer_len = period if period is not None else max(self.detect_after, max_period)
        self.buffer_ = np.full((0, self.buffer_len), np.nan)
        self.count_ = np.zeros(0, np.int64)  # observations since the last reset
        self.last_tick_ = np.zeros(0, np.int64)
        self.period_ = np.zeros(0, np.int64)  # 0 = not known yet

    def resize(self, n_rows: int) -> None:
        self.buffer_ = grow(self.buffer_, n_rows, np.nan)
        self.count_ = grow(self.count_, n_rows, 0)
        self.last_tick_ = grow(self.last_tick_, n_rows, 0)
        self.period_ = grow(self.period_, n_rows, self.period or 0)

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray) -> None:
        self.buffer_[rows, ticks % self.buffer_len] = values
        self.last_tick_[rows] = ticks
        self.count_[rows] += 1
        if self.period is None:
            for row in rows[(self.period_[rows] == 0) & (self.count_[rows] >= self.detect_after)]:
                self.period_[row] = self._detect(row)

    def _detect(self, row: int) -> int:
        ticks = np.arange(self.last_tick_[row] - self.detect_after + 1, self.last_tick_[row] + 1)
        history = self.buffer_[row, ticks % self.buffer_len]
        return detect_period(history, self.max_period) or 1

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        period = self.period_[rows][:, None]
        h = np.arange(1, horizon + 1)[None, :]
        cycles = (h + np.maximum(period, 1) - 1) // np.maximum(period, 1)
        source = self.last_tick_[rows][:, None] + h - period * cycles
        out = self.buffer_[rows[:, None], source % self.buffer_len]
        ready = (period > 0) & (self.count_[rows][:, None] >= period)
        return np.where(ready, out, np.nan)

    def reset_rows(self, rows: np.ndarray) -> None:
        self.buffer_[rows] = np.nan
        self.count_[rows] = 0  # a known period is kept: the clock-based grid keeps it aligned

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return {"buffer": self.buffer_[rows].copy(), "count": self.count_[rows].copy(),
                "last_tick": self.last_tick_[rows].copy(), "period": self.period_[rows].copy()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.resize(int(rows.max()) + 1 if len(rows) else 0)
        self.buffer_[rows], self.count_[rows] = state["buffer"], state["count"]
        self.last_tick_[rows], self.period_[rows] = state["last_tick"], state["period"]
