"""Fuzzing (issue 10): random bytes, random JSON and random field values thrown at ``decode``, at a running engine
and at ``tidecast replay``. Nothing but :class:`InvalidRecord` may escape decode, nothing may escape the engine,
and every row is accounted for: rows in = applied + duplicates + snapped collisions + dead letters + rows still
held (a series seen at one timestamp only). Bounded: a few seconds in all (fixed example counts, no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.cli import main
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.records import (
    MAX_SERIES_ID_BYTES,
    MAX_TIMESTAMP,
    MIN_TIMESTAMP,
    REASONS,
    InvalidRecord,
    Observation,
    decode,
    to_ns,
)

FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies -------------------------------------------------------------------------------------------------------
any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates and controls included
edge_ids = st.sampled_from(["\ud800", "a\udc00", "\0", "\0changelog", "x" * MAX_SERIES_ID_BYTES,
                            "x" * (MAX_SERIES_ID_BYTES + 1), "é" * 129, " ", "a\0b"])
edge_times = st.sampled_from(["2300-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                              "1677-09-21T00:12:43Z", "2262-04-11T00:00:00Z", "2262-04-11T00:00:01Z", 1e11, -1e11,
                              10**400, -(10**30), float("nan"), float("inf"), "", " ", "yesterday", 9_223_286_400])
edge_values = st.sampled_from([1e15, -1e15, 1e16, 1e308, -1e308, 5e-324, 10**400, "1e400", "NaN", "-inf", "", "0x10",
                               " 3.5 ", True, None, [1.0], {"v": 1}])
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(any_text, kids, max_size=4), max_leaves=12)
series_ids = st.one_of(st.sampled_from(["a", "b", "ETTh1/OT"]), any_text, edge_ids, st.integers(), st.none())
timestamps = st.one_of(
    st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31)).map(lambda d: d.isoformat()),
    st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30), timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.integers(-(10**12), 10**12), st.floats(), edge_times, any_text, json_values)
values = st.one_of(st.floats(), st.integers(), st.floats().map(repr), edge_values, any_text, json_values)
fields = st.fixed_dictionaries({"series_id": series_ids, "timestamp": timestamps, "value": values},
                               optional={"schema_version": st.one_of(st.just(1), json_scalars), "extra": json_values})


def _encoded(message: dict) -> bytes:
    return json.dumps(message, allow_nan=True).encode()


def check_decode(raw: object) -> Observation | None:
    """``decode(raw)``: an observation that keeps the rules, or an :class:`InvalidRecord` — never anything else."""
    try:
        obs = decode(raw)  # type: ignore[arg-type]
    except InvalidRecord as err:
        assert err.reason in REASONS and err.detail
        return None
    assert 0 < len(obs.series_id.encode("utf-8")) <= MAX_SERIES_ID_BYTES and not obs.series_id.startswith("\0")
    assert MIN_TIMESTAMP <= obs.timestamp <= MAX_TIMESTAMP and obs.timestamp.tzinfo is not None
    assert np.isfinite(obs.value)
    np.int64(obs.timestamp_ns)  # fits the engine's clock
    return obs


# -- decode -----------------------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=400)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_decode(raw):
    check_decode(raw)


@settings(FUZZ, max_examples=300)
@given(json_values)
def test_random_json_never_escapes_decode(value):
    check_decode(_encoded(value) if not isinstance(value, dict) else value)
    check_decode(_encoded(value))


@settings(FUZZ, max_examples=500)
@given(fields)
def test_random_field_values_never_escape_decode(message):
    check_decode(message)
    check_decode(_encoded(message))


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_mangled_wire_messages_never_escape_decode(data):
    raw = bytearray(_encoded({"series_id": "a", "timestamp": "2016-07-01T00:00:00Z", "value": 1.5}))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=4))
    check_decode(bytes(raw))
    deep = data.draw(st.integers(1, 200_000))
    check_decode(b"[" * deep)  # recursion in json.loads


# -- a running engine -------------------------------------------------------------------------------------------------
T0 = to_ns(datetime(2016, 7, 1, tzinfo=UTC))
NEAR_END = to_ns(MAX_TIMESTAMP) - 6 * 3_600_000_000_000  # forecasts from here would pass the end of time
NEAR_START = to_ns(MIN_TIMESTAMP) + 3_600_000_000_000
rows = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "\ud800", "d" * 300]),
                          st.sampled_from([T0, NEAR_END, NEAR_START]),
                          st.integers(-5, 400),  # minutes after the base: duplicates, out of order, off-grid
                          st.one_of(st.floats(-1e3, 1e3), edge_values, st.floats())),
                min_size=1, max_size=120)


@settings(FUZZ, max_examples=60)
@given(rows, st.sampled_from([None, "1h", "30min", "1min"]), st.integers(1, 6), st.integers(0, 4),
       st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_a_running_engine_takes_whatever_decode_accepts_and_accounts_for_every_row(raw_rows, freq, horizon,
                                                                                 max_gap, cuts):
    accepted = []
    for sid, base, minutes, value in raw_rows:
        stamp = (base + minutes * 60_000_000_000) // 10**9  # epoch seconds, as a producer would send
        obs = check_decode({"series_id": sid, "timestamp": stamp, "value": value})
        if obs is not None:
            accepted.append(obs)
    config = EngineConfig(horizon=horizon, freq=freq, max_gap=max_gap,
                          model_params={"seasonal-naive": {"period": 2}})
    engine = Engine.from_config(config)
    batch = ObservationBatch.from_observations(accepted, [(0, k) for k in range(len(accepted))])
    applied = duplicates = collisions = rejected = 0
    start = 0
    for size in [*cuts, len(accepted)]:
        part = batch.take(np.arange(start, min(start + size, len(accepted))))
        start += len(part)
        for result in (engine.process(part), engine.flush() if start >= len(accepted) else None):
            if result is None:
                continue
            applied += result.n_applied
            duplicates += result.n_duplicates
            collisions += result.n_collisions
            rejected += len(result.rejections)
            assert all(r.reason in REASONS for r in result.rejections)
            f = result.forecasts
            assert ((f.target_ns > f.issued_at_ns) | (len(f) == 0)).all()  # no target wrapped past int64
        if start >= len(accepted):
            break
    assert applied + duplicates + collisions + rejected + engine.held_rows == len(accepted)
    summary = engine.summary()
    assert (summary["n_observations"], summary["n_duplicates"], summary["n_collisions"]) == (
        applied, duplicates, collisions)
    assert engine.metrics.registry.get_sample_value("tidecast_observations_total") == applied


# -- replay end to end ------------------------------------------------------------------------------------------------
def messy_lines(kind: str, n: int, seed: int) -> list[bytes]:
    """``n`` data lines of a long CSV (``unique_id,ds,y``) or JSON lines: mostly good, every kind of bad."""
    rng = np.random.default_rng(seed)
    t = {sid: T0 // 10**9 for sid in "abc"}
    out = []
    for _ in range(n):
        sid = str(rng.choice(list("abc")))
        t[sid] += int(rng.choice([3600, 3600, 3600, 7200, 600, 0]))  # hourly, gaps, snaps, duplicates
        stamp: object = datetime.fromtimestamp(t[sid], UTC).strftime("%Y-%m-%dT%H:%M:%S")
        value: object = round(float(rng.normal(10, 3)), 3)
        fault = rng.integers(0, 24)
        if fault == 0:
            stamp = ""
        elif fault == 1:
            stamp = "junk"
        elif fault == 2:
            stamp = str(rng.choice(["2300-01-01T00:00:00Z", "0001-01-01T00:00:00", "9999-12-31T23:59:59"]))
        elif fault == 3:
            value = str(rng.choice(["abc", "nan", "inf", "", "1e300"]))
        elif fault == 4:
            sid = str(rng.choice(["\0x", "y" * 300]))
        if kind == "csv":
            line = f"{sid},{stamp},{value}".encode()
            if fault == 5:
                line += b",extra"
            elif fault == 6:
                line = line.replace(b",", b',"', 1)
            elif fault == 7:
                line = line[:-1] + b"\xff"
            elif fault == 8:
                line = sid.encode()
        else:
            line = json.dumps({"series_id": sid, "timestamp": stamp, "value": value}).encode()
            if fault == 5:
                line = bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8))
                line = b"#" + line.replace(b"\n", b"?").replace(b"\r", b"?")
            elif fault == 6:
                line = json.dumps([sid, stamp, value]).encode()
            elif fault == 7:
                line = b'{"series_id": "\\ud800", "timestamp": 0, "value": 1}'
            elif fault == 8:
                line = line[:-3]
        out.append(line)
    return out


def test_replay_of_a_messy_csv_and_jsonl_loses_nothing(tmp_path: Path):
    for kind, header in (("csv", [b"unique_id,ds,y"]), ("jsonl", [])):
        data = messy_lines(kind, 600, seed=11)
        path = tmp_path / f"messy.{kind}"
        path.write_bytes(b"\n".join([*header, *data]) + b"\n")
        summary, dead = tmp_path / f"{kind}.json", tmp_path / f"{kind}-dead.jsonl"
        args = ["replay", str(path), "--no-progress", "--horizon", "3", "--summary-json", str(summary),
                "--dead-letter", str(dead), "--model-param", "seasonal-naive.period=2"]
        assert main([*args, *(["--format", "long"] if kind == "csv" else [])]) == 0
        s = json.loads(summary.read_text())
        letters = [json.loads(line) for line in dead.read_text().splitlines()]
        assert len({d["offset"] for d in letters}) == len(letters)  # one letter per bad row
        assert s["n_observations"] + s["n_duplicates"] + s["n_collisions"] + s["n_held"] + len(letters) == \
            len(data), kind
        assert s["n_observations"] > len(data) / 3 and len({d["reason"] for d in letters}) >= 5, kind
        assert sum(s["dead_letters"].values()) == len(letters)
