"""Conformal PID control (Angelopoulos, Candès & Tibshirani, NeurIPS 2023), vectorised over (row, horizon).

Per cell and per target (side x level, see :class:`~monitors.conformal.base.ScoreCalibrator`) the threshold is

    q_t = c_t + scale_t * (p_t + r_t)

* **scorecaster** ``c_t``: a direct-AR forecast of the residual (:mod:`monitors.conformal.scorecaster`); the
  controller then works on ``u = r - c``, which is far less predictable than ``r`` on autocorrelated errors.
* **P** ``p_t``: online gradient descent on the pinball loss, ``p <- p + lr * (miss - a)``, the quantile tracker.
* **I** ``r_t = K_I tan(I_t log(n) / (C_sat n))``: a saturating integrator of the coverage error
  ``I_t = sum(miss - a)``; it grows without bound only if coverage drifts, so long-run coverage is pinned.
* ``scale_t``: an exponential mean of ``|u|``. With ``normalize=True`` (default) P and I run on ``u / scale``, so
  a variance jump widens the interval at once instead of after the tracker walks; with ``normalize=False`` they
  run in residual units with the step ``lr * scale`` (the paper's adaptive learning rate).

Exponential averages use the rate ``max(decay, 1/n)`` so a new cell starts from the running mean of what it has
seen: the first intervals are finite and the transient settles within a few dozen residuals. Before the first
residual an interval is the point forecast itself (width 0, never NaN or infinite).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> e = np.zeros(6000)
>>> for t in range(1, 6000):
...     e[t] = 0.9 * e[t - 1] + rng.normal(scale=0.3)
>>> cal = ConformalPID(horizon=1, alpha=0.1)
>>> rows, covered, width = np.array([0]), [], []
>>> for t in range(6000):
...     lo, hi = cal.interval(rows, np.zeros((1, 1)))
...     covered.append(lo[0, 0] <= e[t] <= hi[0, 0]); width.append(hi[0, 0] - lo[0, 0])
...     cal.update(rows, e[t : t + 1].reshape(1, 1), np.ones((1, 1), bool))
>>> bool(abs(np.mean(covered[1000:]) - 0.9) < 0.02), bool(np.mean(width[1000:]) < 1.2)  # oracle 0.99
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monitors.conformal.base import ScoreCalibrator, gaussian_quantile
from monitors.conformal.scorecaster import lag_table, solve_ridge


class ConformalPID(ScoreCalibrator):
    """Quantile tracker + saturating integrator + AR scorecaster over a (rows, horizon) table."""

    name = "conformal-pid"

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        lr: float = 0.05,
        scorecaster: str | None = "ar",
        order: int = 1,
        period: int = 24,
        forget: float = 0.995,
        ridge: float = 0.01,
        scale_decay: float = 0.05,
        mean_decay: float = 0.01,
        ki: float = 0.0,
        csat: float = 5.0,
        normalize: bool = True,
        symmetric: bool = False,
    ) -> None:
        self.lr = lr
        self.scorecaster = scorecaster
        self.order = order if scorecaster else 0
        self.period = period
        self.forget = forget
        self.ridge = ridge
        self.scale_decay = scale_decay
        self.mean_decay = mean_decay
        self.ki = ki
        self.csat = csat
        self.normalize = normalize
        self.lags_ = lag_table(horizon, scorecaster, order, period) if scorecaster else np.zeros((horizon, 0), int)
        self.ring_size_ = int(self.lags_.max()) if self.lags_.size else 0
        super().__init__(horizon, alpha, symmetric)
        # Prior thresholds in units of mean |u|: the Gaussian quantile over E|Z| = sqrt(2/pi).
        prior = gaussian_quantile(1 - self.target_alpha_) * np.sqrt(np.pi / 2)
        self.prior_ = prior if normalize else np.zeros_like(prior)

    _separate = ("ring",)

    def _state_spec(self) -> dict:
        k, p, b = self.n_targets_, self.order, self.ring_size_
        return {
            "count": ((), 0, np.int64),  # residuals seen
            "mean": ((), 0.0, float),  # exponential mean of r (the scorecaster's intercept)
            "scale": ((), 0.0, float),  # exponential mean of |u|
            "p": ((k,), np.nan, float),  # P term; NaN = not started (read as the prior)
            "integral": ((k,), 0.0, float),  # sum(miss - a)
            "xx": ((p, p), 0.0, float),  # forgotten sum of x x^T
            "xy": ((p,), 0.0, float),  # forgotten sum of x y
            "coef": ((p,), 0.0, float),
            "ring": ((b,), 0.0, float),  # last residuals, for the scorecaster's lags
        }

    def _integral_term(self, integral: np.ndarray, count: np.ndarray) -> np.ndarray:
        if self.ki == 0.0:
            return 0.0
        n = np.maximum(count, 1.0)[:, None]
        arg = integral * np.log(n + 1) / (self.csat * (n + 1))
        # tan saturates: bounded to +-tan(1.4) ~ 5.8 so a pathological stream stays finite.
        return self.ki * np.tan(np.clip(arg, -1.4, 1.4))

    def _lagged(self, cells: np.ndarray, count: np.ndarray, back: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Residuals ``back`` (m, p) steps before the next one, centred on ``mean``; 0 where not seen yet."""
        size = self.ring_size_
        flat_idx = cells[:, None] * size + (count[:, None] - back) % size
        x = np.take(self.ring_.reshape(-1), flat_idx) - mean[:, None]
        return np.where(count[:, None] >= back, x, 0.0)

    def _learn(self, blk, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        count = blk["count"].astype(np.int64)
        mean, scale = blk["mean"], blk["scale"]
        if self.order:
            lags = self.lags_[h]
            x = self._lagged(cells, count, lags, mean)
            u = r - mean - np.einsum("mp,mp->m", blk["coef"], x)
        else:
            u = r
        # P and I, on the score of u (normalised by the scale known before this residual).
        p = blk["p"]
        p = np.where(np.isnan(p), self.prior_, p)
        integral = blk["integral"]
        s = self.scores(u)
        thr = p + self._integral_term(integral, count)
        if self.normalize:
            miss = s > thr * scale[:, None]
            step = self.lr
        else:
            miss = s > thr
            step = self.lr * scale[:, None]
        # The first residual of a cell was scored against no interval: it only sets the scale.
        err = (miss - self.target_alpha_) * (count > 0)[:, None]
        p = p + step * err
        integral = integral + err
        n_new = count + 1
        # Scale and intercept: running means first, exponential forgetting afterwards.
        scale = scale + np.maximum(self.scale_decay, 1.0 / n_new) * (np.abs(u) - scale)
        if self.order:
            y = r - mean
            xx = self.forget * blk["xx"] + x[:, :, None] * x[:, None, :]
            xy = self.forget * blk["xy"] + x * y[:, None]
            coef = solve_ridge(xx, xy, self.ridge)
            self.flat("ring")[cells, count % self.ring_size_] = r
            blk["xx"], blk["xy"], blk["coef"] = xx, xy, coef
        mean = mean + np.maximum(self.mean_decay, 1.0 / n_new) * (r - mean)
        blk["p"], blk["integral"], blk["scale"], blk["mean"], blk["count"] = p, integral, scale, mean, n_new
        # Offsets for the forecast issued now (its target is h steps ahead: lags shift by h - 1).
        if self.order:
            xn = self._lagged(cells, n_new, lags - h[:, None], mean)
            centre = mean + np.einsum("mp,mp->m", coef, xn)
        else:
            centre = np.zeros_like(r)
        thr = p + self._integral_term(integral, n_new)
        if self.normalize:
            thr = thr * scale[:, None]
        return np.concatenate([centre[:, None], thr], axis=1)

    def get_params(self) -> dict:
        return {
            **super().get_params(),
            "lr": self.lr,
            "scorecaster": self.scorecaster,
            "order": self.order,
            "period": self.period,
            "forget": self.forget,
            "ridge": self.ridge,
            "scale_decay": self.scale_decay,
            "mean_decay": self.mean_decay,
            "ki": self.ki,
            "csat": self.csat,
            "normalize": self.normalize,
        }
