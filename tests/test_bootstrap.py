"""Bootstrap replicas (tidecast.models.bootstrap, each model's ``bootstrap=B``) and the label-free watcher
(tidecast.monitors.bootstrap): spread exists and grows off-distribution, bootstrap=0 changes nothing, state
round trips, the engine raises the uncertainty event, and the models keep the contract with replicas on."""

from __future__ import annotations

import numpy as np
import pytest

from tidecast import checks
from tidecast.models.registry import make_model
from tidecast.monitors.bootstrap import BootstrapMonitor, horizon_buckets

H = 4
#: small, quick settings per model, replicas on
BOOT_PARAMS = {
    "seasonal-naive": {"period": 6, "bootstrap": 4},
    "holt-winters": {"period": 6, "warmup": 20, "bootstrap": 4},
    "snarimax": {"period": 6, "warmup": 20, "bootstrap": 3},
    # inline fit and replay (defer=False), small enough to fit in a test; online: replicas learn in replay steps
    "cyclenet": {"lookback": 12, "cycle": 6, "warm_start": 96, "epochs": 3, "lr": 0.05, "batch_size": 16,
                 "replay_window": 32, "replay_batch": 16, "replay_every": 2, "replay_steps": 1, "defer": False,
                 "step_budget": 10.0, "bootstrap": 4},
    # a residual bootstrap on the liquid model's one-step residuals; frozen, so that its states alone move
    "cfc": {"lookback": 8, "units": 8, "backbone_units": 16, "warm_start": 96, "epochs": 30, "lr": 0.02,
            "batch_size": 16, "mode": "frozen", "defer": False, "bootstrap": 4},
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """CycleNet's tiny steps: one intra-op thread is several times faster than two on a shared machine."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _series(n: int, shift_at: int | None = None, shift: float = 0.0, seed: int = 0, n_rows: int = 2) -> np.ndarray:
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    y = 10 + 3 * np.sin(2 * np.pi * t / 6)[:, None] + 0.3 * rng.normal(size=(n, n_rows))
    if shift_at is not None:
        y[shift_at:] += shift * (1 + np.arange(n - shift_at))[:, None] / 10  # a trend: inputs leave their range
    return y


def _run(model, values: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    rows = np.arange(values.shape[1])
    model.resize(rows.size)
    forecasts, spreads = [], []
    for t, y in enumerate(values):
        model.learn_many(rows, np.full(rows.size, t), y)
        forecasts.append(model.forecast_many(rows, H))
        spreads.append(model.spread_many(rows, H))
    return forecasts, spreads


@pytest.mark.parametrize("name", list(BOOT_PARAMS))
def test_spread_is_nonzero_and_grows_off_distribution(name: str) -> None:
    n, at = 300, 240
    _, spreads = _run(make_model(name, horizon=H, **BOOT_PARAMS[name]), _series(n, at, shift=3.0))
    before = np.nanmean([s.mean() for s in spreads[at - 40 : at]])
    after = np.nanmean([s.mean() for s in spreads[at + 10 : at + 40]])
    assert np.isfinite(before) and before > 0
    assert after > 1.5 * before, (before, after)


def test_cfc_residual_bootstrap_spread_follows_its_residuals() -> None:
    """cfc's replicas resample its own one-step residuals, so the spread follows them: here the noise's standard
    deviation doubles (0.3 to ~0.67) with no change of level, trend or cycle."""
    n, at = 300, 240
    values = _series(n)
    values[at:] += 0.6 * np.random.default_rng(1).normal(size=(n - at, values.shape[1]))  # noise sd 0.3 -> ~0.67
    model = make_model("cfc", horizon=H, **BOOT_PARAMS["cfc"])
    _, spreads = _run(model, values)
    before = np.nanmean([s.mean() for s in spreads[at - 40 : at]])
    after = np.nanmean([s.mean() for s in spreads[at + 30 : at + 60]])
    assert np.isfinite(before) and before > 0
    assert after > 1.3 * before, (before, after)
    assert np.all(np.diff(spreads[-1], axis=1) > 0)  # sums of more residuals: wider with h


@pytest.mark.parametrize("name", list(BOOT_PARAMS))
def test_bootstrap_zero_changes_no_forecast(name: str) -> None:
    params = {k: v for k, v in BOOT_PARAMS[name].items() if k != "bootstrap"}
    values = _series(120)
    plain, plain_spread = _run(make_model(name, horizon=H, **params), values)
    off, off_spread = _run(make_model(name, horizon=H, **params, bootstrap=0), values)
    with_replicas, _ = _run(make_model(name, horizon=H, **BOOT_PARAMS[name]), values)
    np.testing.assert_array_equal(np.array(plain), np.array(off))
    np.testing.assert_array_equal(np.array(plain), np.array(with_replicas))  # replicas never touch the point
    assert all(s is None for s in plain_spread + off_spread)


@pytest.mark.parametrize("backbone", ["linear", "mlp"])
def test_cyclenet_serves_forecast_and_spread_in_one_pass(backbone: str) -> None:
    """The served net evaluated as replica 0 of the replicas' batched pass: its forecast is the same to the bit
    with and without replicas (also when its cycle table has more columns than theirs) and the net's own to
    float rounding; the spread is the replicas' standard deviation."""
    torch = pytest.importorskip("torch")
    from tidecast.models.cyclenet_net import build
    from tidecast.models.cyclenet_replicas import Replicas, serve_windows

    reps = Replicas(4, lookback=8, horizon=4, cycle=6, channels=3, backbone=backbone, hidden=16, seed=5)
    net = build(8, 4, 6, 5, backbone, 16, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        reps.cycle_table.copy_(torch.randn(reps.cycle_table.shape, generator=g))
        net.cycle_table.copy_(torch.randn(net.cycle_table.shape, generator=g))
    x = 5 + 2 * torch.randn(7, 8, 1, generator=g)
    phase, cols = torch.randint(0, 6, (7,), generator=g), torch.randint(0, 3, (7, 1), generator=g)
    with torch.inference_mode():
        forecast, spread = serve_windows(net, reps, x, phase, cols)
        alone, none = serve_windows(net, None, x, phase, cols)
        each = reps(x, phase, cols)[..., 0]  # (B, N, H), every replica de-normalised on its own
        torch.testing.assert_close(forecast, net(x, phase, cols)[:, :, 0], rtol=1e-5, atol=1e-5)
    assert none is None and torch.equal(forecast, alone)
    torch.testing.assert_close(spread, each.std(dim=0, unbiased=False), rtol=1e-4, atol=1e-5)
    assert float(spread.min()) > 0


@pytest.mark.parametrize("name", list(BOOT_PARAMS))
def test_replica_state_round_trips(name: str) -> None:
    values = _series(160)
    model = make_model(name, horizon=H, **BOOT_PARAMS[name])
    _run(model, values[:100])
    rows = np.arange(values.shape[1])
    shared = model.export_shared()
    # per-series models move to other rows of another table; a shared model's replay plan names its rows
    moved = rows + 3 if not shared[0] else rows
    restored = make_model(name, horizon=H, **BOOT_PARAMS[name])
    restored.import_shared(*shared)
    restored.import_rows(moved[::-1], model.export_rows(rows[::-1]))
    for t in range(100, 160):
        model.learn_many(rows, np.full(2, t), values[t])
        restored.learn_many(moved, np.full(2, t), values[t])
        np.testing.assert_array_equal(model.forecast_many(rows, H), restored.forecast_many(moved, H))
        np.testing.assert_array_equal(model.spread_many(rows, H), restored.spread_many(moved, H))
    assert np.isfinite(model.spread_many(rows, H)).all()


@pytest.mark.parametrize("name", list(BOOT_PARAMS))
def test_models_keep_the_contract_with_replicas_on(name: str) -> None:
    from test_contract import HORIZON, MODEL_OPTIONS, MODEL_PARAMS  # the contract suite's settings, replicas on

    params = {**MODEL_PARAMS.get(name, {}), "bootstrap": 3}
    checks.check_forecaster(lambda: make_model(name, horizon=HORIZON, **params), horizon=HORIZON,
                            **MODEL_OPTIONS.get(name, {}))


def test_bootstrap_parameter_is_checked() -> None:
    with pytest.raises(ValueError, match="bootstrap = 1"):
        make_model("seasonal-naive", horizon=H, bootstrap=1)


def test_horizon_buckets_cover_every_horizon_once() -> None:
    for horizon in (1, 2, 3, 24, 25, 1000):
        buckets = horizon_buckets(horizon)
        covered = [h for first, last in buckets for h in range(first, last + 1)]
        assert covered == list(range(1, horizon + 1))
        assert len(buckets) <= 2 + int(np.log2(horizon))


def test_monitor_alarms_on_a_spread_increase_only() -> None:
    rng = np.random.default_rng(0)
    spread = np.exp(0.2 * rng.normal(size=(600, 2)))
    spread[400:, 1] *= 3.0  # row 1's replicas start to disagree
    monitor = BootstrapMonitor(model=None, horizon=3)
    fired_rows = []
    rows = np.arange(2)
    for t, s in enumerate(spread):
        ticks = np.full(2, t)
        mean = np.ones((2, 3))
        monitor.matured(rows, ticks, np.zeros(2), mean, mean, mean, np.ones((2, 3), bool))
        alarms = monitor.observe(rows, ticks, np.repeat(s[:, None], 3, axis=1))
        fired_rows += [(int(r), t) for r in alarms.rows]
    assert fired_rows and all(r == 1 for r, _ in fired_rows)
    assert 400 <= fired_rows[0][1] < 410
    assert monitor.deterioration_[0] == pytest.approx(1.0, abs=0.5)
    medians = monitor.spread_ratio_medians()
    assert sorted(medians) == [1, 2, 3]


def test_monitor_state_round_trips_without_resetting_or_doubling() -> None:
    rng = np.random.default_rng(1)
    spread = np.exp(0.2 * rng.normal(size=(500, 3)))
    spread[300:, :2] *= 3.0

    def run(monitor: BootstrapMonitor, part: np.ndarray, start: int) -> list[tuple[int, int]]:
        out = []
        rows = np.arange(3)
        for i, s in enumerate(part):
            ticks = np.full(3, start + i)
            mean = np.ones((3, 2))
            monitor.matured(rows, ticks, np.zeros(3), mean, mean, mean, np.ones((3, 2), bool))
            out += [(int(r), start + i) for r in monitor.observe(rows, ticks, np.repeat(s[:, None], 2, 1)).rows]
        return out

    whole = BootstrapMonitor(model=None, horizon=2)
    expected = run(whole, spread, 0)
    first = BootstrapMonitor(model=None, horizon=2)
    got = run(first, spread[:303], 0)  # the CUSUMs are climbing when the state is cut
    second = BootstrapMonitor(model=None, horizon=2)
    second.import_rows(np.arange(3), first.export_rows(np.arange(3)))
    got += run(second, spread[303:], 303)
    assert expected and got == expected
    np.testing.assert_array_equal(whole.last_alarm_tick_[:3], second.last_alarm_tick_[:3])


def test_monitor_restarts_rows_saved_without_it() -> None:
    monitor = BootstrapMonitor(model=None, horizon=2)
    monitor.resize(2)
    monitor.rows_["n"][:] = 50
    monitor.import_rows(np.arange(2), {"last_alarm_tick": np.array([5, 6])})
    assert (monitor.rows_["n"][:2] == 0).all()


# -- inside the engine ------------------------------------------------------------------------------------------
HOUR = 3_600 * 10**9
T0 = 1_483_228_800 * 10**9  # 2017-01-01


def _engine(**overrides):
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine

    base = dict(horizon=6, models=["seasonal-naive"], freq="1h",
                model_params={"seasonal-naive": {"period": 24, "bootstrap": 8}})
    return Engine.from_config(EngineConfig(**(base | overrides)))


def _values(steps: int = 900, at: int = 600) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(steps)[:, None]
    values = 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(3)) + 0.5 * rng.normal(size=(steps, 3))
    values[at:, 1] += 0.2 * (1 + np.arange(steps - at))  # s1 trends out of its range from tick 600
    return values


def _feed(engine, values: np.ndarray, start: int = 0, chunk: int = 48) -> list:
    from tidecast.stream.batch import ObservationBatch

    ids = np.array([f"s{i}" for i in range(values.shape[1])], dtype=object)
    events = []
    for lo in range(0, values.shape[0], chunk):
        block = values[lo : lo + chunk]
        ticks = start + lo + np.arange(block.shape[0])
        batch = ObservationBatch(np.tile(ids, len(ticks)), T0 + np.repeat(ticks, len(ids)) * HOUR, block.reshape(-1))
        events += engine.process(batch).events
    return events


def _tick(event) -> int:
    return round((event.detected_at.timestamp() * 1e9 - T0) / HOUR)


def test_engine_raises_the_uncertainty_event_and_publishes_the_spread_ratio() -> None:
    engine = _engine(drift_detector="none")
    assert [m.detector for m in engine.lanes[0].monitors] == ["bootstrap"]
    events = _feed(engine, _values())
    assert events, "no uncertainty event"
    assert {(e.detector, e.kind) for e in events} == {("bootstrap", "uncertainty")}
    after = [e for e in events if e.series_id == "s1" and _tick(e) >= 600]
    assert after and _tick(after[0]) < 600 + 48  # within two cycles
    assert not [e for e in events if _tick(e) < 600]  # no alarm on the clean part
    registry = engine.metrics.registry
    assert registry.get_sample_value("tidecast_drift_alarms_total",
                                     {"model": "seasonal-naive", "detector": "bootstrap"}) == len(events)
    labels = {s.labels["horizon"] for m in registry.collect() if m.name == "tidecast_bootstrap_spread_ratio"
              for s in m.samples}
    assert labels == {"1", "2", "4", "6"}  # horizon buckets of H = 6
    ratio = registry.get_sample_value("tidecast_bootstrap_spread_ratio", {"model": "seasonal-naive", "horizon": "1"})
    assert ratio is not None and ratio > 0


def test_engine_without_replicas_runs_no_bootstrap_watcher() -> None:
    engine = _engine(model_params={"seasonal-naive": {"period": 24}})
    assert [m.detector for m in engine.lanes[0].monitors] == ["cusum"]


def test_engine_checkpoint_restore_neither_resets_nor_doubles_the_bootstrap_alarm() -> None:
    values = _values()
    whole = _engine(drift_detector="none")
    expected = [(e.series_id, _tick(e)) for e in _feed(whole, values)]
    first = _engine(drift_detector="none")
    got = [(e.series_id, _tick(e)) for e in _feed(first, values[:612])]  # cut while s1's CUSUM climbs
    ids = first.series_ids
    meta, arrays = first.export_series(ids)
    assert any(k.startswith("seasonal-naive/bootstrap/") for k in arrays)
    assert any(k.startswith("seasonal-naive/model/boot_") for k in arrays)
    second = _engine(drift_detector="none")  # a fresh process: kill -9, then restore from the checkpoint
    second.import_shared(first.export_shared())
    second.import_series(meta, arrays)
    got += [(e.series_id, _tick(e)) for e in _feed(second, values[612:], start=612)]
    assert expected and got == expected


def test_bootstrap_watcher_settings_are_checked() -> None:
    from tidecast.stream.settings import SettingsError

    engine = _engine(bootstrap_params={"threshold": 50.0}, drift_detector="none")
    assert engine.lanes[0].monitors[0].threshold == 50.0
    with pytest.raises(SettingsError, match="bootstrap watcher parameter bogus"):
        _engine(bootstrap_params={"bogus": 1})


def test_replay_writes_the_uncertainty_events(tmp_path) -> None:
    import json

    import pandas as pd

    from tidecast.stream.cli import main

    values = _values()
    stamps = pd.date_range("2017-01-01", periods=len(values), freq="1h")
    frame = pd.DataFrame({"date": stamps.strftime("%Y-%m-%d %H:%M:%S"),
                          **{f"s{i}": values[:, i] for i in range(values.shape[1])}})
    frame.to_csv(tmp_path / "trend.csv", index=False)
    events_file, summary_file = tmp_path / "events.jsonl", tmp_path / "summary.json"
    assert main(["replay", str(tmp_path / "trend.csv"), "--model", "sn=seasonal-naive", "--model-param",
                 "sn.period=24", "--model-param", "sn.bootstrap=8", "--bootstrap-param", "threshold=4",
                 "--horizon", "6", "--freq", "1h", "--events", str(events_file), "--summary-json",
                 str(summary_file), "--no-progress", "--dead-letter", str(tmp_path / "dead.jsonl")]) == 0
    lines = [json.loads(line) for line in events_file.read_text().splitlines()]
    boot = [line for line in lines if line["detector"] == "bootstrap"]
    assert boot and {line["kind"] for line in boot} == {"uncertainty"}
    assert any(line["series_id"] == "trend/s1" for line in boot)
    assert json.loads(summary_file.read_text())["drift_events"]["sn"]["bootstrap"] == len(boot)


def test_after_a_promotion_the_watcher_reads_the_model_now_served() -> None:
    """A retrain promotion replaces the lane's model; the watcher read the replaced one (whose replicas no longer
    forecast: its ratio went NaN and it could never alarm again)."""
    engine = _engine(models=["hw=holt-winters"], model_params={"hw": {"period": 24, "warmup": 48, "bootstrap": 4}},
                     bootstrap_params={"warmup": 20}, retrain="on",
                     retrain_params={"schedule": 40, "min_fresh": 10, "cooldown": 30, "shadow_steps": 10,
                                     "history": 48, "significance": 0, "margin": -1e9, "flip_budget": 1.0})
    events = _feed(engine, _values(steps=500, at=500), chunk=1)
    assert [e for e in events if e.kind == "promoted"], "the policy promoted nothing"
    lane = engine.lanes[0]
    (watcher,) = [m for m in lane.monitors if isinstance(m, BootstrapMonitor)]
    assert watcher.model is lane.model
    rows = engine.live_rows()
    n_before = watcher.rows_["n"][rows].copy()
    _feed(engine, _values(steps=560, at=560)[500:], start=500, chunk=1)
    assert (watcher.rows_["n"][rows] > n_before).all() and np.isfinite(watcher.ratio_[rows, 0]).all()


def test_a_rows_residual_bootstrap_spread_does_not_depend_on_its_batch_mates() -> None:
    """The deepest row of a call (seasonal naive: steps(h) = ceil(h / period)) numbered every row's draws, so a
    series' spread, and its uncertainty alarms, changed with the series forecast beside it and the batch size."""
    from tidecast.models.bootstrap import ResidualRing

    ring = ResidualRing(replicas=8)
    ring.resize(2)
    rng = np.random.default_rng(0)
    for _ in range(40):
        ring.add(np.array([0, 1]), rng.normal(size=2))
    short = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])  # period 4: at most two one-cycle steps
    deep = np.arange(1, 9)[None, :]  # a period not yet known: h steps
    keys = np.array([3.0, 5.0])
    alone = ring.spread(np.array([0]), np.array([39]), short, keys[:1])
    beside = ring.spread(np.array([0, 1]), np.array([39, 39]), np.vstack([short, deep]), keys)
    np.testing.assert_array_equal(beside[:1], alone)


def test_the_spread_gauge_leaves_with_the_series_it_summarised() -> None:
    """After drop_series (a partition moved away) the gauge kept the old median for series this process no longer
    forecasts; it is removed until a held series has a ratio again."""
    engine = _engine(drift_detector="none")
    _feed(engine, _values()[:200])
    registry = engine.metrics.registry
    labels = {"model": "seasonal-naive", "horizon": "1"}
    assert registry.get_sample_value("tidecast_bootstrap_spread_ratio", labels) is not None
    engine.drop_series(engine.series_ids)
    assert registry.get_sample_value("tidecast_bootstrap_spread_ratio", labels) is None
    _feed(engine, _values()[:200])
    assert registry.get_sample_value("tidecast_bootstrap_spread_ratio", labels) is not None
