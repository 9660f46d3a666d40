"""The model contract as runnable checks: what the engine relies on from a forecaster or a calibrator.

Also importable as ``tidecast.checks``. A plug-in author hands over a *factory* (a callable that builds a new,
identical, unfitted object) and gets an ``AssertionError`` that says what broke::

    from tidecast import checks
    checks.check_forecaster(lambda: MyModel(period=24))
    checks.check_calibrator(lambda: MyCalibrator(horizon=3, alpha=0.1))

Forecasters (:class:`~tidecast.models.base.BatchForecaster`) are fed a small synthetic stream: a few series
with a cycle of ``period`` ticks, each on its own clock, arriving in random subsets and orders, some values flagged
as ``filled``. Calibrators (:class:`~tidecast.monitors.conformal.base.Calibrator`) get autocorrelated residuals
with some cells not matured. Each check is also available on its own (:data:`FORECASTER_CHECKS`,
:data:`CALIBRATOR_CHECKS`):

* **params** - ``get_params`` rebuilds an object with the same parameters (calibrators: through JSON);
* **no_interval / cold_start** - a row or cell that has seen nothing answers ``NaN`` ("not ready"), never a
  value it cannot know; nor does a row one observation short of what ``first_forecast_after()`` announces;
* **no_look_ahead** - what was issued never changes afterwards and never depends on later inputs (for
  calibrators: nor on residuals that had not matured, i.e. masked cells);
* **vectorised** - a table of N rows gives the same outputs as N one-row tables. A model with shared state
  (weights every row uses, e.g. CycleNet's backbone) cannot match N independent fits, so its one-row tables take
  over the table's shared state (``export_shared``/``import_shared``) and their row (``export_rows``/
  ``import_rows``) part-way through, and must agree from then on; for such a model the factory must freeze the
  shared state once fitted (CycleNet: ``online=False``) and do its work inline (``defer=False``);
* **round_trip** - ``export_rows``/``export_shared`` through the checkpoint format, imported into a fresh object
  at other rows, continue identically;
* **row_reuse** - a row whose series was dropped (``drop_rows``), overwritten with a blank row (the export of
  a row nothing touched), serves a new series exactly like a new table (given the same shared state).
* **seed** (calibrators) - ``seed(rows, residuals)`` starts the rows afresh from residual sequences: a cell with
  no seeded residual has no interval and one with some has one, a table seeded at once equals one-row tables
  seeded alone (and they go on alike), seeding a used row equals seeding a new one, other rows are untouched,
  and the seeded state survives the checkpoint format;
* **calibration** (forecasters) - what ``pop_calibration(horizon)`` hands over is well formed (rows the model
  serves, residuals (rows, steps, horizon)), comes no later than the row's first forecast, never changes once
  handed over, and depends only on values learned before it was handed over (no look-ahead).

``rtol`` loosens the comparisons for models whose batched arithmetic depends on the batch size (float32 matrix
products); the default demands bit-identical outputs.

>>> from tidecast import checks
>>> from tidecast.models.naive import SeasonalNaive
>>> checks.check_forecaster(lambda: SeasonalNaive(period=6))
>>> from tidecast.monitors.conformal import make_calibrator
>>> checks.check_calibrator(lambda: make_calibrator("quantile-tracker", horizon=3, alpha=0.1))

A model that forecasts before it has data fails:

>>> class Eager(SeasonalNaive):
...     def forecast_many(self, rows, horizon):
...         return np.nan_to_num(super().forecast_many(rows, horizon))  # 0.0 instead of "not ready"
>>> checks.check_forecaster(lambda: Eager(period=6))
Traceback (most recent call last):
...
AssertionError: Eager: a row that has seen nothing must forecast NaN (not ready), got [[0. 0. 0. 0.] ...
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tidecast.models.base import ArrayDict, BatchForecaster, read_only
from tidecast.monitors.conformal.base import Calibrator
from tidecast.stream.state import decode_blob, encode_blob

ForecasterFactory = Callable[[], BatchForecaster]
CalibratorFactory = Callable[[], Calibrator]

__all__ = [
    "CALIBRATOR_CHECKS",
    "FORECASTER_CHECKS",
    "Options",
    "check_calibrator",
    "check_forecaster",
]


@dataclass(frozen=True)
class Options:
    """The synthetic stream the checks run on.

    horizon: steps asked of a forecaster (a calibrator uses its own). n_series: rows in the table. n_steps:
    rounds fed; the handover (export, drop, change of input) happens at ``handover`` x n_steps. period: cycle
    of the synthetic series. rtol: relative tolerance of the comparisons (0 = identical). seed: the stream's.
    """

    horizon: int = 4
    n_series: int = 3
    n_steps: int = 160
    period: int = 6
    handover: float = 0.6
    rtol: float = 0.0
    seed: int = 0

    @property
    def cut(self) -> int:
        return int(self.handover * self.n_steps)


# -- comparisons ---------------------------------------------------------------------------------------
def _name(obj: Any) -> str:
    return type(obj).__name__


def _assert_close(got: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    got, expected = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {expected.shape}")
    if not np.allclose(got, expected, rtol=rtol, atol=0.0, equal_nan=True):
        raise AssertionError(f"{what}:\n  got      {got.tolist()}\n  expected {expected.tolist()}")


def _assert_informative(outputs: list[np.ndarray], who: str, what: str) -> None:
    """A comparison of nothing but NaN proves nothing: demand some finite output."""
    if not any(np.isfinite(o).any() for o in outputs):
        raise AssertionError(f"{who}: no finite {what} during the check ({what} stay NaN); give the factory a "
                             "shorter warm-up or the check more steps (n_steps)")


def _through_checkpoint(meta: dict[str, Any], arrays: ArrayDict, who: str) -> tuple[dict[str, Any], ArrayDict]:
    """What a save and a restore give back: JSON meta, numeric arrays (the state store's blob format)."""
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in NUMERIC_KINDS:
            raise AssertionError(f"{who}: state {key!r} must be a numeric numpy array (bool, integer or float), got "
                                 f"{type(value).__name__}"
                                 f"{'' if not isinstance(value, np.ndarray) else f' of dtype {value.dtype}'}")
    try:
        return decode_blob(encode_blob(meta, arrays))
    except Exception as err:  # noqa: BLE001 - safetensors' own error is no TypeError/ValueError
        raise AssertionError(f"{who}: state cannot be checkpointed (JSON meta, numeric arrays): "
                             f"{type(err).__name__}: {err}") from err


#: numpy dtype kinds the state store keeps (bool, signed and unsigned integers, floats); strings and complex
#: numbers have no safetensors dtype.
NUMERIC_KINDS = "biuf"
#: ``export_shared`` meta keys the engine keeps for itself beside a model's own (its retraining state, the lane's
#: step clock).
RESERVED_SHARED_KEYS = ("retrain", "lane_clock")


def _export_rows(model: BatchForecaster, rows: np.ndarray, who: str) -> ArrayDict:
    """``model.export_rows(rows)``, its failure a failed check: a state the model cannot write (a numpy Generator
    in a per-series object) raised its own TypeError from inside the export."""
    try:
        return model.export_rows(rows)
    except (TypeError, ValueError) as err:
        raise AssertionError(f"{who}: export_rows failed, so its series could not be checkpointed: "
                             f"{type(err).__name__}: {err}") from err


def _check_row_state(state: ArrayDict, n_rows: int, who: str) -> None:
    for key, value in state.items():
        if np.ndim(value) == 0 or np.shape(value)[0] != n_rows:
            raise AssertionError(f"{who}: export_rows of {n_rows} rows gave {key!r} of shape {np.shape(value)}; "
                                 "the first axis must run over the rows")


# -- the synthetic forecaster stream ----------------------------------------------------------------------
@dataclass
class _Round:
    rows: np.ndarray
    ticks: np.ndarray
    values: np.ndarray
    filled: np.ndarray


def _rounds(opts: Options, seed: int, rows: np.ndarray | None = None, start: int = 0) -> list[_Round]:
    """``n_steps`` rounds over ``rows``: each round a random subset in random order, each row on its own clock
    (its ticks continue its own count), a cycle of ``period`` plus noise, every 11th value flagged filled."""
    rng = np.random.default_rng(seed)
    rows = np.arange(opts.n_series) if rows is None else rows
    k = np.arange(rows.size)
    clock = start + 1000 * (1 + k) + 7 * k
    level, amplitude = 10.0 * (1 + k), 1.0 + k
    seen = np.zeros(rows.size, dtype=np.int64)
    out = []
    for _ in range(opts.n_steps):
        present = rng.random(rows.size) < 0.85
        if not present.any():
            present[rng.integers(rows.size)] = True
        idx = rng.permutation(np.flatnonzero(present))
        ticks = clock[idx] + seen[idx]
        values = level[idx] + amplitude[idx] * np.sin(2 * np.pi * ticks / opts.period)
        values = values + 0.3 * rng.normal(size=idx.size)
        out.append(_Round(rows[idx], ticks, values, seen[idx] % 11 == 5))
        seen[idx] += 1
    return out


def _feed(model: BatchForecaster, rounds: list[_Round], horizon: int, row_map: dict[int, int] | None = None,
          only: int | None = None) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Learn then forecast, round by round. ``row_map`` moves stream rows to other table rows; ``only`` keeps one
    stream row. Returns ``(round, stream row, forecast as returned, copy taken when issued)`` per row and round."""
    issued = []
    for k, rnd in enumerate(rounds):
        keep = np.ones(rnd.rows.size, bool) if only is None else rnd.rows == only
        if not keep.any():
            continue
        rows = rnd.rows[keep]
        table_rows = np.array([row_map.get(int(r), int(r)) for r in rows]) if row_map else rows
        inputs = [read_only(a) for a in (table_rows, rnd.ticks[keep], rnd.values[keep], rnd.filled[keep])]
        try:
            model.learn_many(*inputs[:3], filled=inputs[3])
            forecast = model.forecast_many(inputs[0], horizon)
        except ValueError as err:
            if "read-only" not in str(err):
                raise
            raise AssertionError(f"{_name(model)}: learn_many/forecast_many wrote into an input array ({err}); the "
                                 "engine hands the same arrays to every lane and keeps the values as the "
                                 "actuals: copy before changing them") from err
        if not isinstance(forecast, np.ndarray) or forecast.dtype.kind not in "iuf":
            raise AssertionError(f"{_name(model)}: forecast_many must return a numpy array of numbers, got "
                                 f"{type(forecast).__name__}"
                                 f"{f' of dtype {forecast.dtype}' if isinstance(forecast, np.ndarray) else ''}")
        if np.shape(forecast) != (rows.size, horizon):
            raise AssertionError(f"{_name(model)}: forecast_many({rows.size} rows, {horizon}) returned shape "
                                 f"{np.shape(forecast)}, expected {(rows.size, horizon)}")
        for i, row in enumerate(rows.tolist()):
            issued.append((k, row, forecast[i], np.array(forecast[i], dtype=float, copy=True)))
    return issued


def _by_row(issued: list[tuple[int, int, np.ndarray, np.ndarray]], since: int = 0) -> dict[tuple[int, int], np.ndarray]:
    return {(k, row): copy for k, row, _, copy in issued if k >= since}


def _new(factory: ForecasterFactory, n_rows: int) -> BatchForecaster:
    model = factory()
    model.resize(n_rows)
    return model


def _shares_state(model: BatchForecaster) -> bool:
    arrays, meta = model.export_shared()
    return bool(arrays) or bool(meta)


def _shared_state(model: BatchForecaster) -> tuple[ArrayDict, dict[str, Any]]:
    """``model.export_shared()`` as a restore would read it back."""
    arrays, meta = model.export_shared()
    taken = [key for key in RESERVED_SHARED_KEYS if key in meta]
    if taken:
        raise AssertionError(f"{_name(model)}: export_shared meta key(s) {taken} are the engine's (it saves its "
                             "retraining state beside the model's under them); name yours otherwise")
    meta, arrays = _through_checkpoint(meta, arrays, _name(model))
    return arrays, meta


# -- forecaster checks --------------------------------------------------------------------------------
def check_forecaster_params(factory: ForecasterFactory, **options: Any) -> None:
    """``type(m)(**m.get_params())`` has the same parameters, and ``clone()`` too."""
    model = factory()
    params = model.get_params()
    for rebuilt in (type(model)(**params), model.clone()):
        if rebuilt.get_params() != params:
            raise AssertionError(f"{_name(model)}: rebuilding from get_params() changed them: {params} -> "
                                 f"{rebuilt.get_params()}")


def check_forecaster_cold_start(factory: ForecasterFactory, **options: Any) -> None:
    """A row that has seen nothing forecasts NaN; where the model says how many observations its first forecast
    needs (``first_forecast_after``), a row that has seen one fewer still forecasts NaN."""
    opts = Options(**options)
    model = _new(factory, 2)
    forecast = np.asarray(model.forecast_many(np.array([0, 1]), opts.horizon), dtype=float)
    if not np.isnan(forecast).all():
        raise AssertionError(f"{_name(model)}: a row that has seen nothing must forecast NaN (not ready), got "
                             f"{forecast}")
    said = model.first_forecast_after()
    if said is None:
        return
    needs, why = said
    if not isinstance(needs, int | np.integer) or needs < 1 or not isinstance(why, str):
        raise AssertionError(f"{_name(model)}: first_forecast_after() must be (observations >= 1, phrase) or None, "
                             f"got {said!r}")
    ticks = np.arange(needs - 1)
    for tick in ticks:
        model.learn_many(np.array([0]), np.array([tick]), np.array([10.0 + np.sin(2 * np.pi * tick / opts.period)]))
    early = np.asarray(model.forecast_many(np.array([0]), opts.horizon), dtype=float)
    if not np.isnan(early).all():
        raise AssertionError(f"{_name(model)}: forecast after {ticks.size} observations, before the {needs} its "
                             f"first_forecast_after() says ({why})")


def check_forecaster_no_look_ahead(factory: ForecasterFactory, **options: Any) -> None:
    """Forecasts never change after they are issued and never depend on values learned later."""
    opts = Options(**options)
    rounds = _rounds(opts, opts.seed)
    other = [
        rnd if k < opts.cut else _Round(rnd.rows, rnd.ticks, -3.0 * rnd.values + 100.0, rnd.filled)
        for k, rnd in enumerate(rounds)
    ]
    a = _feed(_new(factory, opts.n_series), rounds, opts.horizon)
    b = _feed(_new(factory, opts.n_series), other, opts.horizon)
    who = _name(factory())
    for (k, row, returned, copy), (_, _, returned_b, _) in zip(a, b, strict=True):
        _assert_close(returned, copy, 0.0, f"{who}: the forecast issued in round {k} for row {row} changed after "
                                           "it was returned (it shares memory with the model's state)")
        if k < opts.cut:
            _assert_close(returned_b, copy, 0.0, f"{who}: the forecast issued in round {k} for row {row} depends "
                                                 f"on values learned after round {opts.cut}")
    _assert_informative([c for k, _, _, c in a if k < opts.cut], who, "forecasts before the handover")


def check_forecaster_vectorised(factory: ForecasterFactory, **options: Any) -> None:
    """One table of N rows == N one-row tables (after handing over shared state, for models that have it)."""
    opts = Options(**options)
    rounds = _rounds(opts, opts.seed + 1)
    table = _new(factory, opts.n_series)
    who = _name(table)
    first = _by_row(_feed(table, rounds[: opts.cut], opts.horizon))
    shared = _shares_state(table)
    singles, compared = [], []
    for row in range(opts.n_series):
        single = _new(factory, 1)
        if shared:  # from the handover on, with the table's shared state and this row's own
            single.import_shared(*_shared_state(table))
            single.import_rows(np.array([0]), _export_rows(table, np.array([row]), who))
        else:  # from scratch, side by side
            for k, _, _, copy in _feed(single, rounds[: opts.cut], opts.horizon, {row: 0}, only=row):
                _assert_close(first[(k, row)], copy, opts.rtol, f"{who}: row {row} of a {opts.n_series}-row table "
                                                                f"and a one-row table disagree in round {k}")
                compared.append(copy)
        singles.append(single)
    later = _by_row(_feed(table, rounds[opts.cut :], opts.horizon))
    for row, single in enumerate(singles):
        for k, _, _, copy in _feed(single, rounds[opts.cut :], opts.horizon, {row: 0}, only=row):
            _assert_close(later[(k, row)], copy, opts.rtol,
                          f"{who}: row {row} of a {opts.n_series}-row table and a one-row table disagree in round "
                          f"{opts.cut + k}" + (" (after taking over the table's shared state)" if shared else ""))
            compared.append(copy)
    _assert_informative(compared, who, "forecasts")


def check_forecaster_round_trip(factory: ForecasterFactory, **options: Any) -> None:
    """export_rows + export_shared through the checkpoint format into a fresh object, at other rows: the same
    forecasts afterwards."""
    opts = Options(**options)
    rounds = _rounds(opts, opts.seed + 2)
    model = _new(factory, opts.n_series)
    _feed(model, rounds[: opts.cut], opts.horizon)
    who = _name(model)
    rows = np.arange(opts.n_series)
    state = _export_rows(model, rows, who)
    _check_row_state(state, rows.size, who)
    _, state = _through_checkpoint({}, state, who)
    moved = rows[::-1] + 2  # another table, other rows
    fresh = _new(factory, int(moved.max()) + 1)
    fresh.import_shared(*_shared_state(model))
    fresh.import_rows(moved, state)
    a = _feed(model, rounds[opts.cut :], opts.horizon)
    b = _feed(fresh, rounds[opts.cut :], opts.horizon, dict(zip(rows.tolist(), moved.tolist(), strict=True)))
    for (k, row, _, expected), (_, _, _, got) in zip(a, b, strict=True):
        _assert_close(got, expected, opts.rtol, f"{who}: after export/import (row {row} -> {moved[row]}) the "
                                                f"forecast of round {opts.cut + k} differs")
    _assert_informative([c for *_, c in a], who, "forecasts after the round trip")


def check_forecaster_row_reuse(factory: ForecasterFactory, **options: Any) -> None:
    """drop_rows + a blank row imported = a fresh row: a new series there forecasts as in a new table."""
    opts = Options(**options)
    rounds = _rounds(opts, opts.seed + 3)
    model = _new(factory, opts.n_series)
    _feed(model, rounds[: opts.cut], opts.horizon)
    who = _name(model)
    # the series seen most often: the one whose state (and any part of a fit) is most likely to linger
    reused = int(np.argmax(np.bincount(np.concatenate([r.rows for r in rounds[: opts.cut]]),
                                       minlength=opts.n_series)))
    blank = _export_rows(_new(factory, 1), np.array([0]), who)
    model.drop_rows(np.array([reused]))
    model.import_rows(np.array([reused]), blank)
    reference = _new(factory, opts.n_series)
    reference.import_shared(*_shared_state(model))
    # the other rows go on with their series; the reused row gets a new one, on another clock and level
    newcomer = _rounds(opts, opts.seed + 4, rows=np.array([reused]), start=50_000)
    later = []
    for rnd, new in zip(rounds[opts.cut :], newcomer, strict=False):
        keep = rnd.rows != reused
        later.append(_Round(np.concatenate([rnd.rows[keep], new.rows]), np.concatenate([rnd.ticks[keep], new.ticks]),
                            np.concatenate([rnd.values[keep], new.values + 5.0]),
                            np.concatenate([rnd.filled[keep], new.filled])))
    got = _by_row(_feed(model, later, opts.horizon))
    expected = _feed(reference, later, opts.horizon, only=reused)
    for k, row, _, copy in expected:
        _assert_close(got[(k, row)], copy, opts.rtol,
                      f"{who}: row {row}, reused after drop_rows and a blank import_rows, forecasts differently "
                      f"from a new table in round {opts.cut + k} (state of the dropped series left behind?)")
    _assert_informative([c for *_, c in expected], who, "forecasts of the reused row")


def check_forecaster_growth(factory: ForecasterFactory, **options: Any) -> None:
    """``resize`` to more rows keeps every row's state: the engine grows its tables as new series arrive."""
    opts = Options(**options)
    rounds = _rounds(opts, opts.seed + 6)
    kept, grown = _new(factory, opts.n_series), _new(factory, opts.n_series)
    who = _name(kept)
    _feed(kept, rounds[: opts.cut], opts.horizon)
    _feed(grown, rounds[: opts.cut], opts.horizon)
    grown.resize(2 * opts.n_series + 3)
    expected = _feed(kept, rounds[opts.cut :], opts.horizon)
    for (k, row, _, want), (_, _, _, got) in zip(expected, _feed(grown, rounds[opts.cut :], opts.horizon),
                                                strict=True):
        _assert_close(got, want, opts.rtol, f"{who}: after resize({2 * opts.n_series + 3}) row {row} forecasts "
                                            f"differently in round {opts.cut + k}: growing the table lost state")
    _assert_informative([c for *_, c in expected], who, "forecasts after the growth")


def _popped(model: BatchForecaster, rounds: list[_Round], horizon: int) -> tuple[dict, dict]:
    """Feed ``rounds`` (learn, forecast, pop as the engine does); returns (row -> (round, residuals) of its
    hand-off, row -> round of its first finite forecast)."""
    handed: dict[int, tuple[int, np.ndarray]] = {}
    first: dict[int, int] = {}
    who = _name(model)
    for k, rnd in enumerate(rounds):
        model.learn_many(rnd.rows, rnd.ticks, rnd.values, filled=rnd.filled)
        forecast = np.asarray(model.forecast_many(rnd.rows, horizon), dtype=float)
        for row in rnd.rows[np.isfinite(forecast).any(axis=1)].tolist():
            first.setdefault(row, k)
        got = model.pop_calibration(horizon)
        if got is None:
            continue
        rows, residuals = np.asarray(got.rows), np.asarray(got.residuals)
        if residuals.ndim != 3 or residuals.shape[0] != rows.size or residuals.shape[2] != horizon:
            raise AssertionError(f"{who}: pop_calibration({horizon}) gave residuals of shape {residuals.shape} for "
                                 f"{rows.size} rows; expected (rows, steps, {horizon})")
        learned = {int(r) for up in rounds[: k + 1] for r in up.rows}
        if len(set(rows.tolist())) != rows.size or not set(rows.tolist()) <= learned:
            raise AssertionError(f"{who}: pop_calibration handed over rows {rows.tolist()}: unique rows the model "
                                 "has learned are expected")
        for i, row in enumerate(rows.tolist()):
            handed.setdefault(row, (k, residuals[i].copy(), residuals[i]))
    for row, (k, copy, returned) in handed.items():
        _assert_close(returned, copy, 0.0, f"{who}: the calibration handed over for row {row} in round {k} changed "
                                           "afterwards (it shares memory with the model's state)")
    return {row: (k, copy) for row, (k, copy, _) in handed.items()}, first


def check_forecaster_calibration(factory: ForecasterFactory, **options: Any) -> None:
    """pop_calibration: well formed, no later than the row's first forecast, never changed afterwards, no
    look-ahead."""
    opts = Options(**options)
    rounds = _rounds(opts, opts.seed + 5)
    handed, first = _popped(_new(factory, opts.n_series), rounds, opts.horizon)
    who = _name(factory())
    for row, (k, _) in handed.items():
        if row in first and k > first[row]:
            raise AssertionError(f"{who}: row {row} forecast first in round {first[row]} but its calibration came "
                                 f"in round {k}: the engine would issue its first intervals unseeded")
    # The same stream with every value after the cut changed: hand-offs made before the cut must not change.
    other = [rnd if k < opts.cut else _Round(rnd.rows, rnd.ticks, -3.0 * rnd.values + 100.0, rnd.filled)
             for k, rnd in enumerate(rounds)]
    handed_b, _ = _popped(_new(factory, opts.n_series), other, opts.horizon)
    for row, (k, residuals) in handed.items():
        if k < opts.cut:
            if row not in handed_b:
                raise AssertionError(f"{who}: row {row}'s calibration (round {k}) vanished when later values changed")
            _assert_close(handed_b[row][1], residuals, opts.rtol,
                          f"{who}: row {row}'s calibration (round {k}) depends on values learned after round "
                          f"{opts.cut}")


FORECASTER_CHECKS: dict[str, Callable[..., None]] = {
    "params": check_forecaster_params,
    "cold_start": check_forecaster_cold_start,
    "no_look_ahead": check_forecaster_no_look_ahead,
    "vectorised": check_forecaster_vectorised,
    "round_trip": check_forecaster_round_trip,
    "row_reuse": check_forecaster_row_reuse,
    "growth": check_forecaster_growth,
    "calibration": check_forecaster_calibration,
}


def check_forecaster(factory: ForecasterFactory, **options: Any) -> None:
    """Run every forecaster check (:data:`FORECASTER_CHECKS`); ``options`` as in :class:`Options`."""
    for check in FORECASTER_CHECKS.values():
        check(factory, **options)


# -- the synthetic residual stream ----------------------------------------------------------------------
@dataclass
class _Update:
    rows: np.ndarray
    residuals: np.ndarray
    mask: np.ndarray


def _updates(opts: Options, horizon: int, seed: int, rows: np.ndarray | None = None) -> list[_Update]:
    """AR(1) residuals per (row, h) with a per-row scale; random subsets of rows in random orders; a cell
    matures only once its row has been seen h times, and 10 % of the others stay unmatured. Unmatured cells
    carry garbage, which a calibrator must ignore."""
    rng = np.random.default_rng(seed)
    rows = np.arange(opts.n_series) if rows is None else rows
    scale = rng.uniform(0.5, 3.0, size=(rows.size, 1))
    e = np.zeros((rows.size, horizon))
    seen = np.zeros(rows.size, dtype=np.int64)
    out = []
    for _ in range(opts.n_steps):
        e = 0.7 * e + scale * rng.normal(size=e.shape)
        present = rng.random(rows.size) < 0.85
        if not present.any():
            present[rng.integers(rows.size)] = True
        idx = rng.permutation(np.flatnonzero(present))
        mask = (seen[idx, None] > np.arange(horizon)[None, :]) & (rng.random((idx.size, horizon)) > 0.1)
        residuals = np.where(mask, e[idx], 1e6 * rng.normal(size=(idx.size, horizon)))
        out.append(_Update(rows[idx], residuals, mask))
        seen[idx] += 1
    return out


def _calibrate(cal: Calibrator, updates: list[_Update], row_map: dict[int, int] | None = None,
               only: int | None = None) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Update then issue intervals around fixed per-row means, step by step; returns (step, stream row,
    (lower, upper) as returned, copy when issued) per row and step."""
    issued = []
    for k, up in enumerate(updates):
        keep = np.ones(up.rows.size, bool) if only is None else up.rows == only
        if not keep.any():
            continue
        rows = up.rows[keep]
        table_rows = np.array([row_map.get(int(r), int(r)) for r in rows]) if row_map else rows
        cal.update(table_rows, up.residuals[keep], up.mask[keep])
        means = np.repeat(rows[:, None].astype(float), cal.horizon, axis=1)
        lower, upper = cal.interval(table_rows, means)
        for i, row in enumerate(rows.tolist()):
            both = np.stack([lower[i], upper[i]])
            issued.append((k, row, (lower[i], upper[i]), np.array(both, dtype=float, copy=True)))
    return issued


def _calibrator_options(options: dict[str, Any]) -> Options:
    return Options(**{"n_steps": 120, "rtol": 1e-12, **options})


def check_calibrator_params(factory: CalibratorFactory, **options: Any) -> None:
    """``get_params`` survives JSON and rebuilds a calibrator with the same parameters."""
    cal = factory()
    try:
        params = json.loads(json.dumps(cal.get_params(), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise AssertionError(f"{_name(cal)}: get_params() must be JSON-able: {err}") from err
    for rebuilt in (type(cal)(**params), cal.clone()):
        if rebuilt.get_params() != cal.get_params():
            raise AssertionError(f"{_name(cal)}: rebuilding from get_params() changed them: {cal.get_params()} -> "
                                 f"{rebuilt.get_params()}")


def check_calibrator_no_interval(factory: CalibratorFactory, **options: Any) -> None:
    """A cell with no matured residual has no interval: NaN bounds, in ``interval`` and ``intervals``."""
    cal = factory()
    rows, who = np.array([0, 1]), _name(cal)
    means = np.ones((2, cal.horizon))
    for name, (lo, hi) in (("interval", cal.interval(rows, means)), ("intervals", cal.intervals(rows, means))):
        if not (np.isnan(lo).all() and np.isnan(hi).all()):
            raise AssertionError(f"{who}: {name}() of cells with no data must be NaN (no interval yet), got lower "
                                 f"{np.asarray(lo).tolist()}, upper {np.asarray(hi).tolist()}")
    mask = np.zeros((2, cal.horizon), bool)
    mask[0, 0] = True  # only row 0, h = 1 matured
    cal.update(rows, np.full((2, cal.horizon), 0.5), mask)
    lo, hi = cal.interval(rows, means)
    if np.isnan(lo[0, 0]) or np.isnan(hi[0, 0]):
        raise AssertionError(f"{who}: a cell that learned a residual still gives no interval")
    if not (np.isnan(lo[~mask]).all() and np.isnan(hi[~mask]).all()):
        raise AssertionError(f"{who}: cells with no data must stay NaN after another cell learned, got lower "
                             f"{lo.tolist()}, upper {hi.tolist()}")


def check_calibrator_no_look_ahead(factory: CalibratorFactory, **options: Any) -> None:
    """Intervals never change after they are issued, never depend on later residuals nor on unmatured cells."""
    opts = _calibrator_options(options)
    cal = factory()
    who = _name(cal)
    updates = _updates(opts, cal.horizon, opts.seed)
    later = [up if k < opts.cut else _Update(up.rows, 50.0 * up.residuals, up.mask) for k, up in enumerate(updates)]
    clean = [_Update(up.rows, np.where(up.mask, up.residuals, 0.0), up.mask) for up in updates]
    a = _calibrate(cal, updates)
    b = _calibrate(factory(), later)
    c = _calibrate(factory(), clean)
    reacted = False
    for (k, row, (lo, hi), copy), (_, _, _, copy_b), (_, _, _, copy_c) in zip(a, b, c, strict=True):
        _assert_close(np.stack([lo, hi]), copy, 0.0, f"{who}: the interval issued at step {k} for row {row} "
                                                     "changed after it was returned")
        _assert_close(copy_c, copy, 0.0, f"{who}: the interval at step {k} for row {row} depends on residuals "
                                         "in cells whose mask was False (not matured)")
        if k < opts.cut:
            _assert_close(copy_b, copy, 0.0, f"{who}: the interval issued at step {k} for row {row} depends on "
                                             f"residuals given after step {opts.cut}")
        elif not np.allclose(copy_b, copy, equal_nan=True):
            reacted = True
    if not reacted:
        raise AssertionError(f"{who}: intervals never reacted to the residuals (50x larger ones after step "
                             f"{opts.cut} changed nothing)")


def check_calibrator_vectorised(factory: CalibratorFactory, **options: Any) -> None:
    """One table of N rows (updated in random subsets and orders) == N one-row tables."""
    opts = _calibrator_options(options)
    table = factory()
    updates = _updates(opts, table.horizon, opts.seed + 1)
    whole = _by_row(_calibrate(table, updates))
    for row in range(opts.n_series):
        for k, _, _, copy in _calibrate(factory(), updates, {row: 0}, only=row):
            _assert_close(whole[(k, row)], copy, opts.rtol, f"{_name(table)}: row {row} of a {opts.n_series}-row "
                                                             f"table and a one-row table disagree at step {k}")
    _assert_informative(list(whole.values()), _name(table), "intervals")


def check_calibrator_round_trip(factory: CalibratorFactory, **options: Any) -> None:
    """export_rows through the checkpoint format, imported at other rows of a calibrator rebuilt from its JSON
    params: the same intervals afterwards."""
    opts = _calibrator_options(options)
    cal = factory()
    who = _name(cal)
    updates = _updates(opts, cal.horizon, opts.seed + 2)
    _calibrate(cal, updates[: opts.cut])
    rows = np.arange(opts.n_series)
    state = cal.export_rows(rows)
    _check_row_state(state, rows.size, who)
    params, state = _through_checkpoint(cal.get_params(), state, who)
    fresh = type(cal)(**params)
    moved = rows[::-1] + 2
    fresh.import_rows(moved, state)
    a = _calibrate(cal, updates[opts.cut :])
    b = _calibrate(fresh, updates[opts.cut :], dict(zip(rows.tolist(), moved.tolist(), strict=True)))
    for (k, row, _, expected), (_, _, _, got) in zip(a, b, strict=True):
        _assert_close(got, expected, opts.rtol, f"{who}: after export/import (row {row} -> {moved[row]}) the "
                                                f"interval at step {opts.cut + k} differs")
    _assert_informative([c for *_, c in a], who, "intervals after the round trip")


def check_calibrator_row_reuse(factory: CalibratorFactory, **options: Any) -> None:
    """A blank row imported over a used one = a fresh row: a new series there calibrates as in a new table."""
    opts = _calibrator_options(options)
    cal = factory()
    who = _name(cal)
    updates = _updates(opts, cal.horizon, opts.seed + 3)
    _calibrate(cal, updates[: opts.cut])
    reused = opts.n_series // 2
    blank_source = factory()
    blank_source.resize(1)
    cal.import_rows(np.array([reused]), blank_source.export_rows(np.array([0])))
    newcomer = _updates(opts, cal.horizon, opts.seed + 4, rows=np.array([reused]))
    later = []
    for up, new in zip(updates[opts.cut :], newcomer, strict=False):
        keep = up.rows != reused
        later.append(_Update(np.concatenate([up.rows[keep], new.rows]),
                             np.concatenate([up.residuals[keep], new.residuals]),
                             np.concatenate([up.mask[keep], new.mask])))
    got = _by_row(_calibrate(cal, later))
    expected = _calibrate(factory(), later, only=reused)
    for k, row, _, copy in expected:
        _assert_close(got[(k, row)], copy, opts.rtol, f"{who}: row {row}, reused after a blank import_rows, "
                                                      f"calibrates differently from a new table at step {k}")
    _assert_informative([c for *_, c in expected], who, "intervals of the reused row")


def _seed_sequences(opts: Options, horizon: int, seed: int, n_rows: int) -> np.ndarray:
    """(rows, steps, horizon) AR(1) residuals, NaN in 10 % of the cells and in the whole last column of row 0 (a
    cell with nothing to seed)."""
    rng = np.random.default_rng(seed)
    steps = max(opts.n_steps // 3, 2 * horizon + 2)
    e = np.zeros((n_rows, steps, horizon))
    for t in range(1, steps):
        e[:, t] = 0.7 * e[:, t - 1] + rng.uniform(0.5, 3.0) * rng.normal(size=(n_rows, horizon))
    e[rng.random(e.shape) < 0.1] = np.nan
    e[0, :, -1] = np.nan
    return e


def check_calibrator_seed(factory: CalibratorFactory, **options: Any) -> None:
    """seed(rows, residuals): no interval where nothing was seeded, an interval elsewhere; one table == one-row
    tables; a used row seeded == a new row seeded; other rows untouched; state round trip."""
    opts = _calibrator_options(options)
    table = factory()
    who, horizon, n = _name(table), table.horizon, opts.n_series
    seeds = _seed_sequences(opts, horizon, opts.seed + 6, n)
    rows = np.arange(n)
    table.seed(rows, seeds)
    means = np.zeros((n, horizon))
    lo, hi = table.interval(rows, means)
    nothing = ~np.isfinite(seeds).any(axis=1)
    if not (np.isnan(lo[nothing]).all() and np.isnan(hi[nothing]).all()):
        raise AssertionError(f"{who}: a cell seeded with no residual must have no interval (NaN)")
    if np.isnan(lo[~nothing]).any() or np.isnan(hi[~nothing]).any():
        raise AssertionError(f"{who}: a seeded cell has no interval: lower {lo.tolist()}")
    updates = _updates(opts, horizon, opts.seed + 7)
    whole = _by_row(_calibrate(table, updates))
    for row in range(n):
        single = factory()
        single.seed(np.array([0]), seeds[row : row + 1])
        for k, _, _, copy in _calibrate(single, updates, {row: 0}, only=row):
            _assert_close(whole[(k, row)], copy, opts.rtol, f"{who}: row {row} of a seeded {n}-row table and a "
                                                             f"one-row table seeded alike disagree at step {k}")
    # seeding a used row == seeding a new one; the other rows do not move
    used = factory()
    _calibrate(used, updates[: opts.cut])
    before = used.export_rows(rows)
    used.seed(np.array([n - 1]), seeds[:1])
    fresh = factory()
    fresh.seed(np.array([0]), seeds[:1])
    _assert_close(np.stack(used.interval(np.array([n - 1]), means[:1])),
                  np.stack(fresh.interval(np.array([0]), means[:1])), opts.rtol,
                  f"{who}: seeding a used row must start it afresh (as a new row seeded alike)")
    after = used.export_rows(rows[:-1])
    for key, value in after.items():
        _assert_close(value, before[key][:-1], 0.0, f"{who}: seeding row {n - 1} changed {key!r} of other rows")
    # the seeded state survives the checkpoint format
    params, state = _through_checkpoint(fresh.get_params(), fresh.export_rows(np.array([0])), who)
    restored = type(fresh)(**params)
    restored.import_rows(np.array([3]), state)
    a = _calibrate(fresh, updates, only=0)
    b = _calibrate(restored, updates, {0: 3}, only=0)
    for (k, _, _, expected), (_, _, _, got) in zip(a, b, strict=True):
        _assert_close(got, expected, opts.rtol, f"{who}: a seeded row after export/import differs at step {k}")


CALIBRATOR_CHECKS: dict[str, Callable[..., None]] = {
    "params": check_calibrator_params,
    "no_interval": check_calibrator_no_interval,
    "no_look_ahead": check_calibrator_no_look_ahead,
    "vectorised": check_calibrator_vectorised,
    "round_trip": check_calibrator_round_trip,
    "row_reuse": check_calibrator_row_reuse,
    "seed": check_calibrator_seed,
}


def check_calibrator(factory: CalibratorFactory, **options: Any) -> None:
    """Run every calibrator check (:data:`CALIBRATOR_CHECKS`); ``options`` as in :class:`Options` (calibrators
    default to 120 steps and ``rtol=1e-12``)."""
    for check in CALIBRATOR_CHECKS.values():
        check(factory, **options)
