"""Adaptive conformal inference (Gibbs & Candès, NeurIPS 2021), vectorised over (row, horizon, target).

``alpha_t <- alpha_t + gamma * (a - miss)``; the threshold is the conformal ``1 - alpha_t`` quantile of the last
``window`` scores. Long-run coverage holds only if ``alpha_t`` is *not* clipped, and then ``alpha_t <= 0`` means
an infinite interval: that is ACI's honest answer after a run of misses, and why it is not tidecast's default.
``clip=True`` keeps ``alpha_t`` in [0, 1] and caps the threshold at the window's largest score (never infinite,
no guarantee). Cold cells (no score yet) are infinite unless clipped, where they are the point forecast.

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

from monitors.conformal.base import ScoreCalibrator
from monitors.conformal.window import conformal_quantile, filled, push


class ACI(ScoreCalibrator):
    name = "aci"

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        gamma: float = 0.005,
        window: int = 500,
        clip: bool = False,
        symmetric: bool = False,
    ) -> None:
        self.gamma = gamma
        self.window = window
        self.clip = clip
        super().__init__(horizon, alpha, symmetric)

    def _state_spec(self) -> dict:
        return {
            "count": ((), 0, np.int64),
            "ring": ((self.window,), 0.0, float),
            "alpha_t": ((self.n_targets_,), np.nan, float),  # NaN = not started (read as the target)
        }

    def _alpha_t(self, rows: np.ndarray) -> np.ndarray:
        a = self.alpha_t_[rows]
        return np.where(np.isnan(a), self.target_alpha_, a)

    def _thresholds(self, rows: np.ndarray, alpha_t: np.ndarray) -> np.ndarray:
        vals, m = filled(self.ring_, self.count_, rows)
        s = np.sort(self.scores(vals), axis=2)
        q = conformal_quantile(s, m, alpha_t, self.clip)
        if self.clip:
            q = np.where((m > 0)[..., None], q, 0.0)
        return q

    def _learn(self, rows: np.ndarray, r: np.ndarray, mask: np.ndarray) -> None:
        alpha_t = self._alpha_t(rows)
        q = self._thresholds(rows, alpha_t)
        miss = self.scores(r) > q
        started = (self.count_[rows] > 0)[..., None]
        alpha_t = alpha_t + np.where(started, self.gamma * (self.target_alpha_ - miss), 0.0)
        if self.clip:
            alpha_t = np.clip(alpha_t, 0.0, 1.0)
        self._put("alpha_t", rows, alpha_t, mask)
        push(self.ring_, self.count_, rows, r, mask)
        self._put("count", rows, self.count_[rows] + 1, mask)

    def _offsets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = self._thresholds(rows, self._alpha_t(rows))
        return np.zeros(q.shape[:2]), q

    def get_params(self) -> dict:
        return {**super().get_params(), "gamma": self.gamma, "window": self.window, "clip": self.clip}
