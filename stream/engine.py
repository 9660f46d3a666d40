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
4. **interval** — the calibrator puts ``[lower, upper]`` around each step. Before that, residuals the model
   handed over (:meth:`~tidecast.models.base.BatchForecaster.pop_calibration`: a fit's validation windows, a
   backtest) seed the calibrator cells of the rows they name, and a cell with fewer than ``n0`` residuals of its
   own borrows from the lane's other series (:class:`~tidecast.monitors.conformal.pool.Pool`). Both bounds are
   ``NaN`` ("no interval yet") only where neither the cell nor the lane has anything, never a zero-width interval
   claiming certainty.
5. **monitor** — metrics are updated.
6. **emit** — forecast records go back to the caller.

Time: each series lives on a regular grid of step ``freq`` (configured, or inferred from its first two
observations; the first is then held until the second arrives). Positions on the grid are integer *ticks*,
anchored to the epoch, so ``tick % W`` is a phase taken from the clock. Then:

* a timestamp equal to the series' last one is a **duplicate**: skipped and counted;
* an older one is **out of order**: rejected (dead letter);
* a **gap** of up to ``max_gap`` missing ticks is filled by linear interpolation between the two real
  neighbours — the filled ticks are learned (models need a contiguous grid; ``learn_many`` gets ``filled=True``
  for them, so a model that handles irregular time may skip them) but never scored and never forecast from;
  pending forecasts that targeted them are dropped. A longer gap resets the series' model history
  (learned parameters such as CycleNet's cycle row stay; phase comes from the clock, so they stay aligned).
* timestamps off the grid snap to the nearest tick.

Many series are processed together: a batch is split into *rounds*, round k holding the k-th event of every
series in the batch, and each round makes one vectorised call per model and per calibrator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidecast.models.base import ArrayDict, BatchForecaster
from tidecast.models.rows import grow
from tidecast.monitors.conformal import Calibrator, make_calibrator
from tidecast.monitors.conformal.pool import Pool
from tidecast.monitors.metrics import Metrics
from tidecast.monitors.scoring import PrequentialScorer
from tidecast.stream.batch import ForecastBatch, ObservationBatch, Rejection
from tidecast.stream.config import EngineConfig
from tidecast.stream.pending import PendingForecasts
from tidecast.stream.records import REASONS

_NO_TICK = np.iinfo(np.int64).min


class Lane:
    """One model's path through the engine: forecaster -> calibrator (+ pool) -> scorer (and, later, more
    monitors). ``pool``: how young cells borrow from the lane (default :class:`Pool` settings; ``Pool(H, n0=0)``
    turns it off)."""

    def __init__(self, model: BatchForecaster, calibrator: Calibrator, horizon: int, alpha: float,
                 coverage_window: int = 1000, name: str | None = None, pool: Pool | None = None) -> None:
        self.name = name or model.name  # the lane's alias: records, metric labels and state keys use it
        self.model = model
        self.calibrator = calibrator
        self.pool = pool if pool is not None else Pool(horizon)
        self.pending = PendingForecasts(horizon)
        self.scorer = PrequentialScorer(horizon, alpha, coverage_window)

    def resize(self, n_rows: int) -> None:
        for part in (self.model, self.calibrator, self.pool, self.pending, self.scorer):
            part.resize(n_rows)

    def parts(self) -> dict[str, Any]:
        return {"model": self.model, "cal": self.calibrator, "pool": self.pool, "pending": self.pending,
                "score": self.scorer}

    def seed_calibrator(self, horizon: int) -> None:
        """Seed the calibrator rows the model has residuals for (it polls; the model may fit on another thread)."""
        handed = self.model.pop_calibration(horizon)
        if handed is not None and handed.rows.size:
            self.calibrator.seed(handed.rows, handed.residuals)

    def interval(self, rows: np.ndarray, forecast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The calibrator's intervals, young cells pooled."""
        lower, upper = self.calibrator.interval(rows, forecast)
        return self.pool.interval(self.calibrator, rows, forecast, lower, upper)


@dataclass
class EngineResult:
    """What one :meth:`Engine.process` call produced."""

    forecasts: ForecastBatch
    rejections: list[Rejection] = field(default_factory=list)
    n_applied: int = 0
    n_duplicates: int = 0
    n_gap_filled: int = 0
    n_resets: int = 0  # series whose history was reset by a gap longer than max_gap
    elapsed_seconds: float = 0.0


# Per-series engine state: name -> (dtype, fill for an empty row).
_SERIES_FIELDS: dict[str, tuple[type, Any]] = {
    "step_ns": (np.int64, 0),
    "anchor_ns": (np.int64, 0),
    "last_tick": (np.int64, _NO_TICK),
    "last_value": (np.float64, np.nan),
    "held": (np.bool_, False),
    "held_t": (np.int64, 0),
    "held_v": (np.float64, np.nan),
    "n_applied": (np.int64, 0),
    "n_duplicates": (np.int64, 0),
    "n_gap_filled": (np.int64, 0),
    "applied_partition": (np.int32, -1),
    "applied_offset": (np.int64, -1),
}


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

    def rounds(self) -> list[dict[str, np.ndarray]]:
        if not self.slot:
            return []
        cols = {
            "slot": np.array(self.slot, np.int64), "tick": np.array(self.tick, np.int64),
            "value": np.array(self.value, np.float64), "real": np.array(self.real, bool),
            "reset": np.array(self.reset, bool), "t_ns": np.array(self.t_ns, np.int64),
        }
        rank = np.array(self.rank, np.int64)
        order = np.argsort(rank, kind="stable")
        bounds = np.flatnonzero(np.diff(rank[order])) + 1
        return [{k: v[idx] for k, v in cols.items()} for idx in np.split(order, bounds)]


class Engine:
    """Per-series state plus one :class:`Lane` per model; see the module docstring for the rules."""

    def __init__(self, config: EngineConfig, lanes: list[Lane], metrics: Metrics | None = None) -> None:
        self.config = config
        self.lanes = lanes
        self.metrics = metrics if metrics is not None else Metrics(reasons=REASONS)
        self._allowed = set(config.allowed_series) if config.allowed_series is not None else None
        self._step = config.step_ns
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []  # rows of dropped series, reused first
        self._ids = np.zeros(0, dtype=object)
        self._cap = 0
        self.series_ = {name: np.zeros(0, dtype) for name, (dtype, _) in _SERIES_FIELDS.items()}
        self._grow(8)
        self._blank = self._export_rows(np.array([0]))  # the state of a row no series has touched
        for lane in lanes:  # the alerts compare rolling coverage with this, per model
            self.metrics.target_coverage.labels(model=lane.name).set(1.0 - config.alpha)

    @classmethod
    def from_config(cls, config: EngineConfig, metrics: Metrics | None = None) -> Engine:
        """Build the lanes named by ``config`` from the model and calibrator registries."""
        from tidecast.models.registry import make_model

        lanes = [
            Lane(
                make_model(model, horizon=config.horizon, **config.model_params.get(alias, {})),
                make_calibrator(config.calibrator, config.horizon, config.alpha, **config.calibrator_params),
                config.horizon, config.alpha, config.coverage_window, name=alias,
            )
            for alias, model in config.lanes
        ]
        return cls(config, lanes, metrics)

    # -- series table -----------------------------------------------------------------------------
    @property
    def series_ids(self) -> list[str]:
        return list(self._slot_of)

    def _register(self, series_id: str) -> int | None:
        if self._allowed is not None and series_id not in self._allowed:
            return None
        if len(self._slot_of) >= self.config.max_series:
            return None
        slot = self._free.pop() if self._free else len(self._slot_of)
        if slot >= self._cap:
            self._grow(max(8, 2 * self._cap))
        self._slot_of[series_id] = slot
        self._ids[slot] = series_id
        if self._step is not None:
            self.series_["step_ns"][slot] = self._step
        self.metrics.series_active.set(len(self._slot_of))
        return slot

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
        result = EngineResult(ForecastBatch.empty(self.config.alpha))
        events = self._sequence(batch, result)
        outputs: list[tuple] = []
        for rnd in events.rounds():
            self._step_round(rnd, outputs)
        result.forecasts = self._collect(outputs)
        result.elapsed_seconds = time.perf_counter() - started
        self._observe(result)
        return result

    def _sequence(self, batch: ObservationBatch, result: EngineResult) -> _Events:
        """Check order, assign ticks, expand gaps: per-series event lists for this batch."""
        s = self.series_
        step_a, anchor_a, last_a, lastv_a = s["step_ns"], s["anchor_ns"], s["last_tick"], s["last_value"]
        held_a, held_t_a, held_v_a = s["held"], s["held_t"], s["held_v"]
        max_gap = self.config.gap_limit
        events = _Events()
        rank: dict[int, int] = {}
        slot_of = self._slot_of
        for i, (sid, t, v) in enumerate(zip(batch.series_ids, batch.timestamps_ns.tolist(),
                                            batch.values.tolist(), strict=True)):
            slot = slot_of.get(sid)
            if slot is None:
                slot = self._register(sid)
                if slot is None:
                    result.rejections.append(Rejection(i, "unknown_series", f"series {sid!r} not accepted"))
                    continue
                s = self.series_  # _register may have grown the arrays
                step_a, anchor_a, last_a, lastv_a = s["step_ns"], s["anchor_ns"], s["last_tick"], s["last_value"]
                held_a, held_t_a, held_v_a = s["held"], s["held_t"], s["held_v"]
            step = int(step_a[slot])
            if step == 0:  # grid unknown: hold the first observation, infer the step from the second
                if not held_a[slot]:
                    held_a[slot], held_t_a[slot], held_v_a[slot] = True, t, v
                    self._applied(slot, batch, i, result)
                    continue
                first_t = int(held_t_a[slot])
                if t == first_t:
                    self._duplicate(slot, result)
                    continue
                if t < first_t:
                    result.rejections.append(Rejection(i, "out_of_order", f"{sid!r}: {t} < {first_t}"))
                    continue
                step = t - first_t
                step_a[slot], anchor_a[slot], held_a[slot] = step, first_t % step, False
                first_tick = (first_t - int(anchor_a[slot])) // step
                self._emit(events, rank, slot, first_tick, float(held_v_a[slot]), True, False, first_t)
                last_a[slot], lastv_a[slot] = first_tick, held_v_a[slot]
            elif last_a[slot] == _NO_TICK and anchor_a[slot] == 0 and not held_a[slot]:
                anchor_a[slot] = t % step  # configured step: anchor the grid at the first timestamp's phase
            anchor = int(anchor_a[slot])
            tick = (t - anchor + step // 2) // step
            last = int(last_a[slot])
            if tick == last:
                self._duplicate(slot, result)
                continue
            if tick < last:
                result.rejections.append(Rejection(i, "out_of_order", f"{sid!r}: tick {tick} < last {last}"))
                continue
            gap = tick - last - 1 if last != _NO_TICK else 0
            reset = gap > max_gap
            result.n_resets += reset
            if 0 < gap <= max_gap:
                start = float(lastv_a[slot])
                for k in range(1, gap + 1):
                    frac = k / (gap + 1)
                    self._emit(events, rank, slot, last + k, start + (v - start) * frac, False, False, 0)
                s["n_gap_filled"][slot] += gap
                result.n_gap_filled += gap
            self._emit(events, rank, slot, tick, v, True, reset, t)
            last_a[slot], lastv_a[slot] = tick, v
            self._applied(slot, batch, i, result)
        return events

    @staticmethod
    def _emit(events: _Events, rank: dict[int, int], slot: int, tick: int, value: float, real: bool,
              reset: bool, t_ns: int) -> None:
        k = rank.get(slot, 0)
        rank[slot] = k + 1
        events.add(slot, tick, value, real, reset, t_ns, k)

    def _applied(self, slot: int, batch: ObservationBatch, i: int, result: EngineResult) -> None:
        s = self.series_
        s["n_applied"][slot] += 1
        s["applied_partition"][slot] = batch.partitions[i]
        s["applied_offset"][slot] = batch.offsets[i]
        result.n_applied += 1

    def _duplicate(self, slot: int, result: EngineResult) -> None:
        self.series_["n_duplicates"][slot] += 1
        result.n_duplicates += 1

    def _step_round(self, rnd: dict[str, np.ndarray], outputs: list[tuple]) -> None:
        rows, ticks, values, real, reset = rnd["slot"], rnd["tick"], rnd["value"], rnd["real"], rnd["reset"]
        all_real = bool(real.all())
        r_rows = rows if all_real else rows[real]
        r_ticks = ticks if all_real else ticks[real]
        y = values if all_real else values[real]
        t_ns = rnd["t_ns"] if all_real else rnd["t_ns"][real]
        reset_rows = rows[reset] if reset.any() else None
        filled = ~real
        horizon = self.config.horizon
        for lane in self.lanes:
            if reset_rows is not None:
                lane.model.reset_rows(reset_rows)
                lane.pending.invalidate(reset_rows)
                lane.pool.forget_last(reset_rows)
            if len(r_rows):  # 1. score what matured now, before the model sees y
                mean, lower, upper, valid = lane.pending.matured(r_rows, r_ticks)
                lane.calibrator.update(r_rows, np.where(valid, y[:, None] - mean, 0.0), valid)
                lane.scorer.update(r_rows, y, mean, lower, upper, valid)
            lane.model.learn_many(rows, ticks, values, filled=filled)  # 2. learn (filled gap ticks included)
            lane.pool.observe(rows, values)
            if not len(r_rows):
                continue
            forecast = lane.model.forecast_many(r_rows, horizon)  # 3. forecast
            lane.seed_calibrator(horizon)  # residuals the model handed over since the last round
            lower, upper = lane.interval(r_rows, forecast)  # 4. interval (NaN: none yet)
            lane.pending.store(r_rows, r_ticks, forecast, lower, upper)
            lane.scorer.issued(r_rows, np.isfinite(forecast))
            outputs.append((lane.name, r_rows, r_ticks, t_ns, forecast, lower, upper))

    def _collect(self, outputs: list[tuple]) -> ForecastBatch:
        if not outputs:
            return ForecastBatch.empty(self.config.alpha)
        horizon = self.config.horizon
        parts = []
        hs = np.arange(1, horizon + 1)
        for name, rows, ticks, t_ns, mean, lower, upper in outputs:
            ready = np.isfinite(mean)
            if not ready.any():
                continue
            step = self.series_["step_ns"][rows]
            target = self.series_["anchor_ns"][rows][:, None] + (ticks[:, None] + hs[None, :]) * step[:, None]
            row_of = np.broadcast_to(rows[:, None], mean.shape)[ready]
            parts.append(ForecastBatch(
                series_id=self._ids[row_of],
                issued_at_ns=np.broadcast_to(t_ns[:, None], mean.shape)[ready],
                model=np.full(int(ready.sum()), name, dtype=object),
                h=np.broadcast_to(hs[None, :], mean.shape)[ready].astype(np.int32),
                target_ns=target[ready], mean=mean[ready], lower=lower[ready], upper=upper[ready],
                alpha=self.config.alpha,
            ))
        return ForecastBatch.concat(parts, self.config.alpha)

    def _observe(self, result: EngineResult) -> None:
        m = self.metrics
        m.observations.inc(result.n_applied)
        if result.n_duplicates:
            m.duplicates.inc(result.n_duplicates)
        if result.n_gap_filled:
            m.gap_fills.inc(result.n_gap_filled)
        if result.n_resets:
            m.series_resets.inc(result.n_resets)
        for rej in result.rejections:
            m.dead_letters.labels(reason=rej.reason).inc()
        if len(result.forecasts):
            models, counts = np.unique(result.forecasts.model.astype(str), return_counts=True)
            for name, count in zip(models, counts, strict=True):
                m.forecasts.labels(model=name).inc(int(count))
        m.processing.observe(result.elapsed_seconds)
        for lane in self.lanes:  # gauges appear once there is something to say (absent != 0% coverage)
            coverage, width = lane.scorer.rolling_coverage_, lane.scorer.rolling_width_
            for h in np.flatnonzero(np.isfinite(coverage)).tolist():
                m.coverage.labels(lane.name, str(h + 1)).set(coverage[h])
                if not np.isnan(width[h]):  # no step of this horizon has had an interval yet
                    m.width.labels(lane.name, str(h + 1)).set(width[h])

    def maintenance(self, budget_seconds: float | None = None) -> None:
        """Give each model time for deferred work (fits, replay training); call between batches."""
        budget = self.config.maintenance_budget_seconds if budget_seconds is None else budget_seconds
        started = time.perf_counter()
        for lane in self.lanes:
            lane.model.maintenance(budget / len(self.lanes))
        self.metrics.maintenance.observe(time.perf_counter() - started)

    # -- reading ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Prequential scores per model (overall and by horizon), summed in series-id order."""
        rows = np.array([self._slot_of[sid] for sid in sorted(self._slot_of)], dtype=np.int64)
        s = self.series_
        return {
            "models": {lane.name: lane.scorer.summary(rows) for lane in self.lanes},
            "n_series": len(rows),
            "n_observations": int(s["n_applied"][rows].sum()),
            "n_duplicates": int(s["n_duplicates"][rows].sum()),
            "n_gap_filled": int(s["n_gap_filled"][rows].sum()),
        }

    # -- state ------------------------------------------------------------------------------------
    def export_series(self, series_ids: list[str]) -> tuple[list[dict[str, Any]], ArrayDict]:
        """Everything the engine knows about these series: JSON meta per series + arrays (first axis = series).

        Keys: ``engine/<field>`` for the grid and applied position, ``<model>/<part>/<name>`` for each lane's
        model, calibrator (``cal``), pending forecasts and scorer.
        """
        rows = np.array([self._slot_of[sid] for sid in series_ids], dtype=np.int64)
        return [{"series_id": sid} for sid in series_ids], self._export_rows(rows)

    def _export_rows(self, rows: np.ndarray) -> ArrayDict:
        arrays: ArrayDict = {f"engine/{n}": a[rows].copy() for n, a in self.series_.items()}
        for lane in self.lanes:
            for part_name, part in lane.parts().items():
                for key, arr in part.export_rows(rows).items():
                    arrays[f"{lane.name}/{part_name}/{key}"] = np.asarray(arr)
        return arrays

    def import_series(self, meta: list[dict[str, Any]], arrays: ArrayDict) -> None:
        """Inverse of :meth:`export_series`: creates the series if needed and overwrites their state."""
        rows = []
        for item in meta:
            sid = item["series_id"]
            slot = self._slot_of.get(sid)
            if slot is None:
                slot = self._register(sid)
                if slot is None:
                    raise ValueError(f"cannot restore series {sid!r}: not accepted by this engine's config")
            rows.append(slot)
        self._import_rows(np.array(rows, dtype=np.int64), arrays)

    def _import_rows(self, rows: np.ndarray, arrays: ArrayDict) -> None:
        for name in self.series_:
            self.series_[name][rows] = arrays[f"engine/{name}"]
        for lane in self.lanes:
            for part_name, part in lane.parts().items():
                prefix = f"{lane.name}/{part_name}/"
                part.import_rows(rows, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})

    def drop_series(self, series_ids: list[str]) -> None:
        """Forget these series (their partition moved to another process); their rows are blanked and reused."""
        rows = np.array([self._slot_of.pop(sid) for sid in series_ids if sid in self._slot_of], dtype=np.int64)
        if not len(rows):
            return
        for lane in self.lanes:
            lane.model.drop_rows(rows)
        self._import_rows(rows, {k: np.repeat(v, len(rows), axis=0) for k, v in self._blank.items()})
        self._ids[rows] = None
        self._free.extend(rows.tolist())
        self.metrics.series_active.set(len(self._slot_of))

    def export_shared(self) -> dict[str, tuple[ArrayDict, dict[str, Any]]]:
        """Per-model shared state (e.g. a backbone's weights), keyed by model name."""
        return {lane.name: lane.model.export_shared() for lane in self.lanes}

    def import_shared(self, shared: dict[str, tuple[ArrayDict, dict[str, Any]]]) -> None:
        for lane in self.lanes:
            if lane.name in shared:
                lane.model.import_shared(*shared[lane.name])

    def applied_positions(self) -> dict[str, tuple[int, int]]:
        """Last applied (partition, offset) per series (-1, -1 if none)."""
        s = self.series_
        return {sid: (int(s["applied_partition"][slot]), int(s["applied_offset"][slot]))
                for sid, slot in self._slot_of.items()}
