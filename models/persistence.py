"""Blend a model's forecasts with the last value, with weights learned online from the errors that matured.

"Repeat the last value" (persistence) is hard to beat on series whose level wanders: on DSOF's ETTh2 protocol it
scores below every CycleNet variant at H = 24 and 48 (``bench/retrain.py``). The two forecasts err differently
(persistence misses the cycle, the model lags a level shift), so a combination beats both. :class:`PersistenceBlend`
serves, per series and horizon step ``h``,

    w * model + (1 - w) * last value,    w = (S_pp - S_mp) / (S_mm + S_pp - 2 S_mp), clipped to [0, 1]

the convex weight that minimises the combined squared error over the forecasts that matured (Bates & Granger,
"The combination of forecasts", 1969), where ``S_mm``, ``S_pp`` and ``S_mp`` are discounted sums of the model's
and persistence's errors ``e_m * e_m``, ``e_p * e_p`` and ``e_m * e_p`` at that ``h``. Each sum forgets with a
half-life of ``half_life`` matured targets, so the weight follows a regime change. Only targets that arrived
enter (no look-ahead) and interpolated values (a short gap the engine filled) are not scored. Before any target
matured ``w = 1``: the model as it is, so a model's calibration hand-off stays exact for its first forecasts.

The weight is the least-squares one from the first matured target on (no prior): one target already moves it.

State per series: the last ``H`` origins' model forecasts (``H x H``, float32, kept as the difference from the
value at the origin so that a series' level costs no precision) with their ticks and the value at each origin,
and the three sums per ``h``: ``4 H^2 + 40 H`` bytes (3.3 kB at H = 24).

>>> import numpy as np
>>> blend = PersistenceBlend(horizon=1, half_life=100)
>>> blend.resize(1)
>>> rows = np.array([0])
>>> for t in range(50):  # the model is always 1 too high, the last value right: the weight moves to persistence
...     out = blend.combine(rows, np.array([t]), np.array([5.0]), np.array([[6.0]]))
...     blend.learn(rows, np.array([t + 1]), np.array([5.0]))
>>> float(blend.weights(rows)[0, 0]), float(out[0, 0])
(0.0, 5.0)
"""

from __future__ import annotations

import numpy as np

from tidecast.models.rows import ArrayDict, Field, RowTable, nest, under

__all__ = ["PersistenceBlend"]

#: Origin tick of a slot that holds no forecast (a blank row): never equal to a real tick minus h.
NO_TICK = np.iinfo(np.int64).min // 2
PREFIX = "persistence."


class PersistenceBlend:
    """Per-row blend of a model's H-step forecasts with the last value (module docstring).

    Parameters
    ----------
    horizon
        The model's horizon ``H``; forecasts beyond it are not blended.
    half_life
        Matured targets after which an error counts half (>= 1).
    """

    def __init__(self, horizon: int, half_life: int) -> None:
        if horizon < 1 or half_life < 1:
            raise ValueError(f"the persistence blend needs horizon >= 1 and half_life >= 1, got {horizon}, "
                             f"{half_life}")
        self.horizon, self.half_life = int(horizon), int(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)
        h = self.horizon
        self.rows_ = RowTable(
            origin=Field((h,), np.int64, NO_TICK),  # slot tick % H: the tick of the origin it holds
            forecast=Field((h, h), np.float32, np.nan),  # the model's forecasts from that origin, minus ``last``
            last=Field((h,), np.float64, np.nan),  # the value at that origin (persistence's forecast)
            sums=Field((3, h), np.float64, 0.0),  # discounted e_m^2, e_p^2, e_m * e_p per h
        )

    def resize(self, n_rows: int) -> None:
        self.rows_.resize(n_rows)

    def learn(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
              filled: np.ndarray | None = None) -> None:
        """Score the forecasts whose target is ``ticks`` (one value per row) and fold their errors in."""
        if rows.size == 0:
            return
        self.resize(int(rows.max()) + 1)
        h = np.arange(1, self.horizon + 1)
        origins = np.asarray(ticks, dtype=np.int64)[:, None] - h  # (n, H): where the h-step forecast came from
        slots = origins % self.horizon
        r = rows[:, None]
        y = np.asarray(values, dtype=float)[:, None]
        e_last = self.rows_["last"][r, slots] - y
        e_model = self.rows_["forecast"][r, slots, h - 1] + e_last  # stored as the difference from the last value
        ok = (self.rows_["origin"][r, slots] == origins) & np.isfinite(e_model) & np.isfinite(e_last)
        if filled is not None:
            ok &= ~np.asarray(filled, dtype=bool)[:, None]
        if not ok.any():
            return
        sums = self.rows_["sums"][rows]  # (n, 3, H)
        terms = np.stack([e_model * e_model, e_last * e_last, e_model * e_last], axis=1)
        self.rows_["sums"][rows] = np.where(ok[:, None, :], self.decay * sums + np.where(ok[:, None, :], terms, 0.0),
                                            sums)

    def weights(self, rows: np.ndarray) -> np.ndarray:
        """The model's weight per (row, h), ``(n, H)``; 1 where nothing matured yet."""
        mm, pp, mp = np.moveaxis(self.rows_["sums"][rows], 1, 0)
        den = mm + pp - 2.0 * mp  # the sum of (e_m - e_p)^2: 0 only if the two forecasts never differed
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.where(den > 1e-12 * (mm + pp), (pp - mp) / den, 1.0)
        return np.clip(w, 0.0, 1.0)

    def combine(self, rows: np.ndarray, ticks: np.ndarray, last: np.ndarray, forecasts: np.ndarray) -> np.ndarray:
        """Keep the model's ``forecasts`` (n, k <= H) from origin ``ticks`` and the values ``last`` there, for
        scoring once their targets arrive; return the blended forecasts (NaN where the model's are). A second call
        at the same origin overwrites only the steps it brings."""
        if rows.size == 0:
            return forecasts
        self.resize(int(rows.max()) + 1)
        k = min(forecasts.shape[1], self.horizon)
        ticks = np.asarray(ticks, dtype=np.int64)
        last = np.asarray(last, dtype=float)
        slots = ticks % self.horizon
        fresh = self.rows_["origin"][rows, slots] != ticks
        self.rows_["forecast"][rows[fresh], slots[fresh]] = np.nan  # the slot held an older origin's forecasts
        self.rows_["origin"][rows, slots] = ticks
        self.rows_["forecast"][rows, slots, :k] = forecasts[:, :k] - last[:, None]
        self.rows_["last"][rows, slots] = last
        return self.blended(rows, last, forecasts)

    def blended(self, rows: np.ndarray, last: np.ndarray, forecasts: np.ndarray) -> np.ndarray:
        """The blend of ``forecasts`` (n, k) with ``last`` at the rows' current weights, keeping nothing."""
        k = min(forecasts.shape[1], self.horizon)
        w = self.weights(rows)[:, :k]
        out = forecasts.copy()
        out[:, :k] = w * forecasts[:, :k] + (1.0 - w) * np.asarray(last, dtype=float)[:, None]
        return out

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return nest(PREFIX, self.rows_.export_rows(rows))

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        """Write exported rows back; a state without the blend's arrays (saved with the blend off) starts the rows
        blank (weight 1 until targets mature)."""
        own = under(PREFIX, state)
        if not own:
            self.resize(int(rows.max()) + 1 if rows.size else 0)
            self.rows_.blank(rows)
            return
        self.rows_.import_rows(rows, own)
