"""MAPIE 1.6 ``TimeSeriesRegressor`` (EnbPI and ACI) as the external reference of bench/conformal.py.

MAPIE wants features and a model, not residuals. To run it on *the same* residual stream as every other method,
its estimator is a pass-through that predicts 0 from a dummy feature: MAPIE's conformity scores are then exactly
our residuals, and its interval is an interval for the residual. Quirks worked around (anchors.md):

* no multi-step: one ``TimeSeriesRegressor`` per horizon, fed only matured residuals (delay h);
* ``confidence_level`` must be a list for ``update``/``predict`` to agree on shapes; ``allow_infinite_bounds=True``
  is needed or ACI's alpha_t clipping hides its infinite intervals (MAPIE clips alpha_t to [0, 1] anyway);
* ``update`` warns on every call (suppressed here) and, since 1.x, only rolls the scores: ACI's alpha_t moves
  only in ``adapt_conformal_inference``, which re-predicts the current interval to score the new point;
* it keeps as many scores as it was fitted on, so it is fitted on the last ``window`` warm-up residuals
  (SPCI's EnbPI uses 300);
* the BlockBootstrap ensemble of pass-through models adds nothing but time; it is kept so the EnbPI code path
  (leave-one-out aggregation, ``ensemble=True``) is the one measured.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin


class PassThrough(RegressorMixin, BaseEstimator):
    """Predicts the first feature: with X = 0 MAPIE's conformity scores are the residuals themselves."""

    def fit(self, X, y):  # noqa: N803 - scikit-learn's signature
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def predict(self, X):  # noqa: N803
        return np.asarray(X, dtype=float)[:, 0]


def run_mapie(
    residuals: np.ndarray,
    n_warm: int,
    h: int,
    alpha: float,
    method: str,
    seed: int,
    gamma: float = 0.005,
    window: int = 300,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Intervals issued at steps ``n_warm ..`` for the h-step residual column; returns (lo, hi, seconds)."""
    from mapie.regression import TimeSeriesRegressor
    from mapie.subsample import BlockBootstrap

    col = residuals[:, h - 1]
    T = col.size
    warm = col[:n_warm]
    warm = warm[np.isfinite(warm)][-window:]  # MAPIE keeps as many scores as it was fitted on
    cv = BlockBootstrap(n_resamplings=25, n_blocks=10, overlapping=False, random_state=seed)
    reg = TimeSeriesRegressor(PassThrough(), method=method, cv=cv, agg_function="mean", random_state=seed)
    x0 = np.zeros((1, 1))
    lo = np.full(T, np.nan)
    hi = np.full(T, np.nan)
    level = [1 - alpha]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg.fit(np.zeros((warm.size, 1)), warm)
        start = time.perf_counter()
        for t in range(n_warm, T):
            if np.isfinite(col[t]):
                y = col[t : t + 1]
                if method == "aci":  # MAPIE's update() no longer adapts alpha_t; this call does (and clips it)
                    reg.adapt_conformal_inference(x0, y, gamma=gamma, confidence_level=level, ensemble=True)
                reg.update(x0, y, ensemble=True)
            _, pis = reg.predict(x0, ensemble=True, confidence_level=level, allow_infinite_bounds=True)
            lo[t], hi[t] = pis[0, 0, 0], pis[0, 1, 0]
        seconds = time.perf_counter() - start
    return lo, hi, seconds
