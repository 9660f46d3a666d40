"""CycleNet as a streaming :class:`~tidecast.models.base.BatchForecaster`: warm start, then learning online.

The network and the paper's batch recipe live in :mod:`tidecast.models.cyclenet_net` (Lin et al., "CycleNet: Enhancing
Time Series Forecasting through Modeling Periodic Patterns", NeurIPS 2024). This module serves it to a group
of series:

* **One model per group.** All rows of a :class:`CycleNetForecaster` share one cycle length W and one
  backbone; each row (series) owns one column of the cycle table ``Q``. Series with another cycle belong in
  another model group (another instance). Every forecast round is one batched forward over the rows asked for.
* **Phase from time.** A window's phase is ``tick % W`` of its first step, with the engine's ticks (grid steps
  since a timestamp anchor), so a gap can never shift the cycle.
* **Raw values in, raw forecasts out.** Each row is standardised internally with the mean and (population)
  standard deviation of its warm-start training part, as the paper's StandardScaler does.
* **Warm start.** Rows keep their history until ``warm_start`` observations have arrived; then the group is
  fitted with the paper's recipe: the first ``1 - val_fraction`` of those observations train, the rest (plus
  ``lookback`` rows of context) drive early stopping. W is ``cycle`` or, when ``cycle`` is None, detected on
  the training part with :func:`detect_cycle`. Series that appear after the fit join as soon as they have one
  full window (``lookback + horizon`` observations); their ``Q`` column starts at zero and is learned online.
* **Calibration hand-off.** When the fit is installed, the fitted network's residuals on the validation part go
  to the engine (:meth:`pop_calibration`) to seed the rows' calibrators, so intervals are right from the first
  forecast. Early stopping picked its epoch on those windows, which makes them look optimistic;
  ``calib_holdout`` keeps the last share of them out of early stopping and seeds from that share only. The
  default is 0 (early stopping sees all of them, the fit is the paper's recipe unchanged): on the cold-start
  panel the hold-out made no difference beyond noise (``bench/conformal.py --case coldstart``: early coverage
  0.896-0.916 from the early-stopping windows, 0.896-0.913 from a held-out half), because the model goes on
  learning online after the fit, so its live errors are no larger than its validation errors. A series that
  joins after the fit hands over a backtest of the serving network over the history it joined with (its ``Q``
  column still zero, as in its first live forecasts): ``horizon - h + 1`` residuals at horizon h for a series that
  joins with exactly one window (targets after its first full lookback).
* **Online learning (experience replay).** Each completed (input, target) window of a served row joins the
  replay buffer, which holds the newest ``replay_window`` windows of every row (older ones leave it). Every
  ``replay_every`` learning rounds, ``replay_steps`` Adam steps are taken on mini-batches of ``replay_batch``
  windows drawn by random reshuffling: one permutation of the buffer per pass, windows that joined during a
  pass wait for the next one. The windows are not copied: the buffer is the rows' history rings, and a
  window is a (row, last tick) pair, so it costs one stored value instead of ``lookback + horizon`` and moves
  with its series. The warm-start history is in the buffer from the start, so the validation part - seen only
  by early stopping - is learned too.
* **Where heavy work runs.** The warm-start fit and the replay steps run either inline in :meth:`learn_many`
  (``defer=False``; replay bounded by ``step_budget`` seconds per round) or in :meth:`maintenance`
  (``defer=True``), which ``serve`` calls from a worker thread. ``defer=None`` (default) is inline until
  :meth:`maintenance` is called from a thread other than the one calling :meth:`learn_many` - the sign of a
  worker - and deferred from then on; ``replay``, which calls both from one thread, stays inline.
* **Threading.** Training never touches the weights that serve forecasts: it updates a *training copy* (with
  its optimiser) outside the lock, and only the copy of its parameters into the serving network, like every
  read or write of the row tables, happens under a short lock. The warm-start fit trains a network of its own
  and swaps it in when done.
* **Outliers.** One absurd value (``1e300``) must neither stop the forecasts of its series nor reach the shared
  backbone. Each window is read in units of its row's scaler; a value further than ``input_limit`` of those units
  from the window's median is replaced by that median before the network sees it (forecasts and replay alike):
  a spike, not a level shift, which moves the median too. Replay steps then weigh each window by its own loss:
  a window whose loss is not finite or exceeds ``loss_limit`` times the running mean window loss is left out of
  the step and counted (``skipped_windows_``); a batch with nothing left takes no step. The warm-start fit skips
  any step whose loss is not finite. An outlier *inside* a series' warm-start history still spoils that
  series' scaler (mean and standard deviation); it is the others' forecasts that stay intact.
* **State** is arrays + JSON (no pickle): :meth:`export_rows` gives each row's history ring, scaler, ``Q``
  column and its Adam moments (the history ring is also the replay buffer); :meth:`export_shared` the
  backbone, its Adam state, the current replay pass and the RNG. Restoring both and replaying the same inputs
  reproduces the forecasts bit for bit (provided the time budgets let both runs take the same replay steps). A
  fit still running at export time is not saved: after a restore it restarts from the saved histories.

>>> import numpy as np
>>> model = CycleNetForecaster(horizon=4, lookback=8, cycle=6, warm_start=120, epochs=2)
>>> rows = np.array([0, 1])
>>> for tick in range(200):
...     model.learn_many(rows, np.array([tick, tick]), np.sin(2 * np.pi * tick / 6) + np.array([0.0, 5.0]))
>>> model.forecast_many(np.array([0, 1]), 4).shape
(2, 4)
"""

from __future__ import annotations

import copy
import math
import threading
from collections import Counter
from typing import Any

import numpy as np
import torch

from tidecast.models.base import (
    MAX_BATCH,
    MAX_SEED,
    MAX_UNITS,
    ArrayDict,
    Calibration,
    CalibrationQueue,
    check_count,
    check_positive,
    check_rate,
    require,
)
from tidecast.models.bootstrap import check_bootstrap
from tidecast.models.cyclenet_net import DEFAULT_LR, BatchFit, CycleNet, Windows, make_adam
from tidecast.models.cyclenet_net import build as build_net
from tidecast.models.cyclenet_replicas import OnlineReplicas, ReplicaFit, Replicas, serve_windows
from tidecast.models.naive import check_ticks
from tidecast.models.persistence import PersistenceBlend
from tidecast.models.rows import Column, Field, RowTable
from tidecast.models.seasonality import detect_period
from tidecast.models.warm_start import WarmStarted

__all__ = ["CycleNetForecaster", "build", "detect_cycle", "make"]

#: Most series-windows in one warm-start step (ETTh's 256 x 7 fits; 1,000 series take 8 origins a step).
MAX_BATCH_WINDOWS = 8192
#: Steps an epoch of a retrain refit keeps where its batches may shrink (see :meth:`CycleNetForecaster.refit`).
REFIT_STEPS = 16


def detect_cycle(values: np.ndarray, max_cycle: int = 400) -> int:
    """The cycle length shared by the columns of ``values`` (T, C), or 1 when none has one.

    Each column gets :func:`tidecast.models.seasonality.detect_period` (the highest autocorrelation peak of its first
    differences, preferring the fundamental over its multiples, and a multiple only where a backtest of the mean
    cycle in level space says it forecasts better); the most common answer wins, ties going to the shorter
    cycle. A vote keeps one channel with a stronger multiple from overriding the group's cycle. On 15-minute
    data the backtest is what keeps 96 where the autocorrelation alone votes 192 or 288 (ETTh1 upsampled, see
    ``tests/test_seasonality.py``).

    >>> t = np.arange(24 * 60)
    >>> noise = np.random.default_rng(0).normal(0, 0.1, (t.size, 3))
    >>> detect_cycle(np.sin(2 * np.pi * t / 24)[:, None] + noise)
    24
    """
    values = np.asarray(values, dtype=float)
    values = values[:, None] if values.ndim == 1 else values
    found = [detect_period(values[:, c], max_period=max_cycle) for c in range(values.shape[1])]
    votes = Counter(p for p in found if p)
    if not votes:
        return 1
    return min(votes, key=lambda p: (-votes[p], p))


class CycleNetForecaster(WarmStarted):
    """CycleNet over a group of series (rows), warm-started in batch and then learning online.

    Parameters
    ----------
    horizon
        Forecast length H (the network's output length).
    lookback
        Input length L (96 in the paper).
    cycle
        Cycle length W; ``None`` detects it at the warm start (:func:`detect_cycle`, up to ``max_cycle``).
    backbone, hidden, instance_norm
        ``"linear"`` or ``"mlp"`` (L->hidden->H with ReLU), and per-window normalisation, as in the paper.
    warm_start
        Observations a row needs before the first fit (the group is fitted on every row that has them).
    val_fraction
        Share of the warm-start observations held out for validation (0: no early stopping).
    calib_holdout
        Share of the validation observations (the last ones) kept out of early stopping; the fitted network's
        residuals there seed the calibrators (0, the default: early stopping uses all of them, and the seeds are
        the residuals of its windows).
    lr, epochs, patience, batch_size
        The batch recipe; ``lr=None`` takes the paper's (0.01 Linear, 0.005 MLP).
    shuffled_val
        Score validation as the official CycleNet loader does (shuffled batches, the last partial one dropped)
        instead of over every window; see :class:`tidecast.models.cyclenet_net.BatchFit`.
    online
        Learn online after the warm start (``False``: a static model).
    online_lr
        Adam learning rate of the replay steps for the backbone.
    online_cycle_lr
        The same for the cycle table ``Q`` (``None``: ``online_lr``).
    replay_window
        Newest windows of each row kept for replay. Each row keeps
        ``max(warm_start, replay_window + lookback + horizon - 1)`` float64 values (about 66 kB a series with
        the defaults).
    replay_every, replay_steps, replay_batch
        Every ``replay_every`` learning rounds (grid time steps whose ``learn_many`` calls complete at least one
        window: the engine marks steps with :meth:`begin_step`, so a batch that cuts a time is one round), take
        ``replay_steps`` Adam steps on ``replay_batch`` windows each. Steps that do not fit the time budget
        are carried over, up to ``4 * replay_steps``; older debt is dropped rather than lagging.
    step_budget
        Seconds of replay training allowed per inline round; ``None`` (the default): every due step (at most
        ``4 * replay_steps``), so a replay gives the same forecasts and promotions however busy the machine (a
        time budget made them depend on its speed).
    defer
        Run the fit and replay steps in :meth:`maintenance` (True), inline (False), or inline until
        :meth:`maintenance` is called from another thread than :meth:`learn_many` (None).
    max_cycle
        Longest cycle :func:`detect_cycle` considers.
    input_limit
        A value further than this many scaler units from its window's median is an outlier: the network sees the
        median instead (``None``: off).
    loss_limit
        A replay window whose loss exceeds this multiple of the running mean window loss (or is not finite) is
        left out of the step and counted in ``skipped_windows_`` (``None``: only non-finite ones).
    seed
        Seeds the initial weights and every shuffle.
    persistence_half_life
        Serve a blend of the forecasts with the last value, weighted per series and step by the errors that
        matured, forgetting with this half-life in matured targets (:mod:`tidecast.models.persistence`; 0: off,
        the default). For series whose level wanders: on ETTh2's online protocol it beats both CycleNet and the
        last value at every horizon (README, "Retraining").
    bootstrap
        B bootstrap replicas (0: none): B more backbones and cycle tables, stacked
        (:mod:`tidecast.models.cyclenet_replicas`), fitted after the warm start on a Poisson(1)-weighted resample of
        its training windows for the main fit's best epoch count, then trained online on the same replay
        mini-batches with fresh Poisson(1) weights. :meth:`spread_many` gives their forecasts' standard
        deviation. The point forecasts are the same with or without them (the replicas draw from their own RNG).

    The online-learning defaults were chosen on the validation blocks of ETTh1 and ETTh2
    (``bench/cyclenet_stream.py --dev``): replay over a long history, a slow backbone (3e-5) and a faster cycle
    table (3e-3), two steps per round. Replaying only recent windows, or a faster backbone, hurt there.
    """

    name = "cyclenet"
    couples_rows = True  # one backbone for every row

    # Per-row state, in the row table ``_rows`` (see :meth:`_alloc`).
    _hist = Column("history", table="_rows")  # ring of the last ``_ring`` values
    _pos = Column("pos", table="_rows")  # ring slot the next value goes to
    _seen = Column("seen", table="_rows")  # values since the last reset
    _last_tick = Column("last_tick", table="_rows")
    _mean = Column("mean", table="_rows")  # the row's scaler
    _scale = Column("scale", table="_rows")
    _ready = Column("ready", table="_rows")  # served: scaler and cycle column set

    def __init__(
        self,
        horizon: int,
        lookback: int = 96,
        cycle: int | None = None,
        backbone: str = "linear",
        hidden: int = 512,
        instance_norm: bool = True,
        warm_start: int = 2000,
        val_fraction: float = 0.25,
        calib_holdout: float = 0.0,
        lr: float | None = None,
        epochs: int = 30,
        patience: int = 5,
        batch_size: int = 256,
        shuffled_val: bool = False,
        online: bool = True,
        online_lr: float = 3e-5,
        online_cycle_lr: float | None = 3e-3,
        replay_window: int = 8192,
        replay_every: int = 1,
        replay_steps: int = 2,
        replay_batch: int = 256,
        step_budget: float | None = None,
        defer: bool | None = None,
        max_cycle: int = 400,
        input_limit: float | None = 100.0,
        loss_limit: float | None = 100.0,
        seed: int = 0,
        bootstrap: int = 0,
        persistence_half_life: int = 0,
    ) -> None:
        self.horizon, self.lookback, self.cycle = horizon, lookback, cycle
        self.backbone, self.hidden, self.instance_norm = backbone, hidden, instance_norm
        self.warm_start, self.val_fraction, self.calib_holdout = warm_start, val_fraction, calib_holdout
        self.lr, self.epochs, self.patience, self.batch_size = lr, epochs, patience, batch_size
        self.shuffled_val = shuffled_val
        self.online, self.online_lr, self.online_cycle_lr = online, online_lr, online_cycle_lr
        self.replay_window, self.replay_every = replay_window, replay_every
        self.replay_steps, self.replay_batch, self.step_budget = replay_steps, replay_batch, step_budget
        self.defer, self.max_cycle, self.seed = defer, max_cycle, seed
        self.input_limit, self.loss_limit = input_limit, loss_limit
        check_bootstrap(bootstrap)
        self.bootstrap = bootstrap
        self.persistence_half_life = persistence_half_life
        self._check_params()
        # the forecasts served are blended with the last value (models/persistence.py); None: the model's own
        self._persistence = (PersistenceBlend(horizon, persistence_half_life) if persistence_half_life else None)
        self._lock = threading.RLock()  # row tables, replay order, serving weights
        self._train_lock = threading.Lock()  # the training copy and its optimiser
        self._deferred = bool(defer)
        self._learn_thread: int | None = None
        self._job: dict[str, Any] | None = None
        self._calibrations = CalibrationQueue()  # residuals for the engine's calibrators (not state)
        self._reset_model()
        self._alloc(0)

    # -- construction helpers -------------------------------------------------------------------------

    def _check_params(self) -> None:
        check_count("lookback", self.lookback, 2)
        check_count("hidden", self.hidden, high=MAX_UNITS)
        check_rate("lr", self.lr, optional=True)
        check_count("epochs", self.epochs)
        check_count("patience", self.patience, 0)
        check_count("batch_size", self.batch_size, high=MAX_BATCH)
        check_rate("online_lr", self.online_lr)
        check_rate("online_cycle_lr", self.online_cycle_lr, optional=True)
        check_count("replay_steps", self.replay_steps, 0)
        check_positive("step_budget", self.step_budget, optional=True, rule="seconds > 0")
        check_count("max_cycle", self.max_cycle, 2)
        require(self.defer is None or isinstance(self.defer, bool), "defer", self.defer, "True, False or None")
        check_positive("input_limit", self.input_limit, optional=True, rule="scaler units > 0")
        check_positive("loss_limit", self.loss_limit, optional=True, rule="a multiple > 0")
        if self.backbone not in ("linear", "mlp"):
            raise ValueError(f"backbone must be 'linear' or 'mlp', got {self.backbone!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        check_count("seed", self.seed, 0, high=MAX_SEED)
        if not 0.0 <= self.calib_holdout < 1.0:
            raise ValueError("calib_holdout must be in [0, 1)")
        self._check_warm_start()
        check_ticks("cycle", self.cycle, optional=True)
        if self.replay_window < 1 or self.replay_every < 1 or self.replay_batch < 1:
            raise ValueError("replay_window, replay_every and replay_batch must be >= 1")
        check_count("replay_batch", self.replay_batch, high=MAX_BATCH)
        if self.persistence_half_life < 0:
            raise ValueError("persistence_half_life must be >= 0 (0: no blend with the last value)")

    def _validation_problem(self, n_val: int) -> str | None:
        """Early stopping keeps a horizon of the validation part once the calibration holdout is taken out."""
        kept = n_val - int(round(n_val * self.calib_holdout))
        if kept < self.horizon:
            return (f"calib_holdout={self.calib_holdout} leaves early stopping fewer observations ({kept}) than the "
                    "horizon")
        return None

    def _warm_start_knobs(self) -> str:
        return (f"calib_holdout ({self.calib_holdout}), val_fraction ({self.val_fraction}), the horizon or the "
                "lookback")

    def _n_hold(self) -> int:
        """Validation observations kept out of early stopping (the calibration part)."""
        return int(round(self._n_val() * self.calib_holdout))

    def _reset_model(self) -> None:
        self.cycle_: int | None = self.cycle
        self.net_: CycleNet | None = None  # serving network
        self.fit_report_: dict[str, Any] = {}
        self._trainer: CycleNet | None = None
        self._opt: torch.optim.Adam | None = None
        self._rng = np.random.default_rng(self.seed)
        self.loss_ema_ = math.nan  # running mean loss of the windows replay steps learned from
        self.skipped_windows_ = 0  # replay windows left out of a step (loss not finite or beyond loss_limit)
        self._reset_rounds()
        # one reshuffled pass over the replay windows: slots -> (row, last tick)
        self._perm = np.zeros(0, dtype=np.int64)
        self._perm_rows = np.zeros(0, dtype=np.int64)
        self._perm_cum = np.zeros(0, dtype=np.int64)
        self._perm_last = np.zeros(0, dtype=np.int64)
        self._perm_rng: dict[str, Any] | None = None  # RNG state that drew the permutation (to redraw it)
        self._cursor = 0
        self.replicas_: Replicas | None = None  # serving replicas (bootstrap > 0, once fitted)
        self._online_replicas: OnlineReplicas | None = None  # their training copy and optimiser
        self._boot_rng = np.random.default_rng(self.seed + 1)  # replicas' Poisson weights: not the main RNG
        self._spread_cache: tuple[np.ndarray, int, np.ndarray] | None = None  # the last forecast's replica spread

    def _alloc(self, n: int) -> None:
        self._rows = RowTable(
            history=Field((self._ring,), np.float64, 0.0),
            pos=Field((), np.int64, 0),
            seen=Field((), np.int64, 0),
            last_tick=Field((), np.int64, 0),
            mean=Field((), np.float64, np.nan),
            scale=Field((), np.float64, np.nan),
            ready=Field((), np.bool_, False),
        )
        self.resize(n)

    # -- the table ------------------------------------------------------------------------------------

    @property
    def n_rows_(self) -> int:
        """Rows in use (the table may have room for more)."""
        return self._rows.n_rows

    @property
    def _cap(self) -> int:
        return self._rows.capacity

    def resize(self, n_rows: int) -> None:
        with self._lock:
            self._rows.resize(n_rows)
            if self._persistence is not None:
                self._persistence.resize(n_rows)
            if self.net_ is not None and self.net_.channels < self._cap:
                self.net_.grow(self._cap)
            if self.replicas_ is not None and self.replicas_.channels < self._cap:
                self.replicas_.grow(self._cap)

    def reset_rows(self, rows: np.ndarray) -> None:
        """Forget the history of ``rows``: their replay windows leave the buffer; scaler and ``Q`` column stay."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)  # torch.from_numpy refuses negative strides
        with self._lock:
            self._seen[rows] = 0
            self._spread_cache = None

    def drop_rows(self, rows: np.ndarray) -> None:
        """The rows' series moved to another process: end the current replay pass, whose plan names them (the
        next pass is drawn from the rows present then). Their per-row state is overwritten by the engine."""
        with self._lock:
            self._cursor = self._perm.size
        self._calibrations.discard(rows)

    def pop_calibration(self, horizon: int) -> Calibration | None:
        handed = self._calibrations.pop()
        if handed is None or horizon == self.horizon:
            return handed
        residuals = np.full((handed.rows.size, handed.n_steps, horizon), np.nan)  # beyond H the model is NaN
        k = min(horizon, self.horizon)
        residuals[..., :k] = handed.residuals[..., :k]
        return Calibration(handed.rows, residuals)

    def _last(self, rows: np.ndarray, n: int) -> np.ndarray:
        """The last ``n`` values of each row, oldest first (n <= ring size)."""
        idx = (self._pos[rows, None] - n + np.arange(n)) % self._ring
        return self._hist[rows[:, None], idx]

    def _replayable(self, rows: np.ndarray) -> np.ndarray:
        """How many complete windows of each row are in the replay buffer (0 for rows not served)."""
        n = np.minimum(self._seen[rows], self._ring) - self._window + 1
        return np.where(self._ready[rows], np.clip(n, 0, self.replay_window), 0)

    # -- learning -------------------------------------------------------------------------------------

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        # Windows are taken on the tick grid, so interpolated values are learned like real ones.
        rows = np.ascontiguousarray(rows, dtype=np.int64)  # torch.from_numpy refuses negative strides
        ticks = np.asarray(ticks, dtype=np.int64)
        if rows.size == 0:
            return
        self._learn_thread = threading.get_ident()
        self._spread_cache = None  # the rows' inputs move on
        with self._lock:
            if rows.max() >= self.n_rows_:
                self.resize(int(rows.max()) + 1)
            if self._persistence is not None:  # score the blend's forecasts whose target this is
                self._persistence.learn(rows, ticks, np.asarray(values, dtype=float), filled)
            self._hist[rows, self._pos[rows]] = np.asarray(values, dtype=float)
            self._pos[rows] = (self._pos[rows] + 1) % self._ring
            self._seen[rows] += 1
            self._last_tick[rows] = ticks
            if self.net_ is None:
                if self._job is None and np.any(self._seen[rows] >= self.warm_start):
                    self._job = self._start_fit()
            else:
                if self.online and np.any(self._replayable(rows) > 0):  # new windows joined the buffer
                    self._count_round()
                self._join(rows[~self._ready[rows] & (self._seen[rows] >= self._window)])
        if not self._deferred:
            self._work(math.inf, math.inf if self.step_budget is None else self.step_budget)

    def _join(self, rows: np.ndarray) -> None:
        """Serve rows that arrived after the fit: scaler from their history, ``Q`` column from zero; a backtest of
        the serving network over that history seeds their calibrators."""
        for r in rows:
            hist = self._last(np.array([r]), int(min(self._seen[r], self._ring)))[0]
            self._mean[r], self._scale[r] = hist.mean(), _safe_std(hist)
            std = ((hist - self._mean[r]) / self._scale[r])[:, None]
            residuals = self._backtest(self.net_, std, self._last_tick[r : r + 1], np.array([r]), self.lookback)
            self._calibrations.put(Calibration(np.array([r]), residuals * self._scale[r]))
        self._ready[rows] = True

    def _backtest(self, net: CycleNet, std: np.ndarray, last: np.ndarray, cols: np.ndarray,
                  first_target: int) -> np.ndarray:
        """Residuals (C, T - first_target, H), in scaler units, of ``net``'s forecasts over the columns of ``std``
        (T, C; column c ends at tick ``last[c]``, uses ``Q`` column ``cols[c]``), for the targets from index
        ``first_target`` on, laid out as :class:`~tidecast.models.base.Calibration` residuals."""
        t_len, n_cols = std.shape
        lb, hz = self.lookback, self.horizon
        out = np.full((n_cols, t_len - first_target, hz), np.nan)
        origins = np.arange(max(first_target - hz, lb - 1), t_len - 1)
        if origins.size == 0 or net is None:
            return out
        idx = origins[:, None] - lb + 1 + np.arange(lb)[None, :]  # (O, L)
        windows = std.T[:, idx].reshape(-1, lb)  # (C * O, L), column-major
        x = torch.from_numpy(self._sanitise(windows).astype(np.float32))[:, :, None]
        start = last[:, None] - t_len + 1 + idx[None, :, 0]  # (C, O): tick of each window's first step
        phase = torch.from_numpy((start % self.cycle_).reshape(-1))
        col = torch.from_numpy(np.repeat(cols, origins.size))[:, None]
        with torch.inference_mode():
            pred = np.concatenate([net(x[i : i + 4096], phase[i : i + 4096], col[i : i + 4096])[:, :, 0].numpy()
                                   for i in range(0, x.shape[0], 4096)]).reshape(n_cols, origins.size, hz)
        for h in range(1, hz + 1):
            target = origins + h
            ok = (target >= first_target) & (target < t_len)
            out[:, target[ok] - first_target, h - 1] = std[target[ok]].T - pred[:, ok, h - 1]
        return out

    # -- the warm-start fit -----------------------------------------------------------------------------

    def _start_fit(self) -> dict[str, Any]:
        """Snapshot the warm rows and set up the batch recipe on them (called under the lock)."""
        n, n_val, n_hold = self.warm_start, self._n_val(), self._n_hold()
        cohort = np.flatnonzero(self._seen[: self.n_rows_] >= n)
        values = self._last(cohort, n).T  # (n, C), oldest first
        n_train = n - n_val
        mean, scale = values[:n_train].mean(axis=0), _safe_std(values[:n_train], axis=0)
        cycle = self.cycle_ or detect_cycle(values[:n_train], self.max_cycle)
        std = (values - mean) / scale
        last = self._last_tick[cohort]
        aligned = bool(np.all(last == last[0]))
        ticks = last[0] - n + 1 + np.arange(n)
        lb, h = self.lookback, self.horizon
        # a step sees batch_size windows of every series, as in the paper, up to MAX_BATCH_WINDOWS in all
        origins = max(1, min(self.batch_size, MAX_BATCH_WINDOWS // cohort.size))
        es_end = n - n_hold  # early stopping sees targets before the calibration part only
        if aligned:  # the paper's layout: all series of a window in one sample
            train = Windows.contiguous(std[:n_train], ticks[:n_train], cycle, lb, h)
            val = None
            if n_val:
                val = Windows.contiguous(std[n_train - lb : es_end], ticks[n_train - lb : es_end], cycle, lb, h)
            batch = origins
        else:  # series on different clocks: one-series samples, as many series-windows per batch
            train = _single_windows(std[:n_train], last - n_val, cycle, lb, h)
            val = _single_windows(std[n_train - lb : es_end], last - n_hold, cycle, lb, h) if n_val else None
            batch = origins * cohort.size
        net = build_net(lb, h, cycle, cohort.size, self.backbone, self.hidden, self.instance_norm, self.seed)
        lr = self.lr if self.lr is not None else DEFAULT_LR[self.backbone]
        fit = BatchFit(net, train, val, lr=lr, epochs=self.epochs, patience=self.patience, batch_size=batch,
                       seed=self.seed, shuffled_val=self.shuffled_val)
        return {"fit": fit, "net": net, "rows": cohort, "mean": mean, "scale": scale, "cycle": cycle, "std": std,
                "last": last, "calib_from": n - (n_hold or n_val), "train": train, "batch": batch, "lr": lr}

    def _fit_replicas(self, job: dict[str, Any], budget: float) -> bool:
        """The replicas' warm-start fit (after the main one, for its best epoch count); True when done."""
        if "replica_fit" not in job:
            net: CycleNet = job["net"]
            reps = Replicas(self.bootstrap, self.lookback, self.horizon, job["cycle"], net.channels, self.backbone,
                            self.hidden, self.instance_norm, self.seed)
            epochs = max(1, int(job["fit"].report.get("best_epoch") or job["fit"].report["epochs"]))
            job["replicas"] = reps
            job["replica_fit"] = ReplicaFit(reps, job["train"], lr=job["lr"], epochs=epochs,
                                            batch_size=job["batch"], seed=self.seed)
        return job["replica_fit"].run(max(budget, 0.0))

    def _install(self, job: dict[str, Any]) -> None:
        """Swap the fitted network in: its backbone, and its ``Q`` columns into the rows' columns. Cohort rows whose
        state was replaced while the fit ran (a series dropped and its row reused, or one restored into it) are
        left out: the snapshot's scaler, cycle column and residuals are another series' (``import_rows`` records
        them); they join as series arriving after the fit do."""
        fitted: CycleNet = job["net"]
        keep = self._kept(job)
        rows, kept = job["rows"][keep], torch.as_tensor(np.flatnonzero(keep))
        with self._lock:
            net = build_net(self.lookback, self.horizon, job["cycle"], self._cap, self.backbone, self.hidden,
                            self.instance_norm, self.seed)
            net.backbone.load_state_dict(fitted.backbone.state_dict())
            with torch.no_grad():
                net.cycle_table[:, torch.as_tensor(rows)] = fitted.cycle_table[:, kept]
            net.eval()
            self.cycle_ = job["cycle"]
            self._mean[rows], self._scale[rows] = job["mean"][keep], job["scale"][keep]
            self._ready[rows] = True
            self.net_ = net
            self.fit_report_ = {**job["fit"].report, "cycle": job["cycle"], "rows": int(rows.size)}
            self._new_trainer()
            if job["calib_from"] < self.warm_start and rows.size:  # held-out validation residuals seed calibrators
                cols = np.flatnonzero(keep)
                residuals = self._backtest(fitted, job["std"][:, cols], job["last"][cols], cols, job["calib_from"])
                self._calibrations.put(Calibration(rows, residuals * job["scale"][keep][:, None, None]))
            if self.bootstrap:
                self.replicas_ = Replicas(self.bootstrap, self.lookback, self.horizon, job["cycle"], self._cap,
                                          self.backbone, self.hidden, self.instance_norm, self.seed)
                self.replicas_.load_from(job["replicas"], torch.as_tensor(rows), kept)
                self.replicas_.eval()
                self._new_replica_trainer()
            late = np.flatnonzero(~self._ready[: self.n_rows_] & (self._seen[: self.n_rows_] >= self._window))
            self._join(late)
            self._job = None

    def _new_replica_trainer(self) -> None:
        cycle_lr = self.online_lr if self.online_cycle_lr is None else self.online_cycle_lr
        self._online_replicas = OnlineReplicas(self.replicas_, self.online_lr, cycle_lr)

    def _new_trainer(self) -> None:
        self._trainer = copy.deepcopy(self.net_)
        self._trainer.train()
        cycle_lr = self.online_lr if self.online_cycle_lr is None else self.online_cycle_lr
        groups = [{"params": list(self._trainer.backbone.parameters()), "lr": self.online_lr},
                  {"params": [self._trainer.cycle_table], "lr": cycle_lr}]
        self._opt = make_adam(groups)  # fused where this torch has the kernel
        for p in self._trainer.parameters():  # explicit zero state, so export/import is uniform
            self._opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}

    # -- deferred work ----------------------------------------------------------------------------------

    def maintenance(self, budget_seconds: float) -> None:
        """Advance the warm-start fit and take due replay steps, for about ``budget_seconds``. With
        ``defer=False`` the work is inline: a call from another thread than :meth:`learn_many`'s does nothing, so
        the result does not depend on which thread got to a replay step first."""
        elsewhere = self._learn_thread not in (None, threading.get_ident())
        if self.defer is False and elsewhere:
            return
        if self.defer is None and elsewhere:
            self._deferred = True  # a worker thread does the heavy work from now on
        self._work(budget_seconds, budget_seconds)

    def _fit_extras(self, job: dict[str, Any], budget: float) -> bool:
        return not self.bootstrap or self._fit_replicas(job, budget)

    def _replay_step(self) -> None:
        """One Adam step of the training copy on the next reshuffled mini-batch, then publish the weights."""
        with self._lock:
            self._due -= 1
            if self._trainer.channels < self.net_.channels:
                self._grow_trainer(self.net_.channels)
            online = self._online_replicas
            if online is not None and online.trainer.channels < self.replicas_.channels:
                online.grow_trainer(self.replicas_.channels)
            batch = self._next_batch()
        if batch is None:
            return
        x, y, phase, cols = batch
        # A non-finite value would leak NaN into every gradient (0 x inf), so such windows never enter the graph.
        finite = (torch.isfinite(x).all(dim=2).all(dim=1) & torch.isfinite(y).all(dim=2).all(dim=1))
        if not bool(finite.all()):
            self.skipped_windows_ += int((~finite).sum())
            x, y, phase, cols = x[finite], y[finite], phase[finite], cols[finite]
            if x.shape[0] == 0:
                return
        squared = (self._trainer(x, phase, cols) - y) ** 2
        losses = squared.detach().mean(dim=(1, 2)).numpy()
        keep = self._admit(losses)
        if not keep.any():
            return
        chosen = torch.from_numpy(keep)
        if keep.all():
            loss = torch.mean(squared)
        elif np.isfinite(losses).all():
            loss = torch.mean(squared[chosen])
        else:  # an overflow inside the network: redo the forward without those windows (their graph holds NaN)
            loss = torch.mean((self._trainer(x[chosen], phase[chosen], cols[chosen]) - y[chosen]) ** 2)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self._opt.step()
        if online is not None:  # the replicas learn the windows it admitted, each weighted by a fresh Poisson(1)
            if not keep.all():  # (all of them, the refused ones too, made the replicas' weights NaN)
                x, y, phase, cols = x[chosen], y[chosen], phase[chosen], cols[chosen]
            online.step(x, y, phase, cols, self._boot_rng)
        with self._lock, torch.no_grad():
            for dst, src in zip(self.net_.parameters(), self._trainer.parameters(), strict=True):
                if dst.shape == src.shape:
                    dst.copy_(src)
                else:  # the serving Q grew meanwhile: its new columns are still zero
                    dst[:, : src.shape[1]] = src
            if online is not None:
                online.publish()

    #: Rate of the running mean window loss (memory ~ 100 replay steps).
    _loss_rate = 0.01

    def _admit(self, losses: np.ndarray) -> np.ndarray:
        """Which windows a replay step may learn from: finite losses within ``loss_limit`` x the running mean
        (the batch's median before there is one, which one outlier cannot move). Counts the others and moves
        the running mean with the admitted ones."""
        keep = np.isfinite(losses)
        if not keep.any():
            self.skipped_windows_ += losses.size
            return keep
        reference = self.loss_ema_ if np.isfinite(self.loss_ema_) else float(np.median(losses[keep]))
        if self.loss_limit is not None:
            keep &= losses <= self.loss_limit * max(reference, 1e-12)
        self.skipped_windows_ += int(losses.size - keep.sum())
        if keep.any():
            admitted = float(losses[keep].mean())
            self.loss_ema_ = (admitted if not np.isfinite(self.loss_ema_)
                              else self.loss_ema_ + self._loss_rate * (admitted - self.loss_ema_))
        return keep

    def _sanitise(self, z: np.ndarray) -> np.ndarray:
        """Windows ``z`` (n, w) in scaler units with outliers (beyond ``input_limit`` from the window's median)
        replaced by that median; the same array when there is none (the common case costs two reductions)."""
        if self.input_limit is None or z.size == 0:
            return z
        suspect = np.flatnonzero(z.max(axis=1) - z.min(axis=1) > self.input_limit)
        if suspect.size == 0:
            return z
        z = z.copy()
        part = z[suspect]
        med = np.median(part, axis=1, keepdims=True)
        z[suspect] = np.where(np.abs(part - med) > self.input_limit, med, part)
        return z

    def _reshuffle(self) -> None:
        """Start a pass: a random order of every window now in the buffer (row, last tick)."""
        rows = np.arange(self.n_rows_)
        counts = self._replayable(rows)
        keep = counts > 0
        self._perm_rows, self._perm_last = rows[keep], self._last_tick[: self.n_rows_][keep].copy()
        self._perm_cum = np.cumsum(counts[keep])
        total = int(self._perm_cum[-1]) if self._perm_cum.size else 0
        self._perm_rng = copy.deepcopy(self._rng.bit_generator.state)
        self._perm = self._rng.permutation(total)
        self._cursor = 0

    def _next_batch(self) -> tuple[torch.Tensor, ...] | None:
        """The next ``replay_batch`` windows of the pass (a new pass when this one runs short), gathered from
        the history rings and standardised; windows that left the buffer since the pass began are skipped."""
        if self._cursor + self.replay_batch > self._perm.size:
            self._reshuffle()
        slots = self._perm[self._cursor : self._cursor + self.replay_batch]
        self._cursor += slots.size
        if slots.size == 0:
            return None
        which = np.searchsorted(self._perm_cum, slots, side="right")
        age0 = slots - np.where(which > 0, self._perm_cum[which - 1], 0)  # 0: the newest window then
        rows = self._perm_rows[which]
        age = self._last_tick[rows] - (self._perm_last[which] - age0)  # its age now
        ok = (age >= 0) & (age < self._replayable(rows))
        rows, age = rows[ok], age[ok]
        if rows.size == 0:
            return None
        w = self._window
        idx = (self._pos[rows, None] - age[:, None] - w + np.arange(w)) % self._ring
        values = self._sanitise((self._hist[rows[:, None], idx] - self._mean[rows, None]) / self._scale[rows, None])
        values = torch.from_numpy(values.astype(np.float32))[:, :, None]
        phase = torch.from_numpy((self._last_tick[rows] - age - w + 1) % self.cycle_)
        return values[:, : self.lookback], values[:, self.lookback :], phase, torch.from_numpy(rows)[:, None]

    def _grow_trainer(self, channels: int) -> None:
        """Grow the training copy's ``Q`` and carry its Adam moments over (new columns start at zero)."""
        old = self._trainer.cycle_table
        self._trainer.grow(channels)
        new = self._trainer.cycle_table
        for group in self._opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self._opt.state.pop(old)
        extra = new.shape[1] - old.shape[1]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.cat([state[key], torch.zeros(new.shape[0], extra)], dim=1)
        self._opt.state[new] = state

    # -- retraining (the engine's hook: stream/retrain.py) ---------------------------------------------------

    #: Per-row state a refit learns (kept when a candidate's rows are re-synced from its incumbent).
    learned_row_keys = ("cycle_row", "cycle_adam_m", "cycle_adam_v")

    def refit(self, recent: int, epochs: int = 5, lr: float = 1e-4, cycle_lr: float = 3e-3,
              batch_size: int = 256, min_batch_size: int = 64) -> dict[str, Any]:
        """Fine-tune this (copied) model in place on the windows ending in each served row's last ``recent``
        steps, warm-started from its weights: ``epochs`` reshuffled passes of Adam (fresh moments) on backbone and
        cycle table, then publish. Returns what it did.

        ``batch_size`` 256 was chosen on bench/retrain.py's dev streams, (a): dev MSE 0.716 / 0.714 / 0.715 / 0.712
        at 64 / 128 / 256 / 512 windows a step, training seconds 0.70 / 0.48 / 0.26 / 0.18 of always-online's
        replay steps: a job's cost is its steps, and larger batches lost nothing there (thousands of windows a job).
        A smaller job takes smaller batches, down to ``min_batch_size`` (the size before), so that an epoch keeps
        :data:`REFIT_STEPS` steps where it can: at 256 windows a step, three series' 200 windows would be one step an
        epoch and the refit would hardly move."""
        check_rate("lr", lr)  # a negative rate ran gradient ascent: the gate caught it, after a whole job
        check_rate("cycle_lr", cycle_lr)
        check_count("batch_size", batch_size)
        check_count("min_batch_size", min_batch_size)
        with self._train_lock:
            with self._lock:
                if self.net_ is None:
                    raise ValueError("not fitted yet: nothing to refit")
                rows = np.flatnonzero(self._ready[: self.n_rows_])
                counts = np.minimum(self._replayable(rows), max(int(recent), 1))
                rows, counts = rows[counts > 0], counts[counts > 0]
                if self._trainer.channels < self.net_.channels:
                    self._grow_trainer(self.net_.channels)
            if not rows.size:
                raise ValueError("no complete window since the change point")
            pair_rows = np.repeat(rows, counts)
            ages = np.concatenate([np.arange(c) for c in counts])
            groups = [{"params": list(self._trainer.backbone.parameters()), "lr": lr},
                      {"params": [self._trainer.cycle_table], "lr": cycle_lr}]
            opt = make_adam(groups)
            steps = 0
            batch_size = max(1, min(batch_size, max(min_batch_size, -(-pair_rows.size // REFIT_STEPS))))
            for _ in range(epochs):
                order = self._rng.permutation(pair_rows.size)
                for start in range(0, order.size, batch_size):
                    pick = order[start : start + batch_size]
                    x, y, phase, cols = self._windows_at(pair_rows[pick], ages[pick])
                    # as a replay step: a non-finite window never enters the graph, a non-finite loss never
                    # steps (one absurd value in one series' recent history made the candidate's backbone NaN)
                    finite = torch.isfinite(x).all(dim=2).all(dim=1) & torch.isfinite(y).all(dim=2).all(dim=1)
                    if not bool(finite.all()):
                        x, y, phase, cols = x[finite], y[finite], phase[finite], cols[finite]
                    if x.shape[0] == 0:
                        continue
                    loss = torch.mean((self._trainer(x, phase, cols) - y) ** 2)
                    if not bool(torch.isfinite(loss)):
                        continue
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
            with self._lock, torch.no_grad():
                for dst, src in zip(self.net_.parameters(), self._trainer.parameters(), strict=True):
                    dst[..., : src.shape[-1]] = src
        return {"windows": int(pair_rows.size), "steps": steps}

    def _windows_at(self, rows: np.ndarray, ages: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Standardised (input, target, phase, column) of the windows ``ages`` steps before each row's newest."""
        w = self._window
        idx = (self._pos[rows, None] - ages[:, None] - w + np.arange(w)) % self._ring
        values = self._sanitise((self._hist[rows[:, None], idx] - self._mean[rows, None]) / self._scale[rows, None])
        values = torch.from_numpy(values.astype(np.float32))[:, :, None]
        phase = torch.from_numpy((self._last_tick[rows] - ages - w + 1) % self.cycle_)
        return values[:, : self.lookback], values[:, self.lookback :], phase, torch.from_numpy(rows)[:, None]

    def blend(self, other: CycleNetForecaster, weight: float) -> None:
        """Backward-compatible weight interpolation (BCWI): every weight becomes ``weight * mine + (1 - weight) *
        other's`` (backbone and cycle table; ``other`` is the incumbent this model was copied from)."""
        with self._train_lock, self._lock, other._lock, torch.no_grad():
            if other.net_ is None or self.net_ is None:
                raise ValueError("both models must be fitted to blend")
            for net in (self.net_, self._trainer):
                for mine, theirs in zip(net.parameters(), other.net_.parameters(), strict=True):
                    k = min(mine.shape[-1], theirs.shape[-1])
                    mine[..., :k] = weight * mine[..., :k] + (1.0 - weight) * theirs[..., :k]

    # -- forecasting ------------------------------------------------------------------------------------

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        """Raw-scale forecasts (n, horizon); NaN for rows not served yet and beyond the model's horizon. With
        replicas, their spread is computed in the same pass (same inputs) and kept for :meth:`spread_many`."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)  # torch.from_numpy refuses negative strides
        out = np.full((rows.size, horizon), np.nan)
        spread = np.full((rows.size, horizon), np.nan) if self.bootstrap else None
        self._spread_cache = None
        with self._lock:
            if self.net_ is None or rows.size == 0:
                return out
            inside = rows < self.n_rows_
            ok = np.zeros(rows.size, dtype=bool)
            ok[inside] = self._ready[rows[inside]] & (self._seen[rows[inside]] >= self.lookback)
            r = rows[ok]
            if r.size == 0:
                return out
            mean, scale = self._mean[r, None], self._scale[r, None]
            z = self._sanitise((self._last(r, self.lookback) - mean) / scale)
            x = torch.from_numpy(z.astype(np.float32))[:, :, None]
            phase = torch.from_numpy((self._last_tick[r] - self.lookback + 1) % self.cycle_)
            cols = torch.from_numpy(r)[:, None]
            with torch.inference_mode():  # one pass for the net and its replicas
                y, spread_std = serve_windows(self.net_, self.replicas_ if spread is not None else None, x, phase, cols)
                y = y.numpy()
            k = min(horizon, self.horizon)
            out[ok, :k] = y[:, :k] * scale + mean
            weight = 1.0
            if self._persistence is not None:
                out[ok] = self._persistence.combine(r, self._last_tick[r], self._last(r, 1)[:, 0], out[ok])
                weight = self._persistence.weights(r)[:, :k]
        if spread is not None and self.replicas_ is not None:
            # the last value has no replicas' spread (weight: the network's share of a blend)
            spread_k = spread_std.numpy()[:, :k] * scale * weight
            if ok.all():  # the common case, without a boolean mask's gather and scatter
                spread[:, :k] = spread_k
            else:
                spread[ok, :k] = spread_k
            self._spread_cache = (rows.copy(), horizon, spread)
        return out

    def spread_many(self, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        """The replicas' standard deviation per (row, horizon), in the series' units (one batched forward over
        the replicas); NaN where :meth:`forecast_many` is NaN; ``None`` without replicas. Right after
        :meth:`forecast_many` for the same rows it is what that call computed."""
        if not self.bootstrap:
            return None
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        cache = self._spread_cache
        if cache is None or cache[1] != horizon or not np.array_equal(cache[0], rows):
            self.forecast_many(rows, horizon)
            cache = self._spread_cache
        if cache is None:
            return np.full((rows.size, horizon), np.nan)
        return cache[2].copy()

    # -- state ------------------------------------------------------------------------------------------

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        rows = np.ascontiguousarray(rows, dtype=np.int64)  # torch.from_numpy refuses negative strides
        with self._train_lock, self._lock:
            if self.net_ is not None and self._trainer.channels < self.net_.channels:
                self._grow_trainer(self.net_.channels)
            order = (self._pos[rows, None] + np.arange(self._ring)) % self._ring  # oldest first
            state = {
                "history": self._hist[rows[:, None], order],
                **self._rows.export_rows(rows, ("seen", "last_tick", "mean", "scale")),
                "ready": self._ready[rows].astype(np.uint8),
            }
            if self._persistence is not None:
                state.update(self._persistence.export_rows(rows))
            if self.net_ is not None:
                cols = torch.from_numpy(rows)
                state["cycle_row"] = self.net_.cycle_table.detach()[:, cols].T.numpy().copy()
                st = self._opt.state[self._trainer.cycle_table]
                state["cycle_adam_m"] = st["exp_avg"][:, cols].T.numpy().copy()
                state["cycle_adam_v"] = st["exp_avg_sq"][:, cols].T.numpy().copy()
            if self._online_replicas is not None:
                online = self._online_replicas
                if online.trainer.channels < self.replicas_.channels:
                    online.grow_trainer(self.replicas_.channels)
                state.update(online.export_rows(torch.from_numpy(rows)))
        return state

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.int64)  # torch.from_numpy refuses negative strides
        with self._train_lock, self._lock:
            if rows.size and rows.max() >= self.n_rows_:
                self.resize(int(rows.max()) + 1)
            self._note_replaced(rows)  # a pending fit must not install its snapshot's state over these rows
            hist = np.asarray(state["history"], dtype=float)
            if hist.shape[1] != self._ring:
                raise ValueError(f"history length {hist.shape[1]} != this model's ring ({self._ring})")
            self._spread_cache = None
            self._rows.import_rows(rows, {**state, "history": hist, "pos": np.zeros(rows.size, np.int64),
                                          "ready": np.asarray(state["ready"]).astype(bool)})
            if self._persistence is not None:
                self._persistence.import_rows(rows, state)
            if self.net_ is None:
                if "cycle_row" in state:
                    raise ValueError("import_shared must come before import_rows for a fitted model")
                return
            if self._trainer.channels < self.net_.channels:
                self._grow_trainer(self.net_.channels)
            # A row exported before any fit (e.g. a blank row handed to a new series) has no cycle column yet:
            # it starts from zero, like a series that joins after the fit, not from the column's last owner.
            width = self.net_.cycle_table.shape[0]
            zeros = np.zeros((rows.size, width), np.float32)
            q_rows = np.asarray(state.get("cycle_row", zeros), dtype=np.float32)
            cols = torch.from_numpy(rows)
            st = self._opt.state[self._trainer.cycle_table]
            with torch.no_grad():
                q = torch.from_numpy(q_rows).T
                self.net_.cycle_table[:, cols] = q
                self._trainer.cycle_table[:, cols] = q
                for key, name in (("exp_avg", "cycle_adam_m"), ("exp_avg_sq", "cycle_adam_v")):
                    moments = np.asarray(state.get(name, zeros), dtype=np.float32)
                    st[key][:, cols] = torch.from_numpy(moments).T
            if self._online_replicas is not None:
                online = self._online_replicas
                if online.trainer.channels < self.replicas_.channels:
                    online.grow_trainer(self.replicas_.channels)
                online.import_rows(cols, state)

    def export_shared(self) -> tuple[ArrayDict, dict[str, Any]]:
        with self._train_lock, self._lock:
            meta: dict[str, Any] = {
                **self._shared_meta("cyclenet"),
                "cursor": self._cursor,
                "perm_rng": self._perm_rng,
                "loss_ema": self.loss_ema_ if np.isfinite(self.loss_ema_) else None,
                "skipped_windows": self.skipped_windows_,
                "boot_rng": self._boot_rng.bit_generator.state,
                "replicas": self.replicas_ is not None,
            }
            # the pass's permutation is redrawn on import from the RNG state that drew it: O(rows), not O(windows)
            arrays: ArrayDict = {"replay_rows": self._perm_rows.copy(), "replay_cum": self._perm_cum.copy(),
                                 "replay_last": self._perm_last.copy()}
            if self.net_ is None:
                return arrays, meta
            for name, p in self._trainer.backbone.named_parameters():
                st = self._opt.state[p]
                arrays[f"backbone.{name}"] = p.detach().numpy().copy()
                arrays[f"adam_m.{name}"] = st["exp_avg"].numpy().copy()
                arrays[f"adam_v.{name}"] = st["exp_avg_sq"].numpy().copy()
            arrays["adam_step"] = np.array([float(self._opt.state[self._trainer.cycle_table]["step"])])
            if self._online_replicas is not None:
                arrays.update(self._online_replicas.export_shared())
        return arrays, meta

    def import_shared(self, arrays: ArrayDict, meta: dict[str, Any]) -> None:
        self._check_shared_meta(meta, "cyclenet", ("horizon", "lookback", "backbone", "hidden", "instance_norm",
                                                   "warm_start", "replay_window"))
        saved = meta["params"].get("bootstrap") or 0
        if saved and self.bootstrap and saved != self.bootstrap:  # (torch's size mismatch otherwise)
            raise ValueError(f"state has bootstrap={saved} replicas, this model {self.bootstrap}")
        with self._train_lock, self._lock:
            self._job = None
            self._reset_model()
            self.resize(int(meta["n_rows"]))
            self.cycle_ = meta["cycle"]
            self._rounds, self._due, self._cursor = int(meta["rounds"]), int(meta["due"]), int(meta["cursor"])
            self._import_step(meta)
            self._rng.bit_generator.state = meta["rng"]
            self.fit_report_ = meta.get("fit_report", {})
            loss_ema = meta.get("loss_ema")  # absent in state saved before the loss filter: start afresh
            self.loss_ema_ = math.nan if loss_ema is None else float(loss_ema)
            self.skipped_windows_ = int(meta.get("skipped_windows", 0))
            if "boot_rng" in meta:
                self._boot_rng.bit_generator.state = meta["boot_rng"]
            self._perm_rng = meta.get("perm_rng")
            self._perm_rows = np.asarray(arrays["replay_rows"], dtype=np.int64).copy()
            self._perm_cum = np.asarray(arrays["replay_cum"], dtype=np.int64).copy()
            self._perm_last = np.asarray(arrays["replay_last"], dtype=np.int64).copy()
            if self._perm_rng is not None:
                redraw = np.random.default_rng()
                redraw.bit_generator.state = self._perm_rng
                self._perm = redraw.permutation(int(self._perm_cum[-1]) if self._perm_cum.size else 0)
            if not meta["fitted"]:
                return
            net = build_net(self.lookback, self.horizon, self.cycle_, self._cap, self.backbone, self.hidden,
                            self.instance_norm, self.seed)
            with torch.no_grad():
                for name, p in net.backbone.named_parameters():
                    p.copy_(torch.from_numpy(np.asarray(arrays[f"backbone.{name}"])))
            net.eval()
            self.net_ = net
            self._new_trainer()
            step = torch.tensor(float(np.asarray(arrays["adam_step"])[0]))
            for name, p in self._trainer.backbone.named_parameters():
                st = self._opt.state[p]
                st["exp_avg"].copy_(torch.from_numpy(np.asarray(arrays[f"adam_m.{name}"])))
                st["exp_avg_sq"].copy_(torch.from_numpy(np.asarray(arrays[f"adam_v.{name}"])))
            for p in self._trainer.parameters():
                self._opt.state[p]["step"] = step.clone()
            if self.bootstrap:  # saved without replicas: they restart from their seeds' weights and zero columns
                self.replicas_ = Replicas(self.bootstrap, self.lookback, self.horizon, self.cycle_, self._cap,
                                          self.backbone, self.hidden, self.instance_norm, self.seed)
                self.replicas_.eval()
                self._new_replica_trainer()
                if meta.get("replicas") and "boot_adam_step" in arrays:
                    self._online_replicas.import_shared(arrays)


def build(horizon: int, **params: Any) -> CycleNetForecaster:
    """Registry factory: ``build(horizon, lookback=96, cycle=None, backbone="linear", warm_start=2000, ...)``.

    See :class:`CycleNetForecaster` for every parameter.
    """
    return CycleNetForecaster(horizon=horizon, **params)


make = build


def _safe_std(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Population standard deviation (as StandardScaler), 1 where a series is constant."""
    std = np.std(values, axis=axis)
    return np.where(std > 0, std, 1.0) if axis is not None else (float(std) if std > 0 else 1.0)


def _single_windows(
    std: np.ndarray, last_ticks: np.ndarray, cycle: int, lookback: int, horizon: int
) -> Windows:
    """One-channel windows of each column of ``std`` (T, C) end to end; column c ends at ``last_ticks[c]``."""
    t, c = std.shape
    per = max(t - lookback - horizon + 1, 0)
    starts = (np.arange(c)[:, None] * t + np.arange(per)[None, :]).ravel()
    ticks = (last_ticks[:, None] - t + 1 + np.arange(per)[None, :]).ravel()
    cols = torch.as_tensor(np.repeat(np.arange(c), per))[:, None]
    return Windows(torch.as_tensor(std.T.reshape(-1, 1), dtype=torch.float32), starts, ticks % cycle, cols)
