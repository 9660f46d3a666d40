"""The serve worker's checkpoint, restore, skip and release logic, with an in-memory broker stand-in."""

from __future__ import annotations

import queue
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tidecast.models.naive import SeasonalNaive
from tidecast.monitors.conformal import make_calibrator
from tidecast.monitors.metrics import Metrics
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine, Lane
from tidecast.stream.records import REASONS, Observation, encode, parse_timestamp
from tidecast.stream.serve import ServeConfig, Worker, _Assign, _Release
from tidecast.stream.state import ChangelogStore, LocalStateStore

CONFIG = EngineConfig(horizon=4, model_params={"seasonal-naive": {"period": 6}})
TOPIC = "obs"


class FakeProducer:
    """Assigns offsets per (topic, partition) and remembers every message."""

    def __init__(self) -> None:
        self.log: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        self.headers: list = []

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        log = self.log[(topic, partition if partition is not None else -1)]
        log.append((key, value))
        self.headers.append(headers)
        meta = SimpleNamespace(offset=len(log) - 1)
        return SimpleNamespace(add_errback=lambda fn: None, get=lambda timeout=None: meta)

    def reasons(self) -> list[str]:
        return [dict(h)["tidecast.reason"].decode() for h in self.headers if h]

    def flush(self, timeout=None) -> None:
        pass

    def topic(self, name: str) -> list[tuple[bytes | None, bytes | None]]:
        return [m for (t, _), msgs in sorted(self.log.items()) if t == name for m in msgs]


class MemoryChangelog(ChangelogStore):
    """The real writer and reader logic over the fake producer's log."""

    def _fetch(self, partition, start, sink):
        log = self.producer.log[(self.topic, partition)]
        for offset in range(start, len(log)):
            sink(offset, *log[offset])
        return len(log)


def make_worker(tmp_path, producer, engine=None, state_dir="state") -> tuple[Worker, queue.Queue]:
    cfg = ServeConfig({"bootstrap_servers": "x:1", "topic": TOPIC, "checkpoint_records": 10**9,
                       "checkpoint_interval": 10**9, "state_dir": tmp_path / state_dir})
    results: queue.Queue = queue.Queue()
    metrics = Metrics(reasons=REASONS)
    engine = engine or Engine.from_config(CONFIG, metrics)
    worker = Worker(cfg, engine, metrics, producer, MemoryChangelog(cfg.changelog_topic, producer, lambda: None),
                    LocalStateStore(cfg.state_dir, cfg.group_id, TOPIC), results,
                    {cfg.forecast_topic: 2, cfg.dead_letter_topic: 2, cfg.changelog_topic: 2}, 2)
    return worker, results


def records(partition: int, series: list[str], steps: range, offset0: int) -> list[SimpleNamespace]:
    out = []
    t0 = pd.Timestamp("2024-01-01T00:00:00Z")
    for k in steps:
        for s in series:
            obs = Observation(s, parse_timestamp((t0 + pd.Timedelta(hours=k)).isoformat()), float(np.sin(k) + len(s)))
            out.append(SimpleNamespace(topic=TOPIC, partition=partition, offset=offset0 + len(out), key=s.encode(),
                                       value=encode(obs), timestamp=0, headers=[]))
    return out


def feed(worker: Worker, partition: int, recs: list) -> None:
    from tidecast.stream.serve import _Records

    worker._apply([_Records(partition, worker.epochs.get(partition, 0), recs)])


def assign(worker: Worker, results: queue.Queue, partitions: set[int]) -> dict[int, int | None]:
    worker._restore(_Assign(partitions, partitions, {p: 0 for p in partitions}))
    out = {}
    while not results.empty():
        kind, p, position, _ = results.get()
        assert kind == "restored"
        out[p] = position
    return out


def sample(worker: Worker, name: str, **labels: str) -> float | None:
    return worker.metrics.registry.get_sample_value(name, labels)


def state_of(engine: Engine) -> dict[str, np.ndarray]:
    return engine.export_series(sorted(engine.series_ids))[1]


def test_checkpoint_then_restore_elsewhere_continues_exactly_like_the_original(tmp_path):
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assert assign(a, a_results, {0, 1}) == {0: None, 1: None}  # nothing saved yet: committed offsets rule
    p0, p1 = records(0, ["a", "b"], range(30), 0), records(1, ["c"], range(30), 0)
    feed(a, 0, p0[:40])
    feed(a, 1, p1[:20])
    assert a.checkpoint([0, 1]) == {0: 40, 1: 20}

    b, b_results = make_worker(tmp_path, producer, state_dir="other-machine")  # no local state: changelog only
    assert assign(b, b_results, {0, 1}) == {0: 40, 1: 20}
    assert sample(b, "tidecast_state_restored_series_total") == 3
    for key, value in state_of(a.engine).items():
        np.testing.assert_array_equal(state_of(b.engine)[key], value, err_msg=key)

    sent_before = len(producer.topic(a.cfg.forecast_topic))
    feed(a, 0, p0[40:])
    a_out = producer.topic(a.cfg.forecast_topic)[sent_before:]
    feed(b, 0, p0[40:])
    b_out = producer.topic(a.cfg.forecast_topic)[sent_before + len(a_out):]
    assert a_out == b_out and a_out


def test_redelivered_records_are_skipped_and_misrouted_ones_dead_lettered(tmp_path):
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0, 1})
    p0 = records(0, ["a"], range(10), 0)
    feed(a, 0, p0)
    a.checkpoint([0])
    b, b_results = make_worker(tmp_path, producer)  # same state dir: a restart
    assign(b, b_results, {0, 1})
    feed(b, 0, p0[5:])  # re-delivered: already applied
    assert sample(b, "tidecast_consumer_skipped_records_total") == 5
    n_applied = dict(zip(b.engine.series_ids, state_of(b.engine)["engine/n_applied"].tolist(), strict=True))
    assert n_applied == {"a": 10}

    stray = records(1, ["a"], range(10, 11), 0)  # series a lives on partition 0
    feed(b, 1, stray)
    letters = producer.topic(b.cfg.dead_letter_topic)
    assert letters == [(b"a", stray[0].value)]
    assert producer.reasons() == ["wrong_partition"]
    assert sample(b, "tidecast_dead_letters_total", reason="wrong_partition") == 1


class CountingNaive(SeasonalNaive):
    """Seasonal naive with a piece of shared state: how many rounds it has learned."""

    def __init__(self) -> None:
        super().__init__(period=6)
        self.rounds = 0

    def learn_many(self, rows, ticks, values, filled=None):
        super().learn_many(rows, ticks, values, filled)
        self.rounds += 1

    def export_shared(self):
        return {"rounds": np.array([self.rounds])}, {"kind": "counting"}

    def import_shared(self, arrays, meta):
        self.rounds = int(arrays["rounds"][0])


def counting_engine() -> Engine:
    lane = Lane(CountingNaive(), make_calibrator(CONFIG.calibrator, 4, 0.1), 4, 0.1)
    return Engine(CONFIG, [lane], Metrics(reasons=REASONS))


def test_shared_state_is_written_when_it_changes_and_restored_into_a_fresh_engine(tmp_path):
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer, counting_engine())
    assign(a, a_results, {0})
    recs = records(0, ["a", "b"], range(12), 0)
    feed(a, 0, recs)
    a.checkpoint([0])
    a.checkpoint([0])  # nothing changed: nothing written
    changelog = producer.log[(a.cfg.changelog_topic, 0)]
    assert [k for k, _ in changelog].count(b"\x00shared/seasonal-naive") == 1
    assert [k for k, _ in changelog] == [b"a", b"b", b"\x00shared/seasonal-naive", b"\x00checkpoint"]

    b, b_results = make_worker(tmp_path, producer, counting_engine(), state_dir="elsewhere")
    assign(b, b_results, {0})
    assert b.engine.lanes[0].model.rounds == a.engine.lanes[0].model.rounds == 12


def test_release_checkpoints_unless_abandoned_first(tmp_path):
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0, 1})
    feed(a, 0, records(0, ["a"], range(5), 0))
    feed(a, 1, records(1, ["c"], range(5), 0))

    release = _Release({0})
    a._release(release)
    assert release.done.is_set() and release.offsets == {0: 5} and 0 not in a.partitions and 0 in a.released

    late = _Release({1})
    assert late.abandon()  # the listener gave up before the worker got to it
    a._release(late)
    assert late.offsets == {} and 1 not in a.partitions
    assert producer.log[(a.cfg.changelog_topic, 1)] == []  # nothing written for a partition given away


@pytest.mark.parametrize("value, reason", [(b"{", "not_json"), (None, "wrong_type"),
                                           (b'{"series_id":"a","timestamp":0,"value":"x"}', "non_numeric_value")])
def test_undecodable_records_advance_the_position_and_are_dead_lettered(tmp_path, value, reason):
    producer = FakeProducer()
    a, a_results = make_worker(tmp_path, producer)
    assign(a, a_results, {0})
    bad = SimpleNamespace(topic=TOPIC, partition=0, offset=0, key=b"a", value=value, timestamp=0, headers=[])
    feed(a, 0, [bad])
    assert a.checkpoint([0]) == {0: 1}  # handled, so committed past it
    assert producer.reasons() == [reason]
