"""Replay sources: historical CSV, Parquet or JSON-lines files as a stream of observation batches.

Formats
-------
* **wide** — a time column plus one column per channel (ETT, NAB): each channel becomes the series
  ``<name>/<column>``, where ``name`` defaults to the file's stem (``ETTh1/OT``).
* **long** — one row per observation, Nixtla's convention ``unique_id, ds, y`` (names configurable).
* **jsonl** — one wire-format JSON observation per line (what Kafka carries; see :mod:`tidecast.stream.records`).

``auto`` picks jsonl for ``.jsonl``/``.ndjson``, long when the series column exists, wide otherwise.

Rules (the same as for Kafka messages — every bad cell goes through :mod:`tidecast.stream.records`' parsers, so a replay
and a live stream reject the same things for the same reasons):

* A row whose time is missing or unparsable is dead-lettered whole (all its channels).
* A cell whose value is missing, non-numeric or non-finite is dead-lettered alone; the row's other channels
  go on. Naive timestamps are UTC; a numeric time column is epoch seconds.
* A row larger than the record size limit is dead-lettered (``oversized``).
* Rows are replayed in event-time order (a stable sort: ties keep file order), so a long file sorted by series
  interleaves like the live stream it came from. Positions are ``(0, row)`` with ``row`` the 0-based data row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.records import DEFAULT_MAX_BYTES, InvalidRecord, decode, parse_timestamp, parse_value

TIME_COLUMN_CANDIDATES = ("ds", "timestamp", "date", "datetime", "time")
BUNDLED_SAMPLE = Path(__file__).parent / "data" / "nyc_taxi.csv"


@dataclass
class DeadLetter:
    """A rejected input: why, where from, and the raw content (never dropped silently)."""

    reason: str
    detail: str
    source: str
    position: tuple[int, int]
    raw: Any

    def to_json(self) -> str:
        return json.dumps({"reason": self.reason, "detail": self.detail, "source": self.source,
                           "partition": self.position[0], "offset": self.position[1], "raw": self.raw},
                          default=str)


@dataclass
class ReplaySpec:
    """Where and how to read a history file."""

    path: Path = BUNDLED_SAMPLE
    format: str = "auto"  # auto | wide | long | jsonl
    time_column: str | None = None
    series_column: str = "unique_id"
    value_column: str = "y"
    name: str | None = None  # series prefix for wide files; default: the file stem
    columns: list[str] | None = None  # wide: channels to use; default: all but the time column
    max_bytes: int = DEFAULT_MAX_BYTES
    chunk_size: int = 20_000

    def resolved_format(self, frame_columns: list[str] | None = None) -> str:
        if self.format != "auto":
            return self.format
        if Path(self.path).suffix.lower() in (".jsonl", ".ndjson"):
            return "jsonl"
        return "long" if frame_columns is not None and self.series_column in frame_columns else "wide"


@dataclass
class Replay:
    """A loaded history: dead letters found while parsing plus the good observations in replay order."""

    observations: ObservationBatch
    dead_letters: list[DeadLetter]
    format: str

    def batches(self, chunk_size: int) -> Iterator[ObservationBatch]:
        n = len(self.observations)
        for start in range(0, n, chunk_size):
            yield self.observations.take(np.arange(start, min(start + chunk_size, n)))


def read_table(path: Path) -> pd.DataFrame:
    """All cells as strings (CSV) or native types (Parquet); the raw form is kept for dead letters."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)


def load_replay(spec: ReplaySpec) -> Replay:
    """Read and validate a history file."""
    path = Path(spec.path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if spec.resolved_format() == "jsonl":
        return _load_jsonl(path, spec)
    frame = read_table(path)
    fmt = spec.resolved_format(list(frame.columns))
    time_col = spec.time_column or _guess_time_column(frame)
    if time_col not in frame.columns:
        raise ValueError(f"time column {time_col!r} not in {list(frame.columns)}")
    if fmt == "long":
        for col in (spec.series_column, spec.value_column):
            if col not in frame.columns:
                raise ValueError(f"long format needs column {col!r}; columns are {list(frame.columns)}")
    source = str(path)
    letters: list[DeadLetter] = []
    sizes = _row_sizes(frame)
    oversized = sizes > spec.max_bytes
    t_ns, bad_time = _parse_times(frame[time_col])
    for row in np.flatnonzero(bad_time | oversized):
        raw = _raw_row(frame, row)
        if oversized[row]:
            err = InvalidRecord("oversized", f"row of {int(sizes[row])} bytes > {spec.max_bytes}")
        else:
            err = _why(parse_timestamp, frame[time_col].iloc[row])
        letters.append(DeadLetter(err.reason, err.detail, source, (0, int(row)), raw))
    good_rows = ~(bad_time | oversized)
    if fmt == "long":
        obs, more = _long(frame, spec, t_ns, good_rows, source)
    else:
        obs, more = _wide(frame, spec, time_col, t_ns, good_rows, source, path)
    letters.extend(more)
    order = np.argsort(obs.timestamps_ns, kind="stable")
    letters.sort(key=lambda d: d.position[1])
    return Replay(obs.take(order), letters, fmt)


def _guess_time_column(frame: pd.DataFrame) -> str:
    for name in TIME_COLUMN_CANDIDATES:
        if name in frame.columns:
            return name
    return str(frame.columns[0])


def _row_sizes(frame: pd.DataFrame) -> np.ndarray:
    if not len(frame.columns):
        return np.zeros(len(frame), np.int64)
    sizes = np.zeros(len(frame), np.int64)
    for col in frame.columns:
        if frame[col].dtype == object or pd.api.types.is_string_dtype(frame[col]):
            sizes += frame[col].astype(str).str.len().to_numpy()
        else:
            sizes += 16
    return sizes


def _parse_times(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Epoch ns per row and a mask of rows whose time is missing or unparsable."""
    if pd.api.types.is_datetime64_any_dtype(column):
        parsed = pd.to_datetime(column, utc=True)
    elif pd.api.types.is_numeric_dtype(column):
        parsed = pd.to_datetime(column, unit="s", utc=True, errors="coerce")
    else:
        text = column.astype(str).str.strip()
        numeric = pd.to_numeric(text, errors="coerce")
        if numeric.notna().all() and len(text):
            parsed = pd.to_datetime(numeric, unit="s", utc=True, errors="coerce")
        else:
            parsed = pd.to_datetime(text.where(text != ""), utc=True, errors="coerce", format="ISO8601")
    bad = parsed.isna().to_numpy()
    ns = parsed.dt.tz_localize(None).astype("datetime64[ns]").to_numpy().view(np.int64)
    return ns, bad


def _parse_values(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Floats per cell and a mask of cells that fail :func:`tidecast.stream.records.parse_value`."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        values = column.to_numpy(dtype=float, na_value=np.nan)
    else:
        values = pd.to_numeric(column.astype(str).str.strip(), errors="coerce").to_numpy(dtype=float)
    return values, ~np.isfinite(values)


def _why(parser: Any, raw: Any) -> InvalidRecord:
    """The records module's verdict on a raw cell the vectorised path flagged."""
    try:
        parser(None if isinstance(raw, float) and np.isnan(raw) else raw)
    except InvalidRecord as err:
        return err
    return InvalidRecord("wrong_type", f"unreadable cell {raw!r}")


def _raw_row(frame: pd.DataFrame, row: int) -> dict[str, Any]:
    return {str(k): (v.item() if hasattr(v, "item") else v) for k, v in frame.iloc[row].to_dict().items()}


def _value_letters(frame: pd.DataFrame, column: str, bad: np.ndarray, source: str,
                   series_of: Any) -> list[DeadLetter]:
    letters = []
    for row in np.flatnonzero(bad):
        err = _why(parse_value, frame[column].iloc[row])
        raw = _raw_row(frame, row)
        letters.append(DeadLetter(err.reason, f"{series_of(row)}: {err.detail}", source, (0, int(row)), raw))
    return letters


def _wide(frame: pd.DataFrame, spec: ReplaySpec, time_col: str, t_ns: np.ndarray, good_rows: np.ndarray,
          source: str, path: Path) -> tuple[ObservationBatch, list[DeadLetter]]:
    name = spec.name or path.stem
    channels = spec.columns or [c for c in frame.columns if c != time_col]
    missing = [c for c in channels if c not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} not in {list(frame.columns)}")
    ids, times, values, rows, letters = [], [], [], [], []
    all_rows = np.arange(len(frame))
    for col in channels:
        vals, bad = _parse_values(frame[col])
        bad &= good_rows
        letters.extend(_value_letters(frame, col, bad, source, lambda _r, c=col: f"{name}/{c}"))
        keep = good_rows & ~bad
        ids.append(np.full(int(keep.sum()), f"{name}/{col}", dtype=object))
        times.append(t_ns[keep])
        values.append(vals[keep])
        rows.append(all_rows[keep])
    # Interleave channels row by row (row-major), the order a live wide stream arrives in.
    row_index = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = np.argsort(row_index, kind="stable")
    obs = ObservationBatch(np.concatenate(ids)[order], np.concatenate(times)[order],
                           np.concatenate(values)[order], None, row_index[order])
    return obs, letters


def _long(frame: pd.DataFrame, spec: ReplaySpec, t_ns: np.ndarray, good_rows: np.ndarray,
          source: str) -> tuple[ObservationBatch, list[DeadLetter]]:
    series = frame[spec.series_column].astype(str).str.strip()
    no_series = (series == "") | frame[spec.series_column].isna().to_numpy()
    letters = [
        DeadLetter("missing_field", "series_id is missing", source, (0, int(row)), _raw_row(frame, row))
        for row in np.flatnonzero(no_series & good_rows)
    ]
    vals, bad = _parse_values(frame[spec.value_column])
    bad &= good_rows & ~no_series
    letters.extend(_value_letters(frame, spec.value_column, bad, source, lambda r: series.iloc[r]))
    keep = good_rows & ~no_series & ~bad
    rows = np.flatnonzero(keep)
    obs = ObservationBatch(series.to_numpy(dtype=object)[keep], t_ns[keep], vals[keep], None, rows)
    return obs, letters


def _load_jsonl(path: Path, spec: ReplaySpec) -> Replay:
    ids, times, values, rows, letters = [], [], [], [], []
    with path.open("rb") as fh:
        for row, line in enumerate(fh):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                obs = decode(line, spec.max_bytes)
            except InvalidRecord as err:
                raw = line[:1024].decode("utf-8", "replace")
                letters.append(DeadLetter(err.reason, err.detail, str(path), (0, row), raw))
                continue
            ids.append(obs.series_id)
            times.append(obs.timestamp_ns)
            values.append(obs.value)
            rows.append(row)
    batch = ObservationBatch(np.array(ids, dtype=object), np.array(times, np.int64), np.array(values), None,
                             np.array(rows, np.int64))
    return Replay(batch.take(np.argsort(batch.timestamps_ns, kind="stable")), letters, "jsonl")
