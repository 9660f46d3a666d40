"""Scale-free online gradient descent on the pinball loss (SF-OGD; Orabona & Pál 2016, used for conformal
prediction by Bhatnagar et al., ICML 2023), vectorised over (row, horizon, target).

``q <- q - D * grad / sqrt(sum grad^2)`` with ``grad = a - 1{s > q}`` and ``D`` the largest |residual| seen
(the paper's scale, learned online instead of from a calibration set). No learning rate to tune; never infinite.

>>> import numpy as np
>>> cal = SFOGD(horizon=1, alpha=0.1)
>>> rng = np.random.default_rng(2)
>>> for _ in range(4000):
...     cal.update(np.array([0]), rng.normal(size=(1, 1)), np.ones((1, 1), bool))
>>> lo, hi = cal.interval(np.array([0]), np.zeros((1, 1)))
>>> bool(1.2 < hi[0, 0] < 2.2)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tidecast.monitors.conformal.base import ScoreCalibrator


class SFOGD(ScoreCalibrator):
    name = "sf-ogd"

    def __init__(self, horizon: int, alpha: float | Sequence[float] = 0.1, symmetric: bool = False) -> None:
        super().__init__(horizon, alpha, symmetric)

    def _state_spec(self) -> dict:
        k = self.n_targets_
        return {"count": ((), 0, np.int64), "scale": ((), 0.0, float), "q": ((k,), 0.0, float),
                "grad2": ((k,), 0.0, float)}

    def _learn(self, blk, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        count = blk["count"]
        scale = np.maximum(blk["scale"], np.abs(r))
        q, g2 = blk["q"], blk["grad2"]
        grad = (self.target_alpha_ - (self.scores(r) > q)) * (count > 0)[:, None]
        g2 = g2 + grad**2
        q = q - scale[:, None] * grad / np.sqrt(np.where(g2 > 0, g2, 1.0))
        # The first residual has nothing to score: it places the thresholds at the Gaussian prior on its size
        # (q starting at 0 issued the point forecast itself as the first interval of every cell).
        q = np.where((count == 0)[:, None], self.prior_per_scale_ * np.abs(r)[:, None], q)
        if self.symmetric:
            q = np.maximum(q, 0.0)
        blk["q"], blk["grad2"], blk["scale"], blk["count"] = q, g2, scale, count + 1
        return np.concatenate([np.zeros((r.size, 1)), q], axis=1)
