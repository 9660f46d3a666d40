"""Columnar batches: what sources hand the engine and what the engine hands sinks.

Columns, not objects: at 10k observations/s with 24-step forecasts a replay emits ~240k forecast steps per
second, far more than Python objects can carry. :class:`ForecastBatch` turns into a pandas frame or
:class:`~tidecast.stream.records.ForecastRecord` objects only at the edge.

A *position* is where an observation came from: ``(partition, offset)`` for Kafka, ``(0, row)`` for a file.
The engine stores the last applied position per series, which is what makes restarts effectively-once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tidecast.monitors.scoring import level_name
from tidecast.stream.records import ForecastRecord, Observation, from_ns, to_ns


@dataclass
class ObservationBatch:
    """Decoded observations in arrival order."""

    series_ids: np.ndarray  # object array of str
    timestamps_ns: np.ndarray  # int64, ns since the epoch (UTC)
    values: np.ndarray  # float64, finite
    partitions: np.ndarray = field(default=None)  # type: ignore[assignment]  # int32
    offsets: np.ndarray = field(default=None)  # type: ignore[assignment]  # int64

    def __post_init__(self) -> None:
        n = len(self.values)
        self.series_ids = np.asarray(self.series_ids, dtype=object)
        self.timestamps_ns = np.asarray(self.timestamps_ns, dtype=np.int64)
        self.values = np.asarray(self.values, dtype=np.float64)
        self.partitions = np.zeros(n, np.int32) if self.partitions is None else np.asarray(self.partitions, np.int32)
        self.offsets = np.arange(n, dtype=np.int64) if self.offsets is None else np.asarray(self.offsets, np.int64)

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def from_observations(
        cls, observations: Sequence[Observation], positions: Sequence[tuple[int, int]] | None = None
    ) -> ObservationBatch:
        parts, offs = (zip(*positions, strict=True) if positions else ((), ()))
        return cls(
            series_ids=np.array([o.series_id for o in observations], dtype=object),
            timestamps_ns=np.array([to_ns(o.timestamp) for o in observations], dtype=np.int64),
            values=np.array([o.value for o in observations], dtype=np.float64),
            partitions=np.array(parts, np.int32) if positions else None,
            offsets=np.array(offs, np.int64) if positions else None,
        )

    def take(self, index: np.ndarray) -> ObservationBatch:
        return ObservationBatch(self.series_ids[index], self.timestamps_ns[index], self.values[index],
                                self.partitions[index], self.offsets[index])

    @classmethod
    def concat(cls, parts: Sequence[ObservationBatch]) -> ObservationBatch:
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls(np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0))
        cols = ("series_ids", "timestamps_ns", "values", "partitions", "offsets")
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in cols))


@dataclass
class Rejection:
    """An input the engine refused (out of order, unknown series); ``index`` points into the batch."""

    index: int
    reason: str
    detail: str


#: Columns of a forecast record frame; ``lo-<level>``/``hi-<level>`` follow for every interval level.
FORECAST_COLUMNS = ("series_id", "issued_at", "model", "h", "target_timestamp", "mean", "lower", "upper", "alpha")


def first_steps(counts: np.ndarray) -> np.ndarray:
    """Index of each forecast's first step, from the number of steps of each (contiguous) forecast.

    >>> first_steps(np.array([2, 1, 3])).tolist()
    [0, 2, 3]
    """
    counts = np.asarray(counts, np.int64)
    return np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64) if len(counts) else np.zeros(0, np.int64)


@dataclass
class ForecastBatch:
    """Forecast steps, one row per (series, origin, model, h).

    ``lower``/``upper`` are the interval at ``1 - alpha``, the first level. With several levels, ``levels`` names
    them (coverage in percent: ``("80", "95")``) and ``lowers``/``uppers`` hold every level's bounds, (n, levels);
    without, the batch has the one level of ``alpha``.
    """

    series_id: np.ndarray
    issued_at_ns: np.ndarray
    model: np.ndarray
    h: np.ndarray
    target_ns: np.ndarray
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    alpha: float
    levels: tuple[str, ...] = ()
    lowers: np.ndarray | None = None
    uppers: np.ndarray | None = None
    #: Index of each forecast's first step, where the maker knew it (the engine does); ``None``: found by comparing
    #: the columns (:func:`tidecast.stream.kafka.forecast_starts`). Whoever takes rows of a batch leaves it out.
    starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def level_names(self) -> tuple[str, ...]:
        """Every level's name, the first being ``alpha``'s."""
        return self.levels or (level_name(self.alpha),)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lowers, uppers)``, each (n, levels)."""
        if self.lowers is None or self.uppers is None:
            return self.lower[:, None], self.upper[:, None]
        return self.lowers, self.uppers

    @classmethod
    def empty(cls, alpha: float, levels: tuple[str, ...] = ()) -> ForecastBatch:
        z = np.zeros(0)
        many = np.zeros((0, len(levels))) if levels else None
        return cls(np.zeros(0, object), z.astype(np.int64), np.zeros(0, object), z.astype(np.int32),
                   z.astype(np.int64), z, z, z, alpha, levels, many, many)

    @classmethod
    def concat(cls, parts: Sequence[ForecastBatch], alpha: float, levels: tuple[str, ...] = ()) -> ForecastBatch:
        if not parts:
            return cls.empty(alpha, levels)
        if len(parts) == 1:
            return parts[0]
        cols = ("series_id", "issued_at_ns", "model", "h", "target_ns", "mean", "lower", "upper")
        many: dict[str, Any] = {}
        if levels:
            bounds = [p.bounds() for p in parts]
            many = {"lowers": np.concatenate([b[0] for b in bounds]), "uppers": np.concatenate([b[1] for b in bounds])}
        if all(p.starts is not None for p in parts):
            offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
            many["starts"] = np.concatenate([p.starts + o for p, o in zip(parts, offsets, strict=True)])
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in cols), alpha=alpha, levels=levels,
                   **many)

    def to_frame(self) -> pd.DataFrame:
        """A pandas frame with the forecast record's columns (timestamps as UTC datetimes), then ``lo-<level>``
        and ``hi-<level>`` for every level."""
        frame = pd.DataFrame({
            "series_id": series_ids_as_text(self.series_id),
            # nanoseconds named: pandas reads an *empty* int64 array as seconds, and a run that forecast nothing
            # wrote its Parquet timestamps in ms (files of one dataset then disagreed on the schema)
            "issued_at": pd.to_datetime(self.issued_at_ns, unit="ns", utc=True),
            "model": self.model.astype(str),
            "h": self.h,
            "target_timestamp": pd.to_datetime(self.target_ns, unit="ns", utc=True),
            "mean": self.mean,
            "lower": self.lower,
            "upper": self.upper,
            "alpha": np.full(len(self), self.alpha),
        })
        lowers, uppers = self.bounds()
        for i, level in enumerate(self.level_names):
            frame[f"lo-{level}"], frame[f"hi-{level}"] = lowers[:, i], uppers[:, i]
        return frame

    def records(self) -> Iterator[ForecastRecord]:
        """One record per step (the first level's interval)."""
        for i in range(len(self)):
            yield ForecastRecord(
                str(self.series_id[i]), from_ns(int(self.issued_at_ns[i])), str(self.model[i]), int(self.h[i]),
                from_ns(int(self.target_ns[i])), float(self.mean[i]), float(self.lower[i]), float(self.upper[i]),
                self.alpha,
            )


@dataclass
class ActualBatch:
    """Real observations as placed on their series' grid: ``target_ns`` is the grid time of the tick, the time a
    forecast of that step targets, so forecasts and their outcomes join on ``(series_id, target_ns)``."""

    series_id: np.ndarray  # object array of str
    target_ns: np.ndarray  # int64
    value: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.value)

    @classmethod
    def empty(cls) -> ActualBatch:
        return cls(np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0))

    @classmethod
    def concat(cls, parts: Sequence[ActualBatch]) -> ActualBatch:
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in ("series_id", "target_ns", "value")))


def series_ids_as_text(series_id: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """Series ids as pandas strings, each as written: numpy's fixed-width ``astype(str)`` drops trailing NULs, so
    ``"a\\0"`` and ``"a"`` became one series in the output files (only a leading NUL is refused)."""
    return pd.array([str(sid) for sid in series_id.tolist()], dtype="str")
