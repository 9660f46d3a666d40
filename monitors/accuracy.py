"""Scale-free point scores users expect beside MAE and RMSE: sMAPE and MASE.

* **sMAPE** (percent, 0..200) of one forecast: ``200 · |y − ŷ| / (|y| + |ŷ|)``; a perfect forecast of a zero
  (0/0) scores 0, not ``NaN``.
* **MASE**: the absolute error divided by the series' *scale*, the mean absolute error of the seasonal naive
  one-step forecast ``ŷ_t = y_{t−m}`` at the series' detected period ``m`` (M4's definition). The scale is
  prequential: the one used for a forecast issued at tick ``c`` is the mean over the series' observations up to
  ``c`` only, so no future value enters a score. Below 1: better than the seasonal naive forecast on average.
  The period is detected as :class:`~tidecast.models.naive.SeasonalNaive` detects it, on the series' first
  ``2 · max_period + 2`` ticks of its grid, gaps interpolated as the engine fills them; no cycle found: ``m = 1``.

>>> smape(np.array([1.0, 0.0, 2.0]), np.array([3.0, 0.0, 2.0])).tolist()
[100.0, 0.0, 0.0]
>>> ticks, y = np.array([0, 1, 2, 3, 5]), np.array([1.0, 2.0, 1.0, 4.0, 5.0])  # tick 4 missing
>>> running_scale_at(ticks, y, period=2, at=np.arange(6)).tolist()  # pairs at ticks 2, 3 and 5: 0, 2, 1
[nan, nan, 0.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import numpy as np

from tidecast.models.seasonality import detect_period


def smape(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    """Symmetric absolute percentage error of each forecast, in percent; 0/0 counts 0."""
    y, yhat = np.asarray(y, dtype=float), np.asarray(yhat, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        denominator = np.abs(y) + np.abs(yhat)
        out = 200.0 * (np.abs(y - yhat) / denominator)
        huge = np.isinf(denominator) & np.isfinite(y) & np.isfinite(yhat)
        if huge.any():  # beyond ~9e307 the sums overflow (inf / inf): the same ratio of halves
            half, half_hat = y[huge] / 2, yhat[huge] / 2
            out[huge] = 200.0 * (np.abs(half - half_hat) / (np.abs(half) + np.abs(half_hat)))
    return np.where(denominator == 0, 0.0, out)


#: The longest period the scale looks for, and the ticks of a series' grid it is detected on.
MAX_PERIOD = 200
PERIOD_HEAD = 2 * MAX_PERIOD + 2


def scale_period(grid: np.ndarray, max_period: int = MAX_PERIOD) -> int:
    """The seasonal naive period of a series from its values on its grid (``NaN`` where no value arrived):
    detected on the first ``2 · max_period + 2`` ticks with the gaps interpolated linearly, as the engine fills
    them for :class:`~tidecast.models.naive.SeasonalNaive` (squeezing the gaps out would shift every lag: a daily
    cycle with 5 % of its hours missing reads as 23); 1 if no cycle is found.

    >>> t = np.arange(300.0)
    >>> y = np.sin(2 * np.pi * t / 24)
    >>> y[::7] = np.nan  # a value in seven never arrives
    >>> scale_period(y)
    24
    """
    head = np.asarray(grid, dtype=float)[: 2 * max_period + 2]
    seen = np.flatnonzero(np.isfinite(head))
    if seen.size < 8:
        return 1
    span = np.arange(seen[0], seen[-1] + 1)
    filled = np.interp(span, seen, head[seen])
    return int(detect_period(filled, min(max_period, filled.size // 2)) or 1)


def running_scale_at(ticks: np.ndarray, values: np.ndarray, period: int, at: np.ndarray) -> np.ndarray:
    """The MASE scale of a series whose ``values`` arrived at the increasing grid ``ticks``, read at the ticks
    ``at``: the mean of ``|y_s − y_{s−m}|`` over every tick ``s <= at`` where both values arrived; ``NaN`` until
    the first such pair. Computed on the observed ticks alone, never on a grid over the whole span (a stray
    timestamp decades off would make that grid billions of ticks long).

    >>> running_scale_at(np.array([0, 1, 2, 3, 5]), np.array([1.0, 2.0, 1.0, 4.0, 5.0]), 2,
    ...                  np.array([-1, 2, 4, 5, 9])).tolist()
    [nan, 0.0, 1.0, 1.0, 1.0]
    """
    ticks, values = np.asarray(ticks, dtype=np.int64), np.asarray(values, dtype=float)
    back = np.searchsorted(ticks, ticks - period)  # where the value m ticks earlier would sit
    has = back < ticks.size
    has[has] &= ticks[back[has]] == ticks[has] - period
    diffs = np.full(ticks.size, np.nan)
    diffs[has] = np.abs(values[has] - values[back[has]])
    seen = np.isfinite(diffs)
    count = np.cumsum(seen)
    total = np.cumsum(np.where(seen, diffs, 0.0))
    last = np.searchsorted(ticks, np.asarray(at, dtype=np.int64), side="right") - 1  # the last tick <= at
    out = np.full(last.shape, np.nan)
    ok = last >= 0
    ok[ok] &= count[last[ok]] > 0
    out[ok] = total[last[ok]] / count[last[ok]]
    return out
