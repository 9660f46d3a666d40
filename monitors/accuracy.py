"""Scale-free point scores users expect beside MAE and RMSE: sMAPE and MASE.

* **sMAPE** (percent, 0..200) of one forecast: ``200 · |y − ŷ| / (|y| + |ŷ|)``; a perfect forecast of a zero
  (0/0) scores 0, not ``NaN``.
* **MASE**: the absolute error divided by the series' *scale*, the mean absolute error of the seasonal naive
  one-step forecast ``ŷ_t = y_{t−m}`` at the series' detected period ``m`` (M4's definition). The scale is
  prequential: the one used for a forecast issued at tick ``c`` is the mean over the series' observations up to
  ``c`` only, so no future value enters a score. Below 1: better than the seasonal naive forecast on average.
  The period is detected as :class:`~tidecast.models.naive.SeasonalNaive` detects it, on the series' first
  ``2 · max_period + 2`` values (or all it has); no cycle found: ``m = 1``.

>>> smape(np.array([1.0, 0.0, 2.0]), np.array([3.0, 0.0, 2.0])).tolist()
[100.0, 0.0, 0.0]
>>> y = np.array([1.0, 2.0, 1.0, 4.0, np.nan, 5.0])  # one tick missing
>>> running_scale(y, period=2).tolist()  # pairs at ticks 2, 3 and 5 (0, 2, 1); tick 4 has no value
[nan, nan, 0.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import numpy as np

from tidecast.models.seasonality import detect_period


def smape(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    """Symmetric absolute percentage error of each forecast, in percent; 0/0 counts 0."""
    y, yhat = np.asarray(y, dtype=float), np.asarray(yhat, dtype=float)
    denominator = np.abs(y) + np.abs(yhat)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 200.0 * np.abs(y - yhat) / denominator
    return np.where(denominator == 0, 0.0, out)


def scale_period(values: np.ndarray, max_period: int = 200) -> int:
    """The seasonal naive period of a series: detected on its first ``2 · max_period + 2`` values; 1 if none."""
    head = np.asarray(values, dtype=float)[: 2 * max_period + 2]
    head = head[np.isfinite(head)]
    if head.size < 8:
        return 1
    return int(detect_period(head, min(max_period, head.size // 2)) or 1)


def running_scale(grid: np.ndarray, period: int) -> np.ndarray:
    """Per tick of a series on its grid (``NaN`` where no observation), the mean of ``|y_s − y_{s−m}|`` over every
    tick ``s`` up to and including this one where both values exist; ``NaN`` until the first such pair."""
    grid = np.asarray(grid, dtype=float)
    diffs = np.full(grid.shape, np.nan)
    if grid.size > period:
        diffs[period:] = np.abs(grid[period:] - grid[:-period])
    seen = np.isfinite(diffs)
    count = np.cumsum(seen)
    total = np.cumsum(np.where(seen, diffs, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
