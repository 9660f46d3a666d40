"""Effectively-once state under failure: kill -9 mid-stream, and partitions moving between group members.

Each test compares the service's final checkpointed state with an uninterrupted run of the same engine over the
same records (the reference), array by array - the drift detectors' rows included - and checks the forecast topic:
after de-duplication on ``(series_id, model, issued_at)`` every observation past warm-up has exactly one forecast,
and every re-sent message is byte-identical to the first. The kill -9 test checks the events topic the same way:
after de-duplication on ``(series_id, model, detector, kind, detected_at)`` it holds exactly the reference run's drift
alarms, none lost and none doubled.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tidecast.monitors.drift import DriftEvent
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.kafka import forecast_messages
from tidecast.stream.records import decode
from tidecast.stream.sinks import event_json
from tidecast.stream.state import LocalStateStore

pytestmark = pytest.mark.kafka

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ENGINE = EngineConfig(model_params={"seasonal-naive": {"period": 24}})
ENGINE_ARGS = ("--model-param", "seasonal-naive.period=24")
FIRST_ORIGIN = 23  # seasonal naive with a known period forecasts from its 24th observation on


def reference(records: list[Any], events: list[DriftEvent] | None = None,
              ) -> tuple[Engine, dict[str, tuple[str, bytes]]]:
    """An uninterrupted engine over ``records`` and its last forecast message per series (its drift events are
    appended to ``events``)."""
    records = sorted(records, key=lambda r: (r.partition, r.offset))
    obs = [decode(r.value) for r in records]
    batch = ObservationBatch(np.array([o.series_id for o in obs], dtype=object),
                             np.array([o.timestamp_ns for o in obs], np.int64), np.array([o.value for o in obs]),
                             np.array([r.partition for r in records], np.int32),
                             np.array([r.offset for r in records], np.int64))
    engine = Engine.from_config(ENGINE)
    last: dict[str, tuple[str, bytes]] = {}
    for start in range(0, len(batch), 1000):
        result = engine.process(batch.take(np.arange(start, min(start + 1000, len(batch)))))
        if events is not None:
            events.extend(result.events)
        for sid, value in forecast_messages(result.forecasts):
            last[sid] = (json.loads(value)["issued_at"], value)
    return engine, last


def assert_state_equals_reference(store: LocalStateStore, partitions: int, engine: Engine,
                                  ends: dict[int, int]) -> None:
    seen = set()
    for p in range(partitions):
        snap = store.load(p)
        assert snap is not None and snap.position == ends[p]
        meta, expected = engine.export_series(snap.rows.series_ids)
        for key, want in expected.items():
            np.testing.assert_array_equal(snap.rows.arrays[key], want, err_msg=f"partition {p}: {key}")
        seen |= set(snap.rows.series_ids)
    assert seen == set(engine.series_ids)


def assert_forecasts_complete(messages: list[Any], records: list[Any], first_origin: int,
                              last: dict[str, tuple[str, bytes]]) -> int:
    """Every origin after warm-up has one forecast; duplicates are identical; the last ones match. Returns the
    number of duplicates."""
    by_key: dict[tuple[str, str], bytes] = {}
    duplicates = 0
    for m in messages:
        msg = json.loads(m.value)
        key = (msg["series_id"], msg["issued_at"])
        if key in by_key:
            assert by_key[key] == m.value, f"re-sent forecast differs for {key}"
            duplicates += 1
        by_key[key] = m.value
    origins = defaultdict(list)
    for r in records:
        obs = decode(r.value)
        origins[obs.series_id].append(obs.timestamp.isoformat().replace("+00:00", "Z"))
    for sid, times in origins.items():
        issued = sorted(t for s, t in by_key if s == sid)
        assert issued == sorted(times)[first_origin:], sid
        assert by_key[(sid, last[sid][0])] == last[sid][1]
    return duplicates


def assert_events_exactly_once(messages: list[Any], expected: list[DriftEvent]) -> int:
    """After de-duplication the events topic holds exactly ``expected``; re-sent events are byte-identical and
    keyed by their series. Returns the number of duplicates."""
    by_key: dict[tuple[str, str, str, str, str], bytes] = {}
    duplicates = 0
    for m in messages:
        msg = json.loads(m.value)
        key = (msg["series_id"], msg["model"], msg["detector"], msg["kind"], msg["detected_at"])
        assert m.key == msg["series_id"].encode()
        if key in by_key:
            assert by_key[key] == m.value, f"re-sent event differs for {key}"
            duplicates += 1
        by_key[key] = m.value
    want = {(e.series_id, e.model, e.detector, e.kind, e.to_dict()["detected_at"]): event_json(e).encode()
            for e in expected}
    assert len(want) == len(expected), "the reference raised one event twice"
    assert by_key == want, (f"lost: {sorted(set(want) - set(by_key))}, "
                            f"not in the reference: {sorted(set(by_key) - set(want))}")
    return duplicates


def etth1_messages(as_messages, rows: int) -> list[tuple[bytes, bytes]]:
    frame = pd.read_csv(DATA / "ETTh1.csv", nrows=rows)
    stamps = (frame.pop("date").str.replace(" ", "T") + "Z").tolist()
    return as_messages([(f"ETTh1/{c}", t, v) for i, t in enumerate(stamps) for c, v in frame.iloc[i].items()])


@pytest.mark.parametrize("fetching", [(), ("--fetch-process",)], ids=["in-process", "fetch-process"])
def test_kill_9_three_times_mid_stream_then_state_and_forecasts_equal_an_uninterrupted_run(
        kafka, unique, serve, tmp_path, as_messages, fetching):
    topic, group, state = unique("crash"), unique("g"), tmp_path / "state"
    kafka.create_topic(topic, 2)
    sent = kafka.send(topic, etth1_messages(as_messages, 1200))
    ends = {p: 1 + max(m.offset for m in sent if m.partition == p) for p in range(2)}
    args = (*ENGINE_ARGS, "--checkpoint-records", "500", "--checkpoint-interval", "0.3", "--max-poll-records", "50",
            "--batch-size", "100", "--session-timeout-ms", "3000", "--heartbeat-interval-ms", "500", *fetching)
    for run in range(3):
        proc = serve(topic, group, state, *args, name=f"run-{run}")
        proc.wait_value("tidecast_observations_total", lambda v: v >= 1500, 60)
        assert (proc.value("tidecast_consumer_lag") or 0) + (proc.value("tidecast_consumer_queued_records") or 0) > 0
        proc.kill()
    final = serve(topic, group, state, *args, name="run-final")
    final.wait_caught_up(2)
    assert final.value("tidecast_state_restored_series_total") > 0
    assert final.terminate()[0] == 0

    records = kafka.read_all(topic, min_count=len(sent))
    events: list[DriftEvent] = []
    engine, last = reference(records, events)
    assert any("/drift/det/" in key for key in engine.export_series(engine.series_ids[:1])[1])
    assert_state_equals_reference(LocalStateStore(state, group, topic), 2, engine, ends)
    assert kafka.committed(group, topic, 2) == ends
    messages = kafka.read_all(f"{topic}-forecasts", min_count=(1200 - FIRST_ORIGIN) * 7)
    duplicates = assert_forecasts_complete(messages, records, FIRST_ORIGIN, last)
    assert duplicates > 0, "no kill landed between checkpoints: nothing was re-processed"
    assert len(events) >= 10  # ETTh1's first 1,200 hours: level and variance changes, a freeze of every channel
    assert_events_exactly_once(kafka.read_all(f"{topic}-events", min_count=len(events)), events)


@pytest.mark.parametrize("fetching", [(), ("--fetch-process",)], ids=["in-process", "fetch-process"])
def test_scale_out_then_in_moves_partitions_with_their_state(kafka, unique, serve, tmp_path, as_messages, waiter,
                                                             fetching):
    topic, group = unique("scale"), unique("g")
    kafka.create_topic(topic, 4)
    rng = np.random.default_rng(3)
    t0 = pd.Timestamp("2022-03-01T00:00:00Z")
    rows = [(f"scale/{s}", (t0 + pd.Timedelta(hours=k)).isoformat(), 5 * s + np.sin(k / 4 + s) + rng.normal())
            for k in range(600) for s in range(12)]
    messages = as_messages(rows)
    args = (*ENGINE_ARGS, "--assignment-strategy", "cooperative-sticky", *fetching)  # (range everywhere else)
    a = serve(topic, group, tmp_path / "a", *args, name="a")
    b = serve(topic, group, tmp_path / "b", *args, name="b")
    for proc in (a, b):
        proc.wait_value("tidecast_consumer_assigned_partitions", lambda v: v == 2, 60)

    half = len(messages) // 2
    sent = kafka.send(topic, messages[:half])

    def consumed() -> float:
        return a.value("tidecast_observations_total") + b.value("tidecast_observations_total")

    waiter(lambda: consumed() == half, 60, "both members to apply the first half")
    b.wait_caught_up(2)
    a.wait_caught_up(2)
    assert a.terminate()[0] == 0  # scale in: a's partitions move to b with their state

    b.wait_value("tidecast_consumer_assigned_partitions", lambda v: v == 4, 30)
    restored = b.wait_value("tidecast_state_restored_series_total", lambda v: v > 0, 30)
    before = b.value("tidecast_consumer_records_total")
    sent += kafka.send(topic, messages[half:])
    b.wait_value("tidecast_consumer_records_total", lambda v: v >= before + len(messages) - half, 60)
    b.wait_caught_up(4)
    assert b.terminate()[0] == 0

    ends = {p: 1 + max(m.offset for m in sent if m.partition == p) for p in range(4)}
    records = kafka.read_all(topic, min_count=len(messages))
    engine, last = reference(records)
    a_series = {sid for p in LocalStateStore(tmp_path / "a", group, topic).partitions()
                for sid in LocalStateStore(tmp_path / "a", group, topic).load(p).rows.series_ids}
    assert restored == len(a_series) > 0  # exactly a's series came over, from the changelog
    assert_state_equals_reference(LocalStateStore(tmp_path / "b", group, topic), 4, engine, ends)
    out = kafka.read_all(f"{topic}-forecasts", min_count=(600 - FIRST_ORIGIN) * 12)
    assert assert_forecasts_complete(out, records, FIRST_ORIGIN, last) == 0  # graceful moves re-send nothing


def test_a_join_that_waits_out_a_killed_members_session_is_no_outage(kafka, unique, serve, tmp_path):
    """After a kill -9 the next member's join waits for the dead one's session to expire; the group coordinator
    does not answer offset fetches meanwhile. The cluster probe once asked it, read the silence as an outage
    (tidecast_broker_up 0) and, with a budget shorter than the session, stopped a healthy member with rc 1."""
    topic, group = unique("join"), unique("g")
    kafka.create_topic(topic, 2)
    session = ("--session-timeout-ms", "16000", "--broker-outage-budget", "6", *ENGINE_ARGS)
    first = serve(topic, group, tmp_path / "a", *session, name="a")
    first.wait_value("tidecast_consumer_assigned_partitions", lambda v: v == 2, 60)
    first.kill()
    second = serve(topic, group, tmp_path / "b", *session, name="b")
    second.wait_value("tidecast_consumer_assigned_partitions", lambda v: v == 2, 60)  # after ~16 s of waiting
    assert second.value("tidecast_broker_up") == 1.0
    assert "unreachable" not in second.log.read_text()
    assert second.terminate()[0] == 0
