"""What a replay hands an analyst: forecasts joined to their outcomes, scores, events, plots and a report.

:class:`ResultCollector` sits beside the forecast sink during a replay and keeps everything the engine emits;
:meth:`ResultCollector.build` turns it into a :class:`ReplayResult`:

* ``forecasts`` — one row per (series, model, origin, h): ``unique_id, cutoff`` (the origin: the event time of the
  last observation the model had seen), ``ds`` (the target time), ``model, h, mean, y`` (the outcome at ``ds``,
  joined wherever it arrived; ``NaN`` if it never did) and ``lo-<level>, hi-<level>`` per interval level.
  Timestamps are UTC.
* ``actuals`` — the observations as placed on their series' grid (``unique_id, ds, y``).
* ``events`` — drift alarms and retraining decisions (``unique_id, model, detector, kind, at`` ...), empty when
  the engine reported none.
* ``dead_letters`` — rejected input (``reason, detail, source, partition, offset, raw``).

Scores (:meth:`ReplayResult.summary`) are prequential, as the engine's: a forecast counts once its outcome is
known; a step issued without an interval is a miss in coverage; widths and interval scores are over the steps
that had one. MASE and sMAPE follow :mod:`tidecast.monitors.accuracy`.

>>> import tidecast
>>> frame = pd.DataFrame({"unique_id": "a", "ds": pd.date_range("2024-01-01", periods=120, freq="h"),
...                       "y": [float(i % 6) for i in range(120)]})
>>> result = tidecast.replay(frame, models=["seasonal-naive"], horizon=2, levels=(80, 95),
...                          model_params={"seasonal-naive": {"period": 6}})
>>> list(result.forecasts.columns)
['unique_id', 'cutoff', 'ds', 'model', 'h', 'mean', 'y', 'lo-80', 'hi-80', 'lo-95', 'hi-95']
>>> result.summary()[["model", "n_scored", "mae", "smape"]]
            model  n_scored  mae  smape
0  seasonal-naive       227  0.0    0.0
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tidecast.monitors.accuracy import PERIOD_HEAD, running_scale_at, scale_period, smape
from tidecast.monitors.scoring import MAX_ERROR
from tidecast.stream.batch import ActualBatch, ForecastBatch, series_ids_as_text
from tidecast.stream.config import STEP_WINDOW, EngineConfig
from tidecast.stream.engine import inferred_step
from tidecast.stream.settings import split_items
from tidecast.stream.sources import DeadLetter

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tidecast.stream.engine import EngineResult

EVENT_COLUMNS = ["unique_id", "model", "detector", "kind", "at"]
LETTER_COLUMNS = ["reason", "detail", "source", "partition", "offset", "raw"]
#: ``summary(by=...)``: the columns each grouping adds to ``model``.
GROUPINGS = {"model": [], "horizon": ["h"], "series": ["unique_id"]}


class ResultCollector:
    """A forecast sink (``write``/``flush``/``close``) that also keeps outcomes, events and dead letters.

    Forecasts are kept compact as they arrive (series and model as small integer codes, every level's bounds
    once), since a replay of a year of hourly data with a few models issues millions of forecast steps.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._series: dict[str, int] = {}
        self._models = {alias: i for i, (alias, _) in enumerate(config.lanes)}
        self._forecasts: list[dict[str, np.ndarray]] = []
        self._actuals: list[ActualBatch] = []
        self._events: list[dict[str, Any]] = []
        self._letters: list[DeadLetter] = []

    def _codes(self, ids: np.ndarray, known: dict[str, int]) -> np.ndarray:
        local, uniques = pd.factorize(ids)
        mapping = np.array([known.setdefault(str(u), len(known)) for u in uniques], dtype=np.int32)
        return mapping[local]

    def write(self, batch: ForecastBatch) -> None:
        if not len(batch):
            return
        lowers, uppers = batch.bounds()
        self._forecasts.append({
            "series": self._codes(batch.series_id, self._series), "model": self._codes(batch.model, self._models),
            "cutoff": batch.issued_at_ns, "ds": batch.target_ns, "h": batch.h.astype(np.int16),
            "mean": batch.mean, "lowers": lowers, "uppers": uppers,
        })

    def flush(self) -> None:
        """Everything is in memory already."""

    def close(self) -> None:
        pass

    def observe(self, result: EngineResult) -> None:
        """Keep an engine result's outcomes and events (its forecasts come through :meth:`write`)."""
        if len(result.actuals):
            self._actuals.append(result.actuals)
        self._events.extend(event.to_dict() if hasattr(event, "to_dict") else dict(event) for event in result.events)

    def letter(self, letter: DeadLetter) -> None:
        self._letters.append(letter)

    def build(self, run: dict[str, Any], source: str) -> ReplayResult:
        """The :class:`ReplayResult` of everything collected; ``run`` is the replay's summary."""
        actuals = _actuals_frame(ActualBatch.concat(self._actuals), list(self._series))
        forecasts = self._forecasts_frame(actuals)
        self._forecasts, self._actuals = [], []  # the frames hold it now
        letters = pd.DataFrame([{"reason": d.reason, "detail": d.detail, "source": d.source,
                                 "partition": d.position[0], "offset": d.position[1], "raw": d.raw}
                                for d in self._letters], columns=LETTER_COLUMNS)
        return ReplayResult(forecasts, actuals, events_frame(self._events), letters, run, self.config, source)

    def _forecasts_frame(self, actuals: pd.DataFrame) -> pd.DataFrame:
        parts, self._forecasts = self._forecasts, []
        levels = self.config.level_names
        none = {"series": np.zeros(0, np.int32), "model": np.zeros(0, np.int32), "cutoff": np.zeros(0, np.int64),
                "ds": np.zeros(0, np.int64), "h": np.zeros(0, np.int16), "mean": np.zeros(0),
                "lowers": np.zeros((0, len(levels))), "uppers": np.zeros((0, len(levels)))}
        columns = {k: np.concatenate([p[k] for p in parts]) if parts else empty for k, empty in none.items()}
        ids = actuals["unique_id"].cat.categories
        # forecast series codes follow the order series were first forecast; the frame's follow the sorted ids
        to_sorted = ids.get_indexer(list(self._series)).astype(np.int32)
        codes = to_sorted[columns["series"]]
        frame = pd.DataFrame({
            "unique_id": pd.Categorical.from_codes(codes, categories=ids),
            "cutoff": utc(columns["cutoff"]),
            "ds": utc(columns["ds"]),
            "model": pd.Categorical.from_codes(columns["model"], categories=list(self._models)),
            "h": columns["h"],
            "mean": columns["mean"],
        })
        outcome = pd.MultiIndex.from_arrays([actuals["unique_id"].cat.codes.to_numpy(), nanoseconds(actuals["ds"])])
        wanted = pd.MultiIndex.from_arrays([codes, columns["ds"]])
        where = outcome.get_indexer(wanted)
        frame["y"] = np.where(where >= 0, actuals["y"].to_numpy()[np.maximum(where, 0)], np.nan)
        for i, level in enumerate(levels):
            frame[f"lo-{level}"], frame[f"hi-{level}"] = columns["lowers"][:, i], columns["uppers"][:, i]
        return frame


def nanoseconds(times: pd.Series) -> np.ndarray:
    """Epoch nanoseconds (int64) of a column of UTC timestamps."""
    return pd.DatetimeIndex(times).as_unit("ns").asi8


def ns_between(later: np.ndarray | int, earlier: np.ndarray | int) -> np.ndarray:
    """``later - earlier`` in nanoseconds, as floats: worked out in unsigned integers, because two epoch times more
    than 292 years apart (1700 and 2024) overflow an int64 difference.

    >>> ns_between(np.array([2**62, -(2**62)]), -(2**62)).tolist()  # 2**63 would wrap to -2**63 in int64
    [9.223372036854776e+18, 0.0]
    """
    later, earlier = np.asarray(later, np.int64), np.asarray(earlier, np.int64)
    up = (later.view(np.uint64) - earlier.view(np.uint64)).astype(np.float64)  # wraps back to the true value
    down = (earlier.view(np.uint64) - later.view(np.uint64)).astype(np.float64)
    return np.where(later >= earlier, up, -down)


def utc(ns: np.ndarray) -> pd.DatetimeIndex:
    """UTC timestamps (nanosecond resolution) of epoch nanoseconds."""
    return pd.DatetimeIndex(np.asarray(ns, np.int64).view("datetime64[ns]"), tz="UTC")


def _actuals_frame(actuals: ActualBatch, forecast_series: list[str]) -> pd.DataFrame:
    """Outcomes by series and grid time; the categories hold every series seen (forecast or observed), sorted."""
    frame = pd.DataFrame({"unique_id": series_ids_as_text(actuals.series_id), "ds": actuals.target_ns,
                          "y": actuals.value})
    frame = frame.drop_duplicates(["unique_id", "ds"], keep="first").sort_values(["unique_id", "ds"], kind="stable")
    frame["ds"] = utc(frame["ds"].to_numpy())
    categories = sorted(set(frame["unique_id"]) | set(forecast_series))
    frame["unique_id"] = pd.Categorical(frame["unique_id"], categories=categories)
    return frame.reset_index(drop=True)


def events_frame(events: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Events as a frame with at least :data:`EVENT_COLUMNS`: ``series_id`` is read as ``unique_id`` and
    ``detected_at`` (or ``promoted_at``, ``time``) as ``at``, a UTC timestamp; other columns are kept."""
    frame = pd.DataFrame(events).copy()
    for column in EVENT_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(np.nan, index=frame.index, dtype=object)
    for alias, column in (("series_id", "unique_id"), ("detected_at", "at"), ("promoted_at", "at"),
                          ("time", "at"), ("timestamp", "at")):
        if alias in frame.columns:  # events of several kinds may name the same thing differently
            frame[column] = frame[column].where(frame[column].notna(), frame.pop(alias))
    frame["at"] = pd.to_datetime(frame["at"], utc=True, format="ISO8601")  # "...:00Z" beside "...:00.250000Z"
    rest = [c for c in frame.columns if c not in EVENT_COLUMNS]
    return frame[EVENT_COLUMNS + rest].sort_values("at", kind="stable").reset_index(drop=True)


@dataclass
class ReplayResult:
    """A replay's forecasts with their outcomes, its events and dead letters, and ways to look at them.

    Built by :func:`tidecast.replay` (and ``tidecast replay --report``); see the module docstring for the frames.
    """

    forecasts: pd.DataFrame
    actuals: pd.DataFrame
    events: pd.DataFrame
    dead_letters: pd.DataFrame
    run: dict[str, Any]  # the replay's summary: counts, timing, the engine's own scores, dead letters
    config: EngineConfig
    source: str = "<DataFrame>"

    @property
    def levels(self) -> list[str]:
        """Interval levels, coverage in percent, as in the ``lo-``/``hi-`` columns: ``["80", "95"]``."""
        return self.config.level_names

    @property
    def models(self) -> list[str]:
        return [alias for alias, _ in self.config.lanes]

    @property
    def horizon(self) -> int:
        return self.config.horizon

    def __repr__(self) -> str:
        n_series = self.actuals["unique_id"].nunique()
        return (f"ReplayResult({len(self.forecasts):,} forecast steps of {n_series} series, models "
                f"{', '.join(self.models)}, H={self.horizon}, levels {', '.join(self.levels)}; "
                f"{len(self.events)} events, {len(self.dead_letters)} dead letters)")

    # -- scores ------------------------------------------------------------------------------------
    def summary(self, by: str = "model") -> pd.DataFrame:
        """Scores per model (``by="model"``), per model and horizon (``"horizon"``) or per model and series
        (``"series"``): ``n_forecasts`` (issued), ``n_scored`` (outcome known), ``n_no_interval``, ``mae``,
        ``rmse``, ``mase``, ``smape`` (percent), and per level ``coverage-L``, ``target-L``, ``width-L`` and
        ``interval_score-L``. ``NaN`` where undefined (nothing scored, no interval, no scale yet)."""
        if by not in GROUPINGS:
            raise ValueError(f"by={by!r}: one of {', '.join(GROUPINGS)}")
        keys = ["model", *GROUPINGS[by]]
        f = self.forecasts
        issued = f.groupby(keys, observed=True).size().rename("n_forecasts")
        if by == "model":  # a model that issued nothing is still a row (0 forecasts), as in the engine's summary
            issued = issued.reindex(pd.Index(self.models, name="model"), fill_value=0)
        scored = f[f["y"].notna()]
        with np.errstate(over="ignore"):  # as the engine scores: errors clipped, so 1e308 keeps RMSE >= MAE finite
            err = np.clip((scored["y"] - scored["mean"]).to_numpy(dtype=float), -MAX_ERROR, MAX_ERROR)
        columns: dict[str, Any] = {
            **{k: scored[k] for k in keys},
            "n_scored": np.ones(len(scored)),
            "n_no_interval": scored[f"lo-{self.levels[0]}"].isna().to_numpy(dtype=float),
            "mae": np.abs(err), "sq_err": err * err,
            "mase": np.abs(err) / self.scales()[f["y"].notna().to_numpy()],
            "smape": smape(scored["y"].to_numpy(), scored["mean"].to_numpy()),
        }
        y = scored["y"].to_numpy()
        for level, alpha in zip(self.levels, self.config.alphas, strict=True):
            lo, hi = scored[f"lo-{level}"].to_numpy(), scored[f"hi-{level}"].to_numpy()
            has = ~np.isnan(lo) & ~np.isnan(hi)
            with np.errstate(invalid="ignore"):
                width = np.where(has, hi - lo, np.nan)
                miss = np.maximum(lo - y, 0.0) + np.maximum(y - hi, 0.0)
                penalty = (2.0 / alpha) * np.minimum(miss, MAX_ERROR)
            columns[f"coverage-{level}"] = (has & (lo <= y) & (y <= hi)).astype(float)
            columns[f"width-{level}"] = width
            columns[f"interval_score-{level}"] = np.where(has, width + penalty, np.nan)
        table = pd.DataFrame(columns).replace([np.inf, -np.inf], np.nan)
        grouped = table.groupby(keys, observed=True)
        out = grouped.mean()
        out["n_scored"] = grouped["n_scored"].sum().astype(int)
        out["n_no_interval"] = grouped["n_no_interval"].sum().astype(int)
        out["rmse"] = np.sqrt(out.pop("sq_err"))
        out = issued.to_frame().join(out, how="left")
        out["n_scored"] = out["n_scored"].fillna(0).astype(int)
        out["n_no_interval"] = out["n_no_interval"].fillna(0).astype(int)
        for level, alpha in zip(self.levels, self.config.alphas, strict=True):
            out[f"target-{level}"] = 1.0 - alpha
        order = ["n_forecasts", "n_scored", "n_no_interval", "mae", "rmse", "mase", "smape"]
        order += [f"{stat}-{level}" for level in self.levels
                  for stat in ("coverage", "target", "width", "interval_score")]
        return out[order].reset_index()

    def scales(self) -> np.ndarray:
        """Per forecast row, the MASE scale of its series at its origin (``NaN`` while undefined). Computed on
        each call (one pass over the rows: ~0.1 s at three million), so a ``forecasts`` sorted or subset since
        gets its own."""
        return _scales(self.forecasts, self.actuals, self.config.step_ns)

    # -- looking -----------------------------------------------------------------------------------
    def plot(self, series_id: str, model: str | None = None, h: int = 1) -> Figure:
        """Actual against the ``h``-step forecast of one series, with every level's band, the outcomes that fell
        outside the widest band, and event markers; ``model=None`` draws every model."""
        from matplotlib.figure import Figure

        from tidecast.stream.report import draw_forecast

        series_id = self._check_series(series_id)
        models = self.models if model is None else [model]
        unknown = [m for m in models if m not in self.models]
        if unknown:
            raise ValueError(f"model {unknown[0]!r} is not one of this replay's: {', '.join(self.models)}")
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)):  # 2.5 drew no forecast at all
            raise TypeError(f"h={h!r}: a whole number of steps ahead")
        if not 1 <= h <= self.horizon:
            raise ValueError(f"h={h}: this replay forecast 1..{self.horizon} steps ahead")
        fig = Figure(figsize=(10, 3.6), layout="constrained")
        draw_forecast(fig.add_subplot(), self, series_id, models, h)
        return fig

    def report(self, path: str | Path, series: Iterable[str] | str = (), top: int = 3) -> Path:
        """Write the self-contained HTML report (see :mod:`tidecast.stream.report`); returns its path. ``series``:
        ids drawn besides the worst ``top`` (one id, or a comma-separated string as the CLI's)."""
        from tidecast.stream.report import write_report

        if isinstance(series, str) and series not in self._series_ids():  # the CLI's spelling: "a,b"
            series = split_items(series, ",")
        elif isinstance(series, str) or not isinstance(series, Iterable):  # one id
            series = [series]
        series = [self._check_series(series_id) for series_id in series]
        return write_report(self, Path(path), series=series, top=top)

    def to_nixtla(self) -> pd.DataFrame:
        """Nixtla's cross-validation layout: one row per (series, target, origin) with ``y`` and each model's
        forecast as columns: ``unique_id, ds, cutoff, y, <model>, <model>-lo-<L>, <model>-hi-<L>, ...``; ``NaN``
        where a model issued nothing for that step (e.g. still warming up)."""
        f = self.forecasts
        # (series, origin, h) identifies a row as (series, target, origin) does; packed into one integer key
        cutoff_code, _ = pd.factorize(f["cutoff"], sort=True)
        n_cutoffs = int(cutoff_code.max()) + 1 if len(f) else 1
        series_code, _ = pd.factorize(f["unique_id"])  # not .cat.codes: a frame filtered since may hold plain str
        keys = (series_code.astype(np.int64) * n_cutoffs + cutoff_code) * (self.horizon + 1) \
            + f["h"].to_numpy(np.int64)
        unique, first = np.unique(keys, return_index=True)
        out = f.iloc[first][["unique_id", "ds", "cutoff", "y"]].reset_index(drop=True)
        values = ["mean", *[f"{side}-{level}" for level in self.levels for side in ("lo", "hi")]]
        if isinstance(f["model"].dtype, pd.CategoricalDtype):  # the lanes' order
            codes, models = f["model"].cat.codes.to_numpy(), list(f["model"].cat.categories)
        else:  # plain str: a frame read back from a file, or concatenated
            codes, models = pd.factorize(f["model"])
        clash = sorted(set(map(str, models)) & set(out.columns))
        if clash:  # its forecasts would overwrite the key column of that name (the outcomes, for "y")
            raise ValueError(f"model {clash[0]!r} has the name of a column of Nixtla's layout (unique_id, ds, "
                             "cutoff, y): give that lane another alias (e.g. --model sn=seasonal-naive)")
        for i, model in enumerate(models):
            mine = codes == i
            at = np.searchsorted(unique, keys[mine])
            for value in values:
                column = np.full(len(unique), np.nan)
                column[at] = f[value].to_numpy()[mine]
                out[model if value == "mean" else f"{model}-{value}"] = column
        return out

    def _series_ids(self) -> pd.Index:
        return self.actuals["unique_id"].cat.categories

    def _check_series(self, series_id: Any) -> str:
        """``series_id`` as the frames spell it (ids are strings: ``1`` is ``"1"``), or a ``ValueError`` that says
        which series there are, and why one from the input may be missing."""
        known = self._series_ids()
        if str(series_id) not in known:
            shown = ", ".join(map(str, known[:10])) + (" ..." if len(known) > 10 else "")
            held = int(self.run.get("n_held", 0))
            why = (f" ({held} series seen at one timestamp only were held back, not replayed: their values are not "
                   f"in the result)" if held else "")
            raise ValueError(f"no series {series_id!r} in this replay; series: {shown}{why}")
        return str(series_id)


def _scales(forecasts: pd.DataFrame, actuals: pd.DataFrame, step_ns: int | None = None) -> np.ndarray:
    """The prequential seasonal-naive scale of each forecast row's series at the row's origin, on the series' grid
    as the engine set it: ``step_ns`` (``freq``) or the step of its first :data:`STEP_WINDOW` observations."""
    out = np.full(len(forecasts), np.nan)
    series = actuals["unique_id"].cat.categories
    # codes by id, not the forecasts' own codes: a filtered frame may have dropped categories or be plain strings
    codes = pd.Categorical(forecasts["unique_id"], categories=series).codes
    cutoff = nanoseconds(forecasts["cutoff"])
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(series) + 1))  # code -1 (an unknown id) sorts first
    actual_codes = actuals["unique_id"].cat.codes.to_numpy()
    by_series = np.argsort(actual_codes, kind="stable")  # each series' actuals in their order, in one pass
    actual_bounds = np.searchsorted(actual_codes[by_series], np.arange(len(bounds)))
    times = nanoseconds(actuals["ds"])
    values = actuals["y"].to_numpy()
    for code in range(len(bounds) - 1):
        rows = order[bounds[code]:bounds[code + 1]]
        mine = by_series[actual_bounds[code]:actual_bounds[code + 1]]
        if not len(rows) or mine.size < 2:
            continue
        t, y = times[mine], values[mine]
        by_time = np.argsort(t, kind="stable")
        t, y = t[by_time], y[by_time]
        head_t = t[:STEP_WINDOW]  # the engine's rule, on the rows it held: gaps further on (a series hourly, then
        gaps = head_t[1:].view(np.uint64) - head_t[:-1].view(np.uint64)  # every other hour) do not move its grid;
        gaps = np.minimum(gaps, np.uint64(2**63 - 1)).astype(np.int64)  # exact in uint64 (sorted), the engine's cap
        gaps = gaps[gaps > 0]
        if step_ns is None and not gaps.size:
            continue
        step = step_ns or inferred_step(gaps)
        ticks = np.rint(ns_between(t, t[0]) / step).astype(np.int64)
        head = np.full(min(int(ticks[-1]) + 1, PERIOD_HEAD), np.nan)  # the ticks the period is detected on
        early = ticks < head.size
        head[ticks[early]] = y[early]
        at = np.rint(ns_between(cutoff[rows], t[0]) / step).astype(np.int64)
        out[rows] = running_scale_at(ticks, y, scale_period(head), at)
    with np.errstate(invalid="ignore"):
        out[out <= 0] = np.nan  # a constant history scales nothing
    return out
