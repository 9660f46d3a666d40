"""A bounded per-series history: the last values each row learned, for models that keep none of their own.

CycleNet and cfc keep their recent values anyway (they train on windows of them), so a retrain job can refit
them on the data since a change point. A one-series online learner (river's) keeps only its running state: to
rebuild it on recent data something must remember that data. :class:`HistoryRing` does, in one ``float64``
array of ``capacity`` values per row (8 bytes x capacity a series: 816 values, the retrain defaults, are
6.5 KB), exported and restored with the row so a job interrupted by a crash refits on the same values. float32
halved that and rounded a series near 1e9 to steps of 64: a refit rebuilt its forecaster on a flat line (and
differences from a base value broke on a first value that was a spike).

>>> import numpy as np
>>> ring = HistoryRing(capacity=3)
>>> ring.resize(1)
>>> for v in [1.0, 2.0, 3.0, 4.0]:
...     ring.add(np.array([0]), np.array([v]))
>>> ring.recent(0, 10).tolist()  # the oldest value was overwritten
[2.0, 3.0, 4.0]
>>> ring.recent(0, 2).tolist()
[3.0, 4.0]
"""

from __future__ import annotations

import numpy as np

from tidecast.models.rows import ArrayDict, Field, RowTable

__all__ = ["HistoryRing"]

class HistoryRing:
    """Per row, the last ``capacity`` values added (oldest first when read back)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"history capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.table_ = RowTable(values=Field((capacity,), np.float64, np.nan), count=Field((), np.int64, 0))

    @property
    def bytes_per_row(self) -> int:
        return self.capacity * 8 + 8

    def resize(self, n_rows: int) -> None:
        self.table_.resize(n_rows)

    def add(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Append one value to each of ``rows`` (unique within a call)."""
        count = self.table_["count"]
        self.table_["values"][rows, count[rows] % self.capacity] = values
        count[rows] += 1

    def count(self, rows: np.ndarray) -> np.ndarray:
        """Values each row holds now (at most ``capacity``)."""
        return np.minimum(self.table_["count"][rows], self.capacity)

    def recent(self, row: int, n: int) -> np.ndarray:
        """The row's last ``min(n, held)`` values, oldest first (float64)."""
        total = int(self.table_["count"][row])
        n = min(int(n), total, self.capacity)
        at = (total - n + np.arange(n)) % self.capacity
        return self.table_["values"][row, at].astype(np.float64)

    def reset_rows(self, rows: np.ndarray) -> None:
        """Forget the rows' values (after a long gap the series does not continue them)."""
        self.table_.blank(rows)

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        return {f"history_{k}": v for k, v in self.table_.export_rows(rows).items()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        """Inverse of :meth:`export_rows`; a state saved without a ring (or with another capacity) starts the
        rows empty: the ring refills as values arrive."""
        self.table_.resize(int(np.max(rows)) + 1 if len(rows) else 0)
        values = state.get("history_values")
        if values is None or values.shape[1:] != (self.capacity,) or "history_count" not in state:
            self.table_.blank(rows)
            return
        self.table_.import_rows(rows, {"values": values, "count": state["history_count"]})
