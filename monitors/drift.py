"""Label-based drift detectors over a table of series rows: matured residuals in, alarms out.

A detector sees, for every series row, one residual stream - ``y - yhat`` of the forecasts maturing now - and,
optionally, whether the interval issued with the h = 1 forecast covered ``y`` and the observed value ``y``
itself. It answers which rows drifted now. Everything is arrays over rows, like the calibrators
(:mod:`tidecast.monitors.conformal.base`): per-row state, :meth:`~DriftDetector.resize`,
:meth:`~DriftDetector.update` for the rows that matured, per-row :meth:`~DriftDetector.export_rows` /
:meth:`~DriftDetector.import_rows`, and :meth:`~DriftDetector.reset_rows` for when the series' model is retrained
or replaced (its residuals then restart from a new reference). A row that alarms resets itself.

* :class:`ResidualCUSUM` (``"cusum"``, the default) standardises each residual by the row's own reference
  (mean and standard deviation since its last reset, with a long memory), whitens it with the row's lag-1
  autocorrelation (forecast residuals are autocorrelated: a raw CUSUM on them false-alarms), and runs CUSUMs on
  the innovation (a level or bias change, both ways), on its square (a variance increase, and a collapse: a
  frozen sensor's residuals vanish) and on interval misses against the target rate ``alpha`` (a coverage drop);
  a run test on repeated input values catches a frozen sensor directly.
* :class:`D3A` is the z-test of D3A's detect-then-adapt loop (Zhang et al. 2024), vectorised: the mean squared
  residual of the last 16 steps against the mean since the last reset.
* river's ADWIN, PageHinkley and KSWIN behind the same interface (one river object per row) are in
  :mod:`tidecast.monitors.drift_river`; they are slow references for bench/drift.py.

The engine runs a detector as a lane monitor (:class:`DriftMonitor`, a :class:`LaneMonitor`): the residuals of
every horizon that matured at a tick are pooled into the one stream (:class:`HorizonPool`), and an alarm becomes a
:class:`DriftEvent` with the series, the lane and the time.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> detector = ResidualCUSUM()
>>> rows = np.arange(2)
>>> fired = []
>>> for t in range(600):
...     residuals = rng.normal(size=2) + np.array([0.0, 2.0 if t >= 500 else 0.0])  # row 1 shifts at t = 500
...     alarms = detector.update(rows, residuals)
...     fired += [(int(r), str(k), t - 500) for r, k in zip(alarms.rows, alarms.kind)]
>>> [(row, kind) for row, kind, _ in fired], 0 <= fired[0][2] < 10
([(1, 'mean')], True)
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from tidecast.models.base import Params, check_between, check_count, check_positive
from tidecast.models.rows import grow, nest, under
from tidecast.monitors.conformal.base import SCALE_OUTLIER_LIMIT, ArrayDict, bounded_by_scale

__all__ = ["D3A", "DEFAULT_DETECTOR", "DETECTORS", "NO_ALARM", "Alarms", "DriftDetector", "DriftEvent",
           "DriftMonitor", "HorizonPool", "LaneMonitor", "ResidualCUSUM", "make_detector"]


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """One alarm of one detector on one series' model.

    ``kind`` is what moved: ``"mean"``, ``"variance"``, ``"coverage"`` or ``"freeze"`` (the default detector),
    ``"loss"`` (D3A), ``"distribution"`` (river's KSWIN), ``"uncertainty"`` (the bootstrap watcher,
    :mod:`tidecast.monitors.bootstrap`); the retraining policy's events travel in the same record with its
    outcomes as kinds (:data:`tidecast.stream.retrain.EVENT_KINDS`);
    ``statistic`` is the detector's statistic when it fired (signed: negative for a downward change);
    ``detected_at`` the event time of the residual that triggered it. ``(series_id, model, detector, kind,
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
        """The event back from :meth:`to_dict` or a written event line: a ``null`` statistic (a non-finite one, as
        the sinks write it) reads as NaN, and a subclass's own fields are read too."""
        stamp = datetime.fromisoformat(str(fields["detected_at"]).replace("Z", "+00:00"))
        statistic = fields["statistic"]
        own = {f.name for f in dataclasses.fields(DriftEvent)}
        extra = {f.name: type(f.default)(fields[f.name]) for f in dataclasses.fields(cls)
                 if f.name not in own and f.name in fields}
        return cls(str(fields["series_id"]), str(fields["model"]), str(fields["detector"]), str(fields["kind"]),
                   stamp, math.nan if statistic is None else float(statistic), **extra)


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

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where each alarmed row sits in ``rows``, the rows of the call that raised the alarms."""
        order = np.argsort(rows, kind="stable")
        return order[np.searchsorted(rows[order], self.rows)]

    def events(self, series_ids: np.ndarray, model: str, detector: str, detected_at_ns: np.ndarray) -> list[DriftEvent]:
        """:class:`DriftEvent` objects; ``series_ids`` and ``detected_at_ns`` are indexed by row."""
        return [DriftEvent(str(series_ids[r]), model, detector, str(k), from_epoch_ns(int(detected_at_ns[r])),
                           float(s))
                for r, k, s in zip(self.rows.tolist(), self.kind, self.statistic.tolist(), strict=True)]


def from_epoch_ns(t_ns: int) -> datetime:
    """A UTC datetime from integer nanoseconds since the epoch (microsecond resolution, like ``datetime``)."""
    return _EPOCH + timedelta(microseconds=t_ns // 1000)


#: A detector's input (a residual over its scale) is clipped to +-this before it is learned.
MAX_STANDARDISED = 1e6
#: Below this reference variance (of standardised residuals, ~1 when they vary) there is nothing to collapse.
MIN_REFERENCE_VARIANCE = 1e-12


class DriftDetector(Params, ABC):
    """Base class: per-row state in one float table ``state_`` (fields, rows); fitted state ends in ``_``.

    Subclasses declare their fields in ``_fields`` (name -> value of a fresh row) and implement :meth:`_step`,
    which reads and writes the gathered columns of the rows being updated. An alarm resets its row, except the
    fields named in ``_kept`` (statistics of the input itself, which a change of the model's errors leaves valid).
    """

    #: Registry name, used as the ``detector`` label of events and metrics.
    name: str = "detector"
    _fields: dict[str, float] = {}
    _kept: tuple[str, ...] = ()
    #: True where :meth:`_step` takes rows whose residual is missing (NaN) but whose value is not.
    _handles_missing: bool = False

    def __init__(self) -> None:
        self._index = {f: i for i, f in enumerate(self._fields)}
        self._fresh = np.array(list(self._fields.values()), dtype=float)
        self._reset_on_alarm = np.array([i for f, i in self._index.items() if f not in self._kept], dtype=np.intp)
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
               scale: np.ndarray | float | None = None, values: np.ndarray | None = None) -> Alarms:
        """Learn one matured residual per row; return the rows that alarmed (they are reset).

        rows: unique int row indices (n,). residuals: ``y - yhat`` (n,); non-finite entries are skipped.
        covered: optional (n,), True (1.0) where the interval issued with the forecast held ``y``, False (0.0)
        where it did not, NaN where there was no interval. scale: optional (n,) or scalar divisor applied first.
        values: optional observations ``y`` (n,), for detectors that watch the input itself (a frozen sensor).
        """
        rows = np.asarray(rows, dtype=np.intp).reshape(-1)
        x = np.asarray(residuals, dtype=float).reshape(-1)
        if scale is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = x / np.asarray(scale, dtype=float)
        cov = None if covered is None else np.asarray(covered, dtype=float).reshape(-1)
        y = None if values is None else np.asarray(values, dtype=float).reshape(-1)
        if not self._handles_missing:
            y = None
        ok = np.isfinite(x) if y is None else np.isfinite(x) | np.isfinite(y)
        if not ok.all():
            rows, x = rows[ok], x[ok]
            cov = None if cov is None else cov[ok]
            y = None if y is None else y[ok]
        if rows.size == 0:
            return Alarms.empty()
        # a standardised residual beyond this says no more than "absurd", and its square must stay finite: 1e160
        # once made the variance inf and every statistic of the row NaN, for good
        # (a row kept for its value alone, with an infinite residual, is a missing residual, not a huge one)
        with np.errstate(invalid="ignore"):
            x = np.where(np.isfinite(x), np.clip(x, -MAX_STANDARDISED, MAX_STANDARDISED), np.nan)
        self.resize(int(rows.max()) + 1)
        contiguous = rows[-1] - rows[0] + 1 == rows.size and bool(np.all(np.diff(rows) == 1))
        # A contiguous run of rows (the engine's common case) is updated in place; others are gathered.
        cols = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        block = self.state_[:, cols]
        fired, kind, stat = self._step(block, x, cov, y)
        self._restart(block, fired)
        if not contiguous:
            self.state_[:, rows] = block
        return Alarms(rows[fired].astype(np.int64), kind[fired], stat[fired])

    def _restart(self, s: np.ndarray, rows: np.ndarray) -> None:
        """Start a new reference in the columns of the gathered block ``s`` where ``rows`` (bool) is set, as an
        alarm does: every field but the ``_kept`` ones back to a fresh row's value."""
        if rows.any():
            s[np.ix_(self._reset_on_alarm, np.flatnonzero(rows))] = self._fresh[self._reset_on_alarm, None]

    @abstractmethod
    def _step(self, s: np.ndarray, x: np.ndarray, covered: np.ndarray | None,
              values: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """Update the gathered state ``s`` (fields, n) in place with ``x`` (n,); return (fired, kind, statistic)."""

    def field(self, s: np.ndarray, name: str) -> np.ndarray:
        """One field's row of a gathered block (a view: writing to it writes the block)."""
        return s[self._index[name]]

    # -- state ------------------------------------------------------------------------------------
    @property
    def state_fields(self) -> tuple[str, ...]:
        """Names of the per-row arrays :meth:`export_rows` returns."""
        return tuple(self._index)

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


class ResidualCUSUM(DriftDetector):
    """CUSUMs on the whitened residual (level), on its square (variance up, collapse down), on misses, and a
    run test on repeated input values (a frozen sensor).

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
    * **coverage** (when ``covered`` is passed): the CUSUM of the log-likelihood ratio of a miss rate
      ``coverage_ratio * alpha`` (at most ``(1 + alpha) / 2``) against ``alpha``; alarm when it exceeds
      ``coverage_h``.
    * **freeze** (when ``values`` are passed): the row's share ``p`` of values equal to the one before (learned
      like the reference, never reset by an alarm); a run of ``r`` repeats alarms once ``max(p, freeze_floor)^r <
      freeze_tail``: 4 repeats on a continuous series, 7 on ETTh2's oil temperature (p = 0.16), 30 on a channel
      quantised so coarsely that 68 % of its values repeat. One alarm per run, from any watcher: once a run is
      as long as the freeze watcher's shortest (``ceil(log freeze_tail / log freeze_floor)``, 4) and has
      alarmed, a residual CUSUM crossing its threshold restarts the reference without an alarm (a series that
      never moves raises at most one).

    The alarm's ``kind`` is the watcher furthest past its threshold (``"mean"``, ``"variance"``, ``"coverage"``
    or ``"freeze"``); its statistic is that CUSUM, negative for a downward change (for a freeze: the run length).

    The defaults were chosen on bench/drift.py's dev streams (``--dev``: synthetic seed 1 and ETTh2 rows
    [0, 8700), seasonal naive and CycleNet residuals), never on the scored ones; the bench's module docstring
    lists what was tried and rejected.

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
               "mean_up": 0.0, "mean_down": 0.0, "var_up": 0.0, "var_down": 0.0, "miss": 0.0,
               "y_n": 0.0, "y_last": 0.0, "y_same": 0.0, "y_run": 0.0, "y_alarmed": 0.0}
    _kept = ("y_n", "y_last", "y_same", "y_run", "y_alarmed")
    _handles_missing = True
    _KINDS = np.array(["mean", "mean", "variance", "variance", "coverage", "freeze"])
    _SIGNS = np.array([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])

    def __init__(
        self,
        k: float = 0.25,
        h: float = 18.0,
        variance_ratio: float = 3.0,
        variance_h: float = 15.0,
        collapse_ratio: float = 10.0,
        collapse_h: float = 45.0,
        alpha: float = 0.1,
        coverage_ratio: float = 3.0,
        coverage_h: float = 15.0,
        freeze_tail: float = 1e-5,
        freeze_floor: float = 0.05,
        warmup: int = 30,
        memory: int = 1000,
        clip: float = 5.0,
        whiten: bool = True,
    ) -> None:
        check_between("k", k, 0, math.inf, open_high=True)
        for name, value in (("h", h), ("variance_h", variance_h), ("collapse_h", collapse_h),
                            ("coverage_h", coverage_h), ("clip", clip)):
            check_positive(name, value)  # inf: that statistic never alarms
        check_count("warmup", warmup, 2)
        check_count("memory", memory, 2)
        for name, value in (("variance_ratio", variance_ratio), ("collapse_ratio", collapse_ratio),
                            ("coverage_ratio", coverage_ratio)):
            check_between(name, value, 1, math.inf, open_low=True, open_high=True)
        check_between("alpha", alpha, 0, 1, open_low=True, open_high=True)
        if not 0 < freeze_tail < 1 or not 0 < freeze_floor < 1:
            raise ValueError("freeze_tail and freeze_floor must be in (0, 1)")
        self.k, self.h = k, h
        self.variance_ratio, self.variance_h = variance_ratio, variance_h
        self.collapse_ratio, self.collapse_h = collapse_ratio, collapse_h
        self.alpha, self.coverage_ratio, self.coverage_h = alpha, coverage_ratio, coverage_h
        self.freeze_tail, self.freeze_floor = freeze_tail, freeze_floor
        self.warmup, self.memory, self.clip, self.whiten = warmup, memory, clip, whiten
        # A wide miss rate (a 50 % interval: alpha 0.5) cannot triple: the alternative is then capped halfway to 1.
        p1 = min(coverage_ratio * alpha, (1 + alpha) / 2)
        self.miss_llr_ = float(np.log(p1 / alpha))
        self.hit_llr_ = float(np.log((1 - p1) / (1 - alpha)))
        self._thresholds = np.array([h, h, variance_h, collapse_h, coverage_h])[:, None]
        # the shortest run of repeats the freeze watcher could ever flag (at the floor share): a shorter run is an
        # ordinary repeat, not a stuck input
        self.freeze_min_run_ = math.ceil(math.log(freeze_tail) / math.log(freeze_floor))
        super().__init__()

    def _step(self, s: np.ndarray, x: np.ndarray, covered: np.ndarray | None,
              values: np.ndarray | None) -> tuple[np.ndarray, ...]:
        idx = self._index
        ok = np.isfinite(x)
        every = bool(ok.all())  # the common case: every row brought a residual

        def keep(new: np.ndarray, old: np.ndarray) -> np.ndarray:
            return new if every else np.where(ok, new, old)

        x = x if every else np.where(ok, x, 0.0)
        n, mean, var, cov1, prev = (s[idx[f]].copy() for f in ("n", "mean", "var", "cov1", "prev"))
        # -- test: the residual against the reference learned so far
        seen = n >= 2
        sd = np.sqrt(np.maximum(var, 1e-300))
        z = np.where(seen, (x - mean) / sd, 0.0)
        if self.whiten:
            phi = np.where(seen, np.clip(cov1 / np.maximum(var, 1e-300), -0.95, 0.95), 0.0)
            e = (z - phi * np.where(seen, (prev - mean) / sd, 0.0)) / np.sqrt(1.0 - phi * phi)
        else:
            e = z
        ready = (n >= self.warmup) & ok
        ec = np.clip(e, -self.clip, self.clip)
        e2 = ec * ec
        up, down = self.variance_ratio, self.collapse_ratio
        old = s[idx["mean_up"] : idx["miss"] + 1]
        # A repeated input value is the freeze watcher's to judge (calibrated on the row's share of repeats): the
        # collapse CUSUM holds. On the residuals of an intermittent series (90 % zeros, no change) every long run
        # of zeros looked like a collapse, and the reference relearned from it made the next spike a variance alarm
        repeat = self._repeats(s, values)
        if covered is None:
            miss = old[4]
        else:
            hit_or_miss = np.where(covered > 0.5, self.hit_llr_, self.miss_llr_)
            miss = old[4] + np.where(np.isnan(covered), 0.0, hit_or_miss)
        stats = np.stack([
            old[0] + ec - self.k,
            old[1] - ec - self.k,
            old[2] - 0.5 * np.log(up) + 0.5 * e2 * (1.0 - 1.0 / up),
            # a variance can only collapse from something: with a reference of none (a residual that has been
            # exactly constant, e.g. seasonal naive on a counter that rises at a fixed rate) every step looked like
            # a collapse and raised a `variance` alarm every ~70 steps, forever
            np.where(repeat, old[3], np.where(var > MIN_REFERENCE_VARIANCE,
                                              old[3] + 0.5 * np.log(down) - 0.5 * e2 * (down - 1.0), 0.0)),
            miss,
        ])
        stats = np.where(ready, np.maximum(stats, 0.0), np.where(ok, 0.0, old))
        # -- train: the reference learns x (exponential moments; plain averages over the first `memory` steps)
        rate = np.maximum(1.0 / (n + 1.0), 1.0 / self.memory)
        d = x - mean
        new_mean = mean + rate * d
        s[idx["var"]] = keep((1.0 - rate) * (var + rate * d * d), var)
        s[idx["cov1"]] = keep(np.where(n >= 1, (1.0 - rate) * cov1 + rate * (x - new_mean) * (prev - new_mean), 0.0),
                              cov1)
        s[idx["mean"]] = keep(new_mean, mean)
        s[idx["prev"]] = keep(x, prev)
        s[idx["n"]] = n + ok
        s[idx["mean_up"] : idx["miss"] + 1] = stats
        # -- decide: the watcher furthest past its threshold
        ratios = np.vstack([stats / self._thresholds, self._freeze(s, values)[None, :]])
        which = np.argmax(ratios, axis=0)
        cols = np.arange(x.size)
        fired = ratios[which, cols] > 1.0
        stat = np.where(which == 5, s[idx["y_run"]], self._SIGNS[which] * stats[np.minimum(which, 4), cols])
        # One alarm per frozen run, whichever watcher raised it: while the input repeats the value of a run that
        # already alarmed, the residuals show the model's wiggles around a stuck value (a constant series makes
        # a learning model's tiny errors look like drift), so a crossing restarts the reference silently. A run
        # counts once it is as long as the freeze watcher's shortest: an alarm during an ordinary repeat must not
        # silence a freeze that continues it.
        frozen = s[idx["y_run"]] >= self.freeze_min_run_
        muted = fired & frozen & (s[idx["y_alarmed"]] == 1.0)
        self._restart(s, muted)
        fired = fired & ~muted
        s[idx["y_alarmed"]] = np.where(fired & frozen, 1.0, s[idx["y_alarmed"]])
        return fired, self._KINDS[which], stat

    def _repeats(self, s: np.ndarray, values: np.ndarray | None) -> np.ndarray | bool:
        """Rows whose input value equals the one before (``False`` without values)."""
        if values is None:
            return False
        return np.isfinite(values) & (s[self._index["y_n"]] >= 1) & (values == s[self._index["y_last"]])

    def _freeze(self, s: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        """Learn the rows' values; the freeze watcher's ratio to its threshold (> 1: alarm)."""
        idx = self._index
        if values is None:
            return np.zeros(s.shape[1])
        ok = np.isfinite(values)
        n, last, same_share = s[idx["y_n"]], s[idx["y_last"]], s[idx["y_same"]]
        same = ok & (n >= 1) & (values == last)
        run = np.where(same, s[idx["y_run"]] + 1.0, np.where(ok, 0.0, s[idx["y_run"]]))
        alarmed = np.where(same | ~ok, s[idx["y_alarmed"]], 0.0)
        # test: how unlikely is this run for this row's input; then train the share of repeats
        p = np.clip(same_share, self.freeze_floor, 1.0 - 1e-12)
        ratio = np.where(ok & (n >= self.warmup) & (alarmed == 0.0), run * np.log(p) / np.log(self.freeze_tail), 0.0)
        rate = np.maximum(1.0 / (n + 1.0), 1.0 / self.memory)
        s[idx["y_same"]] = np.where(ok, same_share + rate * (same - same_share), same_share)
        s[idx["y_last"]] = np.where(ok, values, last)
        s[idx["y_n"]] = n + ok
        s[idx["y_run"]] = run
        s[idx["y_alarmed"]] = alarmed
        return ratio


#: Longest D3A window: each slot is a per-series field (8 bytes a series), the authors use 16.
D3A_MAX_WINDOW = 1_000


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
        check_count("window", window, 2)
        if window > D3A_MAX_WINDOW:  # a field per slot, 8 bytes a series each: 1e8 ended in a MemoryError traceback
            raise ValueError(f"window = {window}: at most {D3A_MAX_WINDOW:,} losses (D3A uses 16)")
        check_positive("z", z)
        check_count("max_age", max_age, window)
        self.window, self.z, self.max_age = window, z, max_age
        self._fields = {"n": 0.0, "sum": 0.0, "sumsq": 0.0, **{f"last{i}": 0.0 for i in range(window)}}
        super().__init__()

    def _step(self, s: np.ndarray, x: np.ndarray, covered: np.ndarray | None,
              values: np.ndarray | None) -> tuple[np.ndarray, ...]:
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
        # summed in one memory layout whichever rows these are (a strided view of a contiguous run of rows, or a
        # gathered copy), so a series' statistic does not depend on the row it sits in, to the last bit
        recent = np.ascontiguousarray(s[3 : 3 + self.window]).mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            stat = np.where(std > 0, (recent - mean) / (std / np.sqrt(n)), 0.0)
        fired = (n >= self.window) & (stat > self.z)
        expired = ~fired & (n >= self.max_age)
        if expired.any():
            s[:, expired] = self._fresh[:, None]
        return fired, np.full(x.size, "loss"), stat


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


# -- what the engine runs: residuals of every horizon pooled into one stream, per lane ------------------------
class HorizonPool:
    """Per row, the matured residuals of all horizons as one number: the mean over horizons of ``r_h / s_h``.

    ``s_h`` is the row's running mean of ``|r_h|`` (rate ``max(1/n, 1/memory)``), read *before* it learns ``r_h``
    (test, then train). Pooling horizons is what lets a model that re-centres itself quickly still be watched:
    CycleNet normalises each input window, so a level shift is gone from its 1-step residual within a few steps,
    but the forecasts issued before the shift stay off by it for up to H steps (bench/drift.py ``--dev``, level
    shifts under CycleNet: 0.38 detected from the h = 1 residual, 0.60 from the pooled one).

    The scale is deliberately slow. The calibrator's own scale (conformal PID: ~20 steps at h = 1) follows a
    variance change within a cycle; dividing by it hid most changes (``--dev``: 0.39 detected against 0.70).

    >>> pool = HorizonPool(horizon=2)
    >>> r = np.array([[1.0, 2.0], [np.nan, 4.0]])  # row 0: h = 1 and h = 2 matured; row 1: only h = 2
    >>> pool.pool(np.array([0, 1]), r)  # nothing learned yet: no scale, no value
    array([nan, nan])
    >>> pool.pool(np.array([0, 1]), 2 * r)  # now each horizon is in units of its first |r|
    array([2., 2.])
    """

    def __init__(self, horizon: int, memory: int = 1000) -> None:
        if horizon < 1 or memory < 1:
            raise ValueError("horizon and memory must be >= 1")
        self.horizon, self.memory = horizon, memory
        self.scale_ = np.zeros((0, horizon))
        self.count_ = np.zeros((0, horizon))

    def resize(self, n_rows: int) -> None:
        self.scale_ = grow(self.scale_, n_rows, 0.0)
        self.count_ = grow(self.count_, n_rows, 0.0)

    def reset_rows(self, rows: np.ndarray) -> None:
        self.scale_[rows] = 0.0
        self.count_[rows] = 0.0

    def pool(self, rows: np.ndarray, residuals: np.ndarray) -> np.ndarray:
        """(n, H) residuals, NaN where a horizon did not mature -> (n,) pooled value (NaN: nothing usable)."""
        rows = np.asarray(rows, dtype=np.intp)
        self.resize(int(rows.max()) + 1 if rows.size else 0)
        r = np.asarray(residuals, dtype=float)
        scale, count = self.scale_[rows], self.count_[rows]
        ok = np.isfinite(r)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(ok & (count > 0), r / scale, np.nan)
        # a horizon whose residuals were all exactly 0 (a constant series, forecast exactly) has no scale: a 0 is
        # "as before" and anything else as far out as a scale lets a value count (it was skipped, so the watcher
        # had learned nothing and took a step on such a series for its reference)
        blank = ok & (count > 0) & (scale == 0.0)
        z = np.where(blank, np.sign(r) * SCALE_OUTLIER_LIMIT, z)
        with np.errstate(invalid="ignore"):
            used = np.isfinite(z)
            pooled = np.where(used, z, 0.0).sum(axis=1) / used.sum(axis=1)
        # one absurd value used to inflate the scale for a thousand steps, and as it decayed the ordinary residuals
        # looked ever larger, faking variance alarms (and bootstrap ones: its watcher shares this scale)
        size = bounded_by_scale(np.abs(np.where(ok, r, 0.0)), scale, count)
        count += ok
        rate = np.where(ok, np.maximum(1.0 / np.maximum(count, 1.0), 1.0 / self.memory), 0.0)
        scale += rate * (size - scale)
        self.scale_[rows], self.count_[rows] = scale, count
        return pooled

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        rows = np.asarray(rows, dtype=np.intp)
        self.resize(int(rows.max()) + 1 if rows.size else 0)
        return {"scale": self.scale_[rows].copy(), "count": self.count_[rows].copy()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size:
            self.resize(int(rows.max()) + 1)
            self.scale_[rows], self.count_[rows] = state["scale"], state["count"]


class LaneMonitor:
    """A watcher the engine runs inside one lane, beside its calibrator; it raises :class:`DriftEvent` alarms.

    The engine calls :meth:`matured` with the forecasts that matured at a tick (label-based watchers: residual
    drift) and :meth:`issued` with the forecasts it just made (label-free watchers, e.g. a bootstrap spread; no
    target needed). Both return :class:`Alarms`; the default does nothing. Per-row state is exported under
    ``<lane>/<key>/...`` with the series. ``last_alarm_tick_`` (the tick of each row's latest alarm) feeds the
    ``tidecast_series_drifting`` gauge. Subclasses set ``key`` (the state prefix) and ``detector`` (the label).
    """

    key: str = "monitor"
    detector: str = "monitor"

    def __init__(self) -> None:
        self.last_alarm_tick_ = np.zeros(0, dtype=np.int64)

    def resize(self, n_rows: int) -> None:
        self.last_alarm_tick_ = grow(self.last_alarm_tick_, n_rows, NO_ALARM)

    def matured(self, rows: np.ndarray, ticks: np.ndarray, y: np.ndarray, mean: np.ndarray, lower: np.ndarray,
                upper: np.ndarray, valid: np.ndarray) -> Alarms:
        """Rows observed ``y`` at ``ticks``; ``mean/lower/upper`` (n, H): the h-step forecasts for it, ``valid``
        where one was issued."""
        return Alarms.empty()

    def issued(self, rows: np.ndarray, ticks: np.ndarray, forecast: np.ndarray, lower: np.ndarray,
               upper: np.ndarray) -> Alarms:
        """Rows were just given ``forecast`` (n, H) and its interval at ``ticks``."""
        return Alarms.empty()

    def model_replaced(self, model: object) -> None:
        """The lane now serves ``model`` (a promotion): a watcher that reads the model itself follows it."""

    def reset_rows(self, rows: np.ndarray) -> None:
        """The rows' model was replaced (retrained): what was learned about its errors no longer applies."""

    def note(self, alarms: Alarms, rows: np.ndarray, ticks: np.ndarray) -> None:
        """Record the alarms' ticks (``rows``/``ticks``: the call's rows and their ticks)."""
        if len(alarms):
            self.resize(int(alarms.rows.max()) + 1)  # a monitor used without resize() grows like its detector
            self.last_alarm_tick_[alarms.rows] = ticks[alarms.positions(rows)]

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        rows = np.asarray(rows, dtype=np.intp)
        self.resize(int(rows.max()) + 1 if rows.size else 0)
        return {"last_alarm_tick": self.last_alarm_tick_[rows].copy()}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        if "last_alarm_tick" in state:
            self.last_alarm_tick_[rows] = state["last_alarm_tick"]


#: ``last_alarm_tick_`` of a row that never alarmed.
NO_ALARM = np.iinfo(np.int64).min


class DriftMonitor(LaneMonitor):
    """The label-based watcher of a lane: matured residuals of every horizon, pooled by :class:`HorizonPool`, the
    h = 1 interval's covered flag and the observed values go to a :class:`DriftDetector`.

    State: the detector's fields under ``det/``, the pool's under ``pool/``, and ``last_alarm_tick``. A saved
    state without them (written before drift monitoring, or by another detector) restarts those rows fresh.

    >>> monitor = DriftMonitor(ResidualCUSUM(), horizon=1)
    >>> monitor.resize(1)
    >>> rng = np.random.default_rng(0)
    >>> shift = [t for t in range(400) if len(monitor.matured(
    ...     np.array([0]), np.array([t]), np.array([rng.normal() + 4.0 * (t >= 300)]), np.zeros((1, 1)),
    ...     np.full((1, 1), -2.0), np.full((1, 1), 2.0), np.ones((1, 1), bool)))]
    >>> 300 <= shift[0] < 310, int(monitor.last_alarm_tick_[0]) == shift[-1]
    (True, True)
    """

    key = "drift"

    def __init__(self, detector: DriftDetector, horizon: int, scale_memory: int = 1000) -> None:
        super().__init__()
        self.detector_ = detector
        self.detector = detector.name
        self.pool_ = HorizonPool(horizon, scale_memory)

    def resize(self, n_rows: int) -> None:
        super().resize(n_rows)
        self.detector_.resize(n_rows)
        self.pool_.resize(n_rows)

    def matured(self, rows: np.ndarray, ticks: np.ndarray, y: np.ndarray, mean: np.ndarray, lower: np.ndarray,
                upper: np.ndarray, valid: np.ndarray) -> Alarms:
        with np.errstate(invalid="ignore"):
            x = self.pool_.pool(rows, np.where(valid, y[:, None] - mean, np.nan))
            lo, hi = lower[:, 0], upper[:, 0]
            covered = np.where(valid[:, 0] & np.isfinite(lo) & np.isfinite(hi),
                               ((y >= lo) & (y <= hi)).astype(float), np.nan)
        alarms = self.detector_.update(rows, x, covered=covered, values=y)
        self.note(alarms, rows, ticks)
        return alarms

    def reset_rows(self, rows: np.ndarray) -> None:
        self.detector_.reset_rows(rows)
        self.pool_.reset_rows(rows)

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        out = super().export_rows(rows)
        out.update(nest("det/", self.detector_.export_rows(rows)))
        out.update(nest("pool/", self.pool_.export_rows(rows)))
        return out

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size == 0:
            return
        self.resize(int(rows.max()) + 1)
        det, pool = under("det/", state), under("pool/", state)
        fits = (set(det) == set(self.detector_.state_fields) and "scale" in pool
                and np.shape(pool["scale"])[1:] == (self.pool_.horizon,))
        if not fits:  # an older or different layout: these rows start watching afresh
            self.reset_rows(rows)
            self.last_alarm_tick_[rows] = NO_ALARM
            return
        super().import_rows(rows, state)
        self.detector_.import_rows(rows, det)
        self.pool_.import_rows(rows, pool)
