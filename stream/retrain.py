"""Retraining in the engine: jobs that refit a lane's model, shadow candidates, and the decisions' effects.

The policy (:class:`tidecast.monitors.retrain.RetrainPolicy`) decides; this module applies:

* **Job.** On :class:`~tidecast.monitors.retrain.StartJob` the lane's model is copied through its own state API
  (``clone`` + ``export_shared``/``export_rows`` -> ``import_*``: no pickle, no shared tensors) and the copy is
  refitted by the model's ``refit(recent=..., epochs=...)`` hook on the data since the change point plus ``history``
  steps before it (CycleNet and cfc warm-start from the incumbent's weights; river lanes, which keep no history of
  their own, get a per-series ring from :func:`give_history` and rebuild each series' forecaster on it; a model
  without the hook fails the job, with the reason). ``mode="online"`` skips the refit: the copy learns online during
  the shadow window (gated online learning). Where the job runs: inline, at the decision step, while the engine is
  driven from one thread (``replay``: same input, same promotions); once :meth:`Retrainer.maintenance` is called
  from another thread (``serve``'s trainer thread), there, and the shadow starts at the first round after it ends
  (the candidate's per-row state is then re-synced from the incumbent, keeping what it learned).
* **Shadow.** Candidates learn and forecast beside the incumbent on every round; their forecasts are never
  emitted. Each matured step adds the squared errors of candidate and incumbent over the same cells, per series.
  For a model with a ``blend(other, weight)`` hook (same-architecture torch models) refitted in ``mode="refit"``
  the shadow holds one candidate per BCWI weight lambda (``lambdas``), the first half of the window chooses
  lambda, and only the second half gates the chosen model (never the data that chose it); one weight is used as
  given, and under 4 shadow steps the largest without a choice (:func:`bcwi_lambdas`).
* **Promotion.** The candidate becomes the lane's model; the calibrator is re-seeded from the candidate's shadow
  residuals (``Calibrator.reseed``) and the lane's watchers are reset (their references were the old model's).
  Forecasts already issued by the incumbent mature and are scored as issued.
* **Probation** (``probation_steps`` > 0; off by default). The replaced model stays in a shadow of its own beside
  the promoted one; when it ends, :meth:`~tidecast.monitors.retrain.RetrainPolicy.probation` rolls the lane back to
  it (promoted again, with its probation residuals) or confirms the promotion. No job starts meanwhile; a restart
  drops a probation.
* **State.** The policy's state, the model version and a job in flight ride in the lane's shared state
  (:meth:`Retrainer.export_state`); a job or shadow interrupted by a crash restarts from the saved histories
  after a restore. The version only moves at a gate, so a restart cannot promote twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from tidecast.models.base import BatchForecaster, check_between, check_count, notify_step
from tidecast.models.naive import check_ticks
from tidecast.models.registry import check_keywords, keyword_parameters
from tidecast.monitors.drift import DriftEvent, from_epoch_ns
from tidecast.monitors.retrain import NO_STEP, Fail, Promote, Reject, RetrainPolicy, StartJob
from tidecast.stream.pending import PendingForecasts

log = logging.getLogger(__name__)

__all__ = ["RetrainEvent", "RetrainSettings", "Retrainer", "copy_model", "give_history"]

#: Events a retrain emits (``RetrainEvent.kind``); ``detector`` is ``"retrain"``.
EVENT_KINDS = ("retrain_started", "promoted", "rejected", "failed", "rolled_back", "confirmed")


@dataclass(frozen=True)
class RetrainEvent(DriftEvent):
    """A lane-level retrain event, on the same sinks as drift events (``series_id`` is empty: the lane's model).
    ``statistic`` is the shadow error ratio (candidate over incumbent; NaN where none), ``version`` the lane's model
    version after the event, ``reason`` why."""

    version: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "version": self.version, "reason": self.reason}


@dataclass
class RetrainSettings:
    """What a job does: ``mode`` ``"refit"`` (fine-tune a copy on recent data) or ``"online"`` (a copy that learns
    online in the shadow); ``history`` steps before the change point join the refit data; ``epochs`` passes;
    ``lambdas`` the BCWI weights tried (``()``: no interpolation)."""

    policy: RetrainPolicy = field(default_factory=RetrainPolicy)
    mode: str = "refit"
    history: int = 672  # four weeks of hourly steps, one pass: bench/retrain.py --dev chose cheap, frequent refits
    epochs: int = 1
    lambdas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    refit_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("refit", "online"):
            raise ValueError(f"retrain mode must be 'refit' or 'online', got {self.mode!r}")
        check_ticks("history", self.history, low=0)
        check_count("epochs", self.epochs)
        for weight in self.lambdas:  # BCWI: the candidate's share of the interpolated weights
            check_between("lambdas", weight, 0, 1, open_low=True)
        if len(set(self.lambdas)) != len(self.lambdas):  # a repeated 1 put one model in the shadow twice
            raise ValueError(f"lambdas = {list(self.lambdas)}: each weight once")

    @property
    def ring_capacity(self) -> int:
        """Values per series a model without history of its own keeps for its jobs: ``history`` plus the fresh
        steps a job can see at most when it starts on time (``min_fresh``, or up to ``cooldown`` if it waited)."""
        return self.history + self.policy.min_fresh + self.policy.cooldown


def give_history(model: BatchForecaster, settings: RetrainSettings) -> BatchForecaster:
    """``model``, or, for a model that keeps no history of its own (a ``history`` parameter left at 0: the river
    lanes, :class:`~tidecast.models.adapters.PerSeries`), a copy keeping a per-series ring of
    ``settings.ring_capacity`` values for its refit hook (8 bytes a value and series)."""
    if model.get_params().get("history") == 0:
        return model.clone(history=settings.ring_capacity)
    return model


def bcwi_lambdas(settings: RetrainSettings, candidate: BatchForecaster) -> list[float]:
    """The BCWI weights a finished job's candidate is blended at, one shadow candidate each: ``settings.lambdas``
    for a refit of a model that can blend, else just the candidate (λ = 1). Not in ``online`` mode (the candidate
    is the incumbent's copy, unchanged yet: every blend is the same model) nor with fewer than 4 shadow steps (the
    first half would choose among several, and a gate of one step can never be significant: the largest weight is
    taken without a choice)."""
    if settings.mode != "refit" or not settings.lambdas or not hasattr(candidate, "blend"):
        return [1.0]
    if len(settings.lambdas) > 1 and settings.policy.shadow_steps < 4:
        return [max(settings.lambdas)]
    return list(settings.lambdas)


def online_switch(model: BatchForecaster) -> tuple[str, Any] | None:
    """The parameter that turns ``model``'s online learning on, and its "on" value: CycleNet's ``online`` (True),
    cfc's ``mode`` ("online", from "frozen"); ``None`` for a model without one (cfc's ``mode="cyclenet"`` always
    learns, river lanes learn every value). Gated online learning (``mode="online"`` jobs) needs it: the candidate
    is a copy with learning on."""
    params = model.get_params()
    if "online" in params:
        return "online", True
    if params.get("mode") in ("frozen", "online"):
        return "mode", "online"
    return None


def copy_model(model: BatchForecaster, rows: np.ndarray, **overrides: Any) -> BatchForecaster:
    """An independent copy of ``model`` (with parameter ``overrides``) holding the same state for ``rows``."""
    copy = model.clone(**overrides)
    arrays, meta = model.export_shared()
    if meta:
        copy.import_shared(arrays, meta)
    copy.resize(int(rows.max()) + 1 if rows.size else 0)
    if rows.size:
        copy.import_rows(rows, model.export_rows(rows))
    return copy


def series_weights(scorer: Any, n_rows: int) -> np.ndarray:
    """Per series, 1 / the incumbent's mean squared error so far (all horizons; the lane's prequential scorer):
    what a squared error weighs in a shadow. Raw sums over the lane let its largest series decide alone: one
    unforecastable series of scale 1e6 beside four of scale 10 had every candidate rejected at ratio 0.99-1.01,
    where without it all were promoted at 0.87-0.89. A series with no scored error yet weighs as a typical one."""
    sums = scorer.sums_[:n_rows]
    names = list(scorer.names_)
    count, squared = sums[:, names.index("count")].sum(axis=1), sums[:, names.index("sq_err")].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = count / squared
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, np.nan)
    out = np.full(n_rows, _typical(weights))
    out[: weights.size] = np.where(np.isnan(weights), out[: weights.size], weights)
    return out


def _typical(weights: np.ndarray) -> float:
    """The median of the finite weights (1.0 where there are none): a series not yet scored weighs this."""
    finite = weights[np.isfinite(weights)]
    return float(np.median(finite)) if finite.size else 1.0


def sync_rows(candidate: BatchForecaster, incumbent: BatchForecaster, rows: np.ndarray) -> None:
    """Bring the candidate's per-row state (histories, last ticks) up to the incumbent's, keeping the per-row
    parameters the candidate learned (``learned_row_keys``)."""
    if not rows.size:
        return
    state = incumbent.export_rows(rows)
    keep = getattr(candidate, "learned_row_keys", ())
    if keep:
        own = candidate.export_rows(rows)
        state.update({k: own[k] for k in keep if k in own and k in state})
    candidate.resize(int(rows.max()) + 1)
    candidate.import_rows(rows, state)
    synced = getattr(candidate, "rows_synced", None)
    if synced is not None:  # e.g. cfc: the incumbent's hidden states come from the old weights; re-encode them
        synced(rows)


class Job:
    """One refit, runnable on any thread: it only touches its own copy of the model."""

    def __init__(self, start: StartJob, candidate: BatchForecaster, recent: int, settings: RetrainSettings,
                 refused: str | None = None) -> None:
        self.start = start
        self.candidate = candidate
        self.refused = refused  # why the job cannot help (it fails with this reason)
        self.recent = recent
        self.settings = settings
        self.done = threading.Event()
        self.error: str | None = None
        self.seconds = 0.0

    def run(self) -> None:
        began = time.perf_counter()
        try:
            if self.settings.mode == "refit":
                refit = getattr(self.candidate, "refit", None)
                if refit is None:
                    raise TypeError(f"{type(self.candidate).__name__} has no refit hook")
                refit(recent=self.recent, epochs=self.settings.epochs, **self.settings.refit_params)
            elif self.refused:  # a copy learning like the incumbent shadows it bit for bit: ratio 1.0 every time
                raise TypeError(self.refused)
        except Exception as err:  # a failed job is reported as an event; the incumbent keeps serving
            self.error = f"{type(err).__name__}: {err}"
            log.warning("retrain job failed: %s", self.error)
        self.seconds = time.perf_counter() - began
        self.done.set()


class Shadow:
    """Candidates scored beside the incumbent on matured steps (per-series squared errors over the same cells)."""

    def __init__(self, candidates: list[BatchForecaster], lambdas: list[float], horizon: int, n_rows: int,
                 steps: int, weights: np.ndarray | None = None) -> None:
        self.candidates, self.lambdas = candidates, lambdas
        # per series, what one squared error weighs (see series_weights): the gate compares like with like
        self.weights = np.ones(n_rows) if weights is None else np.asarray(weights, float)[:n_rows]
        self.weights = np.pad(self.weights, (0, n_rows - self.weights.size), constant_values=_typical(self.weights))
        self.pending = [PendingForecasts(horizon) for _ in candidates]
        for p in self.pending:
            p.resize(n_rows)
        self.horizon, self.steps = horizon, steps
        self.half = steps // 2 if len(candidates) > 1 else 0  # BCWI: the first half chooses lambda
        self.bcwi = len(candidates) > 1
        self.done_steps = 0
        self._scored_ns = np.iinfo(np.int64).min  # the time of the last step counted
        self._diff_ns = [self._scored_ns] * len(candidates)  # per candidate, the time of its last step_diffs entry
        self.inc_err = np.zeros((len(candidates), n_rows))
        self.cand_err = np.zeros((len(candidates), n_rows))
        self.raw_err = np.zeros((len(candidates), 2))  # unweighted (incumbent, candidate) totals: the gate's guard
        self.step_diffs: list[list[float]] = [[] for _ in candidates]  # per scored step: candidate - incumbent
        # the chosen candidate's matured residuals, for the calibrators if it is promoted: float32, rows x steps x H
        # x 4 bytes while a shadow runs (10,000 series, 48 steps, H = 24: 46 MB)
        self.resid = np.full((n_rows, steps, horizon), np.nan, np.float32)
        self.n_resid = np.zeros(n_rows, np.int64)

    def _fit(self, n_rows: int) -> None:
        # A series first seen while the shadow runs has a row beyond what the candidates were copied with (river
        # lanes indexed past their list and the engine stopped); resize only grows, so this is cheap when it fits
        for c in self.candidates:
            c.resize(n_rows)
        if n_rows > self.inc_err.shape[1]:
            extra = n_rows - self.inc_err.shape[1]
            self.inc_err = np.pad(self.inc_err, ((0, 0), (0, extra)))
            self.weights = np.pad(self.weights, (0, extra), constant_values=_typical(self.weights))
            self.cand_err = np.pad(self.cand_err, ((0, 0), (0, extra)))
            self.resid = np.concatenate([self.resid, np.full((extra, *self.resid.shape[1:]), np.nan, np.float32)])
            self.n_resid = np.pad(self.n_resid, (0, extra))
            for p in self.pending:
                p.resize(n_rows)

    def score(self, rows: np.ndarray, ticks: np.ndarray, y: np.ndarray, inc_mean: np.ndarray,
              inc_valid: np.ndarray, at_ns: int) -> None:
        """Add the errors of what matured in a round at time ``at_ns``; a round at the same time as the last one
        (a batch split that time's rows) adds to the same step. BCWI's choice of lambda waits for the first round
        of the time after the first half, so where a batch cut a time decides nothing."""
        self._fit(int(rows.max()) + 1)
        same_step = self._scored_ns == at_ns
        if self.half and self.done_steps >= self.half and not same_step:
            self._choose()
        any_matured = False
        for k, pending in enumerate(self.pending):
            mean, _, _, valid = pending.matured(rows, ticks)
            both = valid & inc_valid
            # the candidate issued a forecast that is not finite where the incumbent's is: an infinite error, so
            # a candidate that cannot forecast a series the incumbent can is never promoted
            failed = inc_valid & ~valid & pending.issued(rows, ticks)
            if not (both.any() or failed.any()):
                continue
            any_matured = True
            raw_cand = np.where(both, (y[:, None] - mean) ** 2, 0.0).sum(axis=1)
            raw_inc = np.where(both, (y[:, None] - inc_mean) ** 2, 0.0).sum(axis=1)
            self.raw_err[k] += (raw_inc.sum(), raw_cand.sum() + (np.inf if failed.any() else 0.0))
            weight = self.weights[rows]
            cand = weight * raw_cand + np.where(failed.any(axis=1), np.inf, 0.0)
            inc = weight * raw_inc
            self.cand_err[k, rows] += cand
            self.inc_err[k, rows] += inc
            diff = float(cand.sum() - inc.sum())
            if self._diff_ns[k] == at_ns:
                self.step_diffs[k][-1] += diff
            else:
                self.step_diffs[k].append(diff)
                self._diff_ns[k] = at_ns
            if len(self.candidates) == 1:
                at = np.minimum(self.n_resid[rows], self.steps - 1)
                self.resid[rows, at] = np.where(valid, y[:, None] - mean, np.nan)
                self.n_resid[rows] += 1
        if any_matured and not same_step:
            self.done_steps += 1
            self._scored_ns = at_ns

    def _choose(self) -> None:
        """Keep the BCWI candidate with the lowest first-half error; the second half starts from zero."""
        best = int(np.argmin(self.cand_err.sum(axis=1)))
        self.candidates, self.lambdas = [self.candidates[best]], [self.lambdas[best]]
        self.pending = [self.pending[best]]
        self._diff_ns = [np.iinfo(np.int64).min]
        self.inc_err = np.zeros((1, self.inc_err.shape[1]))
        self.cand_err = np.zeros((1, self.cand_err.shape[1]))
        self.raw_err = np.zeros((1, 2))
        self.step_diffs = [[]]
        self.half = 0

    @property
    def complete(self) -> bool:
        return len(self.candidates) == 1 and self.done_steps >= self.steps

    def learn(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray, filled: np.ndarray,
              at_ns: int | None = None) -> None:
        if rows.size:
            self._fit(int(rows.max()) + 1)
        for c in self.candidates:
            notify_step(c, at_ns)
            c.learn_many(rows, ticks, values, filled=filled)

    def forecast(self, rows: np.ndarray, ticks: np.ndarray, horizon: int) -> None:
        if rows.size:
            self._fit(int(rows.max()) + 1)
        nan = np.full((rows.size, horizon, 1), np.nan)  # no interval: the candidate is scored on its mean
        for c, pending in zip(self.candidates, self.pending, strict=True):
            pending.store(rows, ticks, c.forecast_many(rows, horizon), nan, nan)

    def seed_residuals(self, rows: np.ndarray) -> np.ndarray:
        """The chosen candidate's residuals of ``rows``, oldest first, (n, T, H) (NaN where none)."""
        return self.resid[rows, : int(min(self.steps, self.n_resid[rows].max(initial=0)))].astype(float)


class LaneRetrain:
    """One lane's retraining: its policy, the job in flight, the shadow."""

    def __init__(self, settings: RetrainSettings) -> None:
        self.settings = settings
        self.policy = settings.policy.clone()
        self.step = 0  # grid times completed (not rounds: a batch may split one time's rows into two rounds)
        self.job: Job | None = None
        self.in_flight: StartJob | None = None  # started, not yet decided (saved: restarted after a crash)
        self.shadow: Shadow | None = None
        self.restart: StartJob | None = None
        self.restart_counted = False  # the restart continues a job this process counted as started
        self.last_ratio = float("nan")
        self.probation = False  # the shadow holds the model a promotion replaced (see Retrainer._end_probation)
        self.cut_short: str | None = None  # why series moving ended a probation: said by an event at the next step


class Retrainer:
    """Applies the lanes' retrain policies inside :class:`~tidecast.stream.engine.Engine` (see the module docstring)."""

    def __init__(self, settings: dict[str, RetrainSettings]) -> None:
        self.lanes = {name: LaneRetrain(s) for name, s in settings.items()}
        self._process_thread: int | None = None
        self.deferred = False
        self._lock = threading.Lock()

    def __contains__(self, lane: str) -> bool:
        return lane in self.lanes

    # -- hooks the engine calls ---------------------------------------------------------------------------
    def alarms(self, lane: str, detector: str, n_rows: int) -> None:
        state = self.lanes.get(lane)
        if state is not None and n_rows:
            state.policy.alarm(state.step, detector, n_rows)

    def begin_round(self, engine: Any, lane: Any, completed: list[int], events: list[DriftEvent]) -> None:
        """Before a lane's round that moved its step clock (:class:`~tidecast.stream.clock.StepClock`): the grid
        times it completed (every series of each learned and forecast, in however many rounds the batches cut it)
        each count a step, decide, apply. The same input thus gives the same decisions at any batch size, but
        where README says otherwise (the warm-start fit's cohort, a finer series joining later in a batch)."""
        st = self.lanes[lane.name]
        for at_ns in completed:
            self._end_step(engine, lane, st, from_epoch_ns(at_ns), events)

    def _end_step(self, engine: Any, lane: Any, st: LaneRetrain, when: datetime, events: list[DriftEvent]) -> None:
        """A grid time of the lane is complete: count the step, decide, apply."""
        self._process_thread = threading.get_ident()
        st.step += 1
        if st.cut_short is not None:
            events.append(self._event(lane.name, "confirmed", when, float("nan"), st,
                                      f"probation ended early ({st.cut_short}): the promoted model stays"))
            st.cut_short = None
        if st.shadow is not None:
            if st.shadow.complete:
                self._decide(engine, lane, st, when, events)
            return
        if st.job is not None:
            if st.job.done.is_set():
                self._job_finished(engine, lane, st, when, events)
            return
        if not getattr(lane.model, "fitted_", True):  # nothing to refit before the first fit
            return
        counted = st.restart is not None and st.restart_counted
        start = st.restart or st.policy.poll(st.step)
        st.restart, st.restart_counted = None, False
        if start is None:
            return
        rows = engine.live_rows()
        if not rows.size:
            return
        fresh = start.step - start.change_step if start.change_step != NO_STEP else 0
        overrides, refused = self._online_overrides(lane.model) if st.settings.mode == "online" else ({}, None)
        # a refused job fails before it reads its candidate: no copy of the model for it
        candidate = lane.model if refused else copy_model(lane.model, rows, **overrides)
        st.job = Job(start, candidate, fresh + st.settings.history, st.settings, refused)
        st.in_flight = start
        if not counted:  # one job interrupted by series moving in or out is one job started
            engine.metrics.retrains.labels(model=lane.name, outcome="started").inc()
        events.append(self._event(lane.name, "retrain_started", when, float("nan"), st, start.reason))
        if not self.deferred:  # replay: the job runs here, at the decision step
            st.job.run()
            self._job_finished(engine, lane, st, when, events)

    @staticmethod
    def _online_overrides(model: BatchForecaster) -> tuple[dict[str, Any], str | None]:
        """Gated online learning's candidate: the parameter turning learning on, or why there is none to turn."""
        switch = online_switch(model)
        name = type(model).__name__
        if switch is None:
            return {}, (f"{name} has no online switch (CycleNet's online, cfc's mode frozen/online): gated online "
                        "learning needs one")
        key, on = switch
        if model.get_params()[key] == on:
            return {}, (f"{name} already learns online, ungated ({key}={on!r}): gated online learning serves a "
                        "frozen model and promotes what a learning copy gains")
        return {key: on}, None

    def maintenance(self) -> None:
        """Run waiting jobs; called by ``serve``'s trainer thread (which makes jobs deferred from then on)."""
        if self._process_thread is not None and threading.get_ident() != self._process_thread:
            self.deferred = True
        if not self._lock.acquire(blocking=False):
            return
        try:
            for st in self.lanes.values():
                job = st.job
                if job is not None and not job.done.is_set():
                    job.run()
        finally:
            self._lock.release()

    def candidates(self, lane: str) -> Shadow | None:
        st = self.lanes.get(lane)
        return st.shadow if st is not None else None

    # -- decisions ------------------------------------------------------------------------------------------
    def _job_finished(self, engine: Any, lane: Any, st: LaneRetrain, when: datetime,
                      events: list[DriftEvent]) -> None:
        job, st.job = st.job, None
        engine.metrics.retrain_seconds.observe(job.seconds)
        if job.error is not None:
            fail: Fail = st.policy.failed(job.error)
            st.in_flight = None
            engine.metrics.retrains.labels(model=lane.name, outcome="failed").inc()
            events.append(self._event(lane.name, "failed", when, float("nan"), st, fail.reason))
            return
        rows = engine.live_rows()
        candidate = job.candidate
        if self.deferred:  # the incumbent moved on while the job ran
            sync_rows(candidate, lane.model, rows)
        lambdas = bcwi_lambdas(st.settings, candidate)
        candidates = []
        for lam in lambdas:
            c = candidate if lam == 1.0 else copy_model(candidate, rows)
            if lam != 1.0:
                c.blend(lane.model, lam)
            candidates.append(c)
        st.shadow = Shadow(candidates, lambdas, engine.config.horizon, engine.capacity,
                           st.policy.shadow_steps, series_weights(lane.scorer, engine.capacity))

    def _decide(self, engine: Any, lane: Any, st: LaneRetrain, when: datetime, events: list[DriftEvent]) -> None:
        shadow, st.shadow = st.shadow, None
        if st.probation:
            self._end_probation(engine, lane, st, shadow, when, events)
            return
        st.in_flight = None
        decision = st.policy.gate(shadow.inc_err[0], shadow.cand_err[0], np.asarray(shadow.step_diffs[0]),
                                  lag=engine.config.horizon - 1, raw=tuple(shadow.raw_err[0]))
        st.last_ratio = decision.ratio
        engine.metrics.shadow_error_ratio.labels(model=lane.name).set(decision.ratio)
        reason = decision.reason + (f" (BCWI lambda {shadow.lambdas[0]:g})" if shadow.bcwi else "")
        if isinstance(decision, Reject):
            engine.metrics.retrains.labels(model=lane.name, outcome="rejected").inc()
            events.append(self._event(lane.name, "rejected", when, decision.ratio, st, reason))
            return
        assert isinstance(decision, Promote)
        model = shadow.candidates[0]
        switch = online_switch(model) if st.settings.mode == "online" else None
        if switch is not None:  # gated: the promoted copy serves as the incumbent did (frozen, say)
            key = switch[0]
            served = lane.model.get_params()[key]
            if key == "online":
                model.online = served
            elif model.get_params()[key] != served:  # cfc's mode also sets what it builds: a copy in that mode
                model = copy_model(model, engine.live_rows(), **{key: served})
        previous = lane.model
        self._serve(engine, lane, st, model, shadow, "promoted", when, decision.ratio, reason, events)
        if st.policy.probation_steps:  # the replaced model keeps forecasting beside it, never emitted
            st.shadow = Shadow([previous], [1.0], engine.config.horizon, engine.capacity, st.policy.probation_steps,
                               series_weights(lane.scorer, engine.capacity))
            st.probation = True

    def _end_probation(self, engine: Any, lane: Any, st: LaneRetrain, shadow: Shadow, when: datetime,
                       events: list[DriftEvent]) -> None:
        """A promotion's probation is over: roll back to the replaced model if it did clearly better since."""
        st.probation = False
        decision = st.policy.probation(shadow.inc_err[0], shadow.cand_err[0])
        if isinstance(decision, Reject):
            events.append(self._event(lane.name, "confirmed", when, decision.ratio, st, decision.reason))
            return
        self._serve(engine, lane, st, shadow.candidates[0], shadow, "rolled_back", when, decision.ratio,
                    decision.reason, events)

    def _serve(self, engine: Any, lane: Any, st: LaneRetrain, model: BatchForecaster, shadow: Shadow, outcome: str,
               when: datetime, ratio: float, reason: str, events: list[DriftEvent]) -> None:
        """``model`` (a promoted candidate, or the model a probation rolls back to) serves the lane from now on, its
        calibrators re-seeded from its residuals in ``shadow``; counted and reported as ``outcome``."""
        rows = engine.live_rows()
        engine.promote(lane, model, rows, shadow.seed_residuals(rows))
        engine.metrics.retrains.labels(model=lane.name, outcome=outcome).inc()
        engine.metrics.model_version.labels(model=lane.name).set(st.policy.version_)
        events.append(self._event(lane.name, outcome, when, ratio, st, reason))

    @staticmethod
    def _event(lane: str, kind: str, when: datetime, ratio: float, st: LaneRetrain, reason: str) -> RetrainEvent:
        return RetrainEvent("", lane, "retrain", kind, when, ratio, version=st.policy.version_, reason=reason)

    def abort(self, why: str) -> None:
        """Series moved in or out: a shadow's candidates no longer hold the lanes' rows; start the job again. A
        probation ends (the replaced model does not hold them either) with a ``confirmed`` event that says so."""
        for st in self.lanes.values():
            if st.probation:
                st.cut_short = why
            if st.shadow is not None or st.job is not None:
                log.info("retrain restarted: %s", why)
                st.restart, st.shadow, st.job, st.probation = st.in_flight, None, None, False
                st.restart_counted = st.restart is not None

    def adopt(self, lane: str, version: int) -> None:
        """The lane took a newer model from another member's checkpoint: its version, and no job of its own on
        the older one."""
        st = self.lanes[lane]
        st.policy.version_ = int(version)
        st.job = st.shadow = st.restart = st.in_flight = st.cut_short = None
        st.probation = False

    # -- state ------------------------------------------------------------------------------------------------
    def version(self, lane: str) -> int:
        st = self.lanes.get(lane)
        return st.policy.version_ if st is not None else 0

    def export_state(self, lane: str) -> dict[str, Any] | None:
        st = self.lanes.get(lane)
        if st is None:
            return None
        flight = st.in_flight or st.restart
        return {"policy": st.policy.export_state(), "step": st.step,
                "in_flight": None if flight is None else [flight.reason, flight.change_step, flight.step]}

    def import_state(self, lane: str, state: dict[str, Any] | None) -> None:
        st = self.lanes.get(lane)
        if st is None or not state:
            return
        st.policy.import_state(state["policy"])
        st.step = int(state["step"])
        # its step clock ("last_ns" in states saved before the lane's clock) is the engine's: Engine.import_shared
        st.job = st.shadow = st.cut_short = None
        st.probation = False  # the replaced model is not saved: a restart ends a probation, the promotion stands
        flight = state.get("in_flight")
        st.in_flight = None
        st.restart = StartJob(str(flight[0]), int(flight[1]), int(flight[2])) if flight else None


_JOB_KEYS = ("mode", "history", "epochs", "lambdas", "refit_params")


def retrain_settings(params: dict[str, Any]) -> RetrainSettings:
    """Settings from ``--retrain-param`` items: the job's keys (``mode``, ``history``, ``epochs``, ``lambdas``,
    ``refit_params``) and :class:`~tidecast.monitors.retrain.RetrainPolicy`'s parameters."""
    valid = [*keyword_parameters(RetrainPolicy), *_JOB_KEYS]
    for key in params:
        if key not in valid:
            raise ValueError(f"retrain parameter {key}: no such parameter; valid: {', '.join(valid)}")
    job = {k: v for k, v in params.items() if k in _JOB_KEYS}
    # values converted like every other parameter group's (significance="inf" compared text with numbers,
    # significance=true counted as z = 1)
    accepted = keyword_parameters(RetrainPolicy) | {"triggers": Any}  # RetrainPolicy says what triggers takes
    policy = check_keywords(accepted, {k: v for k, v in params.items() if k not in _JOB_KEYS}, "retrain parameter ",
                            "retrain")
    if "refit_params" in job and not (isinstance(job["refit_params"], dict)
                                      and all(isinstance(k, str) for k in job["refit_params"])):
        raise ValueError(f"retrain parameter refit_params = {job['refit_params']!r}: a table of the lanes' refit "
                         'keywords, e.g. {"lr": 0.001}')
    if "lambdas" in job:
        lambdas = job["lambdas"]
        if not isinstance(lambdas, list | tuple) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in lambdas):
            raise ValueError(f"retrain parameter lambdas = {lambdas!r}: a list of BCWI weights in (0, 1], e.g. "
                             "[0.5, 1] ([] : no interpolation)")
        job["lambdas"] = tuple(float(x) for x in lambdas)
    if isinstance(policy.get("triggers"), list):  # a JSON list; anything else is RetrainPolicy's to judge
        policy["triggers"] = tuple(policy["triggers"])
    return RetrainSettings(policy=RetrainPolicy(**policy), **job)
