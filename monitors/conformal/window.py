"""A ring of the last ``W`` residuals per (row, horizon) cell and the conformal quantile over it.

ACI, DtACI and SPCI read quantiles of past scores; the ring keeps the signed residuals (scores are derived per
target, so one ring serves both sides and every level). ``W`` bounds memory: rows x horizon x W floats.
"""

from __future__ import annotations

import numpy as np


def push(ring: np.ndarray, count: np.ndarray, rows: np.ndarray, r: np.ndarray, mask: np.ndarray) -> None:
    """Write ``r`` (n, H) at each masked cell's position ``count % W`` (``count`` is read, not advanced)."""
    size = ring.shape[-1]
    pos = count[rows] % size
    hidx = np.broadcast_to(np.arange(ring.shape[1]), pos.shape)
    rr = np.broadcast_to(rows[:, None], pos.shape)
    ring[rr[mask], hidx[mask], pos[mask]] = r[mask]


def filled(ring: np.ndarray, count: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values (n, H, W) with NaN where unfilled, m (n, H) = number filled)``."""
    size = ring.shape[-1]
    m = np.minimum(count[rows], size)
    vals = ring[rows].copy()
    vals[np.arange(size)[None, None, :] >= m[..., None]] = np.nan
    return vals, m


def conformal_quantile(
    sorted_scores: np.ndarray, m: np.ndarray, alpha: np.ndarray, clip: bool
) -> np.ndarray:
    """The ``ceil((1 - alpha)(m + 1))``-th smallest of ``m`` scores, per cell and target.

    sorted_scores: (n, H, W, K) ascending with NaN last; m: (n, H); alpha: (n, H, K). A rank above ``m`` (alpha
    at or below ``1/(m+1)``, e.g. ACI's alpha_t <= 0) is ``+inf``, or the largest score with ``clip``. A rank
    below 1 (alpha_t >= 1) is the smallest score: the interval shrinks but stays a set.
    """
    mm = m[..., None]
    rank = np.ceil((1.0 - alpha) * (mm + 1)).astype(np.int64)
    over = rank > mm
    idx = np.clip(rank, 1, np.maximum(mm, 1)) - 1
    q = np.take_along_axis(sorted_scores, idx[..., None, :], axis=2)[..., 0, :]
    q = np.where(mm > 0, q, np.inf)
    if not clip:
        q = np.where(over, np.inf, q)
    return q
