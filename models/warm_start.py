"""What the two torch forecasters (CycleNet, the liquid ``cfc``) share: a warm start, then online replay.

Both keep each series' recent history in a ring, fit one shared network once a series has ``warm_start``
observations (the last ``val_fraction`` of them for early stopping), then learn online from replayed windows.
The fit and the replay steps are *deferred work*: :meth:`WarmStarted._work` advances the fit within a budget,
installs it when done, then takes the replay steps that are due, all under one training lock so that a
trainer thread and the engine's thread never train at once. A subclass supplies the fit job (``_job``, a dict
with a resumable ``"fit"``), ``_install(job)``, ``_replay_step()`` and the due-step count ``_due``; it may hook
``_fit_extras`` (CycleNet fits its bootstrap replicas there).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from tidecast.models.base import BatchForecaster
from tidecast.models.naive import MAX_PERIOD, check_ticks


class WarmStarted(BatchForecaster):
    """Base of the warm-started, replay-trained forecasters (see the module docstring)."""

    # set by the subclass's constructor and state
    warm_start: int
    val_fraction: float
    lookback: int
    horizon: int
    replay_window: int
    net_: Any
    cycle_: int
    fit_report_: dict[str, Any]
    n_rows_: int
    _rounds: int
    _due: int
    replay_every: int
    replay_steps: int
    _step_ns: int | None  # the grid time of the last begin_step (None: never called)
    _step_counted: bool  # whether that time has counted its learning round
    _rng: np.random.Generator
    _ready: np.ndarray
    _job: dict[str, Any] | None
    _due: int
    _train_lock: threading.Lock

    def _n_val(self) -> int:
        """Warm-start observations kept for early stopping."""
        return int(round(self.warm_start * self.val_fraction))

    def _check_warm_start(self) -> None:
        """The warm-start block holds a training window and a validation part of at least a horizon; the error
        says which value would do (``warm_start`` is what grows with a long horizon)."""
        for name in ("warm_start", "replay_window", "lookback"):  # rings of this many values a series
            check_ticks(name, getattr(self, name))
        problem = self._warm_start_problem(self.warm_start)
        if problem is not None:
            raise ValueError(f"{problem}; {self._warm_start_hint()}")

    def _warm_start_problem(self, block: int) -> str | None:
        """What a warm-start block of ``block`` observations fails, or ``None``: a training window left once the
        validation part is taken out, a validation part (when there is one) that holds a horizon, and the model's
        own rule for that part (:meth:`_validation_problem`)."""
        n_val = int(round(block * self.val_fraction))
        if block - n_val < self._window:
            return (f"warm_start={block} leaves fewer than lookback + horizon = {self._window} training "
                    "observations")
        if n_val and n_val < self.horizon:
            return (f"warm_start={block}: its validation part (val_fraction={self.val_fraction}: {n_val} "
                    f"observations) is shorter than the horizon ({self.horizon})")
        return self._validation_problem(n_val) if n_val else None

    def _validation_problem(self, n_val: int) -> str | None:
        """A model's own rule for a validation part of ``n_val`` observations (CycleNet's calibration holdout)."""
        return None

    def _warm_start_hint(self) -> str:
        """The least ``warm_start`` that passes, found by a scan up from the window: a validation part rounding to
        nothing passes too, so passing is not monotone for a small ``val_fraction`` (an estimate from
        ``window + H / val_fraction`` named values that failed, or 23,500,000 where 120 passed)."""
        fits = (b for b in range(self._window, MAX_PERIOD + 1) if self._warm_start_problem(b) is None)
        need = next(fits, None)
        if need is None:
            return f"no warm_start up to {MAX_PERIOD} passes: lower {self._warm_start_knobs()}"
        return f"warm_start={need} is the least that passes"

    def _warm_start_knobs(self) -> str:
        """The settings besides ``warm_start`` that size the block, named when no ``warm_start`` fits."""
        return f"val_fraction ({self.val_fraction}), the horizon or the lookback"

    @property
    def _window(self) -> int:
        return self.lookback + self.horizon

    @property
    def _ring(self) -> int:
        """History kept per series: the warm-start block, or the replay window's windows if longer."""
        return max(self.warm_start, self.replay_window + self._window - 1)

    @property
    def fitted_(self) -> bool:
        return self.net_ is not None

    @property
    def ready_(self) -> np.ndarray:
        """Which rows are served, shape ``(n_rows_,)``."""
        return self._ready[: self.n_rows_].copy()

    def first_forecast_after(self) -> tuple[int, str]:
        return self.warm_start, (f"warm_start={self.warm_start}: the first fit waits for a series that long; "
                                 f"after it, a new series joins with lookback + horizon = {self._window}")

    def _work(self, fit_budget: float, replay_budget: float) -> None:
        """Advance the warm-start fit (install it when done), then take due replay steps until the budget ends."""
        if not self._train_lock.acquire(blocking=False):
            return  # another thread is training; it will do the work
        try:
            start = time.perf_counter()
            job = self._job
            if job is not None:
                if not job["fit"].run(fit_budget):
                    return
                if not self._fit_extras(job, fit_budget - (time.perf_counter() - start)):
                    return
                self._install(job)
            deadline = start + replay_budget
            while self._due > 0:
                self._replay_step()
                if time.perf_counter() >= deadline:
                    break
        finally:
            self._train_lock.release()

    def _reset_rounds(self) -> None:
        """No learning round counted yet, no replay step due, no step seen."""
        self._rounds = self._due = 0
        self._step_ns, self._step_counted = None, False

    def begin_step(self, at_ns: int) -> None:
        if at_ns != self._step_ns:
            self._step_ns, self._step_counted = at_ns, False

    def _count_round(self) -> None:
        """A learning call completed windows: one more learning round, unless its grid time already counted one
        (a batch cut that time's rows: before, each part took the replay steps of a round, 1,202 rounds instead of
        400 at batch size 1, and forecasts and promotions depended on the batch size). A model driven without
        :meth:`begin_step` counts every call."""
        if self._step_ns is not None and self._step_counted:
            return
        self._step_counted = True
        self._rounds += 1
        if self._rounds % self.replay_every == 0:
            self._due = min(self._due + self.replay_steps, 4 * self.replay_steps)

    def _shared_meta(self, kind: str) -> dict[str, Any]:
        """The JSON part of the shared state both models write (the caller holds the locks)."""
        return {"kind": kind, "version": 1, "params": self.get_params(), "cycle": self.cycle_,
                "fitted": self.net_ is not None, "n_rows": int(self.n_rows_), "rounds": self._rounds,
                "due": self._due, "rng": self._rng.bit_generator.state, "fit_report": self.fit_report_,
                "step_ns": self._step_ns, "step_counted": self._step_counted}

    def _import_step(self, meta: dict[str, Any]) -> None:
        """The learning round's step from saved shared state (absent in states saved before it: none yet)."""
        step = meta.get("step_ns")
        self._step_ns = None if step is None else int(step)
        self._step_counted = bool(meta.get("step_counted", False))

    def _check_shared_meta(self, meta: dict[str, Any], kind: str, keys: tuple[str, ...]) -> None:
        """Refuse shared state of another model, or saved with other values of the parameters in ``keys``."""
        if meta.get("kind") != kind:
            raise ValueError(f"not a {kind} state")
        saved, current = meta["params"], self.get_params()
        for key in keys:
            if saved[key] != current[key]:
                raise ValueError(f"state has {key}={saved[key]!r}, this model {current[key]!r}")

    def _note_replaced(self, rows: np.ndarray) -> None:
        """``import_rows`` is about to replace these rows' state (a series dropped and its row reused, or one
        restored into it): a pending fit's snapshot of them is another series' now (called under the lock)."""
        if self._job is not None:
            self._job["replaced"] = np.union1d(self._job.get("replaced", np.zeros(0, np.int64)), rows)

    @staticmethod
    def _kept(job: dict[str, Any]) -> np.ndarray:
        """Which of the job's cohort rows (``job["rows"]``) still hold the series it snapshotted: ``_install``
        gives the fit's per-row state (scaler, cycle row, residuals) to these only."""
        return ~np.isin(job["rows"], job.get("replaced", np.zeros(0, np.int64)))

    def _fit_extras(self, job: dict[str, Any], budget: float) -> bool:
        """More fitting after the network's, before the job is installed; True when done (default: none)."""
        return True

    def _install(self, job: dict[str, Any]) -> None:
        raise NotImplementedError

    def _replay_step(self) -> None:
        raise NotImplementedError
