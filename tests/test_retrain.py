"""Retraining under drift: the pure policy, and jobs / shadow gate / promotion / state inside the engine."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.monitors.retrain import Promote, Reject, RetrainPolicy, StartJob, gate_errors, loss_differential_t
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.retrain import RetrainEvent, copy_model
from tidecast.stream.settings import SettingsError
from tidecast.stream.sinks import event_json

HOUR = 3_600 * 10**9
T0 = 1_483_228_800 * 10**9  # 2017-01-01
SHIFT = 420  # the cycle changes shape here
STEPS = 720


def phase_shifted(seed: int = 0, n: int = 3) -> np.ndarray:
    """(STEPS, n) daily cycles plus noise; from SHIFT on the cycle is inverted and gains a second harmonic."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS)[:, None]
    before = 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(n))
    after = 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(n) + np.pi) + 2 * np.sin(4 * np.pi * t / 24)
    return np.where(t >= SHIFT, after, before) + rng.normal(0, 0.4, (STEPS, n))


def config(retrain: str = "on", **params) -> EngineConfig:
    model = {"cyclenet": dict(lookback=24, cycle=24, warm_start=240, epochs=3, online=False)}
    rp = dict(min_fresh=24, shadow_steps=24, history=0, epochs=4) | params if retrain == "on" else {}
    return EngineConfig(horizon=4, models=["cyclenet"], freq="1h", model_params=model, retrain=retrain,
                        retrain_params=rp)


def feed(engine: Engine, values: np.ndarray, lo: int = 0, hi: int | None = None, chunk: int = 24):
    """Feed ticks [lo, hi) in batches of ``chunk`` steps; return (events, forecast means)."""
    ids = np.array([f"s{i}" for i in range(values.shape[1])], dtype=object)
    events, means = [], []
    hi = values.shape[0] if hi is None else hi
    for start in range(lo, hi, chunk):
        ticks = np.arange(start, min(start + chunk, hi))
        block = values[ticks]
        batch = ObservationBatch(np.tile(ids, len(ticks)), T0 + np.repeat(ticks, len(ids)) * HOUR, block.reshape(-1))
        result = engine.process(batch)
        engine.maintenance()
        events += result.events
        means.append(result.forecasts.mean)
    return events, np.concatenate(means)


def retrain_events(events) -> list[tuple[str, int]]:
    return [(e.kind, e.version) for e in events if e.detector == "retrain"]


@pytest.fixture(scope="module")
def reference():
    engine = Engine.from_config(config())
    events, means = feed(engine, phase_shifted())
    return engine, events, means


# -- the policy ---------------------------------------------------------------------------------------------

def test_policy_waits_for_fresh_data_cooldown_and_budget():
    policy = RetrainPolicy(min_fresh=10, cooldown=30, budget=2, budget_window=100)
    assert policy.poll(5) is None  # no trigger
    policy.alarm(10, "cusum", 1)
    policy.alarm(15, "cusum", 1)  # the change point stays the first alarm
    assert policy.poll(19) is None
    assert policy.poll(20) == StartJob("alarm:cusum", 10, 20)
    policy.alarm(25, "cusum", 1)
    assert policy.poll(45) is None  # cooldown: 30 steps after the last start
    assert policy.poll(50) is not None
    policy.alarm(60, "cusum", 1)
    assert policy.poll(90) is None  # budget: two starts within 100 steps
    assert policy.poll(121) is not None  # the first start left the window


def test_policy_triggers_by_detector_name_and_schedule():
    policy = RetrainPolicy(triggers=("bootstrap",), min_fresh=0, cooldown=0)
    policy.alarm(3, "cusum", 5)
    assert policy.poll(10) is None
    policy.alarm(11, "bootstrap", 1)
    assert policy.poll(11).reason == "alarm:bootstrap"
    scheduled = RetrainPolicy(schedule=50, cooldown=0)
    assert scheduled.poll(49) is None
    assert scheduled.poll(50) == StartJob("schedule", -1, 50)
    assert scheduled.poll(99) is None and scheduled.poll(100) is not None


def test_gate_needs_margin_and_few_negative_flips():
    policy = RetrainPolicy(margin=0.02, flip_margin=0.1, flip_budget=0.25)
    inc = np.array([1.0, 1.0, 1.0, 1.0])
    barely = policy.gate(inc, inc * 0.99)
    assert isinstance(barely, Reject) and "margin" in barely.reason
    flips = policy.gate(inc, np.array([0.1, 0.1, 1.2, 1.2]))  # much better overall, but half the series worse
    assert isinstance(flips, Reject) and "flips" in flips.reason and flips.ratio < 0.7
    good = policy.gate(inc, np.array([0.5, 0.5, 0.5, 1.2]))
    assert isinstance(good, Promote) and policy.version_ == 1
    assert gate_errors(np.zeros(3), np.zeros(3), 0.1) == (1.0, 0.0)


def test_the_gate_never_promotes_a_candidate_worse_in_plain_squared_error():
    """Weighed by each series' own error scale, a candidate 10 % worse on a series of MSE 100 and better on one of
    MSE 1 won (ratio 0.675) while its plain squared error was 9 % above the incumbent's: the unweighted totals
    guard the promise that no candidate more than the margin worse is promoted."""
    policy = RetrainPolicy(significance=0.0)
    weighted_inc, weighted_cand = np.array([1.0, 1.0]), np.array([1.1, 0.25])
    assert isinstance(policy.gate(weighted_inc, weighted_cand), Promote)
    worse = RetrainPolicy(significance=0.0).gate(weighted_inc, weighted_cand, raw=(101.0, 110.25))
    assert isinstance(worse, Reject) and "unweighted 1.092" in worse.reason
    slightly = RetrainPolicy(significance=0.0).gate(weighted_inc, weighted_cand, raw=(101.0, 102.0))
    assert isinstance(slightly, Promote)  # within the margin (2 %) in plain terms too


def test_gate_rejects_a_win_the_shadow_noise_explains():
    """Same totals (ratio 0.9), two shadows: in one the candidate is ahead at every step, in the other the
    differences swing by more than the mean win; only the first is significant."""
    policy = RetrainPolicy(significance=1.645)
    inc, cand = np.full(4, 10.0), np.full(4, 9.0)  # ratio 0.9: passes the margin and the flips
    steady = np.full(48, -4.0 / 48) + np.random.default_rng(0).normal(0.0, 0.01, 48)
    swinging = np.tile([3.0, -3.0], 24) + steady
    assert isinstance(policy.gate(inc, cand, steady, lag=23), Promote)
    noisy = policy.gate(inc, cand, swinging, lag=0)
    assert isinstance(noisy, Reject) and "not significant" in noisy.reason
    assert isinstance(RetrainPolicy(significance=0.0).gate(inc, cand, swinging, lag=0), Promote)  # off
    assert isinstance(RetrainPolicy().gate(inc, cand), Promote)  # no per-step differences given: no test


def test_loss_differential_t_accounts_for_overlapping_steps():
    rng = np.random.default_rng(1)
    # a differential made of overlapping 24-step sums of white noise, as H-step forecasts' losses overlap
    d = np.convolve(rng.normal(0.0, 1.0, 2000), np.ones(24), "valid")[:1000] - 2.0
    naive, hac = loss_differential_t(d, lag=0), loss_differential_t(d, lag=23)
    assert naive < hac < 0  # ignoring the overlap overstates the evidence
    assert loss_differential_t(np.array([1.0]), lag=3) == 0.0
    assert loss_differential_t(np.full(5, -1.0), lag=2) == -np.inf


def test_min_alarm_rows_counts_a_steps_alarms_over_the_rounds_that_split_it():
    """Found by the watchers review (2026-12-04): each round's count was compared alone, so two series alarming at
    one step started a job under min_alarm_rows=2 only when one batch held both of their rows."""
    import json

    split = RetrainPolicy(min_alarm_rows=2, min_fresh=3, cooldown=0)
    split.alarm(7, "cusum", 1)
    restored = RetrainPolicy(min_alarm_rows=2, min_fresh=3, cooldown=0)  # a checkpoint between the two rounds
    restored.import_state(json.loads(json.dumps(split.export_state())))
    restored.alarm(7, "cusum", 1)
    assert restored.poll(10) is not None
    apart = RetrainPolicy(min_alarm_rows=2, min_fresh=3, cooldown=0)
    apart.alarm(7, "cusum", 1)
    apart.alarm(8, "cusum", 1)  # one series a step: no change point
    apart.alarm(8, "d3a", 1)  # another detector's alarm is not added to cusum's
    assert apart.poll(12) is None


def test_policy_state_round_trips_through_json():
    import json

    policy = RetrainPolicy(min_fresh=5, cooldown=0)
    policy.alarm(1, "cusum", 1)
    policy.poll(7)
    policy.gate(np.ones(2), np.full(2, 0.5))
    policy.alarm(9, "cusum", 1)
    copy = RetrainPolicy(min_fresh=5, cooldown=0)
    copy.import_state(json.loads(json.dumps(policy.export_state())))
    assert copy.export_state() == policy.export_state()
    assert copy.poll(14) == policy.poll(14)


def test_settings_check_retrain_params():
    with pytest.raises(SettingsError, match="retrain"):
        config(min_fresh=-1)
    with pytest.raises(SettingsError, match="significance"):
        config(significance=-1.0)
    with pytest.raises(SettingsError, match="retrain"):
        EngineConfig(models=["seasonal-naive"], retrain_params={"no_such_key": 3})  # checked while off too


# -- in the engine ------------------------------------------------------------------------------------------

def test_drift_alarm_starts_a_job_whose_candidate_is_promoted(reference):
    engine, events, _ = reference
    kinds = retrain_events(events)
    assert kinds[:2] == [("retrain_started", 0), ("promoted", 1)]
    started = next(e for e in events if e.kind == "retrain_started")
    first_alarm = min(e.detected_at for e in events if e.detector == "cusum")
    assert started.detected_at > first_alarm
    assert (started.detected_at.timestamp() * 1e9 - T0) / HOUR >= SHIFT
    assert engine.model_versions() == {"cyclenet": sum(k == "promoted" for k, _ in kinds)}
    m = engine.metrics.registry.get_sample_value
    assert m("tidecast_retrains_total", {"model": "cyclenet", "outcome": "promoted"}) >= 1
    assert m("tidecast_model_version", {"model": "cyclenet"}) == engine.model_versions()["cyclenet"]
    assert m("tidecast_retrain_seconds_count") >= 1


def test_no_candidate_promoted_whose_shadow_error_was_worse(reference):
    _, events, _ = reference
    promoted = [e for e in events if isinstance(e, RetrainEvent) and e.kind == "promoted"]
    assert promoted
    for event in promoted:  # the gate's rule: at most 1 - margin; the bound is 1.02
        assert event.statistic <= 0.98
        assert "BCWI lambda" in event.reason


def test_retraining_lowers_the_error_after_the_change(reference):
    _, _, means = reference
    static = Engine.from_config(config("off"))
    feed(static, phase_shifted())
    after = {name: e.summary()["models"]["cyclenet"]["mae"]
             for name, e in (("retrain", reference[0]), ("static", static))}
    assert after["retrain"] < after["static"]


def test_replay_is_deterministic(reference):
    _, events, means = reference
    again = Engine.from_config(config())
    events2, means2 = feed(again, phase_shifted())
    assert [event_json(e) for e in events2] == [event_json(e) for e in events]  # NaN statistics as null
    np.testing.assert_array_equal(means2, means)


def test_a_crash_during_the_shadow_restarts_the_job_and_promotes_once(reference):
    values = phase_shifted()
    started = next(e for e in reference[1] if e.kind == "retrain_started")
    crash = round((started.detected_at.timestamp() * 1e9 - T0) / HOUR) + 8  # its candidate is in the shadow
    engine = Engine.from_config(config())
    events, _ = feed(engine, values, 0, crash)
    assert retrain_events(events) == [("retrain_started", 0)]
    ids = engine.series_ids
    meta, arrays = engine.export_series(ids)
    shared = engine.export_shared()
    assert shared["cyclenet"][1]["retrain"]["in_flight"] is not None
    restored = Engine.from_config(config())
    restored.import_shared(shared)
    restored.import_series(meta, arrays)
    later, _ = feed(restored, values, crash)
    kinds = retrain_events(events + later)
    assert kinds.count(("retrain_started", 0)) == 2  # restarted
    assert [k for k in kinds if k[0] == "promoted"] == [("promoted", 1)]
    assert restored.model_versions() == {"cyclenet": 1}


def test_a_model_without_refit_hook_fails_with_a_reason():
    cfg = EngineConfig(horizon=4, models=["seasonal-naive"], freq="1h",
                       model_params={"seasonal-naive": {"period": 24}}, retrain="on",
                       retrain_params={"min_fresh": 24, "cooldown": 1000})
    engine = Engine.from_config(cfg)
    events, _ = feed(engine, phase_shifted())
    failed = [e for e in events if e.detector == "retrain" and e.kind == "failed"]
    assert failed and "refit" in failed[0].reason
    assert engine.model_versions() == {"seasonal-naive": 0}


def test_jobs_run_on_the_trainer_thread_once_maintenance_comes_from_there():
    values = phase_shifted()
    engine = Engine.from_config(config())
    feed(engine, values, 0, SHIFT)
    stop = threading.Event()
    ran = []

    def trainer():
        while not stop.is_set():
            engine.retrainer.maintenance()
            ran.append(engine.retrainer.deferred)
            stop.wait(0.01)

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        ids = np.array([f"s{i}" for i in range(values.shape[1])], dtype=object)
        events = []
        for tick in range(SHIFT, STEPS):
            batch = ObservationBatch(ids, np.full(len(ids), T0 + tick * HOUR), values[tick])
            events += engine.process(batch).events
    finally:
        stop.set()
        thread.join()
    assert engine.retrainer.deferred and any(ran)
    kinds = [k for k, _ in retrain_events(events)]
    assert kinds[0] == "retrain_started" and {"promoted", "rejected"} & set(kinds)


def test_blend_interpolates_every_weight():
    model = CycleNetForecaster(horizon=2, lookback=8, cycle=6, warm_start=60, epochs=1, online=False)
    rows = np.array([0, 1])
    for tick in range(80):
        model.learn_many(rows, np.array([tick, tick]), np.sin(tick / 3) + np.array([0.0, 5.0]))
    other = copy_model(model, rows)
    other.refit(recent=20, epochs=2)
    mid = copy_model(other, rows)
    mid.blend(model, 0.25)
    for a, b, c in zip(model.net_.parameters(), other.net_.parameters(), mid.net_.parameters(), strict=True):
        np.testing.assert_allclose(c.detach().numpy(), 0.25 * b.detach().numpy() + 0.75 * a.detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert not np.allclose(other.forecast_many(rows, 2), model.forecast_many(rows, 2))


def test_a_member_adopts_a_newer_model_version_from_a_checkpoint(reference):
    promoted, _, _ = reference
    member = Engine.from_config(config())
    feed(member, phase_shifted(), 0, 300)  # fitted, version 0, serving its own series
    before = member.lanes[0].model.forecast_many(np.array([0]), 4)
    assert member.adopt_newer(promoted.export_shared()) == ["cyclenet"]
    assert member.model_versions() == promoted.model_versions()
    ours, theirs = member.lanes[0].model.net_.backbone, promoted.lanes[0].model.net_.backbone
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())
    assert np.isfinite(member.lanes[0].model.forecast_many(np.array([0]), 4)).all()
    assert not np.allclose(before, member.lanes[0].model.forecast_many(np.array([0]), 4))
    assert member.adopt_newer(promoted.export_shared()) == []  # same version: nothing to take


def test_a_run_without_retraining_keeps_the_saved_model_version(reference):
    """--retrain on, then a restart with it off, then on again: the version and the policy's state came back as 0
    (the run without retraining wrote no retrain entry), so the next promotion reused version 1."""
    promoted, _, _ = reference
    version = promoted.model_versions()["cyclenet"]
    assert version >= 1
    idle = Engine.from_config(config(retrain="off"))
    idle.import_shared(promoted.export_shared())
    saved = idle.export_shared()["cyclenet"][1]["retrain"]
    assert saved["policy"]["version"] == version and saved["in_flight"] is None
    again = Engine.from_config(config())
    again.import_shared(idle.export_shared())
    assert again.model_versions() == {"cyclenet": version}


@pytest.mark.parametrize("members", [1, 2])
def test_cfc_plugs_into_the_retrain_hook(members):
    from tidecast.models.liquid import build

    model = build(horizon=3, lookback=8, units=8, backbone_units=16, warm_start=60, epochs=1, mode="frozen",
                  members=members)
    model.resize(2)
    rows = np.array([0, 1])
    for tick in range(90):
        model.learn_many(rows, np.array([tick, tick]), np.sin(tick / 3) + np.array([0.0, 5.0]))
    candidate = copy_model(model, rows)
    np.testing.assert_array_equal(candidate.forecast_many(rows, 3), model.forecast_many(rows, 3))
    done = candidate.refit(recent=12, epochs=2)
    assert done["steps"] >= 2 * members  # an ensemble refits every member
    after = candidate.forecast_many(rows, 3)
    assert np.isfinite(after).all() and not np.allclose(after, model.forecast_many(rows, 3))


def test_no_job_before_the_first_fit():
    engine = Engine.from_config(config(schedule=50, triggers=[], cooldown=0))
    events, _ = feed(engine, phase_shifted(), 0, 300)
    started = [e for e in events if e.detector == "retrain"]
    assert started and all(e.kind != "failed" for e in started)
    first = min((e.detected_at.timestamp() * 1e9 - T0) / HOUR for e in started)
    assert first >= 239  # the warm start fits at the 240th observation (tick 239)


def test_gated_online_learning_promotes_only_through_the_gate():
    engine = Engine.from_config(config(mode="online", schedule=48, triggers=[], cooldown=0, lambdas=[]))
    events, _ = feed(engine, phase_shifted(), 0, SHIFT + 96)
    kinds = [k for k, _ in retrain_events(events)]
    assert kinds.count("retrain_started") >= 2 and "failed" not in kinds
    assert kinds.count("retrain_started") - kinds.count("promoted") - kinds.count("rejected") <= 1
    assert engine.lanes[0].model.online is False  # the served model stays frozen between gates
    for e in events:
        if e.detector == "retrain" and e.kind == "promoted":
            assert e.statistic <= 0.98


def test_retrain_events_serialise_like_drift_events(reference):
    import json

    _, events, _ = reference
    rows = [json.loads(event_json(e)) for e in events if e.detector == "retrain"]
    assert rows[0]["kind"] == "retrain_started" and rows[0]["statistic"] is None
    assert rows[1]["kind"] in ("promoted", "rejected") and rows[1]["statistic"] > 0 and rows[1]["reason"]
    assert {r["version"] for r in rows} <= {0, 1, 2, 3}


# -- models that keep no history (river lanes) ---------------------------------------------------------------

def river_config(model: str = "holt-winters", retrain: str = "on") -> EngineConfig:
    rp = {"min_fresh": 24, "shadow_steps": 24, "history": 24} if retrain == "on" else {}
    return EngineConfig(horizon=4, models=[model], freq="1h", model_params={model: {"period": 24, "warmup": 48}},
                        retrain=retrain, retrain_params=rp)


def test_history_ring_keeps_the_last_values_oldest_first_and_round_trips():
    from tidecast.models.history import HistoryRing

    ring = HistoryRing(capacity=4)
    ring.resize(2)
    for v in range(6):
        ring.add(np.array([0, 1]), np.array([v, 10.0 * v]))
    assert ring.recent(0, 10).tolist() == [2.0, 3.0, 4.0, 5.0]
    assert ring.recent(1, 2).tolist() == [40.0, 50.0]
    other = HistoryRing(capacity=4)
    other.import_rows(np.array([3]), ring.export_rows(np.array([1])))
    assert other.recent(3, 4).tolist() == [20.0, 30.0, 40.0, 50.0]
    other.import_rows(np.array([3]), {})  # saved without a ring: empty, refilled as values arrive
    assert other.recent(3, 4).size == 0
    ring.reset_rows(np.array([0]))
    assert ring.recent(0, 4).size == 0 and ring.recent(1, 1).tolist() == [50.0]
    assert ring.bytes_per_row == 4 * 8 + 8  # float64 values and the count


def test_river_lanes_get_a_ring_only_when_retraining():
    on, off = Engine.from_config(river_config()), Engine.from_config(river_config(retrain="off"))
    settings = on.retrainer.lanes["holt-winters"].settings
    assert on.lanes[0].model.history == settings.ring_capacity == 24 + 24 + 96  # history, min_fresh, cooldown
    assert off.lanes[0].model.history == 0 and off.lanes[0].model.history_ is None
    assert Engine.from_config(config()).lanes[0].model.get_params().get("history") is None  # CycleNet keeps its own


def test_a_river_lane_is_refit_on_its_ring_and_promoted_after_the_change():
    engine = Engine.from_config(river_config())
    events, means = feed(engine, phase_shifted())
    kinds = retrain_events(events)
    assert ("promoted", 1) in kinds and all(k != "failed" for k, _ in kinds)
    assert engine.model_versions() == {"holt-winters": 1}
    static = Engine.from_config(river_config(retrain="off"))
    feed(static, phase_shifted())
    mae = {name: e.summary()["models"]["holt-winters"]["mae"] for name, e in (("retrain", engine), ("static", static))}
    assert mae["retrain"] < mae["static"]


def test_river_refit_rebuilds_ready_rows_and_keeps_the_others():
    from tidecast.models.registry import make_model

    model = make_model("holt-winters", horizon=4, period=24, warmup=48).clone(history=100)
    model.resize(2)
    for tick in range(120):  # row 0: 120 values, level 0 then 50; row 1: 20 values only
        rows = np.array([0, 1]) if tick < 20 else np.array([0])
        level = 50.0 if tick >= 60 else 0.0
        model.learn_many(rows, np.full(rows.size, tick), level + np.sin(2 * np.pi * tick / 24) + rows)
    before = model.export_rows(np.array([1]))
    assert model.refit(recent=48) == {"rows": 2, "rebuilt": 1}
    assert model.models_[0].mean_ == pytest.approx(50.0, abs=0.5)  # standardised on the recent values alone
    after = model.export_rows(np.array([1]))
    np.testing.assert_array_equal(after["json"], before["json"])  # not ready on 20 values: kept as it was
    with pytest.raises(ValueError, match="history"):
        make_model("holt-winters", horizon=4).refit(recent=48)


def test_a_crash_restores_the_ring_so_a_river_job_promotes_once():
    values = phase_shifted()
    reference, _ = feed(Engine.from_config(river_config()), values)
    started = next(e for e in reference if e.kind == "retrain_started")
    crash = round((started.detected_at.timestamp() * 1e9 - T0) / HOUR) + 8
    engine = Engine.from_config(river_config())
    events, _ = feed(engine, values, 0, crash)
    meta, arrays = engine.export_series(engine.series_ids)
    assert any("history_values" in k for k in arrays)
    restored = Engine.from_config(river_config())
    restored.import_shared(engine.export_shared())
    restored.import_series(meta, arrays)
    later, _ = feed(restored, values, crash)
    kinds = retrain_events(events + later)
    assert [k for k in kinds if k[0] == "promoted"] == [("promoted", 1)]
    assert restored.model_versions() == {"holt-winters": 1}


def test_probation_rolls_back_a_promotion_that_turns_bad(reference):
    """Fault injection: right after the promotion the promoted model's cycle table is corrupted (as a model that
    diverges after its shadow would be); the probation must hand the lane back to the model it replaced."""
    import torch

    promoted = next(e for e in reference[1] if e.detector == "retrain" and e.kind == "promoted")
    at = round((promoted.detected_at.timestamp() * 1e9 - T0) / HOUR)
    values = phase_shifted()
    engine = Engine.from_config(config(probation_steps=48, cooldown=10_000))
    replaced = engine.lanes[0].model
    events, _ = feed(engine, values, 0, at + 2, chunk=1)  # decisions for a time come once the next one arrives
    assert retrain_events(events)[-1] == ("promoted", 1)
    with torch.no_grad():
        engine.lanes[0].model.net_.cycle_table += 5.0
    later, _ = feed(engine, values, at + 2)
    kinds = retrain_events(events + later)
    assert ("rolled_back", 2) in kinds
    rolled = next(e for e in later if e.detector == "retrain" and e.kind == "rolled_back")
    assert rolled.statistic <= 0.98 and "rolled back" in rolled.reason
    assert engine.lanes[0].model is replaced and engine.model_versions() == {"cyclenet": 2}
    m = engine.metrics.registry.get_sample_value
    assert m("tidecast_retrains_total", {"model": "cyclenet", "outcome": "rolled_back"}) == 1


def test_probation_confirms_a_promotion_that_keeps_winning(reference):
    engine = Engine.from_config(config(probation_steps=48, cooldown=10_000))
    events, _ = feed(engine, phase_shifted())
    kinds = [k for k, _ in retrain_events(events)]
    assert "promoted" in kinds and "confirmed" in kinds and "rolled_back" not in kinds
    assert engine.model_versions() == {"cyclenet": 1}


class _CandidateLostOnSeries:
    """A candidate that forecasts nothing finite for every series but the first (diverged there) and well on it."""

    def resize(self, n_rows: int) -> None:
        """Every row answers; nothing to grow."""

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        out = np.zeros((rows.size, horizon))
        out[rows > 0] = np.nan
        return out


def test_a_candidate_that_cannot_forecast_a_series_the_incumbent_can_is_never_promoted():
    """Cells where only the incumbent had a finite forecast were dropped from both sides, so a candidate that
    diverged on two series of three was promoted on the one it still forecast (ratio 0.52)."""
    from tidecast.stream.retrain import Shadow

    horizon, n = 2, 3
    rng = np.random.default_rng(0)
    shadow = Shadow([_CandidateLostOnSeries()], [1.0], horizon, n, steps=48)
    rows = np.arange(n)
    for t in range(200):
        if shadow.complete:
            break
        matured = np.full((n, horizon), t >= horizon)
        incumbent = np.ones((n, horizon))  # finite everywhere, off by one
        shadow.score(rows, np.full(n, t), rng.normal(size=n), incumbent, matured, at_ns=t)
        shadow.forecast(rows, np.full(n, t), horizon)
    assert shadow.complete
    verdict = RetrainPolicy().gate(shadow.inc_err[0], shadow.cand_err[0], np.asarray(shadow.step_diffs[0]),
                                   lag=horizon - 1)
    assert isinstance(verdict, Reject) and verdict.ratio == np.inf


@pytest.mark.parametrize(("mode", "members"), [("frozen", 1), ("frozen", 2), ("online", 1), ("cyclenet", 1)])
def test_gated_online_learning_with_cfc(mode, members):
    """cfc has no ``online`` parameter, so gated online learning's candidate was a plain copy: it shadowed the
    incumbent bit for bit and every job ended rejected at ratio 1.0. A frozen cfc's candidate now learns
    (``mode="online"``) and is promoted only through the gate, the served model staying frozen; where there is
    nothing to turn on (already online, or mode="cyclenet") the job fails with the reason."""
    cfc = dict(lookback=24, units=8, backbone_units=16, warm_start=240, epochs=3, mode=mode, members=members,
               defer=False, step_budget=60.0, seed=1) | ({"cycle": 24} if mode == "cyclenet" else {})
    engine = Engine.from_config(EngineConfig(
        horizon=4, models=["cfc"], freq="1h", model_params={"cfc": cfc}, retrain="on",
        retrain_params=dict(min_fresh=24, shadow_steps=24, history=0, mode="online", schedule=48, triggers=[],
                            cooldown=0, lambdas=[])))
    events, _ = feed(engine, phase_shifted(), 0, SHIFT + 96)
    done = [e for e in events if e.detector == "retrain" and e.kind in ("promoted", "rejected", "failed")]
    assert done
    if mode != "frozen":
        assert {e.kind for e in done} == {"failed"} and all("online" in e.reason for e in done)
        return
    assert "failed" not in {e.kind for e in done}
    assert all(e.statistic != 1.0 for e in done)  # the candidate learned: its forecasts differ
    assert all(e.statistic <= 0.98 for e in done if e.kind == "promoted")
    assert engine.lanes[0].model.get_params()["mode"] == "frozen"  # served frozen between gates


# -- found by the retrain review (2026-12-04) ------------------------------------------------------------------

def feed_rows(engine: Engine, values: np.ndarray, batch_rows: int) -> list:
    """Every observation in time order, ``batch_rows`` at a time: a batch may end in the middle of a time."""
    n_steps, n = values.shape
    ids = np.tile(np.array([f"s{i}" for i in range(n)], dtype=object), n_steps)
    times = T0 + np.repeat(np.arange(n_steps), n) * HOUR
    flat = values.reshape(-1)
    events = []
    for start in range(0, flat.size, batch_rows):
        part = slice(start, start + batch_rows)
        events += engine.process(ObservationBatch(ids[part], times[part], flat[part])).events
        engine.maintenance()
    return events


def test_retrain_decisions_do_not_depend_on_where_batches_cut_a_time():
    """A policy step is one grid time, not one engine round: batches of 7 observations of 3 series cut times in two
    rounds, and the job started 11 hours earlier, its 96-step shadow covered 76 hours and a rejected candidate
    was promoted."""
    values = phase_shifted()
    whole = feed_rows(Engine.from_config(river_config()), values, 10_000)
    cut = feed_rows(Engine.from_config(river_config()), values, 7)
    kinds = retrain_events(whole)
    assert ("retrain_started", 0) in kinds
    as_dicts = [[event_json(e) for e in events if e.detector == "retrain"] for events in (whole, cut)]
    assert as_dicts[0] == as_dicts[1]


def test_the_cooldown_runs_from_the_last_start_even_past_the_budget_window():
    policy = RetrainPolicy(min_fresh=0, cooldown=3000, budget_window=2000, schedule=10)
    assert policy.poll(10) is not None
    assert policy.poll(2010) is None  # the start at 10 left the budget window, not the cooldown
    assert policy.poll(3009) is None and policy.poll(3010) is not None


@pytest.mark.parametrize(("params", "says"), [
    (dict(cooldown=10**9), "cooldown"), (dict(min_fresh=10**9), "min_fresh"), (dict(shadow_steps=10**11), "shadow"),
    (dict(history=10**9), "history"),  # a 30 GiB ring (history + min_fresh + cooldown) at the first batch
    (dict(lambdas=5), "lambdas = 5: a list of BCWI weights"), (dict(lambdas="abc"), "lambdas = 'abc'"),
    (dict(lambdas=[0.5, 1, 1]), "each weight once"),  # a repeated 1 put one model in the shadow twice
])
def test_retrain_sizes_and_lambdas_are_checked_before_any_work(params, says):
    with pytest.raises(ValueError, match=says):
        Engine.from_config(river_config().__class__(**{**river_config().to_dict(), "retrain_params": params}))


@pytest.mark.parametrize(("detector", "params"), [
    ("cusum", {"triggers": ["CUSUM"]}), ("cusum", {"triggers": ["d3a"]}), ("none", {}),
])
def test_retraining_that_can_never_start_is_an_error(detector, params):
    with pytest.raises(ValueError, match="can never start a job"):
        Engine.from_config(EngineConfig(models=["holt-winters"], drift_detector=detector, retrain="on",
                                        retrain_params=params))
    EngineConfig(models=["holt-winters"], drift_detector=detector, retrain="on",  # a schedule can
                 retrain_params={**params, "schedule": 100})


def test_a_river_lane_is_not_fitted_before_any_series_forecasts():
    """A scheduled job started at step 10, before Holt-Winters forecast anything, and shadowed ~490 steps."""
    engine = Engine.from_config(EngineConfig(horizon=4, models=["holt-winters"], freq="1h", retrain="on",
                                             model_params={"holt-winters": {"period": 24, "warmup": 48}},
                                             retrain_params={"schedule": 10, "min_fresh": 0, "cooldown": 0,
                                                             "history": 24}))
    assert not engine.lanes[0].model.fitted_
    events = feed_rows(engine, phase_shifted()[:200], 30)
    first = next(e for e in events if e.kind == "retrain_started")
    assert engine.lanes[0].model.fitted_
    assert (first.detected_at.timestamp() * 1e9 - T0) / HOUR >= 47  # not before the warm-up: 48 values, ticks 0-47


def test_a_series_first_seen_during_the_shadow_does_not_stop_the_engine():
    """Found by the watchers review (2026-12-04): the candidate was copied with the rows live when its job started;
    a series seen for the first time while it was in its shadow window had a row beyond them, and a river lane
    (one Python object per row) raised IndexError out of Engine.process. The candidates grow with the engine."""
    rng = np.random.default_rng(2)
    steps, start = 700, 510
    t = np.arange(steps)[:, None]
    noise = rng.normal(scale=0.8, size=(steps, 4))
    values = 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(4)) + noise
    values[450:, 0] += 30  # a level shift: an alarm, then a job whose shadow runs from tick ~500
    values[:start, 3] = np.nan  # s3 is first seen at tick 510
    engine = Engine.from_config(EngineConfig(
        horizon=6, models=["hw=holt-winters"], freq="1h", retrain="on",
        retrain_params={"min_fresh": 1, "cooldown": 20, "shadow_steps": 30, "history": 500}))
    ids = np.array([f"s{i}" for i in range(4)], dtype=object)
    events = []
    for lo in range(0, steps, 4):  # small batches: s3 arrives in a later round than the job's start
        ticks = np.arange(lo, lo + 4)
        v = values[ticks].reshape(-1)
        ok = np.isfinite(v)
        batch = ObservationBatch(np.tile(ids, 4)[ok], (T0 + np.repeat(ticks, 4) * HOUR)[ok], v[ok])
        events += engine.process(batch).events
        engine.maintenance()
    kinds = [kind for kind, _ in retrain_events(events)]
    assert kinds[0] == "retrain_started" and kinds[1] in ("promoted", "rejected"), kinds
    started = next(e for e in events if e.kind == "retrain_started")
    assert started.detected_at < pd.Timestamp(T0 + start * HOUR, tz="UTC")  # the job began before s3 arrived


def test_retrain_parameters_are_converted_and_checked_before_any_work():
    """Found by the watchers review (2026-12-04): retrain parameters skipped the conversion every other group gets
    (significance="inf" failed comparing text with numbers, significance=true acted as z = 1), and refit_params
    were never checked (5, a misspelt key: every job failed; lr=-1: CycleNet ran gradient ascent)."""
    from tidecast.stream.retrain import retrain_settings

    assert retrain_settings({"significance": "inf"}).policy.significance == float("inf")
    with pytest.raises(ValueError, match="significance = True: expected float"):
        retrain_settings({"significance": True})
    with pytest.raises(ValueError, match="refit_params = 5"):
        retrain_settings({"refit_params": 5})
    with pytest.raises(SettingsError, match=r"refit_params.learning_rate: lane 'cyclenet' \(cyclenet\)'s refit has no "
                                            "parameter 'learning_rate'; valid: lr, cycle_lr"):
        config(refit_params={"learning_rate": 0.001})
    with pytest.raises(SettingsError, match="refit_params.lr = 'fast'"):
        config(refit_params={"lr": "fast"})
    config(refit_params={"lr": 0.001, "cycle_lr": 0.01})  # bench/retrain.py's
    with pytest.raises(ValueError, match="lr = -1: a finite learning rate > 0"):
        CycleNetForecaster(horizon=4, lookback=24, cycle=24).refit(recent=10, lr=-1)


def test_written_events_read_back_with_from_dict():
    """Found by the watchers review (2026-12-04): a retrain_started line (statistic null: no ratio yet) raised in
    DriftEvent.from_dict, and RetrainEvent.from_dict dropped version and reason."""
    import json

    from tidecast.monitors.drift import DriftEvent

    at = pd.Timestamp(T0, tz="UTC").to_pydatetime()
    started = RetrainEvent("", "cyclenet", "retrain", "retrain_started", at, float("nan"), 3, "alarm:cusum")
    back = RetrainEvent.from_dict(json.loads(event_json(started)))
    assert (back.kind, back.version, back.reason, back.detected_at) == ("retrain_started", 3, "alarm:cusum", at)
    assert np.isnan(back.statistic) and np.isnan(DriftEvent.from_dict(json.loads(event_json(started))).statistic)
    promoted = RetrainEvent("", "cyclenet", "retrain", "promoted", at, 0.8, 4, "error ratio 0.800")
    assert RetrainEvent.from_dict(json.loads(event_json(promoted))) == promoted


def test_an_ensembles_refit_params_are_checked_against_its_members_hook():
    """A cfc ensemble's refit takes **kwargs and hands them on: a misspelt key was accepted and every job failed."""
    def cfc(members: int) -> EngineConfig:
        params = dict(lookback=8, units=8, warm_start=60, members=members)
        return EngineConfig(horizon=2, models=["cfc"], freq="1h", model_params={"cfc": params}, retrain="on",
                            retrain_params={"refit_params": {"learning_rate": 0.001}})
    for members in (1, 2):
        with pytest.raises(SettingsError, match="has no parameter 'learning_rate'"):
            Engine.from_config(cfc(members))


@pytest.mark.parametrize("params", [dict(mode="online", online=False), dict(shadow_steps=3)])
def test_no_bcwi_choice_where_it_cannot_choose(params):
    """In online mode every blend of the (unchanged) copy is the same model, and with under 4 shadow steps the gate
    would get one step, never significant: the shadow holds one candidate and the gate every step."""
    from tidecast.stream.retrain import bcwi_lambdas, retrain_settings

    online = params.pop("online", None)
    model = CycleNetForecaster(horizon=4, lookback=24, cycle=24, **({} if online is None else {"online": online}))
    settings = retrain_settings(dict(min_fresh=24, shadow_steps=24) | params)
    assert bcwi_lambdas(settings, model) == [1.0]
    assert bcwi_lambdas(retrain_settings(dict(min_fresh=24, shadow_steps=24)), model) == [0.25, 0.5, 0.75, 1.0]
    if "shadow_steps" in params:  # one weight involves no choice: kept as asked; several: the largest
        assert bcwi_lambdas(retrain_settings(dict(min_fresh=24, lambdas=[0.5]) | params), model) == [0.5]
        assert bcwi_lambdas(retrain_settings(dict(min_fresh=24, lambdas=[0.25, 0.5]) | params), model) == [0.5]


def test_series_moving_during_a_probation_end_it_with_an_event(reference):
    """drop_series (a rebalance) discarded the probation without a word: no confirmed or rolled_back event."""
    promoted = next(e for e in reference[1] if e.detector == "retrain" and e.kind == "promoted")
    at = round((promoted.detected_at.timestamp() * 1e9 - T0) / HOUR)
    values = phase_shifted()
    engine = Engine.from_config(config(probation_steps=48, cooldown=10_000))
    events, _ = feed(engine, values, 0, at + 2, chunk=1)
    assert retrain_events(events)[-1] == ("promoted", 1)
    engine.drop_series(["s2"])
    later, _ = feed(engine, values[:, :2], at + 2, at + 6, chunk=1)
    ended = [e for e in later if e.detector == "retrain"]
    assert [e.kind for e in ended] == ["confirmed"] and "probation ended early (series dropped)" in ended[0].reason
    assert engine.model_versions() == {"cyclenet": 1}


def test_a_probation_cut_short_then_an_adopted_model_emits_no_confirmation():
    """A rebalance drops series mid-probation (cut short), then the member adopts another member's newer model:
    the 'confirmed ... the promoted model stays' event named a model no longer served."""
    from tidecast.stream.retrain import Retrainer, retrain_settings

    retrainer = Retrainer({"cyclenet": retrain_settings(dict(min_fresh=24, probation_steps=24))})
    st = retrainer.lanes["cyclenet"]
    st.probation = True
    retrainer.abort("series dropped")
    assert st.cut_short == "series dropped"
    retrainer.adopt("cyclenet", 5)
    assert st.cut_short is None
    st.probation = True
    retrainer.abort("series dropped")
    retrainer.import_state("cyclenet", retrainer.export_state("cyclenet"))
    assert st.cut_short is None


def test_the_history_ring_keeps_a_large_levels_small_moves():
    """Found by the models review (2026-12-04): float32 rounded values near 1e9 to steps of 64, so a river lane's
    refit rebuilt a series' forecaster on a flat line. The ring keeps float64 now (a float32 difference from the
    first value broke on a first value that was a spike); a state saved in float32 still reads back."""
    from tidecast.models.history import HistoryRing

    for values in (1e9 + np.sin(np.arange(50)), np.r_[1e30, 0.1 * np.arange(49)], np.r_[-3e38, 3e38, np.ones(48)]):
        ring = HistoryRing(capacity=40)
        ring.resize(1)
        for v in values:
            ring.add(np.array([0]), np.array([v]))
        np.testing.assert_array_equal(ring.recent(0, 40), values[-40:])
    state = ring.export_rows(np.array([0]))
    moved = HistoryRing(capacity=40)
    moved.import_rows(np.array([0]), {**state, "history_values": state["history_values"].astype(np.float32)})
    np.testing.assert_array_equal(moved.recent(0, 40), ring.recent(0, 40))


@pytest.mark.parametrize("minutes", [(0, 0, 0, 0), (0, 15, 30, 45)], ids=["aligned", "own-phases"])
def test_the_promoted_model_does_not_depend_on_where_batches_cut_a_time(minutes):
    """Batches of 3 observations of 4 series held one event per series at two times, which made one round at the
    later time: the job's refit began before the earlier time's values were learned, so the same promotions
    carried another model (2,484 of 12,024 forecasts differed from a run in batches of 8). Series sampled at 15,
    30 and 45 past the hour counted a step per distinct time a batch cut held: promotions came at other times."""
    import tidecast

    rng = np.random.default_rng(0)
    steps, n = 600, 4
    noise = np.zeros((steps, n))
    for k in range(1, steps):
        noise[k] = 0.6 * noise[k - 1] + rng.normal(scale=0.8, size=n)
    values = 10 + 3 * np.sin(2 * np.pi * np.arange(steps)[:, None] / 24 + np.arange(n)) + noise
    values[380:, 1] += 8.0
    values[420:, 3] -= 6.0
    hours = pd.date_range("2017-01-01", periods=steps, freq="h")
    frame = pd.concat([pd.DataFrame({"unique_id": f"s{i}", "ds": hours + pd.Timedelta(minutes=m), "y": values[:, i]})
                       for i, m in enumerate(minutes)]).sort_values("ds", kind="stable")
    runs = [tidecast.replay(frame, models=["holt-winters"], horizon=6, freq="1h", retrain="on", batch_size=size,
                            model_params={"holt-winters": {"period": 24, "warmup": 100}},
                            retrain_params={"min_fresh": 24, "cooldown": 48, "shadow_steps": 24, "history": 120,
                                            "significance": 0.0, "margin": -100.0, "flip_budget": 1.0})
            for size in (8, 3, 5)]
    assert (runs[0].events["kind"] == "promoted").sum() >= 1
    for other in runs[1:]:
        pd.testing.assert_frame_equal(runs[0].events, other.events)
        pd.testing.assert_frame_equal(runs[0].forecasts, other.forecasts)


def _scheduled_engine() -> Engine:
    return Engine.from_config(EngineConfig(horizon=6, models=["holt-winters"], freq="1h", retrain="on",
                                           retrain_params={"schedule": 150, "shadow_steps": 24}))


def _hourly(engine: Engine, k0: int, k1: int, extra: tuple[str, int] | None = None, at: int = -1) -> list:
    """Feed 4 seasonal series hour by hour from step k0 to k1, one batch per hour; ``extra`` (series, epoch ns) is
    one more row in the batch of step ``at``. The retrain events, as (kind, detected_at)."""
    hour, t0 = 3_600 * 10**9, pd.Timestamp("2024-01-01", tz="UTC").value
    ids = np.array([f"s{i}" for i in range(4)], object)
    events = []
    for k in range(k0, k1):
        values = 10 + 3 * np.sin(2 * np.pi * k / 24 + np.arange(4)) + np.random.default_rng(k).normal(0, 0.5, 4)
        sid, ts = ids, np.full(4, t0 + k * hour)
        if extra is not None and k == at:
            sid, ts, values = np.append(ids, extra[0]), np.append(ts, extra[1]), np.append(values, 11.0)
        result = engine.process(ObservationBatch(sid, ts, values))
        events += [(e.kind, e.detected_at) for e in result.events if isinstance(e, RetrainEvent)]
    return events


def test_rows_with_a_mistyped_year_do_not_stop_the_lanes_retrain_clock():
    """One row of one series stamped 2124 instead of 2024 moved the lane's step clock a century ahead: no job or
    gate again (the checkpoint kept the clock there, so a restart did not help either). A held far-ahead time is
    dropped once the clock moves on: a second typo later must not confirm the first."""
    clean, typo = _scheduled_engine(), _scheduled_engine()
    future = pd.Timestamp("2124-01-01", tz="UTC").value
    expected = _hourly(clean, 0, 700)
    got = _hourly(typo, 0, 300, extra=("s3", future), at=299) + _hourly(typo, 300, 700, extra=("s2", future), at=500)
    after_typo = pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(hours=300)
    assert sum(kind == "retrain_started" and at > after_typo for kind, at in expected) >= 2
    assert got == expected
    assert typo.retrainer.lanes["holt-winters"].step == clean.retrainer.lanes["holt-winters"].step
    assert typo.lanes[0].clock.last_ns == clean.lanes[0].clock.last_ns


def test_a_lane_resuming_after_a_long_silence_counts_every_time():
    """A jump further ahead than max_gap waits for a later time before the clock moves; it then counts the time
    before the silence and the first time after it, so no step is lost."""
    engine = _scheduled_engine()
    _hourly(engine, 0, 200)
    _hourly(engine, 400, 450)  # 200 silent hours, far beyond max_gap (6)
    assert engine.retrainer.lanes["holt-winters"].step == 200 + 50 - 1  # every completed grid time
    assert engine.lanes[0].clock.ahead_ns is None


@pytest.mark.parametrize("max_gap", [0, 3])
def test_gaps_the_engine_fills_move_the_clock_at_once(max_gap):
    """A gap of max_gap missing ticks is a jump of max_gap + 1 steps: it was held as "far ahead" (with max_gap=0,
    every next hour), so steps ended a round late and events were stamped an hour early."""
    plain = Engine.from_config(EngineConfig(horizon=6, models=["holt-winters"], freq="1h", retrain="on",
                                            retrain_params={"schedule": 150, "shadow_steps": 24}))
    gapped = Engine.from_config(EngineConfig(horizon=6, models=["holt-winters"], freq="1h", retrain="on",
                                             max_gap=max_gap, retrain_params={"schedule": 150, "shadow_steps": 24}))
    expected = _hourly(plain, 0, 400)
    got = _hourly(gapped, 0, 200) + _hourly(gapped, 200 + max_gap, 400)  # every series misses max_gap hours
    assert gapped.retrainer.lanes["holt-winters"].step == 400 - max_gap - 1
    assert gapped.lanes[0].clock.ahead_ns is None
    if max_gap == 0:
        assert got == expected


def test_a_checkpoint_saved_before_the_lane_clock_restores_it_from_the_retrain_entry():
    engine = _scheduled_engine()
    _hourly(engine, 0, 50)
    shared = engine.export_shared()
    arrays, meta = shared["holt-winters"]
    clock = meta.pop("lane_clock")
    meta["retrain"]["last_ns"] = clock["last_ns"]  # how the older code saved it
    restored = _scheduled_engine()
    restored.import_shared({"holt-winters": (arrays, meta)})
    assert restored.lanes[0].clock.last_ns == engine.lanes[0].clock.last_ns
    assert restored.lanes[0].clock.ahead_ns is None


class _Constant:
    """A candidate that forecasts one constant for every series and step (a shadow only asks for these verbs)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def resize(self, n_rows: int) -> None:
        pass

    def learn_many(self, rows, ticks, values, filled=None) -> None:
        pass

    def forecast_many(self, rows, horizon):
        return np.full((rows.size, horizon), self.value)


def _bcwi_shadow(rounds: list[list[int]]):
    """A BCWI shadow (lambdas 0.5 and 1) scored hour by hour on 3 series, each hour's rows in the given parts."""
    from tidecast.stream.retrain import Shadow

    shadow = Shadow([_Constant(1.0), _Constant(2.0)], [0.5, 1.0], horizon=1, n_rows=3, steps=8)
    hour = 3_600 * 10**9
    for tick in range(12):
        y = np.array([1.0, 2.0, 4.0]) + 0.1 * tick
        for part in rounds[tick % len(rounds)]:
            rows = np.array(part)
            ticks = np.full(rows.size, tick)
            if tick:
                shadow.score(rows, ticks, y[rows], np.zeros((rows.size, 1)), np.ones((rows.size, 1), bool),
                             tick * hour)
            shadow.forecast(rows, ticks, 1)
    return shadow


def test_a_bcwi_shadow_decides_the_same_wherever_batches_cut_its_times():
    """The choice of lambda came at the round that reached the half-way step: a batch that cut that hour scored the
    rest of it in the second half, on an empty list (IndexError: a CycleNet lane with --retrain on crashed at
    --batch-size 1)."""
    whole = _bcwi_shadow([[[0, 1, 2]]])
    for cuts in ([[[0], [1], [2]]], [[[0, 1], [2]], [[0], [1, 2]]]):
        cut = _bcwi_shadow(cuts)
        assert cut.lambdas == whole.lambdas
        assert cut.done_steps == whole.done_steps and cut.complete == whole.complete
        np.testing.assert_allclose(cut.cand_err, whole.cand_err)
        np.testing.assert_allclose(cut.inc_err, whole.inc_err)
        np.testing.assert_allclose(cut.step_diffs, whole.step_diffs)


def test_a_cyclenet_lane_retrains_at_batch_size_one():
    """Two series replayed one record a batch: every hour is cut in two, and the BCWI choice fell inside one."""
    import tidecast

    rng = np.random.default_rng(0)
    k = np.arange(700)
    frames = []
    for i in range(2):
        y = 10 + 3 * np.sin(2 * np.pi * k / 24) + rng.normal(0, 0.3, k.size)
        y[k >= 450] += 6.0 if i == 0 else 0.0
        frames.append(pd.DataFrame({"unique_id": f"s{i}", "ds": pd.date_range("2024-01-01", periods=k.size, freq="h"),
                                    "y": y}))
    frame = pd.concat(frames).sort_values(["ds", "unique_id"], kind="stable")
    result = tidecast.replay(frame, models=["cyclenet"], horizon=3, freq="1h", batch_size=1, retrain="on",
                             model_params={"cyclenet": {"warm_start": 300, "lookback": 24, "epochs": 2, "cycle": 24}},
                             retrain_params={"min_fresh": 24, "cooldown": 48, "shadow_steps": 24, "history": 120,
                                             "significance": 0.0, "margin": -100.0, "flip_budget": 1.0})
    assert (result.events["kind"] == "promoted").sum() >= 1


def test_the_gate_weighs_each_series_by_its_own_error_scale():
    """Squared errors summed raw over the lane let its largest series decide alone: beside one unforecastable
    series of scale 1e6, every candidate was rejected at ratio 0.99-1.01, where without it all were promoted."""
    import tidecast

    rng = np.random.default_rng(0)
    hours = np.arange(1100)
    ds = pd.Timestamp("2024-01-01") + pd.to_timedelta(hours, "h")
    frames = [pd.DataFrame({"unique_id": f"n{i}", "ds": ds,
                            "y": 10 + 3 * np.sin(2 * np.pi * hours / 24 + i) + 0.05 * rng.normal(0, 0.5, hours.size)
                            .cumsum() + rng.normal(0, 0.3, hours.size)}) for i in range(4)]
    frames.append(pd.DataFrame({"unique_id": "big", "ds": ds, "y": 1e6 * (10 + rng.normal(0, 1.0, hours.size))}))
    result = tidecast.replay(pd.concat(frames), models=["cyclenet"], horizon=6, drift_detector="none", retrain="on",
                             model_params={"cyclenet": {"lookback": 24, "warm_start": 300, "epochs": 2, "cycle": 24,
                                                        "online": False}},
                             retrain_params={"schedule": 150, "cooldown": 10, "budget": 100, "shadow_steps": 48,
                                             "lambdas": [1.0]})
    gated = result.events[result.events["kind"].isin(["promoted", "rejected"])]
    assert len(gated) >= 3
    assert (gated["kind"] == "promoted").sum() >= len(gated) - 1


def test_series_weights_are_one_over_each_series_mse_and_typical_where_unscored():
    from tidecast.monitors.scoring import PrequentialScorer
    from tidecast.stream.retrain import series_weights

    scorer = PrequentialScorer(horizon=2, alpha=0.1)
    scorer.resize(3)
    rows = np.array([0, 1])
    for _ in range(10):
        mean = np.zeros((2, 2))
        y = np.array([1.0, 1000.0])  # errors 1 and 1000 at both horizons
        wide = np.full((2, 2, 1), 1e9)
        scorer.update(rows, y, mean, -wide, wide, np.ones((2, 2), bool))
    weights = series_weights(scorer, 4)
    np.testing.assert_allclose(weights[:2], [1.0, 1e-6])
    assert weights[2] == weights[3] == np.median([1.0, 1e-6])


def test_a_plug_ins_own_clock_key_round_trips_beside_the_lanes_clock():
    """The lane's clock is saved as "lane_clock": a model's own "clock" key (allowed before) must reach it again,
    and an older checkpoint's must not be read as the lane's."""
    from tidecast.models.naive import SeasonalNaive

    class Clocked(SeasonalNaive):
        ticks_seen = 0

        def export_shared(self):
            arrays, meta = super().export_shared()
            return arrays, {**meta, "clock": self.ticks_seen}

        def import_shared(self, arrays, meta):
            self.ticks_seen = meta["clock"]

    def engine() -> Engine:
        built = Engine.from_config(EngineConfig(horizon=3, models=["seasonal-naive"], freq="1h"))
        built.lanes[0].model.__class__ = Clocked
        return built

    first = engine()
    first.lanes[0].model.ticks_seen = 12
    first.process(ObservationBatch(np.array(["a"], object), np.array([0]), np.array([1.0])))
    restored = engine()
    restored.import_shared(first.export_shared())
    assert restored.lanes[0].model.ticks_seen == 12
    assert restored.lanes[0].clock.last_ns == 0
    older = engine()
    older.import_shared({"seasonal-naive": ({}, {"clock": 7})})
    assert older.lanes[0].model.ticks_seen == 7 and older.lanes[0].clock.last_ns is None
