"""Prequential (test-then-train) scoring of point forecasts and intervals, per series row and horizon.

Every forecast is scored once, when its target value arrives — before the model learns from that value — so the
numbers are honest out-of-sample errors, as in river's ``evaluate.iter_evaluate``. Sums are kept per
(row, horizon) cell, so one series' totals move with its checkpointed state and the run's totals are the same
whatever order series arrive in (they are summed in series-id order at the end).

The interval (Winkler) score of ``[l, u]`` at miscoverage ``alpha`` for outcome ``y`` is
``(u - l) + (2/alpha) * (l - y) * 1{y < l} + (2/alpha) * (y - u) * 1{y > u}`` (Gneiting & Raftery 2007): lower is
better, and it rewards narrow intervals only while they keep their coverage.

A forecast step issued before its calibrator had data carries no interval (``NaN`` bounds). It still counts: as a
miss in coverage (an interval that was not given did not cover), and in ``n_no_interval``; widths and interval
scores are means over the steps that had one.

Every number stays finite, so a summary is always strict JSON. An infinite interval (ACI's answer after a run of
misses) covers, and is counted in ``n_infinite_interval``; ``mean_width`` and ``interval_score`` are means over
the steps with a *finite* interval (an infinite width would make both infinite for the rest of the run). Errors
enter the sums clipped to ``+-MAX_ERROR`` (1e100), so one absurd value (``1e308``) cannot turn MAE and RMSE into
``inf`` for good; it still dominates them, as it should.

>>> import numpy as np
>>> s = PrequentialScorer(horizon=1, alpha=0.1)
>>> s.resize(1)
>>> s.update(np.array([0]), np.array([1.0]), np.array([[0.5]]), np.array([[0.0]]), np.array([[2.0]]),
...          np.array([[True]]))
>>> summary = s.summary(np.array([0]))
>>> summary["mae"], summary["coverage"], summary["mean_width"]
(0.5, 1.0, 2.0)
>>> s.update(np.array([0]), np.array([1.0]), np.array([[0.5]]), np.array([[np.nan]]), np.array([[np.nan]]),
...          np.array([[True]]))
>>> summary = s.summary(np.array([0]))
>>> summary["n_scored"], summary["n_no_interval"], summary["coverage"], summary["mean_width"]
(2, 1, 0.5, 2.0)
"""

from __future__ import annotations

import numpy as np

from tidecast.models.rows import ArrayDict, Column, Field, RowTable

_SUMS = ("count", "abs_err", "sq_err", "covered", "width", "interval_score", "issued")

#: Errors and interval-score penalties enter the sums clipped to this magnitude (their squares stay finite).
MAX_ERROR = 1e100


class PrequentialScorer:
    """Per-(row, horizon) running sums plus run-wide rolling coverage and width per horizon."""

    sums_ = Column("sums")  # (rows, statistic, horizon), statistics as in _SUMS
    no_interval_ = Column("no_interval")  # (rows, horizon): scored steps that had no interval
    infinite_ = Column("infinite")  # (rows, horizon): scored steps whose interval was infinite

    def __init__(self, horizon: int, alpha: float, window: int = 1000) -> None:
        self.horizon = horizon
        self.alpha = alpha
        self.window = window
        self.table_ = RowTable(sums=Field((len(_SUMS), horizon), np.float64, 0.0),
                               no_interval=Field((horizon,), np.float64, 0.0),
                               infinite=Field((horizon,), np.float64, 0.0))
        # Rolling (exponentially weighted, ~``window`` scored forecasts) coverage and width per horizon.
        self.rolling_coverage_ = np.full(horizon, np.nan)
        self.rolling_width_ = np.full(horizon, np.nan)

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    def update(
        self,
        rows: np.ndarray,
        y: np.ndarray,
        mean: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        mask: np.ndarray,
    ) -> None:
        """Score matured forecasts: ``y`` has shape (n,), the others (n, horizon); ``mask`` marks real cells.
        ``NaN`` bounds mean the step was issued without an interval."""
        if not mask.any():
            return
        yy = y[:, None]
        with np.errstate(invalid="ignore", over="ignore"):  # unmatured cells and steps without an interval: masked
            err = np.clip(np.where(mask, yy - mean, 0.0), -MAX_ERROR, MAX_ERROR)
            has = mask & ~np.isnan(lower) & ~np.isnan(upper)
            covered = has & (lower <= yy) & (yy <= upper)
            raw_width = upper - lower
            finite = has & np.isfinite(raw_width)
            width = np.where(finite, raw_width, 0.0)
            miss = np.maximum(lower - yy, 0.0) + np.maximum(yy - upper, 0.0)
            penalty = (2.0 / self.alpha) * np.minimum(miss, MAX_ERROR)
            score = np.where(finite, width + penalty, 0.0)
        self.sums_[rows, :-1] += np.stack((mask, np.abs(err), err * err, covered, width, score), axis=1)
        missing = mask & ~has
        if missing.any():
            self.no_interval_[rows] += missing
        infinite = has & ~finite
        if infinite.any():
            self.infinite_[rows] += infinite
        self._roll(mask, finite, covered, width)

    def _roll(self, mask: np.ndarray, has: np.ndarray, covered: np.ndarray, width: np.ndarray) -> None:
        """Coverage over every scored step (no interval = a miss), width over the steps that had a finite
        interval."""
        n, n_has = mask.sum(axis=0), has.sum(axis=0)
        if not n.any():
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            cov_now = covered.sum(axis=0) / n
            width_now = width.sum(axis=0) / n_has
        for rolling, now, count in ((self.rolling_coverage_, cov_now, n), (self.rolling_width_, width_now, n_has)):
            seen = count > 0
            weight = 1.0 - (1.0 - 1.0 / self.window) ** count  # count updates of an EWMA with step 1/window
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
        return {**{name: sums[i] for i, name in enumerate(_SUMS)}, "no_interval": self.no_interval_[rows].sum(0),
                "infinite": self.infinite_[rows].sum(0)}

    def summary(self, rows: np.ndarray) -> dict:
        """MAE, RMSE, coverage, mean width and interval score overall and by horizon; ``None`` where undefined
        (nothing scored, or no step with an interval), never ``NaN``."""
        t = self.totals(rows)
        by_horizon = {str(h + 1): _metrics({k: v[h] for k, v in t.items()}) for h in range(self.horizon)}
        return {**_metrics({k: v.sum() for k, v in t.items()}), "by_horizon": by_horizon}

    # -- state ------------------------------------------------------------------------------------
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return self.table_.export_rows(rows)

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        for name in ("no_interval", "infinite"):  # saved before these were counted: zero (inf was in the sums)
            if name not in state:
                state = {**state, name: np.zeros((len(rows), self.horizon))}
        self.table_.import_rows(rows, state)


def _metrics(t: dict[str, float]) -> dict:
    n = float(t["count"])
    n_no_interval = int(t["no_interval"])
    n_infinite = int(t["infinite"])
    n_with = n - n_no_interval - n_infinite  # steps with a finite interval

    def mean(total: float, count: float) -> float | None:
        value = float(total / count) if count > 0 else None
        return value if value is None or np.isfinite(value) else None  # last line of defence: strict JSON

    return {
        "n_forecasts": int(t["issued"]),
        "n_scored": int(n),
        "n_no_interval": n_no_interval,
        "n_infinite_interval": n_infinite,
        "mae": mean(t["abs_err"], n),
        "rmse": mean(np.sqrt(t["sq_err"] / n), 1.0) if n > 0 else None,
        "coverage": mean(t["covered"], n),
        "mean_width": mean(t["width"], n_with),
        "interval_score": mean(t["interval_score"], n_with),
    }
