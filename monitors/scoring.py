"""Prequential (test-then-train) scoring of point forecasts and intervals, per series row and horizon.

Every forecast is scored once, when its target value arrives — before the model learns from that value — so the
numbers are honest out-of-sample errors, as in river's ``evaluate.iter_evaluate``. Sums are kept per
(row, horizon) cell, so one series' totals move with its checkpointed state and the run's totals are the same
whatever order series arrive in (they are summed in series-id order at the end).

The interval (Winkler) score of ``[l, u]`` at miscoverage ``alpha`` for outcome ``y`` is
``(u - l) + (2/alpha) * (l - y) * 1{y < l} + (2/alpha) * (y - u) * 1{y > u}`` (Gneiting & Raftery 2007): lower is
better, and it rewards narrow intervals only while they keep their coverage.

>>> import numpy as np
>>> s = PrequentialScorer(horizon=1, alpha=0.1)
>>> s.resize(1)
>>> s.update(np.array([0]), np.array([1.0]), np.array([[0.5]]), np.array([[0.0]]), np.array([[2.0]]),
...          np.array([[True]]))
>>> summary = s.summary(np.array([0]))
>>> summary["mae"], summary["coverage"], summary["mean_width"]
(0.5, 1.0, 2.0)
"""

from __future__ import annotations

import numpy as np

from tidecast.monitors.conformal.base import ArrayDict, grow

_SUMS = ("count", "abs_err", "sq_err", "covered", "width", "interval_score", "issued")


class PrequentialScorer:
    """Per-(row, horizon) running sums plus run-wide rolling coverage and width per horizon."""

    def __init__(self, horizon: int, alpha: float, window: int = 1000) -> None:
        self.horizon = horizon
        self.alpha = alpha
        self.window = window
        self.sums_ = np.zeros((0, len(_SUMS), horizon))  # (rows, statistic, horizon), statistics as in _SUMS
        # Rolling (exponentially weighted, ~``window`` scored forecasts) coverage and width per horizon.
        self.rolling_coverage_ = np.full(horizon, np.nan)
        self.rolling_width_ = np.full(horizon, np.nan)

    def resize(self, n_rows: int) -> None:
        self.sums_ = grow(self.sums_, n_rows, 0.0)

    def update(
        self,
        rows: np.ndarray,
        y: np.ndarray,
        mean: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        mask: np.ndarray,
    ) -> None:
        """Score matured forecasts: ``y`` has shape (n,), the others (n, horizon); ``mask`` marks real cells."""
        if not mask.any():
            return
        yy = y[:, None]
        err = np.where(mask, yy - mean, 0.0)
        covered = mask & (lower <= yy) & (yy <= upper)
        with np.errstate(invalid="ignore"):  # unmatured cells hold NaN; they are masked out
            width = np.where(mask, upper - lower, 0.0)
            penalty = (2.0 / self.alpha) * (np.maximum(lower - yy, 0.0) + np.maximum(yy - upper, 0.0))
            score = np.where(mask, width + penalty, 0.0)
        self.sums_[rows, :-1] += np.stack((mask, np.abs(err), err * err, covered, width, score), axis=1)
        self._roll(mask, covered, width)

    def _roll(self, mask: np.ndarray, covered: np.ndarray, width: np.ndarray) -> None:
        n = mask.sum(axis=0)
        seen = n > 0
        if not seen.any():
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            cov_now = covered.sum(axis=0) / n
            width_now = width.sum(axis=0) / n
        weight = 1.0 - (1.0 - 1.0 / self.window) ** n  # n updates of an EWMA with step 1/window
        for rolling, now in ((self.rolling_coverage_, cov_now), (self.rolling_width_, width_now)):
            fresh = seen & np.isnan(rolling)
            rolling[fresh] = now[fresh]
            old = seen & ~fresh
            rolling[old] += weight[old] * (now[old] - rolling[old])

    def issued(self, rows: np.ndarray, ready: np.ndarray) -> None:
        """Count forecast steps issued (``ready``: (n, horizon) bool, False during warm-up)."""
        self.sums_[rows, -1] += ready

    # -- reading ----------------------------------------------------------------------------------
    def totals(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Per-horizon sums over ``rows`` (pass rows in a fixed order for reproducible floating point)."""
        sums = self.sums_[rows].sum(axis=0)
        return {name: sums[i] for i, name in enumerate(_SUMS)}

    def summary(self, rows: np.ndarray) -> dict:
        """MAE, RMSE, coverage, mean width and interval score overall and by horizon."""
        t = self.totals(rows)
        by_horizon = {str(h + 1): _metrics({k: v[h] for k, v in t.items()}) for h in range(self.horizon)}
        return {**_metrics({k: v.sum() for k, v in t.items()}), "by_horizon": by_horizon}

    # -- state ------------------------------------------------------------------------------------
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return {"sums": self.sums_[rows].copy()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.resize(int(rows.max()) + 1 if len(rows) else 0)
        self.sums_[rows] = state["sums"]


def _metrics(t: dict[str, float]) -> dict:
    n = float(t["count"])
    if n == 0:
        return {"n_forecasts": int(t["issued"]), "n_scored": 0, "mae": None, "rmse": None, "coverage": None,
                "mean_width": None, "interval_score": None}
    return {
        "n_forecasts": int(t["issued"]),
        "n_scored": int(n),
        "mae": float(t["abs_err"] / n),
        "rmse": float(np.sqrt(t["sq_err"] / n)),
        "coverage": float(t["covered"] / n),
        "mean_width": float(t["width"] / n),
        "interval_score": float(t["interval_score"] / n),
    }
