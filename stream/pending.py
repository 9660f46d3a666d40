"""Forecasts waiting for their targets: what each issued forecast step needs to be scored when its target arrives.

The h-step forecast issued at origin tick ``o`` matures at tick ``o + h``. At any tick only the steps that have not
matured yet are waiting: for step h, the last h origins' — H(H+1)/2 values per series, not H². So each step h has
a ring of h slots, indexed by ``origin % h`` (the slot a new origin overwrites is the one that has just matured),
packed into one triangle per row. A ring of the last H origins keeps each origin's tick, so a slot overwritten by a
newer origin, or cleared after a reset, can never be mistaken for the one asked for.

Compact, and exact where it matters: an origin's first step is kept as a float64 *anchor*; the other steps are kept
as float32 differences from it, and the bounds as float32 offsets from their step's mean. A float32 mean would lose
the unit digit of a series near 1e7; a difference from the anchor keeps the precision of the forecast's own moves.
Scoring then sees ``mean`` to ~1e-7 of the forecast's change over the horizon and bounds to ~1e-7 of their offset
from the mean, which is ~1e-7 of the interval's width when the interval is centred near the mean (the published
forecasts are not affected); an interval centred 1e8 times its width away from a biased model's mean is scored at
float32's steps of that offset. Bounds are ``NaN`` where a step was issued without an interval;
they have a last axis of one entry per interval level (``n_levels``).
At H = 24 this is 4.0 kB a series instead of 14 kB; at H = 96, 57 kB instead of 222 kB.

>>> import numpy as np
>>> pending = PendingForecasts(horizon=2)
>>> pending.resize(1)
>>> pending.store(np.array([0]), np.array([10]), np.array([[1.0, 2.0]]), np.array([[[0.5], [1.0]]]),
...               np.array([[[1.5], [3.0]]]))
>>> mean, lower, upper, valid = pending.matured(np.array([0]), np.array([11]))  # tick 11: h = 1 from origin 10
>>> mean.tolist(), lower.tolist()[0][0], valid.tolist(), lower.shape
([[1.0, nan]], [0.5], [[True, False]], (1, 2, 1))
>>> pending.matured(np.array([0]), np.array([12]))[0].tolist()  # tick 12: h = 2 from origin 10
[[nan, 2.0]]

A calibrator that keeps the intervals it issued (conformal PID keeps them for its own scoring) makes the bounds
here redundant: ``PendingForecasts(horizon, bounds=False)`` keeps the means only, and the engine asks the
calibrator (:meth:`~tidecast.monitors.conformal.base.Calibrator.issued_intervals`). That saves 2 x 4 bytes a cell
(37 kB a series at H = 96). The intervals are the ones issued while a series reports every tick; in the H ticks
after a gap the calibrator answers with the slot it scores itself against (its h-th last update's), so the scored
coverage there is the controller's view, not the published interval's (on a synthetic stream with 15 % of ticks
missing: 0.900 instead of 0.885 coverage, widths within 0.3 %).
"""

from __future__ import annotations

import numpy as np

from tidecast.models.rows import ArrayDict, Column, Field, RowTable

#: Origin of an empty slot: no tick ever equals it.
NO_TICK = np.iinfo(np.int64).min


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32(offsets: np.ndarray) -> np.ndarray:
    """Offsets as float32 without turning a finite one infinite: a difference beyond ~3.4e38 (a diverging model, or
    data past the value limit with ``--max-abs-value 0``) became inf, its step went unscored and MAE read low. Such
    an offset is kept at float32's largest magnitude: the step is scored with an absurd error, as it should be."""
    with np.errstate(invalid="ignore"):
        if not (np.abs(offsets) > _FLOAT32_MAX).any():
            return offsets
    return np.where(np.isinf(offsets), offsets, np.clip(offsets, -_FLOAT32_MAX, _FLOAT32_MAX))


class PendingForecasts:
    """The waiting steps of every row's last H forecasts (see the module docstring for the layout)."""

    origin_ = Column("origin")  # (rows, H): origin tick of each origin-ring slot (origin % H)
    anchor_ = Column("anchor")  # (rows, H): that origin's first finite step, float64
    delta_ = Column("delta")  # (rows, H(H+1)/2): step mean - anchor, float32, triangle of per-step rings
    lower_ = Column("lower")  # (rows, H(H+1)/2, levels): lower bound - step mean, float32
    upper_ = Column("upper")  # (rows, H(H+1)/2, levels): upper bound - step mean, float32

    def __init__(self, horizon: int, n_levels: int = 1, bounds: bool = True) -> None:
        self.horizon = horizon
        self.n_levels = n_levels
        self.bounds = bounds  # False: the calibrator keeps the issued intervals (matured() returns None for them)
        self.hs_ = np.arange(1, horizon + 1)
        self.start_ = np.concatenate([[0], np.cumsum(self.hs_)[:-1]])  # step h's ring starts here
        cells = horizon * (horizon + 1) // 2
        # zero fills: a grown table's unused rows stay untouched zero pages (no resident memory)
        steps = Field((cells,), np.float32, 0.0)
        fields = {"origin": Field((horizon,), np.int64, NO_TICK), "anchor": Field((horizon,), np.float64, 0.0),
                  "delta": steps}
        if bounds:
            offsets = Field((cells, n_levels), np.float32, 0.0)
            fields |= {"lower": offsets, "upper": offsets}
        self.table_ = RowTable(**fields)

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    def _cells(self, origins: np.ndarray) -> np.ndarray:
        """Triangle columns of step h of the forecast issued at each origin, (n, H)."""
        return self.start_[None, :] + origins[:, None] % self.hs_[None, :]

    def store(self, rows: np.ndarray, origins: np.ndarray, mean: np.ndarray, lower: np.ndarray,
              upper: np.ndarray) -> None:
        """Keep the forecasts issued at tick ``origins`` (one per row): ``mean`` (n, H), bounds (n, H, levels)."""
        ring = origins % self.horizon
        finite = np.isfinite(mean)
        first = np.where(finite.any(axis=1), finite.argmax(axis=1), 0)
        anchor = mean[np.arange(len(rows)), first]
        anchor = np.where(np.isfinite(anchor), anchor, 0.0)
        self.origin_[rows, ring] = origins
        self.anchor_[rows, ring] = anchor
        r, cells = rows[:, None], self._cells(origins)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf pass through as they are
            self.delta_[r, cells] = _float32(mean - anchor[:, None])
            if self.bounds:
                # a bound beyond float32 from its mean is kept as unbounded: it covers whatever float32 can tell
                self.lower_[r, cells] = lower - mean[..., None]
                self.upper_[r, cells] = upper - mean[..., None]

    def matured(self, rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
        """Forecasts for tick ``targets`` issued h ticks earlier: (mean, lower, upper, valid), each (n, H) but the
        bounds (n, H, levels); the bounds are ``None`` when this table does not keep them."""
        origins = targets[:, None] - self.hs_[None, :]
        r = rows[:, None]
        ring = origins % self.horizon
        cells = self.start_[None, :] + targets[:, None] % self.hs_[None, :]
        issued = self.origin_[r, ring] == origins
        mean = np.where(issued, self.anchor_[r, ring] + self.delta_[r, cells], np.nan)
        valid = issued & np.isfinite(mean)
        if not self.bounds:
            return mean, None, None, valid
        lo, hi, m = self.lower_[r, cells], self.upper_[r, cells], mean[..., None]
        with np.errstate(invalid="ignore"):  # inf offsets of unbounded sides stay inf
            lower = np.where(np.isinf(lo), lo, m + lo)
            upper = np.where(np.isinf(hi), hi, m + hi)
        return mean, lower, upper, valid

    def issued(self, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(n, H): whether a forecast for tick ``targets`` was issued h ticks earlier (finite or not)."""
        origins = targets[:, None] - self.hs_[None, :]
        return self.origin_[rows[:, None], origins % self.horizon] == origins

    def invalidate(self, rows: np.ndarray) -> None:
        """Forget what ``rows`` have pending (after a reset nothing may mature across the gap)."""
        self.table_.blank(rows, ("origin",))

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return self.table_.export_rows(rows)

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        if "mean" in state and "delta" not in state:
            state = self._upgrade(state)
        self.table_.import_rows(rows, state)

    def _upgrade(self, state: ArrayDict) -> ArrayDict:
        """State saved in the square layout ((rows, H origins, H steps) float64 mean; bounds the same, with a last
        axis of levels or, before levels, without) in this one: origins written oldest first, so each step ring
        ends with the newest origin's value, as it would have."""
        origin = np.asarray(state["origin"], np.int64)
        n = len(origin)
        out = PendingForecasts(self.horizon, self.n_levels, self.bounds)
        out.resize(n)
        mean, lower, upper = (np.asarray(state[k], np.float64) for k in ("mean", "lower", "upper"))
        if lower.ndim == 3:  # saved before interval levels: the one level
            lower, upper = lower[..., None], upper[..., None]
        order = np.argsort(np.where(origin == NO_TICK, np.iinfo(np.int64).min, origin), axis=1, kind="stable")
        for j in range(self.horizon):
            slot = order[:, j]
            rows = np.flatnonzero(origin[np.arange(n), slot] != NO_TICK)
            if len(rows):
                s = slot[rows]
                out.store(rows, origin[rows, s], mean[rows, s], lower[rows, s], upper[rows, s])
        return out.export_rows(np.arange(n))
