"""The calibrator interface: online conformal intervals over a table of (row, horizon) cells.

A calibrator never sees a model. It sees, for every (series row, horizon h), the signed residual
``y - yhat`` of the h-step forecast *when it matures* (h ticks after it was issued; the engine guarantees this
delay, so nothing from the future leaks), and turns a new point forecast into ``(lower, upper)``.

Everything is a numpy array over rows x horizons — no Python object per series — so one call updates every cell
that matured in a batch. State is exported per row (first axis = rows) so one series' calibrators can be cut out,
checkpointed and moved.

Scores are two one-sided ones by default: ``s_hi = y - yhat`` drives the upper offset, ``s_lo = yhat - y`` the
lower one, each at miscoverage ``alpha / 2``; intervals may then be asymmetric where the residuals are.
``symmetric=True`` uses ``|y - yhat|`` at ``alpha`` instead. ``alpha`` may be a sequence: every level is learned
in the same pass; :meth:`Calibrator.interval` returns the first, :meth:`Calibrator.intervals` all of them.

A cell that has learned nothing yet has no interval: its bounds are ``NaN`` ("not ready"), never the point forecast
itself (a zero-width interval would claim certainty). Bounds may be ``+-inf`` where a method says so (ACI).

**Outlying residuals.** One absurd value (a unit error, ``1e20`` on data of scale 10) must not poison a cell for
the rest of the run. Every :class:`ScoreCalibrator` cell keeps a *guard*: a running median of ``|r|``, tracked
multiplicatively (``g <- g * exp(+-guard_rate / 2)`` as ``|r|`` is above or below it), so one value moves it by
2.5 % at most; a residual of exactly 0 leaves it alone (a series that is often exactly right would pull a median
of ``|r|`` to 0 and have every residual after it clipped to nothing). Before a method learns a residual it is
clipped to ``+-outlier_limit * g`` (30: the largest ``|r| / g`` on the bench's real streams is 21.5, ETTh1), never
to less than ``MISS_MARGIN`` (2) times the reach of the interval the cell holds, and, whatever the guard says, to
``+-MAX_RESIDUAL`` (``1e30``: squares and sums stay finite, and so does a float32 copy). A clipped residual beyond
the cell's interval is therefore still learned as a miss, and a heavy tail's high quantile stays reachable; it
only cannot blow up the scale, the thresholds or the scorecaster. A cell's first ``guard_warmup`` (20) non-zero
residuals start its guard as the running mean of their clipped ``|r|``, so a tiny first residual cannot hold the
ordinary ones after it clipped for long (zeros do not count: after a stuck start, the guard began at the first
tiny residual once the series moved, and clipped ordinary ones for hundreds of steps); the first ``GUARD_START``
(3) are judged by the row's cells that have guards of their own (scaled by the square root of the horizons'
ratio), the rest of the warm-up by the cell's own guard.

**Seeding.** :meth:`Calibrator.seed` starts rows afresh from residual sequences a model hands over
(:class:`~tidecast.models.base.Calibration`: a fit's validation residuals, a backtest): the rows are blanked and
the sequences replayed in time order through :meth:`~Calibrator.update`, exactly as if the cells had seen those
residuals mature, so every method's state (scale, quantile state, scorecaster history, ring of issued intervals)
is what it would have been. A method that scores each residual against the interval it issued h updates earlier
(:class:`~tidecast.monitors.conformal.pid.ConformalPID`) also records the intervals it issues while its first
live h-step residual is on its way (:meth:`Calibrator._after_seed`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from tidecast.models.base import Params
from tidecast.models.rows import Column, Field, RowTable, grow  # grow lives in models.rows; still importable here

ArrayDict = dict[str, np.ndarray]

#: No residual beyond this magnitude is learned (it is clipped): squares and sums of any learned value stay finite,
#: and a float32 copy (conformal PID's ring of issued intervals; float32 ends at 3.4e38) stays finite too.
MAX_RESIDUAL = 1e30
#: Residuals a cell learns before its guard clips anything (see ``ScoreCalibrator._guard``); also the values a
#: running scale takes in before :func:`bounded_by_scale` bounds what it learns.
GUARD_START = 3
#: A residual is never clipped to less than this many times the reach of the interval its cell holds
#: (:func:`reach`), so a clipped residual beyond that interval is still a miss.
MISS_MARGIN = 2.0
#: A running mean |r| (or |step|) learns a value as at most this many times itself (:func:`bounded_by_scale`).
SCALE_OUTLIER_LIMIT = 30.0
#: The largest per-cell window a calibrator keeps (ACI's scores, SPCI's history, PID's seasonal lag, SAOCP's
#: experts): a billion asked for 179 GiB and ended the run in a MemoryError traceback instead of a settings error.
MAX_WINDOW = 100_000


def bounded_by_scale(size: np.ndarray, scale: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``size`` (a |residual| or |step|) as the running ``scale`` that saw ``count`` values should learn it: at
    most :data:`SCALE_OUTLIER_LIMIT` scales once :data:`GUARD_START` values have started it (before that, or with
    no scale yet, as it is). One absurd value (a unit error) then moves a scale as one large value would, instead
    of inflating it for thousands of steps.

    >>> bounded_by_scale(np.array([1e14, 1e14, 5.0]), np.array([1.0, 1.0, 1.0]), np.array([3, 2, 3])).tolist()
    [30.0, 100000000000000.0, 5.0]
    """
    return np.where((count >= GUARD_START) & (scale > 0), np.minimum(size, SCALE_OUTLIER_LIMIT * scale), size)


def reach(offsets: np.ndarray) -> np.ndarray:
    """How far from the point forecast each cell's interval reaches, (m,) from (m, 1 + K) offsets (centre,
    thresholds): ``|centre| + max |threshold|``, non-finite parts (no interval yet, ACI's unbounded) as 0."""
    size = np.abs(offsets)
    size[~np.isfinite(size)] = 0.0
    return size[:, 0] + size[:, 1:].max(axis=1)


def bounds(mid: np.ndarray, q_hi: np.ndarray, q_lo: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` (n, H, levels) from a centre and the one-sided thresholds above and below it.

    A negative total width (both thresholds below the centre) is an empty set: it is issued as its middle point,
    written once so that lower <= upper holds to the last bit (two float expressions of the same point differed
    by one ulp). Levels nest: a wider level's interval contains every narrower one's (each level's thresholds
    are learned apart and may cross by a little; a fan chart must not).

    >>> lo, hi = bounds(np.zeros((1, 1, 2)), np.array([[[1.0, 0.9]]]), np.array([[[1.0, 1.2]]]), np.array([0.2, 0.1]))
    >>> lo.tolist(), hi.tolist()  # the 90 % upper threshold (0.9) is raised to the 80 % one (1.0)
    ([[[-1.0, -1.2]]], [[[1.0, 1.0]]])
    """
    gap = np.minimum(q_hi + q_lo, 0.0) / 2
    lower = mid - q_lo + gap
    upper = np.maximum(mid + q_hi - gap, lower)
    if lower.shape[-1] > 1:
        order = np.argsort(-np.asarray(alphas), kind="stable")  # narrowest level first
        lower[..., order] = np.fmin.accumulate(lower[..., order], axis=-1)
        upper[..., order] = np.fmax.accumulate(upper[..., order], axis=-1)
    return lower, upper


class Calibrator(Params, ABC):
    """Base class. Constructor stores parameters (``get_params`` is derived from its signature); fitted arrays
    end in ``_`` and have shape (rows, horizon, ...)."""

    #: Registry name, e.g. ``"quantile-tracker"``.
    name: str = "calibrator"

    def __init__(self, horizon: int, alpha: float | Sequence[float] = 0.1) -> None:
        alphas = np.atleast_1d(np.asarray(alpha, dtype=float))
        if alphas.ndim != 1 or alphas.size == 0 or not np.all((alphas > 0.0) & (alphas < 1.0)):
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self.alpha = alpha
        self.alphas_ = alphas
        self.n_rows_ = 0

    # -- table management -------------------------------------------------------------------------
    @abstractmethod
    def resize(self, n_rows: int) -> None:
        """Grow the table to at least ``n_rows`` rows; new rows start from the prior."""

    # -- the two verbs ------------------------------------------------------------------------------
    @abstractmethod
    def update(self, rows: np.ndarray, residuals: np.ndarray, mask: np.ndarray) -> None:
        """Learn from matured residuals.

        rows: unique int row indices, shape (n,). residuals: ``y - yhat``, shape (n, horizon); column ``h-1``
        is the residual of the h-step forecast issued h ticks ago. mask: bool (n, horizon), False where
        nothing matured (cells under warm-up or after a reset); masked cells must be left untouched.
        """

    @abstractmethod
    def interval(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` around point forecasts ``means`` of shape (n, horizon). May be +-inf; ``NaN`` where
        the cell has learned nothing yet (no interval)."""

    def intervals(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` of shape (n, horizon, len(alphas_)), one slice per level in ``alpha``."""
        lo, hi = self.interval(rows, means)
        return lo[..., None], hi[..., None]

    # -- seeding and pooling --------------------------------------------------------------------------
    def seed(self, rows: np.ndarray, residuals: np.ndarray) -> None:
        """Start ``rows`` afresh from residual sequences (n, T, H'), oldest first, ``NaN`` where absent
        (``residuals[i, t, h-1]`` matured at step t; see :class:`~tidecast.models.base.Calibration`): blank the
        rows, replay the steps through :meth:`update` as if seen in order, then :meth:`_after_seed`. Columns
        beyond ``horizon`` are ignored, missing ones are absent."""
        rows, r = self._seed_input(rows, residuals)
        if rows.size == 0:
            return
        self.reset_rows(rows)
        self._replay(rows, r)
        self._after_seed(rows)

    def reseed(self, rows: np.ndarray, residuals: np.ndarray) -> None:
        """The same series under a new model (a retrain's promotion or rollback), from that model's residuals; a
        calibrator may keep what does not depend on the model. The default: :meth:`seed`."""
        self.seed(rows, residuals)

    def _seed_input(self, rows: np.ndarray, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Checked ``(rows, residuals)``, residuals cut or padded (NaN) to ``horizon`` columns; rows fit the table."""
        rows = np.asarray(rows, dtype=np.intp)
        r = np.asarray(residuals, dtype=float)
        if r.ndim != 3 or r.shape[0] != rows.size:
            raise ValueError(f"seed residuals must be (rows, steps, horizon) with {rows.size} rows, got {r.shape}")
        if r.shape[2] != self.horizon:
            fitted = np.full((rows.size, r.shape[1], self.horizon), np.nan)
            k = min(r.shape[2], self.horizon)
            fitted[..., :k] = r[..., :k]
            r = fitted
        if rows.size:
            self.resize(int(rows.max()) + 1)
        return rows, r

    def _replay(self, rows: np.ndarray, residuals: np.ndarray) -> None:
        """Feed (n, T, horizon) residual sequences to :meth:`update`, step by step."""
        finite = np.isfinite(residuals)
        for t in np.flatnonzero(finite.any(axis=(0, 2))):
            self.update(rows, np.where(finite[:, t], residuals[:, t], 0.0), finite[:, t])

    def reset_rows(self, rows: np.ndarray) -> None:
        """Make ``rows`` blank, as in a new table (the export of a fresh calibrator's row imported over them)."""
        fresh = self.clone()
        fresh.resize(1)
        blank = fresh.export_rows(np.array([0]))
        self.import_rows(rows, {k: np.repeat(v, len(rows), axis=0) for k, v in blank.items()})

    def _after_seed(self, rows: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Called after the replay of :meth:`seed`; the default does nothing."""

    def cell_counts(self, rows: np.ndarray) -> np.ndarray | None:
        """Residuals each (row, h) cell has learned, (n, horizon); ``None`` if the method does not say (then the
        engine does not pool its young cells)."""
        return None

    def offsets(self, rows: np.ndarray) -> np.ndarray:
        """``(upper - yhat, yhat - lower)`` of the intervals the cells would issue now, (n, horizon, levels, 2);
        ``NaN`` where a cell has no interval."""
        zeros = np.zeros((len(rows), self.horizon))
        lo, hi = self.intervals(rows, zeros)
        return np.stack([hi, -lo], axis=-1)

    #: Whether :meth:`issued_intervals` answers: the calibrator keeps, per cell, the interval it issued for the
    #: forecast maturing next, so the engine need not keep the bounds of its pending forecasts too.
    keeps_issued_intervals: bool = False

    def issued_intervals(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` (n, horizon, levels) of the forecasts maturing now, whose means were ``means``, as
        issued; call before :meth:`update` with the same rows. ``NaN`` where no interval was issued."""
        raise NotImplementedError(f"{type(self).__name__} does not keep the intervals it issued")

    # -- state ------------------------------------------------------------------------------------
    @abstractmethod
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        """Per-row arrays (first axis = rows)."""

    @abstractmethod
    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        """Inverse of :meth:`export_rows`."""


def targets(alphas: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-target miscoverage and sign: (alpha/2 upper, alpha/2 lower) per level, or (alpha, |.|) symmetric."""
    alphas = np.atleast_1d(np.asarray(alphas, dtype=float))
    if symmetric:
        return alphas.copy(), np.zeros(alphas.size)
    return np.repeat(alphas / 2, 2), np.tile([1.0, -1.0], alphas.size)


def prior_thresholds(alphas: np.ndarray, symmetric: bool) -> np.ndarray:
    """Each target's Gaussian quantile in units of mean ``|residual|`` (E|Z| = sqrt(2/pi)): where a cell's
    thresholds start before its own scores can place them (symmetric: a is the miss rate of |Z|, whose quantile
    is the Gaussian's at 1 - a / 2).

    >>> prior_thresholds(np.array([0.1]), symmetric=False).round(3).tolist()  # 1.645 * 1.253, both sides
    [2.062, 2.062]
    """
    a, _ = targets(alphas, symmetric)
    return gaussian_quantile(1 - a / 2 if symmetric else 1 - a) * np.sqrt(np.pi / 2)


class Block:
    """The gathered state of ``m`` cells, field-major (width, m); fields are read as (m, *tail) by name."""

    __slots__ = ("data", "layout")

    def __init__(self, data: np.ndarray, layout: dict[str, tuple[slice, tuple[int, ...]]]) -> None:
        self.data = data
        self.layout = layout

    def __getitem__(self, name: str) -> np.ndarray:
        sl, tail = self.layout[name]
        return np.moveaxis(self.data[sl].reshape(*tail, -1), -1, 0)

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        sl, tail = self.layout[name]
        value = np.broadcast_to(value, (self.data.shape[1], *tail))
        self.data[sl] = np.moveaxis(value, 0, -1).reshape(-1, self.data.shape[1])

    def fields(self, name: str) -> np.ndarray:
        """The field as stored, (prod(tail), m): contiguous rows, the fast way to read and write in place."""
        return self.data[self.layout[name][0]]


class ScoreCalibrator(Calibrator):
    """Shared machinery for calibrators that learn one threshold per *target*.

    A target is one (level, side) pair: with ``L`` levels there are ``K = 2L`` targets (upper and lower side,
    each at ``alpha/2``) or ``K = L`` with ``symmetric=True``.

    Layout, for speed at 10k series x 24 horizons: the small per-cell fields declared in :meth:`_state_spec`
    are packed field-major in one float array ``state_`` (width, rows, horizon), so an update is one gather
    and one scatter of the cells that matured and every field is contiguous; fields named in ``_separate``
    (long rings) get arrays of their own in the row table ``table_`` and are touched element-wise. The
    interval offsets are computed when a cell learns and cached in ``offsets_`` (rows, horizon, 1 + K) =
    (centre, thresholds), also in ``table_``, so :meth:`interval` is a single gather; a cell that never learned
    holds ``NaN`` there, which is its "no interval yet".
    Subclasses implement :meth:`_learn` on a :class:`Block` of matured cells and return the new offsets.
    """

    _separate: tuple[str, ...] = ()
    offsets_ = Column("offsets")
    #: Cells learned per :meth:`_learn` call. Big updates go in chunks so every temporary of the vectorised
    #: arithmetic stays in cache, and below the size at which the allocator maps and unmaps fresh pages on every
    #: call (10k series x 24 horizons in one piece: 26-30 ms an update instead of 12).
    chunk_cells: int = 16_384
    #: A residual beyond ``outlier_limit`` times the cell's running median ``|r|`` is clipped to it before learning.
    outlier_limit: float = 30.0
    #: Step of the multiplicative running median (the guard): ``log g`` moves by ``guard_rate / 2`` per residual.
    guard_rate: float = 0.05
    #: A cell's first residuals set its guard to their running mean ``|r|`` and are not clipped.
    guard_warmup: int = 20

    def __init__(self, horizon: int, alpha: float | Sequence[float] = 0.1, symmetric: bool = False) -> None:
        super().__init__(horizon, alpha)
        self.symmetric = symmetric
        self.target_alpha_, self.target_sign_ = targets(self.alphas_, symmetric)
        self.n_targets_ = self.target_alpha_.size
        self.prior_per_scale_ = prior_thresholds(self.alphas_, symmetric)
        # guard: running median of |r| (0 = not started), see the module docstring; guard_n: the non-zero
        # residuals it has taken in (its warm-up counts those, not the zeros of a stuck start).
        self._spec = {**self._state_spec(), "guard": ((), 0.0, float), "guard_n": ((), 0, np.int64)}
        self._guard_steps = np.exp(np.array([-0.5, 0.5]) * self.guard_rate)
        self.n_clipped_ = 0  # residuals clipped by the guard since this object was built (not state)
        self._layout: dict[str, tuple[slice, tuple[int, ...]]] = {}
        fills: list[float] = []
        # Offsets start at NaN: a cell that has not learned yet has no interval.
        rows = {"offsets": Field((horizon, 1 + self.n_targets_), np.float64, np.nan)}
        for name, (tail, fill, dtype) in self._spec.items():
            if name in self._separate:
                rows[name] = Field((horizon, *tail), dtype, fill)
                continue
            size = int(np.prod(tail, dtype=int))
            self._layout[name] = (slice(len(fills), len(fills) + size), tuple(tail))
            fills.extend(np.broadcast_to(np.asarray(fill, dtype=float), tail).ravel().tolist())
        self._fill = np.asarray(fills, dtype=float)
        self.table_ = RowTable(**rows)
        self.state_ = np.zeros((self._fill.size, 0, horizon))

    # -- what subclasses provide ----------------------------------------------------------------------
    def _state_spec(self) -> dict[str, tuple[tuple[int, ...], float | int, type]]:
        """``name -> (trailing shape after (rows, horizon), fill for a new row (scalar or per entry), dtype)``."""
        return {}

    @abstractmethod
    def _learn(self, blk: Block, cells: np.ndarray, h: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Learn from one residual per cell; return the new offsets (m, 1 + K) = (centre, thresholds).

        blk: the gathered state of the m matured cells (written back afterwards); cells: flat cell indices
        ``row * horizon + h`` (for the ``_separate`` arrays, reshaped to (-1, ...)); h: 0-based horizon; r: (m,).
        """

    # -- helpers --------------------------------------------------------------------------------------
    def scores(self, r: np.ndarray) -> np.ndarray:
        """Per-target scores (..., K) of residuals (...): ``r``, ``-r`` (one-sided) or ``|r|`` (symmetric)."""
        if self.symmetric:
            return np.repeat(np.abs(r)[..., None], self.n_targets_, axis=-1)
        return r[..., None] * self.target_sign_

    def flat(self, name: str) -> np.ndarray:
        """A ``_separate`` array viewed as (rows * horizon, ...)."""
        arr = self.table_[name]
        return arr.reshape(-1, *arr.shape[2:])

    # -- interface --------------------------------------------------------------------------------------
    def resize(self, n_rows: int) -> None:
        old = self.table_.capacity
        self.table_.resize(n_rows)
        capacity = self.table_.capacity
        if capacity > old:  # the packed fields follow the table's capacity
            # Grown rows-first, then one transposing copy. Freeing that big temporary also lifts glibc's mmap
            # threshold, so the interval's multi-MB temporaries later reuse heap pages instead of faulting in
            # fresh ones (10k x 24 interval: 1.8 ms instead of 5 when nothing big had been freed before).
            grown = grow(np.moveaxis(self.state_, 0, -1), capacity, 0.0)
            grown[old:] = self._fill
            self.state_ = np.ascontiguousarray(np.moveaxis(grown, -1, 0))
        self.n_rows_ = self.table_.n_rows

    def update(self, rows: np.ndarray, residuals: np.ndarray, mask: np.ndarray | None = None) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        r = np.asarray(residuals, dtype=float).reshape(rows.size, self.horizon)
        finite = np.isfinite(r)
        mask = finite if mask is None else np.asarray(mask, dtype=bool).reshape(r.shape) & finite
        if rows.size == 0 or not mask.any():
            return
        self.resize(int(rows.max()) + 1)
        if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
            # Cells are independent, so order is free: sorted rows read memory sequentially (and a permuted
            # block of rows becomes the contiguous fast path below).
            order = np.argsort(rows)
            rows, r, mask = rows[order], r[order], mask[order]
        flat = self.state_.reshape(self._fill.size, -1)
        offsets_flat = self.offsets_.reshape(-1, 1 + self.n_targets_)
        if mask.all():
            h = np.tile(np.arange(self.horizon), rows.size)
            rv = r.ravel()
            cells = (rows[:, None] * self.horizon + np.arange(self.horizon)).ravel()
        else:
            i, h = np.nonzero(mask)
            cells = rows[i] * self.horizon + h
            rv = r[i, h]
        for lo in range(0, cells.size, self.chunk_cells):
            part = slice(lo, lo + self.chunk_cells)
            chunk = cells[part]
            if chunk[-1] - chunk[0] + 1 == chunk.size:
                # Sorted unique cells spanning their count: a contiguous run (the engine's common case). Work on
                # views, no gather/scatter.
                window = slice(int(chunk[0]), int(chunk[-1]) + 1)
                blk = Block(flat[:, window], self._layout)
                offsets_flat[window] = self._learn(blk, chunk, h[part],
                                                   self._guard(blk, rv[part], chunk, offsets_flat[window]))
                continue
            blk = Block(flat[:, chunk], self._layout)
            offsets = self._learn(blk, chunk, h[part], self._guard(blk, rv[part], chunk, offsets_flat[chunk]))
            flat[:, chunk] = blk.data
            offsets_flat[chunk] = offsets

    def reset_rows(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        self.resize(int(rows.max()) + 1 if rows.size else 0)
        self.state_[:, rows] = self._fill[:, None, None]
        self.table_.blank(rows)

    def cell_counts(self, rows: np.ndarray) -> np.ndarray | None:
        if "count" not in self._layout:
            return None
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size:
            self.resize(int(rows.max()) + 1)
        return self.state_[self._layout["count"][0].start, rows].astype(np.int64)

    def offsets(self, rows: np.ndarray) -> np.ndarray:
        # From the cached offsets (ScoreCalibrator.intervals): a subclass whose intervals() does more (SPCI
        # refits forests there) is read as it stands.
        rows = np.asarray(rows, dtype=np.intp)
        lo, hi = ScoreCalibrator.intervals(self, rows, np.zeros((rows.size, self.horizon)))
        return np.stack([hi, -lo], axis=-1)

    def _guard(self, blk: Block, r: np.ndarray, cells: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Clip ``r`` (m,) to the cells' guard and move the guard (a running median of ``|r|``) towards ``|r|``.
        ``cells``: the flat cell indices; ``offsets``: the cells' current (centre, thresholds). On the hot path: a
        handful of passes over m values when nothing is clipped."""
        g = blk.fields("guard")[0]
        size = np.abs(r)
        if size.max() > MAX_RESIDUAL:
            r = np.clip(r, -MAX_RESIDUAL, MAX_RESIDUAL)
            size = np.abs(r)
        # The first guard_warmup residuals of a cell start its guard as the running mean of their (clipped) |r|,
        # which the multiplicative steps would take long to reach from one tiny first residual.
        count = blk.fields("guard_n")[0] if "count" in self._layout else None
        warm = count is not None and count.min() < self.guard_warmup
        limit = self.outlier_limit * g
        over = size > limit  # a guard not started (0) is handled below
        if warm or not g.all():
            # A cell's first GUARD_START residuals have nothing of their own to judge them by: its row's older
            # cells do (one absurd value among them was learned as it was: intervals 1e11 wide 1,000 steps later).
            young = (g == 0) if count is None else (g == 0) | (count < GUARD_START)
            over &= ~young
            judged = np.flatnonzero(young & (size > 0))
            if judged.size:
                limit[judged] = self.outlier_limit * self._row_reference(cells[judged])
                over[judged] = (limit[judged] > 0) & (size[judged] > limit[judged])
        if over.any():
            # Never clip a residual back inside the interval its cell holds: clipped, it still counts as a miss
            # (coverage is learned honestly), and a heavy tail's quantile beyond outlier_limit guards stays
            # reachable (Cauchy's 99 % one is 64 median |r|).
            at = np.flatnonzero(over)
            limit[at] = np.maximum(limit[at], np.minimum(MISS_MARGIN * reach(offsets[at]), MAX_RESIDUAL))
            over[at] = size[at] > limit[at]
        down, up = self._guard_steps
        stepped = g * np.where(size > g, up, down)
        if over.any():
            self.n_clipped_ += int(over.sum())
            r = np.where(over, np.copysign(limit, r), r)
        if warm or not g.all():  # not started (0): the first non-zero |r| starts it; warm-up: running mean
            stepped = np.where(g > 0, stepped, np.abs(r))
            if warm:
                stepped = np.where(count < self.guard_warmup, g + (np.abs(r) - g) / (count + 1.0), stepped)
        # A zero residual says nothing of the size of the others: a series that is often exactly right (a stuck
        # sensor, counts, night-time zeros) pulled a median of |r| to 0, and every residual after it was clipped.
        g[...] = np.where(size > 0, stepped, g)
        blk.fields("guard_n")[0][...] += size > 0
        return r

    def _row_reference(self, cells: np.ndarray) -> np.ndarray:
        """Per cell, the largest guard among its row's cells that have judged GUARD_START residuals, each scaled by
        sqrt((h + 1) / (h' + 1)) (a random walk's errors grow so with the horizon); 0 where the row has none."""
        rows, h = np.divmod(cells, self.horizon)
        g = self.state_[self._layout["guard"][0].start, rows]  # (k, H)
        started = g > 0
        if "count" in self._layout:
            started &= self.state_[self._layout["guard_n"][0].start, rows] >= GUARD_START
        ratio = np.sqrt((h[:, None] + 1.0) / np.arange(1.0, self.horizon + 1.0))
        return np.where(started, g * ratio, 0.0).max(axis=1)

    def intervals(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.intp)
        means = np.asarray(means, dtype=float).reshape(rows.size, self.horizon)
        if rows.size:
            self.resize(int(rows.max()) + 1)
        off = self.offsets_[rows]
        q = off[..., 1:].reshape(rows.size, self.horizon, self.alphas_.size, -1)  # (n, H, L, sides)
        q_hi, q_lo = q[..., 0], q[..., -1]
        mid = (means + off[..., 0])[..., None]
        return bounds(mid, q_hi, q_lo, self.alphas_)

    def interval(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.intervals(rows, means)
        return lo[..., 0], hi[..., 0]

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        rows = np.asarray(rows, dtype=np.intp)
        packed = np.moveaxis(self.state_[:, rows], 0, -1)  # (n, H, width)
        out = self.table_.export_rows(rows, ("offsets",))
        for name, (tail, _, dtype) in self._spec.items():
            if name in self._separate:
                out[name] = self.table_[name][rows]
            else:
                sl, _ = self._layout[name]
                out[name] = packed[..., sl].reshape(rows.size, self.horizon, *tail).astype(dtype)
        return out

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size == 0:
            return
        self.resize(int(rows.max()) + 1)
        self.table_.import_rows(rows, state, ("offsets", *self._separate))
        packed = np.moveaxis(self.state_[:, rows], 0, -1).copy()
        for name in self._layout:
            sl, _ = self._layout[name]
            if name == "guard" and name not in state:  # saved before the guard existed: it starts afresh
                packed[..., sl] = 0.0
                continue
            if name == "guard_n" and name not in state:  # saved before it existed: a started guard is warm
                started = np.asarray(state.get("guard", np.zeros((rows.size, self.horizon)))) > 0
                packed[..., sl] = np.where(started, self.guard_warmup, 0).reshape(rows.size, self.horizon, 1)
                continue
            packed[..., sl] = np.asarray(state[name], dtype=float).reshape(rows.size, self.horizon, -1)
        self.state_[:, rows] = np.moveaxis(packed, -1, 0)
        if "count" in self._layout:
            # State saved before "no interval yet" existed holds zero offsets (a point) for cells that never
            # learned; they have no interval.
            offsets = self.offsets_[rows]
            offsets[np.asarray(state["count"]).reshape(rows.size, self.horizon) == 0] = np.nan
            self.offsets_[rows] = offsets


def gaussian_quantile(p: np.ndarray | float) -> np.ndarray:
    """Standard normal quantile (a prior for thresholds before any residual has been seen)."""
    from scipy.special import ndtri

    return ndtri(np.asarray(p, dtype=float))
