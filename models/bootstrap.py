"""Bootstrap replicas of a forecaster: the pieces every built-in model shares.

A model run with ``bootstrap=B > 0`` keeps B replicas beside its point forecaster and answers
:meth:`~tidecast.models.base.BatchForecaster.spread_many`: per (row, horizon), how far the replicas' forecasts
spread (their standard deviation for bagged replicas; their root mean square deviation from the point forecast for
the residual bootstrap below), in the series' own units, computed at forecast time (no target needed). ``bootstrap=0``
keeps no replica and changes nothing.

Two kinds of replicas:

* **online bagging** (Oza & Russell 2001): each replica learns each example ``k ~ Poisson(1)`` times (CycleNet:
  a per-sample loss weight; river models: ``learn_one`` called k times). :func:`poisson_counts` draws k from a
  hash of (tick, replica, value bits), so a restored table draws the same counts without an RNG in its state.
* **residual bootstrap** for the models without parameters worth bagging (seasonal naive, Holt-Winters):
  :class:`ResidualRing` keeps each row's recent in-sample one-step residuals and perturbs the point forecast by
  sums of residuals resampled with the same hash, so the spread follows the series' recent residual spread.

>>> k = poisson_counts(np.array([5, 6]), np.array([1.0, 2.0]), replicas=8)
>>> k.shape, bool((k >= 0).all()), np.array_equal(k, poisson_counts(np.array([5, 6]), np.array([1.0, 2.0]), 8))
((2, 8), True, True)
"""

from __future__ import annotations

import math

import numpy as np

from tidecast.models.base import ArrayDict
from tidecast.models.rows import Field, RowTable

#: ``P(K <= k)`` for ``K ~ Poisson(1)``, k = 0..11 (the tail beyond is below 1e-9 and counts as 12).
_POISSON1_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(12)])
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-mixed uint64 (wrap-around arithmetic is the point)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(ticks: np.ndarray, values: np.ndarray, shape: tuple[int, ...], salt: int = 0,
             stride: int | None = None) -> np.ndarray:
    """Uniforms in [0, 1) of shape ``(n, *shape)``, a pure function of each row's (tick, value bits) and position.
    ``stride`` (2-D ``shape`` only): position ``(b, j)`` is number ``b * stride + j``, so a shape cut short of
    ``stride`` columns gives the same numbers in the columns it keeps."""
    ticks = np.asarray(ticks, dtype=np.int64).astype(np.uint64)
    bits = np.ascontiguousarray(np.asarray(values, dtype=np.float64)).view(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(ticks * _GOLDEN + np.uint64(salt)) ^ _mix(bits + _GOLDEN)
        if stride is None:
            index = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
        else:
            index = (np.arange(shape[0], dtype=np.uint64)[:, None] * np.uint64(stride)
                     + np.arange(shape[1], dtype=np.uint64)[None, :])
        mixed = _mix(key.reshape(-1, *([1] * len(shape))) + (index + np.uint64(1)) * _GOLDEN)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def poisson_counts(ticks: np.ndarray, values: np.ndarray, replicas: int, salt: int = 0) -> np.ndarray:
    """``(n, replicas)`` draws of ``Poisson(1)``: how often each replica learns each row's new value."""
    u = uniforms(ticks, values, (replicas,), salt)
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.int64)


def check_bootstrap(value: int) -> None:
    """``bootstrap`` is a replica count: 0 (off) or 2..64 (one replica has no spread)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value == 0 or 2 <= value <= 64)
    if not ok:
        raise ValueError(f"bootstrap = {value!r}: 0 (off) or a number of replicas from 2 to 64")


class ResidualRing:
    """Per row, the last ``window`` in-sample one-step residuals; bootstrap forecasts resample them.

    Replica ``b``'s h-step forecast is the point forecast plus the sum of ``steps(h)`` residuals drawn with
    replacement from the row's ring (``steps(h) = ceil(h / period)`` for seasonal naive, whose h-step error is a
    sum of one-cycle differences; ``h`` for a smoother whose errors accumulate step by step). The spread is the
    replicas' root mean square deviation from the point forecast (not their standard deviation: residuals that
    all lean one way - a trend the model lags behind - widen it too); NaN until the ring holds ``min_residuals``.

    >>> ring = ResidualRing(replicas=16, window=50)
    >>> ring.resize(1)
    >>> for t in range(50):
    ...     ring.add(np.array([0]), np.array([(-1.0) ** t]))
    >>> spread = ring.spread(np.array([0]), np.array([49]), np.array([[1, 4]]))
    >>> bool(0 < spread[0, 0] < spread[0, 1])
    True
    """

    def __init__(self, replicas: int, window: int = 50, min_residuals: int = 20) -> None:
        self.replicas, self.window, self.min_residuals = replicas, window, min_residuals
        self.table_ = RowTable(residuals=Field((window,), np.float64, np.nan), count=Field((), np.int64, 0))

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    def add(self, rows: np.ndarray, residuals: np.ndarray) -> None:
        """Store finite residuals (one per row) in each row's ring."""
        ok = np.isfinite(residuals)
        rows, residuals = rows[ok], residuals[ok]
        count = self.table_["count"]
        self.table_["residuals"][rows, count[rows] % self.window] = residuals
        count[rows] += 1

    def reset_rows(self, rows: np.ndarray) -> None:
        self.table_.blank(rows)

    def spread(self, rows: np.ndarray, ticks: np.ndarray, steps: np.ndarray,
               keys: np.ndarray | None = None) -> np.ndarray:
        """``(n, H)`` root mean square of the replicas' perturbations; ``steps`` (n, H) residuals summed each.
        The draws are a function of each row's tick and ``keys`` (e.g. its last value: series differ)."""
        n, horizon = steps.shape
        depth = int(steps.max()) if steps.size else 0
        out = np.full((n, horizon), np.nan)
        filled = np.minimum(self.table_["count"][rows], self.window)
        ok = filled >= self.min_residuals
        if not ok.any() or depth == 0:
            return out
        r, f = rows[ok], filled[ok]
        # numbered as if every row needed ``horizon`` draws: a row's draws do not depend on the other rows of the
        # call (the deepest row's depth set them, so a series' alarms changed with its batch-mates)
        u = uniforms(ticks[ok], np.zeros(r.size) if keys is None else keys[ok], (self.replicas, depth), salt=1,
                     stride=horizon)
        draws = self.table_["residuals"][r[:, None, None], (u * f[:, None, None]).astype(np.int64)]
        paths = np.cumsum(draws, axis=2)  # (n, B, depth): sums of the first j draws
        perturbation = np.take_along_axis(paths, steps[ok][:, None, :] - 1, axis=2)  # (n, B, H)
        out[ok] = np.sqrt(np.mean(perturbation**2, axis=1))  # about the point forecast: a bias counts too
        return out

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return {f"boot_{k}": v for k, v in self.table_.export_rows(rows).items()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        if "boot_residuals" not in state:  # saved without replicas: the ring starts empty
            self.table_.resize(int(np.max(rows)) + 1 if len(rows) else 0)
            self.table_.blank(rows)
            return
        self.table_.import_rows(rows, {k.removeprefix("boot_"): v for k, v in state.items()
                                       if k in ("boot_residuals", "boot_count")})
