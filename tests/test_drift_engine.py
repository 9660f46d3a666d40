"""The drift monitor inside the engine: events, metrics, settings and state that survives a restore."""

from __future__ import annotations

import numpy as np
import pytest

from tidecast.models.naive import SeasonalNaive
from tidecast.monitors.conformal import make_calibrator
from tidecast.monitors.drift import NO_ALARM, Alarms, DriftEvent, DriftMonitor, LaneMonitor, ResidualCUSUM
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine, Lane
from tidecast.stream.settings import SettingsError

HOUR = 3_600 * 10**9
T0 = 1_483_228_800 * 10**9  # 2017-01-01


def seasonal(rng: np.random.Generator, steps: int, n: int) -> np.ndarray:
    """(steps, n) daily cycles with AR(1) noise, like the bench's synthetic series."""
    t = np.arange(steps)[:, None]
    noise = np.zeros((steps, n))
    for k in range(1, steps):
        noise[k] = 0.6 * noise[k - 1] + rng.normal(scale=0.8, size=n)
    return 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(n)) + noise


def config(**overrides) -> EngineConfig:
    base = dict(horizon=6, models=["seasonal-naive"], freq="1h", model_params={"seasonal-naive": {"period": 24}})
    return EngineConfig(**(base | overrides))


def run(engine: Engine, values: np.ndarray, start: int = 0, chunk: int = 48) -> list[DriftEvent]:
    """Feed (steps, n) values from tick ``start`` in batches of ``chunk`` steps; return every event."""
    ids = np.array([f"s{i}" for i in range(values.shape[1])], dtype=object)
    events = []
    for lo in range(0, values.shape[0], chunk):
        block = values[lo : lo + chunk]
        ticks = start + lo + np.arange(block.shape[0])
        batch = ObservationBatch(np.tile(ids, len(ticks)), T0 + np.repeat(ticks, len(ids)) * HOUR, block.reshape(-1))
        events += engine.process(batch).events
    return events


def shifted(seed: int = 0, steps: int = 900, at: int = 600) -> np.ndarray:
    values = seasonal(np.random.default_rng(seed), steps, 3)
    values[at:, 1] += 6.0  # series s1's level jumps by several residual standard deviations
    return values


def tick_of(event: DriftEvent) -> int:
    return round((event.detected_at.timestamp() * 1e9 - T0) / HOUR)


def sample(metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_level_shift_becomes_an_event_a_counter_and_a_drifting_series() -> None:
    engine = Engine.from_config(config())
    assert sample(engine.metrics, "tidecast_drift_alarms_total", model="seasonal-naive", detector="cusum") == 0
    events = run(engine, shifted())  # 900 steps, s1 shifts at tick 600
    after = [e for e in events if e.series_id == "s1" and tick_of(e) >= 600]
    assert after and 600 <= tick_of(after[0]) < 624  # within a cycle
    assert after[0].model == "seasonal-naive" and after[0].detector == "cusum"
    assert sample(engine.metrics, "tidecast_drift_alarms_total", model="seasonal-naive",
                  detector="cusum") == len(events)
    # a series counts as drifting for drift_window (168) steps after its latest alarm
    recent = {e.series_id for e in events if tick_of(e) > 899 - 168}
    assert sample(engine.metrics, "tidecast_series_drifting", model="seasonal-naive") == len(recent)


def test_drifting_gauge_counts_series_with_an_alarm_in_the_last_drift_window_steps() -> None:
    engine = Engine.from_config(config(drift_window=24))
    values = shifted(steps=800)
    run(engine, values[:560])
    events: list[DriftEvent] = []
    seen = set()
    for tick in range(560, 800):  # one step at a time: the gauge against the definition, every step
        events += run(engine, values[tick : tick + 1], start=tick)
        recent = {e.series_id for e in events if tick - tick_of(e) < 24}
        seen.add(len(recent))
        assert sample(engine.metrics, "tidecast_series_drifting", model="seasonal-naive") == len(recent), tick
    assert {0, 1} <= seen  # it rose with the shift and cleared again


def test_drifting_gauge_drops_the_series_a_member_hands_over() -> None:
    """A revoked partition's series are dropped; a member that then processes nothing more kept counting them as
    drifting (beside the new owner, which counts them too), while its tidecast_series fell to 0."""
    engine = Engine.from_config(config())
    run(engine, shifted(steps=700))  # s1 shifts at tick 600
    assert sample(engine.metrics, "tidecast_series_drifting", model="seasonal-naive") == 1
    engine.drop_series(["s0", "s2"])  # the drifting series stays
    assert sample(engine.metrics, "tidecast_series_drifting", model="seasonal-naive") == 1
    engine.drop_series(["s1"])
    assert sample(engine.metrics, "tidecast_series") == 0
    assert sample(engine.metrics, "tidecast_series_drifting", model="seasonal-naive") == 0


def test_a_member_left_without_series_shows_no_coverage_or_width_until_it_scores_again() -> None:
    """A member whose partitions all moved away kept exporting its last rolling coverage and width for ever, so
    TidecastCoverageBelowTarget could keep firing for an instance that forecast nothing."""
    engine = Engine.from_config(config())
    labels = {"model": "seasonal-naive", "horizon": "1", "level": "90"}

    def shown(name: str) -> float | None:
        return engine.metrics.registry.get_sample_value(name, labels)

    run(engine, shifted(steps=300))
    engine.drop_series(["s0", "s2"])  # a series is still held: the gauges stay
    assert shown("tidecast_interval_coverage_ratio") is not None and shown("tidecast_interval_width") is not None
    engine.drop_series(["s1"])
    assert shown("tidecast_interval_coverage_ratio") is None and shown("tidecast_interval_width") is None
    run(engine, shifted(steps=300), chunk=300)  # new series: the gauges come back from their scored steps
    coverage = shown("tidecast_interval_coverage_ratio")
    assert coverage is not None and 0.5 < coverage <= 1.0


@pytest.mark.parametrize("cut", [620, 640])  # inside the shift: a CUSUM on its way up, or just after an alarm
def test_a_restore_neither_resets_nor_doubles_an_alarm(cut: int) -> None:
    values = shifted()
    whole = run(Engine.from_config(config()), values)
    first = Engine.from_config(config())
    before = run(first, values[:cut])
    meta, arrays = first.export_series(first.series_ids)
    assert any(k.startswith("seasonal-naive/drift/det/") for k in arrays)
    second = Engine.from_config(config())
    second.import_series(meta, arrays)
    after = run(second, values[cut:], start=cut)
    assert before + after == whole and any(e.series_id == "s1" for e in whole)


def test_state_saved_without_a_drift_monitor_starts_watching_afresh() -> None:
    values = shifted()
    old = Engine.from_config(config(drift_detector="none"))
    assert old.lanes[0].monitors == []
    run(old, values[:300])
    meta, arrays = old.export_series(old.series_ids)
    assert not any("/drift/" in k for k in arrays)
    new = Engine.from_config(config())
    new.import_series(meta, arrays)
    monitor = new.lanes[0].monitors[0]
    assert np.all(monitor.detector_.export_rows(np.arange(3))["n"] == 0)
    assert np.all(monitor.last_alarm_tick_[:3] == NO_ALARM)
    events = run(new, values[300:], start=300)
    assert any(e.series_id == "s1" for e in events)  # it learned a reference from 300 on and saw the shift


def test_detector_settings_reach_the_monitor_and_bad_ones_fail_early() -> None:
    engine = Engine.from_config(config(drift_detector="d3a", drift_params={"window": 8}, alpha=0.2))
    (monitor,) = engine.lanes[0].monitors
    assert monitor.detector == "d3a" and monitor.detector_.get_params()["window"] == 8
    cusum = Engine.from_config(config(alpha=0.2)).lanes[0].monitors[0].detector_
    assert cusum.get_params()["alpha"] == 0.2  # misses are counted against the lane's own target
    with pytest.raises(SettingsError, match="no parameter 'window'"):
        config(drift_params={"window": 8})
    with pytest.raises(SettingsError, match="none"):
        config(drift_detector="none", drift_params={"h": 3})


class EveryTenth(LaneMonitor):
    """A label-free watcher for the hook test: it alarms on every 10th forecast it sees issued."""

    key = "tenth"
    detector = "tenth"

    def __init__(self) -> None:
        super().__init__()
        self.seen_ = np.zeros(0)

    def resize(self, n_rows: int) -> None:
        super().resize(n_rows)
        self.seen_ = np.resize(self.seen_, max(n_rows, self.seen_.size))

    def issued(self, rows, ticks, forecast, lower, upper) -> Alarms:
        self.seen_[rows] += 1
        fired = rows[self.seen_[rows] % 10 == 0]
        alarms = Alarms(fired.astype(np.int64), np.full(fired.size, "uncertainty"), self.seen_[fired])
        self.note(alarms, rows, ticks)
        return alarms

    def export_rows(self, rows):
        return {**super().export_rows(rows), "seen": self.seen_[rows].copy()}

    def import_rows(self, rows, state):
        super().import_rows(rows, state)
        self.seen_[rows] = state["seen"]


def test_a_label_free_monitor_plugs_into_the_same_hook() -> None:
    lane = Lane(SeasonalNaive(period=24), make_calibrator("conformal-pid", 6, 0.1), 6, 0.1, monitors=[EveryTenth()])
    engine = Engine(config(drift_detector="none"), [lane])
    events = run(engine, seasonal(np.random.default_rng(1), 50, 2))
    # every real tick issues (NaN before seasonal naive has a cycle): 50 per series, alarms at 10, 20, ..., 50
    assert [(e.series_id, e.kind, e.statistic) for e in events if e.series_id == "s0"] == [
        ("s0", "uncertainty", float(k)) for k in (10, 20, 30, 40, 50)]
    assert {e.detector for e in events} == {"tenth"}
    assert sample(engine.metrics, "tidecast_drift_alarms_total", model="seasonal-naive", detector="tenth") == 10
    _, arrays = engine.export_series(["s0"])
    assert arrays["seasonal-naive/tenth/seen"].tolist() == [50.0]


def test_monitor_rejects_a_lane_with_clashing_state_keys() -> None:
    with pytest.raises(ValueError, match="distinct state keys"):
        Lane(SeasonalNaive(period=24), make_calibrator("conformal-pid", 6, 0.1), 6, 0.1,
             monitors=[DriftMonitor(ResidualCUSUM(), 6), DriftMonitor(ResidualCUSUM(), 6)])


# -- replay --events -------------------------------------------------------------------------------------------
def test_replay_writes_every_event_as_a_json_line_and_counts_them_per_model_and_detector(tmp_path) -> None:
    import json

    import pandas as pd

    from tidecast.stream.cli import main

    values = shifted()
    stamps = pd.date_range("2017-01-01", periods=len(values), freq="1h")
    frame = pd.DataFrame({"date": stamps.strftime("%Y-%m-%d %H:%M:%S"),
                          **{f"s{i}": values[:, i] for i in range(values.shape[1])}})
    frame.to_csv(tmp_path / "shift.csv", index=False)
    events_file, summary_file = tmp_path / "out" / "events.jsonl", tmp_path / "summary.json"
    assert main(["replay", str(tmp_path / "shift.csv"), "--model", "sn=seasonal-naive,holt-winters",
                 "--model-param", "sn.period=24", "--horizon", "6", "--freq", "1h", "--events", str(events_file),
                 "--summary-json", str(summary_file), "--no-progress",
                 "--dead-letter", str(tmp_path / "dead.jsonl")]) == 0
    lines = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert lines and all(line["schema_version"] == 1 for line in lines)
    events = [DriftEvent.from_dict(line) for line in lines]
    summary = json.loads(summary_file.read_text())
    counts: dict[str, dict[str, int]] = {}
    for e in events:
        counts.setdefault(e.model, {}).setdefault(e.detector, 0)
        counts[e.model][e.detector] += 1
    assert summary["drift_events"] == counts and summary["events_file"] == str(events_file)
    assert any(e.series_id == "shift/s1" and e.model == "sn" and tick_of(e) >= 600 for e in events)
    # the same engine over the same rows raises the same events, in the same order
    engine = Engine.from_config(EngineConfig(horizon=6, freq="1h", models=["sn=seasonal-naive", "holt-winters"],
                                             model_params={"sn": {"period": 24}}))
    ids = np.array([f"shift/s{i}" for i in range(values.shape[1])], dtype=object)
    direct = []
    for lo in range(0, len(values), 2000 // values.shape[1]):
        block = values[lo : lo + 2000 // values.shape[1]]
        ticks = lo + np.arange(len(block))
        direct += engine.process(ObservationBatch(np.tile(ids, len(ticks)), T0 + np.repeat(ticks, len(ids)) * HOUR,
                                                  block.reshape(-1))).events
    assert sorted(direct, key=str) == sorted(events, key=str)
    # without --events no file is written, and the summary still counts them
    assert main(["replay", str(tmp_path / "shift.csv"), "--model", "sn=seasonal-naive,holt-winters",
                 "--model-param", "sn.period=24", "--horizon", "6", "--freq", "1h",
                 "--summary-json", str(summary_file), "--no-progress",
                 "--dead-letter", str(tmp_path / "dead.jsonl")]) == 0
    again = json.loads(summary_file.read_text())
    assert again["drift_events"] == counts and again["events_file"] is None


def test_a_monitor_used_without_resize_keeps_its_first_alarm() -> None:
    """The detector and pool grow with the rows they see; the alarm-tick array did not, so the first alarm raised
    IndexError after the detector had already reset the row: the alarm was lost."""
    monitor = DriftMonitor(ResidualCUSUM(), horizon=1)
    rng = np.random.default_rng(0)
    fired = []
    for t in range(400):
        y = np.array([rng.normal() + 4.0 * (t >= 300)])
        alarms = monitor.matured(np.array([0]), np.array([t]), y, np.zeros((1, 1)), np.full((1, 1), -2.0),
                                 np.full((1, 1), 2.0), np.ones((1, 1), bool))
        fired += [t] * len(alarms)
    assert fired and 300 <= fired[0] < 310
    assert int(monitor.export_rows(np.array([0]))["last_alarm_tick"][0]) == fired[-1]
    assert DriftMonitor(ResidualCUSUM(), horizon=1).export_rows(np.array([3]))["last_alarm_tick"][0] == NO_ALARM


def test_retrain_events_are_not_counted_as_drift_alarms() -> None:
    """Retrain job events travel in the same event list; they count in tidecast_retrains_total only."""
    values = seasonal(np.random.default_rng(0), 720, 3)
    values[420:] = 20 - values[420:]  # every series' cycle flips: alarms, then a job
    engine = Engine.from_config(config(horizon=4, retrain="on", retrain_params={"min_fresh": 24, "cooldown": 1000}))
    events = []
    for lo in range(0, 720, 24):
        events += run(engine, values[lo : lo + 24], start=lo, chunk=24)
        engine.maintenance()
    retrain = [e for e in events if e.detector == "retrain"]
    drift = [e for e in events if e.detector != "retrain"]
    assert retrain and drift
    assert sample(engine.metrics, "tidecast_drift_alarms_total", model="seasonal-naive", detector="retrain") == 0
    assert sample(engine.metrics, "tidecast_drift_alarms_total", model="seasonal-naive",
                  detector="cusum") == len(drift)
    assert sample(engine.metrics, "tidecast_retrains_total", model="seasonal-naive", outcome="started") == 1
