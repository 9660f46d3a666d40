"""Dynamically-tuned ACI (Gibbs & Candès, "Conformal inference for online prediction with arbitrary distribution
shifts", JMLR 2024 / arXiv 2208.08401), vectorised over (row, horizon, target).

Eight ACI experts with ``gamma_k = 0.001 * 2^k`` run side by side; exponential weights on the pinball loss of
each expert's level against the realised level ``beta_t`` (the share of past scores at or above the new one),
mixed with a uniform floor ``sigma = 1 / (2I)``, pick the level ``alpha_t = sum_k w_k alpha_k``. ``eta`` and
``sigma`` follow the paper's suggested values for an interval length ``I = 100``. Like ACI it may emit infinite
intervals (``alpha_t <= 0``) unless ``clip=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monitors.conformal.base import ScoreCalibrator
from monitors.conformal.window import conformal_quantile, filled, push


def _pinball(y: np.ndarray, yhat: np.ndarray, q: np.ndarray) -> np.ndarray:
    d = y - yhat
    return np.maximum(q * d, (q - 1) * d)


class DtACI(ScoreCalibrator):
    name = "dtaci"

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        gammas: Sequence[float] = tuple(0.001 * 2**k for k in range(8)),
        interval_length: int = 100,
        window: int = 500,
        clip: bool = False,
        symmetric: bool = False,
    ) -> None:
        self.gammas = tuple(float(g) for g in gammas)
        self.interval_length = interval_length
        self.window = window
        self.clip = clip
        super().__init__(horizon, alpha, symmetric)
        a, n_exp, i_len = self.target_alpha_, len(self.gammas), interval_length
        denom = ((1 - a) ** 2 * a**3 + a**2 * (1 - a) ** 3) / 3
        self.eta_ = np.sqrt(3 / i_len) * np.sqrt((np.log(i_len * n_exp) + 2) / denom)
        self.sigma_ = 1 / (2 * i_len)

    def _state_spec(self) -> dict:
        e = len(self.gammas)
        return {
            "count": ((), 0, np.int64),
            "ring": ((self.window,), 0.0, float),
            "alpha_k": ((self.n_targets_, e), np.nan, float),
            "logw": ((self.n_targets_, e), 0.0, float),
        }

    def _experts(self, rows: np.ndarray) -> np.ndarray:
        a = self.alpha_k_[rows]
        return np.where(np.isnan(a), self.target_alpha_[:, None], a)

    def _alpha_t(self, rows: np.ndarray, alpha_k: np.ndarray) -> np.ndarray:
        logw = self.logw_[rows]
        w = np.exp(logw - logw.max(-1, keepdims=True))
        return (w * alpha_k).sum(-1) / w.sum(-1)

    def _learn(self, rows: np.ndarray, r: np.ndarray, mask: np.ndarray) -> None:
        vals, m = filled(self.ring_, self.count_, rows)
        past = self.scores(vals)  # (n, H, W, K), NaN where unfilled
        s = self.scores(r)
        started = (m > 0)[..., None]
        beta = np.where(started, (past >= s[:, :, None, :]).sum(2) / np.maximum(m, 1)[..., None], 0.0)
        alpha_k = self._experts(rows)
        a = self.target_alpha_[:, None]
        losses = _pinball(beta[..., None], alpha_k, a)
        logw = self.logw_[rows] - self.eta_[:, None] * losses
        w = np.exp(logw - logw.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        w = (1 - self.sigma_) * w + self.sigma_ / w.shape[-1]
        miss = alpha_k > beta[..., None]
        alpha_k = alpha_k + np.asarray(self.gammas) * (a - miss)
        if self.clip:
            alpha_k = np.clip(alpha_k, 0.0, 1.0)
        keep = mask & (m > 0)
        self._put("alpha_k", rows, alpha_k, keep)
        self._put("logw", rows, np.log(w), keep)
        push(self.ring_, self.count_, rows, r, mask)
        self._put("count", rows, self.count_[rows] + 1, mask)

    def _offsets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alpha_t = self._alpha_t(rows, self._experts(rows))
        vals, m = filled(self.ring_, self.count_, rows)
        q = conformal_quantile(np.sort(self.scores(vals), axis=2), m, alpha_t, self.clip)
        if self.clip:
            q = np.where((m > 0)[..., None], q, 0.0)
        return np.zeros(q.shape[:2]), q

    def get_params(self) -> dict:
        return {**super().get_params(), "gammas": list(self.gammas), "interval_length": self.interval_length,
                "window": self.window, "clip": self.clip}
