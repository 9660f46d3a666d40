"""Sequential predictive conformal inference (SPCI; Xu & Xie, ICML 2023).

For each (row, horizon) cell a quantile random forest (Meinshausen 2006) is fitted on the cell's residual history:
features are the ``window`` residuals known when the target was forecast (lags ``h .. h + window - 1``),
the label is the residual. The interval is ``[Q_beta, Q_{1 - alpha + beta}]`` of the forest's conditional
distribution at the newest features, with ``beta`` picked on a grid of ``bins`` values in ``[0, alpha]`` to
minimise the width (asymmetric intervals), or the ``1 - alpha`` quantile of ``|r|`` with ``symmetric=True``.
The forest is refitted every ``refit_every`` residuals (SPCI refits every step: ~0.1-0.2 s each).

This is the reference the fast methods are measured against, not a hot-path calibrator: it loops over cells in
Python and keeps one fitted forest per cell in a cache that is *not* part of the exported state (after
``import_rows`` the forest is refitted from the exported residual history at the next update). Before
``min_history`` residuals it falls back to empirical quantiles of what it has (the same ``beta`` search), and
before ``1 / a`` residuals (``a`` a threshold's one-sided miss rate: 20 at alpha = 0.1) that threshold is not
below the Gaussian prior on their mean ``|r|``, which the sample's quantiles cannot reach yet; each level's
thresholds apart, so a wide level does not hold a narrow one at the floor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from tidecast.models.base import check_count
from tidecast.models.rows import Column
from tidecast.monitors.conformal.base import MAX_WINDOW, ScoreCalibrator


def weighted_quantiles(y: np.ndarray, w: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Quantiles ``levels`` of the distribution putting weight ``w`` on ``y`` (inverse of the weighted CDF)."""
    order = np.argsort(y)
    cw = np.cumsum(w[order])
    idx = np.searchsorted(cw, levels * cw[-1], side="left")
    return y[order][np.minimum(idx, y.size - 1)]


class QuantileForest:
    """Meinshausen's quantile regression forest on top of scikit-learn's RandomForestRegressor."""

    def __init__(self, n_estimators: int, max_depth: int, random_state: int) -> None:
        from sklearn.ensemble import RandomForestRegressor

        self.forest = RandomForestRegressor(
            n_estimators=n_estimators, max_depth=max_depth, random_state=random_state, n_jobs=1
        )

    def fit(self, x: np.ndarray, y: np.ndarray) -> QuantileForest:
        self.forest.fit(x, y)
        self.y_ = y
        self.leaves_ = self.forest.apply(x)  # (n, trees)
        return self

    def predict(self, x: np.ndarray, levels: np.ndarray) -> np.ndarray:
        leaf = self.forest.apply(x.reshape(1, -1))[0]
        same = self.leaves_ == leaf  # (n, trees)
        w = (same / np.maximum(same.sum(0), 1)).sum(1)
        return weighted_quantiles(self.y_, w, levels)


class SPCI(ScoreCalibrator):
    name = "spci"

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        window: int = 100,
        history: int = 1000,
        refit_every: int = 1,
        n_estimators: int = 10,
        max_depth: int = 2,
        bins: int = 5,
        min_history: int | None = None,
        random_state: int = 0,
        symmetric: bool = False,
    ) -> None:
        check_count("window", window, high=MAX_WINDOW)
        check_count("history", history, window, high=MAX_WINDOW)  # the windows of features are cut from the history
        check_count("refit_every", refit_every)
        check_count("n_estimators", n_estimators)
        check_count("max_depth", max_depth)
        check_count("bins", bins)
        if min_history is not None:
            check_count("min_history", min_history)
        check_count("random_state", random_state, 0)
        self.window = window
        self.history = history
        self.refit_every = refit_every
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.bins = bins
        self.min_history = min_history
        self.random_state = random_state
        super().__init__(horizon, alpha, symmetric)
        self._forests: dict[tuple[int, int], QuantileForest] = {}

    _separate = ("ring",)
    ring_ = Column("ring")

    def _state_spec(self) -> dict:
        return {
            "count": ((), 0, np.int64),
            "since_fit": ((), -1, np.int64),  # residuals since the forest was fitted; -1 = none yet
            "stale": ((), 0, np.int64),  # 1 = offsets predate the newest residual
            "ring": ((self.history,), 0.0, float),
        }

    def _levels(self) -> tuple[np.ndarray, np.ndarray]:
        """Quantile levels to ask for, and for each alpha the (lower, upper) index pairs of the beta grid."""
        if self.symmetric:
            return 1 - self.alphas_, np.zeros(0)
        betas = np.linspace(0.0, 1.0, self.bins)[None, :] * self.alphas_[:, None]  # (L, bins)
        lower = betas
        upper = 1 - self.alphas_[:, None] + betas
        return np.concatenate([lower.ravel(), upper.ravel()]), betas

    def _series(self, row: int, h: int) -> np.ndarray:
        n = int(self.state_[self._layout["count"][0].start, row, h])
        m = min(n, self.history)
        idx = (np.arange(n - m, n)) % self.history
        return self.ring_[row, h, idx]

    def _thresholds(self, row: int, h: int, refit: bool) -> np.ndarray:
        r = self._series(row, h)
        hz, w = h + 1, self.window
        levels, _ = self._levels()
        y_all = np.abs(r) if self.symmetric else r
        n_train = r.size - w - hz + 1
        min_hist = self.min_history if self.min_history is not None else 2 * w
        if r.size == 0:
            return np.zeros(self.n_targets_)
        if n_train < max(min_hist - w, 10) or r.size < w:
            qs = np.quantile(y_all, np.clip(levels, 0, 1))
        else:
            key = (row, h)
            if refit or key not in self._forests:
                feats = sliding_window_view(r, w)  # row j: r[j .. j+w-1]
                x = feats[:n_train]
                y = y_all[w + hz - 1 :]
                self._forests[key] = QuantileForest(self.n_estimators, self.max_depth, self.random_state).fit(x, y)
            qs = self._forests[key].predict(r[-w:], np.clip(levels, 0, 1))
        if self.symmetric:
            thresholds = qs
        else:
            n_lv = self.alphas_.size
            lo, hi = qs[: n_lv * self.bins].reshape(n_lv, -1), qs[n_lv * self.bins :].reshape(n_lv, -1)
            best = np.argmin(hi - lo, axis=1)
            pick = np.arange(n_lv)
            thresholds = np.stack([hi[pick, best], -lo[pick, best]], -1).ravel()  # (hi, lo) per level
        short = r.size * self.target_alpha_ < 1.0
        if short.any():
            # Fewer residuals than it takes to see one miss: the sample's quantiles cannot reach the tail (one
            # residual gave a zero-width interval, the point forecast itself). The Gaussian prior on their
            # mean size is a floor until they can - for each target apart: a 99.9 % level floored a 10 % one,
            # off-centre by the width search, for 2,000 residuals (its coverage 0.25)
            floor = self.prior_per_scale_ * np.abs(r).mean()
            thresholds = np.where(short, np.maximum(thresholds, floor), thresholds)
        return thresholds

    def _learn(self, blk, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        count = blk["count"].astype(np.int64)
        self.flat("ring")[cells, count % self.history] = r
        since = blk["since_fit"]
        blk["count"], blk["since_fit"], blk["stale"] = count + 1, np.where(since >= 0, since + 1, -1), 1
        # Lazy: thresholds are computed when an interval is asked for, so unscored steps cost no forest.
        return self.offsets_.reshape(-1, 1 + self.n_targets_)[cells]

    def intervals(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size:
            self.resize(int(rows.max()) + 1)
        i_stale, i_since = self._layout["stale"][0].start, self._layout["since_fit"][0].start
        for row in rows.tolist():
            for h in np.nonzero(self.state_[i_stale, row, :] > 0)[0].tolist():
                since = self.state_[i_since, row, h]
                refit = since < 0 or since >= self.refit_every or (row, h) not in self._forests
                self.offsets_[row, h] = 0.0, *self._thresholds(row, h, refit)  # centre 0: no scorecaster
                if refit and (row, h) in self._forests:
                    self.state_[i_since, row, h] = 0
                self.state_[i_stale, row, h] = 0
        return super().intervals(rows, means)

    def import_rows(self, rows: np.ndarray, state: dict) -> None:
        super().import_rows(rows, state)
        self._forget(rows)

    def reset_rows(self, rows: np.ndarray) -> None:
        super().reset_rows(rows)
        self._forget(rows)

    def _forget(self, rows: np.ndarray) -> None:
        for row in np.asarray(rows).tolist():  # forests are refitted from the row's history when next asked
            for h in range(self.horizon):
                self._forests.pop((row, h), None)
