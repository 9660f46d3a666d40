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

Several interval levels (``alpha`` a sequence) are scored side by side: bounds then have a last axis of one entry
per level, and the summary holds each level's coverage, width and interval score under ``levels`` (named by the
coverage in percent, ``"80"``, ``"95"``); the top-level ``coverage``/``mean_width``/``interval_score`` are the first
level's.

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

Two levels at once (bounds of shape (n, horizon, levels)):

>>> s = PrequentialScorer(horizon=1, alpha=(0.2, 0.05))
>>> s.resize(1)
>>> s.update(np.array([0]), np.array([1.9]), np.array([[1.0]]), np.array([[[0.5, 0.0]]]), np.array([[[1.5, 2.0]]]),
...          np.array([[True]]))
>>> {level: m["coverage"] for level, m in s.summary(np.array([0]))["levels"].items()}
{'80': 0.0, '95': 1.0}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tidecast.models.rows import ArrayDict, Column, Field, RowTable

_POINT = ("count", "abs_err", "sq_err")
_PER_LEVEL = ("covered", "width", "interval_score")


def level_name(alpha: float) -> str:
    """The coverage level of a miscoverage ``alpha``, in percent, as text: ``0.1 -> "90"``, ``0.025 -> "97.5"``."""
    return f"{round(100.0 * (1.0 - float(alpha)), 9):g}"

#: Errors and interval misses (the distance outside an interval, before its penalty's factor 2 / alpha) enter the
#: sums clipped to this magnitude (their squares stay finite).
MAX_ERROR = 1e100


class PrequentialScorer:
    """Per-(row, horizon) running sums plus run-wide rolling coverage and width per level and horizon.

    The sums of a row are ``count, abs_err, sq_err``, then ``covered, width, interval_score`` for each level, then
    ``issued`` (with one level, the layout of the single-level scorer, so its saved state reads unchanged).
    """

    sums_ = Column("sums")  # (rows, statistic, horizon), statistics as in names_
    no_interval_ = Column("no_interval")  # (rows, horizon): scored steps that had no interval
    infinite_ = Column("infinite")  # (rows, level, horizon): scored steps whose interval was infinite

    def __init__(self, horizon: int, alpha: float | Sequence[float], window: int = 1000) -> None:
        self.horizon = horizon
        self.alpha = alpha
        self.window = window
        self.alphas_ = np.atleast_1d(np.asarray(alpha, dtype=float))
        self.levels_ = [level_name(a) for a in self.alphas_]
        self.names_ = (*_POINT, *(f"{stat}@{lv}" for lv in self.levels_ for stat in _PER_LEVEL), "issued")
        self.table_ = RowTable(sums=Field((len(self.names_), horizon), np.float64, 0.0),
                               # counts: int32 holds 68 years of one step a second, in half float64's bytes
                               no_interval=Field((horizon,), np.int32, 0),
                               infinite=Field((self.alphas_.size, horizon), np.int32, 0))
        # Rolling (exponentially weighted, ~``window`` scored forecasts) coverage and width per level and horizon:
        # weighted sums and the weight they hold, so that the first steps average instead of one batch standing
        # for ~window steps (the first step, often without an interval yet, held the coverage gauge near 0)
        shape = (self.alphas_.size, horizon)
        self._coverage_sum, self._coverage_mass = np.zeros(shape), np.zeros(shape)
        self._width_sum, self._width_mass = np.zeros(shape), np.zeros(shape)

    @property
    def rolling_coverage_(self) -> np.ndarray:
        """Coverage per level and horizon over about the last ``window`` scored steps (NaN before any)."""
        return _ratio(self._coverage_sum, self._coverage_mass)

    @property
    def rolling_width_(self) -> np.ndarray:
        """Mean finite interval width per level and horizon over about the last ``window`` such steps."""
        return _ratio(self._width_sum, self._width_mass)

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    def forget_rolling(self) -> None:
        """Start the rolling coverage and width afresh (NaN until the next scored step): the series they were of
        are gone (a serve member that lost all its partitions)."""
        for part in (self._coverage_sum, self._coverage_mass, self._width_sum, self._width_mass):
            part[:] = 0.0

    def update(
        self,
        rows: np.ndarray,
        y: np.ndarray,
        mean: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        mask: np.ndarray,
    ) -> None:
        """Score matured forecasts: ``y`` has shape (n,), ``mean`` and ``mask`` (n, horizon), the bounds (n, horizon)
        with one level or (n, horizon, levels); ``mask`` marks real cells. ``NaN`` bounds mean the step was issued
        without an interval."""
        if not mask.any():
            return
        n_levels = self.alphas_.size
        lower = lower.reshape(*mask.shape, n_levels)
        upper = upper.reshape(*mask.shape, n_levels)
        yy = y[:, None]
        y3, m3 = yy[..., None], mask[..., None]
        with np.errstate(invalid="ignore", over="ignore"):  # unmatured cells and steps without an interval: masked
            err = np.clip(np.where(mask, yy - mean, 0.0), -MAX_ERROR, MAX_ERROR)
            has = m3 & ~np.isnan(lower) & ~np.isnan(upper)  # (n, H, L)
            covered = has & (lower <= y3) & (y3 <= upper)
            raw_width = upper - lower
            finite = has & np.isfinite(raw_width)
            width = np.where(finite, raw_width, 0.0)
            miss = np.maximum(lower - y3, 0.0) + np.maximum(y3 - upper, 0.0)
            penalty = (2.0 / self.alphas_) * np.minimum(miss, MAX_ERROR)
            score = np.where(finite, width + penalty, 0.0)
        block = np.empty((len(rows), len(self.names_) - 1, self.horizon))  # every sum but "issued"
        block[:, 0], block[:, 1], block[:, 2] = mask, np.abs(err), err * err
        for k, stat in enumerate((covered, width, score)):  # level j's stat k lands in row 3 + 3j + k
            block[:, 3 + k::3] = np.swapaxes(stat, 1, 2)
        self.sums_[rows, :-1] += block
        missing = mask & ~has[..., 0]  # a calibrator cell gives every level or none
        if missing.any():
            self.no_interval_[rows] += missing
        infinite = has & ~finite  # per level: a wider level can be infinite where a narrower one is not
        if infinite.any():
            self.infinite_[rows] += np.swapaxes(infinite, 1, 2)
        self._roll(mask, finite, covered, width)

    def _roll(self, mask: np.ndarray, finite: np.ndarray, covered: np.ndarray, width: np.ndarray) -> None:
        """Coverage over every scored step (no interval = a miss), each level's width over the steps where that
        level's interval was finite."""
        n, n_has = mask.sum(axis=0), finite.sum(axis=0).T  # (H,), (L, H)
        if not n.any():
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            cov_now = covered.sum(axis=0).T / n  # (L, H)
            width_now = width.sum(axis=0).T / n_has
        for total, mass, now, count in ((self._coverage_sum, self._coverage_mass, cov_now, n),
                                        (self._width_sum, self._width_mass, width_now, n_has)):
            seen = np.broadcast_to(count > 0, total.shape)
            keep = np.broadcast_to((1.0 - 1.0 / self.window) ** count, total.shape)  # count EWMA steps at once
            total[seen] = keep[seen] * total[seen] + (1.0 - keep[seen]) * now[seen]
            mass[seen] = keep[seen] * mass[seen] + (1.0 - keep[seen])

    def issued(self, rows: np.ndarray, ready: np.ndarray) -> None:
        """Count forecast steps issued (``ready``: (n, horizon) bool, False during warm-up)."""
        self.sums_[rows, -1] += ready

    # -- reading ----------------------------------------------------------------------------------
    def totals(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Per-horizon sums over ``rows`` (pass rows in a fixed order for reproducible floating point); per-level
        sums are named ``covered@80`` etc."""
        sums = self.sums_[rows].sum(axis=0)
        infinite = self.infinite_[rows].sum(0)
        return {**{name: sums[i] for i, name in enumerate(self.names_)}, "no_interval": self.no_interval_[rows].sum(0),
                "infinite": infinite[0], **{f"infinite@{lv}": infinite[j] for j, lv in enumerate(self.levels_)}}

    def ever_issued(self, rows: np.ndarray) -> np.ndarray:
        """Whether each of ``rows`` has issued a forecast step (any horizon), shape ``(len(rows),)``."""
        return self.sums_[rows, -1].sum(axis=1) > 0

    def summary(self, rows: np.ndarray) -> dict:
        """MAE, RMSE, coverage, mean width and interval score overall and by horizon, each level's under
        ``levels``; ``None`` where undefined (nothing scored, or no step with an interval), never ``NaN``."""
        t = self.totals(rows)
        by_horizon = {str(h + 1): self._metrics({k: v[h] for k, v in t.items()}) for h in range(self.horizon)}
        return {**self._metrics({k: v.sum() for k, v in t.items()}), "by_horizon": by_horizon}

    def _metrics(self, t: dict[str, float]) -> dict:
        levels = {lv: _interval_metrics(t, lv, alpha) for lv, alpha in zip(self.levels_, self.alphas_, strict=True)}
        first = levels[self.levels_[0]]
        return {**_point_metrics(t), "coverage": first["coverage"], "mean_width": first["mean_width"],
                "interval_score": first["interval_score"], "levels": levels}

    # -- state ------------------------------------------------------------------------------------
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return self.table_.export_rows(rows)

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        for name in ("no_interval", "infinite"):  # saved before these were counted: zero (inf was in the sums)
            if name not in state:
                state = {**state, name: np.zeros((len(rows), self.horizon), np.int32)}
        infinite = np.asarray(state["infinite"])
        if infinite.ndim == 2:  # saved when only the first level was counted: the others start at zero
            per_level = np.zeros((len(rows), self.alphas_.size, self.horizon), np.int32)
            per_level[:, 0] = infinite
            state = {**state, "infinite": per_level}
        self.table_.import_rows(rows, state)


def _mean(total: float, count: float) -> float | None:
    return float(total / count) if count > 0 else None


def _point_metrics(t: dict[str, float]) -> dict:
    n = float(t["count"])
    return {
        "n_forecasts": int(t["issued"]),
        "n_scored": int(n),
        "n_no_interval": int(t["no_interval"]),
        "n_infinite_interval": int(t["infinite"]),  # the first level's (the one in lower / upper)
        "mae": _finite_mean(t["abs_err"], n),
        "rmse": _finite_mean(np.sqrt(t["sq_err"] / n), 1.0) if n > 0 else None,
    }


def _finite_mean(total: float, count: float) -> float | None:
    """A mean, ``None`` when undefined or not finite: the last line of defence for strict JSON."""
    value = _mean(total, count)
    return value if value is None or np.isfinite(value) else None


def _interval_metrics(t: dict[str, float], level: str, alpha: float) -> dict:
    n = float(t["count"])
    n_with = n - int(t["no_interval"]) - int(t[f"infinite@{level}"])  # steps with a finite interval
    return {
        "target": float(1.0 - alpha),
        "coverage": _finite_mean(t[f"covered@{level}"], n),
        "mean_width": _finite_mean(t[f"width@{level}"], n_with),
        "interval_score": _finite_mean(t[f"interval_score@{level}"], n_with),
    }


def _ratio(total: np.ndarray, mass: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), np.nan)
