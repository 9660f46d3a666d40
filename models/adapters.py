"""Adapters that bring one-series forecasters (river's, or anyone's) into the engine.

* :class:`Standardised` wraps a river forecaster with what it needs to behave on a live stream: it waits for a
  warm-up window, detects the cycle length there (unless configured), fixes a standardisation from the same
  window — river's linear learners diverge on raw-scale targets (see ../shared/reference/anchors.md) — and
  then replays the window into the model. Forecasts are ``NaN`` until then.
* :class:`PerSeries` turns a factory of one-series forecasters into a :class:`~tidecast.models.base.BatchForecaster`:
  one object per row, a Python loop per call. Fine for baselines; vectorised models implement the batch
  protocol directly.

Warm-up: a forecaster is asked for forecasts only once it is ready, decided *before* the call (:func:`is_ready`),
never by catching what it raises, so an exception from a ready forecaster is a bug and propagates. A
forecaster that knows says so with an ``is_ready`` attribute (:class:`Standardised`,
:class:`~tidecast.models.holt_winters.AdditiveHoltWinters`); for river's own forecasters the number of
observations they need is known (:func:`river_min_history`); anything else must be given ``min_history``.

State is JSON (:mod:`tidecast.models.river_state`), stored per row as UTF-8 bytes in a padded ``uint8`` array.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tidecast.models.base import ArrayDict, BatchForecaster, Forecaster, Params
from tidecast.models.river_state import dump_state, load_state
from tidecast.models.seasonality import detect_period


def river_min_history(model: Any) -> int | None:
    """Observations one of river's own forecasters needs before ``forecast`` works; ``None`` for any other.

    river's ``HoltWinters`` raises ``IndexError`` before its first ``max(2, seasonality)`` values (it starts
    from them); ``SNARIMAX`` forecasts from zeros until its differencing and every lag feature have values.

    >>> from river import time_series
    >>> river_min_history(time_series.HoltWinters(0.3, 0.1, 0.5, seasonality=24))
    24
    >>> river_min_history(time_series.SNARIMAX(p=2, d=1, q=1, m=24, sp=1))
    25
    """
    if not type(model).__module__.startswith("river."):
        return None
    from river import time_series

    if isinstance(model, time_series.HoltWinters):
        return max(2, model.seasonality)
    if isinstance(model, time_series.SNARIMAX):
        m = model.m
        return model.d + m * model.sd + max(model.p, m * model.sp, model.q, m * model.sq, 1)
    return None


def is_ready(model: Any, n_learned: int, min_history: int | None = None) -> bool:
    """Whether ``model``, having learned ``n_learned`` observations, may be asked for a forecast.

    The model's own ``is_ready`` attribute if it has one; else ``n_learned`` against the larger of
    :func:`river_min_history` and ``min_history``. A model that declares nothing and is given no
    ``min_history`` is an error (:class:`PerSeries` checks that at construction).
    """
    ready = getattr(model, "is_ready", None)
    if ready is not None:
        return bool(ready)
    needs = [n for n in (river_min_history(model), min_history) if n is not None]
    if not needs:
        raise ValueError(f"cannot tell when a {type(model).__name__} is ready to forecast: give it an `is_ready` "
                         "attribute, or give PerSeries `min_history` (observations it needs first)")
    return n_learned >= max(needs)


class Standardised(Params):
    """A river forecaster behind a warm-up window, cycle detection and a fixed standardisation.

    build: ``build(period) -> Forecaster`` makes the river model once the cycle length is known.
    period: cycle length in ticks; ``None`` detects it on the warm-up window (no cycle found -> 1).
    warmup: observations buffered before the model starts; default ``2 * max_period + 2``.

    Forecasts are ``NaN`` until the warm-up window is full and the river model is ready (:func:`is_ready`).
    river's own ``HoltWinters`` starts its additive seasonal terms as ``y / level``, which a standardised level
    near 0 blows up: build :class:`~tidecast.models.holt_winters.AdditiveHoltWinters` instead.

    >>> from tidecast.models.holt_winters import AdditiveHoltWinters
    >>> f = Standardised(lambda p: AdditiveHoltWinters(0.3, 0.01, 0.2, seasonality=p), period=4, warmup=8)
    >>> for i in range(40):
    ...     f.learn_one(10.0 + (i % 4))
    >>> [round(v, 2) for v in f.forecast(4)]
    [10.0, 11.0, 12.0, 13.0]
    """

    def __init__(self, build: Callable[[int], Forecaster], period: int | None = None, max_period: int = 200,
                 warmup: int | None = None) -> None:
        self.build = build
        self.period = period
        self.max_period = max_period
        self.warmup = warmup if warmup is not None else 2 * max_period + 2
        self.buffer_: list[float] = []
        self.model_: Forecaster | None = None
        self.n_model_ = 0  # observations the model has learned
        self.period_ = 0
        self.mean_ = 0.0
        self.scale_ = 1.0

    @property
    def is_ready(self) -> bool:
        """Past the warm-up window, and the river model ready too (a model of unknown needs: at once)."""
        return self.model_ is not None and is_ready(self.model_, self.n_model_, min_history=0)

    def learn_one(self, y: float, x: dict | None = None) -> None:
        if self.model_ is not None:
            self.model_.learn_one((y - self.mean_) / self.scale_)
            self.n_model_ += 1
            return
        self.buffer_.append(y)
        if len(self.buffer_) >= self.warmup:
            self._start()

    def _start(self) -> None:
        history = np.asarray(self.buffer_)
        self.period_ = self.period or detect_period(history, self.max_period) or 1
        self.mean_ = float(history.mean())
        std = float(history.std())
        self.scale_ = std if std > 0 and math.isfinite(std) else 1.0
        self.model_ = self.build(self.period_)
        for y in self.buffer_:
            self.model_.learn_one((y - self.mean_) / self.scale_)
        self.n_model_ = len(self.buffer_)
        self.buffer_ = []

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        if not self.is_ready:
            return [math.nan] * horizon
        return [v * self.scale_ + self.mean_ for v in self.model_.forecast(horizon)]

    def get_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer_, "period": self.period_, "mean": self.mean_, "scale": self.scale_,
                "n_model": self.n_model_, "model": dump_state(self.model_) if self.model_ is not None else None}

    def set_state(self, state: dict[str, Any]) -> None:
        self.buffer_ = list(state["buffer"])
        self.period_, self.mean_, self.scale_ = int(state["period"]), state["mean"], state["scale"]
        self.n_model_ = int(state.get("n_model", self.warmup))  # older states: the model had the warm-up window
        self.model_ = None
        if state["model"] is not None:
            self.model_ = self.build(self.period_)
            load_state(self.model_, state["model"])


class PerSeries(BatchForecaster):
    """One forecaster object per row, built by ``factory()``; state via ``get_state``/``set_state`` or
    :mod:`tidecast.models.river_state`.

    A row forecasts ``NaN`` until its forecaster is ready (:func:`is_ready`): its own ``is_ready``, else
    ``min_history`` observations and at least what river's forecasters need (:func:`river_min_history`).
    A factory whose forecasters declare neither is refused here, before any data, rather than crashing later.

    >>> from river import time_series
    >>> model = PerSeries("hw", lambda: time_series.HoltWinters(0.3, 0.1, 0.5, seasonality=3))
    >>> model.resize(1)
    >>> for tick, y in enumerate([1.0, 2.0]):
    ...     model.learn_many(np.array([0]), np.array([tick]), np.array([y]))
    >>> model.forecast_many(np.array([0]), 2)  # river would raise IndexError here: it starts after 3 values
    array([[nan, nan]])
    """

    def __init__(self, name: str, factory: Callable[[], Forecaster], min_history: int | None = None) -> None:
        self.name = name
        self.factory = factory
        self.min_history = min_history
        self.models_: list[Forecaster | None] = []
        self.n_learned_ = np.zeros(0, dtype=np.int64)
        is_ready(factory(), 0, min_history)  # raises now if readiness cannot be told

    def resize(self, n_rows: int) -> None:
        if n_rows > len(self.models_):
            self.models_.extend([None] * (n_rows - len(self.models_)))
            self.n_learned_ = np.concatenate([self.n_learned_, np.zeros(n_rows - self.n_learned_.size, np.int64)])

    def _model(self, row: int) -> Forecaster:
        model = self.models_[row]
        if model is None:
            model = self.models_[row] = self.factory()
        return model

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        # One-series forecasters assume a regular grid: interpolated values are learned like real ones.
        for row, y in zip(rows.tolist(), values.tolist(), strict=True):
            self._model(row).learn_one(y)
        self.n_learned_[rows] += 1

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        out = np.full((len(rows), horizon), np.nan)
        for i, row in enumerate(rows.tolist()):
            model = self.models_[row] if row < len(self.models_) else None
            if model is not None and is_ready(model, int(self.n_learned_[row]), self.min_history):
                out[i] = model.forecast(horizon)
        return out

    def reset_rows(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            self.models_[row] = None
        self.n_learned_[rows] = 0

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        blobs = [json.dumps(self._state_of(self.models_[r]), separators=(",", ":")).encode()
                 for r in rows.tolist()]
        width = max((len(b) for b in blobs), default=0)
        data = np.zeros((len(blobs), width), np.uint8)
        for i, blob in enumerate(blobs):
            data[i, : len(blob)] = np.frombuffer(blob, np.uint8)
        return {"json": data, "json_len": np.array([len(b) for b in blobs], np.int64),
                "n_learned": self.n_learned_[rows].copy()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.resize(int(rows.max()) + 1 if len(rows) else 0)
        for i, row in enumerate(rows.tolist()):
            item = json.loads(state["json"][i, : int(state["json_len"][i])].tobytes())
            self.models_[row] = None if item is None else self._restore(item)
        # states written before the count existed: 0, i.e. a count-based forecaster warms up again
        self.n_learned_[rows] = state.get("n_learned", np.zeros(len(rows), np.int64))

    @staticmethod
    def _state_of(model: Forecaster | None) -> Any:
        if model is None:
            return None
        return model.get_state() if hasattr(model, "get_state") else dump_state(model)

    def _restore(self, state: Any) -> Forecaster:
        model = self.factory()
        if hasattr(model, "set_state"):
            model.set_state(state)
        else:
            load_state(model, state)
        return model
