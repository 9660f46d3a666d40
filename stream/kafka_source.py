"""The Kafka source's decoding: input records -> an :class:`~tidecast.stream.batch.ObservationBatch` + dead letters.

The counterpart of :mod:`tidecast.stream.sources` for records polled from the input topic (key ``series_id``,
value one JSON observation). Every value goes through :func:`tidecast.stream.records.decode`, so a live stream
and a replayed file reject the same things for the same reasons. A record's position is ``(partition, offset)``;
a rejected record becomes a :class:`~tidecast.stream.sources.DeadLetter` whose ``raw`` is the record itself,
which the Kafka dead-letter sink sends on unchanged.

>>> from types import SimpleNamespace as Rec
>>> recs = [Rec(topic="obs", partition=0, offset=7, value=b'{"series_id":"a","timestamp":0,"value":1}'),
...         Rec(topic="obs", partition=0, offset=8, value=b"{")]
>>> decoded = decode_records(recs)
>>> decoded.batch.series_ids.tolist(), decoded.batch.offsets.tolist(), decoded.ends
(['a'], [7], {0: 9})
>>> [(d.reason, d.position) for d in decoded.letters]
[('not_json', (0, 8))]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.records import (
    DEFAULT_MAX_BYTES,
    REASONS,
    SCHEMA_VERSION,
    InvalidRecord,
    decode,
    parse_timestamp,
    to_ns,
)
from tidecast.stream.sources import DeadLetter

#: Dead-letter reasons only ``serve`` gives, beside :data:`tidecast.stream.records.REASONS`: a record whose batch
#: raised in the engine, or whose forecast could not be encoded. Never a verdict on the data alone: a bug to fix
#: (in tidecast, or in the validation that let the record through); the record can be re-driven once it is fixed.
PROCESSING_ERROR = "processing_error"
SERVE_REASONS = (*REASONS, *(r for r in (PROCESSING_ERROR,) if r not in REASONS))


@dataclass
class DecodedRecords:
    """What a run of input records decoded to.

    batch: the good observations, in record order, with their positions.
    records: the record behind each row of ``batch`` (a later rejection dead-letters it unchanged).
    letters: records that failed to decode.
    ends: partition -> the offset after the last record seen, whatever became of it.
    """

    batch: ObservationBatch
    records: Sequence[Any]
    letters: list[DeadLetter]
    ends: dict[int, int]

    @property
    def count(self) -> int:
        """How many records: each became a row or a letter."""
        return len(self.batch) + len(self.letters)

    @classmethod
    def concat(cls, parts: Sequence[DecodedRecords]) -> DecodedRecords:
        """Runs of records decoded apart, as one (``records`` stay lazy where every part's are of one kind)."""
        if len(parts) == 1:
            return parts[0]
        kinds = {type(p.records) for p in parts}
        kind = kinds.pop() if len(kinds) == 1 else list
        if kind is not list and hasattr(kind, "concat"):
            records: Sequence[Any] = kind.concat([p.records for p in parts])
        else:
            records = [r for p in parts for r in p.records]
        ends: dict[int, int] = {}
        for part in parts:
            ends.update(part.ends)
        return cls(ObservationBatch.concat([p.batch for p in parts]), records,
                   [letter for p in parts for letter in p.letters], ends)


def take_records(records: Sequence[Any], index: np.ndarray) -> Sequence[Any]:
    """The records at ``index``: a view where ``records`` can take one (:class:`~tidecast.stream.fetch_process.
    RecordRows`), else a list."""
    take = getattr(records, "take", None)
    return take(index) if take is not None else [records[i] for i in index.tolist()]


def dead_letter(record: Any, reason: str, detail: str) -> DeadLetter:
    """A rejected input record as a dead letter: the record itself is the raw content."""
    return DeadLetter(reason, detail, str(record.topic), (int(record.partition), int(record.offset)), record)


class _Timestamps:
    """Parsed timestamps by their text: the records of one poll mostly share a few instants (every sensor reports
    at the top of the second, the hour...), so each text is parsed once. Bounded: cleared when full."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._ns: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        ns = self._ns.get(text)
        if ns is None:
            ns = to_ns(parse_timestamp(text))  # raises InvalidRecord: the caller falls back to decode()
            if len(self._ns) >= self.limit:
                self._ns.clear()
            self._ns[text] = ns
        return ns


_TIMESTAMPS = _Timestamps()


def _fast(value: Any, max_bytes: int, loads: Any) -> tuple[str, int, float] | None:
    """The common, valid observation decoded without :func:`decode`'s per-field checks: orjson, a cached timestamp
    parse and type tests; ``None`` for anything unusual, which :func:`decode` then judges (same rules, same
    reasons: orjson refuses NaN literals, lone surrogates and huge integers that the standard parser reads)."""
    if value is None or len(value) > max_bytes:
        return None
    try:
        fields = loads(value)
    except Exception:
        return None
    if type(fields) is not dict:
        return None
    sid, stamp, number = fields.get("series_id"), fields.get("timestamp"), fields.get("value")
    version = fields.get("schema_version")
    version = SCHEMA_VERSION if version is None else version
    # an id that starts or ends with white space may be blank: decode() judges it (missing_field)
    if (type(sid) is not str or not 0 < len(sid) <= 64 or sid[0] == "\0" or sid[0].isspace() or sid[-1].isspace()
            or type(stamp) is not str):
        return None
    if type(number) is not float and type(number) is not int or type(version) is not int or version != SCHEMA_VERSION:
        return None
    number = float(number)
    if number - number != 0.0:  # NaN or +-inf
        return None
    try:
        return sid, _TIMESTAMPS(stamp), number
    except InvalidRecord:
        return None


def decode_records(records: Iterable[Any], max_bytes: int = DEFAULT_MAX_BYTES) -> DecodedRecords:
    """Decode kafka-python ``ConsumerRecord``-like objects (``topic``, ``partition``, ``offset``, ``value``).

    Most records take a fast path (:func:`_fast`); the rest, and every bad one, go through
    :func:`tidecast.stream.records.decode`, so the outcome is the same either way."""
    try:
        import orjson

        loads = orjson.loads
    except ImportError:  # pragma: no cover - orjson is a dependency
        loads = None
    sids, times, values, parts, offsets, kept = [], [], [], [], [], []
    letters: list[DeadLetter] = []
    ends: dict[int, int] = {}
    for rec in records:
        ends[rec.partition] = rec.offset + 1
        fast = _fast(rec.value, max_bytes, loads) if loads is not None else None
        if fast is not None:
            sid, t_ns, value = fast
        else:
            try:
                obs = decode(rec.value, max_bytes)
            except InvalidRecord as err:
                letters.append(dead_letter(rec, err.reason, err.detail))
                continue
            sid, t_ns, value = obs.series_id, obs.timestamp_ns, obs.value
        sids.append(sid)
        times.append(t_ns)
        values.append(value)
        parts.append(rec.partition)
        offsets.append(rec.offset)
        kept.append(rec)
    batch = ObservationBatch(np.array(sids, dtype=object), np.array(times, np.int64), np.array(values, np.float64),
                             np.array(parts, np.int32), np.array(offsets, np.int64))
    return DecodedRecords(batch, kept, letters, ends)
