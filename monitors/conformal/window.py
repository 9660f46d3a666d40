"""A ring of the last ``W`` residuals per (row, horizon) cell and the conformal quantile over it.

ACI, DtACI and SPCI read quantiles of past scores; the ring keeps the signed residuals (scores are derived per
target, so one ring serves both sides and every level). ``W`` bounds memory: rows x horizon x W floats. Cells
are addressed flat (``row * horizon + h``), the ring as a (cells, W) array.
"""

from __future__ import annotations

import numpy as np


def window_values(ring: np.ndarray, cells: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values (m, W) with NaN where unfilled, filled (m,))`` for cells that have stored ``count`` residuals."""
    size = ring.shape[-1]
    n = np.minimum(count, size)
    vals = ring[cells]
    vals[np.arange(size)[None, :] >= n[:, None]] = np.nan
    return vals, n


def conformal_quantile(sorted_scores: np.ndarray, n: np.ndarray, alpha: np.ndarray, clip: bool) -> np.ndarray:
    """The ``ceil((1 - alpha)(n + 1))``-th smallest of ``n`` scores, per cell and target.

    sorted_scores: (m, W, K) ascending with NaN last; n: (m,); alpha: (m, K). A rank above ``n`` (alpha at or
    below ``1/(n+1)``, e.g. ACI's alpha_t <= 0) is ``+inf``, or the largest score with ``clip``. A rank below 1
    (alpha_t >= 1) is the smallest score: the interval shrinks but stays a set. No score yet: ``+inf``
    (``0``, the point forecast, with ``clip``).

    >>> s = np.sort(np.arange(1.0, 11.0))[None, :, None]
    >>> conformal_quantile(s, np.array([10]), np.array([[0.2]]), clip=False)
    array([[9.]])
    """
    nn = n[:, None]
    rank = np.ceil((1.0 - alpha) * (nn + 1)).astype(np.int64)
    idx = np.clip(rank, 1, np.maximum(nn, 1)) - 1
    q = np.take_along_axis(sorted_scores, idx[:, None, :], axis=1)[:, 0, :]
    if not clip:
        q = np.where(rank > nn, np.inf, q)
    return np.where(nn > 0, q, 0.0 if clip else np.inf)
