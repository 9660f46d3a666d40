"""Every built-in part refuses, when it is built, a parameter value it cannot use (a negative or NaN learning rate,
a lookback of 0, a forgetting factor above 1, a list of triggers given as one string), with the parameter named;
and the values at the edge of what it can use are still taken. ``tests/test_settings.py`` checks that the command
line reports them before any work, naming where they came from."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest

from tidecast.models.registry import make_model
from tidecast.monitors.bootstrap import BootstrapMonitor
from tidecast.monitors.conformal import make_calibrator
from tidecast.monitors.drift import make_detector
from tidecast.monitors.retrain import RetrainPolicy
from tidecast.stream.config import EngineConfig
from tidecast.stream.retrain import RetrainSettings, retrain_settings
from tidecast.stream.settings import SettingsError

NAN, INF = math.nan, math.inf


def _model(name: str) -> Callable[..., Any]:
    return lambda **kw: make_model(name, horizon=4, **kw)


def _calibrator(name: str) -> Callable[..., Any]:
    return lambda **kw: make_calibrator(name, 4, 0.1, **kw)


def _detector(name: str) -> Callable[..., Any]:
    return lambda **kw: make_detector(name, **kw)


def _bootstrap(**kw: Any) -> BootstrapMonitor:
    return BootstrapMonitor(make_model("seasonal-naive", horizon=4, bootstrap=4), 4, **kw)


BUILDERS: dict[str, Callable[..., Any]] = {
    "cyclenet": _model("cyclenet"), "cfc": _model("cfc"),
    "conformal-pid": _calibrator("conformal-pid"), "quantile-tracker": _calibrator("quantile-tracker"),
    "aci": _calibrator("aci"), "dtaci": _calibrator("dtaci"), "saocp": _calibrator("saocp"),
    "spci": _calibrator("spci"), "cusum": _detector("cusum"), "d3a": _detector("d3a"), "bootstrap": _bootstrap,
    "policy": RetrainPolicy, "settings": RetrainSettings, "retrain-param": lambda **kw: retrain_settings(kw),
}

REFUSED = [
    ("cyclenet", "lookback", 1), ("cyclenet", "lookback", -5), ("cyclenet", "hidden", 0), ("cyclenet", "lr", -1.0),
    ("cyclenet", "lr", NAN), ("cyclenet", "lr", INF), ("cyclenet", "epochs", 0), ("cyclenet", "patience", -1),
    ("cyclenet", "batch_size", 0), ("cyclenet", "online_lr", 0.0), ("cyclenet", "online_cycle_lr", NAN),
    ("cyclenet", "replay_steps", -1), ("cyclenet", "step_budget", 0.0), ("cyclenet", "step_budget", NAN),
    ("cyclenet", "max_cycle", 1), ("cyclenet", "input_limit", 0.0), ("cyclenet", "loss_limit", NAN),
    ("cyclenet", "cycle", 0), ("cyclenet", "cycle", 2.5), ("cyclenet", "defer", 0), ("cfc", "defer", "yes"),
    ("cfc", "backbone_units", 0), ("cfc", "backbone_layers", 0), ("cfc", "lr", 0.0), ("cfc", "epochs", 0),
    ("cfc", "online_lr", NAN), ("cfc", "online_huber", 0.0), ("cfc", "step_budget", -1.0), ("cfc", "cycle", NAN),
    ("conformal-pid", "lr", -1.0), ("conformal-pid", "lr", NAN), ("conformal-pid", "forget", 0.0),
    ("conformal-pid", "forget", 1.5), ("conformal-pid", "ridge", -1.0), ("conformal-pid", "scale_decay", 0.0),
    ("conformal-pid", "mean_decay", 2.0), ("conformal-pid", "ki", NAN), ("conformal-pid", "csat", 0.0),
    ("conformal-pid", "reseed_keep", 1.5), ("conformal-pid", "period", 0), ("quantile-tracker", "lr", NAN),
    ("aci", "gamma", 0.0), ("aci", "window", 0), ("dtaci", "gammas", ()), ("dtaci", "gammas", (0.01, -1.0)),
    ("dtaci", "interval_length", 0), ("saocp", "lifetime", 0), ("saocp", "slots", 0),
    ("spci", "history", 10), ("spci", "n_estimators", 0), ("spci", "bins", 0), ("spci", "min_history", 0),
    ("spci", "random_state", -1),
    ("cusum", "k", -1.0), ("cusum", "k", NAN), ("cusum", "h", NAN), ("cusum", "variance_ratio", NAN),
    ("cusum", "variance_ratio", INF), ("cusum", "coverage_ratio", 1.0), ("cusum", "warmup", 1),
    ("d3a", "window", 1), ("d3a", "z", 0.0), ("d3a", "max_age", 8),
    ("bootstrap", "threshold", NAN), ("bootstrap", "slack", -1.0), ("bootstrap", "slack", NAN),
    ("bootstrap", "scale_memory", 0),
    ("policy", "min_alarm_rows", 0), ("policy", "min_fresh", NAN), ("policy", "shadow_steps", 1),
    ("policy", "margin", 1.5), ("policy", "margin", NAN), ("policy", "flip_budget", 1.5),
    ("policy", "significance", NAN), ("policy", "triggers", "cusum"),
    ("settings", "epochs", 0), ("settings", "history", -1), ("settings", "lambdas", (0.0, 1.0)),
    ("retrain-param", "triggers", "cusum"), ("retrain-param", "cooldown_steps", 4),
]


@pytest.mark.parametrize(("part", "param", "value"), REFUSED, ids=[f"{p}.{k}={v!r}" for p, k, v in REFUSED])
def test_a_value_the_part_cannot_use_is_refused_when_it_is_built(part: str, param: str, value: Any) -> None:
    with pytest.raises(ValueError, match=param):
        BUILDERS[part](**{param: value})


TAKEN = [
    ("cyclenet", {"patience": 0, "replay_steps": 0, "step_budget": INF, "input_limit": None, "loss_limit": INF,
                  "lookback": 2, "cycle": 24}),
    ("cfc", {"patience": 0, "replay_steps": 0, "online_huber": None, "online_cycle_lr": None}),
    ("conformal-pid", {"forget": 1.0, "ridge": 0.0, "ki": 0.0, "reseed_keep": 0.0, "scorecaster": None}),
    ("cusum", {"k": 0.0, "h": INF, "variance_h": INF}),  # an infinite threshold: that statistic never alarms
    ("d3a", {"window": 2, "max_age": 2}),
    ("bootstrap", {"slack": 0.0, "threshold": INF}),
    ("policy", {"min_fresh": 0, "cooldown": 0, "margin": 0.0, "flip_budget": 1.0, "significance": 0.0,
                "triggers": ("cusum",)}),
    ("policy", {"margin": -1e9, "triggers": []}),  # bench/retrain.py's D3A baseline: no gate, no alarm trigger
    ("settings", {"history": 0, "lambdas": (1.0,)}),
    ("retrain-param", {"triggers": ["cusum"], "epochs": 2, "lambdas": [0.5, 1]}),
]


@pytest.mark.parametrize(("part", "params"), TAKEN, ids=[p for p, _ in TAKEN])
def test_values_at_the_edge_of_what_a_part_can_use_are_taken(part: str, params: dict[str, Any]) -> None:
    BUILDERS[part](**params)


def test_an_unknown_retrain_parameter_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"retrain parameter cooldown_steps: no such parameter; valid: .*cooldown"):
        retrain_settings({"cooldown_steps": 4})


@pytest.mark.parametrize("model, params, message", [
    ("cyclenet", {"cycle": 10**12}, "cycle = 1000000000000: a whole number of ticks from 1 to 100000"),
    ("cyclenet", {"hidden": 10**12, "backbone": "mlp"}, "hidden = 1000000000000: a whole number from 1 to 16,384"),
    ("cyclenet", {"seed": 2**64}, "seed = 18446744073709551616: a whole number from 0 to 4,294,967,295"),
    ("cyclenet", {"lr": 1e300}, "lr = 1e+300: a finite learning rate > 0, at most 1e+30"),
    ("cfc", {"units": 10**12}, "units = 1000000000000: a whole number from 1 to 16,384"),
    ("cfc", {"mode": "cyclenet", "cycle": 10**12}, "cycle = 1000000000000"),
    ("cfc", {"replay_batch": 10**12}, "replay_batch = 1000000000000: a whole number from 1 to 1,000,000"),
    ("cfc", {"members": 2, "seed": 2**64 - 1}, "seed = 18446744073709551615"),
])
def test_sizes_torch_cannot_take_are_refused_at_settings_time(model, params, message):
    """Found by the models review (2026-12-04): each passed the settings check and failed later, in torch's
    allocator, as a raw MemoryError during the check itself, or with "Overflow when unpacking long long" at the
    first fit, naming neither the lane nor the parameter."""
    with pytest.raises(SettingsError, match=re.escape(f"lane '{model}' ({model}): {message}")):
        EngineConfig(horizon=6, models=[model], model_params={model: params})


def assert_named_warm_start_is_the_least(cls, kwargs: dict) -> None:
    """``cls(**kwargs)`` is refused naming a ``warm_start`` that passes, and one less does not."""
    with pytest.raises(ValueError, match="is the least that passes") as refused:
        cls(**kwargs)
    need = int(re.search(r"warm_start=(\d+) is the least that passes", str(refused.value)).group(1))
    cls(**{**kwargs, "warm_start": need})
    with pytest.raises(ValueError):
        cls(**{**kwargs, "warm_start": need - 1})


@pytest.mark.parametrize("kwargs", [{"horizon": 1, "warm_start": 20}, {"horizon": 24, "warm_start": 100},
                                    {"horizon": 720, "warm_start": 100, "val_fraction": 0.5},
                                    {"horizon": 48, "warm_start": 20, "val_fraction": 0.05},
                                    {"horizon": 1, "lookback": 8, "warm_start": 5, "val_fraction": 0.05},
                                    {"horizon": 24, "warm_start": 10, "val_fraction": 1e-6}])
@pytest.mark.parametrize("model", ["cyclenet", "cfc"])
def test_the_warm_start_a_refusal_names_is_the_least_that_passes(model, kwargs):
    """Extremes review (2026-12-05): the hint (lookback + H + H / val_fraction) forgot that the validation part comes
    out of the block too: the value it named failed the same check (cyclenet at H = 1 named 101; 129 is the least)."""
    from tidecast.models.cyclenet import CycleNetForecaster
    from tidecast.models.liquid import CfCForecaster

    assert_named_warm_start_is_the_least(CycleNetForecaster if model == "cyclenet" else CfCForecaster, kwargs)


def test_the_warm_start_hint_counts_cyclenet_s_calibration_holdout_and_says_when_none_fits():
    """Review (2026-12-05): with calib_holdout the named value failed CycleNet's own check on the early-stopping part;
    where no value up to the cap passes, the hint named one above it."""
    from tidecast.models.cyclenet import CycleNetForecaster

    assert_named_warm_start_is_the_least(
        CycleNetForecaster, {"horizon": 24, "val_fraction": 0.25, "calib_holdout": 0.5, "warm_start": 100})
    with pytest.raises(ValueError, match="no warm_start up to 100000 passes: lower calib_holdout"):
        CycleNetForecaster(horizon=1000, val_fraction=0.99)
    with pytest.raises(ValueError, match=r"no warm_start up to 100000 passes: lower calib_holdout \(0.995\)"):
        CycleNetForecaster(horizon=500, val_fraction=0.5, calib_holdout=0.995, warm_start=50000)
