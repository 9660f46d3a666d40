"""Offline replay end to end: real data, both file layouts, bad rows, and live metrics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tidecast
from tidecast.stream.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ETTH1 = DATA / "ETTh1.csv"
SAMPLE = Path(__file__).resolve().parents[1] / "stream" / "data" / "nyc_taxi.csv"


def replay(tmp_path: Path, *args: str) -> dict:
    summary = tmp_path / f"summary-{len(list(tmp_path.iterdir()))}.json"
    assert main(["replay", *args, "--summary-json", str(summary), "--no-progress",
                 "--dead-letter", str(tmp_path / "dead.jsonl")]) == 0
    return json.loads(summary.read_text())


@pytest.mark.slow
def test_etth1_two_models_hold_ninety_percent_coverage(tmp_path):
    s = replay(tmp_path, str(ETTH1), "--model", "seasonal-naive,holt-winters", "--horizon", "24", "--alpha", "0.1")
    assert set(s["models"]) == {"seasonal-naive", "holt-winters"}
    for name, m in s["models"].items():
        assert abs(m["coverage"] - 0.90) <= 0.02, (name, m["coverage"])
        assert len(m["by_horizon"]) == 24
    assert s["n_observations"] == 17_420 * 7
    assert s["dead_letters"] == {}


def _long_prefix(tmp_path: Path, rows: int, suffix: str) -> Path:
    wide = pd.read_csv(ETTH1).iloc[:rows]
    long = wide.melt(id_vars="date", var_name="channel", value_name="y")
    long["unique_id"] = "ETTh1/" + long.pop("channel")
    long = long.rename(columns={"date": "ds"})[["unique_id", "ds", "y"]]  # Nixtla layout: sorted by series
    path = tmp_path / f"ETTh1_long{suffix}"
    long.to_parquet(path) if suffix == ".parquet" else long.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_long_format_gives_identical_summary_numbers(tmp_path, suffix):
    rows = 2000
    wide = tmp_path / "ETTh1.csv"
    pd.read_csv(ETTH1).iloc[:rows].to_csv(wide, index=False)
    args = ["--model", "seasonal-naive,holt-winters", "--horizon", "12"]
    a = replay(tmp_path, str(wide), *args)
    b = replay(tmp_path, str(_long_prefix(tmp_path, rows, suffix)), "--format", "long", *args)
    assert a["models"]["seasonal-naive"]["n_scored"] > 0
    assert a["models"] == b["models"]
    assert a["n_observations"] == b["n_observations"] == rows * 7


BAD_WIDE = """date,a,b
2020-01-01 00:00:00,1.0,10.0
2020-01-01 01:00:00,2.0,11.0
,3.0,12.0
not-a-time,3.0,12.0
2020-01-01 02:00:00,abc,12.0
2020-01-01 03:00:00,nan,13.0
2020-01-01 04:00:00,inf,14.0
2020-01-01 05:00:00,,15.0
2020-01-01 06:00:00,{big},16.0
2020-01-01 07:00:00,7.0,17.0
2020-01-01 07:00:00,7.5,17.5
2020-01-01 08:00:00,8.0,18.0
"""

BAD_JSONL = [
    '{"series_id": "j", "timestamp": "2020-01-01T00:00:00Z", "value": 1}',
    '{"series_id": "j", "timestamp": "2020-01-01T01:00:00Z", "value": 2}',
    "this is not json",
    '{"series_id": 5, "timestamp": "2020-01-01T02:00:00Z", "value": 3}',
    '{"series_id": "j", "timestamp": "2020-01-01T02:00:00Z"}',
    '{"series_id": "j", "timestamp": "2020-01-01T02:00:00Z", "value": 3, "schema_version": 9}',
    '{"series_id": "j", "timestamp": "2020-01-01T03:00:00Z", "value": 4}',
    '{"series_id": "j", "timestamp": "2020-01-01T00:30:00Z", "value": 9}',
]


def _dead(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]


def test_a_model_that_never_forecast_is_explained_at_the_end(tmp_path, capsys):
    """ETTh1's first 450 hours: cyclenet's first fit waits for 2,000 observations of a series, so its row is
    empty, and the summary (printed and in the JSON) says so with the numbers; seasonal naive forecast."""
    path = tmp_path / "short.csv"
    pd.read_csv(ETTH1, usecols=["date", "OT"]).iloc[:450].to_csv(path, index=False)
    s = replay(tmp_path, str(path), "--model", "seasonal-naive,cyclenet")
    assert s["models"]["cyclenet"]["n_series_without_forecast"] == 1
    assert s["models"]["seasonal-naive"]["n_series_without_forecast"] == 0
    assert s["max_series_observations"] == 450
    assert s["notes"] == ["cyclenet: 1 of 1 series never forecast; a series needs 2,000 observations first "
                          "(warm_start=2000: the first fit waits for a series that long; after it, a new series "
                          "joins with lookback + horizon = 120); the longest series here has 450"]
    printed = " ".join(capsys.readouterr().out.split())
    assert "note: cyclenet: 1 of 1 series never forecast" in printed and "seasonal-naive:" not in printed


def test_the_note_counts_gap_resets_that_restarted_histories(tmp_path):
    """Two stretches of 300 hours with 100 hours missing between them (longer than max_gap = H): 600
    observations, but seasonal naive's history restarted after the gap and neither stretch reaches 402."""
    frame = pd.read_csv(ETTH1, usecols=["date", "OT"])
    path = tmp_path / "gap.csv"
    pd.concat([frame.iloc[:300], frame.iloc[400:700]]).to_csv(path, index=False)
    s = replay(tmp_path, str(path))
    assert s["n_resets"] == 1 and s["max_series_observations"] == 600
    assert s["notes"][0].endswith("the longest series here has 600, and 1 gap longer than max_gap restarted a "
                                  "history (is the time column right? --freq / freq=, --max-gap / max_gap=)")


def test_most_rows_repeating_a_timestamp_is_a_note_even_when_every_lane_forecasts(tmp_path):
    """Notes review (2026-12-05): a file with Date and Time columns read Date as the time; 1,380 of 1,440 hourly rows
    were skipped as duplicates, and as long as the lane still forecast (a configured period) no note said so."""
    hours = pd.date_range("2024-01-01", periods=24 * 60, freq="h")
    path = tmp_path / "split.csv"
    pd.DataFrame({"Date": hours.strftime("%Y-%m-%d"), "Time": hours.strftime("%H:%M"),
                  "load": np.sin(np.arange(hours.size))}).to_csv(path, index=False)
    s = replay(tmp_path, str(path), "--model-param", "seasonal-naive.period=7")
    assert s["n_duplicates"] == 1380 and s["models"]["seasonal-naive"]["n_forecasts"] > 0
    assert s["notes"] == ["1,380 rows repeated their series' last timestamp (is the time column right? --time-column "
                          "/ time_column=), more than the 60 applied"]


def test_every_malformed_row_is_dead_lettered_with_its_reason(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(BAD_WIDE.format(big="9" * 70_000))
    s = replay(tmp_path, str(path), "--horizon", "2", "--model-param", "seasonal-naive.period=1")
    letters = _dead(tmp_path)
    by_row = {(d["offset"], d["reason"]) for d in letters}
    assert by_row == {(2, "missing_field"), (3, "bad_timestamp"), (4, "non_numeric_value"),
                      (5, "non_finite_value"), (6, "non_finite_value"), (7, "missing_field"), (8, "oversized")}
    assert all(d["raw"] and d["detail"] and d["source"] == str(path) for d in letters)
    assert s["dead_letters"] == {"missing_field": 2, "bad_timestamp": 1, "non_numeric_value": 1,
                                 "non_finite_value": 2, "oversized": 1}
    assert s["n_duplicates"] == 2  # row 10 repeats 07:00 for both channels
    # the good cells of partly bad rows went on: 8 good rows for b, 4 for a
    assert s["n_observations"] == 12  # the oversized row takes both of its channels


def test_jsonl_replay_shares_the_wire_rules(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_JSONL) + "\n")
    s = replay(tmp_path, str(path), "--horizon", "1", "--model-param", "seasonal-naive.period=1")
    assert s["dead_letters"] == {"not_json": 1, "wrong_type": 1, "missing_field": 1, "unknown_schema_version": 1}
    # The 00:30 line sorts into time order, so it is not out of order in a replay; it snaps to the hourly grid
    # and duplicates 01:00 — out-of-order handling is exercised by the engine and Kafka tests.
    assert s["n_observations"] + s["n_duplicates"] == 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        return response.read().decode()


def _value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_are_served_during_a_replay(tmp_path):
    port = _free_port()
    bad = tmp_path / "taxi.csv"
    lines = SAMPLE.read_text().splitlines()
    bad.write_text("\n".join([*lines[:3], "2014-07-01 01:00:00,oops", *lines[3:]]) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidecast.stream.cli", "replay", str(bad), "--metrics-port", str(port), "--rate", "2500",
         "--no-progress", "--dead-letter", str(tmp_path / "dead.jsonl"), "--linger", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        text, deadline = "", time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                text = _scrape(port)
            except OSError:
                continue
            seen = _value(text, "tidecast_observations_total") or 0
            if 0 < seen < 10_320 and "tidecast_interval_coverage_ratio{" in text:
                break
        else:
            pytest.fail(f"no mid-replay scrape with coverage gauges; last:\n{text[-2000:]}")
        assert _value(text, "tidecast_forecasts_total") > 0
        assert _value(text, 'tidecast_dead_letters_total{reason="non_numeric_value"}') == 1.0
        assert 'tidecast_interval_coverage_ratio{horizon="1",level="90",model="seasonal-naive"}' in text
        assert 'tidecast_interval_width{horizon="24",level="90",model="seasonal-naive"}' in text
        assert "tidecast_processing_seconds_bucket" in text
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_forecast_records_are_written_with_the_record_schema(tmp_path, suffix):
    out = tmp_path / f"forecasts{suffix}"
    sample = tmp_path / "nyc_taxi.csv"
    sample.write_text("\n".join(SAMPLE.read_text().splitlines()[:1500]) + "\n")
    s = replay(tmp_path, str(sample), "--model", "seasonal-naive", "--horizon", "3", "--out", str(out))
    frame = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
    assert list(frame.columns) == ["series_id", "issued_at", "model", "h", "target_timestamp", "mean", "lower",
                                   "upper", "alpha", "lo-90", "hi-90"]  # every level's bounds: here the one
    assert frame["lo-90"].equals(frame["lower"]) and frame["hi-90"].equals(frame["upper"])
    assert len(frame) == s["models"]["seasonal-naive"]["n_forecasts"]
    issued = pd.to_datetime(frame["issued_at"], utc=True)
    target = pd.to_datetime(frame["target_timestamp"], utc=True)
    assert ((target - issued) == frame["h"] * pd.Timedelta("30min")).all()  # the bundled sample is 30-minutely
    has_interval = frame["lower"].notna()  # NaN bounds: issued before the calibrator had data
    assert (has_interval == frame["upper"].notna()).all() and has_interval.mean() > 0.9
    assert (frame["lower"][has_interval] <= frame["upper"][has_interval]).all()
    assert set(frame["series_id"]) == {"nyc_taxi/value"}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_run_that_forecasts_nothing_leaves_no_earlier_runs_rows_in_its_outputs(tmp_path, suffix):
    out, letters = tmp_path / f"out{suffix}", tmp_path / "dead.jsonl"
    assert main(["replay", str(SAMPLE), "--horizon", "2", "--out", str(out), "--no-progress",
                 "--dead-letter", str(letters)]) == 0
    before = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert len(before) > 1000
    letters.write_text('{"reason": "from an earlier run"}\n')
    one = tmp_path / "one.csv"
    one.write_text("timestamp,value\n2024-01-01 00:00,1.0\n")  # one value: nothing to forecast, nothing refused
    assert main(["replay", str(one), "--horizon", "2", "--out", str(out), "--no-progress",
                 "--dead-letter", str(letters)]) == 0
    after = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert len(after) == 0 and list(after.columns)[:3] == list(before.columns)[:3]
    assert letters.read_text() == ""


def test_columns_without_a_header_name_no_series(tmp_path):
    """``DataFrame.to_csv()`` writes the row numbers under an empty header; a trailing comma on every line makes an
    empty last column. Neither is a series."""
    frame = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=60, freq="h").astype(str),
                          "A": [float(k % 4) for k in range(60)]})
    indexed = tmp_path / "indexed.csv"
    frame.to_csv(indexed)  # header ",date,A"
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("".join(line + ",\n" for line in frame.to_csv(index=False).splitlines()))
    for path in (indexed, trailing):
        s = replay(tmp_path, str(path), "--horizon", "2", "--model-param", "seasonal-naive.period=4")
        assert s["n_observations"] == 60 and s["dead_letters"] == {}, path.name


def test_an_out_file_it_cannot_write_is_refused_before_anything_is_made(tmp_path, capsys):
    folder = tmp_path / "new"
    assert main(["replay", str(SAMPLE), "--out", str(folder / "x.txt"), "--no-progress"]) == 2
    assert "--out must end in .parquet or .csv" in capsys.readouterr().err
    assert not folder.exists()


def test_produce_counts_the_skipped_rows_among_the_rows_it_sends_only(tmp_path) -> None:
    """``tidecast produce --rows N`` reported every bad row of the whole file as skipped (a review: --rows 5
    said 3 where the first five rows held 2)."""
    from tidecast.stream.produce import first_rows
    from tidecast.stream.sources import ReplaySpec, load_replay

    path = tmp_path / "h.csv"
    path.write_text("unique_id,ds,y\na,2024-01-01 00:00,1\na,yesterday,2\na,2024-01-01 02:00,x\n"
                    "a,2024-01-01 03:00,4\na,2024-01-01 04:00,5\na,2024-01-01 05:00,oops\n")
    replay = load_replay(ReplaySpec(path=path))
    obs, letters = first_rows(replay, 4)
    assert len(obs) == 2 and len(letters) == 2
    assert [len(x) for x in first_rows(replay, None)] == [3, 3]
    assert [len(x) for x in first_rows(replay, 0)] == [0, 0]


def test_a_run_that_forecasts_nothing_writes_parquet_timestamps_in_nanoseconds_too(tmp_path):
    """Found by the output review (2026-12-04): pandas reads an empty int64 array as seconds, so a run that
    forecast nothing wrote timestamp[ms] columns where every other run writes timestamp[ns]: files of one dataset
    then disagree on the schema (pyarrow refused to concatenate them)."""
    import pyarrow.parquet as pq

    bad = tmp_path / "allbad.csv"
    bad.write_text("unique_id,ds,y\na,2024-01-01T00:00:00,inf\n")
    out = tmp_path / "empty.parquet"
    assert main(["replay", str(bad), "--level", "80,95", "--out", str(out), "--no-progress",
                 "--dead-letter", str(tmp_path / "dead.jsonl")]) == 0
    schema = pq.read_schema(out)
    for column in ("issued_at", "target_timestamp"):
        assert str(schema.field(column).type) == "timestamp[ns, tz=UTC]", schema


def test_output_paths_with_brackets_are_printed_as_written(tmp_path, capsys):
    """Found by the output review (2026-12-04): paths went through rich markup: "runs/[v2]/dl.jsonl" printed as
    "runs//dl.jsonl", and a path holding "[/b]" ended the run in a MarkupError before its summary was written."""
    bad = tmp_path / "in.csv"
    bad.write_text("unique_id,ds,y\na,2024-01-01T00:00:00,inf\na,2024-01-01T01:00:00,1\n")
    folder = tmp_path / "a[" / "b]"
    folder.mkdir(parents=True)
    summary = tmp_path / "summary.json"
    assert main(["replay", str(bad), "--no-progress", "--dead-letter", str(folder / "dl.jsonl"),
                 "--summary-json", str(summary)]) == 0
    assert summary.exists() and "a[/b]/dl.jsonl" in capsys.readouterr().out.replace("\n", "")


def test_a_series_id_with_a_carriage_return_survives_the_csv_out_file(tmp_path):
    # pandas ends CSV lines with "\n" and quotes only what holds that character, so "a\rb" went out bare and a
    # standard reader split its rows in two
    import csv

    from tidecast.stream.batch import ForecastBatch
    from tidecast.stream.sinks import CsvSink

    ids = np.array(["a\rb", "plain"], object)
    batch = ForecastBatch(ids, np.array([0, 0]), np.array(["m", "m"], object), np.array([1, 1]),
                          np.array([10, 10]), np.array([1.5, 2.5]), np.array([1.0, 2.0]), np.array([2.0, 3.0]), 0.2)
    sink = CsvSink(tmp_path / "f.csv")
    sink.write(batch)
    sink.close()
    with open(tmp_path / "f.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["series_id"] for row in rows] == ["a\rb", "plain"]
    assert [float(row["mean"]) for row in rows] == [1.5, 2.5]
    back = pd.read_csv(tmp_path / "f.csv")
    assert list(back["series_id"]) == ["a\rb", "plain"] and list(back["mean"]) == [1.5, 2.5]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_row_over_the_size_limit_is_measured_in_utf8_bytes_in_every_file_format(tmp_path, suffix):
    """A cell of 30,000 CJK characters is 90,000 UTF-8 bytes, over the 64 KiB record limit: CSV counted the bytes of
    its line, Parquet counted characters and let the row in."""
    frame = pd.DataFrame({"ds": pd.date_range("2024-01-01", periods=30, freq="h").strftime("%Y-%m-%dT%H:%M:%SZ"),
                          "unique_id": "s", "y": range(30), "note": ""})
    frame.loc[5, "note"] = "\u6c34" * 30_000
    path = tmp_path / f"big{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    s = replay(tmp_path, str(path), "--format", "long", "--model-param", "seasonal-naive.period=1")
    assert s["dead_letters"] == {"oversized": 1}
    assert [d["reason"] for d in _dead(tmp_path)] == ["oversized"]


def test_parquet_int96_times_outside_the_nanosecond_range_are_bad_timestamp(tmp_path):
    """Found by the input review (2026-12-04): Spark's INT96 times were read as nanoseconds, so a 9999-12-31
    sentinel wrapped round to 1816 and replayed there, with no dead letter."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    stamps = [dt.datetime(2024, 1, 1), dt.datetime(9999, 12, 31), dt.datetime(1000, 1, 1)]
    table = pa.table({"ds": pa.array(stamps, pa.timestamp("us")), "a": [1.0, 2.0, 3.0]})
    path = tmp_path / "int96.parquet"
    pq.write_table(table, path, use_deprecated_int96_timestamps=True)
    assert str(pq.read_metadata(path).schema.column(0).physical_type) == "INT96"
    s = replay(tmp_path, str(path), "--model-param", "seasonal-naive.period=1")
    assert s["dead_letters"] == {"bad_timestamp": 2} and s["n_observations"] + s["n_held"] == 1


def test_odd_pandas_dtypes_in_a_frame_read_as_their_values():
    """Found by the input review (2026-12-04): categorical integer ids with one missing became "7.0" (and two ids
    above 2**53 one series); a categorical time column with an empty cell raised TypeError; an Arrow-backed zoned
    time column raised ValueError."""
    import tidecast.stream.sources as sources

    ds = pd.date_range("2024-01-01", periods=5, freq="h", tz="Asia/Kolkata")
    ids = pd.Categorical.from_codes([0, 1, -1, 0, 1], categories=pd.Index([2**60 + 1, 2**60 + 2], dtype="int64"))
    loaded = sources.load_frame(pd.DataFrame({"unique_id": ids, "ds": ds, "y": range(5)}))
    assert loaded.observations.series_ids.tolist() == ["1152921504606846977", "1152921504606846978"] * 2
    times = pd.Categorical(["2024-01-01T00:00:00Z", "", "2024-01-01T02:00:00Z"])
    loaded = sources.load_frame(pd.DataFrame({"ds": times, "a": [1.0, 2.0, 3.0]}))
    assert [d.reason for d in loaded.dead_letters] == ["missing_field"] and len(loaded.observations) == 2
    arrow = pd.DataFrame({"ds": ds, "a": range(5)}).astype({"ds": "timestamp[ms, tz=Asia/Kolkata][pyarrow]"})
    loaded = sources.load_frame(arrow)
    assert loaded.observations.timestamps_ns.tolist() == [t.value for t in ds]


def test_a_wide_file_of_many_channels_loads_in_linear_time_and_fits_the_row_limit(tmp_path):
    """Found by the input review (2026-12-04): every channel built the raw rows of its (no) bad cells, a step per
    column each, so 500 channels took 13 s; and a Parquet number counted 16 bytes, so 4,200 channels made every row
    oversized. Now numbers count their binary 8 bytes."""
    import time

    frame = pd.DataFrame(np.ones((3, 4200)), columns=[f"c{k}" for k in range(4200)])
    frame.insert(0, "ds", pd.date_range("2024-01-01", periods=3, freq="h"))
    path = tmp_path / "wide.parquet"
    frame.to_parquet(path)
    from tidecast.stream.sources import ReplaySpec, load_replay

    began = time.perf_counter()
    loaded = load_replay(ReplaySpec(path=path))
    assert len(loaded.observations) == 3 * 4200 and not loaded.dead_letters
    assert time.perf_counter() - began < 30  # minutes before (a loose bound: this is no benchmark)


def test_an_unnamed_datetime_index_beside_a_ds_column_says_what_to_rename():
    import tidecast

    frame = pd.DataFrame({"ds": np.arange(30.0)}, index=pd.date_range("2024-01-01", periods=30, freq="h"))
    with pytest.raises(ValueError, match=r"rename the column, e.g. frame.rename\(columns=\{'ds': 'ds_value'\}\)"):
        tidecast.replay(frame, horizon=2)
    assert len(tidecast.replay(frame.rename(columns={"ds": "ds_value"}), horizon=2).actuals) == 30


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_closes_a_parquet_output_that_can_then_be_read(tmp_path, signame):
    """replay under timeout / docker stop / a deleted Job gets SIGTERM, one in a closed terminal SIGHUP: the
    process died without closing its sinks, and a Parquet file without its footer cannot be read at all (the
    earlier run's output was already gone)."""
    import signal

    out = tmp_path / "f.parquet"
    def as_in_a_terminal() -> None:  # a run under nohup (CI, a background job) hands its children SIGHUP ignored
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "tidecast.stream.cli", "replay", str(SAMPLE), "--out", str(out),
                             "--rate", "300", "--no-progress", "--batch-size", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 4096):
        time.sleep(0.2)  # forecasts are being written
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    frame = pd.read_parquet(out)
    assert len(frame) > 0 and {"series_id", "mean"} <= set(frame.columns)


def test_a_stdout_closed_early_still_gets_the_summary_file_and_report_written(tmp_path):
    """``tidecast replay ... | head``: the table was printed first, the closed pipe ended the process (rich exits 1
    on a broken pipe) and the summary JSON and report asked for were never written."""
    summary, report = tmp_path / "s.json", tmp_path / "r.html"
    proc = subprocess.Popen([sys.executable, "-m", "tidecast.stream.cli", "replay", str(SAMPLE), "--no-progress",
                             "--summary-json", str(summary), "--report", str(report)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything was printed
    proc.communicate(timeout=300)
    assert json.loads(summary.read_text())["n_observations"] > 0
    assert report.read_text().startswith("<!DOCTYPE html>")


def test_ctrl_c_while_the_settings_are_checked_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    from tidecast.stream import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "resolve", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["replay", str(SAMPLE), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_stop_while_lingering_after_a_complete_run_is_its_normal_end(tmp_path, monkeypatch, capsys):
    """A Job stopped during --linger was marked failed (exit 130, "no summary") though its replay was complete."""
    from tidecast.stream import replay as replay_module

    def stopped(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(replay_module.time, "sleep", stopped)
    monkeypatch.chdir(tmp_path)  # the default dead-letter file goes to the working directory
    summary = tmp_path / "s.json"
    assert main(["replay", str(SAMPLE), "--no-progress", "--metrics-port", str(_free_port()), "--linger", "60",
                 "--summary-json", str(summary)]) == 0
    assert json.loads(summary.read_text())["n_observations"] > 0


def test_an_output_that_fails_mid_run_is_named_and_a_summary_is_whole_or_absent(tmp_path, monkeypatch):
    from tidecast.stream import sinks

    full = OSError(28, "No space left on device")
    with pytest.raises(OSError, match=r"cannot write .*f\.csv: No space left"), sinks.naming(tmp_path / "f.csv"):
        raise full
    target = tmp_path / "s.json"
    target.write_text('{"earlier": 1}')

    def cut(self, text, encoding=None):
        Path.write_bytes(self, text[:10].encode())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut)
    with pytest.raises(OSError, match="cannot write .*s.json"):
        sinks.write_whole(target, json.dumps({"n": list(range(100))}))
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"earlier": 1}  # not a cut JSON at the path a pipeline reads
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # and no temporary left beside it


def test_an_output_at_the_settings_files_path_is_refused(tmp_path, capsys):
    """--events, --summary-json, --report or --dead-letter naming the --config file replaced the settings with
    this run's output; the input file was already protected."""
    settings = tmp_path / "tidecast.toml"
    settings.write_text('horizon = 6\n')
    for flag in ("--events", "--summary-json", "--dead-letter"):
        assert main(["replay", str(SAMPLE), "--config", str(settings), flag, str(settings), "--no-progress"]) == 2
        assert "is the settings file" in capsys.readouterr().err
        assert settings.read_text() == 'horizon = 6\n'


def test_report_series_without_report_is_refused(capsys):
    assert main(["replay", str(SAMPLE), "--report-series", "x", "--no-progress"]) == 2
    assert "give --report PATH too" in capsys.readouterr().err


def test_linger_without_metrics_port_is_refused(capsys):
    """--linger only keeps the /metrics server up; without a port there is none, and the run used to sleep for
    the whole linger serving nothing."""
    assert main(["replay", str(SAMPLE), "--linger", "30", "--no-progress"]) == 2
    assert "give --metrics-port PORT too" in capsys.readouterr().err


def test_a_run_that_fails_leaves_no_earlier_summary_beside_its_outputs(tmp_path, monkeypatch):
    """The events file is emptied when a run starts; the summary JSON was written only at the end, so a run that
    failed part way left the earlier run's summary (with its event counts) beside an empty events file."""
    from tidecast.stream import replay as replay_module

    summary = tmp_path / "s.json"
    events = tmp_path / "e.jsonl"
    assert main(["replay", str(SAMPLE), "--summary-json", str(summary), "--events", str(events),
                 "--no-progress"]) == 0
    assert summary.exists()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(replay_module, "execute", broken)
    assert main(["replay", str(SAMPLE), "--summary-json", str(summary), "--events", str(events),
                 "--no-progress"]) == 2
    assert not summary.exists()


def test_replay_leaves_the_callers_sigterm_handler_and_runs_from_a_thread(tmp_path):
    """The handler that turns SIGTERM into a clean stop stayed installed after the command returned, and setting it
    failed outside the main thread (replay from a worker thread was an error)."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    assert main(["replay", str(SAMPLE), "--no-progress", "--summary-json", str(tmp_path / "a.json")]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    codes = []
    worker = threading.Thread(target=lambda: codes.append(
        main(["replay", str(SAMPLE), "--no-progress", "--summary-json", str(tmp_path / "b.json")])))
    worker.start()
    worker.join(300)
    assert codes == [0]


def test_an_unwritable_default_dead_letter_file_says_how_to_move_or_drop_it(tmp_path, monkeypatch, capsys):
    """From a read-only working directory a clean file could not be replayed, and the error named a flag the user
    never gave without saying what to do."""
    from tidecast.stream import replay as replay_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(replay_module, "_unwritable",
                        lambda path: "cannot be written: Read-only file system" if path.name.endswith(".jsonl")
                        else None)
    assert main(["replay", str(SAMPLE), "--no-progress"]) == 2
    assert "or /dev/null to drop rejected rows" in capsys.readouterr().err


def test_a_full_disk_under_the_events_or_dead_letter_file_is_named(tmp_path, capsys):
    """Those files are written at close: the failure said only "[Errno 28] No space left on device"."""
    from datetime import UTC, datetime

    from tidecast.monitors.drift import DriftEvent
    from tidecast.stream.sinks import JsonlEvents

    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")
    data = tmp_path / "bad.csv"
    data.write_text("ds,y\n" + "".join(f"2024-01-01T{h:02d}:00:00,{'x' if h == 3 else h}\n" for h in range(24)))
    assert main(["replay", str(data), "--no-progress", "--dead-letter", str(full)]) == 2
    assert "cannot write" in capsys.readouterr().err
    events = JsonlEvents(full)
    events.write([DriftEvent("s", "m", "cusum", "mean", datetime(2024, 1, 1, tzinfo=UTC), 1.0)])
    with pytest.raises(OSError, match="cannot write .*full.jsonl"):
        events.close()


def test_a_named_series_column_that_is_missing_is_an_error_not_a_wide_file(tmp_path):
    """Notes review (2026-12-05): ``--series-column id`` on a file whose series column is ``unique_id`` read it as
    wide: three series merged into one, 60 of 90 rows skipped as duplicates, the ids dead-lettered, no message."""
    path = tmp_path / "long.csv"
    hours = pd.date_range("2024-01-01", periods=30, freq="h")
    pd.concat([pd.DataFrame({"unique_id": sid, "ds": hours, "y": np.arange(30.0)}) for sid in "abc"]).to_csv(
        path, index=False)
    with pytest.raises(ValueError, match=r"series column 'id' not in \['unique_id', 'ds', 'y'\]"):
        tidecast.replay(path, series_column="id")
    assert main(["replay", str(path), "--series-column", "id", "--no-progress",
                 "--dead-letter", str(tmp_path / "dead.jsonl")]) == 2
    assert tidecast.replay(path, series_column="unique_id", horizon=2).actuals["unique_id"].nunique() == 3


def test_dev_null_takes_several_outputs_and_a_pipe_is_written_into_not_replaced(tmp_path):
    """Notes review (2026-12-05): the default dead-letter file's error suggests /dev/null, but /dev/null for two
    outputs was refused as "the same file"; and a summary or report written to a device or pipe was renamed over it
    (the temporary file replaced the pipe: for /dev/null, as root, the device itself)."""
    import os
    import stat

    from tidecast.stream.sinks import write_whole

    path = tmp_path / "short.csv"
    pd.DataFrame({"ds": pd.date_range("2024-01-01", periods=40, freq="h"), "y": np.arange(40.0)}).to_csv(
        path, index=False)
    assert main(["replay", str(path), "--no-progress", "--dead-letter", "/dev/null", "--events", "/dev/null"]) == 0
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        write_whole(fifo, '{"ok": true}')
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.read(reader, 100) == b'{"ok": true}'
    finally:
        os.close(reader)


def test_a_summary_written_to_a_pipe_keeps_the_pipe(tmp_path):
    """Review (2026-12-05): a run removed an earlier summary or report before it started, whatever the path was:
    ``--summary-json /dev/null`` (as root) deleted the device, a pipe was replaced by a regular file; and probing a
    pipe for writing closed it under its reader."""
    import os
    import stat

    path = tmp_path / "short.csv"
    pd.DataFrame({"ds": pd.date_range("2024-01-01", periods=40, freq="h"), "y": np.arange(40.0)}).to_csv(
        path, index=False)
    fifo = tmp_path / "summary-pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert main(["replay", str(path), "--no-progress", "--dead-letter", str(tmp_path / "dead.jsonl"),
                     "--summary-json", str(fifo)]) == 0
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert json.loads(os.read(reader, 1 << 16))["n_observations"] == 40
    finally:
        os.close(reader)
