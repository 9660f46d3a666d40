"""Pooling: a young (series, horizon) cell borrows its interval from the lane's other series.

A cell with few residuals of its own knows little; the lane's other series at the same horizon know a lot about
how wrong *this model* is h steps ahead, once their errors are put on a common scale. :class:`Pool` sits next to a
lane's calibrator (it never changes the calibrator's state) and, for every cell with fewer than ``n0`` residuals
of its own, replaces the calibrator's interval with a blend:

    offset = w * own + (1 - w) * borrowed * scale_row,   w = n / n0

where ``own`` are the cell's upper and lower offsets around the point forecast (none while ``n = 0``),
``borrowed`` is the median over the lane's *seasoned* cells at that horizon (``n >= n0``) of their offsets divided
by their row's scale, and ``scale_row`` is the row's scale: an exponential mean of ``|y_t - y_{t-1}|`` over the
values the row's model has learned (memory ``1 / scale_decay`` values; a running mean before that), so a series
that appears late takes its scale from its own first window - the values its model needed before its first
forecast. A row with no value yet takes the median scale of the lane's rows. The one-step difference is the
scale because every row has it from its second value on, whatever the model; the residuals' own scale would
need residuals.

**When the lane estimate is taken.** Once per row: the first time the row asks for an interval with a young cell
(its first forecast, or the first after :meth:`Pool.restart`, which seeding calls), the lane's median is taken
from the rows as they are and kept in the row's state (``borrowed``, per horizon, level and side; ``NaN`` where
the lane had no seasoned cell then, e.g. for series that all start together). So nothing lane-level is
checkpointed, a restored engine goes on exactly as the original, and a series' intervals never depend on how
far the *other* series have got since it started (the batches a consumer happens to poll). What the lane looked
like at that moment does depend on the order series arrived in: deterministic in a replay, and in ``serve`` for
series that appear together; a late series joining a live stream borrows from the lane as it found it.

>>> import numpy as np
>>> from tidecast.monitors.conformal import make_calibrator
>>> cal, pool = make_calibrator("conformal-pid", horizon=1, alpha=0.1), Pool(horizon=1, n0=20)
>>> rng = np.random.default_rng(0)
>>> for t in range(300):  # row 0 seasoned, of scale 1; row 1 appears at t = 290, ten times larger
...     rows = np.array([0]) if t < 290 else np.array([0, 1])
...     pool.observe(rows, rng.normal(size=rows.size) * (1 + 9 * rows))
...     if t > 0:
...         cal.update(np.array([0]), rng.normal(size=(1, 1)), np.ones((1, 1), bool))
>>> lo, hi = cal.interval(np.array([0, 1]), np.zeros((2, 1)))
>>> bool(np.isnan(hi[1, 0]))  # row 1 has no residual: no interval of its own
True
>>> lo, hi = pool.interval(cal, np.array([0, 1]), np.zeros((2, 1)), lo, hi)
>>> bool(5 < hi[1, 0] / hi[0, 0] < 20)  # borrowed from row 0, scaled by row 1's own first values
True
"""

from __future__ import annotations

import warnings

import numpy as np

from tidecast.models.base import Params
from tidecast.models.rows import ArrayDict, Column, Field, RowTable
from tidecast.monitors.conformal.base import Calibrator, bounded_by_scale


class Pool(Params):
    """Borrowed intervals for young cells; see the module docstring. ``n0 = 0`` turns pooling off; ``levels`` is the
    number of ``alpha`` levels of the lane's calibrator."""

    #: The lane median is taken over at most this many seasoned rows (every k-th): a row's first interval costs
    #: about 3 ms at 10,000 series instead of 45.
    max_rows: int = 2048

    scale_ = Column("scale")  # exponential mean of |y_t - y_{t-1}|
    n_ = Column("n")  # values seen (for the running-mean start)
    last_ = Column("last")  # the last value learned
    borrowed_ = Column("borrowed")  # (H, levels, 2): the lane's offsets / scale, taken at the row's first interval
    taken_ = Column("taken")  # whether ``borrowed`` has been taken

    def __init__(self, horizon: int, n0: int = 168, scale_decay: float = 0.005, levels: int = 1) -> None:
        if n0 < 0:
            raise ValueError(f"n0 must be >= 0, got {n0}")
        self.horizon = horizon
        self.n0 = n0
        self.scale_decay = scale_decay
        self.levels = levels
        # Pooling off keeps no row state at all: at H = 96 ``borrowed`` alone would be 1.5 kB a series for nothing.
        self.table_ = RowTable() if n0 == 0 else RowTable(
            scale=Field((), np.float64, np.nan), n=Field((), np.int64, 0), last=Field((), np.float64, np.nan),
            borrowed=Field((horizon, levels, 2), np.float64, np.nan), taken=Field((), np.bool_, False))

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    # -- the rows' scales -----------------------------------------------------------------------------
    def observe(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Values the rows' model learned (one per row, in tick order)."""
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size == 0 or self.n0 == 0:
            return
        self.resize(int(rows.max()) + 1)
        values = np.asarray(values, dtype=float)
        step = np.abs(values - self.last_[rows])
        ok = np.isfinite(step)
        if ok.any():
            r = rows[ok]
            old = self.scale_[r]
            # one absurd value used to make a young series' borrowed interval 1e13 wide for its whole youth
            moved = bounded_by_scale(step[ok], old, self.n_[r])
            n = self.n_[r] + 1
            self.n_[r] = n
            rate = np.maximum(self.scale_decay, 1.0 / n)
            self.scale_[r] = np.where(np.isnan(old), moved, old + rate * (moved - np.nan_to_num(old)))
        self.last_[rows] = values

    def forget_last(self, rows: np.ndarray) -> None:
        """After a reset (a long gap) the next step is not a one-tick difference: do not learn from it."""
        if self.n0:
            self.last_[np.asarray(rows, dtype=np.intp)] = np.nan

    def restart(self, rows: np.ndarray) -> None:
        """The rows' calibrator cells started afresh (seeded): take the lane estimate again at their next interval."""
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size and self.n0:
            self.resize(int(rows.max()) + 1)
            self.table_.blank(rows, ("borrowed", "taken"))

    def scales(self, rows: np.ndarray) -> np.ndarray:
        """The rows' scales; the lane's median where a row has none (``NaN`` when no row has one)."""
        s = self.scale_[rows].copy()
        missing = ~(s > 0)
        if missing.any():
            known = self.scale_[: self.table_.n_rows]
            known = known[known > 0]
            s[missing] = np.median(known) if known.size else np.nan
        return s

    # -- intervals ------------------------------------------------------------------------------------
    def interval(self, cal: Calibrator, rows: np.ndarray, means: np.ndarray, lower: np.ndarray,
                 upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The calibrator's ``(lower, upper)`` (n, H) for ``rows``, young cells blended with the lane estimate."""
        lo, hi = self.intervals(cal, rows, means, lower[..., None], upper[..., None])
        return lo[..., 0], hi[..., 0]

    def intervals(self, cal: Calibrator, rows: np.ndarray, means: np.ndarray, lower: np.ndarray,
                  upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`interval` with a level axis: ``lower``/``upper`` (n, H, L)."""
        rows = np.asarray(rows, dtype=np.intp)
        if self.n0 == 0 or rows.size == 0:
            return lower, upper
        counts = cal.cell_counts(rows)
        if counts is None:
            return lower, upper
        young = counts < self.n0
        if not young.any():
            return lower, upper
        self.resize(int(rows.max()) + 1)
        first = young.any(axis=1) & ~self.taken_[rows]
        if first.any():  # the row's first interval with a young cell: take the lane estimate now, once
            self.borrowed_[rows[first]] = self.pooled(cal)
            self.taken_[rows[first]] = True
        levels = lower.shape[-1]  # interval() asks for the first level only
        borrowed = self.borrowed_[rows][:, :, :levels] * self.scales(rows)[:, None, None, None]  # (n, H, L, 2)
        w = np.minimum(counts / self.n0, 1.0)[:, :, None, None]
        mid = means[:, :, None]
        own = np.stack([upper - mid, mid - lower], axis=-1)
        with np.errstate(invalid="ignore"):  # 0 x inf in cells that are not young (not picked below)
            blend = np.where(np.isnan(own), borrowed, w * own + (1 - w) * borrowed)
        blend = np.where(np.isnan(borrowed), own, blend)  # nothing to borrow: the cell's own (or none)
        pick = young[:, :, None]
        return np.where(pick, mid - blend[..., 1], lower), np.where(pick, mid + blend[..., 0], upper)

    def pooled(self, cal: Calibrator) -> np.ndarray:
        """The lane estimate now: median over the seasoned cells, per horizon, level and side, of offset / row
        scale, (H, L, 2); ``NaN`` where no cell is seasoned."""
        n = min(self.table_.n_rows, cal.n_rows_)
        rows = np.arange(n)
        counts = cal.cell_counts(rows)
        scale = self.scale_[rows]
        seasoned = (counts >= self.n0) & (scale > 0)[:, None]
        if not seasoned.any():
            return np.full((self.horizon, self.levels, 2), np.nan)
        keep = np.flatnonzero(seasoned.any(axis=1))
        if keep.size > self.max_rows:  # every k-th seasoned row: the median of a sample of max_rows is as good
            keep = keep[:: -(-keep.size // self.max_rows)]
        offsets = cal.offsets(rows[keep]) / scale[keep, None, None, None]  # (m, H, L, 2)
        offsets[~seasoned[keep]] = np.nan
        with warnings.catch_warnings():  # an all-NaN slice (a horizon with no seasoned cell) is expected
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(offsets, axis=0)

    # -- state ----------------------------------------------------------------------------------------
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        if self.n0 == 0:
            return {}
        state = self.table_.export_rows(rows)
        state["taken"] = state["taken"].astype(np.uint8)
        return state

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        if self.n0 == 0:  # pooling off: nothing to keep (state saved by a version that kept it anyway is dropped)
            return
        if not state:  # saved before pooling existed: the rows start without a scale and have borrowed nothing
            self.resize(int(rows.max()) + 1 if rows.size else 0)
            self.table_.blank(rows)
            return
        self.table_.import_rows(rows, {**state, "taken": np.asarray(state["taken"]).astype(bool)})
