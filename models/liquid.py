"""A liquid forecaster: a closed-form continuous-time (CfC) cell with one hidden state per series.

The cell (Hasani et al., "Closed-form continuous-time neural networks", Nature Machine Intelligence 2022) is the
closed-form approximation of a liquid time-constant network. From the input ``x`` and the previous state ``s``
a shared backbone computes two tanh heads ``g`` and ``k`` and a time gate; after ``dt`` time units the state is

    s' = (1 - gate) * g + gate * k,    gate = sigmoid(a * dt + b),

with ``a`` and ``b`` linear maps of the backbone's output. ``dt`` is a real input: a step of two ticks is not two
steps of one. :class:`CfCCell` is that cell (the default, gated variant of the paper), :class:`LiquidNet` adds a
direct multi-horizon head.

:class:`CfCForecaster` serves it to a group of series (registry name ``"cfc"``):

* **One network per model group, one state per series.** Every row (series) owns a hidden state vector that the
  shared cell advances once per real observation, in one batched call per engine round; a forecast reads the
  H steps at once from the current state through the head (the lookback is never re-encoded to forecast).
* **Time from the ticks.** ``dt`` is the tick difference between two real observations. Ticks the engine filled
  into a short gap (``learn_many(..., filled=mask)``) are skipped: the next real value advances the state by the
  whole gap. A long gap is not reset either: the state takes one closed-form step of the gap's length, in
  which every unit's gate moves toward its saturated value (``sigmoid(a * dt + b)`` tends to 0 or 1), so the
  state after it is the saturated head's value. Both heads read the new value *and* the stale state, so the
  stale state still shapes the state after a gap of any length (it is not decayed to zero); the values that
  follow re-encode it. :meth:`reset_rows` keeps the hidden state, the scaler and the cycle row.
* **Raw values in, raw forecasts out.** Each row is standardised with the mean and (population) standard
  deviation of its warm-start training part, as CycleNet does; the head forecasts the standardised value as the
  last value plus a learned correction (``skip=True``), so a level shift is followed from its first step.
  ``scale_halflife`` swaps in an adaptive scaler instead: an exponentially weighted mean and deviation per row
  (decayed by ``dt``, a running mean until the half-life's rate is the larger, deviations winsorised at 3
  standard deviations for both), each input standardised
  with its own tick's statistics and each forecast with its origin's.
* **Warm start** (CycleNet's recipe): rows keep their history until ``warm_start`` ticks have passed since their
  first value (gaps count: on the engine's grid that is when CycleNet, which learns the filled ticks, warms up);
  then the group is fitted, Adam on MSE, lr flat for 4 epochs then x0.8 per epoch, early stopping on the last
  ``val_fraction`` of the history (best weights kept). A training window is ``lookback`` steps encoded from a zero
  state (truncated backpropagation through time) and the ``horizon`` values after it; missing ticks are skipped
  with their ``dt``. After the fit every row's state is computed once over its history. Rows that appear
  later join once they hold ``lookback + horizon`` real values (not ticks; scaler from their history).
* **Modes.** ``"frozen"``: the weights stay as fitted (the states still move). ``"online"``: every completed
  window of a served row joins the replay buffer (its newest ``replay_window`` windows; no window is used
  before its last target has arrived) and every round takes ``replay_steps`` Adam steps on ``replay_batch``
  windows drawn uniformly from it. ``"cyclenet"``: ``"online"`` plus residual cycle forecasting - a learnable
  cycle table (one row of length W per series, as CycleNet's ``Q``) is subtracted from the inputs and added
  to the forecasts at the tick's phase, so the liquid cell models what the cycle does not. ``Q`` rows are
  learned with the network at the warm start and online by a per-row (lazy) Adam.
* **Where heavy work runs** and **threading** as :class:`tidecast.models.cyclenet.CycleNetForecaster`: the fit and
  the replay steps run inline in :meth:`learn_many` (within ``step_budget`` seconds of replay per round) or in
  :meth:`maintenance` once it is called from another thread (``defer=None``); training updates a copy of the
  network and publishes its weights under a short lock.
* **State** is arrays + JSON: :meth:`export_rows` gives each row's hidden state, scaler, last tick and value,
  cycle row with its Adam moments, and its history ring (the replay buffer, ``history``); without the ring a
  row is about 200 bytes (plus 12 bytes per cycle step in ``"cyclenet"`` mode). :meth:`export_shared` gives the
  weights, their Adam state and the RNG. Restoring both and feeding the same inputs reproduces the forecasts
  bit for bit (if the time budget lets both runs take the same replay steps).
* **Bootstrap** (``bootstrap=B``, 0 by default): a residual bootstrap, as for Holt-Winters
  (:class:`tidecast.models.bootstrap.ResidualRing`): each row keeps its last 50 one-step residuals (the value
  against the state's 1-step forecast, for values one tick after the last), and replica ``b``'s h-step forecast
  is the point forecast plus the sum of ``h`` of them resampled; :meth:`spread_many` is their root mean square.
  Bagged networks would need B hidden states per series advanced every round (B times the serving cost); the
  residual ring costs one head evaluation per round and 400 bytes a series.
* **Ensembles** (``members=K`` through :func:`build`, the registry's factory): K networks seeded ``seed`` ...
  ``seed + K - 1``, each with its own states, history and training, serving the mean of their forecasts
  (:class:`CfCEnsemble`, :mod:`tidecast.models.ensemble`); K times the time and per-row memory of one.

>>> import numpy as np
>>> model = CfCForecaster(horizon=3, lookback=8, units=8, backbone_units=16, warm_start=60, epochs=2)
>>> rows = np.array([0, 1])
>>> for tick in range(80):
...     model.learn_many(rows, np.array([tick, tick]), np.sin(tick / 3) + np.array([0.0, 5.0]))
>>> model.forecast_many(rows, 3).shape
(2, 3)
>>> state = model.export_rows(rows)
>>> state["hidden"].shape
(2, 8)
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tidecast.models.base import (
    MAX_BATCH,
    MAX_SEED,
    MAX_UNITS,
    ArrayDict,
    check_count,
    check_positive,
    check_rate,
    require,
)
from tidecast.models.bootstrap import ResidualRing, check_bootstrap
from tidecast.models.ensemble import Ensemble
from tidecast.models.naive import check_ticks
from tidecast.models.persistence import PersistenceBlend
from tidecast.models.runtime import seeded_torch
from tidecast.models.warm_start import WarmStarted

__all__ = ["CfCCell", "CfCEnsemble", "CfCForecaster", "LiquidNet", "build", "make"]

MODES = ("frozen", "online", "cyclenet")
_NO_TICK = np.iinfo(np.int64).min


def _ticks_ending(last: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` ticks up to each ``last`` tick, oldest first, (rows, n). A row without a tick counts as ending at
    ``n - 1`` (its ring is blank anyway): ``_NO_TICK - n + 1`` wrapped around int64, and the slots taken modulo
    the ring were then no permutation, so importing a blank row (a dropped series) left one slot of the series
    that held the row before (cfc's history ring leaked a value into the next series given that row)."""
    last = np.where(last == _NO_TICK, n - 1, last)
    return last[:, None] - n + 1 + np.arange(n)
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
MAX_LAYERS = 64  # backbone depth: far beyond any use, and refused at construction rather than at the fit
SCALE_CLIP = 3.0  # deviations at which the adaptive scaler winsorises a value for its mean and variance


class LeCunTanh(nn.Module):
    """``1.7159 * tanh(0.666 * x)``: LeCun's scaled tanh, the CfC backbone's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(0.666 * x)


class CfCCell(nn.Module):
    """The gated CfC cell: ``s' = (1 - gate) * g + gate * k`` with ``gate = sigmoid(a * dt + b)``.

    The backbone's first layer over ``[x, s]`` is kept as two maps, ``input_map(x) + state_map(s)`` (the same
    function), so that a whole input sequence is projected in one call and a step only multiplies the state;
    the four heads ``g``, ``k``, ``a``, ``b`` are one stacked linear map.

    Parameters
    ----------
    n_inputs, units
        Input features per step and state size.
    backbone_units, backbone_layers
        The shared backbone over ``[x, s]``: ``backbone_layers`` (>= 1) times Linear + LeCun tanh.

    >>> cell = CfCCell(n_inputs=2, units=4, backbone_units=8)
    >>> s = cell(torch.zeros(3, 2), torch.zeros(3, 4), torch.ones(3, 1))
    >>> tuple(s.shape), bool(s.abs().max() < 1)  # a convex mix of two tanh heads stays in (-1, 1)
    ((3, 4), True)
    """

    def __init__(self, n_inputs: int, units: int, backbone_units: int = 64, backbone_layers: int = 1) -> None:
        super().__init__()
        if backbone_layers < 1:
            raise ValueError("backbone_layers must be >= 1")
        self.n_inputs, self.units = n_inputs, units
        self.input_map = nn.Linear(n_inputs, backbone_units)
        self.state_map = nn.Linear(units, backbone_units, bias=False)
        deeper: list[nn.Module] = []
        for _ in range(backbone_layers - 1):
            deeper += [nn.Linear(backbone_units, backbone_units), LeCunTanh()]
        self.deeper = nn.Sequential(*deeper)
        self.heads = nn.Linear(backbone_units, 4 * units)  # g (gate closed), k (gate open), a, b
        self.act = LeCunTanh()
        with torch.no_grad():  # Xavier-uniform per matrix of the unsplit cell: [x, s] -> backbone, each head
            first = nn.init.xavier_uniform_(torch.empty(backbone_units, n_inputs + units))
            self.input_map.weight.copy_(first[:, :n_inputs])
            self.state_map.weight.copy_(first[:, n_inputs:])
            for layer in self.deeper:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
            for block in self.heads.weight.view(4, units, backbone_units):
                nn.init.xavier_uniform_(block)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The input's share of the first backbone layer, for any leading shape (a whole sequence at once)."""
        return self.input_map(x)

    def parts(self, xp: torch.Tensor, s: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The two heads and the time gate, each ``(B, units)``, from a projected input ``xp``; ``dt`` is
        ``(B, 1)`` (or broadcastable)."""
        z = self.deeper(self.act(xp + self.state_map(s)))
        g, k, a, b = self.heads(z).chunk(4, dim=1)
        return torch.tanh(g), torch.tanh(k), torch.sigmoid(a * dt + b)

    def step(self, xp: torch.Tensor, s: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        g, k, gate = self.parts(xp, s, dt)
        return (1.0 - gate) * g + gate * k

    def forward(self, x: torch.Tensor, s: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """The state after ``dt`` from state ``s`` under input ``x`` ``(B, n_inputs)``."""
        return self.step(self.project(x), s, dt)


class LiquidNet(nn.Module):
    """A :class:`CfCCell` plus a linear head from the state to the next ``horizon`` (standardised) values."""

    def __init__(self, n_inputs: int, units: int, horizon: int, backbone_units: int = 64,
                 backbone_layers: int = 1) -> None:
        super().__init__()
        self.cell = CfCCell(n_inputs, units, backbone_units, backbone_layers)
        self.head = nn.Linear(units, horizon)

    def encode(self, x: torch.Tensor, present: torch.Tensor, dt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Run the cell over ``x`` ``(B, T, F)`` from state ``s``; where ``present`` is False the state waits
        (``dt`` of the next present step covers the wait)."""
        xp = self.cell.project(x)
        dense = bool(present.all())
        for k in range(x.shape[1]):
            new = self.cell.step(xp[:, k], s, dt[:, k : k + 1])
            s = new if dense else torch.where(present[:, k : k + 1], new, s)
        return s


def build_net(n_inputs: int, units: int, horizon: int, backbone_units: int, backbone_layers: int,
              seed: int) -> LiquidNet:
    """A :class:`LiquidNet` whose initial weights depend on ``seed`` only (the global RNG is left alone)."""
    with seeded_torch(seed):
        return LiquidNet(n_inputs, units, horizon, backbone_units, backbone_layers)


def time_features(ticks: np.ndarray, periods: tuple[int, ...]) -> np.ndarray:
    """``sin`` and ``cos`` of the phase ``tick % p`` for every period, float32 ``(*ticks.shape, 2 * len(periods))``."""
    ticks = np.asarray(ticks, dtype=np.int64)
    out = np.empty((*ticks.shape, 2 * len(periods)), dtype=np.float32)
    for i, p in enumerate(periods):
        angle = 2 * np.pi * (ticks % p) / p  # the modulo first: epoch-anchored ticks are large
        out[..., 2 * i], out[..., 2 * i + 1] = np.sin(angle), np.cos(angle)
    return out


def deltas(present: np.ndarray) -> np.ndarray:
    """Steps since the previous present step, per step of ``present`` ``(B, T)``; 1 before the first one."""
    b, t = present.shape
    idx = np.arange(t)
    last = np.maximum.accumulate(np.where(present, idx, -1), axis=1)
    prev = np.concatenate([np.full((b, 1), -1), last[:, :-1]], axis=1)
    return np.where(prev >= 0, idx - prev, 1).astype(np.float32)


class CfCForecaster(WarmStarted):
    """CfC over a group of series (rows); see the module docstring.

    Parameters
    ----------
    horizon
        Forecast length H (the head's output).
    lookback
        Steps a training window encodes from a zero state (truncated BPTT length).
    mode
        ``"frozen"``, ``"online"`` or ``"cyclenet"`` (online, with a residual cycle table).
    units, backbone_units, backbone_layers
        State size and the cell's backbone.
    periods
        Cycle lengths (ticks) whose phase enters as sin/cos inputs; empty: the value alone.
    skip
        Forecast the last value plus a learned correction (True) or the head's output alone.
    scale_halflife
        None: standardise each row with its warm-start mean and deviation (as CycleNet). A number: with an
        exponentially weighted mean and deviation of half-life ``scale_halflife`` ticks (``dt``-aware), updated
        by every observation; the inputs use the statistics of their tick, a forecast those of its origin, so a
        row's scale follows a shift in about a half-life.
    cycle
        Cycle length W of the ``"cyclenet"`` table; None: detected at the warm start.
    warm_start, val_fraction, lr, epochs, patience, batch_size
        The warm-start fit (see the module docstring).
    online_lr, online_cycle_lr
        Adam learning rates of the replay steps for the network and for the cycle rows (None: ``online_lr``).
    online_huber
        Replay steps minimise the Huber loss with this threshold (standardised units; None: the squared error):
        a window across a sudden shift, unpredictable by construction, then pulls no harder than one of
        ``online_huber`` deviations instead of dominating every batch it is drawn into. On the link-failure
        bench's dev seeds it cut the steps to recover from a failure by a third.
    input_dropout
        Training windows (warm start, replay, refit) lose each lookback input but the last with probability
        ``u * input_dropout``, ``u`` uniform in [0, 1) per window: the cell learns to bridge gaps by their ``dt``
        on complete data too, so a stream with missing values is not out of its training distribution.
    replay_window, replay_every, replay_steps, replay_batch
        Each row keeps its newest ``replay_window`` windows; every ``replay_every`` rounds (grid time steps, as
        the engine marks them with :meth:`begin_step`) that complete a window,
        ``replay_steps`` Adam steps on ``replay_batch`` windows are due (unpaid steps carry over, up to four
        rounds' worth).
    step_budget
        Seconds of replay training allowed per inline round; ``None`` (the default): every due step (at most four
        rounds' worth), so a replay gives the same forecasts and promotions however busy the machine.
    defer
        Heavy work in :meth:`maintenance` (True), inline (False), or inline until :meth:`maintenance` is called
        from another thread than :meth:`learn_many` (None).
    max_cycle, seed
        Longest detected cycle; seed of the initial weights and of every draw.
    bootstrap
        Replicas of the residual bootstrap behind :meth:`spread_many` (0: none; see the module docstring).
    members
        Networks averaged (1 here: :func:`build`, the registry's factory, turns ``members=K`` into an
        :class:`~tidecast.models.ensemble.Ensemble` of K networks; K times the time and per-row memory).
    persistence_half_life
        Serve a blend of the forecasts with the last value, weighted per series and step by the errors that
        matured, forgetting with this half-life in matured targets (:mod:`tidecast.models.persistence`; 0: off,
        the default; ``4 H^2 + 40 H`` more bytes a series). With ``members`` > 1 the ensemble blends the members'
        mean and the members run unblended (a member would fit its weight to its own, noisier errors).
    """

    name = "cfc"

    def __init__(
        self,
        horizon: int,
        lookback: int = 24,
        mode: str = "online",
        units: int = 32,
        backbone_units: int = 64,
        backbone_layers: int = 1,
        periods: tuple[int, ...] | list[int] = (),
        skip: bool = True,
        scale_halflife: float | None = None,
        cycle: int | None = None,
        warm_start: int = 500,
        val_fraction: float = 0.2,
        lr: float = 0.005,
        epochs: int = 30,
        patience: int = 5,
        batch_size: int = 256,
        online_lr: float = 1e-3,
        online_cycle_lr: float | None = None,
        online_huber: float | None = 1.0,
        input_dropout: float = 0.0,
        replay_window: int = 168,
        replay_every: int = 1,
        replay_steps: int = 1,
        replay_batch: int = 128,
        step_budget: float | None = None,
        defer: bool | None = None,
        max_cycle: int = 400,
        seed: int = 0,
        bootstrap: int = 0,
        members: int = 1,
        persistence_half_life: int = 0,
    ) -> None:
        self.horizon, self.lookback, self.mode = horizon, lookback, mode
        self.units, self.backbone_units, self.backbone_layers = units, backbone_units, backbone_layers
        self.periods, self.skip, self.cycle = tuple(int(p) for p in periods), skip, cycle
        self.scale_halflife = scale_halflife
        self.warm_start, self.val_fraction = warm_start, val_fraction
        self.lr, self.epochs, self.patience, self.batch_size = lr, epochs, patience, batch_size
        self.online_lr, self.online_cycle_lr, self.online_huber = online_lr, online_cycle_lr, online_huber
        self.input_dropout = input_dropout
        self.replay_window, self.replay_every = replay_window, replay_every
        self.replay_steps, self.replay_batch, self.step_budget = replay_steps, replay_batch, step_budget
        self.defer, self.max_cycle, self.seed = defer, max_cycle, seed
        self.bootstrap, self.members = bootstrap, members
        self.persistence_half_life = persistence_half_life
        self._check_params()
        # the forecasts served are blended with the last value (models/persistence.py); None: the model's own
        self._persistence = (PersistenceBlend(horizon, persistence_half_life) if persistence_half_life else None)
        self._lock = threading.RLock()  # row tables, serving weights
        self._train_lock = threading.Lock()  # the training copy and its optimiser
        self._deferred = bool(defer)
        self._learn_thread: int | None = None
        self._reset_model()
        self._alloc()

    # -- construction helpers -------------------------------------------------------------------------

    def _check_params(self) -> None:
        check_bootstrap(self.bootstrap)
        check_count("backbone_units", self.backbone_units, high=MAX_UNITS)
        check_count("backbone_layers", self.backbone_layers, high=MAX_LAYERS)
        check_rate("lr", self.lr)
        check_count("epochs", self.epochs)
        check_count("patience", self.patience, 0)
        check_count("batch_size", self.batch_size, high=MAX_BATCH)
        check_rate("online_lr", self.online_lr)
        check_rate("online_cycle_lr", self.online_cycle_lr, optional=True)
        check_positive("online_huber", self.online_huber, optional=True, rule="residual deviations > 0")
        check_count("replay_steps", self.replay_steps, 0)
        check_positive("step_budget", self.step_budget, optional=True, rule="seconds > 0")
        check_count("max_cycle", self.max_cycle, 2)
        require(self.defer is None or isinstance(self.defer, bool), "defer", self.defer, "True, False or None")
        if self.persistence_half_life < 0:
            raise ValueError("persistence_half_life must be >= 0 (0: no blend with the last value)")
        if self.members != 1:  # one object is one network; the registry's factory builds the ensemble
            raise ValueError(f"members={self.members}: build an ensemble with tidecast.models.liquid.build "
                             "(the registry's 'cfc'); a CfCForecaster is one network (members=1)")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.horizon < 1 or self.lookback < 1 or self.units < 1:
            raise ValueError("horizon, lookback and units must be >= 1")
        check_count("units", self.units, high=MAX_UNITS)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        check_count("seed", self.seed, 0, high=MAX_SEED)
        self._check_warm_start()
        if self.scale_halflife is not None and not 0 < self.scale_halflife < math.inf:
            raise ValueError(f"scale_halflife must be > 0 and finite (or None: the warm-start scaler), got "
                             f"{self.scale_halflife}")
        if not 0.0 <= self.input_dropout < 1.0:
            raise ValueError("input_dropout must be in [0, 1)")
        if any(p < 2 for p in self.periods):
            raise ValueError("periods must be >= 2")
        check_ticks("cycle", self.cycle, optional=True)
        if self.replay_window < 1 or self.replay_every < 1 or self.replay_batch < 1:
            raise ValueError("replay_window, replay_every and replay_batch must be >= 1")
        check_count("replay_batch", self.replay_batch, high=MAX_BATCH)

    @property
    def _n_inputs(self) -> int:
        return 1 + 2 * len(self.periods)

    @property
    def _adaptive(self) -> bool:
        return self.scale_halflife is not None

    @property
    def _learns(self) -> bool:
        return self.mode != "frozen"

    def _reset_model(self) -> None:
        self.cycle_: int = (self.cycle or 0) if self.mode == "cyclenet" else 0
        self.net_: LiquidNet | None = None  # serving network
        self.fit_report_: dict[str, Any] = {}
        self._trainer: LiquidNet | None = None
        self._opt: torch.optim.Adam | None = None
        self._rng = np.random.default_rng(self.seed)
        self._reset_rounds()
        self._job: dict[str, Any] | None = None

    def _alloc(self) -> None:
        self.n_rows_ = 0
        self._cap = 0
        self._hist = np.zeros((0, self._ring))  # ring indexed by tick % ring; NaN where no real value
        self._state = np.zeros((0, self.units), dtype=np.float32)
        self._last_tick = np.zeros(0, dtype=np.int64)
        self._last_value = np.zeros(0)
        self._seen = np.zeros(0, dtype=np.int64)
        self._mean = np.zeros(0)
        self._scale = np.zeros(0)
        self._var = np.zeros(0)  # exponentially weighted variance (adaptive scaler)
        ring = self._ring if self._adaptive else 0  # the adaptive scaler's statistics at every tick
        self._hist_mean = np.zeros((0, ring))
        self._hist_scale = np.zeros((0, ring))
        self._ready = np.zeros(0, dtype=bool)
        self._q = np.zeros((0, self.cycle_), dtype=np.float32)  # cycle rows and their Adam moments
        self._q_m = np.zeros((0, self.cycle_), dtype=np.float32)
        self._q_v = np.zeros((0, self.cycle_), dtype=np.float32)
        self._q_step = np.zeros(0, dtype=np.int64)
        self.ring_ = ResidualRing(self.bootstrap) if self.bootstrap else None

    # -- the table ------------------------------------------------------------------------------------

    def resize(self, n_rows: int) -> None:
        with self._lock:
            if n_rows > self._cap:
                cap = max(n_rows, 2 * self._cap, 8)
                extra = cap - self._cap

                def grow(a: np.ndarray, fill: float | int | bool) -> np.ndarray:
                    return np.concatenate([a, np.full((extra, *a.shape[1:]), fill, dtype=a.dtype)])

                self._hist = grow(self._hist, np.nan)
                self._state = grow(self._state, 0.0)
                self._last_tick, self._last_value = grow(self._last_tick, _NO_TICK), grow(self._last_value, np.nan)
                self._seen = grow(self._seen, 0)
                self._mean, self._scale = grow(self._mean, np.nan), grow(self._scale, np.nan)
                self._var = grow(self._var, 0.0)
                self._hist_mean, self._hist_scale = grow(self._hist_mean, np.nan), grow(self._hist_scale, np.nan)
                self._ready = grow(self._ready, False)
                self._q, self._q_m, self._q_v = grow(self._q, 0.0), grow(self._q_m, 0.0), grow(self._q_v, 0.0)
                self._q_step = grow(self._q_step, 0)
                if self.ring_ is not None:
                    self.ring_.resize(cap)
                if self._persistence is not None:
                    self._persistence.resize(cap)
                self._cap = cap
            self.n_rows_ = max(self.n_rows_, n_rows)

    def _set_cycle(self, cycle: int) -> None:
        """Fix W (known at the warm start when detected): the cycle rows get their width, all zero."""
        self.cycle_ = cycle
        shape = (self._cap, cycle)
        self._q, self._q_m, self._q_v = (np.zeros(shape, np.float32) for _ in range(3))
        self._q_step = np.zeros(self._cap, dtype=np.int64)

    def reset_rows(self, rows: np.ndarray) -> None:
        """Nothing to forget: the next observation's ``dt`` covers the gap (see the module docstring), and the
        missing ticks are already marked missing in the history ring."""

    def _history(self, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw values and ticks of the last ``n`` ticks of each row, oldest first (NaN where missing)."""
        ticks = _ticks_ending(self._last_tick[rows], n)
        return self._hist[rows[:, None], ticks % self._ring], ticks

    def _windows(self, rows: np.ndarray) -> np.ndarray:
        """How many complete windows of each row are in the replay buffer (0 for rows not served)."""
        n = np.minimum(self._seen[rows], self._ring) - self._window + 1
        return np.where(self._ready[rows], np.clip(n, 0, self.replay_window), 0)

    # -- learning -------------------------------------------------------------------------------------

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        """One observation per row; rows whose value the engine ``filled`` into a gap are skipped."""
        rows = np.asarray(rows, dtype=np.int64)
        ticks = np.asarray(ticks, dtype=np.int64)
        values = np.asarray(values, dtype=float)
        if filled is not None:
            real = ~np.asarray(filled, dtype=bool)
            rows, ticks, values = rows[real], ticks[real], values[real]
        if rows.size == 0:
            return
        self._learn_thread = threading.get_ident()
        with self._lock:
            if rows.max() >= self.n_rows_:
                self.resize(int(rows.max()) + 1)
            prev = self._last_tick[rows].copy()
            if self.ring_ is not None and self.net_ is not None:  # before the value enters the row
                served = self._ready[rows]
                self._residuals(rows[served], ticks[served], values[served], prev[served])
            if self._persistence is not None:  # score the blend's forecasts whose target this is
                self._persistence.learn(rows, ticks, values)
            self._record(rows, ticks, values, prev)
            if self.net_ is None:
                if self._job is None and np.any(self._seen[rows] >= self.warm_start):
                    self._job = self._start_fit()
            else:
                served = self._ready[rows]
                if served.any():
                    self._advance(rows[served], ticks[served], values[served], ticks[served] - prev[served])
                self._join(rows[~served & (self._seen[rows] >= self._window)])
                if self._learns and np.any(self._windows(rows[served]) > 0):
                    self._count_round()
        if not self._deferred:
            self._work(math.inf, math.inf if self.step_budget is None else self.step_budget)

    def _record(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray, prev: np.ndarray) -> None:
        """Write the values into the rings; ticks skipped since each row's last value are marked missing."""
        jumped = (prev != _NO_TICK) & (ticks - prev > 1)
        for r, p, t in zip(rows[jumped].tolist(), prev[jumped].tolist(), ticks[jumped].tolist(), strict=True):
            n = min(t - p - 1, self._ring)
            self._hist[r, (t - n + np.arange(n)) % self._ring] = np.nan
        self._hist[rows, ticks % self._ring] = values
        if self._adaptive:
            self._update_scaler(rows, ticks, values, prev)
        self._last_tick[rows], self._last_value[rows] = ticks, values
        # ticks since the row's first value, gaps included: the history ring and the warm-start fit are indexed by
        # tick, so a row with gaps warms up and fills its replay windows on the same clock as a complete one
        self._seen[rows] += np.where(prev == _NO_TICK, 1, ticks - prev)

    def _update_scaler(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray, prev: np.ndarray) -> None:
        """Exponentially weighted mean and variance, decayed by the real time since the last value. Both see each
        deviation winsorised at ``SCALE_CLIP`` deviations, so that one value cannot move them far: the scale grows
        by a bounded factor a step, and the mean by a bounded step, which a lasting shift widens as the scale
        grows. (The mean took the whole deviation before: one value of 1e14 moved it to 3e12, every later value
        was then 3 deviations off, and the scale grew 1.27x a tick for hundreds of ticks.)"""
        first = self._seen[rows] == 0
        dt = np.where(first, 1, ticks - prev)
        # A running mean first (rate 1/n over the n ticks since the row's first value), exponential forgetting
        # once the half-life's rate is the larger: started from 0 without it, the deviation was 0.07 of the data's
        # after 100 ticks at a half-life of 168 (0.78 after 500), and winsorising at 3 of those held it down.
        alpha = np.maximum(1.0 - 0.5 ** (dt / self.scale_halflife), 1.0 / (self._seen[rows] + dt))
        mean, var = self._mean[rows], self._var[rows]
        diff = values - np.where(first, values, mean)
        bound = np.where(var > 0, SCALE_CLIP * np.sqrt(var), np.inf)
        diff = np.clip(diff, -bound, bound)
        self._mean[rows] = np.where(first, values, mean + alpha * diff)
        self._var[rows] = np.where(first, 0.0, (1.0 - alpha) * (var + alpha * diff**2))
        self._scale[rows] = _safe_std(np.sqrt(self._var[rows]))
        self._hist_mean[rows, ticks % self._ring] = self._mean[rows]
        self._hist_scale[rows, ticks % self._ring] = self._scale[rows]

    def _stats(self, rows: np.ndarray, ticks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The scaler (mean, scale) of each row at ``ticks`` ``(len(rows), T)``: per tick when adaptive."""
        if self._adaptive:
            idx = (rows[:, None], ticks % self._ring)
            return self._hist_mean[idx], self._hist_scale[idx]
        return np.broadcast_to(self._mean[rows, None], ticks.shape), np.broadcast_to(self._scale[rows, None],
                                                                                      ticks.shape)

    def _inputs(self, rows: np.ndarray, ticks: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell inputs for standardised values ``z`` at ``ticks`` (any shape ``(B, ...)``): the residual after the
        cycle row, then the time features; also the cycle values subtracted (zeros without a cycle table)."""
        q = self._q[rows.reshape(rows.shape + (1,) * (ticks.ndim - 1)), ticks % self.cycle_] if self.cycle_ \
            else np.zeros(ticks.shape, dtype=np.float32)
        feats = [(z - q)[..., None].astype(np.float32)]
        if self.periods:
            feats.append(time_features(ticks, self.periods))
        return np.concatenate(feats, axis=-1), q

    def _residuals(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray, prev: np.ndarray) -> None:
        """The bootstrap ring learns each value one tick after the row's last against the row's 1-step forecast as
        served, blended with the last value where that is on (called before the value enters the row and before
        the blend scores it)."""
        step = ticks - prev == 1
        if step.any():
            rows = rows[step]
            served = self._forecast(rows, 1)
            if self._persistence is not None:
                served = self._persistence.blended(rows, self._last_value[rows], served)
            self.ring_.add(rows, values[step] - served[:, 0])

    def _advance(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray, dt: np.ndarray) -> None:
        """One cell step for served rows: the batched call of the round (under the lock)."""
        z = (values - self._mean[rows]) / self._scale[rows]
        x, _ = self._inputs(rows, ticks, z)
        with torch.inference_mode():
            s = self.net_.cell(torch.from_numpy(x), torch.from_numpy(self._state[rows]),
                               torch.from_numpy(dt.astype(np.float32))[:, None])
        self._state[rows] = s.numpy()

    def _encode(self, rows: np.ndarray) -> None:
        """Compute the rows' states over their whole history ring from a zero state (under the lock)."""
        if rows.size == 0:
            return
        raw, ticks = self._history(rows, self._ring)
        mean, scale = self._stats(rows, ticks)
        z = (raw - mean) / scale
        present = np.isfinite(z)
        x, _ = self._inputs(rows, ticks, np.where(present, z, 0.0))
        with torch.inference_mode():
            s = self.net_.encode(torch.from_numpy(x), torch.from_numpy(present), torch.from_numpy(deltas(present)),
                                 torch.zeros(rows.size, self.units))
        self._state[rows] = s.numpy()

    def _join(self, rows: np.ndarray) -> None:
        """Serve rows that arrived after the fit: scaler from their history, state encoded over it. As in the fit's
        cohort, a row joins once its history holds ``lookback + horizon`` real values, not ticks: one value and a
        gap gave a scaler of 2 values (a deviation of 0 taken as 1) that the row then kept."""
        if rows.size == 0:
            return
        raw, _ = self._history(rows, self._ring)
        enough = np.isfinite(raw).sum(axis=1) >= self._window
        rows, raw = rows[enough], raw[enough]
        if rows.size == 0:
            return
        if not self._adaptive:
            self._mean[rows] = np.nanmean(raw, axis=1)
            self._scale[rows] = _safe_std(np.nanstd(raw, axis=1))
        self._ready[rows] = True
        self._encode(rows)

    # -- training windows -----------------------------------------------------------------------------

    def _window_z(self, raw: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Standardise windows ``(B, L + H)``: inputs with their own tick's scaler, targets with the origin's (the
        scaler a forecast from that origin uses)."""
        lb = self.lookback
        return np.concatenate([(raw[:, :lb] - mean[:, :lb]) / scale[:, :lb],
                               (raw[:, lb:] - mean[:, lb - 1 : lb]) / scale[:, lb - 1 : lb]], axis=1)

    def _drop_inputs(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``z`` with lookback inputs (all but the last) removed at random: ``input_dropout`` augmentation."""
        if not self.input_dropout:
            return z
        lb = self.lookback
        rate = rng.random((len(z), 1)) * self.input_dropout
        gone = rng.random((len(z), lb - 1)) < rate
        z = z.copy()
        z[:, : lb - 1][gone] = np.nan
        return z

    def _window_loss(self, net: LiquidNet, z: np.ndarray, ticks: np.ndarray, q: torch.Tensor | None,
                     cycle: int, huber: float | None = None) -> torch.Tensor:
        """Masked MSE (or Huber loss with threshold ``huber``) of ``net`` on windows ``z`` ``(B, L + H)`` (from
        :meth:`_window_z`, NaN where missing) at ``ticks``.

        The lookback is encoded from a zero state; the last input step is a real value by construction.
        ``q`` ``(B, W)`` holds each window's cycle row of length ``cycle`` (``"cyclenet"`` mode); gradients flow
        into it.
        """
        lb = self.lookback
        present = np.isfinite(z)
        values = torch.from_numpy(np.where(present, z, 0.0).astype(np.float32))
        if q is not None:
            cyc = torch.gather(q, 1, torch.from_numpy(ticks % cycle))
            resid = values - cyc
        else:
            cyc, resid = None, values
        x = resid[:, :lb, None]
        if self.periods:
            x = torch.cat([x, torch.from_numpy(time_features(ticks[:, :lb], self.periods))], dim=2)
        inp = present[:, :lb]
        s = net.encode(x, torch.from_numpy(inp), torch.from_numpy(deltas(inp)), torch.zeros(len(z), self.units))
        pred = net.head(s)
        if self.skip:
            pred = pred + resid[:, lb - 1 : lb]
        if cyc is not None:
            pred = pred + cyc[:, lb:]
        mask = torch.from_numpy(present[:, lb:].astype(np.float32))
        if huber is None:
            loss = (pred - values[:, lb:]) ** 2
        else:  # 2x torch's huber_loss, so that it equals the squared error below the threshold
            loss = 2.0 * nn.functional.huber_loss(pred, values[:, lb:], reduction="none", delta=huber)
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)

    # -- the warm-start fit -----------------------------------------------------------------------------

    def _start_fit(self) -> dict[str, Any] | None:
        """Snapshot the warm rows and set up the fit on them (called under the lock)."""
        n, n_val, lb, h = self.warm_start, self._n_val(), self.lookback, self.horizon
        n_train = n - n_val
        candidates = np.flatnonzero(self._seen[: self.n_rows_] >= n)
        raw, ticks = self._history(candidates, n)
        enough = np.isfinite(raw[:, :n_train]).sum(axis=1) >= self._window  # a row of gaps waits to join later
        cohort, raw, ticks = candidates[enough], raw[enough], ticks[enough]
        if cohort.size == 0:
            return None
        if self._adaptive:
            mean, scale = None, None
            mean_t, scale_t = self._stats(cohort, ticks)
        else:
            mean = np.nanmean(raw[:, :n_train], axis=1)
            scale = _safe_std(np.nanstd(raw[:, :n_train], axis=1))
            mean_t, scale_t = np.broadcast_to(mean[:, None], raw.shape), np.broadcast_to(scale[:, None], raw.shape)
        z = (raw - mean_t) / scale_t
        cycle = self.cycle_
        if self.mode == "cyclenet" and not cycle:
            from tidecast.models.cyclenet import detect_cycle  # only this mode needs it

            filled = np.where(np.isfinite(z[:, :n_train]), z[:, :n_train], 0.0)
            cycle = detect_cycle(filled.T, self.max_cycle)

        def origins(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
            """(row, index) of windows whose last input is at index lo..hi and is a real value."""
            c, t = np.nonzero(np.isfinite(z[:, lo : hi + 1]))
            return c, t + lo

        train = origins(lb - 1, n_train - h - 1)
        val = origins(max(n_train - 1, lb - 1), n - h - 1) if n_val else (np.zeros(0, int), np.zeros(0, int))
        net = build_net(self._n_inputs, self.units, self.horizon, self.backbone_units, self.backbone_layers,
                        self.seed)
        q = nn.Parameter(torch.zeros(cohort.size, cycle)) if self.mode == "cyclenet" else None
        fit = _WarmFit(self, net, q, (raw, mean_t, scale_t), ticks, train, val, cycle)
        return {"fit": fit, "net": net, "q": q, "rows": cohort, "mean": mean, "scale": scale, "cycle": cycle}

    def _install(self, job: dict[str, Any]) -> None:
        """Swap the fitted network in, serve the cohort and compute every served row's state. Cohort rows whose
        state was replaced while the fit ran (a series dropped and its row reused, or one restored into it) are
        left out: the fit's scaler and cycle row are another series' (``import_rows`` records them)."""
        with self._lock:
            keep = self._kept(job)
            rows = job["rows"][keep]
            if self.mode == "cyclenet":
                if job["cycle"] != self.cycle_:
                    self._set_cycle(job["cycle"])
                self._q[rows] = job["q"].detach().numpy()[keep]
            self.net_ = job["net"]
            self.net_.eval()
            if not self._adaptive:
                self._mean[rows], self._scale[rows] = job["mean"][keep], job["scale"][keep]
            self._ready[rows] = True
            self._encode(np.flatnonzero(self._ready[: self.n_rows_]))  # with rows restored as served meanwhile
            self.fit_report_ = {**job["fit"].report, "rows": int(rows.size), "cycle": self.cycle_}
            if self._learns:
                self._new_trainer()
            late = np.flatnonzero(~self._ready[: self.n_rows_] & (self._seen[: self.n_rows_] >= self._window))
            self._join(late)
            self._job = None

    def _new_trainer(self) -> None:
        self._trainer = copy.deepcopy(self.net_)
        self._trainer.train()
        self._opt = torch.optim.Adam(self._trainer.parameters(), lr=self.online_lr)
        for p in self._trainer.parameters():  # explicit zero state, so export/import is uniform
            self._opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}

    # -- deferred work ----------------------------------------------------------------------------------

    def maintenance(self, budget_seconds: float) -> None:
        """Advance the warm-start fit and take due replay steps, for about ``budget_seconds``; nothing with
        ``defer=False``, whose work all runs inline (a trainer thread taking it would make the result depend on
        which thread got there first)."""
        if self.defer is False:
            return
        if self.defer is None and self._learn_thread not in (None, threading.get_ident()):
            self._deferred = True  # a worker thread does the heavy work from now on
        self._work(budget_seconds, budget_seconds)

    def _sample(self) -> tuple[np.ndarray, ...] | None:
        """``replay_batch`` windows drawn uniformly from the buffer (under the lock): rows, standardised
        windows ``(B, L + H)`` and their ticks. Windows without a real last input or any target are dropped."""
        rows = np.flatnonzero(self._ready[: self.n_rows_])
        counts = self._windows(rows)
        rows, counts = rows[counts > 0], counts[counts > 0]
        if rows.size == 0:
            return None
        pick = self._rng.choice(rows.size, size=self.replay_batch, p=counts / counts.sum())
        r = rows[pick]
        age = np.floor(self._rng.random(self.replay_batch) * counts[pick]).astype(np.int64)  # 0: the newest
        ticks = (self._last_tick[r] - self.horizon - age)[:, None] - self.lookback + 1 + np.arange(self._window)
        z = self._window_z(self._hist[r[:, None], ticks % self._ring], *self._stats(r, ticks))
        ok = np.isfinite(z[:, self.lookback - 1]) & np.isfinite(z[:, self.lookback :]).any(axis=1)
        return (r[ok], self._drop_inputs(z[ok], self._rng), ticks[ok]) if ok.any() else None

    def _replay_step(self) -> None:
        """One Adam step of the training copy on a replay batch, then publish the weights (and cycle rows)."""
        with self._lock:
            self._due -= 1
            batch = self._sample()
            q0 = self._q[batch[0]].copy() if batch is not None and self.cycle_ else None
        if batch is None:
            return
        rows, z, ticks = batch
        q = torch.tensor(q0, requires_grad=True) if q0 is not None else None
        loss = self._window_loss(self._trainer, z, ticks, q, self.cycle_, self.online_huber)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self._opt.step()
        with self._lock, torch.no_grad():
            for dst, src in zip(self.net_.parameters(), self._trainer.parameters(), strict=True):
                dst.copy_(src)
            if q is not None:
                self._cycle_step(rows, q.grad.numpy())

    def _cycle_step(self, rows: np.ndarray, grad: np.ndarray) -> None:
        """Lazy Adam on the cycle rows in the batch: each row keeps its own moments and step count."""
        uniq, inverse = np.unique(rows, return_inverse=True)
        g = np.zeros((uniq.size, self.cycle_), dtype=np.float32)
        np.add.at(g, inverse, grad)
        b1, b2 = _ADAM_BETAS
        lr = self.online_lr if self.online_cycle_lr is None else self.online_cycle_lr
        self._q_step[uniq] += 1
        step = self._q_step[uniq][:, None].astype(np.float32)
        self._q_m[uniq] = m = b1 * self._q_m[uniq] + (1 - b1) * g
        self._q_v[uniq] = v = b2 * self._q_v[uniq] + (1 - b2) * g * g
        update = lr * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + _ADAM_EPS)
        self._q[uniq] -= update.astype(np.float32)

    # -- retraining (the engine's hook: stream/retrain.py) ---------------------------------------------------

    #: Per-row state a refit learns (kept when a candidate's rows are re-synced from its incumbent).
    learned_row_keys = ("cycle_row", "cycle_adam_m", "cycle_adam_v", "cycle_adam_step")

    def rows_synced(self, rows: np.ndarray) -> None:
        """A retrain candidate took the incumbent's newer rows (``stream.retrain.sync_rows``): their hidden states
        were computed by the incumbent's weights, so they are encoded again with this model's (the first shadow
        forecasts were off by up to 3 noise levels otherwise)."""
        rows = np.asarray(rows, dtype=np.int64)
        with self._lock:
            if self.net_ is not None:
                self._encode(rows[self._ready[rows]])

    def refit(self, recent: int, epochs: int = 5, lr: float = 1e-3, batch_size: int = 64) -> dict[str, Any]:
        """Fine-tune this (copied) model in place on the windows whose targets lie in each served row's last
        ``recent`` ticks, warm-started from its weights: ``epochs`` reshuffled passes of Adam (fresh moments; cycle
        rows by their lazy Adam), then publish and re-encode the rows' states with the new weights."""
        check_rate("lr", lr)
        check_count("batch_size", batch_size)
        with self._train_lock:
            with self._lock:
                if self.net_ is None:
                    raise ValueError("not fitted yet: nothing to refit")
                rows = np.flatnonzero(self._ready[: self.n_rows_])
                counts = np.minimum(self._windows(rows), max(int(recent), 1))
                rows, counts = rows[counts > 0], counts[counts > 0]
            if not rows.size:
                raise ValueError("no complete window since the change point")
            trainer = copy.deepcopy(self.net_)
            trainer.train()
            opt = torch.optim.Adam(trainer.parameters(), lr=lr)
            pair_rows = np.repeat(rows, counts)
            ages = np.concatenate([np.arange(c) for c in counts])
            steps = 0
            for _ in range(epochs):
                order = self._rng.permutation(pair_rows.size)
                for start in range(0, order.size, batch_size):
                    pick = order[start : start + batch_size]
                    r, age = pair_rows[pick], ages[pick]
                    with self._lock:
                        ticks = ((self._last_tick[r] - self.horizon - age)[:, None] - self.lookback + 1
                                 + np.arange(self._window))
                        z = self._window_z(self._hist[r[:, None], ticks % self._ring], *self._stats(r, ticks))
                        z = self._drop_inputs(z, self._rng)
                        q0 = self._q[r].copy() if self.cycle_ else None
                    ok = np.isfinite(z[:, self.lookback - 1]) & np.isfinite(z[:, self.lookback :]).any(axis=1)
                    if not ok.any():
                        continue
                    q = torch.tensor(q0[ok], requires_grad=True) if q0 is not None else None
                    loss = self._window_loss(trainer, z[ok], ticks[ok], q, self.cycle_, self.online_huber)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    if q is not None:
                        with self._lock:
                            self._cycle_step(r[ok], q.grad.numpy())
            with self._lock, torch.no_grad():
                for dst, src in zip(self.net_.parameters(), trainer.parameters(), strict=True):
                    dst.copy_(src)
                if self._learns:
                    self._new_trainer()
                self._encode(rows)
        return {"windows": int(pair_rows.size), "steps": steps}

    # -- forecasting ------------------------------------------------------------------------------------

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        """Raw-scale forecasts (n, horizon) read from the rows' states, blended with the last value where
        ``persistence_half_life`` is on; NaN for rows not served yet and beyond the model's horizon."""
        rows = np.asarray(rows, dtype=np.int64)
        with self._lock:
            out = self._forecast(rows, horizon)
            if self._persistence is not None:
                ok = np.isfinite(out).any(axis=1)
                r = rows[ok]
                out[ok] = self._persistence.combine(r, self._last_tick[r], self._last_value[r], out[ok])
        return out

    def _forecast(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        """The network's own forecasts (n, horizon), unblended (under the lock)."""
        out = np.full((rows.size, horizon), np.nan)
        with self._lock:
            if self.net_ is None or rows.size == 0:
                return out
            ok = np.zeros(rows.size, dtype=bool)
            inside = rows < self.n_rows_
            ok[inside] = self._ready[rows[inside]]
            r = rows[ok]
            if r.size == 0:
                return out
            with torch.inference_mode():
                y = self.net_.head(torch.from_numpy(self._state[r])).numpy().astype(float)
            mean, scale, last = self._mean[r], self._scale[r], self._last_tick[r]
            if self.skip or self.cycle_:
                z_last = (self._last_value[r] - mean) / scale
                _, q_last = self._inputs(r, last, z_last)
                if self.skip:
                    y += (z_last - q_last)[:, None]
                if self.cycle_:
                    y += self._q[r[:, None], (last[:, None] + np.arange(1, self.horizon + 1)) % self.cycle_]
            k = min(horizon, self.horizon)
            out[ok, :k] = y[:, :k] * scale[:, None] + mean[:, None]
        return out

    def spread_many(self, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        """Residual bootstrap: replica h-step errors are sums of h resampled one-step residuals (NaN for rows
        not served or with fewer than 20 residuals)."""
        if self.ring_ is None:
            return None
        rows = np.asarray(rows, dtype=np.int64)
        with self._lock:
            if rows.size and rows.max() >= self.n_rows_:
                self.resize(int(rows.max()) + 1)
            steps = np.broadcast_to(np.arange(1, horizon + 1), (rows.size, horizon))
            # the ring holds the served forecasts' residuals, blended ones included: no weighting here
            spread = self.ring_.spread(rows, self._last_tick[rows], steps, keys=self._last_value[rows])
            return np.where(self._ready[rows][:, None], spread, np.nan)

    # -- state ------------------------------------------------------------------------------------------

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        rows = np.asarray(rows, dtype=np.int64)
        with self._lock:
            raw, _ = self._history(rows, self._ring)
            state = {
                "history": raw,  # the replay buffer: the last ring ticks, oldest first, ending at last_tick
                "hidden": self._state[rows].copy(),
                "last_tick": self._last_tick[rows].copy(),
                "last_value": self._last_value[rows].copy(),
                "seen": self._seen[rows].copy(),
                "mean": self._mean[rows].copy(),
                "scale": self._scale[rows].copy(),
                "ready": self._ready[rows].astype(np.uint8),
            }
            if self._adaptive:
                at = (rows[:, None], _ticks_ending(self._last_tick[rows], self._ring) % self._ring)
                state.update(var=self._var[rows].copy(), history_mean=self._hist_mean[at],
                             history_scale=self._hist_scale[at])
            if self.mode == "cyclenet":
                state.update(cycle_row=self._q[rows].copy(), cycle_adam_m=self._q_m[rows].copy(),
                             cycle_adam_v=self._q_v[rows].copy(), cycle_adam_step=self._q_step[rows].copy())
            if self.ring_ is not None:
                state.update(self.ring_.export_rows(rows))
            if self._persistence is not None:
                state.update(self._persistence.export_rows(rows))
        return state

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        with self._lock:
            if rows.size and rows.max() >= self.n_rows_:
                self.resize(int(rows.max()) + 1)
            self._note_replaced(rows)  # a pending fit must not install its snapshot's scaler over these rows
            hist = np.asarray(state["history"], dtype=float)
            if hist.shape[1] != self._ring:
                raise ValueError(f"history length {hist.shape[1]} != this model's ring ({self._ring})")
            hidden = np.asarray(state["hidden"], dtype=np.float32)
            if hidden.shape[1] != self.units:
                raise ValueError(f"hidden state of {hidden.shape[1]} units != this model's {self.units}")
            last = np.asarray(state["last_tick"], dtype=np.int64)
            ticks = _ticks_ending(last, self._ring)
            self._hist[rows[:, None], ticks % self._ring] = hist
            if self._adaptive:
                self._var[rows] = state["var"]
                self._hist_mean[rows[:, None], ticks % self._ring] = state["history_mean"]
                self._hist_scale[rows[:, None], ticks % self._ring] = state["history_scale"]
            self._state[rows] = hidden
            self._last_tick[rows], self._last_value[rows] = last, state["last_value"]
            self._seen[rows] = state["seen"]
            self._mean[rows], self._scale[rows] = state["mean"], state["scale"]
            self._ready[rows] = np.asarray(state["ready"]).astype(bool)
            if self.mode == "cyclenet":
                self._import_cycle_rows(rows, state)
            if self.ring_ is not None:
                self.ring_.import_rows(rows, state)
            if self._persistence is not None:
                self._persistence.import_rows(rows, state)

    def _import_cycle_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        q = np.asarray(state["cycle_row"], dtype=np.float32)
        if q.shape[1] == 0:  # exported before W was known (a blank row): the row starts from zero
            self._q[rows], self._q_m[rows], self._q_v[rows], self._q_step[rows] = 0.0, 0.0, 0.0, 0
            return
        if q.shape[1] != self.cycle_:
            raise ValueError(f"cycle row of length {q.shape[1]} != this model's cycle ({self.cycle_})")
        self._q[rows], self._q_m[rows], self._q_v[rows] = q, state["cycle_adam_m"], state["cycle_adam_v"]
        self._q_step[rows] = state["cycle_adam_step"]

    def export_shared(self) -> tuple[ArrayDict, dict[str, Any]]:
        with self._train_lock, self._lock:
            meta = self._shared_meta("cfc")
            arrays: ArrayDict = {}
            if self.net_ is None:
                return arrays, meta
            for name, p in self.net_.named_parameters():
                arrays[f"net.{name}"] = p.detach().numpy().copy()
            if self._trainer is not None:
                params = dict(self._trainer.named_parameters())
                for name, p in params.items():
                    st = self._opt.state[p]
                    arrays[f"adam_m.{name}"] = st["exp_avg"].numpy().copy()
                    arrays[f"adam_v.{name}"] = st["exp_avg_sq"].numpy().copy()
                arrays["adam_step"] = np.array([float(self._opt.state[next(iter(params.values()))]["step"])])
        return arrays, meta

    def import_shared(self, arrays: ArrayDict, meta: dict[str, Any]) -> None:
        self._check_shared_meta(meta, "cfc", ("horizon", "lookback", "units", "backbone_units",
                                              "backbone_layers", "periods", "skip", "scale_halflife", "warm_start",
                                              "replay_window"))
        saved = meta["params"]["mode"]
        if (saved == "cyclenet") != (self.mode == "cyclenet"):  # frozen and online share one layout (no cycle)
            raise ValueError(f"state has mode={saved!r}, this model {self.mode!r}")
        with self._train_lock, self._lock:
            self._reset_model()
            self.resize(int(meta["n_rows"]))
            if meta["cycle"] != self.cycle_:
                self._set_cycle(int(meta["cycle"]))
            self._rounds, self._due = int(meta["rounds"]), int(meta["due"])
            self._import_step(meta)
            self._rng.bit_generator.state = meta["rng"]
            self.fit_report_ = meta.get("fit_report", {})
            if not meta["fitted"]:
                return
            net = build_net(self._n_inputs, self.units, self.horizon, self.backbone_units, self.backbone_layers,
                            self.seed)
            with torch.no_grad():
                for name, p in net.named_parameters():
                    p.copy_(torch.from_numpy(np.asarray(arrays[f"net.{name}"])))
            net.eval()
            self.net_ = net
            if not self._learns:
                return
            self._new_trainer()
            if "adam_step" not in arrays:  # saved frozen, learning now (gated online learning's candidate)
                return
            step = torch.tensor(float(np.asarray(arrays["adam_step"])[0]))
            for name, p in self._trainer.named_parameters():
                st = self._opt.state[p]
                st["exp_avg"].copy_(torch.from_numpy(np.asarray(arrays[f"adam_m.{name}"])))
                st["exp_avg_sq"].copy_(torch.from_numpy(np.asarray(arrays[f"adam_v.{name}"])))
                st["step"] = step.clone()


class _WarmFit:
    """The warm-start recipe as a resumable loop over windows of a (rows, ticks) block.

    Adam on the masked MSE, windows reshuffled every epoch, lr flat for 4 epochs then x0.8 per epoch, at most
    ``epochs`` epochs, early stopping on the validation windows with ``patience`` (the best weights are kept).
    :meth:`run` advances it one optimiser step at a time until done (True) or out of budget (False).
    """

    FLAT_EPOCHS, DECAY = 4, 0.8

    def __init__(self, model: CfCForecaster, net: LiquidNet, q: nn.Parameter | None,
                 data: tuple[np.ndarray, np.ndarray, np.ndarray], ticks: np.ndarray,
                 train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], cycle: int) -> None:
        self.model, self.net, self.q, self.ticks = model, net, q, ticks
        self.raw, self.mean, self.scale = data  # (rows, ticks) each: values and the scaler at every tick
        self.train, self.val, self.cycle = train, val, cycle
        params = list(net.parameters()) + ([q] if q is not None else [])
        self.optimizer = torch.optim.Adam(params, lr=model.lr)
        self.rng = np.random.default_rng(model.seed)
        self.report: dict[str, Any] = {"epochs": 0, "best_epoch": 0, "train_mse": [], "val_mse": [],
                                       "train_windows": int(train[0].size), "val_windows": int(val[0].size)}
        self.done = train[0].size == 0
        self._loop = self._steps()

    def run(self, budget_seconds: float = math.inf) -> bool:
        began = time.perf_counter()
        deadline = began + budget_seconds
        while not self.done:
            next(self._loop, None)
            if time.perf_counter() >= deadline:
                break
        self.report["seconds"] = self.report.get("seconds", 0.0) + time.perf_counter() - began
        return self.done

    def _loss(self, rows: np.ndarray, idx: np.ndarray, train: bool = False) -> torch.Tensor:
        span = idx[:, None] - self.model.lookback + 1 + np.arange(self.model._window)
        q = self.q[torch.from_numpy(rows)] if self.q is not None else None
        at = (rows[:, None], span)
        z = self.model._window_z(self.raw[at], self.mean[at], self.scale[at])
        if train:
            z = self.model._drop_inputs(z, self.rng)
        return self.model._window_loss(self.net, z, self.ticks[at], q, self.cycle)

    def _val_mse(self) -> float:
        rows, idx = self.val
        total, weight = 0.0, 0
        with torch.no_grad():
            for lo in range(0, rows.size, 4096):
                sl = slice(lo, lo + 4096)
                n = int(np.isfinite(self.raw[rows[sl, None], idx[sl, None] + 1 + np.arange(self.model.horizon)]).sum())
                total += float(self._loss(rows[sl], idx[sl])) * n
                weight += n
        return total / max(weight, 1)

    def _steps(self) -> Iterator[None]:
        best, best_state, bad = math.inf, None, 0
        bs = self.model.batch_size
        for epoch in range(1, self.model.epochs + 1):
            for group in self.optimizer.param_groups:
                group["lr"] = self.model.lr * self.DECAY ** max(0, epoch - self.FLAT_EPOCHS)
            order = self.rng.permutation(self.train[0].size)
            n_batches = max(order.size // bs, 1)  # the last partial batch is dropped, as CycleNet's loader does
            losses = []
            for b in range(n_batches):
                sel = order[b * bs : (b + 1) * bs]
                loss = self._loss(self.train[0][sel], self.train[1][sel], train=True)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(loss.item())
                yield
            self.report["epochs"] = epoch
            self.report["train_mse"].append(float(np.mean(losses)))
            if self.val[0].size:
                val = self._val_mse()
                self.report["val_mse"].append(val)
                if val <= best:
                    best, bad, self.report["best_epoch"] = val, 0, epoch
                    best_state = copy.deepcopy((self.net.state_dict(), None if self.q is None else self.q.detach()))
                else:
                    bad += 1
                if bad >= self.model.patience:
                    break
            yield
        if best_state is not None:
            self.net.load_state_dict(best_state[0])
            if self.q is not None:
                with torch.no_grad():
                    self.q.copy_(best_state[1])
        self.done = True


def build(horizon: int, **params: Any) -> CfCForecaster | CfCEnsemble:
    """Registry factory: ``build(horizon, lookback=24, mode="online", units=32, warm_start=500, ...)``.

    See :class:`CfCForecaster` for every parameter. ``members=K`` (K > 1) gives an
    :class:`~tidecast.models.ensemble.Ensemble` of K networks seeded ``seed``, ``seed + 1``, ... whose forecasts
    are averaged.

    >>> build(horizon=3, members=2, warm_start=60).get_params()["members"]
    2
    """
    members = params.pop("members", 1)
    check_count("members", members)
    require(members <= MAX_MEMBERS, "members", members, f"at most {MAX_MEMBERS} networks")
    if members == 1:
        return CfCForecaster(horizon=horizon, **params)
    return CfCEnsemble(horizon=horizon, members=members, **params)


#: Networks an ensemble may hold: each is a network and a hidden state per series, trained every round.
MAX_MEMBERS = 64


class CfCEnsemble(Ensemble):
    """``members`` :class:`CfCForecaster` networks seeded ``seed``, ``seed + 1``, ...; forecasts their mean
    (:class:`~tidecast.models.ensemble.Ensemble`). Takes :class:`CfCForecaster`'s parameters, so that
    ``CfCEnsemble(**model.get_params())`` rebuilds it.

    >>> model = CfCEnsemble(horizon=3, members=2, warm_start=60, seed=4)
    >>> [m.seed for m in model.members_], model.get_params()["members"]
    ([4, 5], 2)
    """

    name = CfCForecaster.name  # the registry's "cfc", as one network

    def __init__(self, horizon: int, members: int = 2, seed: int = 0, persistence_half_life: int = 0,
                 **params: Any) -> None:
        # the blend goes around the members' mean (Ensemble), the members run unblended
        super().__init__(functools.partial(CfCForecaster, horizon), params, members, seed,
                         persistence_half_life=persistence_half_life, horizon=horizon)

    def _rebuilt(self, params: dict[str, Any], size: int, seed: int) -> CfCEnsemble:
        return CfCEnsemble(horizon=self.horizon, members=size, seed=seed, **params)


make = build


def _safe_std(std: np.ndarray) -> np.ndarray:
    """A standard deviation usable as a scale: 1 where a series is constant or has no spread yet."""
    return np.where(np.isfinite(std) & (std > 0), std, 1.0)
