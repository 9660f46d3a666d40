"""An example tidecast plug-in: one model and one calibrator, registered by entry points (see pyproject.toml).

>>> from tidecast import checks
>>> checks.check_forecaster(lambda: DampedDrift(damping=0.9))
>>> checks.check_calibrator(lambda: GaussianEWMA(horizon=3, alpha=(0.2, 0.05)))
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from tidecast.models.base import ArrayDict, BatchForecaster
from tidecast.models.rows import Column, Field, RowTable
from tidecast.monitors.conformal.base import Block, ScoreCalibrator


class DampedDrift(BatchForecaster):
    """The last value plus the mean step since the series started, damped by ``damping`` per step ahead:
    ``y_T + slope · (φ + φ² + ... + φ^h)``. Ready after two observations (one step to measure)."""

    name = "damped-drift"
    first_ = Column("first")
    last_ = Column("last")
    count_ = Column("count")

    def __init__(self, damping: float = 1.0) -> None:
        if not 0 < damping <= 1:
            raise ValueError(f"damping = {damping!r}: expected a number in (0, 1]")
        self.damping = damping
        self.table_ = RowTable(first=Field((), np.float64, np.nan), last=Field((), np.float64, np.nan),
                               count=Field((), np.int64, 0))

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        new = self.count_[rows] == 0
        self.first_[rows[new]] = values[new]
        self.last_[rows] = values
        self.count_[rows] += 1

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        count = self.count_[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = (self.last_[rows] - self.first_[rows]) / (count - 1)
        weights = np.cumsum(self.damping ** np.arange(1, horizon + 1))
        out = self.last_[rows][:, None] + slope[:, None] * weights[None, :]
        return np.where((count >= 2)[:, None], out, np.nan)

    def first_forecast_after(self) -> tuple[int, str]:
        return 2, "a drift needs two values"  # optional: lets a replay say why a short series got no forecast

    def reset_rows(self, rows: np.ndarray) -> None:
        self.table_.blank(rows)

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return self.table_.export_rows(rows)

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.table_.import_rows(rows, state)


class GaussianEWMA(ScoreCalibrator):
    """``±z·σ`` around the forecast, ``σ²`` an exponentially weighted mean (weight ``weight``) of the squared
    residuals of each (series, horizon) cell; ``z`` the normal quantile of each level's one-sided target."""

    name = "gaussian-ewma"

    def __init__(self, horizon: int, alpha: float | tuple[float, ...] = 0.1, weight: float = 0.05) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight = {weight!r}: expected a number in (0, 1]")
        self.weight = weight
        super().__init__(horizon, alpha)
        self.z_ = ndtri(1.0 - self.target_alpha_)  # one per target (level x side)

    def _state_spec(self) -> dict:
        return {"var": ((), 0.0, float), "count": ((), 0, float)}

    def _learn(self, blk: Block, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        count = blk["count"]
        var = np.where(count == 0, r * r, (1 - self.weight) * blk["var"] + self.weight * r * r)
        blk["var"], blk["count"] = var, count + 1
        offsets = np.zeros((r.size, 1 + self.n_targets_))
        offsets[:, 1:] = np.sqrt(var)[:, None] * self.z_[None, :]
        return offsets
