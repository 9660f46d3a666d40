"""Forecasts waiting for their targets: the last H issued per series, until each matures and is scored.

The h-step forecast issued at origin tick ``o`` matures at tick ``o + h``. A row keeps the forecasts of its last H
origins in a ring indexed by ``origin % H``, with the origin tick itself stored so a slot overwritten by a newer
origin, or cleared after a reset, can never be mistaken for the one asked for. Bounds are ``NaN`` where a step was
issued without an interval; they have a last axis of one entry per interval level (``n_levels``).

>>> import numpy as np
>>> pending = PendingForecasts(horizon=2)
>>> pending.resize(1)
>>> pending.store(np.array([0]), np.array([10]), np.array([[1.0, 2.0]]), np.array([[[0.5], [1.0]]]),
...               np.array([[[1.5], [3.0]]]))
>>> mean, lower, upper, valid = pending.matured(np.array([0]), np.array([11]))  # tick 11: h = 1 from origin 10
>>> mean.tolist(), valid.tolist(), lower.shape
([[1.0, nan]], [[True, False]], (1, 2, 1))
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
    lower_ = Column("lower")  # (rows, H slots, H steps, levels)
    upper_ = Column("upper")

    def __init__(self, horizon: int, n_levels: int = 1) -> None:
        self.horizon = horizon
        self.n_levels = n_levels
        self.hs_ = np.arange(1, horizon + 1)
        steps = Field((horizon, horizon), np.float64, np.nan)
        bounds = Field((horizon, horizon, n_levels), np.float64, np.nan)
        self.table_ = RowTable(origin=Field((horizon,), np.int64, NO_TICK), mean=steps, lower=bounds, upper=bounds)

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    def store(self, rows: np.ndarray, origins: np.ndarray, mean: np.ndarray, lower: np.ndarray,
              upper: np.ndarray) -> None:
        """Keep the forecasts issued at tick ``origins`` (one per row): ``mean`` (n, H), bounds (n, H, levels)."""
        ring = origins % self.horizon
        self.origin_[rows, ring] = origins
        self.mean_[rows, ring], self.lower_[rows, ring], self.upper_[rows, ring] = mean, lower, upper

    def matured(self, rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
        """Forecasts for tick ``targets`` issued h ticks earlier: (mean, lower, upper, valid); ``mean`` and
        ``valid`` (n, H), the bounds (n, H, levels)."""
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
        if np.ndim(state["lower"]) == 3:  # saved before several levels existed: one level, no level axis
            state = {**state, "lower": np.asarray(state["lower"])[..., None],
                     "upper": np.asarray(state["upper"])[..., None]}
        self.table_.import_rows(rows, state)
