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

from tidecast.models.base import check_count
from tidecast.monitors.conformal.base import MAX_WINDOW, ScoreCalibrator


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
        check_count("lifetime", lifetime, high=MAX_WINDOW)
        check_count("slots", slots, low=2, high=MAX_WINDOW)  # one slot's expert is replaced every step: ~2 % coverage
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

    def _learn(self, blk, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        count = blk["count"].astype(np.int64)
        t = count + 1
        # Contiguous copies: the reductions over experts then run in the same order whatever the table layout,
        # so one table of many rows gives bit-identical results to one row per table.
        old = {k: np.ascontiguousarray(blk[k]) for k in ("born", "life", "age", "q", "grad2", "z", "wz")}
        born, life, age = (old[k].astype(np.int64) for k in ("born", "life", "age"))
        q, g2, z, wz = (old[k].copy() for k in ("q", "grad2", "z", "wz"))
        # 1. expire, 2. spawn a new expert at the current meta threshold.
        born = np.where(age > life, 0, born)
        # The first expert starts at the Gaussian prior on the cell's residual size, as the first interval
        # (below) did: at 0 every cell issued the point forecast itself until its experts walked out.
        init = np.where((born > 0).any(-1), self._meta(born, age, q, z, wz),
                        self.prior_per_scale_ * blk["scale"][:, None])
        remaining = np.where(born == 0, -1, life - age)
        slot = np.argmin(remaining, axis=-1)[..., None]  # a free slot (-1) first, else the one closest to expiry
        tt = np.broadcast_to(t[:, None, None], born.shape[:-1] + (1,))
        np.put_along_axis(born, slot, tt, -1)
        np.put_along_axis(life, slot, self.lifetime * 2 ** _two_adic(tt), -1)
        for arr in (age, g2, z, wz):
            np.put_along_axis(arr, slot, 0, -1)
        np.put_along_axis(q, slot, init[..., None], -1)
        # 3. coin-betting weights on the regret against the meta threshold.
        scale = np.maximum(blk["scale"], np.abs(r))
        s = self.scores(r)[..., None]
        a = self.target_alpha_[:, None]
        tau = 1 - a
        meta = self._meta(born, age, q, z, wz)[..., None]
        alive = born > 0
        norm = np.maximum(scale, 1e-300)[:, None, None] * np.sqrt(3) * np.maximum(a, tau)
        w = np.where(age > 0, z / np.maximum(age, 1) * (1 + wz), 0.0)
        g = np.clip((_pinball(s, meta, tau) - _pinball(s, q, tau)) / norm, -1.0 * (w > 0), 1.0)
        g = np.where(alive, g, 0.0)
        z, wz = z + g, wz + g * w
        age = age + alive
        # 4. each expert's SF-OGD step.
        grad = np.where(alive, a - (s > q), 0.0)
        g2 = g2 + grad**2
        q = q - scale[:, None, None] * grad / np.sqrt(np.where(g2 > 0, g2, 1.0))
        if self.symmetric:
            q = np.maximum(q, 0.0)
        started = (count > 0)[:, None, None]  # the first residual only sets the scale
        new = {"born": born, "life": life, "age": age, "q": q, "grad2": g2, "z": z, "wz": wz}
        for name, val in new.items():
            new[name] = np.where(started, val, old[name])
            blk[name] = new[name]
        blk["scale"], blk["count"] = scale, t
        thr = self._meta(new["born"], new["age"], new["q"], new["z"], new["wz"])
        thr = np.where(started[..., 0], thr, self.prior_per_scale_ * scale[:, None])  # no expert yet
        return np.concatenate([np.zeros((r.size, 1)), thr], axis=1)
