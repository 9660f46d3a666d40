"""Forecasts waiting for their targets: the last H issued per series, until each matures and is scored.

The h-step forecast issued at origin tick ``o`` matures at tick ``o + h``. A row keeps the forecasts of its last H
origins in a ring indexed by ``origin % H``, with the origin tick itself stored so a slot overwritten by a newer
origin, or cleared after a reset, can never be mistaken for the one asked for. Bounds are ``NaN`` where a step was
issued without an interval.

>>> import numpy as np
>>> pending = PendingForecasts(horizon=2)
>>> pending.resize(1)
>>> pending.store(np.array([0]), np.array([10]), np.array([[1.0, 2.0]]), np.array([[0.5, 1.0]]),
...               np.array([[1.5, 3.0]]))
>>> mean, lower, upper, valid = pending.matured(np.array([0]), np.array([11]))  # tick 11: h = 1 from origin 10
>>> mean.tolist(), valid.tolist()
([[1.0, nan]], [[True, False]])
"""

from __future__ import annotations

import numpy as np

from tidecast.models.rows import ArrayDict, Column, Field, RowTable

#: Origin of an empty slot: no tick ever equals it.
NO_TICK = np.iinfo(np.int64).min


class PendingForecasts:
    """The last H forecasts of every row, indexed by origin tick modulo H, until they mature."""

    origin_ = Column("origin")  # (rows, H): origin tick of each ring slot
    mean_ = Column("mean")  # (rows, H slots, H steps)
    lower_ = Column("lower")
    upper_ = Column("upper")

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.hs_ = np.arange(1, horizon + 1)
        steps = Field((horizon, horizon), np.float64, np.nan)
        self.table_ = RowTable(origin=Field((horizon,), np.int64, NO_TICK), mean=steps, lower=steps, upper=steps)

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    def store(self, rows: np.ndarray, origins: np.ndarray, mean: np.ndarray, lower: np.ndarray,
              upper: np.ndarray) -> None:
        """Keep the forecasts issued at tick ``origins`` (one per row), each (n, H)."""
        ring = origins % self.horizon
        self.origin_[rows, ring] = origins
        self.mean_[rows, ring], self.lower_[rows, ring], self.upper_[rows, ring] = mean, lower, upper

    def matured(self, rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
        """Forecasts for tick ``targets`` issued h ticks earlier: (mean, lower, upper, valid), each (n, H)."""
        origins = targets[:, None] - self.hs_[None, :]
        ring = origins % self.horizon
        r = rows[:, None]
        step = self.hs_[None, :] - 1
        mean = self.mean_[r, ring, step]
        valid = (self.origin_[r, ring] == origins) & np.isfinite(mean)
        return mean, self.lower_[r, ring, step], self.upper_[r, ring, step], valid

    def invalidate(self, rows: np.ndarray) -> None:
        """Forget what ``rows`` have pending (after a reset nothing may mature across the gap)."""
        self.table_.blank(rows, ("origin",))

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return self.table_.export_rows(rows)

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.table_.import_rows(rows, state)
