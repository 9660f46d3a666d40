"""Records: the observation that flows in, the forecast that flows out, and the rules for bad input.

An observation on the wire is a JSON object::

    {"series_id": "ETTh1/OT", "timestamp": "2016-07-01T00:00:00Z", "value": 30.531, "schema_version": 1}

* ``series_id`` is a non-empty string of at most :data:`MAX_SERIES_ID_BYTES` bytes as UTF-8; it may not contain a
  lone surrogate (``"\\ud800"`` cannot be written as a Kafka key) or start with ``"\\0"`` (reserved for the
  changelog's internal keys).
* ``timestamp`` is an ISO-8601 string (no offset means UTC) or a number of seconds since the Unix epoch, between
  :data:`MIN_TIMESTAMP` and :data:`MAX_TIMESTAMP` (what nanoseconds since the epoch in 64 bits hold, the range of
  pandas and of the engine's clock).
* ``value`` is a JSON number; a numeric string (``"30.5"``) is accepted too, since CSV cells are strings.
  Values whose magnitude exceeds the engine's ``max_abs_value`` are rejected by the engine (``out_of_range``,
  see :func:`out_of_range`), so that one setting rules ``replay`` and ``serve`` alike.
* ``schema_version`` is optional (default 1; ``null`` counts as absent). Unknown *extra* fields are ignored, so
  producers can add fields without breaking consumers; an unknown *version* is rejected, because its meaning is
  unknown.

Every rejection is an :class:`InvalidRecord` whose ``reason`` is one of :data:`REASONS` — a small, fixed set, so
it can label a Prometheus counter — and whose ``detail`` says what exactly was wrong.

>>> obs = decode(b'{"series_id": "a", "timestamp": 0, "value": 1.5}')
>>> obs.series_id, obs.timestamp.isoformat(), obs.value
('a', '1970-01-01T00:00:00+00:00', 1.5)
>>> try:
...     decode({"series_id": "a", "timestamp": 0, "value": "NaN"})
... except InvalidRecord as err:
...     print(err.reason)
non_finite_value
>>> try:
...     decode({"series_id": "a", "timestamp": "2300-01-01T00:00:00Z", "value": 1})
... except InvalidRecord as err:
...     print(err)
bad_timestamp: 2300-01-01T00:00:00+00:00 is outside the supported range 1677-09-22T00:00:00Z .. 2262-04-11T00:00:00Z
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
#: Largest accepted message, in bytes. A real observation is ~100 bytes; anything near this is a mistake.
DEFAULT_MAX_BYTES = 64 * 1024
#: Longest series id, in UTF-8 bytes: ids are Kafka keys and state keys; ``dataset/channel`` names need ~30.
MAX_SERIES_ID_BYTES = 256
#: Default of the engine's ``max_abs_value``. Beyond 1e15 a double no longer holds every integer's unit digit,
#: and squares of residuals near 1e154 overflow; sensors, counters and money in cents stay far below it, while
#: sentinel values (1e20, 1e300, DBL_MAX) and corrupted bytes land above it.
DEFAULT_MAX_ABS_VALUE = 1e15

#: The closed set of rejection reasons (bounded Prometheus label values).
REASONS = (
    "not_json",  # bytes that are not UTF-8 JSON
    "wrong_type",  # JSON but not an object, or a field of the wrong JSON type
    "missing_field",  # series_id, timestamp or value absent or null/empty
    "non_numeric_value",  # a string value that is not a number
    "non_finite_value",  # NaN or +-inf
    "bad_timestamp",  # unparsable time, or outside MIN_TIMESTAMP .. MAX_TIMESTAMP
    "bad_series_id",  # not valid UTF-8, longer than MAX_SERIES_ID_BYTES, or starting with "\0"
    "out_of_range",  # |value| above the engine's max_abs_value (decided by the engine)
    "malformed_row",  # a file row that cannot be split into cells: field count, quotes, invalid UTF-8
    "oversized",  # payload larger than max_bytes
    "unknown_schema_version",  # schema_version other than the ones we read
    "out_of_order",  # older than the series' last observation (decided by the engine)
    "unknown_series",  # series not in the configured allow-list (decided by the engine)
    "wrong_partition",  # keyed to another partition than the one its series lives on (decided by serve)
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_US = 1_000
_ONE_US = timedelta(microseconds=1)
#: Supported time range: whole days inside what int64 nanoseconds hold (1677-09-21 .. 2262-04-11), so that
#: ticks and forecast targets near the edges have room.
MIN_TIMESTAMP = datetime(1677, 9, 22, tzinfo=UTC)
MAX_TIMESTAMP = datetime(2262, 4, 11, tzinfo=UTC)
TIMESTAMP_RANGE = (f"{MIN_TIMESTAMP.isoformat().replace('+00:00', 'Z')} .. "
                   f"{MAX_TIMESTAMP.isoformat().replace('+00:00', 'Z')}")


class InvalidRecord(ValueError):
    """A record that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Observation:
    """One value of one series at one instant (timezone-aware, UTC)."""

    series_id: str
    timestamp: datetime
    value: float

    @property
    def timestamp_ns(self) -> int:
        return to_ns(self.timestamp)


@dataclass(frozen=True, slots=True)
class ForecastRecord:
    """One step of one forecast: the interval ``[lower, upper]`` for ``target_timestamp``.

    ``issued_at`` is the forecast origin, the event time of the last observation the model had seen; a consumer
    can de-duplicate on ``(series_id, model, issued_at, h)``.
    """

    series_id: str
    issued_at: datetime
    model: str
    h: int
    target_timestamp: datetime
    mean: float
    lower: float
    upper: float
    alpha: float


def to_ns(ts: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime (exact, microsecond resolution)."""
    return (ts - _EPOCH) // _ONE_US * _NS_PER_US


def from_ns(ns: int) -> datetime:
    """Inverse of :func:`to_ns` (sub-microsecond digits are dropped)."""
    return _EPOCH + timedelta(microseconds=int(ns) // _NS_PER_US)


def parse_timestamp(raw: Any) -> datetime:
    """Parse an ISO-8601 string or epoch seconds into an aware UTC datetime inside the supported range."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise InvalidRecord("missing_field", "timestamp is missing")
    if isinstance(raw, bool):
        raise InvalidRecord("wrong_type", f"timestamp must be a string or a number, got {raw!r}")
    if isinstance(raw, int | float):
        if isinstance(raw, float) and not math.isfinite(raw):
            raise InvalidRecord("bad_timestamp", f"timestamp is not finite: {raw!r}")
        if not _MIN_EPOCH_S <= raw <= _MAX_EPOCH_S:
            raise InvalidRecord("bad_timestamp", f"timestamp {_short_number(raw)} (epoch seconds) is outside the "
                                                 f"supported range {TIMESTAMP_RANGE} ({_MIN_EPOCH_S} .. "
                                                 f"{_MAX_EPOCH_S} s)")
        return _in_range(datetime.fromtimestamp(raw, tz=UTC))
    if not isinstance(raw, str):
        raise InvalidRecord("wrong_type", f"timestamp must be a string or a number, got {type(raw).__name__}")
    text = raw.strip()
    try:
        ts = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except ValueError as err:
        raise InvalidRecord("bad_timestamp", f"unparsable timestamp {raw[:64]!r}") from err
    except OverflowError as err:  # a valid local time whose UTC instant falls outside year 1..9999
        raise InvalidRecord("bad_timestamp", f"{raw[:64]!r} is outside the supported range {TIMESTAMP_RANGE}") \
            from err
    return _in_range(ts)


_MIN_EPOCH_S = int((MIN_TIMESTAMP - _EPOCH).total_seconds())
_MAX_EPOCH_S = int((MAX_TIMESTAMP - _EPOCH).total_seconds())


def _in_range(ts: datetime) -> datetime:
    if not MIN_TIMESTAMP <= ts <= MAX_TIMESTAMP:
        raise InvalidRecord("bad_timestamp", f"{ts.isoformat()} is outside the supported range {TIMESTAMP_RANGE}")
    return ts


def _short_number(raw: int | float) -> str:
    if isinstance(raw, int) and abs(raw).bit_length() > 128:  # repr of a 5000-digit int raises ValueError
        return f"an integer of about {int(abs(raw).bit_length() * 0.30103) + 1} digits"
    return repr(raw)


#: A number as text, the one grammar of every input (:func:`is_number_text`; match it with ``re.ASCII``): one
#: optional sign, ASCII digits with an optional exponent, or a spelled-out infinity or NaN (``float()`` reads each)
NUMBER_TEXT = r"\s*(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?i:inf|infinity|nan))\s*"
_NUMBER = re.compile(NUMBER_TEXT, re.ASCII)


def is_number_text(text: str) -> bool:
    """Whether ``text`` is a number by :func:`parse_value`'s grammar: plain ASCII decimals or a spelled-out
    infinity or NaN, with white space around it.

    >>> [is_number_text(t) for t in (" +1.5e3 ", "1_000", "١٢", "-inf", "1e 5")]
    [True, False, False, True, False]
    """
    return _NUMBER.fullmatch(text) is not None


def parse_value(raw: Any) -> float:
    """A finite float from a JSON number or a numeric string."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise InvalidRecord("missing_field", "value is missing")
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InvalidRecord("wrong_type", f"value must be a number, got {type(raw).__name__}")
    if isinstance(raw, str):
        # plain ASCII decimals only: Python's float() also takes "1_000" and other scripts' digits ("١٢"), which
        # the CSV reader does not; one rule for every input
        raw = raw.strip()  # every Unicode space (a spreadsheet's no-break space), as the CSV reader strips
        if not is_number_text(raw):
            raise InvalidRecord("non_numeric_value", f"value is not a number: {raw[:64]!r}")
        value = float(raw)
    else:
        try:
            value = float(raw)
        except OverflowError as err:  # a JSON integer too large for a double
            raise InvalidRecord("non_finite_value", "value overflows a double") from err
    if not math.isfinite(value):
        raise InvalidRecord("non_finite_value", f"value is {value!r}")
    return value


def parse_series_id(raw: Any) -> str:
    """A series id that can be a Kafka key and a state key: see the module docstring for the rules."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):  # blank, as a CSV cell of spaces is
        raise InvalidRecord("missing_field", "series_id is missing")
    if not isinstance(raw, str):
        raise InvalidRecord("wrong_type", f"series_id must be a string, got {type(raw).__name__}")
    try:
        size = len(raw.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise InvalidRecord("bad_series_id", f"series_id {raw[:64]!r} is not valid UTF-8 ({err.reason} at "
                                             f"character {err.start})") from err
    if size > MAX_SERIES_ID_BYTES:
        raise InvalidRecord("bad_series_id", f"series_id of {size} bytes > limit {MAX_SERIES_ID_BYTES} "
                                             f"({raw[:32]!r}...)")
    if raw.startswith("\0"):
        raise InvalidRecord("bad_series_id", f"series_id {raw[:64]!r} starts with \\0, which is reserved")
    return raw


def out_of_range(values: np.ndarray, max_abs_value: float | None) -> np.ndarray:
    """Mask of values whose magnitude exceeds ``max_abs_value`` (``None`` or 0: no limit).

    >>> out_of_range(np.array([1.0, -2e15, 1e300]), 1e15).tolist()
    [False, True, True]
    """
    if not max_abs_value:
        return np.zeros(len(values), bool)
    return np.abs(values) > max_abs_value


def decode_mapping(fields: Mapping[str, Any]) -> Observation:
    """Validate a mapping with ``series_id``, ``timestamp`` and ``value``."""
    version = fields.get("schema_version")
    version = SCHEMA_VERSION if version is None else version  # null: unset, as producers write optional fields
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidRecord("unknown_schema_version", f"schema_version {version!r} (this reader knows 1)")
    for name in ("series_id", "timestamp", "value"):
        if name not in fields:
            raise InvalidRecord("missing_field", f"{name} is missing")
    return Observation(
        parse_series_id(fields["series_id"]), parse_timestamp(fields["timestamp"]), parse_value(fields["value"])
    )


def decode(raw: bytes | str | Mapping[str, Any], max_bytes: int = DEFAULT_MAX_BYTES) -> Observation:
    """Decode one observation from JSON bytes/text or an already-parsed mapping."""
    if isinstance(raw, Mapping):
        return decode_mapping(raw)
    if raw is None:  # a Kafka record without a value
        raise InvalidRecord("not_json", "no value (a tombstone)")
    if isinstance(raw, bytes | bytearray | memoryview | str):
        # text is measured as the UTF-8 it would be sent as; a lone surrogate has none (strict encoding raised
        # UnicodeEncodeError here): surrogatepass sizes it as 3 bytes, and the checks below judge the record
        size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if size > max_bytes:
            raise InvalidRecord("oversized", f"{size} bytes > limit {max_bytes}")
        try:
            # UTF-8 only (a leading byte-order mark is ignored, as RFC 8259 allows): json.loads would take
            # UTF-16 and UTF-32 bytes too, which the documented wire format is not
            fields = json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8-sig"))
        except (ValueError, RecursionError) as err:  # ValueError: bad JSON, bad UTF-8, a 5000-digit integer
            raise InvalidRecord("not_json", f"{type(err).__name__}: {str(err)[:120]}") from err
        if not isinstance(fields, dict):
            raise InvalidRecord("wrong_type", f"expected a JSON object, got {type(fields).__name__}")
        return decode_mapping(fields)
    raise InvalidRecord("wrong_type", f"cannot decode a {type(raw).__name__}")


def encode(obs: Observation) -> bytes:
    """The wire form of an observation (what ``tidecast produce`` sends). ``ValueError`` for a value that is not a
    finite number: JSON has no NaN or infinity (``json.dumps`` wrote the non-JSON tokens ``NaN``/``Infinity``),
    and :func:`decode` refuses them as ``non_finite_value`` anyway."""
    if not math.isfinite(obs.value):
        raise ValueError(f"series {obs.series_id!r}: value {obs.value} is not a finite number: not sent")
    return json.dumps(
        {
            "series_id": obs.series_id,
            "timestamp": obs.timestamp.isoformat().replace("+00:00", "Z"),
            "value": obs.value,
            "schema_version": SCHEMA_VERSION,
        },
        separators=(",", ":"),
    ).encode()
