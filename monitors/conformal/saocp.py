"""Strongly adaptive online conformal prediction (SAOCP; Bhatnagar, Wang, Xiong & Bai, ICML 2023), vectorised
over (row, horizon, target) with a fixed number of expert slots per cell.

Every step a new SF-OGD expert is born (started at the current meta threshold) and lives ``g * 2^u`` steps,
``u`` the number of times 2 divides its birth time (the geometric covering of Hazan & Seshadhri). Experts are
mixed by coin betting (Jun et al. 2017, CBCE): weight ``w = z / age * (1 + wz)`` on the normalised regret
against the meta threshold, prior ``1 / (t^2 (1 + floor(log2 t)))`` at birth time ``t``. About ``g/2`` experts
per doubling of time are alive, so ``slots = 72`` covers ~ 2^17 steps; past that the expert closest to expiry
is replaced. Strong local coverage, but it can under-cover.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monitors.conformal.base import ScoreCalibrator


def _pinball(s: np.ndarray, q: np.ndarray, tau: np.ndarray) -> np.ndarray:
    d = s - q
    return np.maximum(tau * d, (tau - 1) * d)


def _two_adic(t: np.ndarray) -> np.ndarray:
    """Largest u with 2^u dividing t (t >= 1)."""
    return np.log2(t & -t).astype(np.int64)


class SAOCP(ScoreCalibrator):
    name = "saocp"

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        lifetime: int = 8,
        slots: int = 72,
        symmetric: bool = False,
    ) -> None:
        self.lifetime = lifetime
        self.slots = slots
        super().__init__(horizon, alpha, symmetric)

    def _state_spec(self) -> dict:
        ke = (self.n_targets_, self.slots)
        return {
            "count": ((), 0, np.int64),
            "scale": ((), 0.0, float),
            "born": (ke, 0, np.int64),  # 0 = free slot
            "life": (ke, 0, np.int64),
            "age": (ke, 0, np.int64),
            "q": (ke, 0.0, float),
            "grad2": (ke, 0.0, float),
            "z": (ke, 0.0, float),
            "wz": (ke, 0.0, float),
        }

    @staticmethod
    def _weights(born: np.ndarray, age: np.ndarray, z: np.ndarray, wz: np.ndarray) -> np.ndarray:
        alive = born > 0
        t = np.maximum(born, 1).astype(float)
        prior = np.where(alive, 1.0 / (t**2 * (1 + np.floor(np.log2(t)))), 0.0)
        prior = prior / np.maximum(prior.sum(-1, keepdims=True), 1e-300)
        w = np.where(age > 0, z / np.maximum(age, 1) * (1 + wz), 0.0)
        p = prior * np.maximum(w, 0.0)
        total = p.sum(-1, keepdims=True)
        return np.where(total > 0, p / np.where(total > 0, total, 1.0), prior)

    def _meta(self, born, age, q, z, wz) -> np.ndarray:
        return (self._weights(born, age, z, wz) * q).sum(-1)

    def _learn(self, rows: np.ndarray, r: np.ndarray, mask: np.ndarray) -> None:
        count = self.count_[rows]
        t = count + 1
        born, life, age = self.born_[rows], self.life_[rows], self.age_[rows]
        q, g2, z, wz = self.q_[rows], self.grad2_[rows], self.z_[rows], self.wz_[rows]
        # 1. expire, 2. spawn a new expert at the current meta threshold.
        born = np.where(age > life, 0, born)
        init = self._meta(born, age, q, z, wz)
        free = born == 0
        remaining = np.where(free, -1, life - age)
        slot = np.argmin(remaining, axis=-1)[..., None]  # a free slot (-1) first, else the one closest to expiry
        tt = np.broadcast_to(t[..., None, None], born.shape[:-1] + (1,))
        np.put_along_axis(born, slot, tt, -1)
        np.put_along_axis(life, slot, self.lifetime * 2 ** _two_adic(tt), -1)
        for arr, val in ((age, 0), (g2, 0.0), (z, 0.0), (wz, 0.0)):
            np.put_along_axis(arr, slot, val, -1)
        np.put_along_axis(q, slot, init[..., None], -1)
        # 3. coin-betting weights on the regret against the meta threshold.
        scale = np.maximum(self.scale_[rows], np.abs(r))
        s = self.scores(r)[..., None]
        a = self.target_alpha_[:, None]
        tau = 1 - a
        meta = self._meta(born, age, q, z, wz)[..., None]
        alive = born > 0
        norm = np.maximum(scale, 1e-300)[..., None, None] * np.sqrt(3) * np.maximum(a, tau)
        w = np.where(age > 0, z / np.maximum(age, 1) * (1 + wz), 0.0)
        g = np.clip((_pinball(s, meta, tau) - _pinball(s, q, tau)) / norm, -1.0 * (w > 0), 1.0)
        g = np.where(alive, g, 0.0)
        z, wz = z + g, wz + g * w
        age = age + alive
        # 4. each expert's SF-OGD step.
        grad = np.where(alive, a - (s > q), 0.0)
        g2 = g2 + grad**2
        q = q - np.where(g2 > 0, scale[..., None, None] * grad / np.sqrt(np.maximum(g2, 1e-300)), 0.0)
        if self.symmetric:
            q = np.maximum(q, 0.0)
        started = mask & (count > 0)  # the first residual only sets the scale
        for name, val in (("born", born), ("life", life), ("age", age), ("q", q), ("grad2", g2), ("z", z),
                          ("wz", wz)):
            self._put(name, rows, val, started)
        self._put("scale", rows, scale, mask)
        self._put("count", rows, t, mask)

    def _offsets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = self._meta(self.born_[rows], self.age_[rows], self.q_[rows], self.z_[rows], self.wz_[rows])
        return np.zeros(q.shape[:2]), q

    def get_params(self) -> dict:
        return {**super().get_params(), "lifetime": self.lifetime, "slots": self.slots}
