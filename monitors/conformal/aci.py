"""Adaptive conformal inference (Gibbs & Candès, NeurIPS 2021), vectorised over (row, horizon, target).

``alpha_t <- alpha_t + gamma * (a - miss)``; the threshold is the conformal ``1 - alpha_t`` quantile of the last
``window`` scores. Long-run coverage holds only if ``alpha_t`` is *not* clipped, and then ``alpha_t <= 0`` means
an infinite interval: that is ACI's honest answer after a run of misses, and why it is not tidecast's default.
``clip=True`` keeps ``alpha_t`` in [0, 1] and caps the threshold at the window's largest score (never infinite,
no guarantee). A cell with no score yet has no interval (``NaN`` bounds).

>>> import numpy as np
>>> cal = ACI(horizon=1, alpha=0.1, gamma=0.005)
>>> rng = np.random.default_rng(1)
>>> for _ in range(3000):
...     cal.update(np.array([0]), rng.normal(size=(1, 1)), np.ones((1, 1), bool))
>>> lo, hi = cal.interval(np.array([0]), np.zeros((1, 1)))
>>> bool(1.3 < hi[0, 0] < 2.2)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tidecast.models.base import check_count, check_rate
from tidecast.models.rows import Column
from tidecast.monitors.conformal.base import MAX_WINDOW, ScoreCalibrator
from tidecast.monitors.conformal.window import conformal_quantile, window_values


class ACI(ScoreCalibrator):
    name = "aci"
    _separate = ("ring",)
    ring_ = Column("ring")

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        gamma: float = 0.005,
        window: int = 500,
        clip: bool = False,
        symmetric: bool = False,
    ) -> None:
        check_rate("gamma", gamma)
        check_count("window", window, high=MAX_WINDOW)
        self.gamma = gamma
        self.window = window
        self.clip = clip
        super().__init__(horizon, alpha, symmetric)

    def _state_spec(self) -> dict:
        return {
            "count": ((), 0, np.int64),
            "alpha_t": ((self.n_targets_,), np.nan, float),  # NaN = not started (read as the target)
            "ring": ((self.window,), 0.0, float),
        }

    def _quantile(self, cells: np.ndarray, count: np.ndarray, alpha_t: np.ndarray) -> np.ndarray:
        vals, n = window_values(self.flat("ring"), cells, count)
        return conformal_quantile(np.sort(self.scores(vals), axis=1), n, alpha_t, self.clip)

    def _learn(self, blk, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        count = blk["count"].astype(np.int64)
        alpha_t = blk["alpha_t"]
        alpha_t = np.where(np.isnan(alpha_t), self.target_alpha_, alpha_t)
        miss = self.scores(r) > self._quantile(cells, count, alpha_t)
        alpha_t = alpha_t + self.gamma * (self.target_alpha_ - miss) * (count > 0)[:, None]
        if self.clip:
            alpha_t = np.clip(alpha_t, 0.0, 1.0)
        self.flat("ring")[cells, count % self.window] = r
        blk["alpha_t"], blk["count"] = alpha_t, count + 1
        q = self._quantile(cells, count + 1, alpha_t)
        return np.concatenate([np.zeros((r.size, 1)), q], axis=1)
