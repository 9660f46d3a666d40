"""Plug-ins: a model and a calibrator from an installed distribution's entry points, and river forecasters by import
path, in replay and serve.

The worked example is ``tests/plugin_example`` (its own ``pyproject.toml``). It is installed for real — ``pip
install --no-deps --no-build-isolation --target DIR`` — and found through ``importlib.metadata`` once ``DIR`` is
on the path, as a ``pip install`` into the environment would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tidecast
from tidecast import checks
from tidecast.models.registry import MODELS, make_model, model_parameters
from tidecast.monitors.conformal import CALIBRATORS, make_calibrator
from tidecast.stream.cli import main
from tidecast.stream.config import EngineConfig
from tidecast.stream.settings import SettingsError

EXAMPLE = Path(__file__).resolve().parent / "plugin_example"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """The example plug-in installed into a fresh target directory, on ``sys.path`` for this module's tests."""
    target = tmp_path_factory.mktemp("plugins") / "site"
    build = tmp_path_factory.mktemp("plugin-build")
    source = build / "plugin_example"
    subprocess.run(["cp", "-r", str(EXAMPLE), str(source)], check=True)  # setuptools writes build files beside it
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, cwd=build)
    assert any(p.name.startswith("tidecast_example_plugin-") for p in target.glob("*.dist-info"))
    sys.path.insert(0, str(target))
    yield str(target)
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("tidecast_example_plugin")]:
        del sys.modules[name]


def cycles(n: int = 300, series: tuple[str, ...] = ("a", "b")) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.concat([pd.DataFrame({"unique_id": sid, "ds": pd.date_range("2024-01-01", periods=n, freq="h"),
                                    "y": 20 + 0.01 * np.arange(n) + 4 * np.sin(np.arange(n) * np.pi / 6)
                                    + rng.normal(0, 0.5, n)}) for sid in series], ignore_index=True)


# -- entry points ------------------------------------------------------------------------------------------
def test_without_the_distribution_the_names_are_unknown():
    if any(ep.name == "damped-drift" for ep in entry_points(group="tidecast.models")):
        pytest.skip("the example plug-in is installed in this environment (or by an earlier test here)")
    assert "damped-drift" not in MODELS and "gaussian-ewma" not in CALIBRATORS
    with pytest.raises(SettingsError, match="unknown model 'damped-drift'"):
        EngineConfig(models=["drift=damped-drift"])


def test_installed_entry_points_add_a_model_and_a_calibrator(installed):
    assert "damped-drift" in list(MODELS) and "gaussian-ewma" in list(CALIBRATORS)
    assert model_parameters("damped-drift") == {"damping": float}
    model = make_model("damped-drift", horizon=3, damping=0.5)
    assert type(model).__module__ == "tidecast_example_plugin" and model.get_params() == {"damping": 0.5}
    with pytest.raises(SettingsError, match="drift.slope: damped-drift has no parameter 'slope'; valid: damping"):
        EngineConfig(models=["drift=damped-drift"], model_params={"drift": {"slope": 1}})
    calibrator = make_calibrator("gaussian-ewma", horizon=3, alpha=(0.2, 0.05), weight=0.1)
    assert calibrator.get_params() == {"horizon": 3, "alpha": [0.2, 0.05], "weight": 0.1}


def test_the_example_plugin_passes_the_contract_checks(installed):
    checks.check_forecaster(lambda: make_model("damped-drift", horizon=4, damping=0.9))
    checks.check_calibrator(lambda: make_calibrator("gaussian-ewma", horizon=3, alpha=(0.2, 0.05)))


def test_plugin_model_and_calibrator_run_in_the_python_api(installed):
    result = tidecast.replay(cycles(), models=["drift=damped-drift", "seasonal-naive"], horizon=4,
                             levels=(80, 95), calibrator="gaussian-ewma",
                             model_params={"drift": {"damping": 0.8}, "seasonal-naive": {"period": 12}})
    summary = result.summary().set_index("model")
    assert set(summary.index) == {"drift", "seasonal-naive"}
    drift = result.forecasts[result.forecasts["model"] == "drift"]
    first = drift.iloc[0]  # ready after two observations: the first forecast is issued at the second
    assert first["cutoff"] == pd.Timestamp("2024-01-01T01:00Z")
    assert 0.6 < summary.loc["drift", "coverage-80"] < 0.95 and summary.loc["drift", "width-95"] > \
        summary.loc["drift", "width-80"]


def test_plugin_model_runs_in_the_replay_command(installed, tmp_path):
    data = tmp_path / "long.csv"
    cycles(200).to_csv(data, index=False)
    summary = tmp_path / "summary.json"
    assert main(["replay", str(data), "--model", "drift=damped-drift", "--model-param", "drift.damping=0.9",
                 "--calibrator", "gaussian-ewma", "--horizon", "3", "--no-progress", "--summary-json", str(summary),
                 "--dead-letter", str(tmp_path / "dead.jsonl")]) == 0
    scores = json.loads(summary.read_text())["models"]["drift"]
    assert scores["n_forecasts"] == 2 * 199 * 3 and scores["coverage"] > 0.5


# -- river by import path -----------------------------------------------------------------------------------
def test_a_river_forecaster_by_import_path_is_safe_during_warm_up():
    result = tidecast.replay(cycles(200, ("a",)), models=["snx=river:time_series.SNARIMAX"], horizon=3,
                             model_params={"snx": {"p": 2, "d": 0, "q": 1, "warmup": 48}}, levels=(90,))
    f = result.forecasts
    assert f["cutoff"].min() == pd.Timestamp("2024-01-01T00:00Z") + pd.Timedelta(hours=47)  # after 48 values
    assert np.isfinite(f["mean"]).all() and len(f) == (200 - 47) * 3
    assert result.summary().loc[0, "mae"] < 5  # standardised on the warm-up window: no divergence


def test_river_lanes_need_an_alias_a_forecaster_class_and_known_parameters():
    with pytest.raises(SettingsError, match="a river lane needs an alias, e.g. snx=river:time_series.SNARIMAX"):
        EngineConfig(models=["river:time_series.SNARIMAX"])
    with pytest.raises(SettingsError, match="river.time_series.Nope is not a river forecaster"):
        EngineConfig(models=["x=river:time_series.Nope"])
    with pytest.raises(SettingsError, match="cannot import river.nowhere"):
        EngineConfig(models=["x=river:nowhere.Thing"])
    with pytest.raises(SettingsError, match="snx.bogus: river:time_series.SNARIMAX has no parameter 'bogus'"):
        EngineConfig(models=["snx=river:time_series.SNARIMAX"], model_params={"snx": {"bogus": 1}})
    with pytest.raises(SettingsError, match="snx.p = 'two': expected int"):
        EngineConfig(models=["snx=river:time_series.SNARIMAX"], model_params={"snx": {"p": "two"}})
    with pytest.raises(ValueError, match="missing 1 required positional argument: 'alpha'"):
        make_model("river:time_series.HoltWinters", horizon=2)


def test_a_river_lane_round_trips_through_the_contract_checks():
    checks.check_forecaster(lambda: make_model("river:time_series.SNARIMAX", horizon=4, p=1, d=0, q=0, warmup=20))


# -- serve ---------------------------------------------------------------------------------------------------
@pytest.mark.kafka
def test_plugin_and_river_lanes_run_in_serve_with_two_levels(installed, kafka, unique, serve, tmp_path,
                                                              as_messages, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", installed)  # the serve subprocess finds the plug-in as an installed package
    topic, group = unique("plug"), unique("g")
    kafka.create_topic(topic, 2)
    frame = pd.read_csv(DATA / "ETTh1.csv", nrows=150)
    rows = [(f"p/{c}", f"{t.replace(' ', 'T')}Z", v) for t, *values in frame[["date", "OT", "HUFL"]].itertuples(
        index=False) for c, v in zip(("OT", "HUFL"), values, strict=True)]
    kafka.send(topic, as_messages(rows))
    proc = serve(topic, group, tmp_path / "state", "--model", "drift=damped-drift", "--model",
                 "snx=river:time_series.SNARIMAX", "--model-param", "snx.warmup=24", "--model-param", "snx.p=2",
                 "--model-param", "snx.d=0", "--model-param", "snx.q=1", "--level", "80,95", "--horizon", "3")
    proc.wait_value("tidecast_observations_total", lambda v: v >= len(rows), 90)
    expected = {"drift": 2 * 149, "snx": 2 * (150 - 23)}  # one message per origin once each lane is ready
    messages = [json.loads(r.value) for r in kafka.read_all(f"{topic}-forecasts", min_count=sum(expected.values()))]
    assert Counter(m["model"] for m in messages) == expected
    for message in messages:
        assert message["schema_version"] == 2 and set(message["intervals"]) == {"80", "95"}
        assert message["lower"] == message["intervals"]["80"]["lower"] and message["alpha"] == pytest.approx(0.2)
    late = [m for m in messages if m["issued_at"] >= "2016-07-05"]
    assert late and all(None not in m["intervals"]["95"]["lower"] for m in late)
    assert proc.value("tidecast_interval_target_coverage_ratio", model="snx", level="95") == pytest.approx(0.95)
    rc, _ = proc.terminate()
    assert rc == 0
