"""CycleNet: RCF phase from time, the cycle table, state round trips, cycle detection, streaming behaviour."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import maintain_from_another_thread
from safetensors.numpy import load_file, save_file

from tidecast.models.cyclenet import CycleNetForecaster, detect_cycle, make
from tidecast.models.cyclenet_net import BatchFit, CycleNet, Windows, build

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
W = 12
PATTERN = np.sin(2 * np.pi * np.arange(W) / W) + 0.6 * (np.arange(W) == 3)  # a known, asymmetric cycle


def cyclic(ticks: np.ndarray, channels: int = 1, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Values whose cycle is ``PATTERN[tick % W]``, scaled and shifted per channel."""
    rng = np.random.default_rng(seed)
    scale, level = 1.0 + np.arange(channels), 10.0 * np.arange(channels)
    base = PATTERN[np.asarray(ticks) % W][:, None] * scale + level
    return base + noise * rng.normal(size=base.shape)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models, two CI cores


def small(**params) -> CycleNetForecaster:
    defaults = dict(horizon=6, lookback=24, cycle=W, warm_start=400, epochs=4, batch_size=32,
                    replay_window=256, replay_batch=32, defer=False, seed=1)
    return CycleNetForecaster(**{**defaults, **params})


def feed(model: CycleNetForecaster, rows: np.ndarray, ticks: range, values: np.ndarray) -> None:
    for i, t in enumerate(ticks):
        model.learn_many(rows, np.full(rows.size, t), values[i])


# -- the network ----------------------------------------------------------------------------------------


def test_parameter_counts_match_the_paper():
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(CycleNet(96, 96, 24, 7, "linear")) == 9480
    assert count(CycleNet(96, 96, 24, 7, "mlp")) == 99080


def test_rcf_takes_the_cycle_at_the_given_phase():
    net = CycleNet(lookback=5, horizon=4, cycle=W, channels=2, instance_norm=False)
    with torch.no_grad():
        net.cycle_table.copy_(torch.as_tensor(np.stack([PATTERN, -PATTERN], axis=1), dtype=torch.float32))
        for p in net.backbone.parameters():
            p.zero_()
    phase = torch.tensor([0, 7, 11])
    y = net(torch.zeros(3, 5, 2), phase).detach().numpy()
    for b, p in enumerate(phase.tolist()):
        expected = PATTERN[(p + 5 + np.arange(4)) % W]
        np.testing.assert_allclose(y[b, :, 0], expected, rtol=1e-6)
        np.testing.assert_allclose(y[b, :, 1], -expected, rtol=1e-6)


def test_cycle_table_learns_a_known_cycle():
    """A random 24-step cycle under noise as large as itself: Q recovers it (the backbone alone would have to
    average the few noisy cycles of its lookback; Q averages the whole training set)."""
    cycle = np.random.default_rng(42).normal(size=24)
    ticks = np.arange(3000)
    rng = np.random.default_rng(0)
    gain = 1.0 + np.arange(3)
    values = cycle[ticks % 24][:, None] * gain + 5.0 * np.arange(3) + rng.normal(size=(3000, 3)) * gain
    net = build(lookback=48, horizon=12, cycle=24, channels=3, seed=0)
    train = Windows.contiguous(values[:2400], ticks[:2400], 24, 48, 12)
    val = Windows.contiguous(values[2352:], ticks[2352:], 24, 48, 12)
    BatchFit(net, train, val, lr=0.01, epochs=10, batch_size=64).run()
    q = net.cycle_table.detach().numpy()
    for c in range(3):  # Q is in instance-normalised units: compare shapes, aligned on tick % 24
        assert np.corrcoef(q[:, c], cycle)[0, 1] > 0.95


# -- streaming --------------------------------------------------------------------------------------------


def test_phase_comes_from_the_tick_across_a_gap():
    """Row 1 sees the same values as row 0 but with a gap of 7 ticks (not a multiple of W) after a reset."""
    model = small(online=False)
    rows = np.array([0, 1])
    feed(model, rows, range(400), np.repeat(cyclic(np.arange(400)), 2, axis=1))
    assert model.fitted_
    # identical training data -> identical Q columns and scalers, so forecasts can be compared row to row
    feed(model, np.array([0]), range(400, 440), cyclic(np.arange(400, 440)))
    model.reset_rows(np.array([1]))
    feed(model, np.array([1]), range(447, 467), cyclic(np.arange(447, 467)))
    assert np.isnan(model.forecast_many(np.array([1]), 6)).all()  # 20 < lookback values since the gap
    feed(model, np.array([1]), range(467, 477), cyclic(np.arange(467, 477)))
    feed(model, np.array([0]), range(440, 477), cyclic(np.arange(440, 477)))
    assert np.array_equal(model._last_tick[:2], [476, 476])
    feed(model, rows, range(477, 477 + 24), np.repeat(cyclic(np.arange(477, 501)), 2, axis=1))
    # same ticks, same values, same phase -> the same forecast, though row 1 has seen 7 fewer rows
    f = model.forecast_many(rows, 6)
    np.testing.assert_allclose(f[1], f[0], rtol=1e-6)
    truth = PATTERN[np.arange(501, 507) % W]
    assert np.abs(f[0] - truth).max() < 0.3
    # a row-count phase would be off by 7: the cycle table makes that visible
    net = model.net_
    x = torch.as_tensor(model._last(np.array([1]), 24), dtype=torch.float32)[:, :, None]
    x = (x - model._mean[1]) / model._scale[1]
    right = net(x, torch.tensor([(500 - 23) % W]), torch.tensor([[1]]))
    wrong = net(x, torch.tensor([(500 - 23 - 7) % W]), torch.tensor([[1]]))
    assert (right - wrong).abs().max() > 0.05


def test_forecasts_are_nan_until_warm_then_raw_scale():
    model = small()
    rows = np.array([0, 1, 2])
    values = cyclic(np.arange(600), channels=3)
    feed(model, rows, range(399), values[:399])
    assert np.isnan(model.forecast_many(rows, 6)).all()
    feed(model, rows, range(399, 600), values[399:])
    f = model.forecast_many(rows, 8)  # asking beyond the model's horizon pads with NaN
    assert f.shape == (3, 8) and np.isnan(f[:, 6:]).all()
    truth = cyclic(np.arange(600, 606), channels=3, noise=0.0).T
    assert np.abs(f[:, :6] - truth).max() < 0.5  # channels live at levels 0, 10, 20
    assert model.fit_report_["rows"] == 3 and model._rounds > 0


def test_late_series_joins_the_fitted_model():
    model = small()
    feed(model, np.array([0]), range(400), cyclic(np.arange(400)))
    assert model.fitted_
    late = cyclic(np.arange(400, 460), channels=2)[:, 1] * 3 + 100
    for i, t in enumerate(range(400, 460)):
        model.learn_many(np.array([0, 5]), np.array([t, t]), np.array([cyclic(np.array([t]))[0, 0], late[i]]))
    f = model.forecast_many(np.array([5]), 6)
    assert np.isfinite(f).all() and abs(f.mean() - 130) < 15


def test_deferred_training_runs_from_a_worker_thread():
    model = small(defer=None)  # inline until maintenance() comes from another thread
    rows = np.array([0, 1])
    values = cyclic(np.arange(700), channels=2)
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            model.maintenance(0.01)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        for t in range(700):
            model.learn_many(rows, np.array([t, t]), values[t])
            model.forecast_many(rows, 6)
    finally:
        stop.set()
        thread.join()
    once = threading.Thread(target=model.maintenance, args=(0.01,))  # at least one call after learn_many began
    once.start()
    once.join()
    assert model._deferred
    for _ in range(200):  # finish whatever the worker had left
        model.maintenance(0.05)
        if model.fitted_ and model._due == 0:
            break
    assert model.fitted_
    assert np.isfinite(model.forecast_many(rows, 6)).all()


def test_maintenance_from_another_thread_leaves_inline_work_alone():
    # defer=False promises inline work: a worker thread calling maintenance must not take a replay step (the
    # result would depend on which thread got the lock first); the learning thread itself still may
    model = small()
    rows = np.array([0, 1])
    feed(model, rows, range(420), cyclic(np.arange(420), channels=2))
    assert model.fitted_
    model._due = 1  # as if learn_many had just made a replay step due
    maintain_from_another_thread(model)
    assert model._due == 1
    model.maintenance(60.0)  # the learning thread (as replay calls it)
    assert model._due == 0


def test_save_restore_is_bit_exact(tmp_path):
    rows = np.array([0, 1, 2])
    values = cyclic(np.arange(700), channels=3, seed=3)
    model = small(replay_steps=2, step_budget=60.0)  # no time cut-offs: the same steps in both runs
    feed(model, rows, range(500), values[:500])
    assert model.fitted_ and model._rounds > 0

    shared, meta = model.export_shared()
    per_row = model.export_rows(rows)
    save_file(shared, str(tmp_path / "shared.safetensors"))
    save_file(per_row, str(tmp_path / "rows.safetensors"))
    (tmp_path / "meta.json").write_text(json.dumps(meta))

    restored = make(**model.get_params())
    restored.import_shared(load_file(str(tmp_path / "shared.safetensors")),
                           json.loads((tmp_path / "meta.json").read_text()))
    restored.import_rows(rows, load_file(str(tmp_path / "rows.safetensors")))
    np.testing.assert_array_equal(restored.forecast_many(rows, 6), model.forecast_many(rows, 6))
    for t in range(500, 700):  # learning online from here must stay identical, step for step
        for m in (model, restored):
            m.learn_many(rows, np.full(3, t), values[t])
        np.testing.assert_array_equal(restored.forecast_many(rows, 6), model.forecast_many(rows, 6))
    a, b = model.export_rows(rows), restored.export_rows(rows)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


@pytest.mark.parametrize("name", ["cyclenet", "cfc"])
def test_online_learning_inline_does_not_depend_on_the_machines_speed(monkeypatch, name):
    """With the default step budget a replay takes every due replay step: the same forecasts on a busy machine
    (a 0.02 s budget per round made CycleNet's promotions differ between identical replays run side by side)."""
    import tidecast.models.warm_start as warm_start
    from tidecast.models.registry import MODELS

    rows = np.array([0, 1])
    values = cyclic(np.arange(560), channels=2, seed=4)
    params = dict(horizon=6, warm_start=400, replay_window=64, replay_batch=16, defer=False, seed=1, epochs=2)
    if name == "cyclenet":
        params.update(lookback=24, cycle=W, batch_size=32)

    def run() -> np.ndarray:
        model = MODELS[name](**params)
        feed(model, rows, range(560), values)
        assert model.fitted_
        return model.forecast_many(rows, 6)

    quiet = run()
    clock = iter(range(10**9))  # every reading of the clock a second later: a machine far busier than any
    monkeypatch.setattr(warm_start.time, "perf_counter", lambda: float(next(clock)))
    np.testing.assert_array_equal(run(), quiet)


# -- cycle detection on real data ----------------------------------------------------------------------------


@pytest.mark.skipif(not (DATA / "ETTh1.csv").exists(), reason="shared data not available")
def test_detects_the_daily_cycle_of_etth1():
    frame = pd.read_csv(DATA / "ETTh1.csv")
    values = frame.iloc[:8640, 1:].to_numpy()
    assert detect_cycle(values) == 24
    # and the forecaster does it itself at the warm start (cycle=None)
    model = CycleNetForecaster(horizon=24, cycle=None, warm_start=1200, epochs=1, online=False, defer=False)
    rows = np.arange(7)
    for t in range(1200):
        model.learn_many(rows, np.full(7, t), values[t])
    assert model.cycle_ == 24


@pytest.mark.skipif(not (DATA / "nab_nyc_taxi.csv").exists(), reason="shared data not available")
def test_detects_the_cycle_of_nyc_taxi():
    values = pd.read_csv(DATA / "nab_nyc_taxi.csv")["value"].to_numpy(dtype=float)
    assert detect_cycle(values, max_cycle=400) in (48, 336)


def test_replay_windows_are_the_series_own_windows():
    """Windows drawn for replay are gathered from the history rings: check values, order and phase."""
    model = small(replay_window=50)
    rows = np.array([0, 1])
    ticks = np.arange(1000, 1450)
    values = np.stack([cyclic(ticks)[:, 0] + ticks * 1e-3, cyclic(ticks)[:, 0] * 2 - ticks * 1e-3], axis=1)
    feed(model, rows, range(1000, 1450), values)
    with model._lock:
        model._reshuffle()  # a fresh pass (in an old one, windows that have left the buffer are skipped)
        x, y, phase, cols = model._next_batch()
    assert x.shape[0] == 32 and set(cols[:, 0].tolist()) <= {0, 1}
    window = torch.cat([x, y], dim=1)[:, :, 0].double().numpy()
    for b in range(window.shape[0]):
        r = int(cols[b, 0])
        raw = window[b] * model._scale[r] + model._mean[r]
        start = int(np.flatnonzero(np.isclose(values[:, r], raw[0]))[0])  # where this window begins
        np.testing.assert_allclose(raw, values[start : start + 30, r], rtol=1e-5, atol=1e-5)
        assert int(phase[b]) == ticks[start] % W
        assert start + 30 > 450 - 50 - 1  # only the newest replay_window windows


def test_runs_in_the_engine_from_the_registry():
    """The registry name, raw-scale values in, forecasts with intervals out, state through the engine."""
    from tidecast.stream.batch import ObservationBatch
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine

    params = dict(lookback=24, cycle=None, warm_start=400, epochs=3, batch_size=32, replay_window=128,
                  replay_batch=32)
    config = EngineConfig(horizon=6, models=["cyclenet"], model_params={"cyclenet": params}, freq="1h")
    engine = Engine.from_config(config)
    ids = np.array(["a", "b"], dtype=object)
    start = np.datetime64("2024-01-01T00:00", "ns").astype(np.int64)
    hour = 3_600_000_000_000
    values = cyclic(np.arange(600), channels=2) + 100.0
    out = []
    for lo in range(0, 600, 50):
        ticks = np.arange(lo, lo + 50)
        batch = ObservationBatch(np.tile(ids, 50), np.repeat(start + ticks * hour, 2), values[lo : lo + 50].ravel())
        out.append(engine.process(batch).forecasts)
        engine.maintenance()
    model = engine.lanes[0].model
    assert isinstance(model, CycleNetForecaster) and model.cycle_ == W
    last = out[-1]
    assert len(last) and np.isfinite(last.mean).all() and np.all(last.lower <= last.upper)
    assert abs(np.median(last.mean) - 105) < 10  # raw scale: channels at levels 100 and 110


def test_engine_can_drop_a_cyclenet_series_and_reuse_its_row():
    from tidecast.stream.batch import ObservationBatch
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine

    hour = 3_600_000_000_000
    cfg = EngineConfig(horizon=4, models=["cyclenet"], freq="1h",
                       model_params={"cyclenet": {"lookback": 8, "warm_start": 80, "epochs": 1, "cycle": 6}})
    engine = Engine.from_config(cfg)
    ids = np.array(["a", "b", "c"], dtype=object)
    for k in range(120):
        engine.process(ObservationBatch(ids, np.full(3, k * hour), np.sin(2 * np.pi * k / 6) + np.arange(3.0)))
    assert engine.lanes[0].model.net_ is not None
    engine.drop_series(["b"])
    row = engine.process(ObservationBatch(np.array(["new"], dtype=object), np.array([120 * hour]), np.array([1.0])))
    assert engine._slot_of["new"] == 1 and len(row.forecasts) == 0  # a fresh series: no history, no forecast
    for k in range(121, 140):  # after one full window the new series is served by the fitted model
        out = engine.process(ObservationBatch(np.array(["a", "new"], dtype=object), np.full(2, k * hour),
                                              np.array([np.sin(2 * np.pi * k / 6), 1.0])))
    assert set(out.forecasts.series_id) == {"a", "new"}


def _three_series(model, ticks, spike_at=None, spike=1e15):
    """Series at levels 0, 5 and 10 on a 6-step cycle; the third with a scale of 1e-5 (and one ``spike``)."""
    rng = np.random.default_rng(0)
    rows = np.array([0, 1, 2])
    for t in ticks:
        v = np.sin(2 * np.pi * t / 6) * np.array([1.0, 1.0, 1e-5]) + np.array([0.0, 5.0, 10.0])
        v = v + rng.normal(0, 0.05, 3) * np.array([1.0, 1.0, 1e-5])
        if t == spike_at:
            v[2] = spike
        model.learn_many(rows, np.full(3, t), v)
    return rows


def test_a_row_replaced_while_the_deferred_fit_runs_joins_on_its_own_state():
    """defer=True (serve): a series dropped while the warm-start fit was pending (its row blanked and reused) got
    the snapshot's scaler, cycle column and residuals when the fit was installed: a new series at level 1000 with
    the old one's scale 0.7 had its windows clipped to their median and forecast a flat 1000."""
    from tidecast.models.cyclenet import CycleNetForecaster

    def run(drop_first: bool) -> np.ndarray:
        model = CycleNetForecaster(horizon=4, lookback=8, cycle=6, warm_start=120, epochs=2, defer=True)
        model.resize(8)
        blank = model.export_rows(np.array([0]))
        rng = np.random.default_rng(0)
        for t in range(120):
            base = np.sin(2 * np.pi * t / 6)
            model.learn_many(np.array([0, 1]), np.array([t, t]), np.array([base, 5.0 + base]) + rng.normal(0, .05, 2))
        if not drop_first:
            model.maintenance(60.0)
        model.drop_rows(np.array([1]))
        model.import_rows(np.array([1]), blank)
        if drop_first:
            model.maintenance(60.0)
        for t in range(120, 160):
            base = np.sin(2 * np.pi * t / 6)
            model.learn_many(np.array([0, 1]), np.array([t, t]), np.array([base, 1000.0 + 100 * base]))
            model.maintenance(0.0)
        return np.array([model._mean[1], model._scale[1], *model.forecast_many(np.array([1]), 4)[0]])

    np.testing.assert_allclose(run(drop_first=True), run(drop_first=False))


def test_a_refit_never_steps_on_an_absurd_window():
    """A retrain's refit read its windows unclipped and stepped on any loss: one value of 1e15 in a series of scale
    1e-5 (inside the engine's max_abs_value) made the candidate's backbone NaN for every series."""
    from tidecast.models.cyclenet import CycleNetForecaster
    from tidecast.stream.retrain import copy_model

    model = CycleNetForecaster(horizon=4, lookback=8, cycle=6, warm_start=120, epochs=2, replay_batch=16)
    rows = _three_series(model, range(200), spike_at=180)
    candidate = copy_model(model, rows)
    candidate.refit(recent=48, epochs=1)
    assert all(torch.isfinite(p).all() for p in candidate.net_.parameters())
    assert np.isfinite(candidate.forecast_many(rows, 4)).all()


def test_bootstrap_replicas_learn_only_the_windows_the_model_admitted():
    """The replay step left out windows whose loss was not finite; the replicas were stepped on the whole batch,
    their weights became NaN and every series' spread NaN for good (input_limit off, one 1e15 value)."""
    from tidecast.models.cyclenet import CycleNetForecaster

    model = CycleNetForecaster(horizon=4, lookback=8, cycle=6, warm_start=120, epochs=2, replay_batch=16,
                               bootstrap=4, input_limit=None)
    rows = _three_series(model, range(260), spike_at=180)
    assert model.skipped_windows_ > 0
    assert all(torch.isfinite(p).all() for p in model.replicas_.parameters())
    assert np.isfinite(model.spread_many(rows, 4)).all()


def test_shared_state_with_another_replica_count_is_refused_with_a_reason():
    from tidecast.models.cyclenet import CycleNetForecaster

    def make(bootstrap: int):
        return CycleNetForecaster(horizon=4, lookback=8, cycle=6, warm_start=120, epochs=2, bootstrap=bootstrap)

    saved = make(2)
    _three_series(saved, range(140))
    with pytest.raises(ValueError, match="bootstrap=2 replicas, this model 3"):
        make(3).import_shared(*saved.export_shared())
