"""Label-based drift detectors over a table of series rows: matured residuals in, alarms out.

A detector sees, for every series row, the residual ``y - yhat`` of a forecast when it matures (the engine passes
the h = 1 one) and, optionally, whether the interval issued with it covered ``y``. It answers which rows drifted
now. Everything is arrays over rows, like the calibrators (:mod:`tidecast.monitors.conformal.base`): per-row
state, :meth:`~DriftDetector.resize`, :meth:`~DriftDetector.update` for the rows that matured, per-row
:meth:`~DriftDetector.export_rows` / :meth:`~DriftDetector.import_rows`, and :meth:`~DriftDetector.reset_rows`
for when the series' model is retrained or replaced (its residuals then restart from a new reference).
A row that alarms resets itself.

* :class:`ResidualCUSUM` (``"cusum"``, the default) standardises each residual by the row's own reference
  (mean and standard deviation since its last reset, with a long memory), whitens it with the row's lag-1
  autocorrelation (forecast residuals are autocorrelated: a raw CUSUM on them false-alarms), and runs CUSUMs on
  the innovation (a level or bias change, both ways), on its square (a variance increase, and a collapse: a
  frozen sensor's residuals vanish) and on interval misses against the target rate ``alpha`` (a coverage drop).
* :class:`D3A` is the z-test of D3A's detect-then-adapt loop (Zhang et al. 2024), vectorised: the mean squared
  residual of the last 16 steps against the mean since the last reset.
* river's ADWIN, PageHinkley and KSWIN behind the same interface (one river object per row) are in
  :mod:`tidecast.monitors.drift_river`; they are slow references for bench/drift.py.

An alarm becomes a :class:`DriftEvent` once the caller names the row's series, the model and the time.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> detector = ResidualCUSUM()
>>> rows = np.arange(2)
>>> fired = []
>>> for t in range(600):
...     residuals = rng.normal(size=2) + np.array([0.0, 3.0 if t >= 500 else 0.0])  # row 1 shifts at t = 500
...     alarms = detector.update(rows, residuals)
...     fired += [(int(r), str(k), t - 500) for r, k in zip(alarms.rows, alarms.kind)]
>>> [(row, kind) for row, kind, _ in fired], 0 <= fired[0][2] < 10
([(1, 'mean')], True)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from tidecast.monitors.conformal.base import ArrayDict, grow

__all__ = ["D3A", "DEFAULT_DETECTOR", "DETECTORS", "Alarms", "DriftDetector", "DriftEvent", "ResidualCUSUM",
           "make_detector"]


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """One alarm of one detector on one series' model.

    ``kind`` is what moved (``"mean"``, ``"variance"``, ``"coverage"``, ``"distribution"``, ``"loss"``);
    ``statistic`` is the detector's statistic when it fired (signed: negative for a downward change);
    ``detected_at`` the event time of the residual that triggered it. ``(series_id, model, detector,
    detected_at)`` identifies an event, so consumers can de-duplicate a redelivered one.

    >>> event = DriftEvent("ETTh2/OT", "cyclenet", "cusum", "mean", datetime(2017, 1, 1, tzinfo=UTC), 9.5)
    >>> event.to_dict()["detected_at"]
    '2017-01-01T00:00:00Z'
    >>> DriftEvent.from_dict(event.to_dict()) == event
    True
    """

    series_id: str
    model: str
    detector: str
    kind: str
    detected_at: datetime
    statistic: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; the time as ISO-8601 UTC with a ``Z``."""
        return {"series_id": self.series_id, "model": self.model, "detector": self.detector, "kind": self.kind,
                "detected_at": self.detected_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "statistic": float(self.statistic)}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> DriftEvent:
        stamp = datetime.fromisoformat(str(fields["detected_at"]).replace("Z", "+00:00"))
        return cls(str(fields["series_id"]), str(fields["model"]), str(fields["detector"]), str(fields["kind"]),
                   stamp, float(fields["statistic"]))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Alarms:
    """The rows that alarmed in one :meth:`DriftDetector.update` call, with what moved and the statistic."""

    rows: np.ndarray  # int64 (m,)
    kind: np.ndarray  # str (m,)
    statistic: np.ndarray  # float (m,)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def empty(cls) -> Alarms:
        return cls(np.zeros(0, np.int64), np.zeros(0, dtype="<U12"), np.zeros(0))

    def events(self, series_ids: np.ndarray, model: str, detector: str, detected_at_ns: np.ndarray) -> list[DriftEvent]:
        """:class:`DriftEvent` objects; ``series_ids`` and ``detected_at_ns`` are indexed by row."""
        return [DriftEvent(str(series_ids[r]), model, detector, str(k),
                           _EPOCH + timedelta(microseconds=int(detected_at_ns[r]) // 1000), float(s))
                for r, k, s in zip(self.rows.tolist(), self.kind, self.statistic.tolist(), strict=True)]


class DriftDetector(ABC):
    """Base class: per-row state in one float table ``state_`` (fields, rows); fitted state ends in ``_``.

    Subclasses declare their fields in ``_fields`` (name -> value of a fresh row) and implement :meth:`_step`,
    which reads and writes the gathered columns of the rows being updated.
    """

    #: Registry name, used as the ``detector`` label of events and metrics.
    name: str = "detector"
    _fields: dict[str, float] = {}

    def __init__(self) -> None:
        self._index = {f: i for i, f in enumerate(self._fields)}
        self._fresh = np.array(list(self._fields.values()), dtype=float)
        self.state_ = np.zeros((len(self._fields), 0))
        self.n_rows_ = 0

    # -- table management -------------------------------------------------------------------------
    def resize(self, n_rows: int) -> None:
        """Grow the table to at least ``n_rows`` rows; new rows start fresh."""
        if self.state_.shape[1] < n_rows:
            old = self.state_.shape[1]
            grown = grow(self.state_.T, n_rows, 0.0)
            grown[old:] = self._fresh
            self.state_ = np.ascontiguousarray(grown.T)
        self.n_rows_ = max(self.n_rows_, n_rows)

    def reset_rows(self, rows: np.ndarray) -> None:
        """Forget what these rows learned: after a retrain or promotion their reference restarts."""
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size:
            self.resize(int(rows.max()) + 1)
            self.state_[:, rows] = self._fresh[:, None]

    # -- the verb -----------------------------------------------------------------------------------
    def update(self, rows: np.ndarray, residuals: np.ndarray, covered: np.ndarray | None = None,
               scale: np.ndarray | float | None = None) -> Alarms:
        """Learn one matured residual per row; return the rows that alarmed (they are reset).

        rows: unique int row indices (n,). residuals: ``y - yhat`` (n,); non-finite entries are skipped.
        covered: optional bool (n,), True where the interval issued with the forecast held ``y``.
        scale: optional (n,) or scalar divisor (e.g. the calibrator's residual scale) applied first.
        """
        rows = np.asarray(rows, dtype=np.intp).reshape(-1)
        x = np.asarray(residuals, dtype=float).reshape(-1)
        if scale is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = x / np.asarray(scale, dtype=float)
        cov = None if covered is None else np.asarray(covered, dtype=bool).reshape(-1)
        ok = np.isfinite(x)
        if not ok.all():
            rows, x = rows[ok], x[ok]
            cov = None if cov is None else cov[ok]
        if rows.size == 0:
            return Alarms.empty()
        self.resize(int(rows.max()) + 1)
        contiguous = rows[-1] - rows[0] + 1 == rows.size and bool(np.all(np.diff(rows) == 1))
        # A contiguous run of rows (the engine's common case) is updated in place; others are gathered.
        cols = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        block = self.state_[:, cols]
        fired, kind, stat = self._step(block, x, cov)
        if fired.any():
            block[:, fired] = self._fresh[:, None]
        if not contiguous:
            self.state_[:, rows] = block
        return Alarms(rows[fired].astype(np.int64), kind[fired], stat[fired])

    @abstractmethod
    def _step(self, s: np.ndarray, x: np.ndarray, covered: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """Update the gathered state ``s`` (fields, n) in place with ``x`` (n,); return (fired, kind, statistic)."""

    def field(self, s: np.ndarray, name: str) -> np.ndarray:
        """One field's row of a gathered block (a view: writing to it writes the block)."""
        return s[self._index[name]]

    # -- state ------------------------------------------------------------------------------------
    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        """Per-row arrays (first axis = rows), one per field."""
        rows = np.asarray(rows, dtype=np.intp)
        self.resize(int(rows.max()) + 1 if rows.size else 0)
        return {name: self.state_[i, rows].copy() for name, i in self._index.items()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        """Inverse of :meth:`export_rows`."""
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size == 0:
            return
        self.resize(int(rows.max()) + 1)
        for name, i in self._index.items():
            self.state_[i, rows] = state[name]

    @abstractmethod
    def get_params(self) -> dict[str, Any]:
        """JSON-able constructor parameters."""


class ResidualCUSUM(DriftDetector):
    """CUSUMs on the whitened residual (level), on its square (variance up, collapse down) and on misses.

    Per row, with ``n`` residuals seen since the last reset and rate ``a = max(1/n, 1/memory)``:

    * **reference**: exponential mean ``m`` and variance ``v`` of the residual ``x`` and its lag-1
      autocorrelation ``phi`` (clipped to [-0.95, 0.95]). No alarm before ``warmup`` residuals.
    * **innovation** ``e = (z_t - phi z_{t-1}) / sqrt(1 - phi^2)`` with ``z = (x - m) / sqrt(v)``, computed against
      the reference *before* it learns ``x`` (test, then train). Forecast residuals are autocorrelated; on the
      raw ``z`` the same thresholds false-alarm four times as often (bench/drift.py ``--dev``: 60 against 15
      per 10,000 steps) because a run of same-signed residuals is the rule, not a change.
    * **level** (``"mean"``): ``S+ = max(0, S+ + c(e) - k)``, ``S- = max(0, S- - c(e) - k)``, ``c`` clipping at
      ``clip`` so one outlier cannot fire it; alarm when either exceeds ``h``.
    * **variance**: Page's CUSUM of the Gaussian log-likelihood ratio of a variance ``variance_ratio`` times the
      reference against it, on ``min(e^2, clip^2)``, threshold ``variance_h``; and downwards, of a variance
      ``collapse_ratio`` times *smaller*, threshold ``collapse_h``: the residuals of a frozen input collapse.
      (A CUSUM on ``log |e|`` instead detected fewer changes on the dev streams at the same false-alarm rate:
      its long lower tail makes the downward side noisy.)
    * **coverage** (when ``covered`` is passed): the CUSUM of the log-likelihood ratio of a miss rate
      ``coverage_ratio * alpha`` against ``alpha``; alarm when it exceeds ``coverage_h``.

    The alarm's ``kind`` is the watcher furthest past its threshold (``"mean"``, ``"variance"`` or
    ``"coverage"``); its statistic is that CUSUM, negative for a downward change. The defaults were chosen on
    bench/drift.py's dev streams (``--dev``: synthetic seed 1 and ETTh2 rows [0, 8700), seasonal naive and
    CycleNet residuals), never on the scored ones.

    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> det = ResidualCUSUM()
    >>> hits = []
    >>> for t in range(600):
    ...     hits += [t] * len(det.update(np.array([0]), rng.normal(size=1) * (3.0 if t >= 500 else 1.0)))
    >>> hits[0] >= 500 and hits[0] - 500 < 30
    True
    """

    name = "cusum"
    _fields = {"n": 0.0, "mean": 0.0, "var": 0.0, "cov1": 0.0, "prev": 0.0,
               "mean_up": 0.0, "mean_down": 0.0, "var_up": 0.0, "var_down": 0.0, "miss": 0.0}
    _KINDS = np.array(["mean", "mean", "variance", "variance", "coverage"])

    def __init__(
        self,
        k: float = 0.25,
        h: float = 16.0,
        variance_ratio: float = 3.0,
        variance_h: float = 15.0,
        collapse_ratio: float = 10.0,
        collapse_h: float = 45.0,
        alpha: float = 0.1,
        coverage_ratio: float = 3.0,
        coverage_h: float = 15.0,
        warmup: int = 30,
        memory: int = 1000,
        clip: float = 5.0,
        whiten: bool = True,
    ) -> None:
        if not 0 < alpha < 1 or not 1 < coverage_ratio < 1 / alpha:
            raise ValueError(f"need 0 < alpha < 1 and 1 < coverage_ratio < 1/alpha, got {alpha}, {coverage_ratio}")
        if min(variance_ratio, collapse_ratio) <= 1:
            raise ValueError("variance_ratio and collapse_ratio must be > 1")
        if min(h, variance_h, collapse_h, coverage_h, clip) <= 0 or warmup < 2 or memory < 2:
            raise ValueError("thresholds and clip must be > 0, warmup and memory >= 2")
        self.k, self.h = k, h
        self.variance_ratio, self.variance_h = variance_ratio, variance_h
        self.collapse_ratio, self.collapse_h = collapse_ratio, collapse_h
        self.alpha, self.coverage_ratio, self.coverage_h = alpha, coverage_ratio, coverage_h
        self.warmup, self.memory, self.clip, self.whiten = warmup, memory, clip, whiten
        p1 = coverage_ratio * alpha
        self.miss_llr_ = float(np.log(p1 / alpha))
        self.hit_llr_ = float(np.log((1 - p1) / (1 - alpha)))
        self._thresholds = np.array([h, h, variance_h, collapse_h, coverage_h])[:, None]
        super().__init__()

    def _step(self, s: np.ndarray, x: np.ndarray, covered: np.ndarray | None) -> tuple[np.ndarray, ...]:
        f = self.field
        n, mean, var, cov1, prev = f(s, "n").copy(), f(s, "mean").copy(), f(s, "var").copy(), f(s, "cov1"), f(s, "prev")
        # -- test: the residual against the reference learned so far
        seen = n >= 2
        sd = np.sqrt(np.maximum(var, 1e-300))
        z = np.where(seen, (x - mean) / sd, 0.0)
        if self.whiten:
            phi = np.where(seen, np.clip(cov1 / np.maximum(var, 1e-300), -0.95, 0.95), 0.0)
            e = (z - phi * np.where(seen, (prev - mean) / sd, 0.0)) / np.sqrt(1.0 - phi * phi)
        else:
            e = z
        ready = n >= self.warmup
        ec = np.clip(e, -self.clip, self.clip)
        e2 = ec * ec
        up, down = self.variance_ratio, self.collapse_ratio
        stats = np.stack([
            f(s, "mean_up") + ec - self.k,
            f(s, "mean_down") - ec - self.k,
            f(s, "var_up") - 0.5 * np.log(up) + 0.5 * e2 * (1.0 - 1.0 / up),
            f(s, "var_down") + 0.5 * np.log(down) - 0.5 * e2 * (down - 1.0),
            f(s, "miss") + (0.0 if covered is None else np.where(covered, self.hit_llr_, self.miss_llr_)),
        ])
        stats = np.where(ready, np.maximum(stats, 0.0), 0.0)
        # -- train: the reference learns x (exponential moments; plain averages over the first `memory` steps)
        rate = np.maximum(1.0 / (n + 1.0), 1.0 / self.memory)
        d = x - mean
        new_mean = mean + rate * d
        s[self._index["var"]] = (1.0 - rate) * (var + rate * d * d)
        s[self._index["cov1"]] = np.where(n >= 1, (1.0 - rate) * cov1 + rate * (x - new_mean) * (prev - new_mean), 0.0)
        s[self._index["mean"]] = new_mean
        s[self._index["prev"]] = x
        s[self._index["n"]] = n + 1.0
        s[self._index["mean_up"] : self._index["miss"] + 1] = stats
        # -- decide: the watcher furthest past its threshold
        ratios = stats / self._thresholds
        which = np.argmax(ratios, axis=0)
        cols = np.arange(x.size)
        fired = ratios[which, cols] > 1.0
        sign = np.array([1.0, -1.0, 1.0, -1.0, 1.0])[which]
        return fired, self._KINDS[which], sign * stats[which, cols]

    def get_params(self) -> dict[str, Any]:
        return {"k": self.k, "h": self.h, "variance_ratio": self.variance_ratio, "variance_h": self.variance_h,
                "collapse_ratio": self.collapse_ratio, "collapse_h": self.collapse_h, "alpha": self.alpha,
                "coverage_ratio": self.coverage_ratio, "coverage_h": self.coverage_h, "warmup": self.warmup,
                "memory": self.memory, "clip": self.clip, "whiten": self.whiten}


class D3A(DriftDetector):
    """D3A's drift test (Zhang et al. 2024, "Addressing Concept Shift in Online Time Series Forecasting:
    Detect-then-Adapt"), vectorised over rows.

    The loss is the squared residual. Once ``window`` losses have arrived since the last reset, the statistic
    ``(mean of the last window - mean since reset) / (std since reset / sqrt(n))`` is tested against
    ``z = 2.97`` (``alpha = 0.003``, two-sided quantile, one-sided test: only a loss increase fires); ``n`` counts
    every loss since the reset, as in the authors' code (OneNet repository, ``utils/detector.py``), so the test
    grows stricter about small excesses as the reference ages. After ``max_age`` losses without an alarm the
    reference restarts without one (D3A's forced reset).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = D3A()
    >>> hits = []
    >>> for t in range(300):
    ...     hits += [t] * len(det.update(np.array([0]), rng.normal(size=1) + (4.0 if t >= 200 else 0.0)))
    >>> hits  # the shift at t = 200, and one false alarm of the sqrt(n) statistic before it
    [50, 200]
    """

    name = "d3a"

    def __init__(self, window: int = 16, z: float = 2.97, max_age: int = 1000) -> None:
        self.window, self.z, self.max_age = window, z, max_age
        self._fields = {"n": 0.0, "sum": 0.0, "sumsq": 0.0, **{f"last{i}": 0.0 for i in range(window)}}
        super().__init__()

    def _step(self, s: np.ndarray, x: np.ndarray, covered: np.ndarray | None) -> tuple[np.ndarray, ...]:
        i_n, i_sum, i_sq = self._index["n"], self._index["sum"], self._index["sumsq"]
        loss = x * x
        n = s[i_n] + 1.0
        slot = (n.astype(np.int64) - 1) % self.window
        s[3 + slot, np.arange(x.size)] = loss
        s[i_sum] += loss
        s[i_sq] += loss * loss
        s[i_n] = n
        mean = s[i_sum] / n
        std = np.sqrt(np.maximum(s[i_sq] / n - mean * mean, 0.0))
        recent = s[3 : 3 + self.window].mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            stat = np.where(std > 0, (recent - mean) / (std / np.sqrt(n)), 0.0)
        fired = (n >= self.window) & (stat > self.z)
        expired = ~fired & (n >= self.max_age)
        if expired.any():
            s[:, expired] = self._fresh[:, None]
        return fired, np.full(x.size, "loss"), stat

    def get_params(self) -> dict[str, Any]:
        return {"window": self.window, "z": self.z, "max_age": self.max_age}


DETECTORS: dict[str, type[DriftDetector]] = {cls.name: cls for cls in (ResidualCUSUM, D3A)}
#: The default label-based detector (bench/drift.py measures it against river's and D3A's).
DEFAULT_DETECTOR = ResidualCUSUM.name


def make_detector(name: str, **params: Any) -> DriftDetector:
    """Build a detector by name: ``"cusum"``, ``"d3a"``, or river's ``"river-adwin"``, ``"river-pagehinkley"``,
    ``"river-kswin"`` (:mod:`tidecast.monitors.drift_river`)."""
    if name.startswith("river-"):
        from tidecast.monitors.drift_river import RiverDetector

        return RiverDetector(name.removeprefix("river-"), **params)
    try:
        return DETECTORS[name](**params)
    except KeyError:
        known = sorted([*DETECTORS, "river-adwin", "river-pagehinkley", "river-kswin"])
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(known)}") from None
