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
from monitors.conformal.scorecaster import gather, lag_table, solve_ridge

_HALF_PI = np.pi / 2


class ConformalPID(ScoreCalibrator):
    """Quantile tracker + saturating integrator + AR scorecaster over a (rows, horizon) table."""

    name = "conformal-pid"

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        lr: float = 0.05,
        scorecaster: str | None = "ar",
        order: int = 2,
        period: int = 24,
        forget: float = 0.995,
        ridge: float = 0.01,
        scale_decay: float = 0.05,
        mean_decay: float = 0.01,
        ki: float = 0.5,
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

    def _state_spec(self) -> dict:
        k, p, b = self.n_targets_, self.order, self.ring_size_
        return {
            "count": ((), 0, np.int64),  # residuals seen
            "mean": ((), 0.0, float),  # exponential mean of r (the scorecaster's intercept)
            "scale": ((), 0.0, float),  # exponential mean of |u|
            "p": ((k,), np.nan, float),  # P term; NaN = not started (read as the prior)
            "integral": ((k,), 0.0, float),  # sum(miss - a)
            "ring": ((b,), 0.0, float),  # last residuals, for the scorecaster's lags
            "xx": ((p, p), 0.0, float),  # forgotten sum of x x^T
            "xy": ((p,), 0.0, float),  # forgotten sum of x y
            "coef": ((p,), 0.0, float),
        }

    # -- pieces ---------------------------------------------------------------------------------------
    def _p(self, rows: np.ndarray) -> np.ndarray:
        p = self.p_[rows]
        return np.where(np.isnan(p), self.prior_, p)

    def _integral_term(self, integral: np.ndarray, count: np.ndarray) -> np.ndarray:
        if self.ki == 0.0:
            return np.zeros_like(integral)
        n = np.maximum(count, 1)[..., None].astype(float)
        arg = integral * np.log(n + 1) / (self.csat * (n + 1))
        # tan saturates: bounded to +-tan(1.4) ~ 5.8 so a pathological stream stays finite.
        return self.ki * np.tan(np.clip(arg, -1.4, 1.4))

    def _centre(self, rows: np.ndarray, count: np.ndarray, mean: np.ndarray, back: np.ndarray) -> np.ndarray:
        """Scorecaster forecast ``mean + coef . (x - mean)`` for lags ``back`` before the next residual."""
        if not self.order:
            return np.zeros_like(mean)
        x = gather(self.ring_, rows, count, back, mean) - mean[..., None]
        return mean + np.einsum("nhp,nhp->nh", self.coef_[rows], x)

    # -- interface ------------------------------------------------------------------------------------
    def _learn(self, rows: np.ndarray, r: np.ndarray, mask: np.ndarray) -> None:
        count, mean, scale = self.count_[rows], self.mean_[rows], self.scale_[rows]
        n_new = count + 1
        centre = self._centre(rows, count, mean, self.lags_)
        u = r - centre
        # P and I, on the score of u (normalised by the scale known before this residual).
        p, integral = self._p(rows), self.integral_[rows]
        s = self.scores(u)
        thr = p + self._integral_term(integral, count)
        if self.normalize:
            miss = s > thr * scale[..., None]
            step = self.lr
        else:
            miss = s > thr
            step = self.lr * scale[..., None]
        # The first residual of a cell was scored against no interval: it only sets the scale.
        err = np.where((count > 0)[..., None], miss - self.target_alpha_, 0.0)
        p = p + step * err
        integral = integral + err
        self._put("p", rows, p, mask)
        self._put("integral", rows, integral, mask)
        # Scale and intercept: running means first, exponential forgetting afterwards.
        rate_s = np.maximum(self.scale_decay, 1.0 / n_new)
        self._put("scale", rows, scale + rate_s * (np.abs(u) - scale), mask)
        rate_m = np.maximum(self.mean_decay, 1.0 / n_new)
        if self.order:
            x = gather(self.ring_, rows, count, self.lags_, mean) - mean[..., None]
            y = r - mean
            lam = self.forget
            xx = lam * self.xx_[rows] + x[..., :, None] * x[..., None, :]
            xy = lam * self.xy_[rows] + x * y[..., None]
            self._put("xx", rows, xx, mask)
            self._put("xy", rows, xy, mask)
            self._put("coef", rows, solve_ridge(xx, xy, self.ridge), mask)
            # Push r into each masked cell's ring at position count % B.
            pos = count % self.ring_size_
            hidx = np.broadcast_to(np.arange(self.horizon), count.shape)
            rr = np.broadcast_to(rows[:, None], count.shape)
            self.ring_[rr[mask], hidx[mask], pos[mask]] = r[mask]
        self._put("mean", rows, mean + rate_m * (r - mean), mask)
        self._put("count", rows, n_new, mask)

    def _offsets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count, mean, scale = self.count_[rows], self.mean_[rows], self.scale_[rows]
        centre = self._centre(rows, count, mean, self.lags_ - np.arange(self.horizon)[:, None])
        thr = self._p(rows) + self._integral_term(self.integral_[rows], count)
        if self.normalize:
            thr = thr * scale[..., None]
        # Before any residual: width 0 around the point forecast, never NaN.
        thr = np.where((count > 0)[..., None], thr, 0.0)
        return np.where(count > 0, centre, 0.0), thr

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
