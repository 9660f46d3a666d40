"""The retrain policy of one lane: when to refit its model, and whether a refitted candidate may replace it.

Pure: it sees counts and errors (arrays in, decisions out) and never touches a model; the engine
(:mod:`tidecast.stream.retrain`) applies its decisions. Time is counted in the lane's *steps* (grid times of the lane
completed, however many rounds or batches brought them), so a replay takes the same decisions whatever the machine's
speed.

The rule, in plain words:

* **Trigger.** A drift alarm of a watched detector (``triggers``; ``None``: every detector, e.g. ``cusum``,
  ``bootstrap``) marks a *change point*, the step of the first alarm since the last job. ``schedule`` (steps)
  adds a periodic trigger.
* **Wait for fresh data.** A job starts only ``min_fresh`` steps after the change point (a refit on two points of
  the new regime learns nothing), ``cooldown`` steps after the last job started, and while fewer than
  ``budget`` jobs started in the last ``budget_window`` steps.
* **Shadow gate.** The candidate forecasts beside the incumbent on the next ``shadow_steps`` matured steps
  (prequential: only forecasts whose targets arrived). It is promoted only if its squared error over them is
  lower by ``margin`` (ratio <= 1 - margin) *and* the share of series whose own error it makes worse by more than
  ``flip_margin`` ("negative flips") is at most ``flip_budget``; otherwise it is rejected, with the reason.
  With ``significance`` z > 0 the win must also be larger than the window's noise: the Diebold-Mariano statistic of
  the per-step loss differential (:func:`loss_differential_t`) must be at most -z.
* **Probation** (optional). For ``probation_steps`` more matured steps the replaced model is scored beside the
  promoted one; if it does better by ``margin`` the lane rolls back to it (:meth:`RetrainPolicy.probation`).

>>> import numpy as np
>>> policy = RetrainPolicy(min_fresh=10, cooldown=50)
>>> policy.alarm(step=100, detector="cusum", n_rows=3)
>>> policy.poll(105) is None  # 5 steps of the new regime: too few
True
>>> policy.poll(110)
StartJob(reason='alarm:cusum', change_step=100, step=110)
>>> policy.gate(np.array([1.0, 1.0, 1.0]), np.array([0.5, 0.6, 0.9]))
Promote(reason='error ratio 0.667, 0.00 of series worse', ratio=0.6666666666666666, worse_share=0.0)
>>> policy.version_
1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tidecast.models.base import Params, check_between, check_count
from tidecast.models.naive import check_ticks

__all__ = ["Fail", "Promote", "Reject", "RetrainPolicy", "StartJob", "gate_errors", "loss_differential_t"]

NO_STEP = -1


@dataclass(frozen=True)
class StartJob:
    """Refit the lane's model: ``change_step`` is where the data of the new regime starts (``-1``: schedule)."""

    reason: str
    change_step: int
    step: int


@dataclass(frozen=True)
class Promote:
    """The candidate replaces the incumbent (``ratio``: its squared error over the incumbent's in the shadow)."""

    reason: str
    ratio: float
    worse_share: float


@dataclass(frozen=True)
class Reject:
    """The candidate is discarded (rollback); ``reason`` says which rule it failed."""

    reason: str
    ratio: float
    worse_share: float


@dataclass(frozen=True)
class Fail:
    """The job raised or produced no usable model."""

    reason: str


def gate_errors(incumbent: np.ndarray, candidate: np.ndarray, flip_margin: float) -> tuple[float, float]:
    """``(ratio, worse_share)`` of per-series summed squared errors over the same matured cells: the candidate's
    total over the incumbent's, and the share of series (with any error) it makes worse by more than ``flip_margin``.

    >>> gate_errors(np.array([1.0, 2.0]), np.array([1.5, 1.0]), 0.1)
    (0.8333333333333334, 0.5)
    """
    incumbent, candidate = np.asarray(incumbent, float), np.asarray(candidate, float)
    scored = incumbent + candidate > 0
    total = float(incumbent[scored].sum())
    ratio = float(candidate[scored].sum()) / total if total > 0 else (1.0 if not scored.any() else np.inf)
    worse = candidate[scored] > incumbent[scored] * (1.0 + flip_margin)
    return ratio, float(worse.mean()) if worse.size else 0.0


def loss_differential_t(diffs: np.ndarray, lag: int) -> float:
    """Diebold-Mariano statistic of a loss differential series ``diffs`` (candidate's loss minus incumbent's, one
    value per shadow step): its mean over the standard error from a Newey-West (Bartlett) variance with ``lag``
    autocovariances. Negative: the candidate's loss is lower. Multi-step forecasts overlap — a step's loss holds
    forecasts issued up to H - 1 steps earlier, shared with the next H - 1 steps — so ``lag`` H - 1 is DM's choice;
    it is capped at T - 1 for T steps. ``0.0`` when undefined (fewer than 2 steps, or no variance and no mean).

    >>> rng = np.random.default_rng(0)
    >>> bool(loss_differential_t(rng.normal(-1.0, 1.0, 200), lag=0) < -10)  # a clear win: about -sqrt(200)
    True
    >>> abs(loss_differential_t(rng.normal(0.0, 1.0, 200), lag=4)) < 3  # no difference
    True
    """
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return 0.0
    lag = int(min(max(lag, 0), d.size - 1))
    u = d - d.mean()
    var = float(u @ u) / d.size
    for k in range(1, lag + 1):
        var += 2.0 * (1.0 - k / (lag + 1.0)) * float(u[k:] @ u[:-k]) / d.size
    if var <= 0.0:
        return 0.0 if d.mean() == 0.0 else float(np.copysign(np.inf, d.mean()))
    return float(d.mean() / np.sqrt(var / d.size))


class RetrainPolicy(Params):
    """When to start a refit of one lane's model and whether to promote its candidate (see the module docstring).

    Parameters
    ----------
    triggers
        Detector names whose alarms start a job (``None``: all).
    min_alarm_rows
        Alarmed series needed in one step to mark a change point (one detector's, summed over the rounds in which
        the engine's batches split that step).
    min_fresh
        Steps of data after the change point before a job starts.
    cooldown
        Steps between two job starts.
    budget, budget_window
        At most ``budget`` job starts in any ``budget_window`` steps.
    schedule
        Start a job every ``schedule`` steps as well (``None``: only alarms).
    shadow_steps
        Matured steps the candidate is scored on beside the incumbent (K).
    margin
        The candidate's error must be at most ``1 - margin`` times the incumbent's.
    flip_margin, flip_budget
        A series is a negative flip if the candidate's error on it exceeds the incumbent's by more than
        ``flip_margin`` (relative); at most ``flip_budget`` of the series may flip.
    significance
        z > 0: the candidate's win must also be significant, its Diebold-Mariano statistic over the shadow's
        per-step loss differential at most -z (0: no test).
    probation_steps
        After a promotion, the model it replaced keeps forecasting (never emitted) for this many matured steps;
        if its error is then at most ``1 - margin`` times the promoted model's, the lane rolls back to it
        (0: no probation).
    """

    def __init__(self, triggers: tuple[str, ...] | None = None, min_alarm_rows: int = 1, min_fresh: int = 48,
                 cooldown: int = 96, budget: int = 8, budget_window: int = 2000, schedule: int | None = None,
                 shadow_steps: int = 96, margin: float = 0.02, flip_margin: float = 0.1,
                 flip_budget: float = 0.5, probation_steps: int = 0, significance: float = 1.645) -> None:
        self.triggers = triggers
        self.min_alarm_rows = min_alarm_rows
        self.min_fresh = min_fresh
        self.cooldown = cooldown
        self.budget = budget
        self.budget_window = budget_window
        self.schedule = schedule
        self.shadow_steps = shadow_steps
        self.margin = margin
        self.flip_margin = flip_margin
        self.flip_budget = flip_budget
        self.probation_steps = probation_steps
        self.significance = significance
        if triggers is not None and (isinstance(triggers, str) or not all(isinstance(t, str) for t in triggers)):
            raise ValueError(f"triggers = {triggers!r}: a list of detector names (e.g. [\"cusum\"]) or None")
        check_count("min_alarm_rows", min_alarm_rows)
        # steps, at most MAX_PERIOD like every ring: they size the history a job sees and the shadow's residuals
        for name in ("min_fresh", "cooldown", "probation_steps"):
            check_ticks(name, getattr(self, name), low=0)
        check_count("budget", budget)
        check_ticks("budget_window", budget_window)
        check_ticks("shadow_steps", shadow_steps, low=2)
        check_ticks("schedule", schedule, optional=True)
        check_between("margin", margin, -math.inf, 1)  # below 0 admits worse candidates (a gate switched off)
        check_between("flip_margin", flip_margin, 0, math.inf, open_high=True)
        check_between("flip_budget", flip_budget, 0, 1)
        if significance < 0 or math.isnan(significance):
            raise ValueError(f"significance must be >= 0 (0: no test), got {significance}")
        if probation_steps == 1:  # below 0 is refused above
            raise ValueError(f"probation_steps must be 0 (off) or >= 2, got {probation_steps}")
        self.version_ = 0  # promotions so far: the lane's model version
        self.change_step_ = NO_STEP  # first alarm since the last job start
        self.starts_ = np.zeros(0, np.int64)  # steps at which jobs started, within the budget window
        self.last_scheduled_ = 0
        self.counts_: dict[str, int] = {"started": 0, "promoted": 0, "rejected": 0, "failed": 0}
        self.alarm_rows_: dict[str, list[int]] = {}  # detector -> [step, series alarmed at it so far]

    # -- triggers ---------------------------------------------------------------------------------------
    def alarm(self, step: int, detector: str, n_rows: int) -> None:
        """``n_rows`` series of the lane raised an alarm of ``detector`` at ``step``."""
        if self.triggers is not None and detector not in self.triggers:
            return
        # a step's rows may come in several rounds (a batch boundary inside it): count them together, so the
        # same input starts the same jobs at any batch size
        seen = self.alarm_rows_.get(detector)
        total = n_rows + (seen[1] if seen is not None and seen[0] == step else 0)
        self.alarm_rows_[detector] = [int(step), int(total)]
        if total < self.min_alarm_rows:
            return
        if self.change_step_ == NO_STEP:
            self.change_step_ = int(step)
            self._reason = f"alarm:{detector}"

    def poll(self, step: int) -> StartJob | None:
        """A job to start now, or ``None`` (waiting for fresh data, in cooldown, over budget, or no trigger)."""
        recent = self.starts_[self.starts_ > step - self.budget_window]
        # the cooldown runs from the last start, even one older than the budget window (which forgets it)
        if recent.size >= self.budget or (self.starts_.size and step - int(self.starts_.max()) < self.cooldown):
            return None
        if self.change_step_ != NO_STEP and step - self.change_step_ >= self.min_fresh:
            job = StartJob(getattr(self, "_reason", "alarm"), self.change_step_, int(step))
        elif self.schedule is not None and step - self.last_scheduled_ >= self.schedule:
            job = StartJob("schedule", NO_STEP, int(step))
        else:
            return None
        self.starts_ = np.append(recent, step)
        self.last_scheduled_ = int(step)
        self.change_step_ = NO_STEP  # alarms during the job mark the next change point
        self.counts_["started"] += 1
        return job

    # -- the gate ---------------------------------------------------------------------------------------
    def gate(self, incumbent: np.ndarray, candidate: np.ndarray, step_diffs: np.ndarray | None = None,
             lag: int = 0, raw: tuple[float, float] | None = None) -> Promote | Reject:
        """Decide on a candidate from per-series squared errors summed over the shadow window (same cells; the
        engine weighs each series by its own error scale); with ``significance``, also from ``step_diffs``, the
        candidate's minus the incumbent's squared error summed over each shadow step's cells (see
        :func:`loss_differential_t` for ``lag``). ``raw``: the unweighted (incumbent, candidate) totals; a
        candidate whose plain squared error exceeds the incumbent's by more than ``|margin|`` is never promoted,
        whatever the weights say."""
        ratio, worse = gate_errors(incumbent, candidate, self.flip_margin)
        said = f"error ratio {ratio:.3f}, {worse:.2f} of series worse"
        if not np.isfinite(ratio) or ratio > 1.0 - self.margin:
            self.counts_["rejected"] += 1
            return Reject(f"{said}: not below 1 - margin = {1.0 - self.margin:.3f}", ratio, worse)
        if raw is not None:
            raw_ratio = gate_errors(np.array([raw[0]]), np.array([raw[1]]), self.flip_margin)[0]
            if not np.isfinite(raw_ratio) or raw_ratio > 1.0 + abs(self.margin):
                self.counts_["rejected"] += 1
                return Reject(f"{said}, unweighted {raw_ratio:.3f}: worse than the incumbent by more than "
                              f"{abs(self.margin):g}", ratio, worse)
        if self.significance and step_diffs is not None:
            t = loss_differential_t(step_diffs, lag)
            said += f", DM t {t:.2f}"
            if t > -self.significance:
                self.counts_["rejected"] += 1
                return Reject(f"{said}: not significant (needs t <= -{self.significance:g})", ratio, worse)
        if worse > self.flip_budget:
            self.counts_["rejected"] += 1
            return Reject(f"{said}: negative flips over the budget {self.flip_budget:.2f}", ratio, worse)
        self.counts_["promoted"] += 1
        self.version_ += 1
        return Promote(said, ratio, worse)

    def probation(self, promoted: np.ndarray, previous: np.ndarray) -> Promote | Reject:
        """After a probation window: :class:`Promote` (roll back to the previous model) if its error was at most
        ``1 - margin`` times the promoted one's, else :class:`Reject` (the promotion stands)."""
        ratio, worse = gate_errors(promoted, previous, self.flip_margin)
        said = f"previous model's error ratio {ratio:.3f}"
        if np.isfinite(ratio) and ratio <= 1.0 - self.margin:
            self.counts_["rolled_back"] = self.counts_.get("rolled_back", 0) + 1
            self.version_ += 1
            return Promote(f"{said}: rolled back", ratio, worse)
        return Reject(f"{said}: the promotion stands", ratio, worse)

    def failed(self, reason: str) -> Fail:
        self.counts_["failed"] += 1
        return Fail(reason)

    # -- state ------------------------------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """JSON-able state (the lane's shared state carries it)."""
        return {"version": self.version_, "change_step": self.change_step_, "starts": self.starts_.tolist(),
                "last_scheduled": self.last_scheduled_, "counts": dict(self.counts_),
                "reason": getattr(self, "_reason", "alarm"), "alarm_rows": self.alarm_rows_}

    def import_state(self, state: dict[str, Any]) -> None:
        self.version_ = int(state["version"])
        self.change_step_ = int(state["change_step"])
        self.starts_ = np.asarray(state["starts"], np.int64)
        self.last_scheduled_ = int(state["last_scheduled"])
        self.counts_ = {k: int(v) for k, v in state["counts"].items()}
        self._reason = str(state.get("reason", "alarm"))
        self.alarm_rows_ = {str(k): [int(v[0]), int(v[1])] for k, v in (state.get("alarm_rows") or {}).items()}
