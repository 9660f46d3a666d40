"""Metrics and model versions stay true as partitions move between members (revoke, reassign, restore): found by
a review of the serve metrics, 2026-12-05. No broker: the worker, its partition table and the in-memory changelog
of tests/test_serve_worker.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
from test_serve_worker import TOPIC, FakeProducer, assign, feed, make_worker, sample

from tidecast.monitors.metrics import Metrics
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.messages import ReleasePartitions
from tidecast.stream.records import REASONS, Observation, encode, parse_timestamp

STEPS, SHIFT = 720, 420


def records_of(partition: int, values: dict[str, np.ndarray], steps: range) -> list[SimpleNamespace]:
    """Hourly input records of the series in ``values`` (a and b live on partition 0, d on partition 1)."""
    t0, out = pd.Timestamp("2024-01-01T00:00:00Z"), []
    for k in steps:
        for sid, series in values.items():
            obs = Observation(sid, parse_timestamp((t0 + pd.Timedelta(hours=k)).isoformat()), float(series[k]))
            out.append(SimpleNamespace(topic=TOPIC, partition=partition, offset=len(out), key=sid.encode(),
                                       value=encode(obs), timestamp=0, headers=[]))
    return out


def phase_shifted(n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(STEPS)[:, None]
    before = 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(n))
    after = 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(n) + np.pi) + 2 * np.sin(4 * np.pi * t / 24)
    return np.where(t >= SHIFT, after, before) + rng.normal(0, 0.4, (STEPS, n))


def release(worker, partitions: set[int]) -> None:
    worker.handle(ReleasePartitions(frozenset(partitions), keep=False))


def worker_with(tmp_path, config: EngineConfig):
    return make_worker(tmp_path, FakeProducer(), engine=Engine.from_config(config, Metrics(reasons=REASONS)))


def test_a_quiet_partition_restored_alone_does_not_take_the_older_model_back(tmp_path):
    """Partition 1 went quiet after its checkpoint while partition 0 went on and promoted a candidate (version 1).
    Partition 1 counted as unchanged, so no checkpoint rewrote its shared state; reassigned alone, it brought
    version 0 back: the served model regressed and tidecast_model_version went 1 -> 0."""
    config = EngineConfig(horizon=4, models=["holt-winters"], freq="1h",
                          model_params={"holt-winters": {"period": 24, "warmup": 48}}, retrain="on",
                          retrain_params={"min_fresh": 24, "shadow_steps": 24, "history": 24})
    worker, results = worker_with(tmp_path, config)
    assign(worker, results, {0, 1})
    v = phase_shifted()
    p0, p1 = records_of(0, {"a": v[:, 0], "b": v[:, 1]}, range(STEPS)), records_of(1, {"d": v[:, 2]}, range(100))
    for lo in range(0, 100, 24):
        feed(worker, 0, p0[2 * lo: 2 * min(lo + 24, 100)])
        feed(worker, 1, p1[lo: min(lo + 24, 100)])
        worker.engine.maintenance()
    worker.table.checkpoint([0, 1])
    for lo in range(100, STEPS, 24):
        feed(worker, 0, p0[2 * lo: 2 * min(lo + 24, STEPS)])
        worker.engine.maintenance()
    assert worker.engine.model_versions() == {"holt-winters": 1}
    release(worker, {0, 1})
    assign(worker, results, {1})
    assert worker.engine.model_versions() == {"holt-winters": 1}
    assert sample(worker, "tidecast_model_version", model="holt-winters") == 1


def ar_seasonal(seed: int, steps: int, shift_at: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = np.zeros(steps)
    for k in range(1, steps):
        noise[k] = 0.6 * noise[k - 1] + rng.normal(scale=0.8)
    values = 10 + 3 * np.sin(2 * np.pi * np.arange(steps) / 24 + seed) + noise
    if shift_at is not None:
        values[shift_at:] += 6.0
    return values


def test_a_restored_series_that_drifts_counts_at_once(tmp_path):
    """tidecast_series_drifting read 0 after a restore of a series with a recent alarm until the next batch of any
    partition came (on an idle member: never)."""
    config = EngineConfig(horizon=6, model_params={"seasonal-naive": {"period": 24}})
    worker, results = worker_with(tmp_path, config)
    assign(worker, results, {0, 1})
    p0 = records_of(0, {"a": ar_seasonal(0, 700), "b": ar_seasonal(1, 700)}, range(700))
    p1 = records_of(1, {"d": ar_seasonal(2, 700, shift_at=600)}, range(700))
    for lo in range(0, 700, 50):
        feed(worker, 0, p0[2 * lo: 2 * (lo + 50)])
        feed(worker, 1, p1[lo: lo + 50])
    drifting = {"model": "seasonal-naive"}
    assert sample(worker, "tidecast_series_drifting", **drifting) == 1
    release(worker, {1})
    assert sample(worker, "tidecast_series_drifting", **drifting) == 0
    assign(worker, results, {1})
    assert sample(worker, "tidecast_series_drifting", **drifting) == 1


def test_a_job_restarted_by_series_moving_counts_as_one_started(tmp_path):
    """A revoke aborts a job waiting for the trainer thread and it starts again: tidecast_retrains_total counted
    started twice and one outcome, so started minus outcomes never came back to 0."""
    config = EngineConfig(horizon=4, freq="1h", model_params={"seasonal-naive": {"period": 6}}, retrain="on",
                          retrain_params=dict(min_fresh=24, shadow_steps=24, history=48, schedule=48, triggers=[],
                                              cooldown=0))
    worker, results = worker_with(tmp_path, config)
    worker.engine.retrainer.deferred = True  # as once serve's trainer thread runs maintenance(): jobs run there
    assign(worker, results, {0, 1})
    p0 = records_of(0, {"a": np.sin(np.arange(200.0)), "b": np.cos(np.arange(200.0))}, range(200))
    p1 = records_of(1, {"d": np.sin(np.arange(200.0) / 3)}, range(200))
    feed(worker, 0, p0[: 2 * 60])
    feed(worker, 1, p1[:60])
    started = {"model": "seasonal-naive", "outcome": "started"}
    assert sample(worker, "tidecast_retrains_total", **started) == 1
    release(worker, {1})
    feed(worker, 0, p0[2 * 60: 2 * 62])
    assert worker.engine.retrainer.lanes["seasonal-naive"].job is not None  # the same job, started again
    worker.engine.maintenance()
    feed(worker, 0, p0[2 * 62: 2 * 64])
    ended = sum(sample(worker, "tidecast_retrains_total", model="seasonal-naive", outcome=outcome) or 0
                for outcome in ("promoted", "rejected", "failed"))
    assert sample(worker, "tidecast_retrains_total", **started) == 1 == ended


def test_parked_series_restored_later_are_counted_as_restored(tmp_path):
    """A series parked by --max-series and restored when rows freed up was not counted in
    tidecast_state_restored_series_total."""
    config = EngineConfig(horizon=4, freq="1h", model_params={"seasonal-naive": {"period": 6}})
    producer = FakeProducer()
    first, results = make_worker(tmp_path, producer, engine=Engine.from_config(config, Metrics(reasons=REASONS)))
    assign(first, results, {0, 1})
    feed(first, 0, records_of(0, {"a": np.arange(20.0), "b": np.arange(20.0)}, range(20)))
    feed(first, 1, records_of(1, {"d": np.arange(20.0)}, range(20)))
    first.table.checkpoint([0, 1])
    capped = Engine.from_config(EngineConfig(horizon=4, freq="1h", model_params={"seasonal-naive": {"period": 6}},
                                             max_series=2), Metrics(reasons=REASONS))
    second, results = make_worker(tmp_path, producer, engine=capped)
    assign(second, results, {0, 1})
    assert sorted(second.engine.series_ids) == ["a", "b"]
    assert sample(second, "tidecast_state_restored_series_total") == 2
    release(second, {0})
    assert second.engine.series_ids == ["d"]
    assert sample(second, "tidecast_state_restored_series_total") == 3
