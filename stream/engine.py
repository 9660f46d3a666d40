"""The engine: one loop that turns observations into scored, calibrated forecasts.

``replay``, ``serve`` and the stream benchmarks all drive the same :class:`Engine`. It does no I/O: a caller
decodes records, hands over an :class:`~tidecast.stream.batch.ObservationBatch`, and receives forecasts and
rejections to
route to sinks and dead letters. It never imports torch either: models come in as
:class:`~tidecast.models.base.BatchForecaster` tables.

For each series, in timestamp order, every new observation ``y`` at tick ``t`` goes through, per model ("lane"):

1. **score** — the h-step forecasts issued at ``t - h`` (h = 1..H) have matured: their residuals ``y - yhat`` go
   to horizon h's calibrator and to the prequential scorer. Never earlier: that would leak the future.
2. **learn** — the model sees ``y``.
3. **forecast** — H steps ahead.
4. **interval** — the calibrator puts ``[lower, upper]`` around each step, one per configured level (all learned
   in the same pass). Before that, residuals the model handed over
   (:meth:`~tidecast.models.base.BatchForecaster.pop_calibration`: a fit's validation windows, a backtest) seed the
   calibrator cells of the rows they name, and in a lane whose model shares state across series (CycleNet) a cell
   with fewer than ``n0`` residuals of its own borrows from the lane's other series
   (:class:`~tidecast.monitors.conformal.pool.Pool`). Both bounds are ``NaN`` ("no interval yet") only where
   neither the cell nor the lane has anything, never a zero-width interval claiming certainty.
5. **monitor** — each lane's monitors (:class:`~tidecast.monitors.drift.LaneMonitor`) see what matured in step 1
   (the drift monitor: residuals of every horizon, the first level's h = 1 interval's hit or miss, the value) and
   what was issued in step 4 (label-free watchers); their alarms become :class:`~tidecast.monitors.drift.DriftEvent`
   objects in :attr:`EngineResult.events`; metrics are updated.
6. **emit** — forecast records and events go back to the caller.

Time: each series lives on a regular grid of step ``freq``. Without a configured ``freq`` the step is inferred
per series: its first :data:`STEP_WINDOW` observations are *held*, and the step is their most frequent gap (the
lower median when none repeats: :func:`inferred_step`), so neither missing values nor one irregular gap among
the first few set a wrong grid. Held rows count as applied when they are
released onto the grid — when the window is full, or at end of input (:meth:`Engine.flush`); until then they are
part of the series' state (checkpointed in ``serve``). Positions on the grid are integer *ticks*, anchored to the
epoch, so ``tick % W`` is a phase taken from the clock. Then:

* a timestamp equal to the series' last one is a **duplicate**: skipped and counted;
* an older one is **out of order**: rejected (dead letter);
* a newer one that snaps onto the tick already used by the last one is a **collision**: skipped and counted apart
  from duplicates (its timestamp differs), with one warning per series — collisions mean the grid is coarser than
  the data, so ``freq`` deserves a look;
* a value beyond ``max_abs_value`` in magnitude is **out of range**: rejected (dead letter);
* a **gap** of up to ``max_gap`` missing ticks is filled by linear interpolation between the two real
  neighbours — the filled ticks are learned (models need a contiguous grid; ``learn_many`` gets ``filled=True``
  for them, so a model that handles irregular time may skip them) but never scored and never forecast from;
  pending forecasts that targeted them are dropped. A longer gap resets the series' model history
  (learned parameters such as CycleNet's cycle row stay; phase comes from the clock, so they stay aligned).
* timestamps off the grid snap to the nearest tick.

Many series are processed together: a batch is split into *rounds*, one per grid time of the batch (in buckets of
its finest step), each holding every series' event at that time, and each round makes one vectorised call per model
and per calibrator. Placing records on
their grids is a Python loop over records only where a rule above applies: the series whose records in a batch are
each the next tick of a known series (the steady state of a live stream) are placed with array operations
(``_place_steady``), with the same state and events.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np

from tidecast.models.base import ArrayDict, BatchForecaster, notify_step, read_only
from tidecast.models.rows import capacity_for, grow, under
from tidecast.monitors.bootstrap import BootstrapMonitor, bootstrap_monitors, horizon_buckets
from tidecast.monitors.conformal import Calibrator, make_calibrator
from tidecast.monitors.conformal.pool import Pool
from tidecast.monitors.drift import (
    NO_ALARM,
    Alarms,
    DriftEvent,
    DriftMonitor,
    LaneMonitor,
    from_epoch_ns,
    make_detector,
)
from tidecast.monitors.metrics import Metrics
from tidecast.monitors.scoring import PrequentialScorer
from tidecast.stream.batch import ActualBatch, ForecastBatch, ObservationBatch, Rejection, first_steps
from tidecast.stream.checks import RESERVED_SHARED_KEYS
from tidecast.stream.clock import StepClock
from tidecast.stream.config import STEP_WINDOW, EngineConfig
from tidecast.stream.pending import PendingForecasts
from tidecast.stream.records import REASONS, from_ns, out_of_range
from tidecast.stream.retrain import Retrainer, RetrainEvent, give_history, retrain_settings

log = logging.getLogger(__name__)

_NO_TICK = np.iinfo(np.int64).min
_MAX_NS = np.iinfo(np.int64).max
_MIN_NS = _NO_TICK + 1  # int64's minimum is NaT to pandas
T = TypeVar("T")


class Lane:
    """One model's path through the engine: forecaster -> calibrator (+ pool) -> scorer, and its watchers
    (``monitors``: :class:`~tidecast.monitors.drift.LaneMonitor` objects, e.g. the drift monitor) whose alarms become
    events.

    ``alpha`` may be a sequence: every level is learned by the one calibrator, kept pending and scored; monitors
    see the first level's interval. ``pool``: how young cells borrow from the lane's other series. By default
    :class:`Pool`'s settings for a model whose rows already share state (``model.couples_rows``: CycleNet), and off
    (``n0=0``) for a model of independent rows, whose series then stay independent of each other: a replay re-makes
    every forecast and interval of a series identically however the series' records interleave (a crash and restart
    in ``serve``).
    """

    def __init__(self, model: BatchForecaster, calibrator: Calibrator, horizon: int,
                 alpha: float | Sequence[float], coverage_window: int = 1000, name: str | None = None,
                 pool: Pool | None = None,
                 monitors: list[LaneMonitor] | None = None) -> None:
        self.name = name or model.name  # the lane's alias: records, metric labels and state keys use it
        self.model = model
        self.clock = StepClock()  # the newest grid time step: retrain steps and online learning rounds
        self.calibrator = calibrator
        n_levels = np.atleast_1d(alpha).size
        if n_levels > 1 and type(calibrator).intervals is Calibrator.intervals:
            raise ValueError(f"lane {self.name!r}: calibrator {calibrator.name!r} gives one interval level (it does "
                             f"not implement intervals()), {n_levels} were asked for")
        if pool is None:
            pool = Pool(horizon, levels=n_levels) if model.couples_rows else Pool(horizon, n0=0, levels=n_levels)
        self.pool = pool
        # A calibrator that keeps the intervals it issued (conformal PID) spares the pending forecasts theirs, unless
        # the lane pools young cells: then the published interval is not the calibrator's own.
        keeps = getattr(calibrator, "keeps_issued_intervals", False) and pool.n0 == 0
        self.pending = PendingForecasts(horizon, n_levels, bounds=not keeps)
        self.scorer = PrequentialScorer(horizon, alpha, coverage_window)
        self.monitors = list(monitors or [])
        keys = [m.key for m in self.monitors]
        if len(set(keys)) != len(keys) or set(keys) & {"model", "cal", "pool", "pending", "score"}:
            raise ValueError(f"lane monitors need distinct state keys, got {keys}")

    def resize(self, n_rows: int) -> None:
        for part in (self.model, self.calibrator, self.pool, self.pending, self.scorer, *self.monitors):
            part.resize(n_rows)

    def parts(self) -> dict[str, Any]:
        parts = {"model": self.model, "cal": self.calibrator, "pool": self.pool, "pending": self.pending,
                 "score": self.scorer}
        return parts | {m.key: m for m in self.monitors}

    def seed_calibrator(self, horizon: int) -> None:
        """Seed the calibrator rows the model has residuals for (it polls; the model may fit on another thread)."""
        handed = self.model.pop_calibration(horizon)
        if handed is not None and handed.rows.size:
            self.calibrator.seed(handed.rows, handed.residuals)
            self.pool.restart(handed.rows)

    def interval(self, rows: np.ndarray, forecast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The calibrator's intervals per level, (n, H, levels), young cells pooled."""
        lower, upper = self.calibrator.intervals(rows, forecast)
        return self.pool.intervals(self.calibrator, rows, forecast, lower, upper)


@dataclass
class EngineResult:
    """What one :meth:`Engine.process` call produced."""

    forecasts: ForecastBatch
    rejections: list[Rejection] = field(default_factory=list)
    n_applied: int = 0  # rows placed on their series' grid (held rows count when they are released)
    n_duplicates: int = 0
    n_collisions: int = 0  # rows whose timestamp snapped onto the tick of their series' last one
    n_gap_filled: int = 0
    n_resets: int = 0  # gaps longer than max_gap after which a series' history was reset (one per gap)
    elapsed_seconds: float = 0.0
    #: the real observations applied, on their grid (what the forecasts of those steps are scored against)
    actuals: ActualBatch = field(default_factory=ActualBatch.empty)
    events: list[DriftEvent] = field(default_factory=list)  # lane monitors' alarms (drift), in round order


# Per-series engine state: name -> (dtype, fill for an empty row); hold_t/hold_v have STEP_WINDOW columns.
_SERIES_FIELDS: dict[str, tuple[type, Any]] = {
    "step_ns": (np.int64, 0),
    "anchor_ns": (np.int64, 0),
    "last_tick": (np.int64, _NO_TICK),
    "last_t": (np.int64, _NO_TICK),  # timestamp of the last applied observation (duplicate vs collision)
    "last_value": (np.float64, np.nan),
    "hold_n": (np.int64, 0),  # rows held while the step is inferred
    "hold_t": (np.int64, 0),
    "hold_v": (np.float64, np.nan),
    "n_applied": (np.int64, 0),
    "n_duplicates": (np.int64, 0),
    "n_collisions": (np.int64, 0),
    "n_gap_filled": (np.int64, 0),
    "applied_partition": (np.int32, -1),
    "applied_offset": (np.int64, -1),
}
_SERIES_WIDTH = {"hold_t": STEP_WINDOW, "hold_v": STEP_WINDOW}


def _empty_field(name: str) -> np.ndarray:
    dtype = _SERIES_FIELDS[name][0]
    return np.zeros((0, _SERIES_WIDTH[name]) if name in _SERIES_WIDTH else 0, dtype)


class StateMismatch(ValueError):
    """Saved series state that cannot be imported into this engine (arrays missing or misshapen); nothing of it is
    kept."""


#: What importing saved shared state that does not fit a lane raises (a model's own checks, JSON of another shape)
_UNFIT = (KeyError, ValueError, IndexError, TypeError, AttributeError)


def _upgrade_engine_arrays(arrays: ArrayDict, n_rows: int) -> ArrayDict:
    """State saved before the step window (``held``/``held_t``/``held_v``, no ``last_t``) in today's layout."""
    if "engine/hold_n" in arrays or "engine/held" not in arrays:
        return arrays
    out = {k: v for k, v in arrays.items() if k not in ("engine/held", "engine/held_t", "engine/held_v")}
    held = np.asarray(arrays["engine/held"], bool)
    out["engine/hold_n"] = held.astype(np.int64)
    out["engine/hold_t"] = np.zeros((n_rows, STEP_WINDOW), np.int64)
    out["engine/hold_t"][:, 0] = arrays["engine/held_t"]
    out["engine/hold_v"] = np.full((n_rows, STEP_WINDOW), np.nan)
    out["engine/hold_v"][:, 0] = arrays["engine/held_v"]
    last, step = np.asarray(arrays["engine/last_tick"]), np.asarray(arrays["engine/step_ns"])
    known = last != _NO_TICK  # the grid time of the last tick stands in for its (unsaved) timestamp
    out["engine/last_t"] = np.where(known, arrays["engine/anchor_ns"] + np.where(known, last, 0) * step, _NO_TICK)
    out["engine/n_collisions"] = np.zeros(n_rows, np.int64)
    return out


class _Events:
    """Per-batch event lists, built in arrival order, then cut into rounds."""

    __slots__ = ("slot", "tick", "value", "real", "reset", "t_ns", "rank")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, [])

    def add(self, slot: int, tick: int, value: float, real: bool, reset: bool, t_ns: int, rank: int) -> None:
        self.slot.append(slot)
        self.tick.append(tick)
        self.value.append(value)
        self.real.append(real)
        self.reset.append(reset)
        self.t_ns.append(t_ns)
        self.rank.append(rank)

    def columns(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        cols = {
            "slot": np.array(self.slot, np.int64), "tick": np.array(self.tick, np.int64),
            "value": np.array(self.value, np.float64), "real": np.array(self.real, bool),
            "reset": np.array(self.reset, bool), "t_ns": np.array(self.t_ns, np.int64),
        }
        return cols, np.array(self.rank, np.int64)


class _Placed:
    """The events of a batch's steady series, placed in one go by :meth:`Engine._place_steady` (columns, already
    arrays)."""

    __slots__ = ("cols", "rank")

    def __init__(self, cols: dict[str, np.ndarray], rank: np.ndarray) -> None:
        self.cols, self.rank = cols, rank

    def columns(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return self.cols, self.rank

    def join(self, events: _Events) -> _Placed:
        """These events and those placed one record at a time (other series: ranks stay per series)."""
        if not events.slot:
            return self
        cols, rank = events.columns()
        joined = {k: np.concatenate([v, cols[k]]) for k, v in self.cols.items()}
        return _Placed(joined, np.concatenate([self.rank, rank]))


def _cut_rounds(cols: dict[str, np.ndarray], rank: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Round k holds the events of rank k (:meth:`Engine._time_ranks`), in arrival order."""
    if len(rank) and not rank.any():  # one event per series: the common case, no sort
        return [cols]
    order = np.argsort(rank, kind="stable")
    bounds = np.flatnonzero(np.diff(rank[order])) + 1
    return [{k: v[idx] for k, v in cols.items()} for idx in np.split(order, bounds)]


class Engine:
    """Per-series state plus one :class:`Lane` per model; see the module docstring for the rules."""

    def __init__(self, config: EngineConfig, lanes: list[Lane], metrics: Metrics | None = None,
                 retrainer: Retrainer | None = None) -> None:
        self.config = config
        self.lanes = lanes
        self.metrics = metrics if metrics is not None else Metrics(reasons=REASONS)
        self.retrainer = retrainer
        # A lane's saved retrain entry (model version, policy state) while this run does not retrain it: written
        # back as it was, so retrain off for a while and on again keeps the version instead of restarting at 0
        self._idle_retrain: dict[str, dict[str, Any]] = {}
        if retrainer is not None:
            for lane in lanes:
                if lane.name in retrainer:  # export zeros: absent != never retrained
                    for outcome in ("started", "promoted", "rejected", "failed", "rolled_back"):
                        self.metrics.retrains.labels(model=lane.name, outcome=outcome)
                    self.metrics.model_version.labels(model=lane.name).set(retrainer.version(lane.name))
        self._allowed = set(config.allowed_series) if config.allowed_series is not None else None
        self._step = config.step_ns
        self._gap_limit = config.gap_limit
        self._levels = tuple(config.level_names)
        self._model_columns: dict[str, np.ndarray] = {}  # see _model_column
        self._gauges: dict[tuple, Any] = {}  # see _gauge
        self._spread_shown: set[tuple[str, str]] = set()  # (lane, bucket) children of the spread gauge set
        self._slot_of: dict[str, int] = {}
        # rows of dropped series, reused first, lowest first (a heap): the choice then depends only on which rows
        # hold series, so an engine restored into the same rows gives a new series the row the uninterrupted one
        # would (a stack gave the last dropped; row-indexed shared state, such as cfc's replay draws, diverged)
        self._free = FreeRows()
        self._ids = np.zeros(0, dtype=object)
        self._cap = 0
        self.series_ = {name: _empty_field(name) for name in _SERIES_FIELDS}
        self._grow(8)
        self._blank = self._export_rows(np.array([0]))  # the state of a row no series has touched
        for lane in lanes:  # the alerts compare rolling coverage with this, per model and level
            for level, alpha in zip(config.level_names, config.alphas, strict=True):
                self.metrics.target_coverage.labels(model=lane.name, level=level).set(1.0 - alpha)
            for monitor in lane.monitors:  # export zeros: absent != no alarm
                self.metrics.drift_alarms.labels(model=lane.name, detector=monitor.detector)
            if lane.monitors:
                self.metrics.series_drifting.labels(model=lane.name).set(0)
            # counted when scraped, not after every batch: a scan of every row that only a dashboard reads
            self.metrics.series_warming_up.labels(model=lane.name).set_function(partial(self._warming_up, lane))

    @classmethod
    def from_config(cls, config: EngineConfig, metrics: Metrics | None = None) -> Engine:
        """Build the lanes named by ``config`` from the model and calibrator registries."""
        from tidecast.models.registry import make_model

        lanes = []
        alpha = config.alphas if len(config.alphas) > 1 else config.alpha  # one level: as it always was
        retrain = retrain_settings(config.retrain_params) if config.retrain == "on" else None
        for alias, model in config.lanes:
            try:
                forecaster = make_model(model, horizon=config.horizon, **config.model_params.get(alias, {}))
            except ValueError as err:  # a parameter value the model refuses: name the lane and where it came from
                raise ValueError(f"lane {alias!r} ({model}): {err} (from --model-param or "
                                 f"[model_params.{alias}])") from None
            if retrain is not None:  # a refit needs recent data: models that keep none get a ring
                forecaster = give_history(forecaster, retrain)
                _check_refit_params(alias, model, forecaster, retrain.refit_params)
            calibrator = _from_settings("--calibrator-param or [calibrator_params]", make_calibrator,
                                        config.calibrator, config.horizon, alpha, **config.calibrator_params)
            monitors = _from_settings("--drift-param or [drift_params]", drift_monitors, config)
            monitors += _from_settings("--bootstrap-param or [bootstrap_params]", bootstrap_monitors, forecaster,
                                       config.horizon, **config.bootstrap_params)
            lanes.append(Lane(forecaster, calibrator, config.horizon, alpha, config.coverage_window, name=alias,
                              monitors=monitors))
        retrainer = None
        if retrain is not None:
            _check_triggers(lanes, retrain.policy)
            retrainer = Retrainer({alias: retrain for alias, _ in config.lanes})  # each lane clones the policy
        return cls(config, lanes, metrics, retrainer)

    # -- series table -----------------------------------------------------------------------------
    @property
    def series_ids(self) -> list[str]:
        return list(self._slot_of)

    def forget_applied_offsets(self, series_ids: Iterable[str]) -> None:
        """The series' input log went back (topic recreated): their last applied offsets belong to the old log and
        must not become skip floors at a later restore (the engine's timestamp checks judge the new log)."""
        slots = [self._slot_of[sid] for sid in series_ids if sid in self._slot_of]
        if slots:
            self.series_["applied_offset"][np.array(slots)] = -1

    def series_rows(self) -> dict[str, int]:
        """Each series' row in the engine's tables (a checkpoint keeps it, so a restore can put it back there)."""
        return dict(self._slot_of)

    def _register(self, series_id: str, row: int | None = None) -> int | None:
        """A row for a new series: ``row`` if given and free, else a freed row, else the next new one."""
        if self._allowed is not None and series_id not in self._allowed:
            return None
        if len(self._slot_of) >= self.config.max_series:
            return None
        slot = self._claim(row) if row is not None else None
        if slot is None:
            slot = self._free.pop() if self._free else len(self._slot_of)
        if slot >= self._cap:
            self._grow(capacity_for(self._cap, slot + 1))
        self._slot_of[series_id] = slot
        self._ids[slot] = series_id
        if self._step is not None:
            self.series_["step_ns"][slot] = self._step
        self.metrics.series_active.set(len(self._slot_of))
        return slot

    def refusal(self, series_id: str) -> str:
        """Why a new series was not accepted: not in ``allowed_series``, or ``max_series`` reached."""
        if self._allowed is not None and series_id not in self._allowed:
            return f"series {series_id!r} not accepted: not in allowed_series"
        return f"series {series_id!r} not accepted: max_series ({self.config.max_series:,}) series are served"

    def _grow(self, cap: int) -> None:
        self._cap = cap
        ids = np.zeros(cap, dtype=object)
        ids[: len(self._ids)] = self._ids
        self._ids = ids
        self.series_ = {n: grow(a, cap, _SERIES_FIELDS[n][1]) for n, a in self.series_.items()}
        for lane in self.lanes:
            lane.resize(cap)

    # -- the loop ---------------------------------------------------------------------------------
    def process(self, batch: ObservationBatch) -> EngineResult:
        """Apply a batch (any mix of series, each in arrival order) and return the forecasts it produced."""
        started = time.perf_counter()
        result = EngineResult(self._no_forecasts())
        return self._run(self._sequence(batch, result), result, started)

    def flush(self) -> EngineResult:
        """End of input: release the rows of every series still inferring its step onto a grid inferred from
        what it has. A series seen at one timestamp only has no step and stays held (:attr:`held_rows`)."""
        started = time.perf_counter()
        result = EngineResult(self._no_forecasts())
        events: _Events = _Events()
        rank: dict[int, int] = {}
        for slot in np.flatnonzero(self.series_["hold_n"] >= 2).tolist():
            self._release(slot, events, rank, result)
        return self._run(events, result, started)

    @property
    def held_rows(self) -> int:
        """Rows held while their series' step is being inferred (applied once released)."""
        return int(self.series_["hold_n"].sum())

    def _no_forecasts(self) -> ForecastBatch:
        return ForecastBatch.empty(self.config.alpha, self._levels)

    def _time_ranks(self, cols: dict[str, np.ndarray], rank: np.ndarray, finest: int) -> np.ndarray:
        """Each event's round: the index of its grid time among the batch's, in buckets of the finest grid step of
        all series counted from the epoch (``rank``: its index among its series' events, is kept when every series
        has one event and all are at one time). A series' events are one step apart at least, so each is in a
        later bucket than the one before; and no series' event is learned before another series' older ones. The
        k-th event of every series (the rounds once) put a series that starts late in the batch, or resumes after
        a long gap, beside the others' older events: a shared model (CycleNet, cfc) learned its future values
        before forecasting theirs, and the result depended on the batch size. One event per series at two times
        (a batch cut mid-tick) was one round too: the retrainer ended the later time's step before the earlier
        values were learned."""
        slots = cols["slot"]
        step = self.series_["step_ns"][slots]
        grid = self.series_["anchor_ns"][slots] + cols["tick"] * step
        if not rank.any() and grid.min() == grid.max():  # one event per series, all at one time: one round
            return rank
        # buckets of every series' finest step from the epoch, not of this batch's from its first time: series
        # sampled at 15 and 45 past the hour share their hour's round whatever the batch holds (the retrainer counts
        # its steps in the same buckets)
        return np.unique(grid // finest, return_inverse=True)[1].reshape(rank.shape)

    def _finest_step(self) -> int:
        """The finest grid step among the series (ns): the width of a round's and a retrain step's time bucket."""
        steps = self.series_["step_ns"]
        known = steps[steps > 0]
        return int(known.min()) if known.size else 1

    def _run(self, events: _Events | _Placed, result: EngineResult, started: float) -> EngineResult:
        outputs: list[tuple] = []
        actuals: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        cols, rank = events.columns()
        # the finest step is fixed for the batch's rounds (series and their steps are placed before them): one scan
        finest = self._finest_step() if len(rank) else 1
        for rnd in _cut_rounds(cols, self._time_ranks(cols, rank, finest)) if len(rank) else []:
            self._step_round(rnd, outputs, actuals, result.events, finest)
        result.forecasts, steps_by_lane = self._collect(outputs)
        result.actuals = self._actuals(actuals)
        result.elapsed_seconds = time.perf_counter() - started
        self._observe(result, steps_by_lane)
        return result

    def _sequence(self, batch: ObservationBatch, result: EngineResult) -> _Events | _Placed:
        """Check values and order, assign ticks, expand gaps: per-series event lists for this batch. Series in
        the steady state are placed with array operations (:meth:`_place_steady`), the others one record at a
        time here; series are independent, so both give the same state and events."""
        limit = self.config.max_abs_value
        too_big = out_of_range(batch.values, limit)
        steady, rest = self._place_steady(batch, result, too_big)
        if not rest.size:  # an empty batch has neither
            return steady if steady is not None else _Events()
        events = _Events()
        rank: dict[int, int] = {}
        slot_of = self._slot_of
        check_range = bool(too_big[rest].any())
        step_a = self.series_["step_ns"]
        kept: dict[int, int] = {}  # slot -> the last row its state now includes (applied or held)
        placed: list[int] = []  # slot of every row applied now
        for i, sid, t, v in zip(rest.tolist(), batch.series_ids[rest].tolist(), batch.timestamps_ns[rest].tolist(),
                                batch.values[rest].tolist(), strict=True):
            if check_range and too_big[i]:
                result.rejections.append(Rejection(i, "out_of_range", f"{sid!r}: |{v:.6g}| > max_abs_value "
                                                                      f"{limit:g}"))
                continue
            slot = slot_of.get(sid)
            if slot is None:
                slot = self._register(sid)
                if slot is None:
                    result.rejections.append(Rejection(i, "unknown_series", self.refusal(sid)))
                    continue
                step_a = self.series_["step_ns"]  # _register may have grown the arrays
            if step_a[slot] == 0:  # grid unknown: hold the row until the step is inferred
                outcome = self._hold(slot, t, v)
                if outcome is None:
                    kept[slot] = i
                    if self.series_["hold_n"][slot] == STEP_WINDOW:
                        self._release(slot, events, rank, result)
                    continue
            else:
                outcome = self._place(slot, t, v, events, rank, result)
                if outcome is None:
                    kept[slot] = i
                    placed.append(slot)
                    continue
            if outcome == "duplicate":
                self._duplicate(slot, result)
            elif outcome == "collision":
                self._collision(slot, t, result)
            else:
                last = int(self.series_["last_t"][slot]) if step_a[slot] else int(
                    self.series_["hold_t"][slot, self.series_["hold_n"][slot] - 1])
                result.rejections.append(Rejection(i, "out_of_order", f"{sid!r}: {_iso(t)} is older than the "
                                                                      f"series' last timestamp {_iso(last)}"))
        s = self.series_
        if placed:
            np.add.at(s["n_applied"], np.array(placed, np.int64), 1)
            result.n_applied += len(placed)
        if kept:  # a restart resumes after the last row each series' state includes
            slots, rows = np.array(list(kept), np.int64), np.array(list(kept.values()), np.int64)
            s["applied_partition"][slots], s["applied_offset"][slots] = batch.partitions[rows], batch.offsets[rows]
        return events if steady is None else steady.join(events)

    def _place_steady(self, batch: ObservationBatch, result: EngineResult, too_big: np.ndarray
                      ) -> tuple[_Placed | None, np.ndarray]:
        """The steady state in array operations: the records of every series whose records in this batch are all
        in range, on a known grid, each the next tick of its series (no gap, duplicate or disorder). Returns their
        events (``None`` if there are none) and the indices of the other records, in arrival order, which
        :meth:`_sequence` places one at a time (it changed nothing of theirs). ``too_big``: values out of range."""
        n = len(batch)
        if n == 0:
            return None, np.arange(0)
        get = self._slot_of.get
        slots = np.array([get(sid, -1) for sid in batch.series_ids.tolist()], np.int64)
        known = slots >= 0
        s = self.series_
        at = np.where(known, slots, 0)  # unknown series read row 0 and are thrown out below
        step, last = s["step_ns"][at], s["last_tick"][at]
        t = batch.timestamps_ns
        # rows within two steps of the nanosecond range's ends (1677, 2262) go one by one (_place): their tick
        # arithmetic below would wrap around in int64
        inside = np.abs(t.astype(np.float64)) + 2.0 * step < float(_MAX_NS)
        fine = known & (step != 0) & (last != _NO_TICK) & ~too_big & inside
        tick = (t - s["anchor_ns"][at] + np.where(fine, step, 2) // 2) // np.where(fine, step, 1)
        order = np.argsort(slots, kind="stable")  # each series' records together, in arrival order
        by_series, tick_sorted = slots[order], tick[order]
        first = np.ones(n, bool)
        first[1:] = by_series[1:] != by_series[:-1]
        fine[order] &= tick_sorted - np.where(first, last[order], np.roll(tick_sorted, 1)) == 1
        group = np.cumsum(first) - 1  # each sorted record's series, numbered
        fine[order] = np.bincount(group, weights=~fine[order], minlength=group[-1] + 1)[group] == 0
        if not fine.any():
            return None, np.arange(n)
        rest = np.flatnonzero(~fine)
        if rest.size:  # keep the steady records only, in arrival order
            kept = fine[order]  # a series is kept or left whole, so its first record stays its first
            order, first = (np.cumsum(fine) - 1)[order[kept]], first[kept]
            keep = np.flatnonzero(fine)
            slots, tick, t = slots[keep], tick[keep], t[keep]
            values, partitions, offsets = batch.values[keep], batch.partitions[keep], batch.offsets[keep]
        else:
            values, partitions, offsets = batch.values, batch.partitions, batch.offsets
        m = slots.size
        starts = np.flatnonzero(first)
        rank = np.empty(m, np.int64)
        rank[order] = np.arange(m) - np.repeat(starts, np.diff(np.append(starts, m)))
        ends = order[np.append(starts[1:], m) - 1]  # each series' last record in the batch
        u = slots[ends]
        s["last_tick"][u], s["last_value"][u], s["last_t"][u] = tick[ends], values[ends], t[ends]
        s["applied_partition"][u], s["applied_offset"][u] = partitions[ends], offsets[ends]
        np.add.at(s["n_applied"], slots, 1)
        result.n_applied += m
        cols = {"slot": slots, "tick": tick, "value": values.copy(), "real": np.ones(m, bool),
                "reset": np.zeros(m, bool), "t_ns": t.copy()}  # copies: lanes may keep what a round hands them
        return _Placed(cols, rank), rest

    def _hold(self, slot: int, t: int, v: float) -> str | None:
        """Keep a row of a series whose step is unknown; ``"duplicate"``/``"out_of_order"`` if it cannot be."""
        s = self.series_
        n = int(s["hold_n"][slot])
        if n:
            last_t = int(s["hold_t"][slot, n - 1])
            if t == last_t:
                return "duplicate"
            if t < last_t:
                return "out_of_order"
        s["hold_t"][slot, n], s["hold_v"][slot, n], s["hold_n"][slot] = t, v, n + 1
        return None

    def _release(self, slot: int, events: _Events, rank: dict[int, int], result: EngineResult) -> None:
        """Infer the step from the held rows (:func:`inferred_step`) and place them on the grid."""
        s = self.series_
        n = int(s["hold_n"][slot])
        times, values = s["hold_t"][slot, :n].tolist(), s["hold_v"][slot, :n].tolist()
        # gaps as Python ints: two rows more than 292 years apart overflow an int64 difference (a negative step)
        gaps = [min(b - a, _MAX_NS) for a, b in zip(times, times[1:], strict=False)]
        s["step_ns"][slot] = inferred_step(np.array(gaps, np.int64))
        s["hold_n"][slot] = 0
        s["hold_t"][slot], s["hold_v"][slot] = 0, np.nan
        for t, v in zip(times, values, strict=True):
            if self._place(slot, t, v, events, rank, result) is None:
                self._count_applied(slot, result)
            else:  # times are distinct and increasing: only a collision can stop a held row
                self._collision(slot, t, result)

    def _place(self, slot: int, t: int, v: float, events: _Events, rank: dict[int, int],
               result: EngineResult) -> str | None:
        """Put one observation on its series' grid (filling a short gap before it); ``None`` when placed, else
        why not: ``"duplicate"``, ``"collision"`` or ``"out_of_order"``."""
        s = self.series_
        step = int(s["step_ns"][slot])
        last = int(s["last_tick"][slot])
        if last == _NO_TICK:  # the first observation on the grid anchors it at its own phase
            s["anchor_ns"][slot] = t % step
        anchor = int(s["anchor_ns"][slot])
        tick = (t - anchor + step // 2) // step
        if not _MIN_NS <= anchor + tick * step <= _MAX_NS:  # the nearest grid time is past the nanosecond range
            tick += 1 if anchor + tick * step < _MIN_NS else -1  # (near 1677 or 2262): the one inside it
        if last != _NO_TICK and tick <= last:
            last_t = int(s["last_t"][slot])
            if t == last_t:
                return "duplicate"
            return "out_of_order" if t < last_t else "collision"
        gap = tick - last - 1 if last != _NO_TICK else 0
        max_gap = self._gap_limit
        reset = gap > max_gap
        result.n_resets += reset
        if 0 < gap <= max_gap:
            start = float(s["last_value"][slot])
            for k in range(1, gap + 1):
                frac = k / (gap + 1)
                self._emit(events, rank, slot, last + k, start + (v - start) * frac, False, False, 0)
            s["n_gap_filled"][slot] += gap
            result.n_gap_filled += gap
        self._emit(events, rank, slot, tick, v, True, reset, t)
        s["last_tick"][slot], s["last_value"][slot], s["last_t"][slot] = tick, v, t
        return None

    @staticmethod
    def _emit(events: _Events, rank: dict[int, int], slot: int, tick: int, value: float, real: bool,
              reset: bool, t_ns: int) -> None:
        k = rank.get(slot, 0)
        rank[slot] = k + 1
        events.add(slot, tick, value, real, reset, t_ns, k)

    def _count_applied(self, slot: int, result: EngineResult) -> None:
        self.series_["n_applied"][slot] += 1
        result.n_applied += 1

    def _duplicate(self, slot: int, result: EngineResult) -> None:
        self.series_["n_duplicates"][slot] += 1
        result.n_duplicates += 1

    def _collision(self, slot: int, t: int, result: EngineResult) -> None:
        s = self.series_
        if s["n_collisions"][slot] == 0:
            step = int(s["step_ns"][slot])
            tick_time = int(s["anchor_ns"][slot]) + int(s["last_tick"][slot]) * step
            hint = ("is --freq / freq= too coarse?" if self.config.freq is not None else
                    "the step was inferred from the series' first values: set --freq / freq= if it is wrong; calendar "
                    "months and years are not fixed steps and do not fit a grid")
            log.warning("series %r: %s snaps onto the grid tick %s (step %s), which the observation at %s already "
                        "holds; skipped and counted in tidecast_snapped_collisions_total (warned once per series: %s)",
                        self._ids[slot], _iso(t), _iso(tick_time), _duration(step), _iso(int(s["last_t"][slot])),
                        hint)
        s["n_collisions"][slot] += 1
        result.n_collisions += 1

    def _step_time(self, rows: np.ndarray, ticks: np.ndarray, finest: int) -> int:
        """The retrain step a round belongs to: the start of its grid time's bucket (:meth:`_time_ranks`) of width
        ``finest``. Series at their own phase within the step (15 and 45 past the hour) are one step, however batches
        cut their rows."""
        return int((self.series_["anchor_ns"][rows] + ticks * self.series_["step_ns"][rows]).max()) // finest * finest

    def _step_round(self, rnd: dict[str, np.ndarray], outputs: list[tuple], actuals: list[tuple],
                    events: list[DriftEvent], finest: int) -> None:
        # read-only views: every lane and watcher gets the same arrays (and the values are the actuals), so a model
        # writing into its input would change what the next lane learns and what is scored
        rows, ticks, values, real, reset = (read_only(rnd[k]) for k in ("slot", "tick", "value", "real", "reset"))
        all_real = bool(real.all())
        r_rows = rows if all_real else read_only(rows[real])
        r_ticks = ticks if all_real else read_only(ticks[real])
        y = values if all_real else read_only(values[real])
        t_ns = rnd["t_ns"] if all_real else rnd["t_ns"][real]
        reset_rows = rows[reset] if reset.any() else None
        filled = read_only(~real)
        horizon = self.config.horizon
        if len(r_rows):
            actuals.append((r_rows, r_ticks, y))
        # the round's grid time step moves each lane's clock (real values only: a filled gap tick belongs to a step
        # already seen); a batch cut, a lagging partition or a late fill moves it no further
        step_time = self._step_time(r_rows, r_ticks, finest) if len(r_rows) else None
        limit = (self.config.gap_limit + 1) * finest
        for lane in self.lanes:
            completed = lane.clock.advance(step_time, limit) if step_time is not None else []
            if completed and self.retrainer is not None and lane.name in self.retrainer:
                # 0. retrain decisions for the lane's grid times now complete (promotions take effect here)
                self.retrainer.begin_round(self, lane, completed, events)
            if reset_rows is not None:
                lane.model.reset_rows(reset_rows)
                lane.pending.invalidate(reset_rows)
                lane.pool.forget_last(reset_rows)
            if len(r_rows):  # 1. score what matured now, before the model sees y
                mean, lower, upper, valid = lane.pending.matured(r_rows, r_ticks)
                if lower is None:  # the calibrator kept them: read before it learns (its ring slot moves on)
                    lower, upper = lane.calibrator.issued_intervals(r_rows, np.where(valid, mean, 0.0))
                lane.calibrator.update(r_rows, np.where(valid, y[:, None] - mean, 0.0), valid)
                lane.scorer.update(r_rows, y, mean, lower, upper, valid)
                for monitor in lane.monitors:  # label-based watchers see what matured
                    self._alarms(monitor.matured(r_rows, r_ticks, y, mean, lower[..., 0], upper[..., 0], valid),
                                 r_rows, t_ns, lane, monitor, events)
            shadow = self.retrainer.candidates(lane.name) if self.retrainer is not None else None
            if shadow is not None:
                if reset_rows is not None:
                    for model, pending in zip(shadow.candidates, shadow.pending, strict=True):
                        model.reset_rows(reset_rows)
                        pending.invalidate(reset_rows)
                if len(r_rows):  # the candidates' forecasts that matured, on the incumbent's cells
                    shadow.score(r_rows, r_ticks, y, mean, valid, lane.clock.last_ns)
                shadow.learn(rows, ticks, values, filled, lane.clock.last_ns)
            notify_step(lane.model, lane.clock.last_ns)  # the same step as the last round's: no new learning round
            lane.model.learn_many(rows, ticks, values, filled=filled)  # 2. learn (filled gap ticks included)
            lane.pool.observe(rows, values)
            if not len(r_rows):
                continue
            if shadow is not None:  # never emitted: scored against the incumbent only
                shadow.forecast(r_rows, r_ticks, horizon)
            forecast = np.asarray(lane.model.forecast_many(r_rows, horizon), dtype=float)  # 3. forecast (a plug-in's
            # list or object array too)
            if np.shape(forecast) != (len(r_rows), horizon):  # a plug-in's mistake, named before a reshape hides it
                raise ValueError(f"lane {lane.name!r}: model {type(lane.model).__name__} returned forecasts of shape "
                                 f"{np.shape(forecast)}, expected (series, horizon) = ({len(r_rows)}, {horizon})")
            past = self._past_time(r_rows, r_ticks, horizon)
            if past.any():  # targets after 2262: not issued anywhere (a new array: the model's may be read-only)
                forecast = np.where(past, np.nan, forecast)
            lane.seed_calibrator(horizon)  # residuals the model handed over since the last round
            lower, upper = lane.interval(r_rows, forecast)  # 4. interval per level (NaN: none yet)
            if lower.shape[-1] != lane.pending.n_levels:
                raise ValueError(f"lane {lane.name!r}: calibrator {lane.calibrator.name!r} gave "
                                 f"{lower.shape[-1]} interval level(s), {lane.pending.n_levels} asked for")
            lane.pending.store(r_rows, r_ticks, forecast, lower, upper)
            lane.scorer.issued(r_rows, np.isfinite(forecast))
            for monitor in lane.monitors:  # label-free watchers see what was just issued
                self._alarms(monitor.issued(r_rows, r_ticks, forecast, lower[..., 0], upper[..., 0]), r_rows, t_ns,
                             lane, monitor, events)
            outputs.append((lane.name, r_rows, r_ticks, t_ns, forecast, lower, upper))

    def _actuals(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> ActualBatch:
        if not parts:
            return ActualBatch.empty()
        rows, ticks, values = (np.concatenate(cols) for cols in zip(*parts, strict=True))
        grid = self.series_["anchor_ns"][rows] + ticks * self.series_["step_ns"][rows]
        return ActualBatch(self._ids[rows], grid, values)

    def _alarms(self, alarms: Alarms, rows: np.ndarray, t_ns: np.ndarray, lane: Lane, monitor: LaneMonitor,
                events: list[DriftEvent]) -> None:
        if not len(alarms):
            return
        at = t_ns[alarms.positions(rows)]
        if self.retrainer is not None and getattr(lane.model, "fitted_", True):  # alarms before a fit: nothing to refit
            self.retrainer.alarms(lane.name, monitor.detector, len(alarms))
        events.extend(DriftEvent(str(self._ids[r]), lane.name, monitor.detector, str(k), from_epoch_ns(int(t)),
                                 float(s))
                      for r, k, s, t in zip(alarms.rows.tolist(), alarms.kind.tolist(), alarms.statistic.tolist(),
                                            at.tolist(), strict=True))

    def _past_time(self, rows: np.ndarray, ticks: np.ndarray, horizon: int) -> np.ndarray:
        """(n, H) True where the h-step target lies past the last representable timestamp (2262-04-11): such a
        step can be neither published nor scored, so it is not issued (and not counted) at all."""
        step, anchor = self.series_["step_ns"][rows], self.series_["anchor_ns"][rows]
        last = (_MAX_NS - anchor) // step - ticks  # the last representable step, per row
        if not rows.size or last.min() >= horizon:  # the usual case: one comparison per row, no (n, H) mask
            return np.zeros((rows.size, 0), bool)
        return np.arange(1, horizon + 1)[None, :] > last[:, None]

    def _collect(self, outputs: list[tuple]) -> tuple[ForecastBatch, dict[str, int]]:
        """The rounds' forecasts as one batch, and its forecast steps per lane (for the metrics: comparing every
        step's model name to count them cost ~1 % of a serve member's time)."""
        if not outputs:
            return self._no_forecasts(), {}
        horizon = self.config.horizon
        parts, steps_by_lane = [], {}
        hs = np.arange(1, horizon + 1)
        for name, rows, ticks, t_ns, mean, lower, upper in _by_lane(outputs):
            ready = np.isfinite(mean)
            if not ready.any():
                continue
            step = self.series_["step_ns"][rows]
            anchor = self.series_["anchor_ns"][rows]
            target = anchor[:, None] + (ticks[:, None] + hs[None, :]) * step[:, None]
            row_of = np.broadcast_to(rows[:, None], mean.shape)[ready]
            lowers, uppers = lower[ready], upper[ready]  # (n, levels)
            steps_by_lane[name] = int(ready.sum())
            parts.append(ForecastBatch(
                series_id=self._ids[row_of],
                issued_at_ns=np.broadcast_to(t_ns[:, None], mean.shape)[ready],
                model=self._model_column(name, steps_by_lane[name]),
                h=np.broadcast_to(hs[None, :], mean.shape)[ready].astype(np.int32),
                target_ns=target[ready], mean=mean[ready], lower=lowers[:, 0], upper=uppers[:, 0],
                alpha=self.config.alpha, levels=self._levels, lowers=lowers, uppers=uppers,
                starts=first_steps(_steps_per_origin(ready)),
            ))
        return ForecastBatch.concat(parts, self.config.alpha, self._levels), steps_by_lane

    def _model_column(self, name: str, n: int) -> np.ndarray:
        """``n`` times ``name`` as an object array: a view of one kept per lane (filling a new one for every batch's
        steps took ~7 % of a round)."""
        column = self._model_columns.get(name)
        if column is None or len(column) < n:
            column = np.full(max(n, 2 * len(column) if column is not None else 0), name, dtype=object)
            self._model_columns[name] = column
        view = column[:n]
        view.flags.writeable = False  # shared by every batch: nobody may write through it
        return view

    def _observe(self, result: EngineResult, steps_by_lane: dict[str, int]) -> None:
        m = self.metrics
        m.observations.inc(result.n_applied)
        if result.n_duplicates:
            m.duplicates.inc(result.n_duplicates)
        if result.n_collisions:
            m.snapped_collisions.inc(result.n_collisions)
        if result.n_gap_filled:
            m.gap_fills.inc(result.n_gap_filled)
        if result.n_resets:
            m.series_resets.inc(result.n_resets)
        for rej in result.rejections:
            m.dead_letters.labels(reason=rej.reason).inc()
        for name, count in steps_by_lane.items():
            m.forecasts.labels(model=name).inc(count)
        m.processing.observe(result.elapsed_seconds)
        for event in result.events:  # retrain events share the list; tidecast_retrains_total counts those
            if not isinstance(event, RetrainEvent):
                m.drift_alarms.labels(model=event.model, detector=event.detector).inc()
        self._set_drifting_gauges()
        self._set_spread_gauges()
        for lane in self.lanes:  # gauges appear once there is something to say (absent != 0% coverage)
            for level, coverage, width in zip(self._levels, lane.scorer.rolling_coverage_,
                                              lane.scorer.rolling_width_, strict=True):
                for h in np.flatnonzero(np.isfinite(coverage)).tolist():
                    self._gauge(m.coverage, lane.name, h, level).set(coverage[h])
                    if not np.isnan(width[h]):  # no step of this horizon has had an interval yet
                        self._gauge(m.width, lane.name, h, level).set(width[h])

    def _warming_up(self, lane: Lane) -> int:
        """Series with observations whose ``lane`` has issued no forecast yet (blank rows hold no series): those on
        their grid, and those still held while their step is inferred (no lane has seen them yet)."""
        placed = self.series_["last_tick"][: self._cap] != _NO_TICK
        held = np.count_nonzero((self.series_["hold_n"][: self._cap] > 0) & ~placed)
        return int(np.count_nonzero(~lane.scorer.ever_issued(np.flatnonzero(placed)))) + int(held)

    def _set_spread_gauges(self) -> None:
        """The bootstrap watcher's spread ratio, median over the held series per horizon bucket; a bucket no held
        series has a ratio for (its series dropped, their model replaced) is removed rather than left showing the
        last median of series this process no longer forecasts."""
        family = self.metrics.bootstrap_spread_ratio
        for lane in self.lanes:
            for monitor in lane.monitors:
                if not isinstance(monitor, BootstrapMonitor):
                    continue
                medians = monitor.spread_ratio_medians(self._cap)
                for _, last in horizon_buckets(monitor.horizon):
                    key = (lane.name, str(last))
                    if last in medians:
                        family.labels(*key).set(medians[last])
                        self._spread_shown.add(key)
                    elif key in self._spread_shown:
                        family.remove(*key)
                        self._spread_shown.discard(key)

    def _gauge(self, family: Any, model: str, h: int, level: str) -> Any:
        """The (model, horizon, level) child of a per-horizon gauge family, kept: ``labels()`` took a third of
        every batch's metric updates (2 x H calls a batch)."""
        key = (id(family), model, h, level)
        child = self._gauges.get(key)
        if child is None:
            child = self._gauges[key] = family.labels(model, str(h + 1), level)
        return child

    def maintenance(self, budget_seconds: float | None = None) -> None:
        """Give each model time for deferred work (fits, replay training); call between batches."""
        budget = self.config.maintenance_budget_seconds if budget_seconds is None else budget_seconds
        started = time.perf_counter()
        for lane in self.lanes:
            lane.model.maintenance(budget / len(self.lanes))
            shadow = self.retrainer.candidates(lane.name) if self.retrainer is not None else None
            for candidate in shadow.candidates if shadow is not None else ():
                candidate.maintenance(budget / len(self.lanes))
        if self.retrainer is not None:
            self.retrainer.maintenance()
        self.metrics.maintenance.observe(time.perf_counter() - started)

    # -- retraining ---------------------------------------------------------------------------------
    def live_rows(self) -> np.ndarray:
        """Table rows of the series this engine holds, in slot order."""
        return np.sort(np.fromiter(self._slot_of.values(), np.int64, len(self._slot_of)))

    @property
    def capacity(self) -> int:
        return self._cap

    def promote(self, lane: Lane, model: BatchForecaster, rows: np.ndarray, residuals: np.ndarray) -> None:
        """``model`` replaces the lane's: calibrators re-seeded from its shadow residuals ``(rows, T, H)`` (same
        series, new model: ``Calibrator.reseed``), the lane's watchers started afresh (their references were the
        old model's)."""
        model.resize(self._cap)
        lane.model = model
        reseed = getattr(lane.calibrator, "reseed", None)
        if reseed is not None and residuals.shape[1] and rows.size:
            reseed(rows, residuals)
            pool = getattr(lane, "pool", None)  # a lane pool for young cells restarts with them
            if pool is not None:
                pool.restart(rows)
        for monitor in lane.monitors:
            monitor.model_replaced(model)
            monitor.reset_rows(rows)

    def adopt_newer(self, shared: dict[str, tuple[ArrayDict, dict[str, Any]]]) -> list[str]:
        """Take the shared state (e.g. the backbone) of each retrained lane whose version in ``shared`` is newer than
        this engine's - a checkpoint of partitions this member was just assigned, written by a member that promoted
        a candidate. The per-row state of the series held here stays theirs. Returns the lanes adopted."""
        adopted = []
        for lane in self.lanes:
            if self.retrainer is None or lane.name not in self.retrainer or lane.name not in shared:
                continue
            arrays, meta = shared[lane.name]
            theirs = shared_version(meta)
            if theirs <= self.retrainer.version(lane.name):
                continue
            rows = self.live_rows()
            own = lane.model.export_rows(rows) if rows.size else {}
            mine, unfit = lane.model.export_shared(), None
            try:
                lane.model.import_shared(arrays, _model_meta(meta))
            except _UNFIT as err:
                lane.model.import_shared(*mine)  # the model it serves stays as it was
                unfit = err
            lane.model.resize(self._cap)
            if rows.size:  # the series' own rows back, under the new model or the old one
                lane.model.import_rows(rows, own)
            if unfit is not None:
                raise StateMismatch(f"saved shared state of lane {lane.name!r} does not fit this engine: "
                                    f"{type(unfit).__name__}: {unfit}") from unfit
            self.retrainer.adopt(lane.name, theirs)
            self.metrics.model_version.labels(model=lane.name).set(theirs)
            adopted.append(lane.name)
        return adopted

    def model_versions(self) -> dict[str, int]:
        """Each retrained lane's model version (promotions so far)."""
        if self.retrainer is None:
            return {}
        return {lane.name: self.retrainer.version(lane.name) for lane in self.lanes if lane.name in self.retrainer}

    # -- reading ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Prequential scores per model (overall and by horizon), summed in series-id order."""
        rows = np.array([self._slot_of[sid] for sid in sorted(self._slot_of)], dtype=np.int64)
        s = self.series_
        return {
            "models": {lane.name: {**lane.scorer.summary(rows),
                                   "n_series_without_forecast": int(np.count_nonzero(~lane.scorer.ever_issued(rows)))}
                       for lane in self.lanes},
            "n_series": len(rows),
            "n_observations": int(s["n_applied"][rows].sum()),
            "max_series_observations": int(s["n_applied"][rows].max()) if rows.size else 0,
            "n_duplicates": int(s["n_duplicates"][rows].sum()),
            "n_collisions": int(s["n_collisions"][rows].sum()),
            "n_held": int(s["hold_n"][rows].sum()),
            "n_gap_filled": int(s["n_gap_filled"][rows].sum()),
        }

    # -- state ------------------------------------------------------------------------------------
    def export_series(self, series_ids: list[str]) -> tuple[list[dict[str, Any]], ArrayDict]:
        """Everything the engine knows about these series: JSON meta per series + arrays (first axis = series).

        Keys: ``engine/<field>`` for the grid and applied position, ``<model>/<part>/<name>`` for each lane's
        model, calibrator (``cal``), pending forecasts and scorer.
        """
        # A fit installed between rounds (the trainer thread, maintenance) hands its validation residuals over in a
        # queue the next round drains; the queue is not state, so drain it into the calibrators now, or a restore
        # from this export would serve those series without intervals until they learn their own.
        for lane in self.lanes:
            lane.seed_calibrator(self.config.horizon)
        rows = np.array([self._slot_of[sid] for sid in series_ids], dtype=np.int64)
        return [{"series_id": sid} for sid in series_ids], self._export_rows(rows)

    def fresh_restartable_state(self, arrays: ArrayDict, n_rows: int) -> ArrayDict | None:
        """``arrays`` (``n_rows`` series saved by this configuration but for the settings outside the restore check:
        the drift watchers, and the retrain policy's ring of recent values) in this engine's layout: a part that
        differs (a key more or less, an array of another shape) restarts whole, as a fresh row's, as
        :meth:`import_series` restarts it; ``None`` when anything else differs."""
        def part(key: str) -> str | None:  # <lane>/drift/..., <lane>/bootstrap/..., the ring (models/history.py)
            lane, *rest = key.split("/")
            if rest[:1] in (["drift"], ["bootstrap"]):
                return f"{lane}/{rest[0]}"
            ring = rest in (["model", "history_values"], ["model", "history_count"])
            return f"{lane}/model/history" if ring else None

        def reshaped(key: str) -> bool:  # byte blobs (a river model's JSON) differ in width by nature
            saved, blank = arrays[key], self._blank[key]
            blobs = saved.dtype == blank.dtype == np.uint8 and saved.ndim == blank.ndim == 2
            return saved.shape[1:] != blank.shape[1:] and not blobs

        differ = (set(arrays) ^ set(self._blank)) | {k for k in set(arrays) & set(self._blank) if reshaped(k)}
        restart = {part(k) for k in differ}
        if None in restart:
            return None
        # whole parts: a ring's count kept beside its emptied values claimed values it did not hold (a refit then
        # learned NaN), a D3A window grown in place averaged zeros it never saw
        out = {k: v for k, v in arrays.items() if k in self._blank and part(k) not in restart}
        for key in self._blank:
            if part(key) in restart:
                out[key] = np.repeat(self._blank[key], n_rows, axis=0)
        return out

    def series_state_bytes(self) -> int:
        """Bytes of one series' exported arrays: fixed by the configuration (horizon, levels, lanes and their
        models), the least a checkpoint record holding the series takes."""
        return sum(v.nbytes for v in self._blank.values())

    def _export_rows(self, rows: np.ndarray) -> ArrayDict:
        arrays: ArrayDict = {f"engine/{n}": a[rows].copy() for n, a in self.series_.items()}
        for lane in self.lanes:
            for part_name, part in lane.parts().items():
                for key, arr in part.export_rows(rows).items():
                    arrays[f"{lane.name}/{part_name}/{key}"] = np.asarray(arr)
        return arrays

    def _claim(self, row: int) -> int | None:
        """Take ``row`` for a new series if no series holds it; ``None`` if one does. Rows below it never handed
        out join the free rows (rows handed out = series + free rows, so a new row is always the next one)."""
        handed_out = len(self._slot_of) + len(self._free)
        if row < handed_out:
            if isinstance(self._ids[row], str):  # a series holds it (a free row holds None, or 0 if never used)
                return None
            self._free.take(row)
            return row
        for free in range(handed_out, row):
            self._free.push(free)
        return row

    def import_series(self, meta: list[dict[str, Any]], arrays: ArrayDict) -> list[int]:
        """Inverse of :meth:`export_series`: creates the series if needed and overwrites their state. A new
        series whose item holds a ``row`` (:meth:`series_rows` at the export) gets that row if it is free, so an
        engine restoring its own checkpoint has every series where it was; row-indexed shared state (a replay
        buffer's plan) then still points at the right series.

        A series this engine does not accept (not in ``allowed_series``, or ``max_series`` reached: a scale-in
        hands a member more series than its limit) is left out; returns the positions in ``meta`` of those left
        out, so the caller can keep their state (a restore never fails on them)."""
        rows, refused, taken = [], [], []
        for i, item in enumerate(meta):
            sid = item["series_id"]
            slot = self._slot_of.get(sid)
            if slot is None:
                row = item.get("row")  # only a plausible row: a forged 10**9 would allocate 10**9 free rows
                slot = self._register(sid, row if isinstance(row, int) and 0 <= row < self.config.max_series
                                      else None)
                if slot is None:
                    refused.append(i)
                    continue
            rows.append(slot)
            taken.append(sid)
        if refused:
            kept = np.setdiff1d(np.arange(len(meta)), refused)
            arrays = {k: v[kept] for k, v in arrays.items()}
        try:
            self._import_rows(np.array(rows, dtype=np.int64), arrays)
        except (KeyError, ValueError, IndexError, TypeError) as err:
            # State that passed its checksum but does not fit this engine (a writer bug, a forged file): no series
            # is left half-imported, and the caller restores from elsewhere instead of failing on every restart.
            self.drop_series(taken)
            raise StateMismatch(f"saved series state does not fit this engine: {type(err).__name__}: {err}") from err
        if self.retrainer is not None and rows:
            self.retrainer.abort("series restored")
        if rows:  # a restored alarm or spread counts now, not at the next batch (an idle member: never)
            self._set_drifting_gauges()
            self._set_spread_gauges()
        return refused

    def _import_rows(self, rows: np.ndarray, arrays: ArrayDict) -> None:
        arrays = _upgrade_engine_arrays(arrays, len(rows))
        for name in self.series_:
            self.series_[name][rows] = arrays[f"engine/{name}"]
        for lane in self.lanes:
            for part_name, part in lane.parts().items():
                part.import_rows(rows, under(f"{lane.name}/{part_name}/", arrays))

    def _set_drifting_gauges(self) -> None:
        """``tidecast_series_drifting``: series held here whose latest alarm is within ``drift_window`` ticks."""
        last_tick = self.series_["last_tick"][: self._cap]
        for lane in self.lanes:
            if lane.monitors:  # rows that never alarmed (blank ones included) hold NO_ALARM and never count
                latest = np.max([mon.last_alarm_tick_[: self._cap] for mon in lane.monitors], axis=0)
                alarmed = latest != NO_ALARM
                recent = alarmed & (last_tick - np.where(alarmed, latest, last_tick) < self.config.drift_window)
                self.metrics.series_drifting.labels(model=lane.name).set(int(np.count_nonzero(recent)))

    def drop_series(self, series_ids: list[str]) -> None:
        """Forget these series (their partition moved to another process); their rows are blanked and reused."""
        rows = np.array([self._slot_of.pop(sid) for sid in series_ids if sid in self._slot_of], dtype=np.int64)
        if not len(rows):
            return
        for lane in self.lanes:
            lane.model.drop_rows(rows)
        if self.retrainer is not None:
            self.retrainer.abort("series dropped")
        self._import_rows(rows, {k: np.repeat(v, len(rows), axis=0) for k, v in self._blank.items()})
        self._ids[rows] = None
        for row in rows.tolist():
            self._free.push(row)
        self.metrics.series_active.set(len(self._slot_of))
        self._set_drifting_gauges()  # a member that processes nothing more must not keep counting them
        self._set_spread_gauges()
        if not self._slot_of:  # nor keep showing their coverage and width (an alert on it would fire for ever)
            self._clear_interval_gauges()

    def _clear_interval_gauges(self) -> None:
        """Remove every coverage and width gauge and start the lanes' rolling values afresh: they come back with
        the next scored step of series this process holds."""
        m = self.metrics
        for family_id, model, h, level in list(self._gauges):
            family = m.coverage if family_id == id(m.coverage) else m.width
            family.remove(model, str(h + 1), level)
        self._gauges.clear()
        for lane in self.lanes:
            lane.scorer.forget_rolling()

    def export_shared(self) -> dict[str, tuple[ArrayDict, dict[str, Any]]]:
        """Per-model shared state (e.g. a backbone's weights), keyed by model name."""
        out = {}
        for lane in self.lanes:
            arrays, meta = lane.model.export_shared()
            retrain = self.retrainer.export_state(lane.name) if self.retrainer is not None else None
            if retrain is None:
                retrain = self._idle_retrain.get(lane.name)
            meta = {**meta, "lane_clock": lane.clock.export()}
            out[lane.name] = (arrays, meta if retrain is None else {**meta, "retrain": retrain})
        return out

    def import_shared(self, shared: dict[str, tuple[ArrayDict, dict[str, Any]]]) -> None:
        """Install saved shared state (model weights, lane clocks, retrain entries); :class:`StateMismatch` when it
        does not fit this engine's lanes (a forged or foreign file: it stopped serve at every restart)."""
        before = self.export_shared()
        try:
            self._import_shared(shared)
        except _UNFIT as err:
            self._import_shared(before)  # nothing of it kept: a lane's clock taken from it stopped the lane for good
            raise StateMismatch(f"saved shared state does not fit this engine: {type(err).__name__}: {err}") from err

    def _import_shared(self, shared: dict[str, tuple[ArrayDict, dict[str, Any]]]) -> None:
        for lane in self.lanes:
            if lane.name in shared:
                arrays, meta = shared[lane.name]
                model_meta = _model_meta(meta)
                if model_meta or arrays:
                    lane.model.import_shared(arrays, model_meta)
                # states saved before the lane's clock kept it in the retrain entry
                lane.clock.load(meta.get("lane_clock") or meta.get("retrain"))
                saved = meta.get("retrain")
                if self.retrainer is not None and lane.name in self.retrainer:
                    self.retrainer.import_state(lane.name, saved)
                    self.metrics.model_version.labels(model=lane.name).set(self.retrainer.version(lane.name))
                elif saved:  # kept, without the job that was under way (nothing trains it now)
                    self._idle_retrain[lane.name] = {**saved, "in_flight": None}
                    self.metrics.model_version.labels(model=lane.name).set(shared_version(meta))

    def applied_positions(self) -> dict[str, tuple[int, int]]:
        """Last applied (partition, offset) per series (-1, -1 if none)."""
        s = self.series_
        return {sid: (int(s["applied_partition"][slot]), int(s["applied_offset"][slot]))
                for sid, slot in self._slot_of.items()}


class FreeRows:
    """The engine's free rows: the lowest comes out first (a heap), and one taken out of the middle (a restore
    claiming a series' saved row) costs O(1): the heap keeps it until it surfaces. Removing it from the heap list
    and re-heapifying made a restore of N series into a member that had just dropped N cost O(N^2): 12 s at
    32,000 series, about two minutes of a rebalance at the default max_series."""

    def __init__(self) -> None:
        self._heap: list[int] = []
        self._rows: set[int] = set()

    def __len__(self) -> int:
        return len(self._rows)

    def push(self, row: int) -> None:
        if row not in self._rows:
            self._rows.add(row)
            heapq.heappush(self._heap, row)

    def take(self, row: int) -> None:
        self._rows.remove(row)
        if len(self._heap) > 2 * len(self._rows) + 64:  # mostly taken rows: rebuild rather than carry them
            self._heap = sorted(self._rows)

    def pop(self) -> int:
        while True:
            row = heapq.heappop(self._heap)
            if row in self._rows:
                self._rows.remove(row)
                return row


def _model_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A lane's shared state's JSON part without the engine's keys: what its model exported."""
    return {k: v for k, v in meta.items() if k not in RESERVED_SHARED_KEYS}


def inferred_step(gaps: np.ndarray) -> int:
    """A series' grid step from the gaps between its first observations (all > 0): the most frequent gap when one
    repeats (on a tie, the smaller), else the lower median.

    Missing values make some gaps whole multiples of the step: with 30 % of an hourly series missing, the median of
    7 gaps is often 2 h, and a 2 h grid would lose every observation that lands on a used tick; the commonest gap is
    still the step. Jittered timestamps repeat no gap, and the median keeps one early or late point, or one missing
    value, from setting the grid.

    >>> inferred_step(np.array([3, 2, 3, 1, 1, 1, 2]))  # hourly with gaps: the median would say 2
    1
    >>> inferred_step(np.array([10, 10, 1, 10, 10, 1, 10]))  # two near-duplicate readings: still 10
    10
    >>> inferred_step(np.array([59, 61, 58, 62, 57, 63, 3]))  # jitter: no gap repeats, the lower median
    59

    A jittered clock's step - fewer than half of the held observations lie exactly on the grid it draws from the
    first - is rounded to the nearest whole day, hour, minute, second or millisecond within 1 % of it, the
    coarsest that is: a step of 59:59.748 from a clock jittered by a second put the forecasts' target times 25
    minutes off the hour after 6,000 hours. An exact cadence keeps its step, with missing values (gaps of 2 or 3
    steps) or a re-reading a few seconds after a reading among its first observations.

    >>> hour = 3_600 * 10**9
    >>> inferred_step(np.array([hour - 252_000_000, hour + 90_000_000, hour + 310_000_000]))  # 1:00:00.090 ...
    3600000000000
    """
    gaps = np.asarray(gaps, np.int64)
    values, counts = np.unique(gaps, return_counts=True)  # sorted: argmax takes the smaller
    lower_median = int(np.sort(gaps)[(len(gaps) - 1) // 2])
    step = int(values[np.argmax(counts)]) if counts.max() >= 2 else lower_median
    on_grid = 1 + int(np.count_nonzero(np.cumsum(gaps) % step == 0))  # the first observation draws the grid
    if 2 * on_grid >= len(gaps) + 1:  # the clock's own cadence
        return step
    return _round_step(step)


#: Units an inferred step is rounded to, coarsest first (nanoseconds): a day, an hour, a minute, a second, a ms.
_STEP_UNITS = (86_400 * 10**9, 3_600 * 10**9, 60 * 10**9, 10**9, 10**6)


def _round_step(step: int) -> int:
    """``step`` as a whole number of the coarsest unit within 1 % of it (itself if none is)."""
    for unit in _STEP_UNITS:
        whole = round(step / unit)
        if whole >= 1 and abs(step - whole * unit) * 100 <= step:
            return whole * unit
    return step


def _check_triggers(lanes: Sequence[Lane], policy: Any) -> None:
    """``--retrain on`` with nothing that can start a job (no schedule, and no watcher the triggers name) is an
    error when it holds for every lane (a typo such as ``triggers=["CUSUM"]`` ran to the end without a word), a
    warning for the lanes it holds for."""
    if policy.schedule is not None:
        return
    idle = {}
    for lane in lanes:
        watchers = {monitor.detector for monitor in lane.monitors}
        if not (watchers if policy.triggers is None else watchers & set(policy.triggers)):
            idle[lane.name] = sorted(watchers)
    if not idle:
        return
    runs = "; ".join(f"lane {name!r} runs {', '.join(w) if w else 'no watcher'}" for name, w in idle.items())
    named = "any watcher" if policy.triggers is None else f"triggers {list(policy.triggers)}"
    why = (f"--retrain on can never start a job: {named} and no schedule ({runs}; watchers: --drift-detector, "
           "a model's bootstrap > 0). Name a watcher the lane runs, or add schedule=N (--retrain-param)")
    if len(idle) == len(lanes):
        raise ValueError(why)
    log.warning(why)


def _from_settings(where: str, build: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``build(*args, **kwargs)``; a value it refuses (``ValueError``) names the settings it came from."""
    try:
        return build(*args, **kwargs)
    except ValueError as err:
        raise ValueError(f"{err} (from {where})") from None


def drift_monitors(config: EngineConfig) -> list[LaneMonitor]:
    """The lane monitors ``config`` asks for: the drift detector on matured residuals (none when it is "none")."""
    if config.drift_detector == "none":
        return []
    params = dict(config.drift_params)
    detector = make_detector(config.drift_detector, **params)
    if "alpha" in detector.get_params() and "alpha" not in params:  # misses are counted against the lanes' target
        detector = detector.clone(alpha=config.alpha)
    return [DriftMonitor(detector, config.horizon)]


def _iso(t_ns: int) -> str:
    return from_ns(t_ns).isoformat().replace("+00:00", "Z")


def _duration(ns: int) -> str:
    """``1h``, ``30min``, ``15s`` or ``n ns``: a step as ``--freq`` would spell it."""
    for unit, size in (("d", 86_400 * 10**9), ("h", 3_600 * 10**9), ("min", 60 * 10**9), ("s", 10**9),
                       ("ms", 10**6), ("us", 10**3)):
        if ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns}ns"


def _by_lane(outputs: list[tuple]) -> list[tuple]:
    """The rounds' outputs joined per lane (in first-seen lane order; each lane's rounds stay in order), so the
    batch is built from one part per lane instead of concatenating a part per round and lane."""
    lanes: dict[str, list[tuple]] = {}
    for out in outputs:
        lanes.setdefault(out[0], []).append(out)
    if all(len(group) == 1 for group in lanes.values()):
        return [group[0] for group in lanes.values()]
    return [(name, *(np.concatenate(cols) for cols in zip(*(o[1:] for o in group), strict=True)))
            for name, group in lanes.items()]


def _steps_per_origin(ready: np.ndarray) -> np.ndarray:
    """Steps of each forecast the batch gets from ``ready`` (origins x H): one forecast per origin with any step
    ready. The batch carries its starts from these (finding them afterwards compared three object columns step by
    step).

    >>> _steps_per_origin(np.array([[True, True], [False, False], [False, True]])).tolist()
    [2, 1]
    """
    counts = ready.sum(axis=1)
    return counts[counts > 0]


def shared_version(meta: dict[str, Any]) -> int:
    """The model version a lane's shared state was exported at (promotions by the retrain policy; 0 without)."""
    return int(((meta.get("retrain") or {}).get("policy") or {}).get("version", 0))


def _check_refit_params(alias: str, model: str, forecaster: Any, params: dict[str, Any]) -> None:
    """``refit_params`` named and typed as the lane's refit hook takes them, before any work (a misspelt key failed
    every job; a hook taking ``**kwargs``, or none, judges them itself)."""
    from tidecast.models.registry import check_keywords, keyword_parameters

    members = getattr(forecaster, "members_", None)  # an ensemble's refit hands them on to its members' hooks
    refit = getattr(members[0] if members else forecaster, "refit", None)
    if not params or refit is None:
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(refit).parameters.values()):
        return
    try:
        check_keywords(keyword_parameters(refit, exclude=("recent", "epochs")), params, "refit_params.",
                       f"lane {alias!r} ({model})'s refit")
    except ValueError as err:
        raise ValueError(f"retrain parameter {err} (from --retrain-param or [retrain_params])") from None
