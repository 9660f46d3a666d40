"""Sinks: where forecasts, drift events and dead letters go. Files here; Kafka topics in
:mod:`tidecast.stream.kafka`.

Forecast sinks take :class:`~tidecast.stream.batch.ForecastBatch` columns and write incrementally, so a long replay
never holds its whole output in memory. Event sinks take :class:`~tidecast.monitors.drift.DriftEvent` lists; the
file sink writes one JSON object per line: ``{"series_id", "model", "detector", "kind", "detected_at",
"statistic"}``. Dead-letter sinks take :class:`~tidecast.stream.sources.DeadLetter` entries; the file sink writes
one JSON object per line: ``{"reason", "detail", "source", "partition", "offset", "raw"}``.

Every sink has three verbs: ``write``; ``flush``, the durability hook a checkpoint calls before it saves state
(everything written so far is stored, or the call raises); ``close``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from tidecast.monitors.drift import DriftEvent
from tidecast.stream.batch import ForecastBatch
from tidecast.stream.sources import DeadLetter

#: Version of the JSON an event is written as (files and the events topic).
EVENT_SCHEMA_VERSION = 1


class ForecastSink(Protocol):
    def write(self, batch: ForecastBatch) -> None: ...

    def flush(self) -> None:
        """Make everything written so far durable, or raise."""

    def close(self) -> None: ...


class EventSink(Protocol):
    def write(self, events: Iterable[DriftEvent]) -> None: ...

    def flush(self) -> None:
        """Make everything written so far durable, or raise."""

    def close(self) -> None: ...


def event_json(event: DriftEvent) -> str:
    """One event as compact JSON (a non-finite statistic as null), with ``schema_version``."""
    fields = event.to_dict()
    if not math.isfinite(fields["statistic"]):
        fields["statistic"] = None
    return json.dumps({**fields, "schema_version": EVENT_SCHEMA_VERSION}, separators=(",", ":"), allow_nan=False)


class JsonlEvents:
    """Drift events as JSON lines (:func:`event_json`); the file is created when the sink is, so an empty file
    says the run raised none. ``counts`` holds the events written per ``(model, detector)``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8")
        self.counts: dict[tuple[str, str], int] = {}

    def write(self, events: Iterable[DriftEvent]) -> None:
        for event in events:
            with naming(self.path):
                self._fh.write(event_json(event) + "\n")
            key = (event.model, event.detector)
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> None:
        with naming(self.path):
            self._fh.flush()

    def close(self) -> None:
        with naming(self.path):
            self._fh.close()


class DeadLetterSink(Protocol):
    def write(self, letter: DeadLetter) -> None: ...

    def flush(self) -> None:
        """Make everything written so far durable, or raise."""

    def close(self) -> None: ...


class NullSink:
    """Discards forecasts or events (a replay run for its summary only)."""

    def write(self, batch: ForecastBatch | Iterable[DriftEvent]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ParquetSink:
    """Appends row groups to one Parquet file. A run that issues no forecast leaves a file of no rows (with the
    columns where the run said them), never an earlier run's rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._writer: pq.ParquetWriter | None = None
        self._empty: ForecastBatch | None = None  # an empty batch: the columns of a run that forecast nothing
        self._closed = False

    def write(self, batch: ForecastBatch) -> None:
        if not len(batch):
            if self._empty is None:
                self._empty = batch
            return
        self._write(pa.Table.from_pandas(batch.to_frame(), preserve_index=False))

    def _write(self, table: pa.Table) -> None:
        with naming(self.path):
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self.path, table.schema)
            self._writer.write_table(table)

    def flush(self) -> None:
        """Row groups are in the file once written; only the footer waits for :meth:`close`."""

    def close(self) -> None:
        if self._closed:
            return
        if self._writer is None:
            self._write(pa.Table.from_pandas(self._empty.to_frame(), preserve_index=False)
                        if self._empty is not None else pa.table({}))
        writer, self._writer, self._closed = self._writer, None, True
        with naming(self.path):
            writer.close()


class CsvSink:
    """Appends rows to one CSV file (header once). A run that issues no forecast leaves the file with the header
    alone, never an earlier run's rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._started = False
        self._empty: ForecastBatch | None = None  # an empty batch: the columns of a run that forecast nothing

    def write(self, batch: ForecastBatch) -> None:
        if not len(batch):
            if self._empty is None:
                self._empty = batch
            return
        frame = batch.to_frame()
        with naming(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(self.path, mode="a" if self._started else "w", header=not self._started, index=False,
                         quoting=_quoting(frame))
        self._started = True

    def flush(self) -> None:
        """Each write opens, appends and closes the file."""

    def close(self) -> None:
        if not self._started:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._empty is not None:
                self._empty.to_frame().to_csv(self.path, index=False)
            else:
                self.path.write_text("", encoding="utf-8")
            self._started = True


def _quoting(frame) -> int:
    """Minimal quoting, unless a text cell holds a carriage return: pandas writes lines ending in ``\\n`` and
    its minimal quoting quotes only the line ending's characters, so ``"a\\rb"`` went out bare and every standard
    reader split the row there. Such a batch quotes its text cells (numbers stay bare)."""
    for name in frame.columns:
        column = frame[name]
        if column.dtype.kind not in "biufcmM" and column.astype(str).str.contains("\r", regex=False).any():
            return csv.QUOTE_NONNUMERIC
    return csv.QUOTE_MINIMAL


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An ``OSError`` inside names ``path``: a disk that filled mid-run said only ``[Errno 28] No space left on
    device``, with four outputs to choose from."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None


def written_in_place(path: Path) -> bool:
    """A device, pipe or link (``/dev/null``, ``/dev/stdout``): written into as it is, never removed or renamed
    over (a rename replaced the device or link; as root, ``--summary-json /dev/null`` deleted it)."""
    return path.is_symlink() or (path.exists() and not path.is_file())


def write_whole(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all (a temporary file beside it, then renamed): a disk that filled
    left a summary cut at 8,192 bytes, invalid JSON, at the path a pipeline reads. A failure names the path. A path
    :func:`written_in_place` is written straight into."""
    if written_in_place(path):
        with naming(path):
            path.write_text(text, encoding="utf-8")
        return
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None


def forecast_sink_for(path: str | Path | None) -> ForecastSink:
    """A file sink chosen by extension (``.parquet`` or ``.csv``), or a null sink."""
    if path is None:
        return NullSink()
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return ParquetSink(path)
    if suffix == ".csv":
        return CsvSink(path)
    raise ValueError(f"--out must end in .parquet or .csv, got {path}")


class JsonlDeadLetters:
    """Dead letters as JSON lines. The file is created on the first letter; a run with none creates no file and
    empties one an earlier run left at the path (it would be read as this run's)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = None
        self.count = 0

    def write(self, letter: DeadLetter) -> None:
        with naming(self.path):
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("w", encoding="utf-8")
            self._fh.write(letter.to_json() + "\n")
        self.count += 1

    def flush(self) -> None:
        if self._fh is not None:
            with naming(self.path):
                self._fh.flush()

    def close(self) -> None:
        if self._fh is None and not self.count and self.path.is_file():
            self.path.write_text("", encoding="utf-8")  # an earlier run's letters: this run had none
        elif self._fh is not None:
            fh, self._fh = self._fh, None
            with naming(self.path):
                fh.close()
