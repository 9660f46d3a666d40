"""An ensemble: several copies of one model that differ only in their seed, serving the mean of their forecasts.

Online learners with a random start and random replay draws (the liquid ``cfc``) end in different places from
the same data; the mean of a few such networks forecasts better than any of them (on ETTh2's validation rows
four ``cfc`` networks averaged scored an MSE of 0.769 against 0.795-0.921 alone, README, "Liquid CfC").
:class:`Ensemble` does that for any :class:`~tidecast.models.base.BatchForecaster` built by a factory that
takes a ``seed``:

* **Learning**: every member sees every call (``learn_many``, ``reset_rows``, ``drop_rows``, ``maintenance``,
  a retrain's ``refit``); member ``k`` is built with ``seed + k``. Each member keeps its own per-row state and
  history, so time and memory are ``size`` times one model's.
* **Forecasts**: the members' mean (``NaN`` where a member has none). ``spread_many`` (when the members run a
  bootstrap) combines each member's own spread with their disagreement: ``sqrt(mean(spread^2) + var(means))``.
* **Calibration hand-offs**: members fitted on the same data at the same tick hand over residuals for the same
  rows; the ensemble waits until every member has handed over and passes on the mean residual (the residual of
  the mean forecast). Hand-offs whose rows differ between members (which the same data does not produce) are
  passed on from the first member.
* **Blend with the last value** (``persistence_half_life`` > 0, :mod:`tidecast.models.persistence`): around the
  members' mean, not inside each member (a member would fit its weight to its own, noisier errors). The members
  run unblended; the ensemble keeps each row's last real value and serves ``w * mean + (1 - w) * last value``,
  ``w`` learned from the mean's matured errors. The spread is scaled by ``w`` (the last value has no spread of
  its own), as a blended CycleNet does.
* **State**: member ``k``'s arrays under the prefix ``m{k}.`` in both ``export_rows`` and ``export_shared``; the
  blend's under ``persistence.`` and the last real value under ``ensemble.``.

>>> import numpy as np
>>> from tidecast.models.naive import SeasonalNaive
>>> def build(seed=0, period=2):
...     return SeasonalNaive(period=period)
>>> model = Ensemble(build, {"period": 2}, size=3)
>>> model.resize(1)
>>> rows = np.array([0])
>>> for tick in range(4):
...     model.learn_many(rows, np.array([tick]), np.array([float(tick % 2)]))
>>> model.forecast_many(rows, 2)
array([[0., 1.]])
>>> sorted(model.export_rows(rows))[:2]
['m0.buffer', 'm0.count']
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Self

import numpy as np

from tidecast.models.base import MAX_SEED, ArrayDict, BatchForecaster, Calibration, check_count, notify_step
from tidecast.models.persistence import NO_TICK, PersistenceBlend
from tidecast.models.rows import Field, RowTable, nest, under

__all__ = ["Ensemble"]

#: Prefix of the ensemble's own row state (the last real value behind the blend).
LAST_PREFIX = "ensemble."


class Ensemble(BatchForecaster):
    """``size`` members ``build(**params, seed=seed + k)``; forecasts are their mean (module docstring).

    Parameters
    ----------
    build
        Factory of one member; called with ``params`` and ``seed``.
    params
        The members' parameters (without ``seed``); ``get_params`` returns them with ``members`` and ``seed``.
    size
        Number of members (>= 1).
    seed
        Member ``k`` gets ``seed + k``.
    persistence_half_life
        Blend the mean with the last value (module docstring; 0: off); needs ``horizon``.
    horizon
        The members' horizon H (only the blend needs it).
    """

    def __init__(self, build: Callable[..., BatchForecaster], params: dict[str, Any], size: int,
                 seed: int = 0, persistence_half_life: int = 0, horizon: int | None = None) -> None:
        if int(size) < 1:
            raise ValueError(f"an ensemble needs at least one member, got {size}")
        try:  # member k takes seed + k: the last must still be a seed
            check_count("seed", seed, 0, high=MAX_SEED - int(size) + 1)
        except ValueError as err:
            raise ValueError(f"{err} with members = {size} (member k is seeded seed + k)") from None
        if persistence_half_life and horizon is None:
            raise ValueError("an ensemble blended with the last value needs the members' horizon")
        self.build, self.params, self.size, self.seed = build, dict(params), int(size), int(seed)
        self.persistence_half_life, self.horizon = int(persistence_half_life), horizon
        self._persistence = (PersistenceBlend(int(horizon), self.persistence_half_life)
                             if self.persistence_half_life else None)
        # each row's last real value and its tick: the blend's persistence forecast and its origin
        self.last_ = RowTable(tick=Field((), np.int64, NO_TICK), value=Field((), np.float64, np.nan))
        self.members_ = [build(**self.params, seed=self.seed + k) for k in range(self.size)]
        first = self.members_[0]
        self.name, self.couples_rows = first.name, first.couples_rows
        self._handed: list[deque[Calibration]] = [deque() for _ in self.members_]
        self._last_means: np.ndarray | None = None

    # -- parameters ---------------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        params = {**self.members_[0].get_params(), "members": self.size, "seed": self.seed}
        if self.persistence_half_life or "persistence_half_life" in params:
            params["persistence_half_life"] = self.persistence_half_life
        return params

    def clone(self, **overrides: Any) -> Self:
        params = {**self.params, "persistence_half_life": self.persistence_half_life, **overrides}
        size, seed = int(params.pop("members", self.size)), int(params.pop("seed", self.seed))
        return self._rebuilt(params, size, seed)

    def _rebuilt(self, params: dict[str, Any], size: int, seed: int) -> Self:
        """A new ensemble of the same kind with these settings (``params`` may hold ``persistence_half_life``;
        a subclass with its own constructor overrides this)."""
        half_life = int(params.pop("persistence_half_life", 0))
        return type(self)(self.build, params, size, seed, persistence_half_life=half_life, horizon=self.horizon)

    @property
    def bootstrap(self) -> int:
        """The members' bootstrap replicas (0: none), read by the bootstrap watcher."""
        return int(getattr(self.members_[0], "bootstrap", 0))

    @property
    def fitted_(self) -> bool:
        return all(getattr(m, "fitted_", True) for m in self.members_)

    @property
    def learned_row_keys(self) -> tuple[str, ...]:
        """The members' per-row learned state under their prefixes (kept by a retrain's row sync)."""
        return tuple(f"m{k}.{key}" for k, m in enumerate(self.members_)
                     for key in getattr(m, "learned_row_keys", ()))

    # -- learning -----------------------------------------------------------------------------------------
    def resize(self, n_rows: int) -> None:
        for m in self.members_:
            m.resize(n_rows)
        self._resize_blend(n_rows)

    def _resize_blend(self, n_rows: int) -> None:
        """Room for ``n_rows`` in the blend's own tables only (the members grow when they learn)."""
        if self._persistence is not None:
            self._persistence.resize(n_rows)
            self.last_.resize(n_rows)

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        if self._persistence is not None and np.size(rows):
            self._remember(np.asarray(rows, dtype=np.int64), np.asarray(ticks, dtype=np.int64),
                           np.asarray(values, dtype=float), filled)
        for m in self.members_:
            m.learn_many(rows, ticks, values, filled=filled)

    def _remember(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray, filled: np.ndarray | None) -> None:
        """Score the blend's forecasts whose target arrived, and keep each row's last real value (a value the
        engine filled into a gap is neither scored nor an origin: forecasts are issued on real values only)."""
        self._resize_blend(int(rows.max()) + 1)
        self._persistence.learn(rows, ticks, values, filled)
        real = np.ones(rows.size, dtype=bool) if filled is None else ~np.asarray(filled, dtype=bool)
        self.last_["tick"][rows[real]], self.last_["value"][rows[real]] = ticks[real], values[real]

    def reset_rows(self, rows: np.ndarray) -> None:
        for m in self.members_:
            m.reset_rows(rows)

    def begin_step(self, at_ns: int) -> None:
        for m in self.members_:
            notify_step(m, at_ns)

    def drop_rows(self, rows: np.ndarray) -> None:
        for m in self.members_:
            m.drop_rows(rows)
        # hand-offs waiting for the other members are not for the rows' next series; one left empty goes, as each
        # member's own queue drops it (CalibrationQueue.discard), so the members' hand-offs stay paired round by round
        for k, queue in enumerate(self._handed):
            self._handed[k] = deque(kept for h in queue if (kept := h.without(rows)) is not None)

    def maintenance(self, budget_seconds: float) -> None:
        # each member gets the whole budget: a member's warm-start fit cannot be split, and a share of the budget
        # would give every member fewer replay steps than a single model takes
        for m in self.members_:
            m.maintenance(budget_seconds)

    def refit(self, **kwargs: Any) -> dict[str, Any]:
        """A retrain's hook: every member refits; the counts summed."""
        out: dict[str, Any] = {}
        for m in self.members_:
            hook = getattr(m, "refit", None)
            if hook is None:
                raise TypeError(f"{type(m).__name__} has no refit hook")
            for key, value in hook(**kwargs).items():
                out[key] = out.get(key, 0) + value
        return out

    # -- forecasting --------------------------------------------------------------------------------------
    def first_forecast_after(self) -> tuple[int, str] | None:
        return self.members_[0].first_forecast_after()

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        means = np.stack([m.forecast_many(rows, horizon) for m in self.members_])
        self._last_means = means
        out = means.mean(axis=0)
        if self._persistence is not None and out.size:
            rows = np.asarray(rows, dtype=np.int64)
            self._resize_blend(int(rows.max()) + 1)
            # a row without a last value yet (restored from a state saved with the blend off) serves the mean
            ok = np.isfinite(out).any(axis=1) & np.isfinite(self.last_["value"][rows])
            r = rows[ok]
            out[ok] = self._persistence.combine(r, self.last_["tick"][r], self.last_["value"][r], out[ok])
        return out

    def spread_many(self, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        spreads = [m.spread_many(rows, horizon) for m in self.members_]
        if any(s is None for s in spreads):
            return None
        within = np.mean(np.square(np.stack(spreads)), axis=0)
        means = self._last_means
        if means is None or means.shape[1:] != within.shape:  # not called right after forecast_many
            spread = np.sqrt(within)
        else:
            spread = np.sqrt(within + means.var(axis=0))
        if self._persistence is not None and spread.size:
            rows = np.asarray(rows, dtype=np.int64)
            self._resize_blend(int(rows.max()) + 1)
            k = min(horizon, self._persistence.horizon)
            spread[:, :k] *= self._persistence.weights(rows)[:, :k]  # the last value brings no spread
        return spread

    def pop_calibration(self, horizon: int) -> Calibration | None:
        for queue, m in zip(self._handed, self.members_, strict=True):
            while (got := m.pop_calibration(horizon)) is not None:
                queue.append(got)
        if not all(self._handed):
            return None
        heads = [queue.popleft() for queue in self._handed]
        first = heads[0]
        if all(h.rows.shape == first.rows.shape and np.array_equal(h.rows, first.rows)
               and h.residuals.shape == first.residuals.shape for h in heads):
            return Calibration(first.rows, np.mean([h.residuals for h in heads], axis=0))
        return first

    # -- state --------------------------------------------------------------------------------------------
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        state = {f"m{k}.{key}": value for k, m in enumerate(self.members_)
                 for key, value in m.export_rows(rows).items()}
        if self._persistence is not None:
            self._resize_blend(int(np.max(rows)) + 1 if np.size(rows) else 0)
            state.update(self._persistence.export_rows(rows))
            state.update(nest(LAST_PREFIX, self.last_.export_rows(rows)))
        return state

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        """Write exported rows back; a state saved with the blend off starts the blend's rows blank (the mean as
        it is until targets mature)."""
        for k, m in enumerate(self.members_):
            m.import_rows(rows, _member(state, k))
        if self._persistence is not None:
            rows = np.asarray(rows, dtype=np.int64)
            self._persistence.import_rows(rows, state)
            last = under(LAST_PREFIX, state)
            if last:
                self.last_.import_rows(rows, last)
            else:
                self._resize_blend(int(rows.max()) + 1 if rows.size else 0)
                self.last_.blank(rows)

    def export_shared(self) -> tuple[ArrayDict, dict[str, Any]]:
        arrays: ArrayDict = {}
        metas: list[dict[str, Any]] = []
        for k, m in enumerate(self.members_):
            got, meta = m.export_shared()
            arrays.update({f"m{k}.{key}": value for key, value in got.items()})
            metas.append(meta)
        if not arrays and not any(metas):
            return {}, {}
        return arrays, {"ensemble": self.size, "members": metas}

    def import_shared(self, arrays: ArrayDict, meta: dict[str, Any]) -> None:
        if not arrays and not meta:  # its members keep no shared state (export_shared said so)
            return
        if meta.get("ensemble") != self.size:
            raise ValueError(f"saved by an ensemble of {meta.get('ensemble')} member(s), this one has {self.size}")
        for k, (m, member_meta) in enumerate(zip(self.members_, meta["members"], strict=True)):
            if member_meta:
                m.import_shared(_member(arrays, k), member_meta)


def _member(arrays: ArrayDict, k: int) -> ArrayDict:
    prefix = f"m{k}."
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
