"""serve retrains under drift: alarm -> job on the trainer thread -> shadow -> promotion, polling uninterrupted; a
kill -9 while the job is in flight ends in exactly one promotion after the restart."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.kafka

SHIFT, STEPS = 420, 720
WARM = 250  # steps sent before serve starts: the warm-start fit (240 steps) begins on them
READY_BY = SHIFT - 60  # the lane must forecast by then, so the detector's reference sees the old regime
CUT = SHIFT + 72  # steps sent before the job starts; the rest drives the shadow
ARGS = ("--model", "cyclenet", "--horizon", "4", "--freq", "1h",
        "--model-param", 'cyclenet.lookback=24', "--model-param", "cyclenet.cycle=24",
        "--model-param", "cyclenet.warm_start=240", "--model-param", "cyclenet.epochs=3",
        "--model-param", "cyclenet.online=false",
        "--retrain", "on", "--retrain-param", "min_fresh=24", "--retrain-param", "shadow_steps=24",
        "--retrain-param", "history=0",
        "--checkpoint-records", "300", "--checkpoint-interval", "0.3", "--max-poll-records", "50",
        "--batch-size", "100", "--session-timeout-ms", "3000", "--heartbeat-interval-ms", "500")


def drifting(as_messages, n: int = 3) -> list[tuple[bytes, bytes]]:
    """Daily cycles; from step SHIFT on the cycle is inverted and gains a second harmonic (as tests/test_retrain)."""
    rng = np.random.default_rng(0)
    t = np.arange(STEPS)[:, None]
    before = 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(n))
    after = 10 + 3 * np.sin(2 * np.pi * t / 24 + np.arange(n) + np.pi) + 2 * np.sin(4 * np.pi * t / 24)
    values = np.where(t >= SHIFT, after, before) + rng.normal(0, 0.4, (STEPS, n))
    stamps = [f"2017-01-{1 + k // 24:02d}T{k % 24:02d}:00:00Z" for k in range(STEPS)]
    return as_messages([(f"s{i}", stamps[k], float(values[k, i])) for k in range(STEPS) for i in range(n)])


def feed_until(kafka, topic: str, proc, messages: list, start: int, last: int, done, what: str,
               wait: float = 1.0) -> int:
    """Send the steps from ``start`` on, six at a time, until ``done()``; returns the first step not sent. Fails if
    step ``last`` is reached first.

    serve fits and retrains on its trainer thread while the consumer keeps reading (it never stalls for either),
    so a backlog sent at once can pass before the model forecasts (the detector's reference would then start after
    the change) or before the retrain job ends (its shadow, which starts after the job, would see no data). A live
    stream arrives at its own pace; this gives the test that pace, however slow the machine.
    """
    step, before = start, proc.value("tidecast_observations_total") or 0  # this process's count
    while step < last:
        kafka.send(topic, messages[step * 3 : (step + 6) * 3])
        step += 6
        proc.wait_value("tidecast_observations_total", lambda v, n=before + (step - start) * 3: v >= n, 60)
        deadline = time.monotonic() + wait  # up to ``wait`` seconds a chunk
        while time.monotonic() < deadline:
            if done():
                return step
            time.sleep(0.05)
    pytest.fail(f"{what} not before step {last}; log tail:\n{proc.tail()}")


def feed_until_forecasting(kafka, topic: str, proc, messages: list, start: int, last: int) -> int:
    return feed_until(kafka, topic, proc, messages, start, last,
                      lambda: bool(proc.value("tidecast_forecasts_total", model="cyclenet")), "cyclenet forecast")


def feed_until_promoted(kafka, topic: str, proc, messages: list, start: int) -> None:
    """The rest of the stream, paced until the candidate is promoted, then all of it."""
    sent = feed_until(kafka, topic, proc, messages, start, STEPS,
                      lambda: bool(proc.value("tidecast_retrains_total", outcome="promoted")), "promotion", wait=2.0)
    kafka.send(topic, messages[sent * 3 :])


def retrain_events(kafka, topic: str, at_least: int) -> list[dict]:
    messages = kafka.read_all(f"{topic}-events", min_count=at_least)
    rows = [json.loads(m.value) for m in messages]
    unique = {(r["model"], r["detector"], r["kind"], r["detected_at"]): r for r in rows}
    return [r for r in unique.values() if r["detector"] == "retrain"]


def test_serve_retrains_after_drift_without_interrupting_polling(kafka, unique, serve, tmp_path, as_messages):
    topic, group = unique("retrain"), unique("g")
    kafka.create_topic(topic, 1)
    messages = drifting(as_messages)
    kafka.send(topic, messages[: WARM * 3])
    proc = serve(topic, group, tmp_path / "state", *ARGS, "--retrain-param", "epochs=4")
    sent = feed_until_forecasting(kafka, topic, proc, messages, WARM, READY_BY)
    kafka.send(topic, messages[sent * 3 : CUT * 3])
    proc.wait_value("tidecast_retrains_total", lambda v: v >= 1, 240, outcome="started")
    feed_until_promoted(kafka, topic, proc, messages, CUT)  # the shadow is scored on what arrives after the job
    proc.wait_caught_up(1, timeout=120)
    assert proc.value("tidecast_model_version", model="cyclenet") >= 1
    assert proc.value("tidecast_rebalances_total") == 1  # the first assignment only: never kicked from the group
    assert proc.value("tidecast_drift_alarms_total", model="cyclenet") >= 1
    assert proc.terminate()[0] == 0
    log = proc.log.read_text()
    assert "CommitFailedError" not in log
    kinds = [r["kind"] for r in sorted(retrain_events(kafka, topic, 1), key=lambda r: r["detected_at"])]
    # The trainer thread's pace decides which records a job's shadow scores, so a first candidate may lose its
    # gate (rejected) and a later one win: each outcome ends a job that started before it, and one is a promotion.
    assert kinds[0] == "retrain_started" and "promoted" in kinds
    ends = ("promoted", "rejected", "failed")
    assert all(kinds[:i].count("retrain_started") > sum(kinds[:i].count(end) for end in ends)
               for i, kind in enumerate(kinds) if kind in ends)


def test_kill_9_during_the_job_ends_in_exactly_one_promotion(kafka, unique, serve, tmp_path, as_messages):
    topic, group, state = unique("retrain-crash"), unique("g"), tmp_path / "state"
    kafka.create_topic(topic, 1)
    messages = drifting(as_messages)
    kafka.send(topic, messages[: WARM * 3])
    slow = ("--retrain-param", "epochs=1500", "--retrain-param", "cooldown=100000")  # a job of several seconds
    first = serve(topic, group, state, *ARGS, *slow, name="first")
    sent = feed_until_forecasting(kafka, topic, first, messages, WARM, READY_BY)
    kafka.send(topic, messages[sent * 3 : CUT * 3])
    first.wait_value("tidecast_retrains_total", lambda v: v >= 1, 240, outcome="started")
    done = first.value("tidecast_checkpoint_seconds_count") or 0  # let a checkpoint hold the job in flight
    first.wait_value("tidecast_checkpoint_seconds_count", lambda v: v > done, 60)
    assert not first.value("tidecast_retrains_total", outcome="promoted")
    first.kill()
    final = serve(topic, group, state, *ARGS, *slow, name="final")
    final.wait_value("tidecast_state_restored_series_total", lambda v: v >= 3, 120)  # the job in flight with them
    feed_until_promoted(kafka, topic, final, messages, CUT)
    final.wait_caught_up(1, timeout=120)
    assert final.value("tidecast_model_version", model="cyclenet") == 1
    assert final.terminate()[0] == 0
    promoted = [r for r in retrain_events(kafka, topic, 1) if r["kind"] == "promoted"]
    assert len(promoted) == 1 and promoted[0]["version"] == 1
