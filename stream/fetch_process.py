"""Input records fetched and decoded by a child process, so the engine's interpreter does not parse them.

In the compact format a member spends about a third of its interpreter's time in kafka-python's record parsing
and network threads (docs/serve.md, "Run 10"), all under the one interpreter lock the engine needs. With
``--fetch-process`` the group member's consumer only keeps the membership and commits (every partition stays paused
in it); a child process (``python -m tidecast.stream.fetch_process``) runs a group-less consumer assigned the
partitions the member restored, decodes each poll's records with
:func:`~tidecast.stream.kafka_source.decode_records` (same rules, same dead-letter reasons) and hands over columns.

:class:`FetchProcess` is the member's side. It answers the part of the consumer API the
:class:`~tidecast.stream.fetcher.Fetcher` uses for data (``poll``, ``pause``, ``resume``, ``seek``, ``position``,
``highwater``, ``paused``), so the fetcher's protocol (restore then seek and resume, back-pressure, the log-end
watch, rewinds) is the same either way. Every ``seek`` or (re)assignment starts a new *generation* of the partition:
chunks the child fetched before it are dropped on arrival, as kafka-python drops fetched records after a seek.

The pipes carry no pickles. A frame is one op byte, the body's length (4 bytes, little-endian) and the body. To the
child: ``C`` (config, JSON), ``A`` (fetch a partition from an offset: ``{"p", "offset", "gen"}``), ``U`` (stop
fetching partitions), ``P`` / ``R`` (pause / resume partitions), ``S`` (stop). From it: ``B`` (a decoded chunk of one
partition: :func:`encode_chunk`) and ``H`` (positions and highwaters, four times a second).

>>> from types import SimpleNamespace as Rec
>>> recs = [Rec(topic="obs", partition=2, offset=7, timestamp=1, key=b"a", headers=[],
...             value=b'{"series_id":"a","timestamp":"2020-01-01T00:00:00Z","value":1}'),
...         Rec(topic="obs", partition=2, offset=9, timestamp=2, key=None, headers=[], value=b"{")]
>>> body = encode_chunk(2, 5, recs, decode_records(recs), 10, SeriesCodes())
>>> chunk = decode_chunk(body, "obs", SeriesTable())
>>> chunk.partition, chunk.gen, chunk.first, chunk.next, chunk.count, chunk.highwater
(2, 5, 7, 10, 2, 10)
>>> chunk.decoded.batch.series_ids.tolist(), chunk.decoded.records[0].key
(['a'], b'a')
>>> letter = chunk.decoded.letters[0]
>>> letter.reason, letter.position, letter.raw.key, letter.raw.value
('not_json', (2, 9), None, b'{')
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.kafka_source import DecodedRecords, decode_records
from tidecast.stream.output_process import (
    client_kwargs,
    read_ahead,
    read_config,
    reap,
    start_child,
    write_frame,
)
from tidecast.stream.sources import DeadLetter

log = logging.getLogger(__name__)

#: How often the child reports its positions and highwaters (the lag gauges and the log-end watch read them).
STATUS_SECONDS = 0.25
#: Frames read ahead of the poll thread; a full queue holds the child back (its pipe fills, its writes wait).
READ_AHEAD = 64
#: How long the group consumer may take to say where a partition restored without a position starts.
POSITION_TIMEOUT_MS = 5_000
#: Series ids the child numbers before it starts over (the member's table of them is cleared with it).
MAX_CODES = 1_000_000
#: Per record, in this order, then the two blobs (keys, values); per kept row, in this order.
_RECORD_ARRAYS = (("offsets", "<i8"), ("timestamps", "<i8"), ("key_ends", "<i8"), ("value_ends", "<i8"))
_ROW_ARRAYS = (("kept", "<i4"), ("codes", "<i4"), ("times", "<i8"), ("values", "<f8"))


# -- records as columns --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordView:
    """What a dead letter needs of an input record (the fields of kafka-python's ``ConsumerRecord`` it reads)."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None


class RawRecords:
    """One chunk's records, as columns; :class:`RecordView` objects are made only for the rows asked for (the
    records a dead letter carries)."""

    def __init__(self, topic: str, partition: int, arrays: Mapping[str, np.ndarray], keys: bytes,
                 values: bytes) -> None:
        self.topic = topic
        self.partition = partition
        self.arrays = arrays
        self.keys = keys
        self.values = values

    def __len__(self) -> int:
        return len(self.arrays["offsets"])

    def view(self, i: int) -> RecordView:
        a = self.arrays
        stamp = int(a["timestamps"][i])
        return RecordView(self.topic, self.partition, int(a["offsets"][i]), None if stamp < 0 else stamp,
                          _slice(self.keys, a["key_ends"], i), _slice(self.values, a["value_ends"], i))


def _slice(blob: bytes, ends: np.ndarray, i: int) -> bytes | None:
    """Item ``i`` of a blob (:func:`_ends` wrote ``ends``): ``None`` where the item was ``None``."""
    end = int(ends[i])
    if end < 0:
        return None
    return blob[_end(int(ends[i - 1])) if i else 0:end]


def _end(stored: int) -> int:
    """Where an item ends in its blob, from its stored end (``-(end + 1)`` marks a ``None`` item)."""
    return stored if stored >= 0 else -stored - 1


class RecordRows(Sequence):
    """Rows of one or more chunks' records, by index, without building a record object per row."""

    def __init__(self, chunks: list[RawRecords], chunk_of: np.ndarray, local: np.ndarray) -> None:
        self.chunks = chunks
        self.chunk_of = chunk_of
        self.local = local

    def __len__(self) -> int:
        return len(self.local)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        return self.chunks[int(self.chunk_of[i])].view(int(self.local[i]))

    def take(self, index: np.ndarray) -> RecordRows:
        return RecordRows(self.chunks, self.chunk_of[index], self.local[index])

    @classmethod
    def concat(cls, parts: Sequence[RecordRows]) -> RecordRows:
        chunks: list[RawRecords] = []
        chunk_of = []
        for part in parts:
            chunk_of.append(part.chunk_of + len(chunks))
            chunks.extend(part.chunks)
        return cls(chunks, np.concatenate(chunk_of) if chunk_of else np.zeros(0, np.int64),
                   np.concatenate([p.local for p in parts]) if parts else np.zeros(0, np.int64))


class SeriesCodes:
    """The child's numbering of series ids: a chunk carries int32 codes and the names new since the last chunk, so
    the member builds no string per row."""

    def __init__(self, limit: int = MAX_CODES) -> None:
        self.limit = limit
        self._codes: dict[str, int] = {}

    def encode(self, series_ids: Sequence[str]) -> tuple[np.ndarray, list[str], bool]:
        """Codes, the new names (in code order) and whether the numbering started over first."""
        reset = len(self._codes) + len(series_ids) > self.limit
        if reset:
            self._codes.clear()
        codes = self._codes
        new: list[str] = []
        out = np.empty(len(series_ids), np.int32)
        for i, sid in enumerate(series_ids):
            code = codes.get(sid)
            if code is None:
                code = codes[sid] = len(codes)
                new.append(sid)
            out[i] = code
        return out, new, reset


class SeriesTable:
    """The member's side of :class:`SeriesCodes`: code -> series id, grown by each chunk's new names."""

    def __init__(self) -> None:
        self._ids = np.empty(1024, object)
        self._n = 0

    def update(self, new: list[str], reset: bool) -> None:
        if reset:
            self._ids[:] = None
            self._n = 0
        need = self._n + len(new)
        if need > len(self._ids):
            grown = np.empty(max(need, 2 * len(self._ids)), object)
            grown[:self._n] = self._ids[:self._n]
            self._ids = grown
        self._ids[self._n:need] = new
        self._n = need

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        return self._ids[codes]


def encode_chunk(partition: int, gen: int, records: Sequence[Any], decoded: DecodedRecords, highwater: int | None,
                 codes: SeriesCodes) -> bytes:
    """One partition's polled records and what they decoded to, as bytes (:func:`decode_chunk` reads them)."""
    n = len(records)
    keys = [r.key for r in records]
    values = [r.value for r in records]
    offsets = np.fromiter((r.offset for r in records), np.int64, n)
    batch = decoded.batch
    sid_codes, new, reset = codes.encode(batch.series_ids.tolist())
    arrays = {
        "offsets": offsets,
        "timestamps": np.fromiter((-1 if r.timestamp is None else r.timestamp for r in records), np.int64, n),
        "key_ends": _ends(keys),
        "value_ends": _ends(values),
        "kept": np.searchsorted(offsets, batch.offsets).astype(np.int32),
        "codes": sid_codes,
        "times": batch.timestamps_ns,
        "values": batch.values,
    }
    letters = [[int(np.searchsorted(offsets, d.position[1])), d.reason, d.detail] for d in decoded.letters]
    header = {"p": partition, "gen": gen, "n": n, "rows": len(batch), "hw": highwater, "letters": letters,
              "new": new, "reset": reset}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    parts = [struct.pack("<I", len(head)), head]
    parts += [np.ascontiguousarray(arrays[name], kind).tobytes() for name, kind in (*_RECORD_ARRAYS, *_ROW_ARRAYS)]
    parts += [b"".join(k for k in keys if k is not None), b"".join(v for v in values if v is not None)]
    return b"".join(parts)


def _ends(items: list[bytes | None]) -> np.ndarray:
    """Cumulative ends of the items in their blob; a ``None`` item's is stored as ``-(end + 1)``."""
    lengths = np.fromiter((0 if b is None else len(b) for b in items), np.int64, len(items))
    ends = np.cumsum(lengths)
    missing = np.fromiter((b is None for b in items), bool, len(items))
    return np.where(missing, -ends - 1, ends) if missing.any() else ends


@dataclass(frozen=True)
class Chunk:
    """A decoded chunk of one partition, as the member reads it."""

    partition: int
    gen: int
    first: int  # offset of the first record
    next: int  # offset after the last record
    count: int
    highwater: int | None
    decoded: DecodedRecords
    epoch: int = 0  # the member's epoch of the partition when this generation started (set on arrival)


def decode_chunk(body: bytes, topic: str, table: SeriesTable) -> Chunk:
    """What :func:`encode_chunk` wrote; ``table`` learns the chunk's new series ids."""
    (size,) = struct.unpack_from("<I", body)
    header = json.loads(body[4:4 + size].decode("utf-8", "surrogatepass"))
    n, rows, p = int(header["n"]), int(header["rows"]), int(header["p"])
    at = 4 + size
    arrays: dict[str, np.ndarray] = {}
    for name, kind in (*_RECORD_ARRAYS, *_ROW_ARRAYS):
        length = n if name in dict(_RECORD_ARRAYS) else rows
        arrays[name] = np.frombuffer(body, kind, length, at)
        at += arrays[name].nbytes
    key_bytes = _end(int(arrays["key_ends"][-1])) if n else 0
    keys, values = body[at:at + key_bytes], body[at + key_bytes:]
    raw = RawRecords(topic, p, arrays, keys, values)
    table.update(header["new"], header["reset"])
    offsets = arrays["offsets"]
    batch = ObservationBatch(table.lookup(arrays["codes"]), arrays["times"], arrays["values"],
                             np.full(rows, p, np.int32), offsets[arrays["kept"]])
    records = RecordRows([raw], np.zeros(rows, np.int64), arrays["kept"].astype(np.int64))
    letters = [DeadLetter(reason, detail, topic, (p, int(offsets[i])), raw.view(i))
               for i, reason, detail in header["letters"]]
    ends = {p: int(offsets[-1]) + 1} if n else {}
    first, nxt = (int(offsets[0]), int(offsets[-1]) + 1) if n else (0, 0)
    return Chunk(p, int(header["gen"]), first, nxt, n, header["hw"], DecodedRecords(batch, records, letters, ends))


# -- the member's side ---------------------------------------------------------------------------------------------
class FetchProcess:
    """The child that fetches and decodes this member's partitions, behind a consumer-like API (module docstring).

    ``consumer_config`` is a group-less kafka-python consumer's keyword arguments (JSON-able, as settings are);
    ``group`` is the group member's consumer, asked for the committed position of a partition restored without one.
    Methods run on the poll thread, except :meth:`forget` (the rebalance listener's thread): a lock keeps the two
    apart. A pause takes effect within one poll of the child (chunks it fetched meanwhile still arrive, as the
    back-pressure allows); a seek or a revocation at once (chunks of the old generation are dropped).
    """

    def __init__(self, consumer_config: Mapping[str, Any], topic: str, max_record_bytes: int, group: Any,
                 epochs: Mapping[int, int] | None = None) -> None:
        self.topic = topic
        self.group = group
        self.epochs = epochs if epochs is not None else {}  # the fetcher's: chunks carry the epoch they began in
        frames_read, frames_write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "tidecast.stream.fetch_process", str(frames_write)],
                                     stdin=subprocess.PIPE, pass_fds=(frames_write,))
        os.close(frames_write)
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin
        self._frames = read_ahead(os.fdopen(frames_read, "rb"), READ_AHEAD, "tidecast-fetch-reader")
        self._lock = threading.Lock()
        self._gen: dict[int, int] = {}  # partition -> its current generation (chunks of others are dropped)
        self._epoch: dict[int, int] = {}  # partition -> the member's epoch when its generation started
        self._fetching: set[int] = set()  # partitions the child fetches
        self._paused: set[int] = set()
        self._pending: dict[int, int] = {}  # partition -> where to start once resumed (a seek before the first resume)
        self._unstarted: set[int] = set()  # resumed, but the group could not say where to start yet
        self._positions: dict[int, int] = {}
        self._highwater: dict[int, int] = {}
        self._table = SeriesTable()
        try:
            config = json.dumps({"consumer": dict(consumer_config), "topic": topic,
                                 "max_record_bytes": max_record_bytes}).encode()
        except TypeError as err:
            raise ValueError(f"--fetch-process needs Kafka settings JSON can hold: {err}") from err
        self._send(b"C", config)

    # -- the consumer's API, as the fetcher uses it ----------------------------------------------------------------
    def poll(self, timeout_ms: int = 100) -> list[tuple[Any, Chunk]]:
        """Chunks that arrived, as ``(TopicPartition, chunk)`` in arrival order, up to ``timeout_ms`` waiting for
        the first."""
        from kafka import TopicPartition

        out: list[tuple[Any, Chunk]] = []
        if self._unstarted:
            with self._lock:
                for p in sorted(self._unstarted - self._paused):
                    self._begin(p)
        try:
            frame = self._frames.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            self._alive()
            return out
        while frame is not None:
            op, body = frame
            if op == b"":  # its end of the pipe closed: it exited, or is about to
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
                raise RuntimeError(f"the fetch process exited (status {self.proc.poll()})")
            if op == b"B":
                chunk = decode_chunk(body, self.topic, self._table)
                with self._lock:
                    current = self._gen.get(chunk.partition) == chunk.gen and chunk.partition in self._fetching
                    if current:
                        self._positions[chunk.partition] = chunk.next
                        if chunk.highwater is not None:
                            self._highwater[chunk.partition] = chunk.highwater
                    epoch = self._epoch.get(chunk.partition, 0)
                if current and chunk.count:
                    out.append((TopicPartition(self.topic, chunk.partition), replace(chunk, epoch=epoch)))
            elif op == b"H":
                self._status(json.loads(body))
            try:
                frame = self._frames.get_nowait()
            except queue.Empty:
                frame = None
        return out

    def pause(self, *tps: Any) -> None:
        with self._lock:
            parts = {tp.partition for tp in tps}
            self._paused |= parts
            if parts & self._fetching:
                self._send(b"P", json.dumps(sorted(parts & self._fetching)).encode())

    def resume(self, *tps: Any) -> None:
        with self._lock:
            parts = {tp.partition for tp in tps}
            self._paused -= parts
            for p in sorted(parts - self._fetching):
                self._begin(p)
            resumed = sorted(parts & self._fetching)
            if resumed:
                self._send(b"R", json.dumps(resumed).encode())

    def seek(self, tp: Any, offset: int) -> None:
        with self._lock:
            p = tp.partition
            if p in self._fetching:
                self._start(p, offset)
                if p in self._paused:
                    self._send(b"P", json.dumps([p]).encode())
            else:
                self._pending[p] = offset

    def position(self, tp: Any, timeout_ms: int | None = None) -> int:
        with self._lock:
            if tp.partition not in self._fetching:
                raise KeyError(f"partition {tp.partition} is not fetched")
            return self._positions[tp.partition]

    def highwater(self, tp: Any) -> int | None:
        with self._lock:
            return self._highwater.get(tp.partition) if tp.partition in self._fetching else None

    def paused(self) -> set[Any]:
        """Paused partitions, counting those assigned to the group but not (yet) fetched (restoring)."""
        with self._lock:
            return {tp for tp in self.group.assignment() if tp.partition not in self._fetching
                    or tp.partition in self._paused}

    # -- the rest ----------------------------------------------------------------------------------------------
    def forget(self, partitions: set[int]) -> None:
        """Stop fetching revoked or lost partitions; chunks of theirs still on the way are dropped."""
        with self._lock:
            stopped = sorted(set(partitions) & self._fetching)
            for p in partitions:
                self._gen[p] = self._gen.get(p, 0) + 1
                self._fetching.discard(p)
                self._paused.discard(p)
                self._pending.pop(p, None)
                self._unstarted.discard(p)
                self._positions.pop(p, None)
                self._highwater.pop(p, None)
            if stopped:  # (a child that died meanwhile stops the member at the next poll, not the listener here)
                with contextlib.suppress(RuntimeError):
                    self._send(b"U", json.dumps(stopped).encode())

    def close(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # (RuntimeError: _send found the child gone)
            self._send(b"S", b"")
            self._stdin.close()
        reap(self.proc, timeout, "fetch process")

    def _begin(self, p: int) -> None:
        """Start fetching a resumed partition where it was sought, else at the group's committed offset (or where
        the reset policy puts it); if the group cannot say now (the cluster unreachable), the next poll asks
        again."""
        offset = self._pending.get(p)
        if offset is None:
            try:
                offset = self.group.position(self._tp(p), timeout_ms=POSITION_TIMEOUT_MS)
            except Exception as err:
                log.warning("no start position for partition %d yet (%s); asking again", p, err)
                self._unstarted.add(p)
                return
        self._pending.pop(p, None)
        self._unstarted.discard(p)
        self._start(p, offset)

    def _start(self, p: int, offset: int) -> None:
        gen = self._gen[p] = self._gen.get(p, 0) + 1
        self._epoch[p] = self.epochs.get(p, 0)
        self._fetching.add(p)
        self._positions[p] = offset
        self._highwater.pop(p, None)
        self._send(b"A", json.dumps({"p": p, "offset": int(offset), "gen": gen}).encode())

    def _status(self, status: dict[str, Any]) -> None:
        with self._lock:
            for key, (gen, position, highwater) in status.items():
                p = int(key)
                if self._gen.get(p) == gen and p in self._fetching:
                    self._positions[p] = position
                    if highwater is not None:
                        self._highwater[p] = highwater

    def _send(self, op: bytes, body: bytes) -> None:
        try:
            write_frame(self._stdin, op, body)
        except BrokenPipeError as err:
            raise RuntimeError(f"the fetch process exited ({self.proc.poll()})") from err

    def _alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"the fetch process exited with status {code}")

    def _tp(self, p: int) -> Any:
        from kafka import TopicPartition

        return TopicPartition(self.topic, p)


# -- the child's side ----------------------------------------------------------------------------------------------
class _Fetching:
    """The child's consumer and what it was told: which partitions, from where, in which generation."""

    def __init__(self, consumer: Any, topic: str) -> None:
        self.consumer = consumer
        self.topic = topic
        self.gen: dict[int, int] = {}
        self.paused: set[int] = set()
        self.next: dict[int, int] = {}

    def apply(self, op: bytes, body: bytes) -> None:
        from kafka import TopicPartition

        if op == b"A":
            order = json.loads(body)
            p = int(order["p"])
            new = p not in self.gen
            self.gen[p] = order["gen"]
            if new:
                self._assign()
            self.consumer.seek(TopicPartition(self.topic, p), int(order["offset"]))
            self.next[p] = int(order["offset"])
            if p in self.paused:  # a new generation starts unpaused unless told otherwise
                self.paused.discard(p)
                self.consumer.resume(TopicPartition(self.topic, p))
        elif op == b"U":
            for p in json.loads(body):
                self.gen.pop(p, None)
                self.next.pop(p, None)
                self.paused.discard(p)
            self._assign()
        elif op in (b"P", b"R"):
            parts = [p for p in json.loads(body) if p in self.gen]
            tps = [TopicPartition(self.topic, p) for p in parts]
            if op == b"P":
                self.consumer.pause(*tps)
                self.paused.update(parts)
            else:
                self.consumer.resume(*tps)
                self.paused.difference_update(parts)

    def _assign(self) -> None:
        from kafka import TopicPartition

        self.consumer.assign([TopicPartition(self.topic, p) for p in sorted(self.gen)])

    @property
    def active(self) -> bool:
        return bool(set(self.gen) - self.paused)

    def status(self) -> dict[str, Any]:
        from kafka import TopicPartition

        return {str(p): [gen, self.next.get(p), self.consumer.highwater(TopicPartition(self.topic, p))]
                for p, gen in self.gen.items()}


def fetch_child(commands: Any, frames: Any) -> int:
    """The child's loop: orders from ``commands``, chunks and status to ``frames``, until ``S`` or the end of input."""
    from kafka import KafkaConsumer

    config = read_config(commands, "fetch process")
    if config is None:
        return 2
    consumer = KafkaConsumer(**client_kwargs(config["consumer"]))
    fetching = _Fetching(consumer, config["topic"])
    codes = SeriesCodes()
    max_bytes = int(config["max_record_bytes"])
    orders = read_ahead(commands, 0, "tidecast-fetch-orders")  # the poll loop never blocks on its pipe
    status_at = 0.0
    try:
        while True:
            wait = 0.0 if fetching.active else 0.1
            while True:
                try:
                    op, body = orders.get(timeout=wait) if wait else orders.get_nowait()
                except queue.Empty:
                    break
                if op in (b"", b"S"):
                    return 0
                fetching.apply(op, body)
                wait = 0.0
            polled = consumer.poll(timeout_ms=50) if fetching.active else {}
            for tp, records in polled.items():
                gen = fetching.gen.get(tp.partition)
                if gen is None or not records:
                    continue
                decoded = decode_records(records, max_bytes)
                fetching.next[tp.partition] = records[-1].offset + 1
                body = encode_chunk(tp.partition, gen, records, decoded, consumer.highwater(tp), codes)
                write_frame(frames, b"B", body)
            if time.monotonic() - status_at >= STATUS_SECONDS:
                status_at = time.monotonic()
                write_frame(frames, b"H", json.dumps(fetching.status()).encode())
    except BrokenPipeError:
        return 0  # the member is gone
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    start_child("fetch process")
    with os.fdopen(int(args[0]), "wb") as frames:
        return fetch_child(sys.stdin.buffer, frames)


if __name__ == "__main__":
    sys.exit(main())
