"""The label-free watcher: bootstrap replicas' spread, per series, against its own reference.

A model run with ``bootstrap=B`` (:mod:`tidecast.models.bootstrap`, which says how each kind of replica measures it)
answers ``spread_many(rows, H)``: how far its B replicas' forecasts spread for every (series, horizon), at the moment
the forecast is issued - before any target arrives. Replicas trained on different resamples agree where the data look
like what they were trained on and disagree where the inputs leave that range (a level shift, a trend, a ramp, a
variance burst): that disagreement is the signal. A bias that leaves the inputs in range (the model is simply off by a
constant, with the same variance) moves no replica apart: the spread cannot see it; the label-based detectors
(:mod:`tidecast.monitors.drift`) do.

Per row, at every issued forecast, :class:`BootstrapMonitor`

1. divides the spread by the series' **residual scale**, per horizon: a running mean of the matured ``|y - yhat|``
   (:class:`~tidecast.monitors.drift.HorizonPool`, slow on purpose, memory 1000: the calibrator's own scale
   follows a change within a cycle and would hide it); the ratio per horizon feeds the
   ``tidecast_bootstrap_spread_ratio`` gauge;
2. averages the ratios over horizons into the row's **score** and compares its log with the row's **reference**
   (the mean log score since the last fit or reset; nothing is compared before ``warmup`` scores): the
   **deterioration** ``exp(log score - reference)`` is 1 while the replicas disagree as much as they used to;
3. runs a one-sided CUSUM (Page-Hinkley form) on ``log score - reference - slack``; above ``threshold`` it
   alarms: a :class:`~tidecast.monitors.drift.DriftEvent` with detector ``"bootstrap"`` and kind
   ``"uncertainty"``, then the row's reference restarts (the alarm has been said; the new spread becomes normal
   unless the model is retrained, which calls :meth:`BootstrapMonitor.reset_rows`).

Everything is arrays over rows; the state (scale, reference, CUSUM, last ratios) is exported with each series.

>>> import numpy as np
>>> from tidecast.models.naive import SeasonalNaive
>>> model = SeasonalNaive(period=4, bootstrap=8)
>>> monitor = BootstrapMonitor(model, horizon=2)
>>> model.resize(1); monitor.resize(1)
>>> rng, rows, fired = np.random.default_rng(0), np.array([0]), []
>>> for t in range(700):
...     y = np.array([t % 4 + rng.normal() * (0.1 if t < 600 else 0.5)])  # the noise grows at t = 600
...     mean = y[:, None] + 0.1 * rng.normal(size=(1, 2))  # matured forecasts, about 0.1 off
...     _ = monitor.matured(rows, np.array([t]), y, mean, mean - 1, mean + 1, np.ones((1, 2), bool))
...     model.learn_many(rows, np.array([t]), y)
...     f = model.forecast_many(rows, 2)
...     fired += [t] * len(monitor.issued(rows, np.array([t]), f, f, f))
>>> 600 <= fired[0] < 630
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tidecast.models.base import ArrayDict, BatchForecaster, check_between, check_count, check_positive
from tidecast.models.rows import Field, RowTable, nest, under
from tidecast.monitors.drift import NO_ALARM, Alarms, HorizonPool, LaneMonitor

__all__ = ["BootstrapMonitor", "horizon_buckets"]


def horizon_buckets(horizon: int) -> list[tuple[int, int]]:
    """The horizon label set of ``tidecast_bootstrap_spread_ratio``: ``(first, last)`` horizons of each bucket,
    labelled by ``last``: 1, 2, 4, 8, ... and H itself, so H = 1000 makes 11 labels, never 1000.

    >>> horizon_buckets(24)
    [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 24)]
    """
    edges = [1]
    while edges[-1] * 2 < horizon:
        edges.append(edges[-1] * 2)
    if edges[-1] != horizon:
        edges.append(horizon)
    return [(prev + 1, last) for prev, last in zip([0, *edges[:-1]], edges, strict=True)]


class BootstrapMonitor(LaneMonitor):
    """The bootstrap watcher of one lane; see the module docstring.

    model: the lane's forecaster (its ``spread_many`` is read right after each forecast). slack: the log
    ratio the CUSUM ignores (log 1.5: the replicas may disagree half again as much as they used to). threshold:
    the CUSUM's alarm level. warmup: scores before the reference is trusted. memory: the reference's horizon
    (an exponential mean past it). scale_memory: the residual scale's.
    """

    key = "bootstrap"
    detector = "bootstrap"

    def __init__(self, model: BatchForecaster, horizon: int, slack: float = float(np.log(1.5)),
                 threshold: float = 4.0, warmup: int = 100, memory: int = 1000, scale_memory: int = 1000) -> None:
        super().__init__()
        check_positive("threshold", threshold)
        check_between("slack", slack, 0, math.inf, open_high=True)
        check_count("warmup", warmup)
        check_count("memory", memory)
        check_count("scale_memory", scale_memory)
        self.model = model
        self.horizon, self.slack, self.threshold = horizon, slack, threshold
        self.warmup, self.memory = warmup, memory
        self.pool_ = HorizonPool(horizon, scale_memory)
        self.rows_ = RowTable(ratio=Field((horizon,), np.float64, np.nan), n=Field((), np.float64, 0.0),
                              reference=Field((), np.float64, 0.0), cusum=Field((), np.float64, 0.0),
                              deterioration=Field((), np.float64, np.nan))

    @property
    def ratio_(self) -> np.ndarray:
        """Each row's latest spread / residual scale per horizon (NaN: none yet), shape (rows, H)."""
        return self.rows_["ratio"]

    @property
    def deterioration_(self) -> np.ndarray:
        """Each row's latest score over its reference (1: as uncertain as usual; NaN before the warm-up)."""
        return self.rows_["deterioration"]

    def model_replaced(self, model: BatchForecaster) -> None:
        self.model = model  # the replaced model's replicas no longer forecast: reading them, the watcher went blind

    def resize(self, n_rows: int) -> None:
        super().resize(n_rows)
        self.pool_.resize(n_rows)
        self.rows_.resize(n_rows)

    def matured(self, rows: np.ndarray, ticks: np.ndarray, y: np.ndarray, mean: np.ndarray, lower: np.ndarray,
                upper: np.ndarray, valid: np.ndarray) -> Alarms:
        with np.errstate(invalid="ignore"):  # only the scale learns here: the watcher itself needs no target
            self.pool_.pool(rows, np.where(valid, y[:, None] - mean, np.nan))
        return Alarms.empty()

    def issued(self, rows: np.ndarray, ticks: np.ndarray, forecast: np.ndarray, lower: np.ndarray,
               upper: np.ndarray) -> Alarms:
        spread = self.model.spread_many(rows, self.horizon)
        if spread is None:
            return Alarms.empty()
        return self.observe(rows, ticks, spread)

    def observe(self, rows: np.ndarray, ticks: np.ndarray, spread: np.ndarray) -> Alarms:
        """Learn the replicas' ``spread`` (n, H) for ``rows`` at ``ticks``; return the rows that alarmed."""
        rows = np.asarray(rows, dtype=np.intp)
        self.resize(int(rows.max()) + 1 if rows.size else 0)
        scale = self.pool_.scale_[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where((self.pool_.count_[rows] > 0) & (scale > 0), spread / scale, np.nan)
        self.rows_["ratio"][rows] = ratio
        ok = np.isfinite(ratio)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.log(np.where(ok, ratio, 0.0).sum(axis=1) / ok.sum(axis=1))
        live = np.isfinite(score)
        r, x = rows[live], score[live]
        n, reference, cusum = self.rows_["n"][r], self.rows_["reference"][r], self.rows_["cusum"][r]
        ready = n >= self.warmup
        # test against the reference, then let it learn (a slow mean: a drift is not learned away quickly)
        cusum = np.where(ready, np.maximum(0.0, cusum + x - reference - self.slack), 0.0)
        self.rows_["deterioration"][r] = np.where(ready, np.exp(x - reference), np.nan)
        rate = np.maximum(1.0 / (n + 1.0), 1.0 / self.memory)
        reference = reference + rate * (x - reference)
        fired = cusum > self.threshold
        statistic = cusum[fired]
        self.rows_["n"][r] = np.where(fired, 0.0, n + 1.0)
        self.rows_["reference"][r] = np.where(fired, 0.0, reference)
        self.rows_["cusum"][r] = np.where(fired, 0.0, cusum)
        alarms = Alarms(r[fired].astype(np.int64), np.full(int(fired.sum()), "uncertainty"), statistic)
        self.note(alarms, rows, ticks)
        return alarms

    def reset_rows(self, rows: np.ndarray) -> None:
        """The rows' model was refitted: its replicas' spread and errors start a new reference."""
        rows = np.asarray(rows, dtype=np.intp)
        self.pool_.reset_rows(rows)
        self.rows_.blank(rows)

    def spread_ratio_medians(self, n_rows: int | None = None) -> dict[int, float]:
        """Median over rows of the latest spread ratio, per horizon bucket (:func:`horizon_buckets`, keyed by
        the bucket's last horizon): the ``tidecast_bootstrap_spread_ratio`` gauge. Buckets with no value left out."""
        ratio = self.rows_["ratio"][: self.rows_.n_rows if n_rows is None else n_rows]
        out = {}
        ok = np.isfinite(ratio)
        filled = np.where(ok, ratio, 0.0)
        for first, last in horizon_buckets(self.horizon):
            count = ok[:, first - 1 : last].sum(axis=1)
            per_row = filled[:, first - 1 : last].sum(axis=1)[count > 0] / count[count > 0]
            if per_row.size:
                out[last] = float(np.median(per_row))
        return out

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        rows = np.asarray(rows, dtype=np.intp)
        self.resize(int(rows.max()) + 1 if rows.size else 0)
        out = super().export_rows(rows)
        out.update(nest("pool/", self.pool_.export_rows(rows)))
        out.update({f"row/{k}": v.copy() for k, v in self.rows_.export_rows(rows).items()})
        return out

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size == 0:
            return
        self.resize(int(rows.max()) + 1)
        row, pool = under("row/", state), under("pool/", state)
        fits = (set(row) == set(self.rows_.fields) and "scale" in pool
                and np.shape(pool["scale"])[1:] == (self.horizon,))
        if not fits:  # saved without the watcher (or with another horizon): these rows start afresh
            self.reset_rows(rows)
            self.last_alarm_tick_[rows] = NO_ALARM
            return
        super().import_rows(rows, state)
        self.pool_.import_rows(rows, pool)
        self.rows_.import_rows(rows, row)


def bootstrap_monitors(model: BatchForecaster, horizon: int, **params: Any) -> list[LaneMonitor]:
    """The bootstrap watcher for a lane whose model runs replicas (``bootstrap > 0``); none otherwise."""
    if not getattr(model, "bootstrap", 0):
        return []
    return [BootstrapMonitor(model, horizon, **params)]
