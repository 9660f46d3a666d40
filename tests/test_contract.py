"""The model contract (tidecast.checks) over every registered model and calibrator, and the checks themselves:
each one must catch the defect it is there for."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from conftest import CentresInPlace, ListOut, ObjectOut

from tidecast import checks
from tidecast.models.adapters import PerSeries
from tidecast.models.base import BatchForecaster, Calibration
from tidecast.models.naive import SeasonalNaive
from tidecast.models.registry import MODELS, make_model
from tidecast.monitors.conformal import CALIBRATORS, make_calibrator
from tidecast.monitors.conformal.tracker import QuantileTracker

REPO = Path(__file__).resolve().parents[1]
HORIZON = 4

#: Small settings so every model is ready within the checks' stream; a new model runs with its defaults and the
#: checks say so if it never forecasts.
MODEL_PARAMS = {
    "seasonal-naive": {"max_period": 12, "detect_after": 30},  # the detection path
    "holt-winters": {"period": 6, "warmup": 20},
    "snarimax": {"period": 6, "warmup": 20},
    # shared weights: frozen after the fit (online=False) and fitted inline (defer=False), see tidecast.checks
    # (lr and epochs: enough for the cycle table to learn visibly, so a row that kept a dropped series' cycle
    # column would show)
    "cyclenet": {"lookback": 12, "cycle": 6, "warm_start": 48, "epochs": 5, "lr": 0.05, "batch_size": 16,
                 "replay_window": 32, "replay_batch": 16, "online": False, "defer": False},
    "cfc": {"lookback": 8, "units": 8, "backbone_units": 16, "warm_start": 40, "epochs": 3, "batch_size": 16,
            "replay_window": 16, "mode": "frozen", "defer": False},
}
#: float32 matrix products differ in the last bits with the batch size: the torch models' tables and one-row
#: tables agree to float32 precision, not bit for bit.
MODEL_OPTIONS = {"cyclenet": {"rtol": 1e-6}, "cfc": {"rtol": 1e-6}}
#: SPCI refits a forest per cell and step (refit_every=1: its forest cache is not state, so only then does a
#: restored table continue identically); a short horizon and stream keep its ~800 forest fits quick.
CALIBRATOR_PARAMS = {"spci": {"horizon": 2, "window": 5, "history": 40, "refit_every": 1, "n_estimators": 2,
                              "min_history": 20}}
CALIBRATOR_OPTIONS = {"spci": {"n_steps": 60, "n_series": 2}}


def model_factory(name: str):
    return lambda: make_model(name, horizon=HORIZON, **MODEL_PARAMS.get(name, {}))


def calibrator_factory(name: str):
    params = {"horizon": 3, "alpha": 0.1, **CALIBRATOR_PARAMS.get(name, {})}
    return lambda: make_calibrator(name, **params)


@pytest.mark.parametrize("check", list(checks.FORECASTER_CHECKS))
@pytest.mark.parametrize("name", list(MODELS))
def test_registered_model_keeps_the_contract(name: str, check: str) -> None:
    checks.FORECASTER_CHECKS[check](model_factory(name), horizon=HORIZON, **MODEL_OPTIONS.get(name, {}))


@pytest.mark.parametrize("check", list(checks.FORECASTER_CHECKS))
def test_a_river_lane_with_its_retrain_ring_keeps_the_contract(check: str) -> None:
    """As the engine builds it when retraining is on (stream.retrain.give_history): the ring is row state too."""
    def factory():
        return make_model("holt-winters", horizon=HORIZON, **MODEL_PARAMS["holt-winters"]).clone(history=30)
    checks.FORECASTER_CHECKS[check](factory, horizon=HORIZON)


@pytest.mark.parametrize("check", list(checks.FORECASTER_CHECKS))
def test_a_cfc_ensemble_keeps_the_contract(check: str) -> None:
    """``cfc`` with ``members=2``: the registry's factory gives an ensemble of two networks."""
    def factory():
        return make_model("cfc", horizon=HORIZON, **MODEL_PARAMS["cfc"], members=2)
    checks.FORECASTER_CHECKS[check](factory, horizon=HORIZON, **MODEL_OPTIONS["cfc"])


@pytest.mark.parametrize("check", list(checks.FORECASTER_CHECKS))
@pytest.mark.parametrize("name,extra", [("cyclenet", {}), ("cfc", {}), ("cfc", {"members": 2})],
                         ids=["cyclenet", "cfc", "cfc-ensemble"])
def test_a_model_blended_with_the_last_value_keeps_the_contract(name: str, extra: dict, check: str) -> None:
    """``persistence_half_life``: the blend's sums and past forecasts are row state too (models/persistence.py);
    an ensemble keeps them around its members' mean."""
    def factory():
        return make_model(name, horizon=HORIZON, **MODEL_PARAMS[name], persistence_half_life=24, **extra)
    checks.FORECASTER_CHECKS[check](factory, horizon=HORIZON, **MODEL_OPTIONS[name])


@pytest.mark.parametrize("check", list(checks.CALIBRATOR_CHECKS))
@pytest.mark.parametrize("name", list(CALIBRATORS))
def test_registered_calibrator_keeps_the_contract(name: str, check: str) -> None:
    checks.CALIBRATOR_CHECKS[check](calibrator_factory(name), **CALIBRATOR_OPTIONS.get(name, {}))


def test_the_whole_suite_runs_from_the_public_name() -> None:
    import tidecast
    import tidecast.checks

    assert tidecast.checks is checks
    checks.check_forecaster(lambda: SeasonalNaive(period=6))
    checks.check_calibrator(calibrator_factory("conformal-pid"))


def test_models_never_import_monitors_or_stream() -> None:
    """models is the lowest layer: monitors and stream build on it, never the other way round."""
    offenders = []
    for path in sorted((REPO / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n.startswith(("tidecast.monitors", "tidecast.stream"))]
    assert offenders == []


def test_cyclenet_shared_params_are_read_from_the_signature() -> None:
    """export_shared's params (checked by import_shared) come from the constructor: every argument, as given."""
    pytest.importorskip("torch")
    import inspect

    from tidecast.models.cyclenet import CycleNetForecaster

    model = model_factory("cyclenet")()
    _, meta = model.export_shared()
    assert list(meta["params"]) == [p for p in inspect.signature(CycleNetForecaster).parameters]
    assert CycleNetForecaster(**meta["params"]).get_params() == meta["params"]


# -- the checks catch what they are for ------------------------------------------------------------------
class Eager(SeasonalNaive):
    """Forecasts 0 before it has data."""

    def forecast_many(self, rows, horizon):
        return np.nan_to_num(super().forecast_many(rows, horizon))


class Overcautious(SeasonalNaive):
    """Announces a longer warm-up than it keeps (a replay's "never forecast" note would mislead)."""

    def first_forecast_after(self):
        return 10 * self.period, "period times ten"


class ReusedOutput(SeasonalNaive):
    """Writes every forecast into the same buffer (an allocation saved, and every earlier forecast overwritten)."""

    def forecast_many(self, rows, horizon):
        if not hasattr(self, "out_") or self.out_.shape[0] < len(rows):
            self.out_ = np.empty((max(len(rows), 64), horizon))
        out = self.out_[: len(rows)]
        out[...] = super().forecast_many(rows, horizon)
        return out


class PooledMean(BatchForecaster):
    """Forecasts the mean of everything it has seen, over all rows: rows are not independent."""

    name = "pooled-mean"

    def __init__(self) -> None:
        self.sum_, self.count_, self.seen_ = 0.0, 0, np.zeros(0, np.int64)

    def resize(self, n_rows):
        if n_rows > self.seen_.size:
            self.seen_ = np.concatenate([self.seen_, np.zeros(n_rows - self.seen_.size, np.int64)])

    def learn_many(self, rows, ticks, values, filled=None):
        self.sum_ += float(np.sum(values))
        self.count_ += len(values)
        self.seen_[rows] += 1

    def forecast_many(self, rows, horizon):
        ready = self.seen_[rows] > 0
        return np.where(ready[:, None], self.sum_ / max(self.count_, 1), np.nan) * np.ones((len(rows), horizon))

    def export_rows(self, rows):
        return {"seen": self.seen_[rows].copy()}

    def import_rows(self, rows, state):
        self.resize(int(rows.max()) + 1)
        self.seen_[rows] = state["seen"]


class ForgetsPeriod(SeasonalNaive):
    """Does not carry the detected period through export/import: the imported rows take "no cycle" (period 1). (Left
    at 0, "not detected yet", it detected the same cycle again at once on a clean series, and no check could tell.)"""

    def export_rows(self, rows):
        return {k: v for k, v in super().export_rows(rows).items() if k != "period"}

    def import_rows(self, rows, state):
        self.table_.import_rows(rows, state, ("buffer", "count", "last_tick"))
        self.period_[rows] = 1


class KeepsFirstValue(SeasonalNaive):
    """Keeps each row's first value outside its exported state: a reused row inherits the dropped series' one."""

    def __init__(self, period=6):
        super().__init__(period=period)
        self.first_ = np.full(64, np.nan)

    def learn_many(self, rows, ticks, values, filled=None):
        super().learn_many(rows, ticks, values, filled)
        self.first_[rows] = np.where(np.isnan(self.first_[rows]), values, self.first_[rows])

    def forecast_many(self, rows, horizon):
        return super().forecast_many(rows, horizon) + 0.01 * self.first_[rows, None]


class PointBeforeData(QuantileTracker):
    """A zero-width interval (the forecast itself) before a cell has data."""

    def interval(self, rows, means):
        lo, hi = super().interval(rows, means)
        return np.where(np.isnan(lo), means, lo), np.where(np.isnan(hi), means, hi)


class IgnoresMask(QuantileTracker):
    """Learns from every cell, matured or not."""

    def update(self, rows, residuals, mask=None):
        super().update(rows, residuals, None)


class SeedsOnTop(QuantileTracker):
    """Replays the seeds over whatever the row held before, instead of starting it afresh."""

    def reset_rows(self, rows):
        pass


class IgnoresSeeds(QuantileTracker):
    """Does nothing with the seeds."""

    def seed(self, rows, residuals):
        pass


class LateHandOff(SeasonalNaive):
    """Hands its detection window over one round after the row's first forecast."""

    def __init__(self, **params):
        super().__init__(**params)
        self._held = None

    def pop_calibration(self, horizon):
        held, self._held = self._held, super().pop_calibration(horizon)
        return held


class SharedHandOff(SeasonalNaive):
    """Hands over a view of its ring buffer, which later values overwrite."""

    def pop_calibration(self, horizon):
        ready = super().pop_calibration(horizon)
        if ready is None:
            return None
        row = int(ready.rows[0])
        ring = self.buffer_[row : row + 1, :, None]  # a view
        return Calibration(ready.rows[:1], np.broadcast_to(ring, (1, ring.shape[1], horizon)))


class StringState(SeasonalNaive):
    """Exports a string array: safetensors' own error escaped the checker, naming neither model nor key."""

    def export_rows(self, rows):
        return {**super().export_rows(rows), "label": np.array(["x"] * len(rows))}


class RetrainMeta(SeasonalNaive):
    """Uses the engine's own shared-state key: dropped at restore, which then failed."""

    def export_shared(self):
        return {"w": np.zeros(1)}, {"retrain": 1}


class WipesOnResize(SeasonalNaive):
    """Reallocates its table on resize without copying the rows it held."""

    def resize(self, n_rows):
        super().resize(n_rows)
        self.table_.blank(np.arange(n_rows))


class HoldsAGenerator:
    """A per-series forecaster keeping a numpy Generator, which river_state cannot write: the check raised that
    TypeError from inside export_rows instead of failing."""

    def __init__(self):
        self.rng, self.last = np.random.default_rng(0), 0.0

    def learn_one(self, y, x=None):
        self.last = y

    def forecast(self, horizon, xs=None):
        return [self.last] * horizon


@pytest.mark.parametrize(("factory", "check", "message"), [
    (lambda: PerSeries("gen", HoldsAGenerator, min_history=1), checks.check_forecaster_round_trip,
     "export_rows failed"),
    (lambda: ObjectOut(period=6), checks.check_forecaster_no_look_ahead, "numbers, got ndarray of dtype object"),
    (lambda: CentresInPlace(period=6), checks.check_forecaster_no_look_ahead, "wrote into an input array"),
    (lambda: ListOut(period=6), checks.check_forecaster_no_look_ahead, "array of numbers, got list"),
    (lambda: StringState(period=6), checks.check_forecaster_round_trip, "'label' must be a numeric numpy array"),
    (lambda: RetrainMeta(period=6), checks.check_forecaster_vectorised, r"key\(s\) \['retrain'\] are the engine's"),
    (lambda: WipesOnResize(period=6), checks.check_forecaster_growth, "growing the table lost state"),
    (lambda: SeedsOnTop(3), checks.check_calibrator_seed, "afresh"),
    (lambda: IgnoresSeeds(3), checks.check_calibrator_seed, "no interval"),
    (lambda: LateHandOff(max_period=12, detect_after=30), checks.check_forecaster_calibration, "unseeded"),
    (lambda: SharedHandOff(max_period=12, detect_after=30), checks.check_forecaster_calibration,
     "changed afterwards"),
    (lambda: Eager(period=6), checks.check_forecaster_cold_start, "must forecast NaN"),
    (lambda: Overcautious(period=6), checks.check_forecaster_cold_start, "before the 60 its first_forecast_after"),
    (lambda: ReusedOutput(period=6), checks.check_forecaster_no_look_ahead, "changed after it was returned"),
    (PooledMean, checks.check_forecaster_vectorised, "disagree"),
    (lambda: ForgetsPeriod(max_period=12, detect_after=30), checks.check_forecaster_round_trip, "differs"),
    (KeepsFirstValue, checks.check_forecaster_row_reuse, "reused after drop_rows"),
    (lambda: SeasonalNaive(period=500), checks.check_forecaster_vectorised, "no finite forecasts"),
    (lambda: PointBeforeData(3), checks.check_calibrator_no_interval, "must be NaN"),
    (lambda: IgnoresMask(3), checks.check_calibrator_no_look_ahead, "whose mask was False"),
])
def test_each_check_catches_its_defect(factory, check, message) -> None:
    with pytest.raises(AssertionError, match=message):
        check(factory)
