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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

ArrayDict = dict[str, np.ndarray]


class Calibrator(ABC):
    """Base class. Constructor stores parameters; fitted arrays end in ``_`` and have shape (rows, horizon, ...)."""

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
        """``(lower, upper)`` around point forecasts ``means`` of shape (n, horizon). May be +-inf."""

    def intervals(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` of shape (n, horizon, len(alphas_)), one slice per level in ``alpha``."""
        lo, hi = self.interval(rows, means)
        return lo[..., None], hi[..., None]

    # -- state ------------------------------------------------------------------------------------
    @abstractmethod
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        """Per-row arrays (first axis = rows)."""

    @abstractmethod
    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        """Inverse of :meth:`export_rows`."""

    def get_params(self) -> dict[str, Any]:
        """JSON-able constructor parameters."""
        alpha = self.alpha if np.isscalar(self.alpha) else [float(a) for a in self.alphas_]
        return {"horizon": self.horizon, "alpha": alpha}


def grow(array: np.ndarray, n_rows: int, fill: float | int | bool) -> np.ndarray:
    """Return ``array`` with at least ``n_rows`` rows, new rows set to ``fill`` (amortised doubling)."""
    if array.shape[0] >= n_rows:
        return array
    new_len = max(n_rows, 2 * array.shape[0], 8)
    out = np.full((new_len, *array.shape[1:]), fill, dtype=array.dtype)
    out[: array.shape[0]] = array
    return out


class ScoreCalibrator(Calibrator):
    """Shared machinery for calibrators that learn one threshold per *target*.

    A target is one (level, side) pair: with ``L`` levels there are ``K = 2L`` targets (upper and lower side,
    each at ``alpha/2``) or ``K = L`` with ``symmetric=True``. Subclasses declare their per-cell state in
    :meth:`_state_spec`, learn in :meth:`_learn` and answer :meth:`_offsets`; this class does validation,
    masking, growing, export/import and the assembly of ``(lower, upper)``.
    """

    def __init__(self, horizon: int, alpha: float | Sequence[float] = 0.1, symmetric: bool = False) -> None:
        super().__init__(horizon, alpha)
        self.symmetric = symmetric
        if symmetric:
            self.target_alpha_ = self.alphas_.copy()
            self.target_sign_ = np.zeros(self.alphas_.size)
        else:
            self.target_alpha_ = np.repeat(self.alphas_ / 2, 2)
            self.target_sign_ = np.tile([1.0, -1.0], self.alphas_.size)
        self.n_targets_ = self.target_alpha_.size
        for name, (tail, fill, dtype) in self._state_spec().items():
            setattr(self, name + "_", np.full((0, horizon, *tail), fill, dtype=dtype))

    # -- what subclasses provide ----------------------------------------------------------------------
    def _state_spec(self) -> dict[str, tuple[tuple[int, ...], float | int, type]]:
        """``name -> (trailing shape after (rows, horizon), fill for a new row, dtype)``; stored as ``name_``."""
        return {}

    @abstractmethod
    def _learn(self, rows: np.ndarray, r: np.ndarray, mask: np.ndarray) -> None:
        """Learn from residuals ``r`` (n, H), zero where ``mask`` is False; write back only masked-in cells."""

    @abstractmethod
    def _offsets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(centre (n, H), thresholds (n, H, K))``: upper = mean + centre + q_hi, lower = mean + centre - q_lo."""

    # -- helpers --------------------------------------------------------------------------------------
    def scores(self, r: np.ndarray) -> np.ndarray:
        """Per-target scores (..., K) of residuals (...): ``r``, ``-r`` (one-sided) or ``|r|`` (symmetric)."""
        if self.symmetric:
            return np.repeat(np.abs(r)[..., None], self.n_targets_, axis=-1)
        return r[..., None] * self.target_sign_

    def _put(self, name: str, rows: np.ndarray, value: np.ndarray, mask: np.ndarray) -> None:
        """Write ``value`` into ``name_[rows]`` where ``mask`` (n, H) is True, broadcasting over trailing axes."""
        arr = getattr(self, name + "_")
        old = arr[rows]
        m = mask.reshape(mask.shape + (1,) * (old.ndim - 2))
        arr[rows] = np.where(m, value, old)

    # -- interface --------------------------------------------------------------------------------------
    def resize(self, n_rows: int) -> None:
        for name, (_, fill, _) in self._state_spec().items():
            setattr(self, name + "_", grow(getattr(self, name + "_"), n_rows, fill))
        self.n_rows_ = max(self.n_rows_, n_rows)

    def update(self, rows: np.ndarray, residuals: np.ndarray, mask: np.ndarray | None = None) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        r = np.asarray(residuals, dtype=float).reshape(rows.size, self.horizon)
        finite = np.isfinite(r)
        mask = finite if mask is None else np.asarray(mask, dtype=bool).reshape(r.shape) & finite
        if rows.size == 0 or not mask.any():
            return
        self.resize(int(rows.max()) + 1)
        self._learn(rows, np.where(mask, r, 0.0), mask)

    def intervals(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.intp)
        means = np.asarray(means, dtype=float).reshape(rows.size, self.horizon)
        if rows.size:
            self.resize(int(rows.max()) + 1)
        centre, q = self._offsets(rows)
        q = q.reshape(*q.shape[:2], self.alphas_.size, -1)  # (n, H, L, sides)
        q_hi, q_lo = q[..., 0], q[..., -1]
        mid = (means + centre)[..., None]
        # A negative total width (both one-sided thresholds below the centre) is an empty set; emit a point.
        gap = np.minimum(q_hi + q_lo, 0.0) / 2
        return mid - q_lo + gap, mid + q_hi - gap

    def interval(self, rows: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.intervals(rows, means)
        return lo[..., 0], hi[..., 0]

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        rows = np.asarray(rows, dtype=np.intp)
        return {name: getattr(self, name + "_")[rows].copy() for name in self._state_spec()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size:
            self.resize(int(rows.max()) + 1)
        for name in self._state_spec():
            getattr(self, name + "_")[rows] = state[name]

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "symmetric": self.symmetric}


def gaussian_quantile(p: np.ndarray | float) -> np.ndarray:
    """Standard normal quantile (a prior for thresholds before any residual has been seen)."""
    from scipy.special import ndtri

    return ndtri(np.asarray(p, dtype=float))
