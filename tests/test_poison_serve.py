"""No poison pills in ``serve``: stray changelog records, snapshots in the wrong slot, records on the wrong
partition, exceptions downstream of decode, broker outages, a broker that lost its data, an unreachable broker at
start, and a mixed batch of every kind of bad record end to end.

The first part needs no broker (the worker on an in-memory producer and changelog, as in test_serve_worker.py);
the tests marked ``kafka`` run against the Tansu test broker, a private one where they pause or restart it.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections import Counter, defaultdict
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_serve_worker import (
    CONFIG,
    TOPIC,
    FakeProducer,
    MemoryChangelog,
    assign,
    feed,
    make_worker,
    records,
    sample,
    state_of,
)

from tidecast.monitors.metrics import Metrics
from tidecast.stream.batch import ForecastBatch, ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.kafka import (
    BrokerLink,
    BrokerUnavailable,
    KafkaForecastSink,
    OutputError,
    UnsendableForecasts,
    header_dict,
)
from tidecast.stream.kafka_source import SERVE_REASONS
from tidecast.stream.partitioner import home_partition
from tidecast.stream.records import InvalidRecord, decode
from tidecast.stream.serve import ServeConfig, Service
from tidecast.stream.state import IncompatibleState, LocalStateStore, SeriesRows, Snapshot, write_atomic


def letters_of(producer: FakeProducer) -> list[tuple[str, str, int, int]]:
    """(reason, detail, partition, offset) of every dead letter sent, in order (only they carry headers)."""
    out = []
    for headers in producer.headers:
        if headers:
            h = header_dict(headers)
            out.append((h["tidecast.reason"], h["tidecast.detail"], int(h["tidecast.source.partition"]),
                        int(h["tidecast.source.offset"])))
    return out


# -- 1. a changelog record that is not a state blob -------------------------------------------------------------
def test_a_stray_changelog_record_is_skipped_with_its_position_and_the_rest_restored(tmp_path, caplog):
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0, 1})
    feed(a, 0, records(0, ["a", "b"], range(20), 0))
    feed(a, 1, records(1, ["d"], range(20), 0))
    a.table.checkpoint()
    log0 = producer.log[(a.cfg.changelog_topic, 0)]
    feed(a, 0, records(0, ["a", "b"], range(20, 25), 40))
    a.table.checkpoint()
    inside = len(log0) - 1  # the last group's marker, after its records (a and b in one block)
    log0.insert(inside, (b"a", b"not a state blob"))  # inside the group: between its records and its marker
    log0.append((None, b"\x00" * 3))  # and one after the last group

    b, b_results = make_worker(tmp_path, producer, state_dir="elsewhere")  # changelog only
    with caplog.at_level(logging.WARNING):
        assert assign(b, b_results, {0, 1}) == {0: 50, 1: 20}
    assert sorted(b.engine.series_ids) == ["a", "b", "d"]
    for key, want in state_of(a.engine).items():
        np.testing.assert_array_equal(state_of(b.engine)[key], want, err_msg=key)
    assert sample(b, "tidecast_state_skipped_total", source="changelog") == 2
    warnings = [r.getMessage() for r in caplog.records if "skipping changelog record" in r.getMessage()]
    assert len(warnings) == 2
    assert f"{a.cfg.changelog_topic}[0] offset {inside}" in warnings[0] and "too short" in warnings[0]
    assert f"{a.cfg.changelog_topic}[0] offset {len(log0) - 1}" in warnings[1]


# -- 2. a local snapshot in another partition's slot --------------------------------------------------------------
def test_a_snapshot_copied_into_another_partitions_slot_is_refused_and_the_changelog_used(tmp_path, caplog):
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0, 1})
    p0 = records(0, ["a", "b"], range(30), 0)
    feed(a, 0, p0[:40])
    feed(a, 1, records(1, ["d"], range(30), 0))
    a.table.checkpoint()
    store = LocalStateStore(a.cfg.state_dir, a.cfg.group_id, TOPIC)
    shutil.copy(store.path(1), store.path(0))  # partition 1's snapshot in partition 0's slot

    b, b_results = make_worker(tmp_path, producer)  # same state dir: a restart on this machine
    with caplog.at_level(logging.WARNING):
        assert assign(b, b_results, {0, 1}) == {0: 40, 1: 30}
    assert any("written for partition 1, not for partition 0" in r.getMessage() for r in caplog.records)
    assert sample(b, "tidecast_state_skipped_total", source="snapshot") == 1
    assert b.table.owner_of("a") == b.table.owner_of("b") == 0
    feed(b, 0, p0[40:])  # nothing skipped: every record after the checkpoint is applied
    feed(a, 0, p0[40:])
    assert sample(b, "tidecast_consumer_skipped_records_total") == 0
    for key, want in state_of(a.engine).items():
        np.testing.assert_array_equal(state_of(b.engine)[key], want, err_msg=key)


def test_a_snapshot_of_another_group_is_refused_and_one_without_a_group_accepted_once(tmp_path, caplog):
    rows = SeriesRows([{"series_id": "a"}], {"engine/applied_offset": np.array([3])})
    mine = LocalStateStore(tmp_path, "g", "t")
    other = LocalStateStore(tmp_path, "other", "t")
    other.save(Snapshot("t", 0, 4, 0, None, rows))
    shutil.copy(other.path(0), mine.path(0))
    with caplog.at_level(logging.WARNING):
        assert mine.load(0) is None
    assert "written for group 'other', not for group 'g'" in caplog.text

    caplog.clear()
    write_atomic(mine.path(1), Snapshot("t", 1, 4, 0, None, rows).to_blob())  # today's format: no group
    with caplog.at_level(logging.WARNING):
        snap = mine.load(1)
    assert snap is not None and snap.position == 4 and snap.group == "g"
    assert "before snapshots recorded their consumer group" in caplog.text
    assert Snapshot.from_blob(mine.path(1).read_bytes()).group == "g"  # rewritten in the new format
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert mine.load(1).position == 4
    assert caplog.text == ""  # accepted once: no warning the second time


# -- 5. wrong partition: every member computes the home partition -----------------------------------------------
def test_two_members_agree_that_a_record_off_its_home_partition_is_wrong_partition(tmp_path, caplog):
    """Member A owns partition 0, member B partition 1. Series a lives on 0 (its murmur2 home out of 2); a record
    of it on partition 1 reaches B, which never saw a: it must not start a second state for it."""
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer, state_dir="a")
    b, b_results = make_worker(tmp_path, producer, state_dir="b")
    assign(a, a_results, {0})
    assign(b, b_results, {1})
    assert home_partition(b"a", 2) == 0
    feed(a, 0, records(0, ["a"], range(5), 0))
    stray = records(1, ["a"], range(5, 7), 0)
    with caplog.at_level(logging.WARNING):
        feed(b, 1, stray)
    assert b.engine.series_ids == []  # no second state
    assert sample(b, "tidecast_dead_letters_total", reason="wrong_partition") == 2
    reasons = [(r, p, o) for r, _, p, o in letters_of(producer)]
    assert reasons == [("wrong_partition", 1, 0), ("wrong_partition", 1, 1)]
    detail = letters_of(producer)[0][1]
    assert "belongs on partition 0" in detail and "murmur2" in detail and "--partitioner" in detail
    assert sum("wrong_partition: series 'a' belongs on partition 0" in r.getMessage() for r in caplog.records) == 1


def test_a_record_keyed_by_something_else_than_its_series_is_told_so_not_to_change_the_partitioner(tmp_path, caplog):
    """The key decides the partition; a record keyed 'other' landed off its series' home: the dead letter says the
    key is the problem (it blamed the partitioner, whose change would move every series), and the series, whose
    own records are fine, is not named in a partitioner warning."""
    producer = FakeProducer()
    b, b_results = make_worker(tmp_path, producer, state_dir="b")
    assign(b, b_results, {1})
    stray = records(1, ["a"], range(3), 0)
    stray[0].key, stray[1].key, stray[2].key = b"other", None, b"other"  # keyed otherwise, or not at all
    with caplog.at_level(logging.WARNING):
        feed(b, 1, stray)
    details = [letter[1] for letter in letters_of(producer)]
    assert "the record's key b'other' is not its series_id" in details[0] and "--partitioner" not in details[0]
    assert "the record has no key; key records by series_id" in details[1]
    assert "wrong_partition" not in caplog.text


def test_the_partitioner_setting_decides_the_home_partition(tmp_path):
    """A librdkafka producer (crc32) puts series d on partition 0, where murmur2 would expect partition 1."""
    assert (home_partition(b"d", 2, "crc32"), home_partition(b"d", 2, "murmur2")) == (0, 1)
    cfg = ServeConfig({"bootstrap_servers": "x:1", "topic": TOPIC, "checkpoint_records": 10**9,
                       "checkpoint_interval": 10**9, "state_dir": tmp_path / "state", "partitioner": "crc32"})
    from tidecast.stream.serve import build_worker

    producer = FakeProducer()
    metrics = Metrics(reasons=SERVE_REASONS)
    results: queue.Queue = queue.Queue()
    worker = build_worker(cfg, Engine.from_config(CONFIG, metrics), metrics, producer,
                          MemoryChangelog(cfg.changelog_topic, producer, lambda: None),
                          LocalStateStore(cfg.state_dir, cfg.group_id, TOPIC), results,
                          {cfg.forecast_topic: 2, cfg.dead_letter_topic: 2, cfg.changelog_topic: 2}, 2)
    assign(worker, results, {0, 1})
    feed(worker, 0, records(0, ["d"], range(3), 0))
    assert worker.engine.series_ids == ["d"] and producer.reasons() == []


# -- 7. exceptions downstream of decode ---------------------------------------------------------------------------
def test_an_engine_exception_dead_letters_the_batch_as_processing_error_and_the_worker_goes_on(tmp_path, caplog):
    producer = FakeProducer()
    engine = Engine.from_config(CONFIG, Metrics(reasons=SERVE_REASONS))
    process = engine.process

    def fragile(batch):  # a bug that only some input triggers
        if "bomb" in batch.series_ids.tolist():
            raise OverflowError("Python int too large to convert to C long")
        return process(batch)

    engine.process = fragile
    a, a_results = make_worker(tmp_path, producer, engine)
    assign(a, a_results, {0})
    good = records(0, ["a"], range(10), 0)
    feed(a, 0, good[:5])
    bad_batch = good[5:7] + records(0, ["bomb"], range(1), 7)
    with caplog.at_level(logging.ERROR):
        feed(a, 0, bad_batch)  # must not raise
    feed(a, 0, [SimpleNamespace(**{**vars(r), "offset": r.offset + 1}) for r in good[7:]])

    assert [(r, o) for r, _, _, o in letters_of(producer)] == [("processing_error", 5), ("processing_error", 6),
                                                                    ("processing_error", 7)]
    detail = letters_of(producer)[0][1]
    assert "the engine raised OverflowError: Python int too large" in detail
    assert sample(a, "tidecast_processing_errors_total") == 1
    assert sample(a, "tidecast_dead_letters_total", reason="processing_error") == 3
    assert "processing_error: the engine raised OverflowError" in caplog.text and "Traceback" in caplog.text
    n_applied = dict(zip(a.engine.series_ids, state_of(a.engine)["engine/n_applied"].tolist(), strict=True))
    assert n_applied == {"a": 8}  # 5 before, 3 after; the failed batch's records are dead letters
    assert a.table.checkpoint() == {0: 11}  # and the position moved past all of them


def _without(batch: ForecastBatch, series_id: str) -> ForecastBatch:
    keep = batch.series_id != series_id
    fields = ("series_id", "issued_at_ns", "model", "h", "target_ns", "mean", "lower", "upper")
    return ForecastBatch(*(getattr(batch, f)[keep] for f in fields), batch.alpha)


def test_a_forecast_that_cannot_be_encoded_dead_letters_only_its_series(tmp_path):
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0})
    write = a.forecasts.write

    def refuse_b(batch):  # what the sink does with a series whose forecast it cannot encode
        write(_without(batch, "b"))
        issued = set(batch.issued_at_ns[batch.series_id == "b"].tolist())
        if issued:
            error = UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
            raise UnsendableForecasts({"b": error}, {"b": issued})

    a.forecasts.write = refuse_b
    recs = records(0, ["a", "b"], range(8), 0)
    feed(a, 0, recs)
    letters = letters_of(producer)
    b_forecasting = [r.offset for r in recs if r.key == b"b"][5:]  # period 6: b forecasts from its 6th record
    assert [o for *_, o in letters] == b_forecasting and {r for r, *_ in letters} == {"processing_error"}
    assert "encoding the forecast of series 'b' raised UnicodeEncodeError" in letters[0][1]
    assert sample(a, "tidecast_processing_errors_total") == 1
    sent = {json.loads(v)["series_id"] for _, v in producer.topic(a.cfg.forecast_topic)}
    assert sent == {"a"}


def test_the_forecast_sink_sends_the_encodable_forecasts_and_names_the_others():
    producer = FakeProducer()
    sink = KafkaForecastSink(producer, "out", Metrics().output_errors, 1.0)
    ids = np.array(["ok", "ok", "\ud800", "\ud800", "nan", "nan"], dtype=object)
    batch = ForecastBatch(ids, np.zeros(6, np.int64), np.array(["m"] * 6, dtype=object), np.array([1, 2] * 3),
                          np.array([1, 2] * 3, np.int64) * 10**9, np.array([1.0, 2.0, 1.0, 2.0, np.nan, 1.0]),
                          np.zeros(6), np.full(6, 3.0), 0.1)
    with pytest.raises(UnsendableForecasts) as caught:
        sink.write(batch)
    assert set(caught.value.series) == {"\ud800", "nan"}
    assert [json.loads(v)["series_id"] for _, v in producer.topic("out")] == ["ok"]


@pytest.mark.parametrize("failure, code", [(OutputError("the producer refused a message"), 1),
                                           (IncompatibleState("written with a different engine configuration"), 2),
                                           (None, 0)])
def test_a_failure_found_after_the_stop_decides_the_exit_code(failure, code, tmp_path):
    """The main loop saw the stop before the worker's failure (a refused output while it finished its batch, a
    restore refused on the configuration): serve exited 0, as after a clean stop."""
    service = Service(ServeConfig({"bootstrap_servers": "127.0.0.1:1", "topic": "t", "group_id": "g",
                                   "state_dir": tmp_path}, EngineConfig(horizon=4)))
    service.worker = SimpleNamespace(error=None)

    def stopped_cleanly() -> int:  # the loop's view: the stop came first
        service.stop()
        service.worker.error = failure
        return 0

    service._serve = stopped_cleanly
    service._shutdown = lambda: None
    assert service.run() == code


def wide_forecasts(n_series: int, horizon: int) -> ForecastBatch:
    """One forecast per series, every step ready, two levels; random values (Arrow's compression saves little)."""
    rng = np.random.default_rng(0)
    n = n_series * horizon
    h = np.tile(np.arange(1, horizon + 1), n_series)
    mean = rng.normal(size=n)
    lowers = np.stack([mean - 1.0, mean - 2.0], axis=1)
    uppers = np.stack([mean + 1.0, mean + 2.0], axis=1)
    ids = np.repeat(np.array([f"s{i}" for i in range(n_series)], dtype=object), horizon)
    return ForecastBatch(ids, np.zeros(n, np.int64), np.array(["m"] * n, dtype=object), h,
                         h.astype(np.int64) * 3_600 * 10**9, mean, lowers[:, 0], uppers[:, 0], 0.2,
                         levels=("80", "95"), lowers=lowers, uppers=uppers)


@pytest.mark.parametrize("limit", [None, 100_000, 1_000])
def test_compact_batches_are_cut_into_messages_a_default_topic_takes(limit):
    """One compact message per partition and batch reached 2 MB at 2,000 series, H = 48 and two levels, over
    Kafka's default 1 MB topic limit: the broker refused it and serve exited at every restart on that batch. Now
    every message stays under the limit (a forecast larger than it goes alone) and together they hold the batch."""
    from tidecast.stream.kafka import COMPACT_MESSAGE_BYTES, read_forecasts

    producer = FakeProducer()
    kw = {} if limit is None else {"message_bytes": limit}
    sink = KafkaForecastSink(producer, "out", Metrics().output_errors, 1.0, output_format="compact", **kw)
    batch = wide_forecasts(2_000 if limit is None else 300, 48)
    sink.write(batch)
    values = [v for _, v in producer.topic("out")]
    assert len(values) > 1
    if limit == 1_000:  # one forecast (48 steps, two levels) is larger than that: one message each
        assert len(values) == 300
    else:
        assert max(map(len, values)) <= (limit or COMPACT_MESSAGE_BYTES)
    back = read_forecasts(values)
    assert back.series_id.tolist() == batch.series_id.tolist()
    for name in ("h", "target_ns", "mean", "lower", "upper", "lowers", "uppers"):
        np.testing.assert_array_equal(getattr(back, name), getattr(batch, name), err_msg=name)


def test_a_lone_surrogate_series_is_checkpointed_and_restored_without_crashing(tmp_path):
    """Until decode refuses such ids, one that reached the engine must not crash the checkpoint (a crash loop:
    the checkpoint would fail again after every restart)."""
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0})
    sid = "\ud800"  # straight into the engine: decode may refuse the id before the worker gets it
    obs = ObservationBatch(np.array([sid] * 3, dtype=object), np.arange(3, dtype=np.int64) * 3_600 * 10**9,
                           np.ones(3), np.zeros(3, np.int32), np.arange(3, dtype=np.int64))
    a.engine.process(obs)
    a.table.advance({0: 3})
    a.table.applied(obs, {sid: 0}, set())
    assert a.table.checkpoint() == {0: 3}
    b, b_results = make_worker(tmp_path, producer, state_dir="elsewhere")
    assign(b, b_results, {0})
    assert b.engine.series_ids == [sid]


def test_a_new_series_whose_only_records_the_engine_rejects_does_not_break_the_checkpoint(tmp_path):
    """A first observation beyond max_abs_value is rejected before the engine registers its series: the
    partition must not claim the series either, or every checkpoint (and every restart) fails on it."""
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0})
    huge = records(0, ["a"], range(1), 0)[0]
    huge.value = json.dumps({"series_id": "a", "timestamp": 0, "value": 1e300}).encode()
    feed(a, 0, [huge, *records(0, ["b"], range(3), 1)])
    assert producer.reasons() == ["out_of_range"]
    assert a.table.checkpoint() == {0: 4}
    assert a.table.owner_of("a") is None and a.table.owner_of("b") == 0


def test_a_refused_output_still_stops_the_member(tmp_path):
    """Broker refusals are no data errors: they are not turned into dead letters (README's rule)."""
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0})
    send = producer.send

    def too_large(topic, **kw):
        from kafka.errors import MessageSizeTooLargeError

        if topic == a.cfg.forecast_topic:
            raise MessageSizeTooLargeError("the message is 20000000 bytes")
        return send(topic, **kw)

    producer.send = too_large
    with pytest.raises(OutputError, match="MessageSizeTooLarge"):
        feed(a, 0, records(0, ["a"], range(10), 0))


# -- 3. the broker link: outage budget -----------------------------------------------------------------------------
def test_the_broker_link_waits_out_an_outage_within_the_budget_and_says_so(caplog):
    metrics = Metrics()
    link = BrokerLink(30.0, metrics.broker_up, metrics.broker_retries, sleep=lambda s: None)
    answers = iter([TimeoutError("no answer"), ConnectionError("refused"), "flushed"])

    def attempt(timeout):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    ticks = []
    with caplog.at_level(logging.WARNING):
        assert link.call("flushing", attempt, lambda: ticks.append(1)) == "flushed"
    assert len(ticks) == 2 and metrics.registry.get_sample_value("tidecast_broker_retries_total") == 2
    assert metrics.registry.get_sample_value("tidecast_broker_up") == 1
    assert "unreachable (flushing: TimeoutError: no answer); retrying for up to 30 s" in caplog.text
    assert "reachable again" in caplog.text

    def refused(timeout):
        from kafka.errors import TopicAuthorizationFailedError

        raise TopicAuthorizationFailedError("no")

    with pytest.raises(Exception, match="TopicAuthorizationFailed"):  # a refusal is not waited out
        link.call("sending", refused)


def test_the_outage_budget_is_per_outage_and_ends_in_broker_unavailable():
    clock = [0.0]
    link = BrokerLink(10.0, sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    import tidecast.stream.kafka as kafka_module

    real = kafka_module.time.monotonic
    kafka_module.time.monotonic = lambda: clock[0]
    try:
        def down(timeout):
            clock[0] += 1.0
            raise TimeoutError("no answer")

        with pytest.raises(BrokerUnavailable, match="unreachable for 1[0-9] s, longer than the outage budget of 10 s"):
            link.call("flushing", down)
        assert clock[0] < 20
    finally:
        kafka_module.time.monotonic = real


# -- kafka --------------------------------------------------------------------------------------------------------
FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 10000}


def hourly(series: str, steps: range, t0: str = "2023-05-01T00:00:00Z") -> list[tuple[str, str, float]]:
    start = pd.Timestamp(t0)
    return [(series, (start + pd.Timedelta(hours=k)).isoformat(), float(np.sin(k / 3) + len(series)))
            for k in steps]


def series_on(partition: int, partitions: int, prefix: str, count: int = 1) -> list[str]:
    """Series ids whose murmur2 home is ``partition`` (kafka-python's default partitioner puts them there)."""
    found, i = [], 0
    while len(found) < count:
        sid = f"{prefix}/{i}"
        if home_partition(sid.encode(), partitions) == partition:
            found.append(sid)
        i += 1
    return found


@pytest.mark.kafka
def test_an_unreachable_broker_at_start_is_retried_then_fails_in_one_line(serve, tmp_path, waiter):
    from conftest import free_port

    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    proc = serve("nowhere", "g", tmp_path / "state", "--bootstrap-servers", closed, "--broker-outage-budget", "6")
    waiter(lambda: proc.value("tidecast_broker_retries_total") or 0, 15, "a retry counted")
    assert proc.value("tidecast_broker_up") == 0
    rc = proc.proc.wait(30)
    elapsed = time.monotonic() - started
    log_text = proc.log.read_text()
    assert rc == 1 and 6 <= elapsed < 25, (rc, elapsed, log_text)
    assert "Traceback" not in log_text
    errors = [line for line in log_text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "the Kafka cluster was unreachable for" in errors[0] and closed in errors[0]
    assert "retrying for up to 6 s" in log_text


@pytest.mark.kafka
def test_a_broker_outage_is_waited_out_and_nothing_is_lost(private_broker, as_messages, waiter, tmp_path):
    """The broker hangs (SIGSTOP) while the worker has unsaved state to checkpoint, for longer than the session
    timeout: serve waits (broker_up 0), then continues; every record is applied exactly once."""
    from conftest import KafkaKit, gated_engines

    kit = KafkaKit(private_broker.bootstrap)
    topic = "outage"
    kit.create_topic(topic, 2)
    gate, entered = threading.Event(), threading.Event()
    options = {"bootstrap_servers": private_broker.bootstrap, "topic": topic, "group_id": "g-outage",
               "state_dir": tmp_path / "state", **FAST, "checkpoint_interval": 0.5, "shutdown_timeout": 1.0}
    service = Service(ServeConfig(options, EngineConfig(horizon=4, model_params={"seasonal-naive": {"period": 6}})),
                      engine_factory=gated_engines(gate, entered))
    rc: list = []
    thread = threading.Thread(target=lambda: rc.append(service.run()), name="serve-under-test")
    thread.start()
    sample = service.metrics.registry.get_sample_value
    rows = [r for step in range(12) for s in range(4) for r in hourly(f"o/{s}", range(step, step + 1))]
    first, second = as_messages(rows[:24]), as_messages(rows[24:])
    try:
        waiter(lambda: sample("tidecast_consumer_assigned_partitions") == 2, 60, "both partitions assigned")
        kit.send(topic, first)
        waiter(entered.is_set, 30, "the worker to take the first batch")
        private_broker.pause()
        outage_started = time.monotonic()
        gate.set()  # the worker applies the batch; its checkpoint meets the hung broker
        waiter(lambda: sample("tidecast_broker_up") == 0 or not thread.is_alive(), 30,
               "broker_up to drop during the outage")
        while time.monotonic() - outage_started < 12.0 and thread.is_alive():  # past the 6 s session timeout
            time.sleep(0.1)
        assert thread.is_alive() and not rc, f"serve stopped during the outage: {rc}"
        assert sample("tidecast_broker_up") == 0
        private_broker.resume()
        waiter(lambda: sample("tidecast_broker_up") == 1, 60, "broker_up back to 1")
        kit.send(topic, second)

        def all_applied() -> bool:
            # The files as they are: a LocalStateStore here would clear the service's partial writes (same pid).
            n = Counter()
            for path in (tmp_path / "state" / "g-outage" / topic).glob("partition-*.tcs"):
                snap = Snapshot.from_blob(path.read_bytes())
                n.update(dict(zip(snap.rows.series_ids, snap.rows.arrays["engine/n_applied"].tolist(), strict=True)))
            return n == Counter({f"o/{s}": 12 for s in range(4)})

        waiter(all_applied, 90, "every record applied exactly once in the checkpointed state")
        assert sample("tidecast_broker_retries_total") > 0
    finally:
        gate.set()
        if private_broker.paused:
            private_broker.resume()
        service.stop()
        thread.join(30)
        kit.close()
    assert rc == [0]


@pytest.mark.kafka
@pytest.mark.parametrize("fetching", [(), ("--fetch-process",)], ids=["in-process", "fetch-process"])
def test_after_the_broker_lost_its_data_serve_resets_past_the_end_and_reads_the_new_records(
        private_broker, serve, as_messages, tmp_path, caplog, fetching):
    """A restarted in-memory broker: topics, changelog and committed offsets are gone, the local snapshot says
    the partition was at offset 60. The new topic's records must be read, not waited for past its end."""
    from conftest import KafkaKit

    topic, group, state = "lost", "g-lost", tmp_path / "state"
    args = ("--bootstrap-servers", private_broker.bootstrap, "--model-param", "seasonal-naive.period=6",
            "--checkpoint-interval", "0.5", *fetching)
    kit = KafkaKit(private_broker.bootstrap)
    kit.create_topic(topic, 1)
    kit.send(topic, as_messages(hourly("lost/a", range(60))))
    kit.close()
    first = serve(topic, group, state, *args, name="before")
    first.wait_value("tidecast_observations_total", lambda v: v == 60, 60)
    first.wait_caught_up(1)
    assert first.terminate()[0] == 0
    assert LocalStateStore(state, group, topic).load(0).position == 60

    private_broker.restart()
    kit = KafkaKit(private_broker.bootstrap)
    kit.create_topic(topic, 1)
    kit.send(topic, as_messages(hourly("lost/a", range(60, 80))))  # the data continues in a fresh topic
    kit.close()
    again = serve(topic, group, state, *args, name="after")
    again.wait_value("tidecast_observations_total", lambda v: v == 20, 60)
    again.wait_caught_up(1)
    assert again.value("tidecast_consumer_offset_resets_total") == 1
    assert "position 60 is past the log end 20" in again.log.read_text()
    assert again.terminate()[0] == 0
    snap = LocalStateStore(state, group, topic).load(0)
    assert snap.position == 20 and snap.rows.arrays["engine/n_applied"].tolist() == [80]


# -- 6. every poison pill at once, end to end -----------------------------------------------------------------------
def _reason_of(value: bytes) -> str | None:
    try:
        decode(value)
    except InvalidRecord as err:
        return err.reason
    return None


@pytest.mark.kafka
@pytest.mark.parametrize("fetching", [(), ("--fetch-process",)], ids=["in-process", "fetch-process"])
def test_serve_survives_a_mixed_batch_of_every_poison_pill_and_a_restart(kafka, unique, serve, tmp_path,
                                                                          as_messages, fetching):
    topic, group, state = unique("poison"), unique("g"), tmp_path / "state"
    partitions = 4
    kafka.create_topic(topic, partitions)
    homes = {p: series_on(p, partitions, "mix", 2) for p in range(partitions)}
    series = [sid for p in range(partitions) for sid in homes[p]]
    steps = 30
    good = {sid: as_messages(hourly(sid, range(steps))) for sid in series}

    def send(partition: int, key: bytes | None, value: bytes | None) -> Any:
        future = kafka.producer.send(topic, key=key, value=value, partition=partition)
        kafka.producer.flush()
        return future.get(timeout=30)

    pills: list[tuple[Any, str]] = []  # (record metadata, expected reason)
    a0, a1 = homes[0][0], homes[1][0]
    obs = json.loads(good[a0][0][1])
    raw_pills = [
        (0, b"mix", b"not json{", "not_json"),
        (1, b"mix", b"\xff\xfe\x00garbage", "not_json"),
        (2, b"mix", b'{"series_id": 5, "timestamp": 0, "value": 1}', "wrong_type"),
        (3, b"mix", b'[1, 2, 3]', "wrong_type"),
        (0, b"mix", b'{"series_id": "mix/x", "value": 1.0}', "missing_field"),
        (1, b"mix", json.dumps({**obs, "value": "abc"}).encode(), "non_numeric_value"),
        (2, b"mix", b'{"series_id": "mix/x", "timestamp": 0, "value": NaN}', "non_finite_value"),
        (3, b"mix", b'{"series_id": "mix/x", "timestamp": 0, "value": Infinity}', "non_finite_value"),
        (0, b"mix", json.dumps({**obs, "timestamp": "yesterday"}).encode(), "bad_timestamp"),
        (1, b"mix", json.dumps({**obs, "schema_version": 9}).encode(), "unknown_schema_version"),
        (2, b"mix", b'{"series_id": "mix/x", "pad": "' + b"x" * 5000 + b'"}', "oversized"),
        (home_partition(b"mix/huge", partitions), b"mix/huge",  # judged by the engine: on its home partition
         json.dumps({**obs, "series_id": "mix/huge", "value": 1e300}).encode(), "out_of_range"),
    ]
    # Pills whose verdict belongs to decode (being extended in parallel): the huge timestamp is included once
    # decode refuses it. A lone-surrogate series id is refused by decode then (bad_series_id); until then its
    # observations are applied, and those whose forecast is due (from the 24th on) cannot be published: their
    # records are dead-lettered as processing_error, and nothing crashes (the changelog key is written all the same).
    huge_time = json.dumps({**obs, "timestamp": "2300-01-01T00:00:00Z"}).encode()
    if _reason_of(huge_time) == "bad_timestamp":
        raw_pills.append((3, b"mix", huge_time, "bad_timestamp"))
    lone_rows = hourly("\ud800", range(26))
    lone_values = [json.dumps({"series_id": sid, "timestamp": t, "value": v}).encode() for sid, t, v in lone_rows]
    lone_partition = home_partition("\ud800".encode("utf-8", "surrogatepass"), partitions)
    lone_refused = _reason_of(lone_values[0])
    assert lone_refused in (None, "bad_series_id")

    # Half of every series, interleaved with the pills, then out-of-order and duplicate observations, the rest.
    for k in range(steps // 2):
        for p in range(partitions):
            for sid in homes[p]:
                send(p, *good[sid][k])
        if k < len(raw_pills):
            p, key, value, reason = raw_pills[k]
            pills.append((send(p, key, value), reason))
    for p, key, value, reason in raw_pills[steps // 2:]:
        pills.append((send(p, key, value), reason))
    lone_applied = 0
    for i, value in enumerate(lone_values):
        meta = send(lone_partition, b"lone", value)
        if lone_refused:
            pills.append((meta, lone_refused))
        else:
            lone_applied += 1
            if i >= 23:
                pills.append((meta, "processing_error"))
    wrong = (home_partition(a0.encode(), partitions) + 1) % partitions
    pills.append((send(wrong, a0.encode(), good[a0][steps // 2][1]), "wrong_partition"))
    pills.append((send(1, a1.encode(), good[a1][3][1]), "out_of_order"))  # older than a1's last observation
    duplicate = send(1, a1.encode(), good[a1][steps // 2 - 1][1])  # the same timestamp again: a duplicate
    for k in range(steps // 2, steps):
        for p in range(partitions):
            for sid in homes[p]:
                send(p, *good[sid][k])
    assert duplicate.partition == 1

    args = ("--model-param", "seasonal-naive.period=24", "--max-record-bytes", "2048",
            "--checkpoint-interval", "600", "--checkpoint-records", "1000000", *fetching)
    proc = serve(topic, group, state, *args)
    proc.wait_value("tidecast_observations_total", lambda v: v == steps * len(series) + lone_applied, 90)
    proc.wait_caught_up(partitions)

    letters = kafka.read_all(f"{topic}-dead-letters", min_count=len(pills))
    got = {}
    for m in letters:
        headers = header_dict(m.headers)
        got[(int(headers["tidecast.source.partition"]), int(headers["tidecast.source.offset"]))] = headers
    assert len(letters) == len(pills), Counter(h["tidecast.reason"] + ":" + h["tidecast.detail"][:80]
                                               for h in got.values())
    for meta, reason in pills:
        headers = got[(meta.partition, meta.offset)]
        assert headers["tidecast.reason"] == reason, (reason, headers)
        assert headers["tidecast.source.topic"] == topic
    wrong_detail = next(h["tidecast.detail"] for h in got.values() if h["tidecast.reason"] == "wrong_partition")
    assert f"belongs on partition {home_partition(a0.encode(), partitions)}" in wrong_detail
    counts = {labels["reason"]: v for labels, v in proc.metrics()["tidecast_dead_letters_total"]}
    assert {r: counts[r] for r in Counter(r for _, r in pills)} == dict(Counter(r for _, r in pills))
    assert proc.value("tidecast_duplicates_total") == 1

    first_origin = 23  # seasonal naive with a known period forecasts from its 24th observation on
    forecasts = [json.loads(m.value) for m in kafka.read_all(f"{topic}-forecasts",
                                                             min_count=(steps - first_origin) * len(series))]
    by_series = defaultdict(set)
    for f in forecasts:
        by_series[f["series_id"]].add(f["issued_at"])
    assert set(by_series) == set(series)  # every partition's good records are forecast (and nothing else)
    assert all(len(issued) == steps - first_origin for issued in by_series.values())

    # No crash loop: kill -9 before any checkpoint, so that the restart re-processes every pill.
    proc.kill()
    again = serve(topic, group, state, *args, name="serve-again")
    again.wait_value("tidecast_observations_total", lambda v: v == steps * len(series) + lone_applied, 90)
    again.wait_caught_up(partitions)
    again_letters = kafka.read_all(f"{topic}-dead-letters", min_count=2 * len(pills))
    assert Counter(header_dict(m.headers)["tidecast.reason"] for m in again_letters) == \
           Counter({r: 2 * n for r, n in Counter(r for _, r in pills).items()})
    again.assert_running()
    assert again.terminate()[0] == 0
    committed = kafka.committed(group, topic, partitions)
    ends = defaultdict(int)
    for meta, _ in pills:
        ends[meta.partition] = max(ends[meta.partition], meta.offset + 1)
    assert all((committed[p] or 0) >= ends[p] for p in range(partitions)), (committed, dict(ends), again.tail(60))


@pytest.mark.kafka
@pytest.mark.parametrize("partitioner", ["crc32", "fnv1a"])
def test_produce_sends_each_series_to_its_home_partition_under_the_chosen_partitioner(kafka, unique, tmp_path,
                                                                                     partitioner):
    from tidecast.stream.cli import main

    topic = unique(f"produce-{partitioner}")
    series = [f"plant/{i}" for i in range(12)]
    rows = [row for sid in series for row in hourly(sid, range(3))]
    frame = pd.DataFrame(rows, columns=["unique_id", "ds", "y"])
    path = tmp_path / "history.csv"
    frame.to_csv(path, index=False)
    assert main(["produce", str(path), "--bootstrap-servers", kafka.bootstrap, "--topic", topic, "--partitions", "4",
                 "--partitioner", partitioner]) == 0
    placed = {(r.key.decode(), r.partition) for r in kafka.read_all(topic, min_count=len(rows))}
    assert placed == {(sid, home_partition(sid.encode(), 4, partitioner)) for sid in series}
    assert placed != {(sid, home_partition(sid.encode(), 4, "murmur2")) for sid in series}  # the choice mattered


@pytest.mark.kafka
def test_an_outage_longer_than_the_budget_ends_serve_in_one_line(private_broker, serve, as_messages, tmp_path):
    from conftest import KafkaKit

    kit = KafkaKit(private_broker.bootstrap)
    kit.create_topic("budget", 1)
    kit.send("budget", as_messages(hourly("budget/a", range(10))))
    kit.close()
    proc = serve("budget", "g-budget", tmp_path / "state", "--bootstrap-servers", private_broker.bootstrap,
                 "--broker-outage-budget", "4")
    proc.wait_value("tidecast_observations_total", lambda v: v == 10, 60)
    private_broker.pause()
    started = time.monotonic()
    rc = proc.proc.wait(60)
    log_text = proc.log.read_text()
    assert rc == 1 and time.monotonic() - started < 40, log_text
    assert "Traceback" not in log_text
    stopped = [line for line in log_text.splitlines() if "serve stopped" in line]
    assert len(stopped) == 1 and "longer than the outage budget of 4 s" in stopped[0]



def test_the_commit_of_revoked_partitions_is_bounded_in_time():
    """A commit to a hanging cluster would wait out kafka-python's request timeout (28 s seen while stopping; 60 s
    with the README's request_timeout_ms example), past the shutdown budget and the platform's grace period: the
    revoke listener waits for it only until the release deadline. An answered commit is counted as before."""
    import threading

    from kafka import TopicPartition

    from tidecast.stream.fetcher import rebalance_listener
    from tidecast.stream.messages import ReleasePartitions

    def revoke(answered: bool) -> tuple[Metrics, int]:
        future = SimpleNamespace(is_done=answered, exception=None)

        class Consumer:
            def commit_async(self, offsets):
                return future

        release = ReleasePartitions(frozenset({0}), offsets={0: 42})
        release.done.set()
        metrics = Metrics()
        fetcher = SimpleNamespace(metrics=metrics, cfg=SimpleNamespace(topic="t"), consumer=Consumer(),
                                  begin_release=lambda partitions: release,
                                  release_deadline=lambda stopping: time.monotonic() + 0.05)
        stopping = threading.Event()
        stopping.set()
        coroutine = rebalance_listener(fetcher, stopping, lambda: False).on_partitions_revoked({TopicPartition("t", 0)})
        turns = 0
        with pytest.raises(StopIteration):
            while True:
                coroutine.send(None)  # each turn yields to kafka-python's loop (a 10 ms sleep there)
                turns += 1
                time.sleep(0.01)
        return metrics, turns

    def count(metrics: Metrics, name: str) -> float:
        return metrics.registry.get_sample_value(name)

    answered, turns = revoke(answered=True)
    assert turns == 0 and count(answered, "tidecast_offset_commits_total") == 1
    hanging, turns = revoke(answered=False)
    assert 1 <= turns < 50 and count(hanging, "tidecast_offset_commit_failures_total") == 1
