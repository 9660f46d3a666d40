"""Decoding rules: every bad input has one defined, typed reason."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest

from tidecast.stream.records import (
    REASONS,
    InvalidRecord,
    Observation,
    decode,
    encode,
    from_ns,
    parse_timestamp,
    to_ns,
)

GOOD = {"series_id": "a", "timestamp": "2016-07-01T00:00:00Z", "value": 1.5}


def test_good_record_round_trips_through_the_wire_format():
    obs = decode(json.dumps(GOOD).encode())
    assert obs == Observation("a", datetime(2016, 7, 1, tzinfo=UTC), 1.5)
    assert decode(encode(obs)) == obs


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[1, 2]", "wrong_type"),
        ({**GOOD, "series_id": 7}, "wrong_type"),
        ({**GOOD, "value": [1]}, "wrong_type"),
        ({**GOOD, "value": True}, "wrong_type"),
        ({**GOOD, "timestamp": {"t": 1}}, "wrong_type"),
        ({k: v for k, v in GOOD.items() if k != "value"}, "missing_field"),
        ({k: v for k, v in GOOD.items() if k != "timestamp"}, "missing_field"),
        ({**GOOD, "series_id": ""}, "missing_field"),
        ({**GOOD, "value": None}, "missing_field"),
        ({**GOOD, "value": "abc"}, "non_numeric_value"),
        ({**GOOD, "value": "NaN"}, "non_finite_value"),
        ({**GOOD, "value": float("inf")}, "non_finite_value"),
        (b'{"series_id": "a", "timestamp": 0, "value": NaN}', "non_finite_value"),
        ({**GOOD, "timestamp": "yesterday"}, "bad_timestamp"),
        ({**GOOD, "timestamp": 1e30}, "bad_timestamp"),
        ({**GOOD, "schema_version": 2}, "unknown_schema_version"),
        (b"x" * 70_000, "oversized"),
        (None, "not_json"),  # a Kafka tombstone (was wrong_type, "cannot decode a NoneType")
        (json.dumps(GOOD).encode("utf-16"), "not_json"),  # json.loads alone took UTF-16 and UTF-32
        (json.dumps(GOOD).encode("utf-32"), "not_json"),
        (json.dumps(GOOD).encode("utf-16-le"), "not_json"),
    ],
)
def test_each_bad_input_has_its_reason(raw, reason):
    with pytest.raises(InvalidRecord) as info:
        decode(raw)
    assert info.value.reason == reason
    assert info.value.reason in REASONS
    assert info.value.detail


def test_a_utf8_byte_order_mark_is_ignored():
    assert decode(b"\xef\xbb\xbf" + json.dumps(GOOD).encode()).value == 1.5  # RFC 8259 allows ignoring it


def test_extra_fields_are_ignored_for_forward_compatibility():
    assert decode({**GOOD, "unit": "kW", "site": 3}).value == 1.5


def test_timestamps_are_utc_aware_whatever_the_input_form():
    naive = parse_timestamp("2016-07-01 02:00:00")
    offset = parse_timestamp("2016-07-01T04:00:00+02:00")
    epoch = parse_timestamp(1467338400)
    assert naive == offset == epoch
    assert all(t.tzinfo is UTC for t in (naive, offset, epoch))


def test_nanosecond_conversion_is_exact_to_the_microsecond():
    ts = datetime(2021, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    assert from_ns(to_ns(ts)) == ts
    assert to_ns(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert not math.isnan(decode(GOOD).value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_a_value_json_cannot_hold(value):
    """json.dumps wrote the non-JSON tokens NaN / Infinity, which decode() then refused as non_finite_value."""
    from datetime import datetime

    from tidecast.stream.records import Observation, encode

    with pytest.raises(ValueError, match="not a finite number"):
        encode(Observation("a", datetime(2024, 1, 1, tzinfo=UTC), value))
