"""The blend with the last value (models/persistence.py): the weight, no look-ahead, filled values, state, and
CycleNet serving it."""

from __future__ import annotations

import numpy as np
import pytest

from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.models.persistence import PersistenceBlend

W = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models, two CI cores


def run(blend: PersistenceBlend, model: np.ndarray, values: np.ndarray, filled: np.ndarray | None = None,
        ) -> np.ndarray:
    """Feed one row: at tick t the model forecasts ``model[t]`` (H,), the last value is ``values[t]``; returns the
    blended forecasts (T, H)."""
    rows = np.array([0])
    out = np.empty_like(model)
    for t in range(len(values)):
        if t:
            blend.learn(rows, np.array([t]), values[t : t + 1], None if filled is None else filled[t : t + 1])
        out[t] = blend.combine(rows, np.array([t]), values[t : t + 1], model[t][None])[0]
    return out


def test_the_weight_is_the_convex_combination_with_the_least_squared_error():
    rng = np.random.default_rng(0)
    T, H = 400, 3
    values = np.cumsum(rng.normal(size=T + H))  # a random walk: persistence is good, the model noisy and biased
    future = values[np.arange(T)[:, None] + np.arange(1, H + 1)]
    model = future + 0.5 + rng.normal(scale=1.5, size=(T, H))
    values = values[:T]
    blend = PersistenceBlend(horizon=H, half_life=10**9)  # no forgetting: the plain least-squares weight
    run(blend, model, values)
    grid = np.linspace(0, 1, 1001)
    for h in range(1, H + 1):
        origins = np.arange(T - h)
        e_model = model[origins, h - 1] - values[origins + h]
        e_last = values[origins] - values[origins + h]
        sse = [np.sum((w * e_model + (1 - w) * e_last) ** 2) for w in grid]
        best = grid[int(np.argmin(sse))]
        assert abs(blend.weights(np.array([0]))[0, h - 1] - best) <= 1e-3
        assert 0.0 < best < 1.0  # an interior optimum: both forecasts carry information


def test_weight_one_until_a_target_matured_then_it_follows_the_better_forecast():
    T, H = 300, 2
    ticks = np.arange(T)
    values = np.where(ticks < 150, np.sin(2 * np.pi * ticks / W), 5.0 + np.sin(2 * np.pi * ticks / W))
    # the model knows the cycle but not the level shift at tick 150; persistence is late by one cycle phase
    model = np.stack([np.sin(2 * np.pi * (ticks + h) / W) for h in (1, 2)], axis=1)
    blend = PersistenceBlend(horizon=H, half_life=20)
    out = run(blend, model, values)
    np.testing.assert_array_equal(out[0], model[0])  # nothing matured: the model as it is
    before = blend_weight_at(model, values, 149)
    after = blend_weight_at(model, values, 299)
    assert before.min() > 0.99  # a perfect model before the change: all weight on it
    assert after.max() < 0.5  # after the shift the biased model loses its weight
    err_blend = np.abs(out[160:298, 0] - values[161:299])
    err_model = np.abs(model[160:298, 0] - values[161:299])
    assert err_blend.mean() < 0.5 * err_model.mean()


def blend_weight_at(model: np.ndarray, values: np.ndarray, t: int) -> np.ndarray:
    blend = PersistenceBlend(horizon=model.shape[1], half_life=20)
    run(blend, model[: t + 1], values[: t + 1])
    return blend.weights(np.array([0]))[0]


def test_no_look_ahead_forecasts_depend_only_on_the_past():
    rng = np.random.default_rng(1)
    T, H = 120, 4
    values = rng.normal(size=T)
    model = rng.normal(size=(T, H))
    changed = values.copy()
    changed[80:] += 10.0
    a = run(PersistenceBlend(H, 30), model, values)
    b = run(PersistenceBlend(H, 30), model, changed)
    np.testing.assert_array_equal(a[:80], b[:80])  # forecasts from origins before 80 never saw the change
    assert not np.allclose(a[81:], b[81:])


def test_interpolated_values_are_not_scored():
    rng = np.random.default_rng(2)
    T, H = 100, 2
    values, model = rng.normal(size=T), rng.normal(size=(T, H))
    filled = np.zeros(T, dtype=bool)
    filled[40:60] = True
    with_fill = PersistenceBlend(H, 50)
    run(with_fill, model, values, filled)
    wild = values.copy()
    wild[40:60] = 1e6  # had the filled targets been scored, these would dominate the sums
    other = PersistenceBlend(H, 50)
    # the same stream except the filled targets: the sums differ only through the origins' last values
    run(other, model, wild, filled)
    sums = with_fill.rows_["sums"][0]
    assert np.isfinite(sums).all() and sums.max() < 1e3
    assert other.rows_["sums"][0].max() > 1e6  # origins inside the fill still forecast from their value


def test_state_round_trip_and_a_state_saved_without_the_blend():
    rng = np.random.default_rng(3)
    H = 3
    a = PersistenceBlend(H, 40)
    run(a, rng.normal(size=(50, H)), rng.normal(size=50))
    b = PersistenceBlend(H, 40)
    b.import_rows(np.array([5]), a.export_rows(np.array([0])))
    np.testing.assert_array_equal(b.weights(np.array([5])), a.weights(np.array([0])))
    b.import_rows(np.array([5]), {"history": np.zeros((1, 4))})  # saved with the blend off: starts blank
    np.testing.assert_array_equal(b.weights(np.array([5])), np.ones((1, H)))


def test_refuses_a_non_positive_half_life():
    with pytest.raises(ValueError, match="half_life"):
        PersistenceBlend(horizon=4, half_life=0)
    with pytest.raises(ValueError, match="persistence_half_life"):
        CycleNetForecaster(horizon=4, lookback=12, warm_start=60, persistence_half_life=-1)


def small(**params) -> CycleNetForecaster:
    defaults = dict(horizon=6, lookback=24, cycle=W, warm_start=400, epochs=4, batch_size=32, online=False,
                    replay_window=256, replay_batch=32, defer=False, seed=1)
    return CycleNetForecaster(**{**defaults, **params})


def test_cyclenet_serves_the_blend_and_beats_itself_after_a_level_shift():
    """The same frozen CycleNet with and without the blend on a cyclic series whose level jumps: identical until
    targets mature, then the blend tracks the new level the frozen model misses (without instance normalisation
    it keeps the scaler of its fit, so the shift stays a bias)."""
    rng = np.random.default_rng(4)
    T = 900
    ticks = np.arange(T)
    values = np.sin(2 * np.pi * ticks / W) + 0.05 * rng.normal(size=T) + np.where(ticks >= 600, 3.0, 0.0)
    plain, blended = small(instance_norm=False), small(instance_norm=False, persistence_half_life=48)
    rows = np.array([0])
    errors = {"plain": [], "blended": []}
    first = None
    for t in range(T):
        for m in (plain, blended):
            m.learn_many(rows, np.array([t]), values[t : t + 1])
        p, b = plain.forecast_many(rows, 6)[0], blended.forecast_many(rows, 6)[0]
        if first is None and np.isfinite(p).all():
            first = t
            np.testing.assert_array_equal(p, b)  # weight 1 before any blended forecast matured
        if t >= 650 and t + 1 < T:
            errors["plain"].append(abs(p[0] - values[t + 1]))
            errors["blended"].append(abs(b[0] - values[t + 1]))
    assert first is not None
    assert np.mean(errors["blended"]) < 0.5 * np.mean(errors["plain"])
    state = blended.export_rows(rows)
    assert {"persistence.sums", "persistence.forecast"} <= set(state)
    assert "persistence.sums" not in plain.export_rows(rows)


def test_a_second_call_at_the_same_origin_keeps_the_steps_it_does_not_bring():
    blend = PersistenceBlend(horizon=3, half_life=50)
    rows = np.array([0])
    blend.combine(rows, np.array([7]), np.array([1.0]), np.array([[2.0, 3.0, 4.0]]))
    blend.combine(rows, np.array([7]), np.array([1.0]), np.array([[2.0]]))  # e.g. a 1-step residual check
    np.testing.assert_array_equal(blend.rows_["forecast"][0, 7 % 3] + 1.0, [2.0, 3.0, 4.0])
    blend.combine(rows, np.array([10]), np.array([1.0]), np.array([[5.0]]))  # a new origin in that slot
    assert np.isnan(blend.rows_["forecast"][0, 10 % 3, 1:]).all()


def test_a_large_level_costs_no_precision():
    """An exact model on a series around 1e8 keeps all the weight (float32 copies of the forecasts would be scored
    as ~6 units of error there)."""
    H, T = 2, 600
    t = np.arange(T + H)
    y = 1e8 + np.sin(2 * np.pi * t / 12)
    exact = np.stack([y[k + 1 : k + 1 + H] for k in range(T)])
    blend = PersistenceBlend(H, 168)
    run(blend, exact, y[:T])
    np.testing.assert_array_equal(blend.weights(np.array([0])), np.ones((1, H)))


def test_cfc_with_a_residual_bootstrap_blends_every_step():
    """cfc's bootstrap ring takes a 1-step forecast inside learn_many: it must neither overwrite the stored H-step
    forecasts (steps 2..H would never be scored) nor be weighted twice in the spread."""
    from tidecast.models.liquid import CfCForecaster, build

    params = dict(horizon=4, lookback=8, units=8, backbone_units=16, warm_start=40, epochs=2, batch_size=16,
                  replay_window=16, mode="frozen", defer=False, persistence_half_life=20)
    rng = np.random.default_rng(0)
    y = np.cumsum(rng.normal(size=200)) + np.sin(np.arange(200) / 2)
    weights = {}
    for boot in (0, 8):
        model = CfCForecaster(bootstrap=boot, **params)
        rows = np.array([0])
        for t in range(200):
            model.learn_many(rows, np.array([t]), y[t : t + 1])
            model.forecast_many(rows, 4)
        weights[boot] = model._persistence.weights(rows)[0]
    np.testing.assert_array_equal(weights[8], weights[0])  # the ring's 1-step forecast changed nothing
    assert (weights[8][1:] < 1).any()
    assert np.nanmean(model.spread_many(rows, 4)[0, 0]) > 0.1  # the served errors' spread, not shrunk by w
    ensemble = build(horizon=4, members=2, warm_start=40, persistence_half_life=20)
    assert ensemble.persistence_half_life == 20  # the blend goes around the members' mean ...
    assert [m.persistence_half_life for m in ensemble.members_] == [0, 0]  # ... not inside each member
