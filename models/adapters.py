"""Adapters that bring one-series forecasters (river's, or anyone's) into the engine.

* :class:`Standardised` wraps a river forecaster with what it needs to behave on a live stream: it waits for a
  warm-up window, detects the cycle length there (unless configured), fixes a standardisation from the same
  window — river's linear learners diverge on raw-scale targets (see ../shared/reference/anchors.md) — and
  then replays the window into the model. Forecasts are ``NaN`` until then.
* :class:`PerSeries` turns a factory of one-series forecasters into a :class:`~tidecast.models.base.BatchForecaster`:
  one object per row, a Python loop per call. Fine for baselines; vectorised models implement the batch
  protocol directly.

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


class Standardised(Params):
    """A river forecaster behind a warm-up window, cycle detection and a fixed standardisation.

    build: ``build(period) -> Forecaster`` makes the river model once the cycle length is known.
    period: cycle length in ticks; ``None`` detects it on the warm-up window (no cycle found -> 1).
    warmup: observations buffered before the model starts; default ``2 * max_period + 2``.

    >>> from river import time_series
    >>> f = Standardised(lambda p: time_series.HoltWinters(0.3, 0.01, 0.2, seasonality=p), period=4, warmup=8)
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
        self.period_ = 0
        self.mean_ = 0.0
        self.scale_ = 1.0

    def learn_one(self, y: float, x: dict | None = None) -> None:
        if self.model_ is not None:
            self.model_.learn_one((y - self.mean_) / self.scale_)
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
        self.buffer_ = []

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]:
        if self.model_ is None:
            return [math.nan] * horizon
        return [v * self.scale_ + self.mean_ for v in self.model_.forecast(horizon)]

    def get_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer_, "period": self.period_, "mean": self.mean_, "scale": self.scale_,
                "model": dump_state(self.model_) if self.model_ is not None else None}

    def set_state(self, state: dict[str, Any]) -> None:
        self.buffer_ = list(state["buffer"])
        self.period_, self.mean_, self.scale_ = int(state["period"]), state["mean"], state["scale"]
        self.model_ = None
        if state["model"] is not None:
            self.model_ = self.build(self.period_)
            load_state(self.model_, state["model"])


class PerSeries(BatchForecaster):
    """One forecaster object per row, built by ``factory()``; state via ``get_state``/``set_state`` or
    :mod:`tidecast.models.river_state`."""

    def __init__(self, name: str, factory: Callable[[], Forecaster]) -> None:
        self.name = name
        self.factory = factory
        self.models_: list[Forecaster | None] = []

    def resize(self, n_rows: int) -> None:
        if n_rows > len(self.models_):
            self.models_.extend([None] * (n_rows - len(self.models_)))

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

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        out = np.full((len(rows), horizon), np.nan)
        for i, row in enumerate(rows.tolist()):
            out[i] = self._model(row).forecast(horizon)
        return out

    def reset_rows(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            self.models_[row] = None

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        blobs = [json.dumps(self._state_of(self.models_[r]), separators=(",", ":")).encode()
                 for r in rows.tolist()]
        width = max((len(b) for b in blobs), default=0)
        data = np.zeros((len(blobs), width), np.uint8)
        for i, blob in enumerate(blobs):
            data[i, : len(blob)] = np.frombuffer(blob, np.uint8)
        return {"json": data, "json_len": np.array([len(b) for b in blobs], np.int64)}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.resize(int(rows.max()) + 1 if len(rows) else 0)
        for i, row in enumerate(rows.tolist()):
            item = json.loads(state["json"][i, : int(state["json_len"][i])].tobytes())
            self.models_[row] = None if item is None else self._restore(item)

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
