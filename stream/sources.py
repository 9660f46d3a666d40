"""Replay sources: historical CSV, Parquet or JSON-lines files as a stream of observation batches.

Formats
-------
* **wide** — a time column plus one column per channel (ETT, NAB): each channel becomes the series
  ``<name>/<column>``, where ``name`` defaults to the file's stem (``ETTh1/OT``).
* **long** — one row per observation, Nixtla's convention ``unique_id, ds, y`` (names configurable).
* **jsonl** — one wire-format JSON observation per line (what Kafka carries; see :mod:`tidecast.stream.records`).

``auto`` picks jsonl for ``.jsonl``/``.ndjson``, long when the series column exists, wide otherwise.

Rules (the same as for Kafka messages — every bad cell goes through :mod:`tidecast.stream.records`' parsers, so a replay
and a live stream reject the same things for the same reasons; nothing bad in one row costs another row):

* A CSV row is one line. A line that cannot be split into the header's cells — a field too many or too few, a
  quote left open at the end of the line, a byte that is not UTF-8 — is dead-lettered (``malformed_row``, with its
  line number) and reading goes on at the next line.
* A row whose time is missing, unparsable or outside the supported range (:data:`~tidecast.stream.records.
  TIMESTAMP_RANGE`) is dead-lettered whole (all its channels). Times are parsed cell by cell: a column whose cells
  are mostly numbers is epoch seconds (an ISO-8601 cell in it is still read as ISO-8601); otherwise every cell is
  ISO-8601. Naive timestamps are UTC.
* A cell whose value is missing, non-numeric or non-finite is dead-lettered alone; the row's other channels
  go on. A series id that breaks :func:`~tidecast.stream.records.parse_series_id`'s rules is ``bad_series_id``.
* A row larger than the record size limit is dead-lettered (``oversized``).
* A Parquet column of lists, structs or maps is a clear error before any work: one number per cell is read.
* Rows are replayed in event-time order (a stable sort: ties keep file order), so a long file sorted by series
  interleaves like the live stream it came from. Positions are ``(0, row)`` with ``row`` the 0-based data row
  (CSV: the line number minus the header's line number, minus one; JSON lines: the 0-based line).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time
from decimal import Decimal
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.records import (
    DEFAULT_MAX_BYTES,
    MAX_TIMESTAMP,
    MIN_TIMESTAMP,
    NUMBER_TEXT,
    InvalidRecord,
    decode,
    is_number_text,
    parse_series_id,
    parse_timestamp,
    parse_value,
    to_ns,
)

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
        if frame_columns is None:
            return "wide"
        if self.series_column in frame_columns:
            return "long"
        if self.series_column != ReplaySpec.series_column:  # named, and missing: not a wide file (its series merged)
            raise ValueError(f"series column {self.series_column!r} not in {list(frame_columns)}")
        return "wide"


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


@dataclass
class Table:
    """A file's cells: ``frame`` (CSV: strings; Parquet: native types), the position of each of its rows, and the
    rows that could not be read into cells at all."""

    frame: pd.DataFrame
    rows: np.ndarray  # int64, the position offset of each frame row
    letters: list[DeadLetter] = field(default_factory=list)


def read_table(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Table:
    """All cells as strings (CSV) or native types (Parquet); the raw form is kept for dead letters."""
    if path.suffix.lower() in (".parquet", ".pq"):
        # pandas stores a frame's index in the file: _load_table moves it back. INT96 times (Spark's) are read in
        # microseconds: as nanoseconds a 9999-12-31 sentinel wrapped round to a made-up time instead of being refused
        frame = pd.read_parquet(path, coerce_int96_timestamp_unit="us")
        return Table(_exact_integers(path, frame), np.arange(len(frame), dtype=np.int64))
    return read_csv(path, max_bytes)


def _exact_integers(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Integer columns as pandas' nullable integers where a null made pandas read them as floats: ids were written
    ``"1.0"`` and ids above 2**53 rounded, so two series could merge into one because of one empty cell."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    widened = [f.name for f in schema if pa.types.is_integer(f.type) and f.name in frame.columns
               and frame[f.name].dtype.kind == "f"]
    if widened:
        nullable = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                    pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                    pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype()}
        table = pq.read_table(path, columns=widened)
        frame = frame.copy()
        for name in widened:
            exact = table.column(name).to_pandas(types_mapper=nullable.get)
            frame[name] = pd.Series(exact.array, index=frame.index)
    return frame


def read_csv(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Table:
    """A CSV file, one row per line: a line that does not split into the header's cells is a ``malformed_row``
    dead letter (``oversized`` if longer than ``max_bytes``) and the next line is read as if it had not been there.

    A clean file goes through pandas' C reader; any other through :mod:`csv`, part by part between unreadable
    lines, and line by line only where a quote runs past the end of a line."""
    data = path.read_bytes()
    lines = data.splitlines()  # \n, \r\n or \r; a row is one line
    source = str(path)
    first = next((k for k, line in enumerate(lines) if line.removeprefix(_BOM).strip()), None)  # a BOM alone: blank
    if first is None:
        raise ValueError(f"{path} is empty: a CSV file needs a header line")
    header = _header(path, lines[first], first)
    clean = _read_clean(data, lines, first, header, max_bytes)
    if clean is not None:
        return clean
    texts, unreadable = _decoded(lines, max_bytes)
    letters: list[DeadLetter] = []
    cells: list[list[str]] = []
    rows: list[int] = []
    for at, stop in _parts(unreadable, first + 1, len(lines)):
        parsed = _one_row_per_line(texts, at, stop)
        if parsed is not None and all(len(cells_) == len(header) for cells_ in parsed):  # the usual case
            cells.extend(parsed)
            rows.extend(range(at - first - 1, stop - first - 1))
            continue
        found = _csv_lines(texts, at, stop) if parsed is None else (
            (at + i, cells_, "") for i, cells_ in enumerate(parsed) if not _blank(cells_))
        for k, line_cells, why in found:
            row = k - first - 1
            if line_cells is not None and len(line_cells) == len(header):
                cells.append(line_cells)
                rows.append(row)
                continue
            if line_cells is not None:
                why = f"{len(line_cells)} fields, the header has {len(header)}"
            letters.append(DeadLetter("malformed_row", f"line {k + 1}: {why}", source, (0, row),
                                      _raw_line(lines[k], max_bytes)))
    for k, why in sorted(unreadable.items()):
        if k > first:
            reason = "oversized" if why.startswith("row of") else "malformed_row"
            letters.append(DeadLetter(reason, f"line {k + 1}: {why}", source, (0, k - first - 1),
                                      _raw_line(lines[k], max_bytes)))
    frame = pd.DataFrame(cells, columns=header, dtype=object) if cells else pd.DataFrame(
        {name: pd.Series([], dtype=object) for name in header})
    return Table(frame, np.array(rows, np.int64), letters)


def _read_clean(data: bytes, lines: list[bytes], first: int, header: list[str], max_bytes: int) -> Table | None:
    """The usual file at pandas' C speed: UTF-8, no quote characters, no line over ``max_bytes`` and every
    non-empty line with the header's number of fields — so each line is one row, as the careful path reads it.
    ``None`` for any other file."""
    body = lines[first + 1:]
    if b'"' in data or b"\0" in data or data.count(b"\r") != data.count(b"\r\n") or (
            body and max(map(len, body)) > max_bytes):
        return None
    separators = len(header) - 1
    if any(line.count(b",") != separators for line in body if line):
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    rows = np.array([k for k, line in enumerate(body) if line], np.int64)
    frame = pd.read_csv(io.BytesIO(b"\n".join(body)), header=None, names=header, dtype=str, keep_default_na=False,
                        na_filter=False, skip_blank_lines=True, encoding="utf-8")
    return Table(frame, rows) if len(frame) == len(rows) else None


_BOM = b"\xef\xbb\xbf"


def _json_object(line: bytes) -> bool:
    """Whether ``line`` is one JSON object (a header such as ``{ts},value`` is not)."""
    text = line.removeprefix(_BOM).strip()
    if not text.startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _not_csv_hint(first: bytes) -> str:
    """What a file read as CSV (by its name) looks like instead, from its first bytes."""
    if first.startswith(b"\x1f\x8b"):
        return "; the file is gzip-compressed: decompress it first"
    if first.startswith(b"PAR1"):
        return "; the file is Parquet: name it .parquet"
    if _json_object(first):
        return "; the file holds JSON lines: name it .jsonl or give --format jsonl"
    return ""


def _header(path: Path, line: bytes, k: int) -> list[str]:
    if _json_object(line):  # no header: a JSON record (csv would split it at its commas into a "header")
        raise ValueError(f"{path}: line {k + 1} is a JSON object, not a CSV header{_not_csv_hint(line)}")
    try:
        text = line.decode("utf-8").removeprefix("\ufeff")
        header = next(csv.reader([text], strict=True))
    except (UnicodeDecodeError, csv.Error, StopIteration) as err:
        raise ValueError(f"{path}: line {k + 1}, the header, cannot be read: {err}{_not_csv_hint(line)}") from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: line {k + 1}, the header, names columns {repeated} more than once")
    return header


#: The bytes of an oversized line its dead letter keeps (its detail gives the whole size): kept whole, the worst rows
#: of an input would make the dead-letter file as large as they are.
OVERSIZED_RAW_BYTES = 1024


def _raw_line(line: bytes, max_bytes: int) -> str:
    """A refused line as its dead letter keeps it: whole, so it can be fixed and replayed, unless it is over the row
    limit (then its first :data:`OVERSIZED_RAW_BYTES`, not cutting a character in two)."""
    if len(line) <= max_bytes:
        return line.decode("utf-8", "replace")
    text = line[:OVERSIZED_RAW_BYTES].decode("utf-8", "replace")
    split = len(line) > OVERSIZED_RAW_BYTES and 0x80 <= line[OVERSIZED_RAW_BYTES] <= 0xBF
    if split and text.endswith("\ufffd"):  # the cut split a character: its first bytes are no byte error
        text = text[:-1]
    return text


def _decoded(lines: list[bytes], max_bytes: int) -> tuple[list[str], dict[int, str]]:
    """Each line as text, and why for the lines that cannot be read at all (not UTF-8, too long)."""
    unreadable: dict[int, str] = {}
    if max(map(len, lines)) > max_bytes:
        unreadable = {k: f"row of {len(line)} bytes > limit {max_bytes}" for k, line in enumerate(lines)
                      if len(line) > max_bytes}
    try:
        texts = [line.decode("utf-8") for line in lines]
    except UnicodeDecodeError:  # find the bad lines; the others stay
        texts = []
        for k, line in enumerate(lines):
            try:
                texts.append(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                texts.append("")
                unreadable.setdefault(k, f"not UTF-8: byte 0x{line[err.start]:02x} at column {err.start + 1}")
    return texts, unreadable


_OPEN_QUOTE = "a quote is left open at the end of the line"


def _parts(unreadable: dict[int, str], start: int, end: int) -> list[tuple[int, int]]:
    """The runs of readable lines in ``[start, end)``."""
    bounds = [start - 1, *sorted(k for k in unreadable if k >= start), end]
    return [(a + 1, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a + 1]


def _one_row_per_line(texts: list[str], at: int, stop: int) -> list[list[str]] | None:
    """The lines ``[at, stop)`` split by one :func:`csv.reader` (fast), or ``None`` if some row is not exactly one
    line (a quote open at the end of a line) or the reader refuses one."""
    try:
        parsed = list(csv.reader(islice(texts, at, stop), strict=True))
    except csv.Error:
        return None
    if len(parsed) != stop - at:
        return None
    return parsed


def _blank(cells: list[str]) -> bool:
    return not cells or (len(cells) == 1 and not cells[0].strip())


def _csv_lines(texts: list[str], at: int, stop: int) -> Iterator[tuple[int, list[str] | None, str]]:
    """Line by line over ``[at, stop)``: ``(line index, cells, "")`` for every non-blank line, or ``(line index,
    None, why)`` for one that cannot be read. A quote left open at the end of a line makes that line alone
    unreadable: reading starts again on the next one."""
    while at < stop:
        reader = csv.reader(islice(texts, at, stop), strict=True)
        begin = at
        try:
            for parsed in reader:
                if at + reader.line_num - begin > 1:  # an open quote swallowed the next line(s)
                    break
                if not _blank(parsed):
                    yield begin, parsed, ""
                begin = at + reader.line_num
            else:
                return
            yield begin, None, _OPEN_QUOTE
        except csv.Error as err:  # strict mode: a stray quote in a field, or one open at the end of the part
            yield begin, None, _OPEN_QUOTE if "end of data" in str(err) else f"cannot split the line: {err}"
        at = begin + 1


def load_replay(spec: ReplaySpec) -> Replay:
    """Read and validate a history file."""
    path = Path(spec.path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory: PATH is one CSV, Parquet or JSON-lines file")
    if spec.resolved_format() == "jsonl":
        return _load_jsonl(path, spec)
    return _load_table(read_table(path, spec.max_bytes), spec, str(path), spec.name or path.stem, path)


def load_frame(frame: pd.DataFrame, spec: ReplaySpec | None = None, source: str = "<DataFrame>") -> Replay:
    """A history already in memory, by the rules of a file: long (``unique_id, ds, y``) or wide (a time column,
    or a ``DatetimeIndex``, plus one column per channel, each its own series named by the column, or
    ``<name>/<column>`` when ``spec.name`` is set). Positions are ``(0, row)`` with ``row`` the frame's row
    number; bad cells are dead letters as in a file.

    >>> frame = pd.DataFrame({"unique_id": ["a", "a", "b"], "ds": pd.date_range("2024-01-01", periods=3, freq="h"),
    ...                       "y": [1.0, "oops", 3.0]})
    >>> replay = load_frame(frame)
    >>> replay.format, list(replay.observations.series_ids), [d.reason for d in replay.dead_letters]
    ('long', ['a', 'b'], ['non_numeric_value'])
    """
    spec = spec if spec is not None else ReplaySpec()
    if spec.resolved_format() == "jsonl":
        raise ValueError("a DataFrame is long or wide, not JSON lines")
    if isinstance(frame.columns, pd.MultiIndex):  # its names became "('ds', '')", and no time column was found
        raise ValueError(f"the frame's columns have {frame.columns.nlevels} levels: give one level of names, e.g. "
                         "frame.columns = ['/'.join(map(str, c)).strip('/') for c in frame.columns]")
    frame = frame.rename(columns=str)
    return _load_table(Table(frame, np.arange(len(frame), dtype=np.int64)), spec, source, spec.name)


def index_as_columns(frame: pd.DataFrame, wanted: Collection[str] = ()) -> pd.DataFrame:
    """``frame`` with its index moved into columns where it holds data: times (a ``DatetimeIndex``, Arrow
    timestamps, dates; wide frames often keep their time there; ``ds`` if unnamed), or a level named as a column the
    reader wants (``wanted``: the series column of ``set_index("unique_id")``, a time column's name). A Parquet
    file written from a frame stores its index, so the frame and the file load alike. An index level that repeats a
    column (``set_index("ds", drop=False)``) is dropped if it holds the same values and refused if not; any other
    index (row numbers, a label of rows) is dropped, not made a series.

    >>> frame = pd.DataFrame({"y": [1.0, 2.0]}, index=pd.date_range("2024-01-01", periods=2, freq="h"))
    >>> list(index_as_columns(frame).columns)
    ['ds', 'y']
    """
    frame = _periods_as_times(frame)
    index = frame.index
    names = list(index.names)
    if names == [None] and _holds_times(pd.Series(index)):
        if "ds" in frame.columns:  # the index would take the name of a column it is not: say which to rename
            raise ValueError("the frame has an unnamed index of times and a column named 'ds', the name "
                             "a time column goes by: rename the column, e.g. frame.rename(columns={'ds': 'ds_value'})")
        names = ["ds"]
    keep = []
    lowered = {str(w).lower() for w in wanted}  # time columns are found in any case ("Date" from read_csv)
    for level, name in enumerate(names):
        # any index of times: numpy's DatetimeIndex, Arrow timestamps (dtype_backend="pyarrow"), dates
        # (groupby(ts.dt.date)); those were dropped as row labels and the first value column read as the time
        timely = _holds_times(pd.Series(index.get_level_values(level)))
        if name is None or not (timely or str(name).lower() in lowered):
            continue
        if str(name).lower() not in lowered and _has_time_column(frame):
            continue  # a label of times beside the frame's own time column (a "day" of hourly rows) is no channel
        if name in frame.columns:
            if not index.get_level_values(level).equals(pd.Index(frame[name])):  # NaT equals NaT here
                raise ValueError(f"the frame's index {name!r} and its column {name!r} differ: drop one of them")
            continue
        keep.append(level)
    flat = frame.reset_index(drop=True)
    for level in reversed(keep):
        flat.insert(0, str(names[level]), index.get_level_values(level).to_numpy())
    return flat


def _has_time_column(frame: pd.DataFrame) -> bool:
    """A column named as a time column is (any case), or one of datetimes or dates."""
    return any(str(c).lower() in TIME_COLUMN_CANDIDATES or _holds_times(frame[c]) for c in frame.columns)


def _periods_as_times(frame: pd.DataFrame) -> pd.DataFrame:
    """Periods (``frame.to_period()``) as their start times, in the index and in columns: a ``PeriodIndex`` was
    dropped as row labels and the first value column read as epoch seconds."""
    index = frame.index
    levels = [index.get_level_values(i) for i in range(index.nlevels)]
    if any(isinstance(level, pd.PeriodIndex) for level in levels):
        times = [level.to_timestamp() if isinstance(level, pd.PeriodIndex) else level for level in levels]
        frame = frame.set_axis(times[0] if index.nlevels == 1 else pd.MultiIndex.from_arrays(times, names=index.names))
    periods = [i for i, dtype in enumerate(frame.dtypes) if isinstance(dtype, pd.PeriodDtype)]
    if periods:
        frame = frame.copy()
        for i in periods:
            frame.isetitem(i, frame.iloc[:, i].dt.to_timestamp())
    return frame


def _load_table(table: Table, spec: ReplaySpec, source: str, name: str | None, path: Path | None = None) -> Replay:
    """Validate a table's cells into observations and dead letters (shared by files and in-memory frames);
    ``name`` prefixes wide series ids, ``path`` is the file read (``None`` for a frame)."""
    wanted = {spec.series_column, spec.value_column, *TIME_COLUMN_CANDIDATES, *filter(None, [spec.time_column])}
    table = replace(table, frame=index_as_columns(table.frame, wanted))
    frame = table.frame
    if not len(frame.columns):
        raise ValueError(f"{source} has no columns: a history needs a time column and values")
    repeated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
    if repeated:
        raise ValueError(f"{source}: the columns {repeated} appear more than once")
    spec = _case_matched(spec, list(frame.columns))
    fmt = spec.resolved_format(list(frame.columns))
    time_col = spec.time_column or _guess_time_column(frame)
    if time_col not in frame.columns:
        raise ValueError(f"time column {time_col!r} not in {list(frame.columns)}")
    if fmt == "long":
        for col in (spec.series_column, spec.value_column):
            if col not in frame.columns:
                raise ValueError(f"long format needs column {col!r}; columns are {list(frame.columns)}")
        used = [time_col, spec.series_column, spec.value_column]
    else:
        used = [time_col, *_channels(frame, spec, time_col)]
        if len(used) == 1:
            raise ValueError(f"{source}: no value column beside the time column {time_col!r}"
                             f"{_one_column_hint(time_col)}")
    if path is not None:
        _refuse_nested(path, used)
    letters = list(table.letters)
    sizes = _row_sizes(frame)  # the whole row, as a CSV line is measured
    oversized = sizes > spec.max_bytes
    t_ns, time_errors = _parse_times(frame[time_col])
    bad_time = np.zeros(len(frame), bool)
    bad_time[list(time_errors)] = True
    refused = np.flatnonzero(bad_time | oversized)
    for row, raw in zip(refused.tolist(), _raw_rows(frame, refused), strict=True):
        if oversized[row]:
            err = InvalidRecord("oversized", f"row of {int(sizes[row])} bytes > {spec.max_bytes}")
        else:
            err = time_errors[row]
        letters.append(DeadLetter(err.reason, err.detail, source, (0, int(table.rows[row])), raw))
    good_rows = ~(bad_time | oversized)
    if fmt == "long":
        obs, more = _long(table, spec, t_ns, good_rows, source)
    else:
        obs, more = _wide(table, spec, time_col, t_ns, good_rows, source, name)
    letters.extend(more)
    order = np.argsort(obs.timestamps_ns, kind="stable")
    letters.sort(key=lambda d: d.position[1])
    return Replay(obs.take(order), letters, fmt)


def _refuse_nested(path: Path, columns: list[str]) -> None:
    """Parquet lists, structs and maps hold several values per cell: a schema mistake, said before any work."""
    if path.suffix.lower() not in (".parquet", ".pq"):
        return
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    for name in columns:
        if name in schema.names and schema.field(name).type.num_fields:
            raise ValueError(f"{path}: column {name!r} holds {schema.field(name).type} values; tidecast reads one "
                             "number or time per cell (wide: one column per channel; long: one row per observation)")


def _case_matched(spec: ReplaySpec, columns: list[Any]) -> ReplaySpec:
    """``spec`` with its series and value columns named as the table spells them where only the case differs
    (``Unique_ID``, ``Y``), as the time column is found: a long file headed ``Unique_ID,DS,Y`` was read as a wide
    one, its series merged into one channel and the rest counted as duplicates. An exact name wins, and two
    spellings of one name are left as they are (the user names the one meant)."""
    names = [str(c) for c in columns]

    def matched(name: str) -> str:
        found = [c for c in names if c.lower() == name.lower()]
        return name if name in names or len(found) != 1 else found[0]

    return replace(spec, series_column=matched(spec.series_column), value_column=matched(spec.value_column))


def _one_column_hint(header: str) -> str:
    """Why a table may have one column only: a CSV separated by ';' or tabs (a European Excel export)."""
    for sep, name in ((";", "';'"), ("\t", "tab")):
        if sep in header:
            return (f": the header reads as one column and holds {name}s: tidecast reads comma-separated CSV with '.' "
                    "decimals (save it so, or read it with pandas.read_csv(sep=..., decimal=',') and pass the frame "
                    "to tidecast.replay)")
    return ": a history needs a time column and at least one value column"


def _guess_time_column(frame: pd.DataFrame) -> str:
    """The time column when none is named: one of :data:`TIME_COLUMN_CANDIDATES` (any case), else the first
    column of datetimes or dates, else the first column - with a warning, as it may well hold values."""
    names = [str(c) for c in frame.columns]
    by_lower = {name.lower(): name for name in reversed(names)}
    for name in TIME_COLUMN_CANDIDATES:
        if name in names:  # the exact spelling first: "DS" beside "ds" is some other column
            return name
        if name in by_lower:
            return by_lower[name]
    for column in frame.columns:
        if _holds_times(frame[column]):
            return str(column)
    # then the finest column of times among those of ISO-8601 text (a headerless one is what DataFrame.to_csv()
    # writes for a frame indexed by time) and a first named column of epoch seconds: a date label ("day") beside
    # the real times, as the index or as a column, holds fewer distinct times in its first cells
    first = str(next((c for c in frame.columns if not _headerless(c)), frame.columns[0]))
    found = {str(c): n for c in sorted(frame.columns, key=_headerless) if (n := _distinct_time_text(frame[c]))}
    if found:
        best = max(found, key=found.__getitem__)  # on a tie the first: named before headerless, file order
        epoch_first = first not in found and first in frame.columns and _looks_like_epoch(frame[first])
        # epoch seconds first win a tie too; the warning below says they are read as such
        if not (epoch_first and int(frame[first].head(200).nunique()) >= found[best]):
            shown = repr(best) if not _headerless(best) else "the column without a header"
            # a column without a header cannot be named: a header (or a frame's index name) is what names it
            advice = ("name it with --time-column / time_column=" if not _headerless(best) else
                      "give it a header (ds) to silence this")
            warnings.warn(f"no time column named {', '.join(TIME_COLUMN_CANDIDATES)}: reading {shown}, which "
                          f"holds the finest times, as the time; {advice}", UserWarning, stacklevel=2)
            return best
    warnings.warn(f"no time column named {', '.join(TIME_COLUMN_CANDIDATES)}: reading the first column, {first!r}, "
                  f"as the time (numbers as epoch seconds); name it with --time-column / time_column=",
                  UserWarning, stacklevel=2)
    return first


def _distinct_time_text(cells: pd.Series, sample: int = 200) -> int:
    """How many distinct ISO-8601 times a text column's first cells hold, if most of them are such times (not
    numbers: row numbers are no times); 0 otherwise."""
    if not len(cells) or not _all_text(cells.head(sample)):
        return 0
    text = _texts(cells.head(sample).dropna()).str.strip()
    text = text[text != ""]
    if not len(text) or _mostly_numbers(text):
        return 0
    parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
    return int(parsed.nunique()) if 2 * int(parsed.notna().sum()) > len(text) else 0


def _looks_like_epoch(cells: pd.Series, sample: int = 200) -> bool:
    """Whether a column's first cells are non-decreasing epoch seconds of 1973-2099 (1e8 .. 4.1e9)."""
    numbers, _ = _parse_values(cells.head(sample))
    return bool(len(numbers)) and bool(np.isfinite(numbers).all()) and 1e8 <= numbers.min() <= numbers.max() <= 4.1e9 \
        and bool((np.diff(numbers) >= 0).all())


def _holds_times(cells: pd.Series) -> bool:
    """A column of datetimes (any dtype pandas gives them) or of dates (Parquet date32)."""
    if pd.api.types.is_datetime64_any_dtype(cells):
        return True
    if cells.dtype != object:
        return False
    present = cells.dropna()
    return bool(len(present)) and isinstance(present.iloc[0], date)  # a datetime is a date too


def _row_sizes(frame: pd.DataFrame) -> np.ndarray:
    if not len(frame.columns):
        return np.zeros(len(frame), np.int64)
    sizes = np.zeros(len(frame), np.int64)
    for col in frame.columns:
        if frame[col].dtype == object:
            sizes += _utf8_sizes(_as_text(frame[col]))
        elif pd.api.types.is_string_dtype(frame[col]):
            sizes += _utf8_sizes(frame[col])
        else:
            sizes += 8  # a number's binary size (16 made a Parquet file of 4,100 channels all oversized)
    return sizes


def _utf8_sizes(texts: pd.Series) -> np.ndarray:
    """Each text cell's size in UTF-8 bytes, as a CSV line or a Kafka record is measured (0 where missing): counting
    characters let a Parquet row of 40,000 CJK characters (120,000 bytes) past a 64 KiB limit."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        lengths = pc.binary_length(pa.array(texts, type=pa.string(), from_pandas=True))
    except (pa.ArrowException, UnicodeError):  # a lone surrogate (an undecodable byte kept): cell by cell
        return np.array([len(t.encode("utf-8", "surrogatepass")) if isinstance(t, str) else 0 for t in texts],
                        np.int64)
    return lengths.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _as_text(cells: pd.Series) -> pd.Series:
    """Each cell as ``str`` would write it. pandas' string dtype (Arrow) refuses a lone surrogate such as
    ``"\\ud800"``, so a column holding one is converted cell by cell into Python strings instead: the id is then
    refused as ``bad_series_id`` with its row, not by an exception for the whole input."""
    if isinstance(cells.dtype, pd.CategoricalDtype):  # integer categories with a missing one turned into floats:
        cells = cells.astype(object)                   # "7.0", and two ids above 2**53 into one
    try:
        return cells.astype(str)
    except (UnicodeEncodeError, UnicodeDecodeError):  # decode: a binary cell that is no UTF-8 (raw UUID bytes)
        return pd.Series([_cell_text(cell) for cell in cells], index=cells.index, dtype=object)


def _cell_text(cell: Any) -> str:
    """Bytes as UTF-8 with the undecodable ones kept as lone surrogates: as an id such a cell is then refused
    (``bad_series_id``, not valid UTF-8) with its row; in a column nobody reads it only counts towards a row's size."""
    return cell.decode("utf-8", errors="surrogateescape") if isinstance(cell, bytes) else str(cell)


_MIN_US, _MAX_US = to_ns(MIN_TIMESTAMP) // 1000, to_ns(MAX_TIMESTAMP) // 1000
_MIN_S, _MAX_S = _MIN_US / 1e6, _MAX_US / 1e6
_NOT_A_TIME = np.iinfo(np.int64).min


def _parse_times(column: pd.Series) -> tuple[np.ndarray, dict[int, InvalidRecord]]:
    """Epoch ns per row and, for rows whose time cannot be used, the records module's verdict.

    Vectorised where pandas can, cell by cell (:func:`tidecast.stream.records.parse_timestamp`) for whatever it
    could not read, so one odd cell never decides for the rest of the column.
    """
    us = np.full(len(column), _NOT_A_TIME, np.int64)
    epoch_column = False
    if pd.api.types.is_datetime64_any_dtype(column):
        us = _datetimes_to_us(column)
    elif pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        us = _epoch_to_us(column.to_numpy(dtype=float, na_value=np.nan))
        epoch_column = True
    elif len(column) and _all_text(column):
        if isinstance(column.dtype, pd.CategoricalDtype):  # "" is no category: where() below raised TypeError
            column = column.astype(object)
        text = _texts(column.where(column.notna(), "")).str.strip()
        epoch_column = _mostly_numbers(text)
        iso = (text != "").to_numpy().copy()
        if epoch_column:
            numbers = _numbers(text)
            is_number = np.isfinite(numbers)
            us = np.where(is_number, _epoch_to_us(np.where(is_number, numbers, np.nan)), _NOT_A_TIME)
            iso &= ~is_number
        if iso.any():
            parsed = _datetimes_to_us(pd.to_datetime(text.where(iso), utc=True, errors="coerce", format="ISO8601"))
            us = np.where(iso, parsed, us)
    bad = (us == _NOT_A_TIME) | (us < _MIN_US) | (us > _MAX_US)
    errors: dict[int, InvalidRecord] = {}
    values = column.to_numpy(dtype=object)
    for row in np.flatnonzero(bad).tolist():
        try:
            us[row] = to_ns(_time_cell(values[row], epoch_column)) // 1000
        except InvalidRecord as err:
            errors[row] = err
    return us * 1000, errors


def _has_plus(text: pd.Series) -> bool:
    cells = text.tolist()
    try:
        return "+" in "".join(cells)
    except TypeError:  # a string column's missing cells are NaN, not text
        return "+" in "".join(c for c in cells if isinstance(c, str))


def _all_text(column: pd.Series) -> bool:
    if pd.api.types.is_string_dtype(column) and column.dtype != object:
        return True
    # over the cells, not the categories: a categorical's map() returns a categorical, which has no all()
    # bytes are text too (Parquet binary): one undecodable cell then costs its row, not the column's fast path
    return all(isinstance(v, str | bytes) or _missing(v) for v in column.to_numpy(dtype=object))


def _mostly_numbers(text: pd.Series, sample: int = 2001) -> bool:
    """Whether most non-blank cells are numbers (an epoch-seconds column), judged on an even sample."""
    cells = text[text != ""]
    if len(cells) > sample:
        cells = cells.iloc[np.linspace(0, len(cells) - 1, sample).astype(np.int64)]
    return 2 * int(pd.to_numeric(cells, errors="coerce").notna().sum()) > len(cells)


def _missing(value: Any) -> bool:
    """A missing cell in any of its spellings: ``None``, NaN, ``pd.NA`` (nullable columns), ``NaT``."""
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def _time_cell(raw: Any, epoch_column: bool) -> datetime:
    """One cell by the records module's rules (a number is epoch seconds; text is ISO-8601, or a number in an
    epoch-seconds column)."""
    if isinstance(raw, np.generic):
        raw = raw.item()
    if _missing(raw):
        return parse_timestamp(None)
    if isinstance(raw, datetime):  # Parquet timestamps: naive is UTC
        try:
            ts = raw.replace(tzinfo=UTC) if raw.tzinfo is None else raw.astimezone(UTC)
        except (OverflowError, NotImplementedError, ValueError):  # no UTC time in a datetime (year 1 at +01:00,
            # a pandas Timestamp of year 292278994, naive or zoned): the verdict the wire gives its text
            return parse_timestamp(_iso_text(raw))
        return parse_timestamp(ts.isoformat())
    if isinstance(raw, date):  # Parquet date32 (daily data): midnight UTC
        return parse_timestamp(datetime(raw.year, raw.month, raw.day, tzinfo=UTC).isoformat())
    if isinstance(raw, Decimal):  # a Parquet DECIMAL column of epoch seconds (database exports): a number
        return parse_timestamp(float(raw))
    if isinstance(raw, time):  # Parquet time64: a clock reading, no day to place it on
        raise InvalidRecord("bad_timestamp", f"{raw.isoformat()} is a time of day without a date")
    if isinstance(raw, str) and epoch_column:
        # a number by parse_value's grammar (float() alone also takes "1_000" and other scripts' digits);
        # other text in an epoch column: ISO-8601 or nothing
        return parse_timestamp(float(raw) if is_number_text(raw) else raw)
    return parse_timestamp(raw)


def _epoch_to_us(seconds: np.ndarray) -> np.ndarray:
    """Microseconds since the epoch, as :func:`datetime.fromtimestamp` rounds them (whole seconds apart, then the
    fraction times 1e6 rounded half to even: ``seconds * 1e6`` rounded would be a microsecond off for some values,
    e.g. 123.4567895); out of range -> not a time."""
    ok = np.isfinite(seconds) & (seconds >= _MIN_S) & (seconds <= _MAX_S)
    whole = np.trunc(np.where(ok, seconds, 0.0))
    fraction_us = np.round((np.where(ok, seconds, 0.0) - whole) * 1e6)
    us = whole.astype(np.int64) * 1_000_000 + fraction_us.astype(np.int64)
    return np.where(ok, us, _NOT_A_TIME)


def _datetimes_to_us(column: pd.Series) -> np.ndarray:
    zoned = isinstance(column.dtype, pd.DatetimeTZDtype) or getattr(getattr(column.dtype, "pyarrow_dtype", None),
                                                                     "tz", None) is not None
    naive = column.dt.tz_convert(None) if zoned else column  # an Arrow-backed zoned column too (read_parquet's)
    try:
        return naive.astype("datetime64[us]").to_numpy().view(np.int64)
    except (OverflowError, pd.errors.OutOfBoundsDatetime):
        # a coarser unit holds times microseconds cannot (Java's Long.MAX_VALUE ms, a "no end" sentinel): those
        # cells are no time here, and the cell-by-cell verdict names them; the whole file was refused
        return _coarse_to_us(naive.to_numpy())


def _coarse_to_us(stamps: np.ndarray) -> np.ndarray:
    """Microseconds of a ``datetime64[s]`` or ``[ms]`` array; a time beyond int64 microseconds (or NaT) -> not a
    time."""
    unit = np.datetime_data(stamps.dtype)[0]
    factor = {"D": 86_400_000_000, "h": 3_600_000_000, "m": 60_000_000, "s": 1_000_000, "ms": 1_000}[unit]
    raw = stamps.view(np.int64)
    ok = (raw != _NOT_A_TIME) & (raw >= _MIN_US // factor) & (raw <= _MAX_US // factor)
    return np.where(ok, np.where(ok, raw, 0) * factor, _NOT_A_TIME)


def _parse_values(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Floats per cell and a mask of cells that fail :func:`tidecast.stream.records.parse_value`."""
    if (pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
            and not pd.api.types.is_complex_dtype(column)):  # complex: wrong_type, as parse_value says
        values = column.to_numpy(dtype=float, na_value=np.nan)
    else:
        values = _numbers(_texts(column).str.strip())
    return values, ~np.isfinite(values)


def _texts(column: pd.Series) -> pd.Series:
    """Each cell as text for the vectorised parsers. A cell with no UTF-8 text (bytes that do not decode, a lone
    surrogate) reads as blank here, so the cell-by-cell verdict on its raw value decides it, with its row only."""
    try:
        return column.astype(str)
    except UnicodeError:  # astype raised for the whole column over one such cell
        return column.astype(object).map(_text_or_blank)


def _text_or_blank(cell: Any) -> str:
    try:
        text = cell.decode("utf-8") if isinstance(cell, bytes) else str(cell)
        text.encode("utf-8")
    except UnicodeError:
        return ""
    return text


def _numbers(text: pd.Series) -> np.ndarray:
    """Floats of stripped text cells by :func:`tidecast.stream.records.parse_value`'s grammar (NaN where not a
    number). pandas reads a number with a leading "+" up to a unit in the last place off ``float()``'s value and
    takes "+1e 5" as 1e5: such cells are read again without their sign and judged by the grammar, in one vectorised
    pass, so a text gives the same double on every input."""
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float, copy=True)
    if not _has_plus(text):  # the usual column: one C-level scan, no per-cell pass
        return numbers
    signed = np.flatnonzero(text.str.startswith("+", na=False).to_numpy())
    if signed.size:  # pandas reads the unsigned rest exactly; the grammar judges the whole cell
        cells = text.iloc[signed]
        exact = pd.to_numeric(cells.str[1:], errors="coerce").to_numpy(dtype=float)
        grammar = cells.str.fullmatch(NUMBER_TEXT, flags=re.ASCII).to_numpy(dtype=bool)
        numbers[signed] = np.where(grammar, exact, np.nan)
    return numbers


def _why(parser: Any, raw: Any) -> InvalidRecord:
    """The records module's verdict on a raw cell the vectorised path flagged."""
    try:
        parser(None if _missing(raw) else raw)
    except InvalidRecord as err:
        return err
    return InvalidRecord("wrong_type", f"unreadable cell {raw!r}")


def _raw_rows(frame: pd.DataFrame, rows: np.ndarray) -> list[dict[str, Any]]:
    """Rows' cells as JSON can hold them: missing cells null, non-finite numbers as text (``"inf"``)."""
    if not len(rows):  # to_dict of no rows still costs a step per column: per channel of a wide file, squared
        return []
    return [{str(k): _raw_cell(v) for k, v in record.items()} for record in frame.iloc[rows].to_dict("records")]


def _iso_text(stamp: datetime) -> str:
    """``stamp`` as ISO-8601 text, also a pandas Timestamp beyond Python's years (Java's Long.MAX_VALUE ms in a
    Parquet column), whose ``isoformat`` and ``str`` raise."""
    try:
        return stamp.isoformat()
    except (NotImplementedError, ValueError, OverflowError):
        if not isinstance(stamp, pd.Timestamp):
            raise
        return str(np.datetime_as_string(stamp.asm8)) + ("+00:00" if stamp.tzinfo is not None else "")


def _raw_cell(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, pd.Timestamp):
        try:
            str(value)  # what the dead-letter JSON writes
        except (NotImplementedError, ValueError, OverflowError):
            return _iso_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else repr(value)
    return None if _missing(value) else value


def _value_letters(table: Table, column: str, bad: np.ndarray, source: str, series_of: Any) -> list[DeadLetter]:
    rows = np.flatnonzero(bad)
    cells = table.frame[column].to_numpy(dtype=object)
    return [DeadLetter((err := _why(parse_value, cells[row])).reason, f"{series_of(row)}: {err.detail}", source,
                       (0, int(table.rows[row])), raw)
            for row, raw in zip(rows.tolist(), _raw_rows(table.frame, rows), strict=True)]


def _id_letters(table: Table, err: InvalidRecord, bad: np.ndarray, source: str) -> list[DeadLetter]:
    rows = np.flatnonzero(bad)
    return [DeadLetter(err.reason, err.detail, source, (0, int(table.rows[row])), raw)
            for row, raw in zip(rows.tolist(), _raw_rows(table.frame, rows), strict=True)]


def _channels(frame: pd.DataFrame, spec: ReplaySpec, time_col: str) -> list[Any]:
    """A wide table's value columns: ``--columns`` if given, else every column but the time column and those
    without a header (the row numbers ``DataFrame.to_csv()`` writes by default, or the empty column after a
    trailing comma on every line), which name no series.

    >>> frame = pd.DataFrame({"": [0, 1], "ds": ["2024-01-01", "2024-01-02"], "a": [1.0, 2.0]})
    >>> _channels(frame, ReplaySpec(path="x.csv"), "ds")
    ['a']
    """
    if spec.columns:
        return list(spec.columns)
    return [c for c in frame.columns if c != time_col and not _headerless(c)]


def _headerless(column: Any) -> bool:
    """A column with an empty header (as read here) or pandas' stand-in for one (``Unnamed: 0``)."""
    return not str(column).strip() or re.fullmatch(r"Unnamed: \d+", str(column)) is not None


def _wide(table: Table, spec: ReplaySpec, time_col: str, t_ns: np.ndarray, good_rows: np.ndarray,
          source: str, name: str | None) -> tuple[ObservationBatch, list[DeadLetter]]:
    frame = table.frame
    channels = _channels(frame, spec, time_col)
    missing = [c for c in channels if c not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} not in {list(frame.columns)}")
    ids, times, values, rows, letters = [], [], [], [], []
    all_rows = np.arange(len(frame))
    for col in channels:
        series_id = f"{name}/{col}" if name else str(col)
        try:
            parse_series_id(series_id)
        except InvalidRecord as err:  # a channel whose name makes no valid id: every cell of it is refused
            letters.extend(_id_letters(table, err, good_rows, source))
            continue
        vals, bad = _parse_values(frame[col])
        bad &= good_rows
        letters.extend(_value_letters(table, col, bad, source, lambda _r, sid=series_id: sid))
        keep = good_rows & ~bad
        ids.append(np.full(int(keep.sum()), series_id, dtype=object))
        times.append(t_ns[keep])
        values.append(vals[keep])
        rows.append(all_rows[keep])
    # Interleave channels row by row (row-major), the order a live wide stream arrives in.
    index = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = np.argsort(index, kind="stable")
    obs = ObservationBatch(np.concatenate(ids)[order] if ids else np.zeros(0, object),
                           np.concatenate(times)[order] if times else np.zeros(0, np.int64),
                           np.concatenate(values)[order] if values else np.zeros(0), None,
                           table.rows[index[order]])
    return obs, letters


def _long(table: Table, spec: ReplaySpec, t_ns: np.ndarray, good_rows: np.ndarray,
          source: str) -> tuple[ObservationBatch, list[DeadLetter]]:
    frame = table.frame
    raw_ids = frame[spec.series_column]
    # ids are kept as written, as Kafka keys and JSON lines keep them: stripping merged " OT" into "OT"
    series = _as_text(raw_ids)
    no_series = (series.str.strip() == "").to_numpy() | raw_ids.isna().to_numpy()
    letters = _id_letters(table, InvalidRecord("missing_field", "series_id is missing"), no_series & good_rows,
                          source)
    # Each distinct id is checked once and its rows found through one factorisation: a mask over the whole file
    # per refused id made a file of many refused ids (longer than 256 bytes, say) quadratic in its length
    codes, uniques = pd.factorize(series)
    refused: dict[int, InvalidRecord] = {}
    for code in np.unique(codes[good_rows & ~no_series]).tolist():
        try:
            parse_series_id(uniques[code])
        except InvalidRecord as err:
            refused[code] = err
    bad_id = good_rows & ~no_series & np.isin(codes, list(refused))
    rows = np.flatnonzero(bad_id)
    letters.extend(DeadLetter(refused[code].reason, refused[code].detail, source, (0, int(table.rows[row])), raw)
                   for row, code, raw in zip(rows.tolist(), codes[rows].tolist(), _raw_rows(frame, rows),
                                             strict=True))
    usable = good_rows & ~no_series & ~bad_id
    vals, bad = _parse_values(frame[spec.value_column])
    bad &= usable
    letters.extend(_value_letters(table, spec.value_column, bad, source, lambda r: series.iloc[r]))
    keep = usable & ~bad
    obs = ObservationBatch(series.to_numpy(dtype=object)[keep], t_ns[keep], vals[keep], None, table.rows[keep])
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
                letters.append(DeadLetter(err.reason, err.detail, str(path), (0, row), _raw_line(line, spec.max_bytes)))
                continue
            ids.append(obs.series_id)
            times.append(obs.timestamp_ns)
            values.append(obs.value)
            rows.append(row)
    batch = ObservationBatch(np.array(ids, dtype=object), np.array(times, np.int64), np.array(values), None,
                             np.array(rows, np.int64))
    return Replay(batch.take(np.argsort(batch.timestamps_ns, kind="stable")), letters, "jsonl")
