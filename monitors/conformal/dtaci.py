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

from tidecast.models.base import check_count, check_rate
from tidecast.monitors.conformal.aci import ACI
from tidecast.monitors.conformal.window import window_values


def _pinball(y: np.ndarray, yhat: np.ndarray, q: np.ndarray) -> np.ndarray:
    d = y - yhat
    return np.maximum(q * d, (q - 1) * d)


class DtACI(ACI):
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
        if not len(gammas):
            raise ValueError("gammas: at least one learning rate")
        for gamma in gammas:
            check_rate("gammas", gamma)
        check_count("interval_length", interval_length)
        self.gammas = tuple(float(g) for g in gammas)
        self.interval_length = interval_length
        super().__init__(horizon, alpha, window=window, clip=clip, symmetric=symmetric)
        a, n_exp, i_len = self.target_alpha_, len(self.gammas), interval_length
        denom = ((1 - a) ** 2 * a**3 + a**2 * (1 - a) ** 3) / 3
        self.eta_ = np.sqrt(3 / i_len) * np.sqrt((np.log(i_len * n_exp) + 2) / denom)
        self.sigma_ = 1 / (2 * i_len)

    def _state_spec(self) -> dict:
        e = len(self.gammas)
        return {
            "count": ((), 0, np.int64),
            "alpha_k": ((self.n_targets_, e), np.nan, float),
            "logw": ((self.n_targets_, e), 0.0, float),
            "ring": ((self.window,), 0.0, float),
        }

    def _learn(self, blk, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        count = blk["count"].astype(np.int64)
        vals, n = window_values(self.flat("ring"), cells, count)
        past = self.scores(vals)  # (m, W, K), NaN where unfilled
        s = self.scores(r)
        started = (n > 0)[:, None]
        beta = np.where(started, (past >= s[:, None, :]).sum(1) / np.maximum(n, 1)[:, None], 0.0)
        alpha_k = blk["alpha_k"]
        a = self.target_alpha_[:, None]
        alpha_k = np.where(np.isnan(alpha_k), a, alpha_k)
        logw = blk["logw"] - self.eta_[:, None] * _pinball(beta[..., None], alpha_k, a)
        w = np.exp(logw - logw.max(-1, keepdims=True))
        w = (1 - self.sigma_) * w / w.sum(-1, keepdims=True) + self.sigma_ / w.shape[-1]
        new_k = alpha_k + np.asarray(self.gammas) * (a - (alpha_k > beta[..., None]))
        if self.clip:
            new_k = np.clip(new_k, 0.0, 1.0)
        go = started[..., None]
        alpha_k = np.where(go, new_k, alpha_k)
        logw = np.where(go, np.log(w), blk["logw"])
        self.flat("ring")[cells, count % self.window] = r
        blk["alpha_k"], blk["logw"], blk["count"] = alpha_k, logw, count + 1
        p = np.exp(logw - logw.max(-1, keepdims=True))
        alpha_t = (p * alpha_k).sum(-1) / p.sum(-1)
        q = self._quantile(cells, count + 1, alpha_t)
        return np.concatenate([np.zeros((r.size, 1)), q], axis=1)
