"""The liquid CfC model: the cell's closed form, dt from ticks, per-row hidden states, state round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import maintain_from_another_thread
from safetensors.numpy import load_file, save_file

from tidecast.models.liquid import CfCCell, CfCForecaster, LiquidNet, deltas, make

W = 12
PATTERN = np.sin(2 * np.pi * np.arange(W) / W) + 0.6 * (np.arange(W) == 3)


def cyclic(ticks: np.ndarray, channels: int = 1, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Values whose cycle is ``PATTERN[tick % W]``, scaled and shifted per channel."""
    rng = np.random.default_rng(seed)
    base = PATTERN[np.asarray(ticks) % W][:, None] * (1.0 + np.arange(channels)) + 10.0 * np.arange(channels)
    return base + noise * rng.normal(size=base.shape)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models, two CI cores


#: A small, quick network fitted inline (the tests' defaults).
SMALL = dict(horizon=4, lookback=8, units=8, backbone_units=16, warm_start=120, epochs=3, batch_size=64,
             replay_window=32, replay_batch=16, step_budget=60.0, defer=False, seed=1)


def small(**params) -> CfCForecaster:
    return CfCForecaster(**{**SMALL, **params})


def feed(model: CfCForecaster, rows: np.ndarray, ticks, values: np.ndarray, filled=None) -> None:
    for i, t in enumerate(ticks):
        kw = {} if filled is None else {"filled": np.full(rows.size, filled[i])}
        model.learn_many(rows, np.full(rows.size, t), values[i], **kw)


def fitted(mode: str = "frozen", channels: int = 3, n: int = 150, **params) -> CfCForecaster:
    model = small(mode=mode, **params)
    feed(model, np.arange(channels), range(n), cyclic(np.arange(n), channels=channels))
    assert model.fitted_
    return model


# -- the cell ----------------------------------------------------------------------------------------------


def test_cell_is_the_gated_closed_form_and_dt_moves_the_gate():
    torch.manual_seed(0)
    cell = CfCCell(n_inputs=3, units=6, backbone_units=10)
    x, s = torch.randn(5, 3), torch.randn(5, 6).clamp(-0.9, 0.9)
    small_dt, large_dt = torch.full((5, 1), 0.1), torch.full((5, 1), 1e4)
    g, k, gate = cell.parts(cell.project(x), s, small_dt)
    assert torch.all((gate > 0) & (gate < 1))
    torch.testing.assert_close(cell(x, s, small_dt), (1 - gate) * g + gate * k)
    assert cell(x, s, small_dt).abs().max() < 1  # a convex mix of two tanh heads
    # a long dt saturates every gate towards 0 or 1 according to the sign of its slope a
    a = cell.heads(cell.deeper(cell.act(cell.project(x) + cell.state_map(s)))).chunk(4, dim=1)[2]
    _, _, gate_long = cell.parts(cell.project(x), s, large_dt)
    torch.testing.assert_close(gate_long, (a > 0).float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(cell(x, s, large_dt), torch.where(a > 0, k, g), atol=2e-3, rtol=0)


def test_deltas_count_ticks_since_the_previous_real_step():
    present = np.array([[True, False, False, True, True], [False, True, True, False, True]])
    assert deltas(present).tolist() == [[1, 1, 2, 3, 1], [1, 1, 1, 1, 2]]


def test_cell_matches_ncps_with_the_same_weights():
    """Same weights -> same states, over an irregular sequence (ncps' CfC wrapper, batch 1: its timespans input
    only works for one sequence at a time)."""
    ncps = pytest.importorskip("ncps.torch")
    torch.manual_seed(3)
    n_in, units, bu = 3, 7, 11
    ref = ncps.CfC(n_in, units, backbone_units=bu, backbone_layers=1, return_sequences=True, batch_first=True)
    net = LiquidNet(n_in, units, horizon=2, backbone_units=bu)
    rc = ref.rnn_cell
    with torch.no_grad():
        w = rc.backbone[0].weight
        net.cell.input_map.weight.copy_(w[:, :n_in])
        net.cell.state_map.weight.copy_(w[:, n_in:])
        net.cell.input_map.bias.copy_(rc.backbone[0].bias)
        net.cell.heads.weight.copy_(torch.cat([rc.ff1.weight, rc.ff2.weight, rc.time_a.weight, rc.time_b.weight]))
        net.cell.heads.bias.copy_(torch.cat([rc.ff1.bias, rc.ff2.bias, rc.time_a.bias, rc.time_b.bias]))
    x = torch.randn(1, 9, n_in)
    dt = torch.tensor([[1.0, 1.0, 3.0, 0.5, 1.0, 7.0, 1.0, 2.0, 1.0]])
    out, h_ref = ref(x, timespans=dt)
    h = torch.zeros(1, units)
    for k in range(x.shape[1]):
        h = net.cell(x[:, k], h, dt[:, k : k + 1])
        torch.testing.assert_close(h, out[:, k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(net.encode(x, torch.ones(1, 9, dtype=torch.bool), dt, torch.zeros(1, units)), h_ref,
                               atol=1e-6, rtol=1e-5)


# -- the forecaster ---------------------------------------------------------------------------------------------


def test_forecasts_are_nan_until_warm_then_raw_scale_with_the_models_horizon():
    model = small(mode="online")
    rows = np.arange(3)
    values = cyclic(np.arange(200), channels=3)
    feed(model, rows, range(119), values[:119])
    assert np.isnan(model.forecast_many(rows, 4)).all()
    feed(model, rows, range(119, 200), values[119:])
    f = model.forecast_many(rows, 6)  # beyond the model's horizon: NaN
    assert f.shape == (3, 6) and np.isnan(f[:, 4:]).all() and np.isfinite(f[:, :4]).all()
    truth = cyclic(np.arange(200, 204), channels=3, noise=0.0).T
    assert np.abs(f[:, :4] - truth).max() < 2.5  # raw scale: the channels live at levels 0, 10 and 20
    assert np.abs(f[:, :2] - truth[:, :2]).max() < 0.5  # and the next steps are close
    assert model.fit_report_["rows"] == 3 and model._rounds > 0


def test_batched_rounds_equal_one_series_at_a_time():
    model = fitted("frozen")
    alone = make(**model.get_params())
    alone.import_shared(*model.export_shared())
    rows = np.arange(3)
    alone.import_rows(rows, model.export_rows(rows))
    values = cyclic(np.arange(150, 170), channels=3, seed=5)
    for i, t in enumerate(range(150, 170)):
        model.learn_many(rows, np.full(3, t), values[i])
        for r in rows:  # the same observations, one call per series
            alone.learn_many(np.array([r]), np.array([t]), values[i, r : r + 1])
    single = np.concatenate([alone.forecast_many(np.array([r]), 4) for r in rows])
    np.testing.assert_allclose(model.forecast_many(rows, 4), single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model._state[:3], alone._state[:3], rtol=1e-5, atol=1e-6)


def test_forecast_reads_the_carried_state_without_re_encoding():
    """A forecast changes only when a value arrives: it is the head over the row's state."""
    model = fitted("frozen")
    rows = np.arange(3)
    before = model.forecast_many(rows, 4)
    model._state[1] += 0.1  # only row 1's state moves
    after = model.forecast_many(rows, 4)
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    assert np.abs(after[1] - before[1]).max() > 0


def test_filled_ticks_are_skipped_and_a_gap_advances_the_state_by_its_duration():
    a, b = fitted("frozen"), None
    b = make(**a.get_params())
    b.import_shared(*a.export_shared())
    rows = np.arange(3)
    b.import_rows(rows, a.export_rows(rows))
    values = cyclic(np.arange(150, 160), channels=3)
    # a: ticks 151..154 were interpolated by the engine (filled, with nonsense values); b never saw them
    filled = [False, True, True, True, True, False, False, False, False, False]
    garbage = values.copy()
    garbage[1:5] = 1e6
    feed(a, rows, range(150, 160), garbage, filled=filled)
    feed(b, rows, [150, 155, 156, 157, 158, 159], values[[0, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(a._state[:3], b._state[:3])
    np.testing.assert_array_equal(a.forecast_many(rows, 4), b.forecast_many(rows, 4))
    history = a.export_rows(rows)["history"]  # oldest first, ending at tick 159
    assert np.isnan(history[:, -9:-5]).all() and np.isfinite(history[:, -5:]).all()  # skipped, not filled
    # the step over the gap is one closed-form step of dt = 5, not five steps of 1
    c = make(**a.get_params())
    c.import_shared(*a.export_shared())
    c.import_rows(rows, b.export_rows(rows))
    state = c._state[:3].copy()
    c.learn_many(rows, np.full(3, 165), values[0])
    z = (values[0] - c._mean[:3]) / c._scale[:3]
    x, _ = c._inputs(rows, np.full(3, 165), z)
    with torch.no_grad():
        expect = c.net_.cell(torch.from_numpy(x), torch.from_numpy(state), torch.full((3, 1), 6.0)).numpy()
        unit_step = c.net_.cell(torch.from_numpy(x), torch.from_numpy(state), torch.ones(3, 1)).numpy()
    np.testing.assert_allclose(c._state[:3], expect, rtol=1e-6, atol=1e-7)
    assert np.abs(c._state[:3] - unit_step).max() > 1e-4


def test_a_long_gap_keeps_the_state_and_the_row_keeps_forecasting():
    model = fitted("online")
    rows = np.arange(3)
    before = model.export_rows(rows)
    model.reset_rows(np.array([1]))  # what the engine calls after a gap longer than max_gap
    after = model.export_rows(rows)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)
    model.learn_many(rows, np.array([150, 2000, 150]), cyclic(np.array([150]), channels=3)[0])
    assert np.isfinite(model.forecast_many(rows, 4)).all()
    assert np.isnan(model.export_rows(np.array([1]))["history"]).sum() == model._ring - 1  # one value since


def test_late_series_joins_with_its_own_scaler():
    model = fitted("online", channels=1)
    late = 3 * cyclic(np.arange(150, 200))[:, 0] + 100
    for i, t in enumerate(range(150, 200)):
        model.learn_many(np.array([0, 5]), np.array([t, t]), np.array([cyclic(np.array([t]))[0, 0], late[i]]))
    assert model.ready_[5]
    f = model.forecast_many(np.array([5]), 4)
    assert np.isfinite(f).all() and abs(f.mean() - 100) < 5


def test_a_series_with_gaps_warms_up_on_the_same_clock_as_a_complete_one():
    # the fit uses the last warm_start ticks of the ring: it must start when they have passed, not when as many
    # values have arrived (30 % missing would delay it by 50 ticks and drop the oldest values from the fit)
    rng = np.random.default_rng(3)
    arrived = rng.random(200) > 0.3
    arrived[[0, 119]] = True
    ticks = np.flatnonzero(arrived)
    model = small(mode="frozen")
    for t in ticks[ticks < 119]:
        model.learn_many(np.array([0]), np.array([t]), cyclic(np.array([t]))[0])
    assert not model.fitted_
    model.learn_many(np.array([0]), np.array([119]), cyclic(np.array([119]))[0])
    assert model.fitted_ and model.ready_[0]
    assert model.fit_report_["train_windows"] > 0


def test_maintenance_from_another_thread_leaves_inline_work_alone():
    # defer=False promises inline work: a trainer thread calling maintenance must not take the fit or a replay
    # step, or the result would depend on which thread got the lock first
    model = small(mode="online", defer=True)
    feed(model, np.arange(2), range(120), cyclic(np.arange(120), channels=2))  # the fit is queued, not run
    model.defer, model._deferred = False, False  # an inline model between queuing its fit and running it
    maintain_from_another_thread(model)
    assert not model.fitted_ and model._job is not None
    model._work(60.0, 60.0)  # the inline path
    assert model.fitted_
    model._due = 1  # as if learn_many had just made a replay step due
    maintain_from_another_thread(model)
    assert model._due == 1


def test_online_learns_from_complete_windows_only_and_frozen_stays_put():
    frozen, online = fitted("frozen"), fitted("online", replay_window=5)
    weights = {k: v.copy() for k, v in frozen.export_shared()[0].items()}
    learned = {k: v.copy() for k, v in online.export_shared()[0].items()}
    rows = np.arange(3)
    values = cyclic(np.arange(160), channels=3)  # its first 150 rows are what fitted() fed
    feed(frozen, rows, range(150, 160), values[150:])
    feed(online, rows, range(150, 160), values[150:])
    assert all(np.array_equal(frozen.export_shared()[0][k], v) for k, v in weights.items())
    assert any(not np.array_equal(online.export_shared()[0][k], v) for k, v in learned.items() if k.startswith("net."))
    with online._lock:
        batch = online._sample()
    r, z, ticks = batch
    last_target = ticks[:, -1]
    assert np.all(last_target <= online._last_tick[r])  # no look-ahead: every target has arrived
    assert np.all(last_target > online._last_tick[r] - 5)  # only the newest replay_window windows
    raw = z[:, :8] * online._scale[r, None] + online._mean[r, None]  # the row's own values at those ticks
    np.testing.assert_allclose(raw, values[ticks[:, :8], r[:, None]], rtol=1e-9)


def test_adaptive_scaler_follows_a_level_shift_without_blowing_up():
    model = small(scale_halflife=12.0, warm_start=400)  # no fit needed: the scaler runs from the first value
    rows = np.array([0])
    values = cyclic(np.arange(300))
    values[150:] += 50.0  # 50 deviations of the cycle
    feed(model, rows, range(150), values[:150])
    settled = model._scale[0]
    feed(model, rows, range(150, 151), values[150:151])
    alpha = 1 - 0.5 ** (1 / 12)
    assert model._scale[0] <= settled * np.sqrt((1 - alpha) * (1 + 9 * alpha)) + 1e-12  # winsorised at 3 sd
    feed(model, rows, range(151, 300), values[151:])
    assert abs(model._mean[0] - (50 + PATTERN.mean())) < 0.5 and model._scale[0] < 2 * settled


def test_huber_replay_loss_is_the_squared_error_until_a_shift_caps_it():
    model = fitted("online", online_huber=1.0)
    with model._lock:
        _, z, ticks = model._sample()
    net = model._trainer

    def loss(windows: np.ndarray, huber: float | None) -> float:
        with torch.no_grad():
            return float(model._window_loss(net, windows, ticks, None, 0, huber=huber))

    assert loss(z, 100.0) == pytest.approx(loss(z, None), rel=1e-6)  # below the threshold: the squared error
    assert loss(z, 1.0) <= loss(z, None)
    shifted = z.copy()
    shifted[:, model.lookback :] += 20.0  # every target 20 deviations off: a window across a sudden shift
    assert loss(shifted, None) > 300 and loss(shifted, 1.0) < 45  # about 20^2 against 2 * 20 - 1


@pytest.mark.parametrize("params", [
    dict(mode="online"),
    dict(mode="cyclenet", cycle=W),
    dict(mode="online", scale_halflife=24.0, periods=[W]),
    dict(mode="online", input_dropout=0.3),  # the dropout draws come from the exported RNG
])
def test_save_restore_is_bit_exact(tmp_path, params):
    rows = np.arange(3)
    values = cyclic(np.arange(220), channels=3, seed=3)
    model = small(**params)
    feed(model, rows, range(150), values[:150])
    assert model.fitted_ and model._rounds > 0
    shared, meta = model.export_shared()
    per_row = model.export_rows(rows)
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in per_row.values())
    save_file(shared, str(tmp_path / "shared.safetensors"))
    save_file(per_row, str(tmp_path / "rows.safetensors"))
    (tmp_path / "meta.json").write_text(json.dumps(meta))

    restored = make(**model.get_params())
    restored.import_shared(load_file(str(tmp_path / "shared.safetensors")),
                           json.loads((tmp_path / "meta.json").read_text()))
    restored.import_rows(rows[::-1] + 4, {k: v[::-1] for k, v in load_file(str(tmp_path / "rows.safetensors")).items()})
    moved = rows + 4  # the state moves with the series, to other rows
    np.testing.assert_array_equal(restored.forecast_many(moved, 4), model.forecast_many(rows, 4))
    for t in range(150, 220):  # learning online from here on stays identical, step for step
        model.learn_many(rows, np.full(3, t), values[t])
        restored.learn_many(moved, np.full(3, t), values[t])
        np.testing.assert_array_equal(restored.forecast_many(moved, 4), model.forecast_many(rows, 4))
    a, b = model.export_rows(rows), restored.export_rows(moved)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


@pytest.mark.parametrize(("params", "per_row_bytes"), [
    (dict(mode="online", units=32), 4096),
    (dict(mode="cyclenet", units=32, cycle=168), 4096),
])
def test_own_per_series_state_fits_in_4_kb(params, per_row_bytes):
    model = small(**params)
    rows = np.arange(2)
    feed(model, rows, range(130), cyclic(np.arange(130), channels=2))
    state = model.export_rows(rows)
    own = sum(v.nbytes for k, v in state.items() if not k.startswith("history")) / rows.size
    assert 0 < own <= per_row_bytes
    assert state["hidden"].shape == (2, 32)


@pytest.mark.parametrize("members", [1, 2])
def test_runs_in_the_engine_from_the_registry_and_restores_through_it(members):
    from tidecast.stream.batch import ObservationBatch
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine

    params = dict(lookback=8, units=8, backbone_units=16, warm_start=120, epochs=2, batch_size=64, replay_batch=16,
                  step_budget=60.0, members=members)
    config = EngineConfig(horizon=4, models=["cfc"], model_params={"cfc": params}, freq="1h")
    engine = Engine.from_config(config)
    ids = np.array(["a", "b"], dtype=object)
    hour = 3_600_000_000_000
    values = cyclic(np.arange(200), channels=2) + 100.0

    def batch(lo: int, hi: int) -> ObservationBatch:
        ticks = np.arange(lo, hi)
        return ObservationBatch(np.tile(ids, hi - lo), np.repeat(ticks * hour, 2), values[lo:hi].ravel())

    for lo in range(0, 160, 40):
        engine.process(batch(lo, lo + 40))
    assert engine.lanes[0].model.fitted_
    assert engine.lanes[0].model.get_params()["members"] == members
    restored = Engine.from_config(config)
    restored.import_shared(engine.export_shared())
    restored.import_series(*engine.export_series(["a", "b"]))
    a, b = engine.process(batch(160, 200)), restored.process(batch(160, 200))
    assert len(a.forecasts) and np.isfinite(a.forecasts.mean).all()
    np.testing.assert_array_equal(a.forecasts.mean, b.forecasts.mean)
    assert abs(np.median(a.forecasts.mean) - 105) < 10  # raw scale: channels at levels 100 and 110


def test_cyclenet_mode_learns_the_cycle_row():
    model = fitted("cyclenet", channels=2, n=300, cycle=W, epochs=6, val_fraction=0.0)
    q = model._q[:2]
    for c in range(2):  # Q is in standardised units: compare shapes, aligned on tick % W
        assert np.corrcoef(q[c], PATTERN)[0, 1] > 0.5


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="mode"):
        small(mode="liquid")
    with pytest.raises(ValueError, match="warm_start"):
        small(warm_start=10)
    with pytest.raises(ValueError, match="scale_halflife"):
        small(scale_halflife=0.0)
    with pytest.raises(ValueError, match="scale_halflife"):
        small(scale_halflife=float("inf"))  # was taken: the scale stayed 1.0 and the mean at the first value
    with pytest.raises(ValueError, match="backbone_layers"):
        small(backbone_layers=10**7)  # was taken, and the fit died allocating it mid-stream
    with pytest.raises(ValueError, match="input_dropout"):
        small(input_dropout=1.0)


def test_input_dropout_removes_lookback_inputs_but_never_the_last():
    model = small(input_dropout=0.6)
    z = np.ones((4000, model.lookback + model.horizon))
    dropped = model._drop_inputs(z, np.random.default_rng(0))
    gone = np.isnan(dropped)
    assert not gone[:, model.lookback - 1 :].any()  # the origin and the targets stay
    assert gone[:, : model.lookback - 1].mean() == pytest.approx(0.3, abs=0.02)  # u * 0.6 with u ~ U(0, 1)
    assert (gone.sum(axis=1) == 0).mean() > 0.05  # some windows stay whole
    assert not np.isnan(z).any()  # the caller's array is untouched
    assert small()._drop_inputs(z, np.random.default_rng(0)) is z


def test_engine_can_drop_a_cfc_series_and_reuse_its_row():
    from tidecast.stream.batch import ObservationBatch
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine

    hour = 3_600_000_000_000
    params = {"lookback": 8, "units": 8, "backbone_units": 16, "warm_start": 80, "epochs": 1, "mode": "cyclenet"}
    engine = Engine.from_config(EngineConfig(horizon=4, models=["cfc"], freq="1h", model_params={"cfc": params}))
    ids = np.array(["a", "b", "c"], dtype=object)
    for k in range(100):
        engine.process(ObservationBatch(ids, np.full(3, k * hour), np.sin(2 * np.pi * k / 6) + np.arange(3.0)))
    model = engine.lanes[0].model
    assert model.fitted_ and model.cycle_ == 6  # detected at the warm start; blank rows were exported before
    engine.drop_series(["b"])
    out = engine.process(ObservationBatch(np.array(["new"], dtype=object), np.array([100 * hour]), np.array([1.0])))
    assert engine._slot_of["new"] == 1 and len(out.forecasts) == 0 and not model.ready_[1]
    for k in range(101, 115):  # after lookback + horizon observations the new series is served
        out = engine.process(ObservationBatch(np.array(["a", "new"], dtype=object), np.full(2, k * hour),
                                              np.array([np.sin(2 * np.pi * k / 6), 1.0])))
    assert set(out.forecasts.series_id) == {"a", "new"}


# -- ensembles (members=K) ------------------------------------------------------------------------------------

def ensemble(**params):
    from tidecast.models.ensemble import Ensemble

    model = make(**{**SMALL, "members": 3, **params})
    assert isinstance(model, Ensemble)
    return model


def test_an_ensemble_serves_the_mean_of_networks_seeded_apart():
    model = ensemble(mode="online")
    rows = np.arange(2)
    feed(model, rows, range(150), cyclic(np.arange(150), channels=2))
    assert model.fitted_ and [m.seed for m in model.members_] == [1, 2, 3]
    each = np.stack([m.forecast_many(rows, 4) for m in model.members_])
    assert np.isfinite(each).all() and np.ptp(each, axis=0).max() > 1e-4  # the networks differ
    np.testing.assert_allclose(model.forecast_many(rows, 4), each.mean(axis=0))
    single = small(mode="online", seed=1)  # member 0 is the single network with the ensemble's seed
    feed(single, rows, range(150), cyclic(np.arange(150), channels=2))
    np.testing.assert_array_equal(single.forecast_many(rows, 4), each[0])


def test_an_ensemble_restores_bit_for_bit_through_its_parameters(tmp_path):
    model = ensemble(mode="online")
    rows = np.arange(3)
    values = cyclic(np.arange(200), channels=3, seed=3)
    feed(model, rows, range(150), values[:150])
    shared, meta = model.export_shared()
    save_file(shared, str(tmp_path / "shared.safetensors"))
    save_file(model.export_rows(rows), str(tmp_path / "rows.safetensors"))
    params = json.loads(json.dumps(model.get_params()))
    assert params["members"] == 3 and params["seed"] == 1
    restored = make(**params)
    restored.import_shared(load_file(str(tmp_path / "shared.safetensors")), json.loads(json.dumps(meta)))
    restored.resize(8)
    restored.import_rows(rows + 4, load_file(str(tmp_path / "rows.safetensors")))
    for t in range(150, 200):
        model.learn_many(rows, np.full(3, t), values[t])
        restored.learn_many(rows + 4, np.full(3, t), values[t])
        np.testing.assert_array_equal(restored.forecast_many(rows + 4, 4), model.forecast_many(rows, 4))
    with pytest.raises(ValueError, match="ensemble of 3"):
        ensemble(members=2).import_shared(shared, meta)


def test_an_ensemble_is_built_by_the_registry_only():
    with pytest.raises(ValueError, match="members"):
        small(members=2)
    with pytest.raises(ValueError, match="members = 0: a whole number >= 1"):
        make(horizon=4, members=0)
    clone = ensemble().clone(members=2, seed=7)
    assert [m.seed for m in clone.members_] == [7, 8] and clone.get_params()["lookback"] == 8


@pytest.mark.parametrize("params", [{}, {"scale_halflife": 24}])
def test_importing_a_blank_row_blanks_its_whole_history_ring(params) -> None:
    """What ``Engine.drop_series`` does to a dropped series' row. The ring slots were taken from the blank row's
    tick (int64 min) minus the ring, which wrapped, so one slot kept the dropped series' value and the next series
    given the row inherited it (an engine restored from a checkpoint had a clean row: the two runs diverged)."""
    model = small(warm_start=1000, **params)  # no fit: the rings alone
    model.resize(3)
    n = 1100
    feed(model, np.arange(2), range(n), cyclic(np.arange(n), channels=2))
    blank = model.export_rows(np.array([2]))  # a row no series has touched
    assert np.isnan(blank["history"]).all()
    model.import_rows(np.array([1]), blank)
    assert np.isnan(model._hist[1]).all()
    if params:
        assert np.array_equal(model._hist_mean[1], model._hist_mean[2], equal_nan=True)
    np.testing.assert_array_equal(model.export_rows(np.array([1]))["history"], blank["history"])


@pytest.mark.parametrize("how", ["dropped", "restored"])
def test_a_row_replaced_while_the_fit_is_pending_keeps_its_own_scaler(how):
    """defer=True (serve): the fit runs on a snapshot of the cohort. A series dropped meanwhile (its row blanked and
    reused) or one restored into a cohort row got the snapshot's scaler and was served at once: a new series was
    forecast from its first value with another series' scale, a restored one lost its own."""
    model = small(defer=True)
    rows = np.arange(2)
    feed(model, rows, range(130), cyclic(np.arange(130), channels=2))
    assert model._job is not None and not model.fitted_  # snapshot taken, nothing fitted yet
    if how == "dropped":
        blank = small()
        blank.resize(1)
        model.import_rows(np.array([1]), blank.export_rows(np.array([0])))  # what Engine.drop_series does
    else:
        other = small()
        feed(other, np.array([0]), range(130), 1000.0 + 30.0 * cyclic(np.arange(130)))
        model.import_rows(np.array([1]), other.export_rows(np.array([0])))
    before = model.export_rows(np.array([1]))
    model.maintenance(600.0)
    assert model.fitted_ and model._ready[0]
    after = model.export_rows(np.array([1]))
    np.testing.assert_array_equal(after["mean"], before["mean"])
    np.testing.assert_array_equal(after["scale"], before["scale"])
    assert bool(model._ready[1]) == (how == "restored")
    if how == "dropped":  # a new series in the reused row waits for lookback + horizon values of its own
        model.learn_many(np.array([1]), np.array([200]), np.array([5.0]))
        assert np.isnan(model.forecast_many(np.array([1]), SMALL["horizon"])).all()


def test_a_late_series_joins_on_real_values_not_ticks():
    """A series that sent one value and then none for lookback + horizon ticks joined on those two values: a
    scaler of deviation 0 (taken as 1) that it kept for good. It now joins as the fit's cohort does."""
    model = fitted("frozen", channels=1, n=130)
    late = np.array([1])
    model.learn_many(late, np.array([130]), np.array([1000.0]))
    model.learn_many(late, np.array([130 + SMALL["lookback"] + SMALL["horizon"]]), np.array([1000.0]))
    assert not model._ready[1]
    values = 1000.0 + 50.0 * cyclic(np.arange(200))
    feed(model, late, range(143, 143 + SMALL["lookback"] + SMALL["horizon"]), values[143:])
    assert model._ready[1] and model._scale[1] > 10.0


def test_adaptive_scaler_starts_as_a_running_mean():
    """Started from a deviation of 0 with no correction, the adaptive scaler's deviation was 0.07 of the data's
    after 100 ticks at a half-life of 168 (winsorising at 3 of its own deviations held it down)."""
    model = small(scale_halflife=168.0, warm_start=400)
    noise = np.random.default_rng(3).normal(size=(300, 1))
    feed(model, np.array([0]), range(300), noise)
    assert 0.8 < model._scale[0] < 1.2 and abs(model._mean[0]) < 0.3


def test_a_synced_retrain_candidate_encodes_the_incumbents_rows_with_its_own_weights():
    """A deferred retrain brings the candidate's rows up to the incumbent's (stream.retrain.sync_rows): the hidden
    states it took were computed by the incumbent's weights, and the first shadow forecasts were off by up to 3
    noise levels. They are encoded again with the candidate's."""
    from tidecast.stream.retrain import copy_model, sync_rows

    model = fitted("online", channels=2, n=150)
    rows = np.arange(2)
    candidate = copy_model(model, rows)
    candidate.refit(recent=100, epochs=2)
    feed(model, rows, range(150, 170), cyclic(np.arange(170), channels=2)[150:])  # the incumbent moves on
    sync_rows(candidate, model, rows)
    reference = copy_model(candidate, rows)
    with reference._lock:
        reference._encode(rows)
    np.testing.assert_allclose(candidate._state[rows], reference._state[rows], atol=1e-6)
    assert not np.allclose(candidate._state[rows], model._state[rows], atol=1e-3)


def test_adaptive_scaler_shrugs_off_one_absurd_value():
    """One value of 1e14 (below the engine's input limit) took the mean to 3e12; every later value was then 3
    deviations off and the scale grew 1.27x a tick: 3e9 after 300 ticks, MAE 1e5-1e8 instead of 0.3. The mean's
    step is winsorised like the variance's now."""
    model = small(scale_halflife=20.0, warm_start=400)
    noise = np.random.default_rng(5).normal(size=(700, 1))
    noise[300] = 1e14
    feed(model, np.array([0]), range(301), noise[:301])
    assert abs(model._mean[0]) < 1.0 and model._scale[0] < 1.5
    feed(model, np.array([0]), range(301, 700), noise[301:])
    assert abs(model._mean[0]) < 0.3 and 0.7 < model._scale[0] < 1.3


def _online_rounds(batch_size: int) -> tuple[dict[str, int], np.ndarray]:
    """Two hourly series through cfc and CycleNet learning online, cut into batches of ``batch_size`` rows: each
    lane's learning rounds, and every forecast's mean."""
    from tidecast.stream.batch import ObservationBatch
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine

    rng = np.random.default_rng(0)
    hours = 300
    values = 10 + 3 * np.sin(2 * np.pi * np.arange(hours) / 24)[:, None] + rng.normal(0, 0.3, (hours, 2))
    ids = np.tile(np.array(["a", "b"], dtype=object), hours)
    stamps = np.repeat(1_500_000_000 * 10**9 + np.arange(hours) * 3_600 * 10**9, 2)
    params = {"cfc": {"warm_start": 100, "units": 8, "backbone_units": 8, "lookback": 12, "epochs": 1},
              "cyclenet": {"warm_start": 100, "lookback": 24, "epochs": 1, "cycle": 24}}
    engine = Engine.from_config(EngineConfig(horizon=3, models=["cfc", "cyclenet"], freq="1h", model_params=params))
    means = []
    for lo in range(0, ids.size, batch_size):
        out = engine.process(ObservationBatch(ids[lo : lo + batch_size], stamps[lo : lo + batch_size],
                                              values.reshape(-1)[lo : lo + batch_size]))
        means.append(out.forecasts.mean)
    return {lane.name: lane.model._rounds for lane in engine.lanes}, np.concatenate(means)


def test_online_learners_take_one_round_per_time_wherever_batches_cut_it():
    """Each part of an hour a batch cut took a round's replay steps (1,202 rounds instead of 400 at batch size 1),
    so forecasts and promotions depended on the batch size. The warm-start hour (99) is not cut here: a cut there
    changes which series the fit sees (README)."""
    whole, whole_means = _online_rounds(600)
    assert whole == {"cfc": 200, "cyclenet": 200}
    for size in (3, 5):  # cut hours 1, 4, 7, ... and 2, 7, 12, ...
        rounds, means = _online_rounds(size)
        assert rounds == whole
        assert means.shape == whole_means.shape


def test_begin_step_counts_a_round_once_per_step_and_travels_with_the_shared_state():
    model, unhooked = (make(horizon=2, warm_start=30, lookback=8, units=8, backbone_units=8, epochs=1)
                       for _ in range(2))
    rows = np.array([0, 1])
    for tick in range(40):  # every tick's two rows in two calls, as a batch cut would bring them
        model.begin_step(tick)
        for m in (model, unhooked):
            m.learn_many(rows[:1], np.array([tick]), np.array([np.sin(tick / 3)]))
            m.learn_many(rows[1:], np.array([tick]), np.array([np.cos(tick / 3)]))
    counted = model._rounds
    assert 0 < counted <= 40 - 29  # a round per tick since the fit (at tick 29), not per call
    assert unhooked._rounds > 1.8 * counted
    arrays, meta = model.export_shared()
    restored = make(horizon=2, warm_start=30, lookback=8, units=8, backbone_units=8, epochs=1)
    restored.import_shared(arrays, json.loads(json.dumps(meta)))
    assert (restored._step_ns, restored._step_counted) == (39, True)
    # driven without the hook (a caller that knows no steps), every call is a round, as before
    for tick in range(40, 43):
        model._step_ns = None
        model.learn_many(rows, np.array([tick, tick]), np.array([0.0, 1.0]))
    assert model._rounds == counted + 3
