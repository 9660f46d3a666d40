"""Conformal PID control (Angelopoulos, Candès & Tibshirani, NeurIPS 2023), vectorised over (row, horizon).

Per cell and per target (side x level, see :class:`~tidecast.monitors.conformal.base.ScoreCalibrator`) the interval is

    upper = yhat + c_t + scale_t * (p_t + r_t),   lower = yhat + c_t - scale_t * (p_t' + r_t')

* **scorecaster** ``c_t``: a direct-AR forecast of the residual (:mod:`tidecast.monitors.conformal.scorecaster`); the
  controller then works on ``u = r - c``, which is far less predictable than ``r`` on autocorrelated errors.
* **P** ``p_t``: online gradient descent on the pinball loss, ``p <- p + lr * (miss - a)``, the quantile tracker.
* **I** ``r_t = K_I tan(I_t log(n) / (C_sat n))``: a saturating integrator of the coverage error
  ``I_t = sum(miss - a)``; off by default (``ki=0``): bench/conformal.py measured no difference.
* ``scale_t``: an exponential mean of ``|u|``. With ``normalize=True`` (default) P and I run on ``u / scale``, so
  a variance jump widens the interval at once instead of after the tracker walks; with ``normalize=False`` they
  run in residual units with the step ``lr * scale`` (the paper's adaptive learning rate). Its memory is
  ``1/scale_decay`` steps at h = 1 and ``scale_memory_per_h`` more per extra step of delay: the h-step cell's
  newest residual is h steps old, so chasing volatility faster only adds noise. The scorecaster's intercept
  (an exponential mean of r, memory ``1/mean_decay``) grows ``mean_memory_per_h`` steps per step of delay for the
  same reason (ETTh1 with CycleNet, h = 24: interval score 16.2 -> 13.4 from both).

**Delayed feedback.** The h-step residual arriving now falls in the interval issued h updates ago. ``miss`` is
scored against *that* interval, kept in a per-cell ring of the last h issued (centre, thresholds) next to the
residuals the scorecaster needs, not against today's state (which has since seen h - 1 newer residuals and a
fresher scale). Then ``sum(miss - a) = (p_T - p_0) / lr`` stays bounded, i.e. the intervals actually shown
cover at the target rate; scoring against the current state instead under-covers at long horizons (ETTh1,
h = 24: 0.76 instead of 0.90 before this was done).

Exponential averages use the rate ``max(decay, 1/n)`` so a new cell starts from the running mean of what it has
seen: the first intervals are finite and the transient settles within a few dozen residuals. Before the first
residual a cell has no interval (``NaN`` bounds, "not ready"); it is never infinite.

**Seeding** (:meth:`~tidecast.monitors.conformal.base.Calibrator.seed`) replays a model's residuals twice: the
scorecaster learns on the first pass; the second starts the rest afresh (scale, thresholds, ring) with that
scorecaster from its first step. In one pass the scale's running mean would average ``|u|`` from the start, when
the AR slope was still unsettled, and the 24-step cells' intervals stayed about 10 % too wide for their first
~250 live steps (coverage 0.92 instead of 0.90 on the cold-start panel, ``bench/conformal.py --case coldstart
--dev``). It then records
in each h-step cell's ring the ``h - 1`` intervals it will issue before its first live residual arrives (the
engine's forecasts at the next ``h - 1`` ticks, from unchanged state). Their residual is unknown to the cell
(``NaN``): while such a slot is its lag, the scorecaster reads the intercept and the scale does not learn (the
whole residual, not its unpredictable part, would inflate it: ETTh1-like panels over-covered at h = 24 for 250
steps that way). So the first live residual is scored against the interval actually issued for it and the
ring stays aligned, as in a cell that has run live all along. The second pass scores the seeds with a scorecaster
fitted on them, whose errors there are smaller than its live ones will be; the seeded scale is widened by the
least-squares in-sample to out-of-sample factor (``_out_of_sample_factor``: 2-4 % for 96 seeds at H = 24, next
to nothing for long ones). Without it a promoted model's 96 shadow residuals under-covered (bench/retrain.py --dev, the
two cycles after a promotion: 0.866 against 0.876 with it).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> e = np.zeros(6000)
>>> for t in range(1, 6000):
...     e[t] = 0.9 * e[t - 1] + rng.normal(scale=0.3)
>>> cal = ConformalPID(horizon=1, alpha=0.1)
>>> rows, covered, width = np.array([0]), [], []
>>> for t in range(6000):
...     lo, hi = cal.interval(rows, np.zeros((1, 1)))
...     covered.append(lo[0, 0] <= e[t] <= hi[0, 0]); width.append(hi[0, 0] - lo[0, 0])
...     cal.update(rows, e[t : t + 1].reshape(1, 1), np.ones((1, 1), bool))
>>> bool(abs(np.mean(covered[1000:]) - 0.9) < 0.02), bool(np.mean(width[1000:]) < 1.2)  # oracle 0.99
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tidecast.models.base import check_between, check_count, check_positive, check_rate
from tidecast.models.rows import Column
from tidecast.monitors.conformal.base import (
    MAX_WINDOW,
    Block,
    ScoreCalibrator,
    bounds,
    prior_thresholds,
)
from tidecast.monitors.conformal.scorecaster import lag_table, solve_ridge

#: Below this a scale (and the thresholds it multiplies) is 0 in the float32 ring (see ``_learn``).
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
#: A scale this many times below its cell's running median |r| (the outlier guard) has been decayed by stuck
#: residuals (|u| exactly 0 or float rounding, reached as the intercept decays: ~3,000 stuck steps at h = 1, ~12,000
#: at h = 24), not learned from the series: the cell treats it as none.
DEAD_SCALE = 1e-12
#: The scorecaster's largest AR order: each cell keeps an order x order matrix (64: 32 KB a cell, float64).
MAX_ORDER = 64


class ConformalPID(ScoreCalibrator):
    """Quantile tracker + saturating integrator + AR scorecaster over a (rows, horizon) table."""

    name = "conformal-pid"

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        lr: float = 0.05,
        scorecaster: str | None = "ar",
        order: int = 1,
        period: int = 24,
        forget: float = 0.995,
        ridge: float = 0.01,
        scale_decay: float = 0.05,
        scale_memory_per_h: float = 4.0,
        mean_memory_per_h: float = 16.0,
        mean_decay: float = 0.01,
        ki: float = 0.0,
        csat: float = 5.0,
        normalize: bool = True,
        symmetric: bool = False,
        reseed_keep: float = 0.75,
    ) -> None:
        check_rate("lr", lr)
        if scorecaster:  # each cell keeps an order x order matrix: 100,000 asked for 74.5 GiB at the first cell
            check_count("order", order, high=MAX_ORDER)
        check_count("period", period, high=MAX_WINDOW)
        check_between("forget", forget, 0, 1, open_low=True)
        check_between("ridge", ridge, 0, math.inf, open_high=True)
        check_between("scale_decay", scale_decay, 0, 1, open_low=True)
        check_between("mean_decay", mean_decay, 0, 1, open_low=True)
        check_between("scale_memory_per_h", scale_memory_per_h, 0, math.inf, open_high=True)
        check_between("mean_memory_per_h", mean_memory_per_h, 0, math.inf, open_high=True)
        check_between("ki", ki, 0, math.inf, open_high=True)
        check_positive("csat", csat, finite=True)
        check_between("reseed_keep", reseed_keep, 0, 1)
        self.lr = lr
        self.reseed_keep = reseed_keep
        self.scorecaster = scorecaster
        self.order = order if scorecaster else 0
        self.period = period
        self.forget = forget
        self.ridge = ridge
        self.scale_decay = scale_decay
        self.scale_memory_per_h = scale_memory_per_h
        # Per-horizon scale rate: the h-step cell's newest information is h steps old, so following volatility
        # faster than that only adds noise; its memory grows by scale_memory_per_h steps per extra step of delay.
        self.scale_rate_ = 1.0 / (1.0 / scale_decay + scale_memory_per_h * np.arange(horizon))
        self.mean_memory_per_h = mean_memory_per_h
        self.mean_rate_ = 1.0 / (1.0 / mean_decay + mean_memory_per_h * np.arange(horizon))
        self.mean_decay = mean_decay
        self.ki = ki
        self.csat = csat
        self.normalize = normalize
        self.lags_ = lag_table(horizon, scorecaster, order, period) if scorecaster else np.zeros((horizon, 0), int)
        # Ring of the last B_h steps per cell: (residual, issued centre, issued thresholds). The h-step cell needs
        # B_h >= h (the interval it issued h updates ago) and >= its largest lag. Ragged over h, packed per row.
        h1 = np.arange(1, horizon + 1)
        self.ring_len_ = np.maximum(h1, self.lags_.max(1) if self.lags_.size else 0)
        self.ring_start_ = np.concatenate([[0], np.cumsum(self.ring_len_)[:-1]])
        self.ring_cols_ = -(-int(self.ring_len_.sum()) // horizon)  # ceil: slots per row = horizon * cols
        self._simple_ring = bool(np.all(self.ring_len_ == h1))  # the slot read is the slot written
        self._ar1 = self.order == 1 and scorecaster == "ar"  # the default: its one lag is the issued slot's
        # Per-cell geometry over a run of cells starting at a row's first horizon (derived, not state): first ring
        # slot relative to that row, h (1-based), scale and intercept rates. Sized to the longest run learned at
        # once, not to the table: at H = 96 a table-sized copy cost ~3 kB a series.
        self._run_base = np.zeros(0, np.int64)
        self._run_h1 = np.zeros(0, np.int64)
        self._run_rate = np.zeros(0)
        self._run_mean_rate = np.zeros(0)
        # Prior thresholds in units of mean |u| (base.prior_thresholds). A new cell starts there; in residual
        # units (normalize=False) p is the threshold itself, so until the cell's first issued interval is
        # scored it follows the prior times its scale (see _learn), and walks from there.
        prior = prior_thresholds(np.atleast_1d(np.asarray(alpha, dtype=float)), symmetric)
        self.prior_ = prior if normalize else np.zeros_like(prior)
        super().__init__(horizon, alpha, symmetric)

    _separate = ("ring",)
    ring_ = Column("ring")

    def _state_spec(self) -> dict:
        k, p = self.n_targets_, self.order
        return {
            "count": ((), 0, np.int64),  # residuals seen
            "pos": ((), 0, np.int64),  # ring slot the next residual goes to (count mod ring length)
            "mean": ((), 0.0, float),  # exponential mean of r (the scorecaster's intercept)
            "scale": ((), 0.0, float),  # exponential mean of |u|
            "p": ((k,), self.prior_, float),  # P term
            "integral": ((k,), 0.0, float),  # sum(miss - a)
            "xx": ((p, p), 0.0, float),  # forgotten sum of x x^T
            "xy": ((p,), 0.0, float),  # forgotten sum of x y
            "coef": ((p,), 0.0, float),
            # float32: 10k series x 24 horizons x 13 slots x 4 values = 48 MiB (312 slots a series)
            "ring": ((self.ring_cols_, 2 + k), 0.0, np.float32),
        }

    def seed(self, rows: np.ndarray, residuals: np.ndarray) -> None:
        """Two passes over the seeds (see the module docstring): the scorecaster learns on the first, the scale,
        thresholds and ring on the second, with that scorecaster from the start."""
        rows, r = self._seed_input(rows, residuals)
        self._seed(rows, r)

    #: What a cell has learned about its series' errors (on a promotion, a mix of the old model's and the new one's),
    #: and the scorecaster's part of it, which exists with ``order`` > 0 only.
    _SCORECASTER_FIELDS = ("xx", "xy", "coef")
    _RESEED_FIELDS = ("p", "scale", "mean", *_SCORECASTER_FIELDS)

    def reseed(self, rows: np.ndarray, residuals: np.ndarray) -> None:
        """As :meth:`seed`, for the same series under a new model (a retrain's promotion): every statistic the
        cell learns — thresholds ``p``, scale, intercept and scorecaster — is the weighted mean of the one learned
        from the new model's residuals (a 96-step shadow window, scored in sample) and the one the cell had learned
        over its life (``reseed_keep``: the weight of the old ones; a cell that had learned nothing keeps its
        seeds' alone).

        ``reseed_keep`` 0.75 weighs the two by the steps behind them: the tracker's memory at a 5 % tail,
        1 / (lr * density of u / scale there) ~ 240 steps for Gaussian errors, against a shadow window's 96. The
        shadow window also flatters the new model: it was promoted *because* its errors there were small, so
        the size of its errors taken from that window alone is biased low, and the old cell's size pulls it
        back toward what live errors will be. On bench/retrain.py's dev streams, coverage of the intervals
        issued in the two cycles after a promotion (ETTh2 rows): with ``p`` alone mixed, 0.875 after a
        drift-triggered and 0.829 after a periodic one; with every statistic mixed, 0.886 and 0.875 (README,
        "Retraining policies")."""
        rows, r = self._seed_input(rows, residuals)
        names = [n for n in self._RESEED_FIELDS if self.order or n not in self._SCORECASTER_FIELDS]
        old = {name: self.state_[self._layout[name][0], rows].copy() for name in names}
        learned = self.state_[self._layout["count"][0].start, rows] > 0
        self._seed(rows, r, keep=(old, learned))

    def _seed(self, rows: np.ndarray, r: np.ndarray,
              keep: tuple[dict[str, np.ndarray], np.ndarray] | None = None) -> None:
        if rows.size == 0:
            return
        self.reset_rows(rows)
        self._replay(rows, r)
        if self.order:
            learned = {name: self.state_[self._layout[name][0], rows].copy() for name in self._SCORECASTER_FIELDS}
            pairs = self.state_[self._layout["count"][0].start, rows] - self.ring_len_  # (lag, residual) pairs
            self.reset_rows(rows)
            for name, value in learned.items():
                self.state_[self._layout[name][0], rows] = value
            self._replay(rows, r)
            self.state_[self._layout["scale"][0].start, rows] *= self._out_of_sample_factor(pairs)
        if keep is not None:
            old, had = keep
            weight = self.reseed_keep * had  # (n, H), broadcast over each field's leading axis
            for name, value in old.items():
                field = self._layout[name][0]
                self.state_[field, rows] = (1.0 - weight) * self.state_[field, rows] + weight * value
        if self.order or keep is not None:  # scale or p changed after the last learn step
            self._refresh_offsets(rows)
        self._after_seed(rows)

    def _refresh_offsets(self, rows: np.ndarray) -> None:
        """Recompute the thresholds of ``rows``' learned cells from their state, after the scale or ``p`` changed
        outside :meth:`_learn`: the cached offsets and the newest ring slot (the interval issued now, which a
        residual h updates later is scored against). Centres are unchanged."""
        field = self._layout
        count = self.state_[field["count"][0].start, rows]
        thr = self._thresholds(self.state_[field["p"][0], rows], self.state_[field["integral"][0], rows], count,
                               self.state_[field["scale"][0].start, rows])  # (K, n, H)
        learned = count > 0
        offsets = self.offsets_[rows]
        offsets[..., 1:] = np.where(learned[..., None], np.moveaxis(thr, 0, -1), offsets[..., 1:])
        self.offsets_[rows] = offsets
        cells = (rows[:, None] * self.horizon + np.arange(self.horizon)).ravel()[learned.ravel()]
        base, h1 = self._cell_slots(cells)
        length = h1 if self._simple_ring else self.ring_len_[h1 - 1]
        pos = self.state_[field["pos"][0].start, rows][learned].astype(np.int64)
        ring = self.ring_.reshape(-1, 2 + self.n_targets_)
        ring[base + (pos - 1) % length, 2:] = offsets[learned][:, 1:]

    def _out_of_sample_factor(self, pairs: np.ndarray) -> np.ndarray:
        """How much larger a seeded cell's ``|u|`` will be live than on its seeds. The second pass scores the
        seeds with a scorecaster fitted on those very seeds, and an in-sample fit's errors understate its forecast
        errors: by ``(m + k) / (m - k)`` in squared error for ``k`` coefficients fitted on ``m`` pairs (OLS; the
        intercept counts). Short seeds under-covered without it (a promoted model's 96 shadow residuals: 0.886
        instead of 0.90 on AR(1) residuals at H = 24, 0.84 from 48)."""
        k = self.order + 1
        remembered = 1.0 / (1.0 - self.forget) if self.forget < 1 else np.inf  # forget = 1: remembers every pair
        m = np.minimum(np.maximum(pairs, 0), remembered)  # forgetting bounds what the fit remembers
        return np.sqrt(np.clip((m + k) / np.maximum(m - k, 1.0), 1.0, 4.0))

    def _after_seed(self, rows: np.ndarray) -> None:
        """Record the ``h - 1`` intervals issued before a seeded h-step cell's first live residual (see the module
        docstring): slots of (no residual, current offsets), one per tick, advancing ``pos`` and ``count``."""
        if self.horizon == 1:
            return
        cells = (np.asarray(rows, dtype=np.intp)[:, None] * self.horizon + np.arange(self.horizon)).ravel()
        cell_base, h1 = self._cell_slots(cells)
        flat = self.state_.reshape(self._fill.size, -1)
        blk = Block(flat[:, cells], self._layout)
        count, pos = blk.fields("count")[0], blk.fields("pos")[0]
        length = h1 if self._simple_ring else self.ring_len_[h1 - 1]
        width = 2 + self.n_targets_
        ring = self.ring_.reshape(-1, width)
        # residual NaN: the lag this slot stands for is unknown to the cell (see _learn)
        slot = np.concatenate([np.full((cells.size, 1), np.nan), self.offsets_.reshape(-1, 1 + self.n_targets_)[cells]],
                              axis=1)
        started = count > 0  # a cell with nothing seeded issues no interval: nothing to record
        for k in range(1, self.horizon):
            pad = started & (h1 > k)
            if not pad.any():
                break
            ring[cell_base[pad] + pos[pad].astype(np.int64)] = slot[pad]
            pos[pad] += 1
            pos[pad] -= length[pad] * (pos[pad] >= length[pad])
            count[pad] += 1
        flat[:, cells] = blk.data

    keeps_issued_intervals = True

    def issued_intervals(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The intervals the next :meth:`update` scores against (the ring slot it reads, see *Delayed feedback*):
        the engine's pending forecasts need not keep their bounds. Exact while a cell learns at every tick; after
        a gap the h-step cell's slot is its h-th last update's, as for the controller itself. A cell that has not
        filled its ring yet issued no interval then: ``NaN``."""
        rows = np.asarray(rows, dtype=np.intp)
        means = np.asarray(means, dtype=float).reshape(rows.size, self.horizon)
        if rows.size == 0:
            return np.zeros((0, self.horizon, self.alphas_.size)), np.zeros((0, self.horizon, self.alphas_.size))
        self.resize(int(rows.max()) + 1)
        cells = (rows[:, None] * self.horizon + np.arange(self.horizon)).ravel()
        flat = self.state_.reshape(self._fill.size, -1)
        count = flat[self._layout["count"][0], cells][0].astype(np.int64)
        pos = flat[self._layout["pos"][0], cells][0].astype(np.int64)
        base, h1 = self._cell_slots(cells)
        # the slot update() reads next: with ring length h it is the one about to be overwritten
        at = base + pos if self._simple_ring else (count - h1) % self.ring_len_[h1 - 1] + base
        width = 2 + self.n_targets_
        got = self.ring_.reshape(-1, width)[at, 1:].astype(float)  # (cells, 1 + K): centre, thresholds
        got[count < h1] = np.nan  # nothing issued h updates ago
        q = got[:, 1:].reshape(rows.size, self.horizon, self.alphas_.size, -1)  # (n, H, levels, sides)
        q_hi, q_lo = q[..., 0], q[..., -1]
        mid = (means + got[:, 0].reshape(rows.size, self.horizon))[..., None]
        return bounds(mid, q_hi, q_lo, self.alphas_)  # as intervals() issued them

    def _thresholds(self, p: np.ndarray, integral: np.ndarray, count: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The issued thresholds (K, ...) from a cell's P term, integral, count and scale (see the module docstring):
        in residual units, as the ring and the cached offsets keep them."""
        thr = p + self._integral_term(integral, count) if self.ki else p
        return thr * scale if self.normalize else thr

    def _integral_term(self, integral: np.ndarray, count: np.ndarray) -> np.ndarray | float:
        """``K_I tan(I log(n) / (C_sat n))`` for integrals (K, m) after ``count`` (m,) residuals."""
        if self.ki == 0.0:
            return 0.0
        n = np.maximum(count, 1.0)
        arg = integral * (np.log(n + 1) / (self.csat * (n + 1)))
        # tan saturates: bounded to +-tan(1.4) ~ 5.8 so a pathological stream stays finite.
        return self.ki * np.tan(np.clip(arg, -1.4, 1.4))

    def _cell_slots(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First ring slot and h (1-based) of each flat cell ``row * horizon + h``."""
        h = cells % self.horizon
        return (cells // self.horizon) * (self.horizon * self.ring_cols_) + self.ring_start_[h], h + 1

    def _run_geometry(self, start: int, n: int) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
        """Per-cell tables for the contiguous run of cells ``start .. start + n - 1``, as views: first ring slot
        relative to the run's first row (add the returned row offset), h (1-based), scale rate, intercept rate."""
        skip = start % self.horizon
        if self._run_h1.size < skip + n:
            n_cells = -(-(skip + n) // self.horizon) * self.horizon
            self._run_base, self._run_h1 = self._cell_slots(np.arange(n_cells))
            self._run_rate = self.scale_rate_[self._run_h1 - 1]
            self._run_mean_rate = self.mean_rate_[self._run_h1 - 1]
        run = slice(skip, skip + n)
        row_offset = (start // self.horizon) * (self.horizon * self.ring_cols_)
        return self._run_base[run], row_offset, self._run_h1[run], self._run_rate[run], self._run_mean_rate[run]

    def _lagged(
        self, ring: np.ndarray, base: np.ndarray, length: np.ndarray, count: np.ndarray, back: np.ndarray,
        mean: np.ndarray,
    ) -> np.ndarray:
        """Residuals ``back`` (p, m) updates before update ``count``, centred on ``mean``; 0 where unseen."""
        pos = count - back
        pos %= length
        pos += base
        x = ring[pos, 0].astype(float)
        x -= mean
        if count.min() < back.max():  # young cells: lags not seen yet read as the mean
            x = np.where(count >= back, x, 0.0)
        return x

    def _young_prior(self, ring: np.ndarray, base: np.ndarray, count: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Thresholds (K, m) for cells that have seen ``count`` residuals, all still in their ring (slots
        ``base .. base + count - 2``, then ``r``): the Gaussian quantile times the median |r| over 0.6745."""
        seen = np.arange(int(count.max()))
        slots = ring[base[:, None] + np.minimum(seen, count[:, None] - 1), 0].astype(float)
        slots[seen >= count[:, None]] = np.nan  # not seen yet (a seeded cell's padding slots hold NaN too)
        slots[np.arange(r.size), count - 1] = r  # the slot r goes to, written after this
        sizes = np.sort(np.abs(slots), axis=1)  # NaN last
        rows, known = np.arange(r.size), np.count_nonzero(~np.isnan(slots), axis=1)  # >= 1: r
        size = (sizes[rows, (known - 1) // 2] + sizes[rows, known // 2]) / (2 * 0.6745)  # a Gaussian's sigma
        return self.prior_per_scale_[:, None] * np.sqrt(2 / np.pi) * size

    def _learn(self, blk, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        # Everything below is (K, m) or (p, m) on contiguous rows, updated in place where possible: this is the
        # hot path (10k series x 24 horizons = 240k cells a call).
        count_f = blk.fields("count")[0]
        young = count_f.min() < self.ring_len_.max()  # some cell has not filled its ring yet
        mean, scale = blk.fields("mean")[0], blk.fields("scale")[0]
        width = 2 + self.n_targets_
        # Slot j of cell c is ring[base_c + j] = (residual, issued centre, issued thresholds): one cache line, so
        # each update reads one slot and writes one slot per cell.
        ring = self.ring_.reshape(-1, width)
        # numpy gathers and scatters whole rows far faster as single opaque items than as (m, width) floats.
        slot_type = np.dtype((np.void, width * ring.itemsize))
        items = ring.view(slot_type).reshape(-1)
        # Cells arrive sorted; a contiguous run (the engine's usual batch) reads the per-cell tables as views.
        if cells[-1] - cells[0] + 1 == cells.size:
            base, row_offset, h1, cell_rate, cell_mean_rate = self._run_geometry(int(cells[0]), cells.size)
            if row_offset:
                base = base + row_offset
        else:
            base, h1 = self._cell_slots(cells)
            cell_rate, cell_mean_rate = self.scale_rate_[h], self.mean_rate_[h]
        pos_f = blk.fields("pos")[0]
        new = pos_f.astype(np.int64)
        new += base
        # The interval this residual falls in was issued h updates ago; its (centre, thresholds) are in the ring.
        # Scoring against it (not against today's state, which has since seen h - 1 newer residuals) is what
        # keeps coverage exact under delayed feedback. With ring length h (the default) that slot is the one
        # about to be overwritten.
        if not self._simple_ring or (self.order and not self._ar1):
            length = self.ring_len_[h]
            count = count_f.astype(np.int64)
        if self._simple_ring:
            at = new
        else:
            at = count - h1
            at %= length
            at += base
        # One transposing copy makes every field a contiguous (m,) row: strided reads of the (m, width) slots
        # cost more than the copy.
        got = np.ascontiguousarray(items[at].view(ring.dtype).reshape(-1, width).T, dtype=float)  # (width, m)
        y = r - mean  # the residual around the intercept (the regression target)
        unknown = None  # cells whose lag is a slot recorded after seeding (NaN residual): the lag is not known
        if self.order:
            coef = blk.fields("coef")
            if self._ar1:  # the lag-h residual shares the issued slot
                x = got[0] - mean
                if np.isnan(x).any():
                    unknown = np.isnan(x)
                    x[unknown] = 0.0
                if young:
                    x *= count_f >= h1
                u = y - coef[0] * x
                x = x[None, :]
            else:
                lags = self.lags_.T[:, h]  # (p, m)
                x = self._lagged(ring, base, length, count, lags, mean)
                if np.isnan(x).any():
                    unknown = np.isnan(x).any(axis=0)
                    x[np.isnan(x)] = 0.0
                u = y - (coef * x).sum(0)
        else:
            u = r
        # P and I on the issued interval's misses.
        p = blk.fields("p")
        dev = r - got[1]
        s = np.abs(dev)[None, :] if self.symmetric else self.target_sign_[:, None] * dev
        err = (s > got[2:]).astype(float)  # miss
        err -= self.target_alpha_[:, None]
        if young:  # nothing was issued yet for this target: only learn the scale
            err *= count_f >= h1
        integral = blk.fields("integral")
        if self.ki:
            integral += err
        p += err * (self.lr if self.normalize else self.lr * scale)
        no_scale = None
        if self.normalize:
            # A cell without a scale (a stuck input forecast exactly) issues zero-width intervals whatever p is,
            # and a residual of 0 on them is never a miss: p fell by lr * alpha every step, without end, and once
            # the series moved again its intervals stayed inverted for hundreds of steps (coverage 0 after 20,000
            # stuck steps). Its p says nothing then, so it holds the prior, as in a new cell. "Without" is below
            # float32's smallest normal number, not only 0: the ring keeps the issued thresholds in float32, so a
            # scale that decays towards 0 (a series that varied, then stuck) is issued as 0 from ~1e-38 on. Nor is
            # a scale worth more that stuck residuals decayed (r exactly 0, or exactly the constant the intercept
            # learned: |u| is then 0 or float rounding): 5,000 stuck steps took it to 6e-24, above the float32
            # floor, while p fell to -0.78 (coverage 0.24 over the 50 steps after the series moved again). Its
            # size beside the cell's running median |r| (the guard, which zeros leave alone) tells: DEAD_SCALE is
            # far below any real noise (a steady offset of 1000 with noise 1e-4 is at 1e-7) and far above rounding.
            no_scale = scale <= np.maximum(_FLOAT32_TINY, DEAD_SCALE * blk.fields("guard")[0])
            if no_scale.any():
                p[:, no_scale] = self.prior_[:, None]
            else:
                no_scale = None
        count_f += 1
        # Scale and intercept: running means first, exponential forgetting afterwards.
        rate = cell_rate if self.scale_memory_per_h else self.scale_decay
        if count_f.min() * np.min(rate) < 1.0:  # running mean first, exponential forgetting afterwards
            rate = np.maximum(rate, 1.0 / count_f)
        if no_scale is not None:  # a scale that died restarts from the next residual, as a new cell's first
            rate = np.where(no_scale, 1.0, rate)
        if unknown is not None:  # without its lag, u is the whole residual: it says nothing about the scale of u
            rate = np.where(unknown, 0.0, rate)
        scale += rate * (np.abs(u) - scale)
        if young and not self.normalize:
            # In residual units p is the threshold and starts at 0; until the cell's first issued interval is
            # scored (its err was masked above) nothing moves it, so the tracker issued zero-width intervals,
            # the point forecast itself, for the first h steps of every h-step cell. Until then it is the
            # Gaussian prior on the median |r| the cell has seen (all in its ring yet), not on the mean: p walks
            # down by only lr * scale * a a step, so a start inflated by one wild first residual stayed too wide
            # for thousands of steps.
            unscored = np.flatnonzero(count_f <= h1)
            if unscored.size:
                seen = count_f[unscored].astype(np.int64)
                p[:, unscored] = self._young_prior(ring, base[unscored], seen, r[unscored])
        if self.order:
            xx = blk.fields("xx")  # (p*p, m), row-major p x p
            xy = blk.fields("xy")
            xx *= self.forget
            xy *= self.forget
            if self.order == 1:  # the default: scalar least squares, same formula as solve_ridge
                xx += x * x
                xy += x * y
                np.divide(xy, xx * (1 + self.ridge) + 1e-12, out=coef)
            else:
                xx += (x[:, None, :] * x[None, :, :]).reshape(-1, x.shape[1])
                xy += x * y
                a_mat = np.moveaxis(xx.reshape(self.order, self.order, -1), -1, 0)
                coef[...] = solve_ridge(a_mat, xy.T, self.ridge).T
            # A residual's autocorrelation lies in [-1, 1]; a few early residuals (x ~ 0, y large) can give any
            # least-squares slope, and an unbounded one re-centres the interval far off (NYC taxi, first days:
            # widths of 1e10). Clipping keeps the scorecaster a contraction.
            np.clip(coef, -1.0, 1.0, out=coef)
        rate = cell_mean_rate if self.mean_memory_per_h else self.mean_decay
        if count_f.min() * np.min(rate) < 1.0:
            rate = np.maximum(rate, 1.0 / count_f)
        mean += rate * y
        pos_f += 1
        limit = h1 if self._simple_ring else self.ring_len_[h]
        pos_f -= limit * (pos_f >= limit)
        # The new slot, field-major (residual, centre, thresholds) x m: the offsets for the forecast issued now
        # (its target is h steps ahead: lags shift by h - 1) behind the residual just seen.
        slot = np.empty((width, r.size))
        slot[0] = r
        if self._ar1:
            slot[1] = mean + coef[0] * (r - mean)  # the only lag is the residual just seen
        elif self.order:
            back = lags - h
            ring[new, 0] = r  # the newest lag
            slot[1] = mean + (coef * np.nan_to_num(self._lagged(ring, base, length, count + 1, back, mean))).sum(0)
        else:
            slot[1] = 0.0
        slot[2:] = self._thresholds(p, integral, count_f, scale)
        stored = np.ascontiguousarray(slot.T, dtype=ring.dtype)
        items[new] = stored.view(slot_type).reshape(-1)
        # publish the offsets as the ring keeps them: a miss is scored against the stored copy, and a centre of
        # 1e8 rounds to float32's steps of 8 (0.56 sd apart on a residual bias 1e8 times its noise: shown
        # intervals covered 0.79 while scored ones covered 0.90)
        return stored[:, 1:].astype(float)  # (m, 1 + K)
