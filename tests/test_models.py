"""Baseline models: seasonal naive, the river adapters, cycle detection and pickle-free state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tidecast.models.base import BatchForecaster
from tidecast.models.naive import SeasonalNaive
from tidecast.models.registry import MODELS, make_model
from tidecast.models.seasonality import detect_period

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def feed(model: BatchForecaster, values: np.ndarray, start: int = 0) -> None:
    rows = np.arange(values.shape[1])
    for k, row_values in enumerate(values):
        model.learn_many(rows, np.full(len(rows), start + k), row_values)


def test_seasonal_naive_repeats_the_last_cycle_per_series():
    model = SeasonalNaive(period=4)
    model.resize(2)
    t = np.arange(12)
    feed(model, np.stack([t % 4, 10 * (t % 4)], axis=1).astype(float))
    forecast = model.forecast_many(np.array([0, 1]), 6)
    assert forecast.tolist() == [[0, 1, 2, 3, 0, 1], [0, 10, 20, 30, 0, 10]]


def test_seasonal_naive_detects_each_series_period_and_waits_until_then():
    model = SeasonalNaive(max_period=50, detect_after=200)
    model.resize(2)
    t = np.arange(300)
    rng = np.random.default_rng(0)
    cycles = np.stack([np.sin(2 * np.pi * t / 24), np.sin(2 * np.pi * t / 7)], axis=1)
    values = cycles + 0.05 * rng.normal(size=(300, 2))
    feed(model, values[:150])
    assert np.isnan(model.forecast_many(np.array([0, 1]), 3)).all()
    feed(model, values[150:], start=150)
    assert model.period_[:2].tolist() == [24, 7]


@pytest.mark.parametrize(("file", "column", "expected"), [
    ("ETTh1.csv", "OT", {24}), ("ETTh1.csv", "HUFL", {24}), ("nab_nyc_taxi.csv", "value", {48, 336}),
])
def test_cycle_detection_on_real_data(file, column, expected):
    values = pd.read_csv(DATA / file)[column].to_numpy()[:3000]
    assert detect_period(values, max_period=400) in expected


def test_no_cycle_in_white_noise():
    assert detect_period(np.random.default_rng(0).normal(size=2000), max_period=100) is None


@pytest.mark.parametrize("name", ["holt-winters", "snarimax"])
def test_river_adapters_forecast_a_cycle_on_raw_scale(name):
    """Standardisation keeps river's SGD stable on a raw scale of ~1000."""
    model = make_model(name, horizon=6, period=12, warmup=48)
    model.resize(1)
    t = np.arange(600)
    values = 1000 + 200 * np.sin(2 * np.pi * t / 12) + np.random.default_rng(0).normal(size=t.size)
    feed(model, values[:, None])
    forecast = model.forecast_many(np.array([0]), 6)[0]
    truth = 1000 + 200 * np.sin(2 * np.pi * np.arange(600, 606) / 12)
    assert np.abs(forecast - truth).max() < 40  # a cycle of amplitude 200, tracked


@pytest.mark.parametrize("name", list(MODELS.keys() - {"cyclenet", "cfc"}))  # torch models: their own tests
def test_state_round_trip_is_exact_and_pickle_free(name):
    params = {"period": 6} if name == "seasonal-naive" else {"period": 6, "warmup": 20}
    a, b = make_model(name, horizon=3, **params), make_model(name, horizon=3, **params)
    a.resize(2)
    t = np.arange(80)
    values = np.stack([np.sin(t), np.cos(t / 3)], axis=1) * 5
    feed(a, values[:50])
    state = a.export_rows(np.array([1, 0]))
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    b.resize(2)
    b.import_rows(np.array([0, 1]), state)  # rows swapped on purpose: state moves with the series
    feed(a, values[50:], start=50)
    feed(b, values[50:, ::-1], start=50)
    np.testing.assert_array_equal(a.forecast_many(np.array([1, 0]), 3), b.forecast_many(np.array([0, 1]), 3))
