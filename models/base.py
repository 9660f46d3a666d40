"""The forecaster protocol.

Two levels, both pickle-free:

* :class:`Forecaster` — one series, river's verbs: ``learn_one(y, x=None)`` then ``forecast(horizon)``.
  Any river time-series model satisfies it, and so does anything a user writes in five lines.
* :class:`BatchForecaster` — a *group* of series served by one object, indexed by integer rows.
  The engine only ever talks to this level: one ``learn_many`` and one ``forecast_many`` per batch round,
  whatever the number of series. Vectorised models (seasonal naive, CycleNet) implement it directly;
  :class:`tidecast.models.adapters.PerSeries` lifts any :class:`Forecaster` factory to it.

Time enters as integer *ticks*: ``tick = (timestamp - anchor) // step`` on the series' regular grid, where the
anchor is fixed by the series' first timestamp modulo its step. Consecutive observations have consecutive ticks;
``tick % W`` is therefore a phase taken from the timestamp, never from a row count, so gaps cannot shift a cycle.

State is arrays + JSON: ``export_rows`` returns arrays whose first axis runs over the requested rows (so one series'
state can be cut out and moved, e.g. to another consumer), ``export_shared`` returns what all rows share
(a backbone's weights). Neither contains Python objects.

**Calibration hand-off.** A model that knows how wrong it is likely to be before it forecasts (a fit's validation
windows, a backtest over the history it holds) hands that over as a :class:`Calibration`: residuals per (row,
horizon) of data it was not trained on, taken only from data before the row's first forecast. The engine polls
:meth:`BatchForecaster.pop_calibration` once per round, before it asks the calibrator for intervals, and seeds the
rows' calibrator cells from them, so intervals are right from the first forecast. The hand-off is thread-safe
(:class:`CalibrationQueue`): a fit that finishes on a trainer thread queues it, the engine's thread takes it.

Parameters are the constructor's (scikit-learn's rule, river's mechanism): ``__init__`` stores each argument under its
own name, fitted state ends in ``_``, and :class:`Params` derives ``get_params`` from the signature, so a model
or calibrator can be rebuilt (``clone``) and its settings saved as JSON without a hand-written list.
"""

from __future__ import annotations

import inspect
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

ArrayDict = dict[str, np.ndarray]


@dataclass
class Calibration:
    """Residuals a model hands to the engine for its calibrators (see the module docstring).

    ``rows`` (n,) are table rows; ``residuals`` (n, T, H) float: ``residuals[i, t, h-1]`` is ``y - yhat`` of the
    h-step forecast whose *target* is the t-th of the row's last T ticks before the hand-off (oldest first), as a
    calibrator would have seen it mature at that tick; ``NaN`` where there is none. ``T`` may be 0 (nothing to
    replay). Only data before the row's first forecast may enter (no look-ahead).

    >>> c = Calibration(np.array([3]), np.zeros((1, 5, 2)))
    >>> c.n_steps, c.horizon
    (5, 2)
    """

    rows: np.ndarray
    residuals: np.ndarray

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.residuals = np.asarray(self.residuals, dtype=float)
        if self.residuals.ndim != 3 or self.residuals.shape[0] != self.rows.size:
            raise ValueError(f"residuals must be (rows, steps, horizon) with {self.rows.size} rows, got "
                             f"{self.residuals.shape}")

    @property
    def n_steps(self) -> int:
        return self.residuals.shape[1]

    @property
    def horizon(self) -> int:
        return self.residuals.shape[2]

    def without(self, rows: np.ndarray) -> Calibration | None:
        """This hand-off less ``rows`` (their series left; the rows will serve others); ``None`` if nothing is
        left."""
        keep = ~np.isin(self.rows, rows)
        return Calibration(self.rows[keep], self.residuals[keep]) if keep.any() else None

    @staticmethod
    def concat(parts: list[Calibration]) -> Calibration | None:
        """One hand-off from several (longer time axes pad the shorter ones with leading NaN); a row in several
        keeps its last. ``None`` for no parts."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        steps = max(p.n_steps for p in parts)
        horizon = max(p.horizon for p in parts)
        last: dict[int, tuple[int, int]] = {}
        for k, p in enumerate(parts):
            for i, row in enumerate(p.rows.tolist()):
                last[row] = (k, i)
        out = np.full((len(last), steps, horizon), np.nan)
        for j, (k, i) in enumerate(last.values()):
            r = parts[k].residuals[i]
            out[j, steps - r.shape[0]:, : r.shape[1]] = r
        return Calibration(np.array(list(last), dtype=np.int64), out)


class CalibrationQueue:
    """A thread-safe mailbox of :class:`Calibration` hand-offs: models ``put``, the engine ``pop``s them all.

    A hand-off is not model state: the engine drains the queue into its calibrators before it exports series
    (:meth:`~tidecast.stream.engine.Engine.export_series`), so a checkpoint never leaves one behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list[Calibration] = []

    def put(self, calibration: Calibration) -> None:
        if calibration.rows.size:
            with self._lock:
                self._parts.append(calibration)

    def pop(self) -> Calibration | None:
        if not self._parts:  # the common case, without the lock: a list's truth value is atomic
            return None
        with self._lock:
            parts, self._parts = self._parts, []
        return Calibration.concat(parts)

    def discard(self, rows: np.ndarray) -> None:
        """Forget what is queued for ``rows`` (their series left; the rows will serve others)."""
        with self._lock:
            self._parts = [kept for part in self._parts if (kept := part.without(rows)) is not None]

    def clear(self) -> None:
        with self._lock:
            self._parts = []


def require(ok: bool, name: str, value: object, rule: str) -> None:
    """``ValueError("name = value: rule")`` unless ``ok``: constructors check their parameters with it."""
    if not ok:
        raise ValueError(f"{name} = {value!r}: {rule}")


def read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view of ``array``: what the engine hands a model's ``learn_many`` and ``forecast_many`` (every
    lane gets the same arrays, and the values are also the actuals it scores)."""
    view = array.view()
    view.flags.writeable = False
    return view


#: Largest width of a network layer (CycleNet's ``hidden``, cfc's ``units`` and ``backbone_units``): the papers'
#: models use 512 at most; 1e12 passed the check and failed in torch's allocator, or as a raw MemoryError.
MAX_UNITS = 16_384
#: Largest batch of training windows a step draws (cfc's and CycleNet's ``replay_batch``, ``batch_size``).
MAX_BATCH = 1_000_000
#: Largest seed: torch takes a 64-bit one and an ensemble adds its member index (2**64 raised an overflow).
MAX_SEED = 2**32 - 1


def check_count(name: str, value: object, low: int = 1, high: int | None = None) -> None:
    """A whole number ``>= low`` (and ``<= high`` when given: a size that would exhaust memory; bools are not
    counts).

    >>> check_count("epochs", 0)
    Traceback (most recent call last):
    ...
    ValueError: epochs = 0: a whole number >= 1
    """
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)
    require(ok, name, value, f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high:,}")


def check_positive(name: str, value: object, optional: bool = False, rule: str = "a number > 0",
                   finite: bool = False) -> None:
    """A real number ``> 0``, or ``None`` when ``optional``; NaN never, ``inf`` ("no limit") unless ``finite``.

    >>> check_positive("lr", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: lr = nan: a number > 0
    """
    if optional and value is None:
        return
    ok = isinstance(value, int | float | np.number) and not isinstance(value, bool) and value > 0
    require(ok and (not finite or value < float("inf")), name, value, rule + (" (or None)" if optional else ""))


#: The largest learning rate taken: torch keeps an optimiser's rate as float32, and 1e300 passed the settings check
#: to fail at the first fit with "value cannot be converted to type float without overflow".
MAX_RATE = 1e30


def check_rate(name: str, value: object, optional: bool = False) -> None:
    """A finite learning rate ``> 0`` and at most :data:`MAX_RATE` (or ``None`` when ``optional``)."""
    check_positive(name, value, optional, rule="a finite learning rate > 0", finite=True)
    if value is not None:
        require(value <= MAX_RATE, name, value, f"a finite learning rate > 0, at most {MAX_RATE:g}")


def check_between(name: str, value: object, low: float, high: float, open_low: bool = False,
                  open_high: bool = False) -> None:
    """A real number in ``[low, high]``, with either end open (``open_low``, ``open_high``); NaN never.

    >>> check_between("forget", 0.0, 0.0, 1.0, open_low=True)
    Traceback (most recent call last):
    ...
    ValueError: forget = 0.0: a number in (0, 1]
    """
    ok = isinstance(value, int | float | np.number) and not isinstance(value, bool)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    require(ok, name, value, f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, tuples -> Python scalars and lists, so parameters are JSON-able as they are."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


class Params:
    """``get_params`` and ``clone`` derived from the ``__init__`` signature.

    Each named constructor argument is read back from the attribute of the same name (``*args``/``**kwargs`` are
    not parameters), so the constructor must store its arguments as given - or as an equivalent value that
    rebuilds the same object.

    >>> class Smoother(Params):
    ...     def __init__(self, alpha: float = 0.5, window: tuple = (1, 2)) -> None:
    ...         self.alpha = alpha
    ...         self.window = window
    ...         self.level_ = 0.0
    >>> Smoother(alpha=0.2).get_params()
    {'alpha': 0.2, 'window': [1, 2]}
    >>> Smoother(alpha=0.2).clone(window=(3,)).get_params()
    {'alpha': 0.2, 'window': [3]}
    """

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, in signature order (tuples and numpy values as lists and Python scalars)."""
        params = {}
        for name, parameter in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            try:
                params[name] = _plain(getattr(self, name))
            except AttributeError:
                raise AttributeError(
                    f"{type(self).__name__}.__init__ takes {name!r} but does not store it as self.{name}; "
                    "store every constructor argument under its own name") from None
        return params

    def clone(self, **overrides: Any) -> Self:
        """A new, unfitted object with the same parameters, except ``overrides``."""
        return type(self)(**{**self.get_params(), **overrides})


@runtime_checkable
class Forecaster(Protocol):
    """One series, river's protocol (``river.time_series.base.Forecaster``)."""

    def learn_one(self, y: float, x: dict | None = None) -> None: ...

    def forecast(self, horizon: int, xs: list[dict] | None = None) -> list[float]: ...


def notify_step(model: object, at_ns: int | None) -> None:
    """Call ``model``'s optional :meth:`BatchForecaster.begin_step` hook with the lane's step clock, where it has
    one (a plug-in or an ensemble member may not) and the clock has started."""
    begin = getattr(model, "begin_step", None)
    if begin is not None and at_ns is not None:
        begin(at_ns)


class BatchForecaster(Params, ABC):
    """A table of forecasters over integer rows (one row per series).

    Contract the engine relies on:

    * ``learn_many(rows, ticks, values, filled=None)``: ``rows`` are unique within a call; for each row,
      ``ticks`` is the row's next tick (strictly greater than the previous one it saw; the engine imputes short
      gaps itself, so a jump only follows :meth:`reset_rows`). Values are finite floats. ``filled`` (bool per
      row, ``None`` = all real) marks values the engine interpolated into a short gap: grid models learn them
      like any other; a model that handles irregular time itself may skip them.
    * ``forecast_many(rows, horizon)`` returns an ``(len(rows), horizon)`` float array: column ``h-1`` is the
      forecast for tick ``last_tick + h``. ``NaN`` means "not ready yet" (warm-up) and no interval is emitted.
    * ``maintenance(budget_seconds)`` does deferred heavy work (fitting, replay training) and must return within
      roughly the budget; the engine calls it between batches, ``serve`` from a worker thread.
    * ``pop_calibration(horizon)`` returns residuals for the calibrators of rows about to forecast (or that just
      started), at most once per row and fit, or ``None``; see the module docstring. Models without any return
      ``None``.
    """

    #: Registry name, e.g. ``"seasonal-naive"``; used in metrics labels and forecast records.
    name: str = "model"
    #: Whether the rows share learned state (CycleNet's backbone), so that one series' forecasts already depend on
    #: the others'. The engine pools young calibrator cells across series only for such models by default: a
    #: model of independent rows keeps each series' forecasts and intervals a function of that series alone.
    couples_rows: bool = False

    @abstractmethod
    def resize(self, n_rows: int) -> None:
        """Make room for at least ``n_rows`` rows; new rows start empty."""

    @abstractmethod
    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        """Feed one new observation to each of ``rows`` (``filled``: True where the value was interpolated). The
        arrays are the engine's, read-only: every lane gets the same ones."""

    @abstractmethod
    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        """Point forecasts for the next ``horizon`` ticks of each row, shape ``(len(rows), horizon)``."""

    def spread_many(self, rows: np.ndarray, horizon: int) -> np.ndarray | None:
        """Bootstrap replicas' spread: ``(len(rows), horizon)`` standard deviations of the replicas' forecasts
        (series units, ``NaN`` where not ready), or ``None`` for a model run without replicas (``bootstrap=0``,
        the default). Call right after :meth:`forecast_many` for the same rows (:mod:`tidecast.models.bootstrap`)."""
        return None

    def reset_rows(self, rows: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Forget the recent history of ``rows`` (after a long gap); learned parameters may stay."""

    def begin_step(self, at_ns: int) -> None:  # noqa: B027 - optional hook
        """Before each :meth:`learn_many`: ``at_ns`` is the lane's step clock (epoch ns,
        :class:`~tidecast.stream.clock.StepClock`), the newest grid time step the lane has seen - not necessarily
        the time of the rows about to be learned. It repeats while rounds bring no newer step (a batch that cut a
        time, a partition read behind the others, gap fills, a time held as far ahead): a model that learns once
        per round (online replay steps) learns once per step, wherever batches cut."""

    def drop_rows(self, rows: np.ndarray) -> None:  # noqa: B027 - optional hook
        """These rows' series left this process (their state moved elsewhere); the engine will reuse the rows for
        other series after overwriting their per-row state with a blank row. Forget any row-indexed cache."""

    def maintenance(self, budget_seconds: float) -> None:  # noqa: B027 - optional hook
        """Deferred heavy work; the default model has none."""

    def first_forecast_after(self) -> tuple[int, str] | None:
        """Observations a series needs before this model's first forecast, and what sets that number (a short
        phrase naming the parameter), so a replay that ends before any forecast can say why; ``None``: not known
        ahead."""
        return None

    def pop_calibration(self, horizon: int) -> Calibration | None:
        """Residuals of the 1..``horizon``-step forecasts to seed the calibrators with, queued since the last call
        (thread-safe); ``None``: none."""
        return None

    @abstractmethod
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        """Per-row state: arrays whose first axis has ``len(rows)`` entries."""

    @abstractmethod
    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        """Inverse of :meth:`export_rows` (rows may differ from the exporting table's)."""

    def export_shared(self) -> tuple[ArrayDict, dict[str, Any]]:
        """State shared by all rows (weights) and JSON-able settings; empty for per-series models. The meta key
        ``retrain`` is the engine's (its retraining state is saved beside the model's)."""
        return {}, {}

    def import_shared(self, arrays: ArrayDict, meta: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Inverse of :meth:`export_shared`."""
