"""No poison pills in decode and replay (issue 10): every hostile row, cell and option ends in a dead letter or
one clear error line before any work — never a traceback, never a lost file, never silent loss."""

from __future__ import annotations

import json
import logging
import re
import socket
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tidecast
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.cli import main
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.kafka_source import decode_records
from tidecast.stream.records import (
    MAX_SERIES_ID_BYTES,
    REASONS,
    InvalidRecord,
    decode,
)

HOUR = 3_600_000_000_000
T0 = 1_467_331_200_000_000_000  # 2016-07-01T00:00Z
README = Path(__file__).resolve().parents[1] / "README.md"


def run(tmp_path: Path, *args: str) -> tuple[int, dict | None, list[dict]]:
    """``tidecast replay`` in-process: exit code, summary (if written) and dead letters."""
    summary, dead = tmp_path / "summary.json", tmp_path / "dead.jsonl"
    for path in (summary, dead):
        path.unlink(missing_ok=True)
    rc = main(["replay", *args, "--no-progress", "--summary-json", str(summary), "--dead-letter", str(dead)])
    letters = [json.loads(line) for line in dead.read_text().splitlines()] if dead.exists() else []
    return rc, json.loads(summary.read_text()) if summary.exists() else None, letters


def reasons(letters: list[dict]) -> list[tuple[int, str]]:
    return sorted((d["offset"], d["reason"]) for d in letters)


def rows_accounted(summary: dict, letters: list[dict]) -> int:
    return (summary["n_observations"] + summary["n_duplicates"] + summary["n_collisions"] + summary["n_held"]
            + len(letters))


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


# -- 1. timestamps outside the supported range --------------------------------------------------------------------
FAR = ["2300-01-01T00:00:00Z", 1e11, -1e11, "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
       "0001-01-01T00:00:00+01:00", 10**400]


@pytest.mark.parametrize("timestamp", FAR, ids=str)
def test_timestamps_outside_the_nanosecond_range_are_bad_timestamp_at_decode(timestamp):
    with pytest.raises(InvalidRecord) as info:
        decode({"series_id": "a", "timestamp": timestamp, "value": 1.0})
    assert info.value.reason == "bad_timestamp"
    assert "1677-09-22T00:00:00Z .. 2262-04-11T00:00:00Z" in info.value.detail


def test_the_kafka_source_dead_letters_a_far_timestamp_instead_of_overflowing():
    from types import SimpleNamespace as Rec

    values = [b'{"series_id":"a","timestamp":"2300-01-01T00:00:00Z","value":1}',
              b'{"series_id":"a","timestamp":100000000000,"value":1}', b'{"series_id":"a","timestamp":0,"value":1}']
    decoded = decode_records([Rec(topic="t", partition=0, offset=k, value=v) for k, v in enumerate(values)])
    assert [(d.reason, d.position) for d in decoded.letters] == [("bad_timestamp", (0, 0)), ("bad_timestamp", (0, 1))]
    assert decoded.batch.offsets.tolist() == [2]


def test_steps_past_2262_are_neither_published_nor_counted(tmp_path):
    """A history ending on the last representable hour: the steps whose targets lie after it cannot be written,
    and the summary must not count them either (it counted 3,696 forecasts where --out held 3,371)."""
    end = pd.Timestamp("2262-04-11T00:00:00Z")
    stamps = pd.date_range(end=end, periods=100, freq="h")
    path = tmp_path / "late.csv"
    pd.DataFrame({"ds": stamps.strftime("%Y-%m-%dT%H:%M:%SZ"), "y": np.sin(np.arange(100) / 4)}).to_csv(path,
                                                                                                       index=False)
    out = tmp_path / "out.csv"
    rc, s, _ = run(tmp_path, str(path), "--horizon", "48", "--model-param", "seasonal-naive.period=24", "--out",
                   str(out))
    written = pd.read_csv(out)
    assert rc == 0 and s["models"]["seasonal-naive"]["n_forecasts"] == len(written) > 0
    assert end < pd.to_datetime(written["target_timestamp"], utc=True).max() <= pd.Timestamp.max.tz_localize("UTC")


def test_replay_of_jsonl_with_far_timestamps_dead_letters_those_lines_only(tmp_path):
    path = tmp_path / "far.jsonl"
    lines = [{"series_id": "j", "timestamp": T0 // 10**9 + 3600 * k, "value": float(k)} for k in range(12)]
    lines[3]["timestamp"], lines[7]["timestamp"] = "2300-01-01T00:00:00Z", 1e11
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0
    assert reasons(letters) == [(3, "bad_timestamp"), (7, "bad_timestamp")]
    assert s["n_observations"] == 10


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_far_timestamps_in_a_table_reject_only_their_rows(tmp_path, suffix):
    iso = pd.date_range("2016-07-01", periods=12, freq="h").strftime("%Y-%m-%dT%H:%M:%S").tolist()
    iso[4], iso[9] = "2300-01-01T00:00:00", "0001-01-01T00:00:00"
    epoch = [T0 // 10**9 + 3600 * k for k in range(12)]
    epoch[5] = 1e11
    frames = {"iso": pd.DataFrame({"date": iso, "y": np.arange(12.0)}),
              "epoch": pd.DataFrame({"timestamp": np.array(epoch, float), "y": np.arange(12.0)})}
    for name, frame in frames.items():
        path = tmp_path / f"{name}{suffix}"
        frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
        rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
        assert rc == 0, name
        bad = [4, 9] if name == "iso" else [5]
        assert reasons(letters) == [(row, "bad_timestamp") for row in bad], name
        assert all("supported range" in d["detail"] for d in letters)
        assert s["n_observations"] == 12 - len(bad), name


@pytest.mark.parametrize("tz", ["UTC", None])
@pytest.mark.parametrize("unit", ["ms", "s"])
def test_a_coarse_parquet_time_beyond_microseconds_costs_only_its_row(tmp_path, unit, tz):
    """Java's Long.MAX_VALUE milliseconds (a "no end" sentinel) in a timestamp[ms] column overflowed the
    conversion to microseconds, and the whole file was refused (exit 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    per = {"ms": 1_000, "s": 1}[unit]
    stamps = [(T0 // 10**9 + 3_600 * k) * per for k in range(12)]
    stamps[7] = 2**63 - 1 if unit == "ms" else 10**13
    path = tmp_path / "sentinel.parquet"
    pq.write_table(pa.table({"ds": pa.array(stamps, pa.timestamp(unit, tz=tz)), "y": np.arange(12.0)}), path)
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0 and reasons(letters) == [(7, "bad_timestamp")] and s["n_observations"] == 11
    assert letters[0]["raw"]["ds"].split("-")[0] == {"ms": "292278994", "s": "318857"}[unit]  # the raw cell, kept
    result = tidecast.replay(pd.read_parquet(path), horizon=2)  # the API reads the frame the same way
    assert result.dead_letters["reason"].tolist() == ["bad_timestamp"] and len(result.actuals) == 11


def test_a_datetime_cell_with_an_offset_and_no_utc_time_is_a_dead_letter():
    """Year 1 at +01:00 has no UTC time a datetime can hold: astimezone raised OverflowError out of
    tidecast.replay, whose bad cells "become dead letters, never exceptions" (the wire said bad_timestamp)."""
    berlin = timezone(timedelta(hours=1))
    stamps = [datetime(2024, 1, 1, tzinfo=UTC) + timedelta(hours=k) for k in range(12)]
    stamps[3] = datetime(1, 1, 1, tzinfo=berlin)
    stamps[5] = stamps[5].astimezone(berlin)  # mixed offsets: the column stays one of objects
    frame = pd.DataFrame({"unique_id": "a", "ds": pd.Series(stamps, dtype=object), "y": np.arange(12.0)})
    result = tidecast.replay(frame, horizon=2)
    letters = result.dead_letters
    assert letters["reason"].tolist() == ["bad_timestamp"] and "supported range" in letters["detail"].iloc[0]
    assert len(result.actuals) == 11


def test_a_parquet_decimal_column_of_epoch_seconds_is_read_as_times(tmp_path):
    """A database export's DECIMAL(16,3) epoch seconds: every row was wrong_type ("got Decimal")."""
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    seconds = [decimal.Decimal(T0 // 10**9 + 3_600 * k) + decimal.Decimal("0.250") for k in range(12)]
    path = tmp_path / "decimal.parquet"
    pq.write_table(pa.table({"ts": pa.array(seconds, pa.decimal128(16, 3)), "y": np.arange(12.0)}), path)
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2", "--time-column", "ts")
    assert rc == 0 and letters == [] and s["n_observations"] == 12


def test_a_csv_written_from_a_time_index_reads_its_headerless_first_column_as_the_time(tmp_path):
    """DataFrame.to_csv() of a frame indexed by time leaves the index column's header empty: it was skipped as row
    numbers and the first value column read as epoch seconds (one series, 1970, every row a duplicate)."""
    index = pd.date_range("2024-01-01", periods=48, freq="h", tz="UTC")
    frame = pd.DataFrame({"temp": np.arange(48.0) % 24, "load": 100 + np.arange(48.0)}, index=index)
    path = tmp_path / "indexed.csv"
    frame.to_csv(path)
    assert path.read_text().startswith(",temp,load")
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0 and letters == [] and s["n_series"] == 2 and s["n_observations"] == 96
    assert s["n_duplicates"] == 0
    numbered = tmp_path / "numbered.csv"  # a headerless column of row numbers is still no time
    frame.reset_index(names="ds").to_csv(numbered)
    rc, s, letters = run(tmp_path, str(numbered), "--horizon", "2")
    assert rc == 0 and s["n_series"] == 2 and s["n_observations"] == 96


def hourly_rows(n: int = 48) -> list[str]:
    return [f"2024-01-01T{k % 24:02d}:00:00".replace("01T", f"{1 + k // 24:02d}T", 1) for k in range(n)]


def test_a_long_file_whose_columns_differ_in_case_is_read_as_long(tmp_path):
    """A header Unique_ID,DS,Y was read as a wide file: one channel of the ids, one of series 1's values, the
    other series counted as duplicates - exit 0, no word."""
    stamps = hourly_rows()
    lines = ["Unique_ID,DS,Y"] + [f"{sid},{t},{sid * 100 + k}" for sid in (1, 2, 3) for k, t in enumerate(stamps)]
    path = tmp_path / "upper.csv"
    path.write_text("\n".join(lines) + "\n")
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0 and letters == [] and s["n_series"] == 3 and s["n_observations"] == 144
    assert s["n_duplicates"] == 0


def test_an_exact_time_column_name_wins_over_another_case(tmp_path):
    """Headers DS and ds: the leftmost, DS (times a year later), was taken as the time."""
    stamps = hourly_rows()
    lines = ["DS,ds,load"] + [f"2025{t[4:]},{t},{k}" for k, t in enumerate(stamps)]
    path = tmp_path / "cases.csv"
    path.write_text("\n".join(lines) + "\n")
    result = tidecast.replay(path, horizon=2)
    assert result.actuals["ds"].min() == pd.Timestamp("2024-01-01", tz="UTC")


@pytest.mark.parametrize("sep, says", [(";", "holds ';'s"), ("\t", "holds tabs"), (None, "at least one value")])
def test_a_table_with_no_value_column_is_one_error_line(tmp_path, capsys, sep, says):
    """A ';'- or tab-separated export reads as one column, and a file of times alone has no values: each gave
    "0 observations of 0 series" (or every row a dead letter) and exit 0."""
    stamps = hourly_rows()
    header, rows = ("timestamp", stamps) if sep is None else (f"timestamp{sep}load", [f"{t}{sep}10,5" for t in stamps])
    path = tmp_path / "one_column.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    line = error_line(capsys)
    assert rc == 2 and s is None and "no value column beside the time column" in line and says in line


def test_a_headerless_date_label_does_not_beat_the_real_time_column(tmp_path):
    """A written index of day labels beside the real times: a named column of ISO times ("created_at") or of
    epoch seconds ("epoch") is the time, not the headerless labels (all rows landed on one time)."""
    stamps = [f"2024-01-01T{k:02d}:00:00" for k in range(6)]
    for name, cells in (("created_at", stamps), ("epoch", [1_704_067_200 + 3_600 * k for k in range(6)])):
        lines = [f",{name},load"] + [f"2024-01-01,{c},{k}" for k, c in enumerate(cells)]
        path = tmp_path / f"{name}.csv"
        path.write_text("\n".join(lines) + "\n")
        with pytest.warns(UserWarning, match="no time column named"):
            result = tidecast.replay(path, horizon=2)
        assert result.actuals["ds"].nunique() == 6 and list(result.actuals["unique_id"].unique()) == [f"{name}/load"]
    # ... and a named date label loses to the finer times: epoch seconds first, or a written time index
    for name, head, row in (("epoch_day", "unix_time,local_day,load", "{e},2024-01-01,{k}"),
                            ("index_day", ",day,load", "{t},2024-01-01,{k}")):
        lines = [head] + [row.format(e=1_704_067_200 + 3_600 * k, t=t, k=k) for k, t in enumerate(stamps)]
        path = tmp_path / f"{name}.csv"
        path.write_text("\n".join(lines) + "\n")
        with pytest.warns(UserWarning, match="no time column named"):
            result = tidecast.replay(path, horizon=2)
        assert result.actuals["ds"].nunique() == 6, name


def test_a_csv_header_that_starts_with_a_brace_is_a_header(tmp_path):
    path = tmp_path / "brace.csv"
    path.write_text("{ts},value\n" + "".join(f"2024-01-01T{k:02d}:00:00,{k}\n" for k in range(6)))
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2", "--time-column", "{ts}")
    assert rc == 0 and letters == [] and s["n_observations"] == 6


def test_a_file_that_is_no_csv_says_what_it_is(tmp_path, capsys):
    import gzip

    frame = pd.DataFrame({"ds": hourly_rows(), "y": np.arange(48.0)})
    zipped, parquet, lines = tmp_path / "a.csv.gz", tmp_path / "b.txt", tmp_path / "c.txt"
    zipped.write_bytes(gzip.compress(frame.to_csv(index=False).encode()))
    frame.to_parquet(parquet)
    lines.write_text('{"series_id": "a", "timestamp": "2024-01-01T00:00:00Z", "value": 1}\n')
    for path, says in ((zipped, "gzip-compressed"), (parquet, "is Parquet"), (lines, "holds JSON lines")):
        rc, _, _ = run(tmp_path, str(path), "--horizon", "2")
        assert rc == 2 and says in error_line(capsys), path


def test_a_line_holding_only_a_byte_order_mark_is_blank(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf\nds,y\n" + "".join(f"{t},{k}\n" for k, t in enumerate(hourly_rows())).encode())
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0 and letters == [] and s["n_observations"] == 48


# -- 2. series ids --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("series_id", ["\ud800", "a\udfffb", "\0internal", "x" * (MAX_SERIES_ID_BYTES + 1),
                                       "é" * (MAX_SERIES_ID_BYTES // 2 + 1)], ids=["surrogate", "surrogate-mid",
                                                                                    "nul", "long", "long-utf8"])
def test_series_ids_that_cannot_be_keys_are_bad_series_id(series_id):
    with pytest.raises(InvalidRecord) as info:
        decode(json.dumps({"series_id": series_id, "timestamp": 0, "value": 1}).encode())
    assert info.value.reason == "bad_series_id" and "bad_series_id" in REASONS


def test_series_ids_up_to_the_cap_and_inner_nul_are_fine():
    assert decode({"series_id": "x" * MAX_SERIES_ID_BYTES, "timestamp": 0, "value": 1}).series_id
    assert decode({"series_id": "a\0b", "timestamp": 0, "value": 1}).series_id == "a\0b"


def test_replay_dead_letters_bad_series_ids_in_jsonl_and_long_tables(tmp_path):
    jsonl = tmp_path / "ids.jsonl"
    ok = [json.dumps({"series_id": "ok", "timestamp": 3600 * k, "value": k}) for k in range(10)]
    jsonl.write_text("\n".join([*ok[:5], '{"series_id": "\\ud800", "timestamp": 0, "value": 1}', *ok[5:]]) + "\n")
    rc, s, letters = run(tmp_path, str(jsonl), "--horizon", "2")
    assert rc == 0 and reasons(letters) == [(5, "bad_series_id")] and s["n_observations"] == 10

    # refused ids interleaved: each row's letter names its own id's fault (the rows are found by one factorisation)
    long = pd.DataFrame({"unique_id": ["ok"] * 10 + ["\0x", "y" * 300, "\0x"],
                         "ds": [f"2016-07-01T{k:02d}:00:00" for k in range(13)], "y": np.arange(13.0)})
    for suffix in (".csv", ".parquet"):
        path = tmp_path / f"long{suffix}"
        long.to_parquet(path) if suffix == ".parquet" else long.to_csv(path, index=False)
        rc, s, letters = run(tmp_path, str(path), "--format", "long", "--horizon", "2")
        assert rc == 0 and reasons(letters) == [(k, "bad_series_id") for k in (10, 11, 12)], suffix
        detail = {d["offset"]: d["detail"] for d in letters}
        assert detail[10] == detail[12] != detail[11] and "256" in detail[11], detail
        assert s["n_observations"] == 10 and s["n_series"] == 1


# -- 3. values beyond max_abs_value ---------------------------------------------------------------------------------
def test_values_beyond_max_abs_value_are_out_of_range_and_zero_turns_the_check_off():
    values = [1.0, 1e14, -2e15, 1e300, 5.0]
    batch = ObservationBatch(np.array(["a"] * 5, object), T0 + np.arange(5) * HOUR, np.array(values))
    engine = Engine.from_config(EngineConfig(horizon=2, freq="1h"))
    r = engine.process(batch)
    assert [(j.index, j.reason) for j in r.rejections] == [(2, "out_of_range"), (3, "out_of_range")]
    assert "max_abs_value" in r.rejections[0].detail and r.n_applied == 3
    assert engine.metrics.dead_letters.labels(reason="out_of_range")._value.get() == 2
    off = Engine.from_config(EngineConfig(horizon=2, freq="1h", max_abs_value=0))
    assert off.process(batch).n_applied == 5


def test_replay_dead_letters_out_of_range_values_and_the_limit_is_a_setting(tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"series_id": "b", "timestamp": 3600 * k, "value": 1e20 if k == 6 else k})
                            + "\n" for k in range(12)))
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0 and [d["reason"] for d in letters] == ["out_of_range"] and s["n_observations"] == 11
    assert s["dead_letters"] == {"out_of_range": 1}
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2", "--max-abs-value", "1e21")
    assert rc == 0 and letters == [] and s["n_observations"] == 12
    rc, _, _ = run(tmp_path, str(path), "--max-abs-value", "-1")
    assert rc == 2 and "--max-abs-value" in error_line(capsys)


# -- 4. silent loss in replay -----------------------------------------------------------------------------------------
def test_one_bad_cell_in_an_epoch_time_column_costs_only_its_row(tmp_path):
    rows = [str(T0 // 10**9 + 3600 * k) for k in range(10)]
    rows[2], rows[5], rows[7] = "", "junk", "2016-07-01T07:00:00Z"  # blank, junk, and a valid ISO cell
    path = tmp_path / "epoch.csv"
    path.write_text("timestamp,value\n" + "".join(f"{t},{k}\n" for k, t in enumerate(rows)))
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0
    assert reasons(letters) == [(2, "missing_field"), (5, "bad_timestamp")]
    assert s["n_observations"] == 8  # the ISO cell is a valid time, read by the records module's rules


def test_malformed_csv_lines_are_dead_lettered_with_their_line_number_and_reading_goes_on(tmp_path):
    good = [f"2016-07-01T{k:02d}:00:00,{k},{10 + k}" for k in range(12)]
    lines = [b"date,a,b", *(g.encode() for g in good[:3]),
             b"2016-07-01T03:00:00,3,13,99",  # a field too many
             b'2016-07-01T04:00:00,"4,14',  # a quote left open
             *(g.encode() for g in good[5:7]),
             b"2016-07-01T07:00:00,\xff7,17",  # not UTF-8
             b"2016-07-01T08:00:00,8",  # a field too few
             *(g.encode() for g in good[9:])]
    path = tmp_path / "messy.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0
    assert reasons(letters) == [(3, "malformed_row"), (4, "malformed_row"), (7, "malformed_row"),
                                (8, "malformed_row")]
    assert [d["detail"].split(":")[0] for d in letters] == ["line 5", "line 6", "line 9", "line 10"]
    assert s["n_observations"] == 2 * 8  # the 8 good lines, two channels each


def _strict(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_missing_parquet_cells_cost_only_their_rows_and_dead_letters_stay_strict_json(tmp_path):
    path = tmp_path / "holes.parquet"
    times = [f"2016-07-01T{k:02d}:00:00" for k in range(10)]
    times[3] = None
    values = np.arange(10.0)
    values[6], values[8] = np.nan, np.inf
    pd.DataFrame({"ds": times, "y": values}).to_parquet(path)
    rc, s, _ = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0
    letters = [_strict(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert reasons(letters) == [(3, "missing_field"), (6, "missing_field"), (8, "non_finite_value")]
    assert letters[2]["raw"]["y"] == "inf" and s["n_observations"] == 7


def test_series_ids_are_kept_as_written_in_csv_as_in_json_lines(tmp_path):
    """'OT' and ' OT' are two series wherever they come from (CSV once stripped the id: 100 rows silently counted
    as duplicates of the other series')."""
    stamps = [f"2020-01-01T{k:02d}:00:00" for k in range(12)]
    rows = [(sid, t, k + (100 if sid == " OT" else 0)) for sid in ("OT", " OT") for k, t in enumerate(stamps)]
    (tmp_path / "ids.csv").write_text("unique_id,ds,y\n" + "".join(f"{i},{t},{v}\n" for i, t, v in rows))
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"series_id": i, "timestamp": t, "value": v}) + "\n"
                                                for i, t, v in rows))
    for name in ("ids.csv", "ids.jsonl"):
        rc, s, letters = run(tmp_path, str(tmp_path / name), "--horizon", "1", "--freq", "1h")
        assert rc == 0 and not letters
        assert (s["n_series"], s["n_observations"], s["n_duplicates"]) == (2, 24, 0), name


def test_a_value_string_gets_the_same_verdict_in_csv_and_json_lines(tmp_path):
    """Python's float() takes '1_000' and other scripts' digits, the CSV reader does not: JSON lines (and Kafka)
    accepted them while CSV dead-lettered them as an undocumented wrong_type. One rule: plain ASCII decimals."""
    cells = ["1", "+2", " 3 ", "1e5", "-.5", "1_000", "0x10", "١٢", "1,5", "inf", "+-inf", "--nan"]
    stamps = [f"2020-01-01T{k:02d}:00:00" for k in range(len(cells))]
    (tmp_path / "v.csv").write_text("unique_id,ds,y\n" + "".join(f'a,{t},"{c}"\n' for t, c in zip(stamps, cells,
                                                                                                    strict=True)))
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"series_id": "a", "timestamp": t, "value": c}) + "\n"
                                              for t, c in zip(stamps, cells, strict=True)))
    verdicts = []
    for name in ("v.csv", "v.jsonl"):
        rc, s, letters = run(tmp_path, str(tmp_path / name), "--horizon", "1", "--freq", "1h")
        assert rc == 0 and s["n_observations"] == 5
        verdicts.append(reasons(letters))
    assert verdicts[0] == verdicts[1] == [(5, "non_numeric_value"), (6, "non_numeric_value"),
                                          (7, "non_numeric_value"), (8, "non_numeric_value"), (9, "non_finite_value"),
                                          (10, "non_numeric_value"), (11, "non_numeric_value")]  # two signs: no number


def test_unicode_spaces_around_a_value_get_one_verdict_in_csv_json_lines_and_kafka(tmp_path):
    """A spreadsheet's no-break space: the CSV reader stripped it (every Unicode space) and took the value, while
    JSON lines and Kafka dead-lettered it as non_numeric_value: training history and live stream disagreed."""
    cells = ["\u00a02", "\u30004", "5\u2003", "\u00a0\u00a0"]
    stamps = [f"2020-01-01T{k:02d}:00:00" for k in range(len(cells))]
    (tmp_path / "w.csv").write_text("unique_id,ds,y\n" + "".join(f"a,{t},{c}\n" for t, c in zip(stamps, cells,
                                                                                                 strict=True)))
    records = [json.dumps({"series_id": "a", "timestamp": t, "value": c}) for t, c in zip(stamps, cells, strict=True)]
    (tmp_path / "w.jsonl").write_text("\n".join(records) + "\n")
    verdicts = []
    for name in ("w.csv", "w.jsonl"):
        rc, s, letters = run(tmp_path, str(tmp_path / name), "--horizon", "1", "--freq", "1h")
        assert rc == 0 and s["n_observations"] == 3, name
        verdicts.append(reasons(letters))
    assert verdicts[0] == verdicts[1] == [(3, "missing_field")]  # spaces only: blank
    decoded = decode_records([_Record(0, k, r.encode()) for k, r in enumerate(records[:3])])
    assert decoded.batch.values.tolist() == [2.0, 4.0, 5.0] and not decoded.letters


class _Record:
    """What decode_records reads of a kafka-python ConsumerRecord."""

    def __init__(self, partition: int, offset: int, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.value, self.key, self.timestamp = (
            "t", partition, offset, value, None, 0)


@pytest.mark.parametrize("version", ["", ',"schema_version":1', ',"schema_version":null'])
def test_a_null_schema_version_counts_as_absent_on_both_decode_paths(version):
    """Producers write unset optional fields as null (Jackson, pydantic's model_dump): every record was refused as
    unknown_schema_version, while a null in a required field is missing_field."""
    raw = ('{"series_id":"a","timestamp":"2020-01-01T00:00:00Z","value":1.5' + version + "}").encode()
    assert decode(raw).value == 1.5
    decoded = decode_records([_Record(0, 0, raw)])
    assert decoded.batch.values.tolist() == [1.5] and not decoded.letters


def test_a_refused_jsonl_or_csv_line_is_kept_whole_in_its_dead_letter(tmp_path):
    """A refused line was cut to 1,024 bytes (mid-character, no longer JSON), which cannot be fixed and replayed;
    only a line over the size limit is cut now."""
    pad = "é" * 700
    line = json.dumps({"series_id": "a", "timestamp": "2020-01-01T00:00:00Z", "value": "NaN", "note": pad},
                      ensure_ascii=False)
    good = [json.dumps({"series_id": "a", "timestamp": f"2020-01-01T{k:02d}:00:00Z", "value": k}) for k in range(1, 4)]
    (tmp_path / "l.jsonl").write_text("\n".join([line, *good]) + "\n", encoding="utf-8")
    rc, _, letters = run(tmp_path, str(tmp_path / "l.jsonl"), "--horizon", "1", "--freq", "1h")
    assert rc == 0 and len(line.encode()) > 1024
    assert [d["raw"] for d in letters] == [line]
    csv_line = "2020-01-01T00:00:00,1," + "x" * 1500
    (tmp_path / "c.csv").write_text("ds,y\n" + csv_line + "\n" + "".join(f"2020-01-01T{k:02d}:00:00,{k}\n"
                                                                          for k in range(1, 4)))
    rc, _, letters = run(tmp_path, str(tmp_path / "c.csv"), "--horizon", "1", "--freq", "1h")
    assert rc == 0 and [(d["reason"], d["raw"]) for d in letters] == [("malformed_row", csv_line)]
    huge = b'{"series_id":"caf\xe9","x":"' + "é".encode() * 40_000 + b'"}'  # over 64 KiB, and Latin-1 in it
    (tmp_path / "h.jsonl").write_bytes(huge + b"\n" + "\n".join(good).encode() + b"\n")
    rc, _, letters = run(tmp_path, str(tmp_path / "h.jsonl"), "--horizon", "1", "--freq", "1h")
    assert rc == 0 and [d["reason"] for d in letters] == ["oversized"]
    assert letters[0]["raw"].startswith('{"series_id":"caf\ufffd"')  # the bad byte marked, not dropped
    assert len(letters[0]["raw"].encode()) <= 1024 + 2 and "\ufffd" not in letters[0]["raw"][20:]  # (U+FFFD: 3 bytes)


def test_complex_values_in_a_frame_are_wrong_type_not_their_real_part():
    import tidecast

    frame = pd.DataFrame({"unique_id": "a", "ds": pd.date_range("2020-01-01", periods=30, freq="h"),
                          "y": np.arange(30) + 1j})
    result = tidecast.replay(frame, horizon=1)
    summary = result.run
    assert summary["n_observations"] == 0
    assert summary["dead_letters"] == {"wrong_type": 30}


def test_a_signed_value_is_the_same_double_in_every_file_format_as_on_the_wire(tmp_path):
    """pandas read "+182.19916586263525" a unit in the last place off float()'s value and took "+1e 5" as 1e5, while
    JSON lines and Kafka read the first exactly and refused the second: one text, two values."""
    from tidecast.stream.sources import ReplaySpec, load_frame, load_replay

    cells = ["+182.19916586263525", "+981.9792897376303", "+1.333e-20", "+1e 5", "+2.5E\t3", "+1e5", "7"]
    stamps = [f"2020-01-01T{k:02d}:00:00Z" for k in range(len(cells))]
    records = [json.dumps({"series_id": "a", "timestamp": t, "value": c}) for t, c in zip(stamps, cells, strict=True)]
    (tmp_path / "v.jsonl").write_text("\n".join(records) + "\n")
    (tmp_path / "v.csv").write_text("unique_id,ds,y\n" + "".join(f"a,{t},{c}\n" for t, c in zip(stamps, cells,
                                                                                                 strict=True)))
    frame = pd.DataFrame({"unique_id": "a", "ds": stamps, "y": pd.Series(cells, dtype=object)})
    frame.to_parquet(tmp_path / "v.parquet")
    decoded = decode_records([_Record(0, k, r.encode()) for k, r in enumerate(records)])
    wire = dict(zip(decoded.batch.offsets.tolist(), decoded.batch.values.tolist(), strict=True))
    assert wire == {0: 182.19916586263525, 1: 981.9792897376303, 2: 1.333e-20, 5: 1e5, 6: 7.0}
    assert sorted((d.position[1], d.reason) for d in decoded.letters) == [(3, "non_numeric_value"),
                                                                          (4, "non_numeric_value")]
    for loaded in (*(load_replay(ReplaySpec(path=tmp_path / n)) for n in ("v.csv", "v.parquet", "v.jsonl")),
                   load_frame(frame)):
        obs = loaded.observations
        assert dict(zip(obs.offsets.tolist(), obs.values.tolist(), strict=True)) == wire
        assert sorted(d.reason for d in loaded.dead_letters) == ["non_numeric_value"] * 2


def test_a_cell_with_no_utf8_text_costs_only_its_row():
    """A lone surrogate or undecodable bytes in one value cell (or time cell) raised UnicodeError out of the whole
    load: no dead letters, nothing replayed."""
    from tidecast.stream.sources import load_frame

    stamps = [f"2020-01-01T{k:02d}:00:00Z" for k in range(4)]
    for bad in ("\ud800", b"\xff"):
        loaded = load_frame(pd.DataFrame({"unique_id": "a", "ds": stamps, "y": pd.Series([1.0, bad, "3", 4],
                                                                                        dtype=object)}))
        assert loaded.observations.values.tolist() == [1.0, 3.0, 4.0]
        assert [d.reason for d in loaded.dead_letters] == ["non_numeric_value" if isinstance(bad, str)
                                                          else "wrong_type"]
        for spelling in (stamps, [f"2020/01/01 {k:02d}:00" for k in range(4)]):  # the second: pandas reads it
            times = pd.Series([*spelling[:2], bad, spelling[3]], dtype=object)
            loaded = load_frame(pd.DataFrame({"unique_id": "a", "ds": times, "y": range(4)}))
            assert loaded.observations.values.tolist() == [0.0, 1.0, 3.0]
            assert len(loaded.dead_letters) == 1


def test_epoch_seconds_in_files_are_the_wires_microsecond_and_junk_digits_are_no_time():
    """Files rounded seconds * 1e6 (123.4567895 s -> ...790 µs) where the wire, by datetime.fromtimestamp, reads
    ...789; and a text epoch cell went through float(), which takes "1_000" and other scripts' digits."""
    from tidecast.stream.sources import load_frame

    seconds = [123.4567895, -123.4567895, 86400.0000005, 3613879966.2241974]
    wire = [_us(s) for s in seconds]
    for column in (pd.Series(seconds), pd.Series([repr(s) for s in seconds], dtype=object)):
        loaded = load_frame(pd.DataFrame({"unique_id": [f"s{k}" for k in range(4)], "ds": column, "y": 1.0}))
        assert sorted((loaded.observations.timestamps_ns // 1000).tolist()) == sorted(wire)
    cells = [*(str(1_700_000_000 + 3600 * k) for k in range(4)), "1_000", "\u0661\u0662", "\uff11\uff12\uff13"]
    loaded = load_frame(pd.DataFrame({"unique_id": "a", "ds": pd.Series(cells, dtype=object), "y": 1.0}))
    assert len(loaded.observations) == 4  # a mostly-numeric column: epoch seconds
    assert [d.reason for d in loaded.dead_letters] == ["bad_timestamp"] * 3


def _us(seconds: float) -> int:
    """Microseconds since the epoch of ``datetime.fromtimestamp(seconds)``, the wire's reading."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def test_a_categorical_time_column_mixing_text_and_numbers_loads_cell_by_cell():
    """Its categories mixed str and float: the all-text check's map() returned a Categorical, whose all() raised
    TypeError out of the load."""
    from tidecast.stream.sources import load_frame

    column = pd.Series(["2024-01-01", 2.5], dtype="category")
    loaded = load_frame(pd.DataFrame({"unique_id": "a", "ds": column, "y": [1.0, 2.0]}))
    assert sorted(loaded.observations.values.tolist()) == [1.0, 2.0]  # 2.5: epoch seconds, as a number cell is


def test_parquet_date_columns_are_days_and_times_of_day_are_refused_with_why(tmp_path):
    """date32 is Parquet's type for daily data (pyarrow, polars, Spark, pandas' datetime.date): each day is its
    midnight UTC (every row was a wrong_type dead letter); a time64 cell has no day and is a bad_timestamp."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    days = [dt.date(2024, 1, 1) + dt.timedelta(days=k) for k in range(10)]
    pq.write_table(pa.table({"ds": pa.array(days, pa.date32()), "v": pa.array(range(10), pa.int8())}),
                   tmp_path / "days.parquet")
    out = tmp_path / "out.csv"
    rc, s, letters = run(tmp_path, str(tmp_path / "days.parquet"), "--horizon", "1", "--freq", "1D",
                         "--model-param", "seasonal-naive.period=1", "--out", str(out))
    assert rc == 0 and not letters and s["n_observations"] == 10
    assert pd.Timestamp(pd.read_csv(out)["issued_at"].iloc[0]) == pd.Timestamp("2024-01-01", tz="UTC")
    clocks = [dt.time(k) for k in range(3)]
    pq.write_table(pa.table({"ds": pa.array(clocks, pa.time64("us")), "v": [1.0, 2.0, 3.0]}), tmp_path / "t.parquet")
    rc, s, letters = run(tmp_path, str(tmp_path / "t.parquet"))
    assert rc == 0 and [d["reason"] for d in letters] == ["bad_timestamp"] * 3
    assert letters[0]["detail"].endswith("00:00:00 is a time of day without a date")


@pytest.mark.parametrize("odd", ["2016-07-01T05:00:00,5,15,extra", "2016-07-01T05:00:00,5", "", "   "])
def test_one_odd_line_in_a_clean_csv_costs_at_most_that_line_and_positions_count_lines(tmp_path, odd):
    lines = [f"2016-07-01T{k:02d}:00:00,{k},{10 + k}" for k in range(12)]
    lines[5], lines[8] = odd, "junk,8,18"
    path = tmp_path / "odd.csv"
    path.write_text("date,a,b\n" + "\n".join(lines) + "\n")
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0
    expected = [(5, "malformed_row")] if odd.strip() else []  # a blank line is no row, but keeps its number
    assert reasons(letters) == [*expected, (8, "bad_timestamp")]
    assert s["n_observations"] == 2 * 10


def test_irregular_timestamps_get_a_robust_step_and_no_silent_duplicates(tmp_path):
    rng = np.random.default_rng(3)
    hours = np.delete(np.arange(501), 1).astype(float)  # hour 1 missing: the first gap is two steps
    hours[10:] += rng.uniform(-1 / 3, 1 / 3, 490)  # later times jitter by up to 20 min
    seconds = np.round(hours * 3600).astype(np.int64) + T0 // 10**9
    path = tmp_path / "irregular.csv"
    pd.DataFrame({"timestamp": seconds, "y": rng.normal(size=500)}).to_csv(path, index=False)
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0 and letters == []
    # a step taken from the first gap (2 h) put every other hour on a used tick, counted as duplicates
    assert s["n_duplicates"] == 0 and s["n_collisions"] == 0
    assert s["n_observations"] == 500 and s["n_gap_filled"] == 1


def test_short_series_are_flushed_at_the_end_of_a_replay_on_their_median_step(tmp_path):
    hours = [0, 2, 3, 4, 5]  # first gap 2 h, then hourly
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"series_id": "s", "timestamp": 3600 * h, "value": h}) + "\n"
                            for h in hours) + json.dumps({"series_id": "once", "timestamp": 0, "value": 1}) + "\n")
    rc, s, letters = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0 and letters == []
    assert s["n_observations"] == 5 and s["n_duplicates"] == 0 and s["n_gap_filled"] == 1
    assert s["n_held"] == 1  # a series seen at one timestamp has no step: held, and said so


def test_snapped_collisions_are_counted_apart_from_duplicates_and_warned_once(caplog):
    engine = Engine.from_config(EngineConfig(horizon=2, freq="1h"))
    minutes = [0, 10, 0, 20, 60, 70]  # 00:10 and 00:20 snap onto 00:00's tick; 00:00 again is a duplicate
    batch = ObservationBatch(np.array(["c"] * 6, object), T0 + np.array(minutes) * HOUR // 60, np.arange(6.0))
    with caplog.at_level(logging.WARNING, logger="tidecast.stream.engine"):
        r = engine.process(batch)
    assert (r.n_applied, r.n_duplicates, r.n_collisions) == (2, 1, 3)
    assert engine.summary()["n_collisions"] == 3 and engine.summary()["n_duplicates"] == 1
    registry = engine.metrics.registry
    assert registry.get_sample_value("tidecast_snapped_collisions_total") == 3.0
    assert registry.get_sample_value("tidecast_duplicates_total") == 1.0
    warnings = [rec for rec in caplog.records if "snaps onto" in rec.getMessage()]
    assert len(warnings) == 1 and "'c'" in warnings[0].getMessage()
    # it names the grid tick (00:00) and the observation holding it, and the hint fits a step that was given
    message = warnings[0].getMessage()
    assert "grid tick 2016-07-01T00:00" in message and "--freq / freq= too coarse" in message


def _irregular_batch(n: int, offset: int = 0) -> ObservationBatch:
    hours = np.array([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14][offset:offset + n])
    return ObservationBatch(np.array(["h"] * len(hours), object), T0 + hours * HOUR, hours.astype(float),
                            offsets=np.arange(offset, offset + len(hours)))


def test_held_rows_are_part_of_the_state_and_continue_identically_after_a_restore():
    config = EngineConfig(horizon=2, model_params={"seasonal-naive": {"period": 2}})
    whole = Engine.from_config(config)
    expected = whole.process(_irregular_batch(14)).forecasts.to_frame()

    first = Engine.from_config(config)
    r = first.process(_irregular_batch(3))
    assert r.n_applied == 0 and first.held_rows == 3
    assert first.applied_positions() == {"h": (0, 2)}  # a restart resumes after the held rows
    meta, arrays = first.export_series(first.series_ids)
    second = Engine.from_config(config)
    second.import_series(meta, arrays)
    assert second.held_rows == 3
    got = second.process(_irregular_batch(11, offset=3))
    assert got.n_applied == 14 and second.summary()["n_duplicates"] == 0
    pd.testing.assert_frame_equal(got.forecasts.to_frame(), expected)


def test_state_saved_before_the_step_window_is_read():
    config = EngineConfig(horizon=2, model_params={"seasonal-naive": {"period": 2}})
    engine = Engine.from_config(config)
    engine.process(_irregular_batch(1))
    meta, arrays = engine.export_series(["h"])
    old = {k: v for k, v in arrays.items() if k not in (
        "engine/hold_n", "engine/hold_t", "engine/hold_v", "engine/last_t", "engine/n_collisions")}
    old["engine/held"] = np.array([True])
    old["engine/held_t"], old["engine/held_v"] = np.array([T0]), np.array([0.0])
    restored = Engine.from_config(config)
    restored.import_series(meta, old)
    assert restored.held_rows == 1
    assert restored.process(_irregular_batch(13, offset=1)).n_applied == 14


# -- 5. options that did nothing, or harm ---------------------------------------------------------------------------
@pytest.fixture
def small_csv(tmp_path) -> Path:
    path = tmp_path / "small.csv"
    path.write_text("date,y\n" + "".join(f"2016-07-01T{k:02d}:00:00,{k}\n" for k in range(24)))
    return path


@pytest.mark.parametrize(("args", "named"), [
    (["--batch-size", "-5"], "--batch-size"),
    (["--max-gap", "-1"], "--max-gap"),
    (["--model-param", "seasonl-naive.period=3"], "seasonl-naive"),
])
def test_options_that_did_nothing_are_errors_before_any_work(tmp_path, small_csv, capsys, args, named):
    out = tmp_path / "out.csv"
    rc, summary, _ = run(tmp_path, str(small_csv), "--out", str(out), *args)
    assert rc == 2 and named in error_line(capsys)
    assert summary is None and not out.exists()


@pytest.mark.parametrize("flag", ["--out", "--dead-letter", "--summary-json"])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path, small_csv, capsys, flag):
    before = small_csv.read_bytes()
    given = {"--out": tmp_path / "o.csv", "--dead-letter": tmp_path / "d.jsonl", "--summary-json": tmp_path / "s.json"}
    given[flag] = tmp_path / ".." / tmp_path.name / small_csv.name  # the same file, spelled differently
    rc = main(["replay", str(small_csv), "--no-progress", *(x for k, v in given.items() for x in (k, str(v)))])
    line = error_line(capsys)
    assert rc == 2 and line.startswith(f"error: {flag} ") and "is the input file" in line
    assert small_csv.read_bytes() == before


# -- 6. user mistakes: one clear line, non-zero exit ------------------------------------------------------------------
def test_a_directory_as_path_is_one_line(tmp_path, capsys):
    rc, _, _ = run(tmp_path, str(tmp_path))
    assert rc == 2 and "is a directory" in error_line(capsys)


def test_a_huge_horizon_is_refused_with_its_memory_cost(tmp_path, small_csv, capsys):
    rc, _, _ = run(tmp_path, str(small_csv), "--horizon", "100000")
    line = error_line(capsys)
    assert rc == 2 and "--horizon 100000" in line and "at most 1000" in line and "GB at H=100000" in line


@pytest.mark.parametrize(("param", "named"), [
    ("foo", "foo"),
    ("seasonal-naive.bogus=1", "bogus"),
    ("seasonal-naive.period=abc", "period"),
    ("seasonal-naive.period=0", "period = 0"),
    ("seasonal-naive.period=-5", "period = -5"),
    ("seasonal-naive.detect_after=1", "detect_after = 1"),
])
def test_bad_model_parameters_are_one_line_naming_the_parameter(tmp_path, small_csv, capsys, param, named):
    out = tmp_path / "out.csv"
    rc, _, _ = run(tmp_path, str(small_csv), "--model-param", param, "--out", str(out))
    assert rc == 2 and named in error_line(capsys) and not out.exists()


@pytest.mark.parametrize(("model", "param"), [("holt-winters", "alpha=1.5"), ("holt-winters", "max_period=0"),
                                              ("snarimax", "p=-1"), ("snarimax", "lr=0"),
                                              ("holt-winters", "beta=0"),  # once accepted, then a failed first fit
                                              ("snarimax", "lr=Infinity"), ("cfc", "seed=-1"),
                                              ("cyclenet", "seed=-1"),  # numpy's message, without the key
                                              ("cfc", "replay_window=1000000000000"),  # 58 TiB asked for
                                              ("cfc", "members=1000000")])  # grew until killed
def test_river_model_parameters_are_checked_by_their_factories(tmp_path, small_csv, capsys, model, param):
    rc, _, _ = run(tmp_path, str(small_csv), "--model", f"m={model}", "--model-param", f"m.{param}")
    assert rc == 2 and f"lane 'm' ({model}): {param.split('=')[0]} = " in error_line(capsys)


def test_list_parameters_and_a_long_horizon_say_what_to_give(tmp_path, small_csv, capsys):
    rc, _, _ = run(tmp_path, str(small_csv), "--model", "c=cfc", "--model-param", "c.periods=24")
    assert rc == 2 and "c.periods = 24: expected a list of int (e.g. [24, 168])" in error_line(capsys)  # a traceback
    rc, _, _ = run(tmp_path, str(small_csv), "--model", "cfc", "--horizon", "200")
    assert rc == 2 and re.search(r"warm_start=\d+ is the least that passes", error_line(capsys))


def test_metrics_port_out_of_range_or_in_use_is_one_line(tmp_path, small_csv, capsys):
    rc, _, _ = run(tmp_path, str(small_csv), "--metrics-port", "99999")
    assert rc == 2 and "--metrics-port 99999" in error_line(capsys)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, summary, _ = run(tmp_path, str(small_csv), "--metrics-port", str(port))
        assert rc == 2 and f"--metrics-port {port}" in error_line(capsys) and summary is None


def test_a_parquet_list_column_is_one_line_naming_the_column(tmp_path, capsys):
    path = tmp_path / "lists.parquet"
    pd.DataFrame({"ds": pd.date_range("2016-07-01", periods=3, freq="h"), "y": [[1.0, 2.0], [3.0], [4.0]]}
                 ).to_parquet(path)
    rc, _, _ = run(tmp_path, str(path))
    assert rc == 2 and "column 'y'" in error_line(capsys)


def test_an_unknown_freq_names_the_option(tmp_path, small_csv, capsys):
    rc, _, _ = run(tmp_path, str(small_csv), "--freq", "abc")
    assert rc == 2 and "--freq abc" in error_line(capsys)


def test_an_unwritable_summary_is_found_before_the_run(tmp_path, small_csv, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "out.csv"
    rc = main(["replay", str(small_csv), "--no-progress", "--out", str(out),
               "--summary-json", str(blocker / "summary.json")])
    assert rc == 2 and "--summary-json" in error_line(capsys)
    assert not out.exists()  # nothing was replayed


# -- 7. the metrics server binds what it prints -----------------------------------------------------------------------
def test_replay_metrics_listen_where_they_say_loopback_by_default(tmp_path, small_csv, capsys, monkeypatch):
    import prometheus_client

    bound = []
    real = prometheus_client.start_http_server

    def recording(port, addr="0.0.0.0", **kw):
        server, thread = real(port, addr=addr, **kw)
        bound.append(server.server_address[:2])
        return server, thread

    monkeypatch.setattr(prometheus_client, "start_http_server", recording)
    for extra, address in (([], "127.0.0.1"), (["--metrics-address", "0.0.0.0"], "0.0.0.0")):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        rc, _, _ = run(tmp_path, str(small_csv), "--metrics-port", str(port), *extra)
        assert rc == 0
        assert bound[-1] == (address, port)
        assert f"metrics on http://{address}:{port}/metrics" in capsys.readouterr().out


# -- 9. README --------------------------------------------------------------------------------------------------------
def test_readme_bad_input_table_names_every_reason():
    text = README.read_text()
    section = text[text.index("## Time, order and bad input"):text.index("## `tidecast replay`")]
    missing = [reason for reason in REASONS if f"`{reason}`" not in section]
    assert not missing, f"README's bad-input table does not say what happens for {missing}"
    for case in ("surrogate", "median", "collision", "--max-abs-value", "line number", "2262-04-11"):
        assert case in section, case


# -- found by the replay-input review (2026-12-04) ----------------------------------------------------------
def test_a_null_in_a_parquet_integer_id_column_costs_only_its_row(tmp_path):
    """pandas reads an int64 column with a null as float64: every id became '1.0', and ids above 2**53 rounded, so
    9007199254740993 and 9007199254740992 merged into one series (one of its rows then counted a duplicate)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ids.parquet"
    stamps = [pd.Timestamp("2024-01-01") + pd.Timedelta(hours=h) for h in (0, 1, 2, 0, 0, 2)]
    pq.write_table(pa.table({"unique_id": pa.array([1, 1, 1, 2**53 + 1, 2**53, None], pa.int64()),
                             "ds": pa.array(stamps, pa.timestamp("us")), "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}), path)
    rc, s, _ = run(tmp_path, str(path), "--horizon", "2", "--freq", "1h")
    assert rc == 0
    assert (s["n_series"], s["n_observations"], s["n_duplicates"]) == (3, 5, 0)
    assert s["dead_letters"] == {"missing_field": 1}
    from tidecast.stream.sources import ReplaySpec, load_replay

    ids = set(load_replay(ReplaySpec(path=path)).observations.series_ids.tolist())
    assert ids == {"1", str(2**53 + 1), str(2**53)}


def test_undecodable_bytes_cost_only_their_row_and_an_unused_binary_column_nothing(tmp_path):
    """A binary cell that is no UTF-8 (raw UUID bytes) ended the whole replay with "'utf-8' codec can't decode",
    naming neither file nor column, even in a column the replay never reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stamps = pa.array([pd.Timestamp("2024-01-01") + pd.Timedelta(hours=h) for h in range(4)], pa.timestamp("us"))
    extra = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"unique_id": ["a"] * 4, "ds": stamps, "y": [1.0, 2.0, 3.0, 4.0],
                             "uuid": pa.array([bytes([0xFF, k]) for k in range(4)], pa.binary())}), extra)
    rc, s, _ = run(tmp_path, str(extra), "--horizon", "2", "--freq", "1h")
    assert rc == 0 and s["n_observations"] == 4 and s["dead_letters"] == {}
    ids = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"unique_id": pa.array([b"a", b"\xff", b"a", b"a"], pa.binary()), "ds": stamps,
                             "y": [1.0, 2.0, 3.0, 4.0]}), ids)
    rc, s, _ = run(tmp_path, str(ids), "--horizon", "2", "--freq", "1h")
    assert rc == 0 and s["n_observations"] == 3 and s["dead_letters"] == {"bad_series_id": 1}


def test_a_blank_series_id_is_missing_in_json_lines_as_in_csv(tmp_path):
    """' ' was a series from JSON lines (and Kafka) but a missing_field dead letter from CSV."""
    with pytest.raises(InvalidRecord, match="missing_field"):
        decode(b'{"series_id": "  ", "timestamp": 0, "value": 1}')
    path = tmp_path / "blank.jsonl"
    path.write_text('{"series_id": " ", "timestamp": 0, "value": 1}\n{"series_id": "\\t", "timestamp": 3600, '
                    '"value": 2}\n')
    rc, s, _ = run(tmp_path, str(path), "--horizon", "2")
    assert rc == 0 and s["n_observations"] == 0 and s["dead_letters"] == {"missing_field": 2}


@pytest.mark.parametrize("blank", [" ", "   ", "\t", "\u3000", "\xa0"], ids=repr)
def test_the_kafka_fast_path_dead_letters_a_blank_series_id_as_decode_does(blank):
    """Found by the serve-path review (2026-12-04): the fast path checked only the id's length, so serve kept a
    series " " and forecast it where replay and decode() say missing_field. Ids merely padded stay as written."""
    from types import SimpleNamespace as Rec

    values = [json.dumps({"series_id": sid, "timestamp": "2024-01-01T00:00:00Z", "value": 1.0}).encode()
              for sid in (blank, f" a{blank}", "b")]
    decoded = decode_records([Rec(topic="t", partition=0, offset=k, value=v) for k, v in enumerate(values)])
    assert [d.reason for d in decoded.letters] == ["missing_field"]
    assert decoded.batch.series_ids.tolist() == [f" a{blank}", "b"]


def test_decode_of_text_with_a_lone_surrogate_is_judged_not_raised():
    """decode() takes text too: sizing it by strict UTF-8 let a UnicodeEncodeError out of a lone surrogate."""
    assert decode('{"series_id": "a", "timestamp": 0, "value": 1, "note": "\ud800"}').series_id == "a"
    with pytest.raises(InvalidRecord) as info:
        decode('{"series_id": "\ud800", "timestamp": 0, "value": 1}')
    assert info.value.reason == "bad_series_id"


def test_a_dead_letters_source_timestamp_header_is_the_same_with_the_fetch_process():
    """kafka-python gives -1 for a record without a timestamp, the fetch process's record view None: the header
    read '-1' in one and 'None' in the other."""
    from types import SimpleNamespace as Rec

    from tidecast.stream.kafka import dead_letter_message, header_dict

    for stamp in (-1, None):
        record = Rec(topic="t", partition=0, offset=5, timestamp=stamp, key=None, value=b"x")
        headers = header_dict(dead_letter_message(record, "not_json", "bad", 1000).headers)
        assert headers["tidecast.source.timestamp"] == "-1"
