"""``tidecast serve`` against a real Kafka-protocol broker: end to end, bad input, SIGTERM, lag while paused,
health endpoints."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import gated_engines

from tidecast.stream.cli import main
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.kafka import KafkaForecastSink, OutputError, header_dict
from tidecast.stream.serve import ServeConfig, Service
from tidecast.stream.state import ChangelogStore, LocalStateStore

pytestmark = pytest.mark.kafka

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ETTH1 = DATA / "ETTh1.csv"
WARMUP = 401  # seasonal naive (period detected after 2 * 200 + 2 observations) emits from the 402nd on


@pytest.mark.parametrize("extra,children", [((), 2), (("--output-processes", "0"), 0),
                                            (("--fetch-process", "--output-processes", "1"), 2)],
                         ids=["default-output-processes", "in-worker", "fetch-process"])
def test_produce_then_serve_forecasts_every_observation_after_warmup(kafka, unique, serve, tmp_path, extra,
                                                                      children):
    topic, group, rows = unique("etth1"), unique("g"), 1500
    assert main(["produce", str(ETTH1), "--bootstrap-servers", kafka.bootstrap, "--topic", topic,
                 "--partitions", "4", "--rows", str(rows)]) == 0
    n_obs = rows * 7
    proc = serve(topic, group, tmp_path / "state", *extra)
    proc.wait_value("tidecast_observations_total", lambda v: v >= n_obs, 60)
    proc.wait_caught_up(4)
    pids = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()
    assert len(pids) == children  # the output processes (2 by default in the JSON format) and the fetch process

    expected = (rows - WARMUP) * 7
    messages = [json.loads(r.value) for r in kafka.read_all(f"{topic}-forecasts", min_count=expected)]
    assert len(messages) == expected  # one message per (series, origin), nothing twice
    times = pd.read_csv(ETTH1, nrows=rows)["date"]
    origins = {f"{t.replace(' ', 'T')}Z" for t in times.iloc[WARMUP:]}
    by_series = defaultdict(set)
    no_interval = Counter()
    for msg in messages:
        by_series[msg["series_id"]].add(msg["issued_at"])
        assert msg["h"] == list(range(1, 25)) and msg["model"] == "seasonal-naive" and msg["alpha"] == 0.1
        issued = pd.Timestamp(msg["issued_at"])
        assert [pd.Timestamp(t) for t in msg["target_timestamp"]] == [issued + pd.Timedelta(hours=h)
                                                                      for h in msg["h"]]
        lower, mean, upper = (np.array(msg[k], dtype=float) for k in ("lower", "mean", "upper"))  # null -> NaN
        none = np.isnan(lower)  # no interval yet: the calibrator had no h-step residual of this series
        assert (none == np.isnan(upper)).all() and np.isfinite(lower[~none]).all() and np.isfinite(upper[~none]).all()
        assert (lower[~none] <= upper[~none]).all() and np.isfinite(mean).all()  # (PID may shift both past the mean)
        no_interval[msg["series_id"]] += int(none.sum())
    assert set(by_series) == {f"ETTh1/{c}" for c in ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")}
    assert all(issued == origins for issued in by_series.values())
    # seasonal naive hands its cycle-detection window over as a backtest: an interval from each series' first forecast
    assert set(no_interval.values()) == {0}

    rc, elapsed = proc.terminate()
    assert rc == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # they stopped with the member


def test_bad_input_goes_to_the_dead_letter_topic_and_the_consumer_keeps_running(kafka, unique, serve, tmp_path,
                                                                                   as_messages):
    topic, group = unique("bad"), unique("g")
    kafka.create_topic(topic, 1)
    good = as_messages([("bad/a", "2020-01-01T00:00:00Z", 1.0), ("bad/a", "2020-01-01T01:00:00Z", 2.0),
                        ("bad/a", "2020-01-01T02:00:00Z", 3.0)])
    huge = b'{"series_id":"bad/a","pad":"' + b"x" * (1 << 20) + b'"}'
    bad = [
        (b"bad/a", b"not json{", "not_json"),
        (b"bad/a", b'{"series_id":"bad/a","value":1.0}', "missing_field"),
        (b"bad/a", b'{"series_id":"bad/a","timestamp":"2020-01-01T05:00:00Z","value":NaN}', "non_finite_value"),
        (b"bad/a", b'{"series_id":5,"timestamp":"2020-01-01T05:00:00Z","value":1}', "wrong_type"),
        (b"bad/a", huge, "oversized"),
        (b"bad/a", b'{"series_id":"bad/a","timestamp":0,"value":1,"schema_version":2}', "unknown_schema_version"),
    ]
    sent = kafka.send(topic, [good[0], *[(k, v) for k, v, _ in bad], good[1]])
    # --freq: with an inferred step the first observations are held until the step is known
    proc = serve(topic, group, tmp_path / "state", "--max-partition-fetch-bytes", str(4 << 20), "--freq", "1h")
    proc.wait_value("tidecast_observations_total", lambda v: v == 2, 30)

    letters = kafka.read_all(f"{topic}-dead-letters", min_count=len(bad))
    assert len(letters) == len(bad)
    for letter, (key, value, reason), meta in zip(letters, bad, sent[1:-1], strict=True):
        headers = header_dict(letter.headers)
        assert headers["tidecast.reason"] == reason
        assert headers["tidecast.source.topic"] == topic
        assert (int(headers["tidecast.source.partition"]), int(headers["tidecast.source.offset"])) == \
               (meta.partition, meta.offset)
        assert letter.key == key
        if reason == "oversized":  # cut to dead_letter_max_bytes; the original size is kept
            assert int(headers["tidecast.raw.size"]) == len(value) and letter.value == value[:1_000_000]
        else:
            assert letter.value == value
    counts = {labels["reason"]: v for labels, v in proc.metrics()["tidecast_dead_letters_total"]}
    assert {r: counts[r] for _, _, r in bad} == {r: 1.0 for _, _, r in bad}

    kafka.send(topic, [good[2]])  # still consuming after all that
    proc.wait_value("tidecast_observations_total", lambda v: v == 3, 20)
    assert proc.terminate()[0] == 0


def synthetic_messages(as_messages, n_series: int, n_steps: int, prefix: str) -> list[tuple[bytes, bytes]]:
    """Hourly sine waves with noise, interleaved by time (as a live stream arrives)."""
    rng = np.random.default_rng(7)
    t0 = pd.Timestamp("2021-01-01T00:00:00Z")
    rows = []
    for step in range(n_steps):
        ts = (t0 + pd.Timedelta(hours=step)).isoformat()
        for s in range(n_series):
            value = 10 * s + np.sin(2 * np.pi * step / 24 + s) + 0.1 * rng.normal()
            rows.append((f"{prefix}/{s}", ts, value))
    return as_messages(rows)


def test_sigterm_mid_stream_exits_0_within_10s_with_state_checkpointed_and_offsets_committed(
        kafka, unique, serve, tmp_path, as_messages):
    topic, group, state = unique("term"), unique("g"), tmp_path / "state"
    kafka.create_topic(topic, 2)
    messages = synthetic_messages(as_messages, 6, 1500, "term")
    meta = kafka.send(topic, messages)
    sid_at = {(m.partition, m.offset): key.decode() for (key, _), m in zip(messages, meta, strict=True)}
    slow = ("--max-poll-records", "50", "--batch-size", "100", "--checkpoint-interval", "600",
            "--checkpoint-records", "1000000", "--model-param", "seasonal-naive.period=24")
    proc = serve(topic, group, state, *slow)
    proc.wait_value("tidecast_observations_total", lambda v: v >= 1500, 60)
    rc, elapsed = proc.terminate()
    assert rc == 0 and elapsed < 10, (rc, elapsed, proc.tail())

    committed = kafka.committed(group, topic, 2)
    store = LocalStateStore(state, group, topic)
    applied = 0
    for p in range(2):
        snap = store.load(p)
        if snap is None:  # nothing of this partition processed yet: nothing saved, nothing committed
            assert committed[p] is None
            continue
        assert committed[p] == snap.position
        below = Counter(sid for (part, off), sid in sid_at.items() if part == p and off < snap.position)
        n_applied = dict(zip(snap.rows.series_ids, snap.rows.arrays["engine/n_applied"].tolist(), strict=True))
        assert n_applied == dict(below)  # everything below the commit applied exactly once, nothing beyond
        applied += sum(n_applied.values())
    assert 0 < applied < len(messages), "the stop did not land mid-stream"

    again = serve(topic, group, state, *slow, name="serve-2")  # a restart continues from there
    again.wait_caught_up(2)
    again.wait_value("tidecast_observations_total", lambda v: v == len(messages) - applied, 60)
    assert again.terminate()[0] == 0
    totals = Counter(sid_at.values())
    for p in range(2):
        snap = store.load(p)
        for sid, n in zip(snap.rows.series_ids, snap.rows.arrays["engine/n_applied"].tolist(), strict=True):
            assert n == totals[sid]


def test_lag_gauge_matches_the_backlog_while_consumption_is_paused(kafka_bootstrap, kafka, unique, tmp_path,
                                                                  as_messages, waiter):
    topic = unique("lag")
    kafka.create_topic(topic, 2)
    gate = threading.Event()

    def stalled_engine(config, metrics):  # a slow stage: the worker blocks on its first batch
        engine = Engine.from_config(config, metrics)
        process = engine.process
        engine.process = lambda batch: (gate.wait(60), process(batch))[1]
        return engine

    options = {"bootstrap_servers": kafka_bootstrap, "topic": topic, "group_id": unique("g"),
               "state_dir": tmp_path / "state", "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
               "max_poll_interval_ms": 10000, "max_queued_records": 100, "max_poll_records": 20,
               "lag_interval": 0.3}
    service = Service(ServeConfig(options, EngineConfig(horizon=4)), engine_factory=stalled_engine)
    thread = threading.Thread(target=service.run, name="serve-under-test")
    thread.start()
    sample = service.metrics.registry.get_sample_value
    try:
        messages = synthetic_messages(as_messages, 4, 200, "lag")
        kafka.send(topic, messages[:300])
        waiter(lambda: sample("tidecast_consumer_paused_partitions") == 2, 30, "backpressure to pause both")
        kafka.send(topic, messages[300:])

        def lag_is_backlog() -> bool:
            lag = sum(sample("tidecast_consumer_lag", {"partition": str(p)}) or 0 for p in range(2))
            return lag >= len(messages) - 300 and lag == len(messages) - sample("tidecast_consumer_records_total")

        waiter(lag_is_backlog, 15, "the lag gauge to count the records produced while paused")
        assert sample("tidecast_consumer_paused_partitions") == 2
    finally:
        gate.set()
    waiter(lambda: sample("tidecast_observations_total") == len(messages), 30, "all records after resuming")
    waiter(lambda: sum(sample("tidecast_consumer_lag", {"partition": str(p)}) or 0 for p in range(2)) == 0, 10,
             "lag back to 0")
    service.stop()
    thread.join(15)
    assert not thread.is_alive()


def test_a_batch_that_fails_after_a_stop_ends_serve_with_exit_1(kafka, kafka_bootstrap, unique, tmp_path,
                                                                as_messages, waiter, monkeypatch):
    """A stop (SIGTERM) while the worker holds a batch whose output the broker then refuses: serve logged
    "stopped" and exited 0, which Restart=on-failure and alerting read as a clean stop."""
    topic = unique("late-failure")
    kafka.create_topic(topic, 1)
    gate, entered, shutting_down = threading.Event(), threading.Event(), threading.Event()
    flush = KafkaForecastSink.flush

    def refused_once_stopping(sink):
        if shutting_down.is_set():
            raise OutputError(f"the producer refused a message to {sink.topic}: MessageSizeTooLargeError (test)")
        flush(sink)

    monkeypatch.setattr(KafkaForecastSink, "flush", refused_once_stopping)
    options = {"bootstrap_servers": kafka_bootstrap, "topic": topic, "group_id": unique("g"),
               "state_dir": tmp_path / "state", "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
               "max_poll_interval_ms": 10000, "shutdown_timeout": 5.0, "output_processes": 0}
    service = Service(ServeConfig(options, EngineConfig(horizon=4)), engine_factory=gated_engines(gate, entered))
    shutdown = service._shutdown
    service._shutdown = lambda: (shutting_down.set(), shutdown())[1]
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service.run()), name="serve-under-test")
    thread.start()
    try:
        kafka.send(topic, synthetic_messages(as_messages, 2, 10, "late"))
        waiter(entered.is_set, 30, "the worker to take a batch")
        service.stop()
        waiter(shutting_down.is_set, 10, "serve to begin its shutdown")
    finally:
        gate.set()
    thread.join(30)
    assert not thread.is_alive() and codes == [1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, path: str) -> tuple[int, dict | None]:
    """(status, JSON body or None); 0 while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    except OSError:
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def test_readyz_waits_for_the_restore_and_healthz_fails_while_the_worker_is_stuck(
        kafka_bootstrap, kafka, unique, tmp_path, as_messages, waiter, monkeypatch):
    """The probes' endpoints follow the service, unlike /metrics, which answers whatever the worker does."""
    topic = unique("health")
    kafka.create_topic(topic, 2)
    restore_gate, learn_gate = threading.Event(), threading.Event()
    read = ChangelogStore.read
    monkeypatch.setattr(ChangelogStore, "read", lambda self, p, start: (restore_gate.wait(60), read(self, p, start))[1])

    def stuck_engine(config, metrics):  # learning blocks until the gate opens: a stuck worker
        engine = Engine.from_config(config, metrics)
        model = engine.lanes[0].model
        learn = model.learn_many
        model.learn_many = lambda *args, **kw: (learn_gate.wait(60), learn(*args, **kw))[1]
        return engine

    port = _free_port()
    options = {"bootstrap_servers": kafka_bootstrap, "topic": topic, "group_id": unique("g"),
               "state_dir": tmp_path / "state", "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
               "max_poll_interval_ms": 10000, "metrics_port": port, "metrics_address": "127.0.0.1",
               "liveness_timeout": 1.0}
    # freq: the series learn from their first observation (an inferred step holds the first few)
    service = Service(ServeConfig(options, EngineConfig(horizon=4, freq="1h")), engine_factory=stuck_engine)
    thread = threading.Thread(target=service.run, name="serve-under-test")
    thread.start()
    try:
        seen = []
        waiter(lambda: seen.append(_http(port, "/readyz")) or seen[-1] == (503, {"status": "restoring",
                                                                             "restoring": [0, 1]}), 30,
               "/readyz to report both partitions restoring")
        assert all(status != 200 for status, _ in seen)  # never "ready" before it joined and owned its partitions
        restore_gate.set()
        waiter(lambda: _http(port, "/readyz") == (200, {"status": "ready"}), 30, "/readyz once restored")
        waiter(lambda: _http(port, "/healthz")[0] == 200, 10, "a live service")

        kafka.send(topic, synthetic_messages(as_messages, 4, 5, "health"))
        waiter(lambda: _http(port, "/healthz")[0] == 503, 30, "/healthz to fail while the worker is stuck")
        status, body = _http(port, "/healthz")
        assert status == 503 and body["stale"] == ["worker"] and body["heartbeat_age_seconds"]["worker"] > 1.0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200 and b"tidecast_consumer_records_total 20.0" in resp.read()
        assert _http(port, "/readyz")[0] == 200  # stuck, but restored: readiness is not liveness

        learn_gate.set()
        waiter(lambda: _http(port, "/healthz")[0] == 200, 30, "/healthz once the worker moves again")
        waiter(lambda: service.metrics.registry.get_sample_value("tidecast_observations_total") == 20, 30,
               "every observation applied")
    finally:
        restore_gate.set()
        learn_gate.set()
        service.stop()
        thread.join(15)
    assert not thread.is_alive()


def test_a_spare_member_is_ready_under_cooperative_sticky(kafka, unique, serve, tmp_path, waiter):
    """Two members, one partition: the one left without a partition is ready too. cooperative-sticky calls no
    rebalance listener for an empty assignment, and /readyz once waited for one forever (a startup probe would
    restart that pod every ten minutes)."""
    topic, group = unique("spare"), unique("g")
    kafka.create_topic(topic, 1)
    members = [serve(topic, group, tmp_path / name, "--assignment-strategy", "cooperative-sticky", name=name)
               for name in ("a", "b")]
    waiter(lambda: sum(m.value("tidecast_consumer_assigned_partitions") or 0 for m in members) == 1, 60,
           "the one partition to be assigned")
    for member in members:
        waiter(lambda m=member: _http(m.metrics_port, "/readyz")[0] == 200, 30, "every member ready")
    assert sorted(m.value("tidecast_consumer_assigned_partitions") for m in members) == [0.0, 1.0]


def test_state_written_under_another_configuration_stops_serve_in_one_line_with_exit_2(
        kafka, unique, serve, tmp_path, as_messages):
    """A changed --horizon against the group's saved state is a settings mistake: one error line naming what
    differs and exit 2, as for a bad option (it was a worker traceback, a second one from the service, exit 1)."""
    topic, group, state = unique("cfg"), unique("g"), tmp_path / "state"
    kafka.create_topic(topic, 1)
    kafka.send(topic, synthetic_messages(as_messages, 2, 60, "cfg"))
    first = serve(topic, group, state, "--horizon", "4", "--model-param", "seasonal-naive.period=24")
    first.wait_value("tidecast_observations_total", lambda v: v >= 120, 60)
    assert first.terminate()[0] == 0  # a graceful stop checkpoints
    changed = serve(topic, group, state, "--horizon", "6", "--model-param", "seasonal-naive.period=24",
                    name="serve-changed")
    rc = changed.proc.wait(60)
    log = changed.tail()
    assert rc == 2, log
    assert "serve cannot restore its state" in log and "'horizon': (4, 6)" in log
    assert "Traceback" not in log
