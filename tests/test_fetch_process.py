"""The fetch process (``--fetch-process``): its chunk codec, the worker fed decoded chunks, and the child itself
against the test broker (assignment, seeks, pauses, revocation)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from test_serve_worker import FakeProducer, assign, make_worker, records, state_of

from tidecast.stream.fetch_process import (
    FetchProcess,
    SeriesCodes,
    SeriesTable,
    decode_chunk,
    encode_chunk,
)
from tidecast.stream.kafka import dead_letter_message
from tidecast.stream.kafka_source import DecodedRecords, decode_records
from tidecast.stream.messages import FetchedRecords
from tidecast.stream.state import LocalStateStore


def mixed_records(partition: int = 1, offset0: int = 40) -> list[SimpleNamespace]:
    """Good observations with bad ones between them, keys and values of every kind, a gap in the offsets."""
    good = records(partition, ["a", "d"], range(3), offset0)
    bad = [
        SimpleNamespace(topic="obs", partition=partition, offset=0, key=None, value=b"{", timestamp=None,
                        headers=[("trace", b"\x00\xff")]),
        SimpleNamespace(topic="obs", partition=partition, offset=0, key=b"", value=None, timestamp=5, headers=[]),
        SimpleNamespace(topic="obs", partition=partition, offset=0, key=b"z", value=b'{"series_id":"z"}',
                        timestamp=6, headers=[]),
    ]
    out = bad[:1] + good[:2] + good[2:4] + bad[1:] + good[4:]  # a None key first: nothing before it in the blob
    for i, rec in enumerate(out):
        rec.offset = offset0 + i + (3 if i >= 4 else 0)  # offsets need not be consecutive (compaction, markers)
    return out


def as_chunk(recs: list, codes: SeriesCodes, table: SeriesTable, gen: int = 1):
    return decode_chunk(encode_chunk(recs[0].partition, gen, recs, decode_records(recs), 99, codes), "obs", table)


def test_a_chunk_decodes_to_what_the_records_decode_to_with_lazy_records_for_dead_letters():
    recs = mixed_records()
    direct = decode_records(recs)
    chunk = as_chunk(recs, SeriesCodes(), SeriesTable())
    got = chunk.decoded
    assert (chunk.first, chunk.next, chunk.count, chunk.highwater) == (recs[0].offset, recs[-1].offset + 1,
                                                                       len(recs), 99)
    for column in ("series_ids", "timestamps_ns", "values", "partitions", "offsets"):
        assert getattr(got.batch, column).tolist() == getattr(direct.batch, column).tolist(), column
    assert got.ends == direct.ends and got.count == direct.count == len(recs)
    assert [(d.reason, d.detail, d.position) for d in got.letters] == \
           [(d.reason, d.detail, d.position) for d in direct.letters]
    # what the dead-letter topic receives is byte for byte what the record itself gives
    for mine, theirs in zip(got.letters, direct.letters, strict=True):
        assert dead_letter_message(mine.raw, mine.reason, mine.detail, 1000) == \
               dead_letter_message(theirs.raw, theirs.reason, theirs.detail, 1000)
    for i, rec in enumerate(direct.records):  # every kept row's record, for a later rejection
        view = got.records[i]
        assert (view.offset, view.key, view.value, view.timestamp) == (rec.offset, rec.key, rec.value, rec.timestamp)
    picked = got.records.take(np.array([2, 0]))
    assert [r.offset for r in picked] == [direct.records[2].offset, direct.records[0].offset]


def test_series_codes_travel_once_and_survive_a_restart_of_the_numbering():
    codes, table = SeriesCodes(limit=3), SeriesTable()
    first = as_chunk(records(0, ["a", "b"], range(2), 0), codes, table)
    second = as_chunk(records(0, ["a", "b"], range(2, 4), 4), codes, table)
    assert first.decoded.batch.series_ids.tolist() == second.decoded.batch.series_ids.tolist() == ["a", "b"] * 2
    body = encode_chunk(0, 1, records(0, ["c", "a"], range(1), 8), decode_records(records(0, ["c", "a"], range(1), 8)),
                        None, codes)
    size = int.from_bytes(body[:4], "little")
    header = json.loads(body[4:4 + size])
    assert header["reset"] and header["new"] == ["c", "a"]  # a fourth id: the numbering starts over
    assert decode_chunk(body, "obs", table).decoded.batch.series_ids.tolist() == ["c", "a"]
    again = as_chunk(records(0, ["a", "b"], range(5, 6), 10), codes, table)
    assert again.decoded.batch.series_ids.tolist() == ["a", "b"]


def test_decoded_chunks_leave_the_worker_in_the_state_raw_records_do(tmp_path):
    recs = mixed_records(partition=1, offset0=0) + records(1, ["d"], range(3, 12), 20)
    raw_producer, chunk_producer = FakeProducer(), FakeProducer()
    raw, raw_results = make_worker(tmp_path, raw_producer, state_dir="raw")
    fed, fed_results = make_worker(tmp_path, chunk_producer, state_dir="fed")
    assign(raw, raw_results, {0, 1})
    assign(fed, fed_results, {0, 1})
    codes, table = SeriesCodes(), SeriesTable()
    halves = (recs[:7], recs[7:])
    for half in halves:
        raw.process([FetchedRecords(1, 0, half)])
    # both halves in one batch, as the worker gathers queued chunks
    fed.process([FetchedRecords(1, 0, as_chunk(half, codes, table).decoded) for half in halves])
    assert fed.processed == raw.processed == len(recs)
    assert sorted(fed.engine.series_ids) == sorted(raw.engine.series_ids)
    want, got = state_of(raw.engine), state_of(fed.engine)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k], equal_nan=True) for k in want)
    assert chunk_producer.reasons() == raw_producer.reasons() and raw_producer.reasons()  # a, d on 1: misrouted
    assert chunk_producer.topic(fed.cfg.dead_letter_topic) == raw_producer.topic(raw.cfg.dead_letter_topic)
    assert fed.table.checkpoint([1]) == raw.table.checkpoint([1]) == {1: recs[-1].offset + 1}


def test_concatenated_decoded_records_keep_record_order():
    a = decode_records(records(0, ["a"], range(2), 0))
    b = decode_records(records(0, ["b"], range(2), 2))
    both = DecodedRecords.concat([a, b])
    assert both.batch.offsets.tolist() == [0, 1, 2, 3] and [r.offset for r in both.records] == [0, 1, 2, 3]


# -- the child against the broker ----------------------------------------------------------------------------------

def drain(fetch: FetchProcess, want: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while sum(c.count for _, c in got) < want and time.monotonic() < deadline:
        got += fetch.poll(timeout_ms=200)
    return got


class FakeGroup:
    """The group consumer's part the fetch process asks: its assignment and a partition's committed position."""

    def __init__(self, topic: str, committed: dict[int, int]) -> None:
        self.topic, self.committed = topic, committed
        self.asked = 0

    def assignment(self) -> set:
        from kafka import TopicPartition

        return {TopicPartition(self.topic, p) for p in self.committed}

    def position(self, tp, timeout_ms=None) -> int:
        self.asked += 1
        if self.asked == 1:  # the cluster does not answer the first time: the fetch process asks again
            raise TimeoutError("no answer")
        return self.committed[tp.partition]


@pytest.mark.kafka
def test_the_child_fetches_from_where_it_is_told_and_drops_what_a_seek_or_revocation_made_stale(
        kafka, unique, as_messages):
    from kafka import TopicPartition

    topic = unique("fetch")
    kafka.create_topic(topic, 2)
    rows = [(f"fp/{s}", f"2024-01-01T{h:02d}:00:00Z", float(h)) for h in range(20) for s in range(4)]
    sent = kafka.send(topic, as_messages(rows))
    per_partition = {p: sum(1 for m in sent if m.partition == p) for p in (0, 1)}
    epochs = {0: 3, 1: 0}
    fetch = FetchProcess({"bootstrap_servers": kafka.bootstrap, "group_id": None, "fetch_max_wait_ms": 20},
                         topic, 4096, FakeGroup(topic, {0: 5, 1: 0}), epochs)
    try:
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        fetch.seek(tp1, 2)  # restored with a position: from there
        fetch.resume(tp0, tp1)  # partition 0 restored without one: the group's committed offset (5)
        got = drain(fetch, per_partition[0] - 5 + per_partition[1] - 2)
        firsts = {tp.partition: min(c.first for t, c in got if t == tp) for tp, _ in got}
        assert firsts == {0: 5, 1: 2}
        assert {c.epoch for tp, c in got if tp.partition == 0} == {3}  # the epoch the fetch began in
        assert all(c.decoded.batch.series_ids.size == c.count for _, c in got)  # nothing bad in there
        deadline = time.monotonic() + 10
        while fetch.position(tp0) != per_partition[0] and time.monotonic() < deadline:
            fetch.poll(timeout_ms=100)
        assert fetch.position(tp0) == per_partition[0] and fetch.highwater(tp0) == per_partition[0]

        fetch.seek(tp1, 0)  # a new generation: only chunks from offset 0 on arrive
        again = drain(fetch, per_partition[1])
        assert min(c.first for _, c in again) == 0 and {tp.partition for tp, _ in again} == {1}

        fetch.pause(tp0, tp1)  # takes effect within one poll of the child's
        assert fetch.paused() == {tp0, tp1}
        time.sleep(0.3)
        late = kafka.send(topic, as_messages([("fp/0", "2024-01-02T00:00:00Z", 1.0)]))[0]
        tp = TopicPartition(topic, late.partition)
        assert drain(fetch, 1, timeout=1.5) == []  # paused: nothing comes
        fetch.resume(tp)
        resumed = drain(fetch, 1)
        assert [(t.partition, c.first, c.count) for t, c in resumed] == [(late.partition, late.offset, 1)]

        epochs[late.partition] += 1
        fetch.forget({late.partition})  # revoked: its records stop
        kafka.send(topic, as_messages([("fp/0", "2024-01-02T01:00:00Z", 2.0)]))
        assert drain(fetch, 1, timeout=1.5) == []
        with pytest.raises(KeyError):
            fetch.position(tp)
    finally:
        fetch.close()
    assert fetch.proc.returncode == 0


@pytest.mark.kafka
def test_a_member_whose_fetch_process_dies_stops_and_its_successor_loses_nothing(kafka, unique, serve, tmp_path,
                                                                                  as_messages):
    import os
    import signal
    from pathlib import Path

    topic, group, state = unique("fpdie"), unique("g"), tmp_path / "state"
    kafka.create_topic(topic, 2)
    rows = [(f"die/{s}", f"2024-01-{1 + h // 24:02d}T{h % 24:02d}:00:00Z", float(h % 7)) for h in range(60)
            for s in range(3)]
    kafka.send(topic, as_messages(rows[:90]))
    args = ("--model-param", "seasonal-naive.period=6", "--fetch-process", "--output-processes", "0")
    proc = serve(topic, group, state, *args, name="first")
    proc.wait_value("tidecast_observations_total", lambda v: v == 90, 60)
    pid = proc.proc.pid
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    os.kill(int(child), signal.SIGKILL)
    assert proc.proc.wait(30) == 1  # the member stops instead of waiting for records that never come
    log = proc.log.read_text()
    assert "the fetch process exited" in log
    assert log.rstrip().endswith("INFO tidecast.stream.serve: stopped")  # the shutdown ran to its end

    kafka.send(topic, as_messages(rows[90:]))
    again = serve(topic, group, state, *args, name="again")
    again.wait_value("tidecast_observations_total", lambda v: v >= 90, 60)  # at most the last checkpoint re-read
    again.wait_caught_up(2)
    assert again.terminate()[0] == 0
    applied = sum(int(n) for p in range(2) if (snap := LocalStateStore(state, group, topic).load(p)) is not None
                  for n in snap.rows.arrays["engine/n_applied"].tolist())
    assert applied == len(rows)  # every observation applied once, across the two members
