"""Per-series arrays: one row per series, many named fields, grown as series arrive.

Models, calibrators, pending forecasts and scorers all keep their per-series state the same way: numpy arrays whose
first axis is the series row, resized with amortised doubling, cut out row by row for a checkpoint
(``export_rows``), written back into other rows of another table (``import_rows``), and blanked when a row is handed
to a new series. :class:`RowTable` does that once. It lives in :mod:`tidecast.models`, the lowest layer: monitors and
stream import it, models never import them.

>>> import numpy as np
>>> table = RowTable(history=Field((3,), np.float64, np.nan), count=Field(dtype=np.int64))
>>> table.resize(2)
>>> table["history"][1] = [1.0, 2.0, 3.0]
>>> table["count"][1] = 3
>>> state = table.export_rows(np.array([1]))
>>> other = RowTable(history=Field((3,), np.float64, np.nan), count=Field(dtype=np.int64))
>>> other.import_rows(np.array([4]), state)  # grows to hold row 4
>>> other.n_rows, other["history"][4].tolist(), int(other["count"][4])
(5, [1.0, 2.0, 3.0], 3)
>>> other.blank(np.array([4]))
>>> other["history"][4].tolist(), int(other["count"][4])
([nan, nan, nan], 0)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

ArrayDict = dict[str, np.ndarray]


def under(prefix: str, arrays: ArrayDict) -> ArrayDict:
    """The entries of ``arrays`` whose key starts with ``prefix``, the prefix removed: a part's own state out of a
    state that nests several parts (``under("pool/", {"pool/scale": s, "det/x": x}) == {"scale": s}``)."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def nest(prefix: str, arrays: ArrayDict) -> ArrayDict:
    """``arrays`` with ``prefix`` put before every key; :func:`under` undoes it."""
    return {prefix + k: v for k, v in arrays.items()}

#: Smallest capacity a table allocates: growing one row at a time would copy on every new series.
MIN_CAPACITY = 8


#: Tables this large grow by a quarter instead of doubling: the copies stay amortised O(1), and the spare rows
#: (whose fills are written, so resident) cost at most a quarter instead of up to a whole table (10,000 series at
#: H = 96: 16,384 rows by doubling, ~134 kB a series instead of ~126 kB).
LARGE_CAPACITY = 4096


def capacity_for(current: int, n_rows: int) -> int:
    """The capacity that holds ``n_rows``: unchanged if it already fits, else at least double (a quarter more past
    :data:`LARGE_CAPACITY`), so growing is amortised O(1).

    >>> capacity_for(8, 9), capacity_for(8192, 8193), capacity_for(8192, 8000)
    (16, 10240, 8192)
    """
    if n_rows <= current:
        return current
    growth = current * 2 if current < LARGE_CAPACITY else current + current // 4
    return max(n_rows, growth, MIN_CAPACITY)


def grow(array: np.ndarray, n_rows: int, fill: Any) -> np.ndarray:
    """``array`` with at least ``n_rows`` rows (first axis), new rows set to ``fill``; the same array if it fits.

    >>> grow(np.zeros((2, 3)), 3, 1.0).shape
    (8, 3)
    """
    new_len = capacity_for(array.shape[0], n_rows)
    if new_len == array.shape[0]:
        return array
    if np.isscalar(fill) and fill == 0 and array.dtype != object:
        # calloc'd: the spare rows stay untouched zero pages until used, so doubling costs no resident memory
        out = np.zeros((new_len, *array.shape[1:]), dtype=array.dtype)
    else:
        out = np.empty((new_len, *array.shape[1:]), dtype=array.dtype)
        out[array.shape[0] :] = fill
    out[: array.shape[0]] = array
    return out


@dataclass(frozen=True)
class Field:
    """One per-row field: trailing ``shape`` after the row axis, ``dtype``, and the ``fill`` of a blank row
    (a scalar, or an array broadcastable to ``shape``)."""

    shape: tuple[int, ...] = ()
    dtype: Any = np.float64
    fill: Any = 0


class RowTable:
    """Named arrays sharing one row axis (first axis = series row); see the module docstring.

    Arrays are allocated for :attr:`capacity` rows (>= :attr:`n_rows`, the rows in use); ``table[name]`` is the
    whole array, so hot paths index it directly. The arrays are replaced when the table grows: read them from
    the table (or through :class:`Column`) rather than keeping a reference across a :meth:`resize`.
    """

    def __init__(self, **fields: Field) -> None:
        self.fields = dict(fields)
        self.n_rows = 0
        self.capacity = 0
        self._arrays = {name: np.empty((0, *f.shape), dtype=f.dtype) for name, f in self.fields.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    def resize(self, n_rows: int) -> None:
        """Make room for at least ``n_rows`` rows; new rows are blank."""
        capacity = capacity_for(self.capacity, n_rows)
        if capacity > self.capacity:
            for name, f in self.fields.items():
                self._arrays[name] = grow(self._arrays[name], capacity, f.fill)
            self.capacity = capacity
        self.n_rows = max(self.n_rows, n_rows)

    def blank(self, rows: np.ndarray, names: Iterable[str] | None = None) -> None:
        """Reset ``rows`` (all fields, or only ``names``) to their fill, as if no series had used them."""
        for name in self.fields if names is None else names:
            self._arrays[name][rows] = self.fields[name].fill

    def export_rows(self, rows: np.ndarray, names: Iterable[str] | None = None) -> ArrayDict:
        """Copies of ``rows`` of every field (or of ``names``): ``{name: array of shape (len(rows), *shape)}``."""
        return {name: self._arrays[name][rows] for name in (self.fields if names is None else names)}

    def import_rows(self, rows: np.ndarray, state: ArrayDict, names: Iterable[str] | None = None) -> None:
        """Write exported rows into ``rows`` (growing the table if needed); a missing or misshapen field is a
        ``ValueError`` naming it."""
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size == 0:
            return
        self.resize(int(rows.max()) + 1)
        for name in self.fields if names is None else names:
            if name not in state:
                raise ValueError(f"row state has no field {name!r} (has: {', '.join(sorted(state)) or 'none'})")
            value = np.asarray(state[name])
            expected = (rows.size, *self.fields[name].shape)
            if value.shape != expected:
                raise ValueError(f"row state field {name!r} has shape {value.shape}, expected {expected}")
            self._arrays[name][rows] = value


class Column:
    """A class attribute that reads one field of the owner's :class:`RowTable` (kept in attribute ``table``), so
    code can say ``self.count_[rows]`` while the table owns and grows the array.

    >>> class Counter:
    ...     count_ = Column("count", table="rows_")
    ...     def __init__(self):
    ...         self.rows_ = RowTable(count=Field(dtype=np.int64))
    >>> c = Counter()
    >>> c.rows_.resize(3)
    >>> c.count_[1] += 5
    >>> c.count_.tolist()[:3]
    [0, 5, 0]
    """

    def __init__(self, name: str, table: str = "table_") -> None:
        self.name = name
        self.table = table

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj, self.table)[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.name!r} belongs to the row table {self.table!r}: write into it, do not rebind it")
