"""Scorecaster: a per-cell linear forecast of the next matured residual from the residuals already seen.

In conformal PID control (Angelopoulos, Candès & Tibshirani, NeurIPS 2023) the scorecaster forecasts the next
score so the controller only has to learn what is left. With the two one-sided scores ``r`` and ``-r``, a linear
forecast of both is a forecast ``c`` of the signed residual itself, so the interval is re-centred on ``c`` and
the quantile learners see ``u = r - c``.

The h-step cell only ever knows residuals up to h steps before the target it calibrates (delayed feedback), so
the regression is *direct*: the residual at cell time ``s`` is regressed on those at ``s - l`` for lags
``l >= h`` (``"ar"``: ``h .. h+order-1``; ``"seasonal"``: ``P*ceil(h/P) + j``). Coefficients come from
exponentially forgotten least squares with a ridge relative to the data's own scale, on residuals centred by an
exponential mean (so the intercept tracks a bias). :class:`~tidecast.monitors.conformal.pid.ConformalPID` keeps the
lagged
residuals in its per-cell ring and ``(order x order)`` sufficient statistics per cell: O(order^2) per update.
"""

from __future__ import annotations

import numpy as np


def lag_table(horizon: int, kind: str, order: int, period: int) -> np.ndarray:
    """``(horizon, order)`` lags, counted back from the target, that the h-step scorecaster regresses on."""
    h = np.arange(1, horizon + 1)[:, None]
    j = np.arange(order)[None, :]
    if kind == "ar":
        return h + j
    if kind == "seasonal":
        return period * np.ceil(h / period).astype(int) + j
    raise ValueError(f"unknown scorecaster {kind!r}; use 'ar', 'seasonal' or None")


def solve_ridge(a: np.ndarray, b: np.ndarray, ridge: float) -> np.ndarray:
    """Batched ``(A + ridge * mean(diag A) * I)^-1 b`` for A (..., p, p), b (..., p); closed form for p <= 2."""
    p = b.shape[-1]
    diag = np.einsum("...ii->...i", a)
    lam = ridge * diag.mean(-1) + 1e-12
    if p == 1:
        return b / (a[..., 0] + lam[..., None])
    if p == 2:
        a00, a01, a11 = a[..., 0, 0] + lam, a[..., 0, 1], a[..., 1, 1] + lam
        det = a00 * a11 - a01 * a01
        return np.stack([a11 * b[..., 0] - a01 * b[..., 1], a00 * b[..., 1] - a01 * b[..., 0]], -1) / det[..., None]
    eye = np.eye(p)
    return np.linalg.solve(a + lam[..., None, None] * eye, b[..., None])[..., 0]
