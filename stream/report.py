"""The replay report: one self-contained HTML file to see where a model was wrong and where its intervals failed.

Everything is inline — CSS in the page, figures as base64 PNG — so the file opens anywhere with no network and can
be mailed or attached to a ticket. Sections:

1. the run: source, series, observations, models, horizon, levels, calibrator;
2. a summary table per model (:meth:`~tidecast.stream.result.ReplayResult.summary`), coverage off its target by
   more than 0.02 flagged;
3. coverage and mean width per horizon against each level's target;
4. rolling coverage over time (all horizons, per model and level);
5. for the series with the largest errors (highest mean MASE over the models; MAE where no scale exists) and any
   asked for: actual against forecast with the bands at h = 1 and h = H, outcomes outside the widest band marked,
   drift alarms and retrain promotions drawn as vertical lines, and a zoom on the largest h = 1 error;
6. events per model, detector and kind; dead letters per reason.

Plots use matplotlib's object API (no pyplot, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tidecast.stream.result import nanoseconds, ns_between, utc
from tidecast.stream.sinks import write_whole

if TYPE_CHECKING:
    from tidecast.stream.result import ReplayResult

_FIRST_NS, _LAST_NS = np.iinfo(np.int64).min + 1, np.iinfo(np.int64).max  # int64's minimum is NaT
#: Largest report the tests accept; figures are sized so that a report of a few dozen series stays well below.
MAX_BYTES = 5_000_000
DPI = 90
#: Coverage further than this from its target is flagged in the summary table.
COVERAGE_TOLERANCE = 0.02
_LINESTYLES = ("-", "--", ":", "-.")
#: Lane events (no series id) drawn on every series of their model: the ones that change what it forecasts.
LANE_CHANGES = ("promoted", "rolled_back")
_EVENT_STYLE = {"drift": ("tab:orange", "--"), "retrain": ("tab:green", "-"), "promot": ("tab:green", "-")}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
td.off { color: #b00020; font-weight: 600; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""


# -- drawing -----------------------------------------------------------------------------------------------
def _colors(models: list[str]) -> dict[str, str]:
    return {m: f"C{i % 10}" for i, m in enumerate(models)}


def draw_forecast(ax: Axes, result: ReplayResult, series_id: str, models: list[str], h: int,
                  window: tuple[pd.Timestamp, pd.Timestamp] | None = None, legend: bool = True) -> None:
    """On ``ax``: the series' actual values, each model's ``h``-step forecast with every level's band, outcomes
    outside the widest band, and the series' events; optionally only inside ``window``. Over a whole series the
    misses are a rug along the bottom (one row per model: clusters of failures stand out and the data stays
    visible); inside a window they are red dots on the outcomes."""
    f = result.forecasts
    rows = f[(f["unique_id"] == series_id) & (f["h"] == h) & f["model"].isin(models)]
    actual = result.actuals[result.actuals["unique_id"] == series_id]
    if window is not None:
        rows = rows[(rows["ds"] >= window[0]) & (rows["ds"] <= window[1])]
        actual = actual[(actual["ds"] >= window[0]) & (actual["ds"] <= window[1])]
    colors = _colors(result.models)
    widest = max(result.levels, key=float)
    levels = sorted(result.levels, key=float, reverse=True)
    shade = min(0.12, 0.6 / len(levels))  # nested bands darken inwards; the innermost stays below 0.75
    step = _step(actual["ds"].to_numpy())
    for row, model in enumerate(models):
        mine = rows[rows["model"] == model].sort_values("ds")
        if mine.empty:
            continue
        ds = mine["ds"].to_numpy()
        for i, level in enumerate(levels):
            ax.fill_between(*_broken(ds, step, mine[f"lo-{level}"], mine[f"hi-{level}"]), color=colors[model],
                            alpha=0.12 + shade * i, linewidth=0, label=f"{model} {level} %")
        ax.plot(*_broken(ds, step, mine["mean"]), color=colors[model], linewidth=0.8, label=f"{model} h={h}")
        y, lo, hi = (mine[c].to_numpy() for c in ("y", f"lo-{widest}", f"hi-{widest}"))
        with np.errstate(invalid="ignore"):
            out = np.isfinite(y) & ~((lo <= y) & (y <= hi))
        if out.any() and window is None:
            ax.plot(ds[out], np.full(int(out.sum()), 0.02 + 0.04 * row), "|", markersize=6, color=colors[model],
                    transform=ax.get_xaxis_transform(), label=f"outside {model} {widest} % (rug)")
        elif out.any():
            ax.scatter(ds[out], _drawable(y[out]), s=8, color="tab:red", zorder=3, label=f"outside {model} {widest} %")
    ax.plot(*_broken(actual["ds"].to_numpy(), step, actual["y"]), color="black", linewidth=0.6, label="actual")
    _draw_events(ax, result.events, series_id, models, window)
    ax.set_title(plain(f"{series_id} — {', '.join(models)}, h = {h}"), fontsize=10)
    ax.tick_params(labelsize=8)
    if legend:
        ax.legend(fontsize=7, loc="upper left", ncols=5)


#: Drawn values are clipped to this magnitude: matplotlib's transforms overflow near float64's limit (an outcome of
#: 1e308 made the axis singular and the whole report failed). Tables keep the true numbers.
DRAW_LIMIT = 1e300


def _drawable(values: Any) -> np.ndarray:
    """Values as drawn: finite ones clipped to ``DRAW_LIMIT``; NaN (a break) and inf (an unbounded band) as they are."""
    v = np.asarray(values, dtype=float)
    return np.where(np.isinf(v), v, np.clip(v, -DRAW_LIMIT, DRAW_LIMIT))


def _step(ds: np.ndarray) -> float | None:
    """The series' usual step between observations in nanoseconds (their median gap); ``None`` with fewer than
    two. Worked out in integers: a gap of more than 292 years overflows a pandas Timedelta."""
    if len(ds) < 2:
        return None
    ns = nanoseconds(ds)
    return float(np.median(ns_between(ns[1:], ns[:-1])))


def _broken(ds: np.ndarray, step: float | None, *columns: Any) -> tuple[np.ndarray, ...]:
    """``(ds, *columns)`` as drawn, with a ``NaN`` point inside every gap longer than 1.5 steps, so lines and bands
    break where nothing arrived (they drew 30 missing hours as a measured straight line)."""
    values = [_drawable(c) for c in columns]
    if step is None or len(ds) < 2:
        return (ds, *values)
    ns = nanoseconds(ds)
    gaps = np.flatnonzero(ns_between(ns[1:], ns[:-1]) > 1.5 * step) + 1
    if not gaps.size:
        return (ds, *values)
    breaks = utc(ns[gaps - 1] + np.int64(step)).to_numpy()  # one step into the gap: before its end, in range
    return (np.insert(ds, gaps, breaks), *(np.insert(v, gaps, np.nan) for v in values))


def plain(text: str) -> str:
    """``text`` as matplotlib draws it literally: a series id such as ``cost_$_2024_$`` would otherwise be parsed as
    mathtext (``$...$``) and set in italics, or fail to render at all."""
    return text.replace("$", r"\$")


def _draw_events(ax: Axes, events: pd.DataFrame, series_id: str, models: list[str],
                 window: tuple[pd.Timestamp, pd.Timestamp] | None) -> None:
    """The series' own events and its lanes' model changes (a retrain promotion or rollback has no series: it
    changes every series of the model; the lane's other retrain events stay in the events table), as vertical
    lines."""
    ids = events["unique_id"]
    lane_wide = (ids.isna() | (ids.astype(str) == "")) & events["kind"].isin(LANE_CHANGES)
    mine = events[((ids == series_id) | lane_wide) & (events["model"].isna() | events["model"].isin(models))]
    if window is not None:
        mine = mine[(mine["at"] >= window[0]) & (mine["at"] <= window[1])]
    labelled: set[str] = set()
    for _, event in mine.iterrows():
        kind = str(event["kind"]) if pd.notna(event["kind"]) else "event"
        family = next((k for k in _EVENT_STYLE if k in kind or k in str(event["detector"])), "drift")
        color, style = _EVENT_STYLE[family]
        label = f"{event['detector']} {kind}" if pd.notna(event["detector"]) else kind
        ax.axvline(event["at"], color=color, linestyle=style, linewidth=1.0,
                   label=None if label in labelled else plain(label))
        labelled.add(label)


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _per_horizon_figure(result: ReplayResult, by_horizon: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    coverage_ax, width_ax = fig.subplots(1, 2)
    colors = _colors(result.models)
    for model, rows in by_horizon.groupby("model", observed=True):
        for i, level in enumerate(result.levels):
            style = _LINESTYLES[i % len(_LINESTYLES)]
            coverage_ax.plot(rows["h"], rows[f"coverage-{level}"], color=colors[model], linestyle=style,
                             marker=".", label=f"{model} {level} %")
            width_ax.plot(rows["h"], rows[f"width-{level}"], color=colors[model], linestyle=style, marker=".",
                          label=f"{model} {level} %")
    for level, alpha in zip(result.levels, result.config.alphas, strict=True):
        coverage_ax.axhline(1 - alpha, color="grey", linewidth=0.8, linestyle="--")
        coverage_ax.annotate(f"target {level} %", (1, 1 - alpha), fontsize=7, color="grey",
                             xytext=(2, 2), textcoords="offset points")
    coverage_ax.set(title="Coverage by horizon (dashed: targets)", xlabel="h", ylabel="coverage")
    width_ax.set(title="Mean interval width by horizon", xlabel="h", ylabel="width")
    for ax in (coverage_ax, width_ax):
        if ax.get_legend_handles_labels()[1]:  # a run without forecasts has nothing to label
            ax.legend(fontsize=7)
        ax.tick_params(labelsize=8)
    return fig


def rolling_coverage(result: ReplayResult, bins: int = 150, smooth: int = 7) -> pd.DataFrame:
    """Rolling coverage over time, per model and level: the data's span is cut into ``bins`` equal time spans,
    and each span's value is the share of covered outcomes (all horizons and series) among the forecasts whose
    targets fall in it and its ``smooth - 1`` neighbours. Columns ``model, level, ds`` (span start),
    ``coverage``, ``n`` (scored steps in the span)."""
    f = result.forecasts
    scored = f[f["y"].notna()]
    if scored.empty:
        return pd.DataFrame(columns=["model", "level", "ds", "coverage", "n"])
    # in integer nanoseconds: targets more than 292 years apart overflow a pandas Timedelta
    ns = nanoseconds(scored["ds"])
    start = int(ns.min())
    length = max(1, int(ns.max()) - start)
    n_spans = min(bins, length)  # fewer spans than nanoseconds in the data's span, so the edges stay distinct
    position = ns_between(ns, start) * n_spans / length  # spans (e_k, e_k+1], the first closed on the left too
    index = np.clip(np.ceil(position).astype(np.int64) - 1, 0, n_spans - 1)
    edges = utc(np.array([start + length * k // n_spans for k in range(n_spans)], np.int64))
    parts = []
    y = scored["y"].to_numpy()
    for level in result.levels:
        lo, hi = scored[f"lo-{level}"].to_numpy(), scored[f"hi-{level}"].to_numpy()
        with np.errstate(invalid="ignore"):
            covered = (lo <= y) & (y <= hi)
        table = pd.DataFrame({"model": scored["model"], "span": index, "covered": covered})
        grouped = table.groupby(["model", "span"], observed=True)["covered"].agg(["sum", "size"])
        for model, rows in grouped.groupby(level="model", observed=True):
            # every span, empty ones included, so a window's neighbours are the spans next to it in time, not the
            # nearest ones that hold data (months away across a silence)
            spans = rows.droplevel("model").reindex(range(n_spans), fill_value=0)
            hits = spans["sum"].rolling(smooth, center=True, min_periods=1).sum()
            count = spans["size"].rolling(smooth, center=True, min_periods=1).sum()
            held = spans["size"].to_numpy() > 0
            parts.append(pd.DataFrame({"model": model, "level": level, "ds": edges[held],
                                       "coverage": (hits / count).to_numpy()[held],
                                       "n": spans["size"].to_numpy()[held]}))
    out = pd.concat(parts, ignore_index=True)
    out["ds"] = pd.to_datetime(out["ds"].astype("datetime64[ns, UTC]"))
    return out[["model", "level", "ds", "coverage", "n"]]


def _rolling_figure(result: ReplayResult) -> Figure:
    table = rolling_coverage(result)
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(result.models)
    for i, level in enumerate(result.levels):
        for model in result.models:
            rows = table[(table["model"] == model) & (table["level"] == level)]
            ax.plot(rows["ds"], rows["coverage"], color=colors[model], linestyle=_LINESTYLES[i % 4],
                    linewidth=0.9, label=f"{model} {level} %")
    for alpha in result.config.alphas:
        ax.axhline(1 - alpha, color="grey", linewidth=0.8, linestyle="--")
    events = result.events
    for at in events["at"].dropna().tolist():
        ax.axvline(at, color="tab:orange", linewidth=0.4, alpha=0.5)
    ax.set(title="Coverage over time (targets dashed; orange: events)", ylabel="coverage")
    ax.legend(fontsize=7, ncols=4)
    ax.tick_params(labelsize=8)
    return fig


def _series_figure(result: ReplayResult, series_id: str) -> Figure:
    models, horizon = result.models, result.horizon
    steps = [1, horizon] if horizon > 1 else [1]
    fig = Figure(figsize=(11, 2.6 * (len(steps) + 1)), layout="constrained")
    axes = fig.subplots(len(steps) + 1, 1)
    for i, (ax, h) in enumerate(zip(axes, steps, strict=False)):
        draw_forecast(ax, result, series_id, models, h, legend=i == 0)  # one legend: the panels share it
    draw_forecast(axes[-1], result, series_id, models, 1, window=_worst_window(result, series_id), legend=False)
    axes[-1].set_title(plain(f"{series_id} — around its largest h = 1 error"), fontsize=10)
    return fig


def _worst_window(result: ReplayResult, series_id: str, steps: int = 240) -> tuple[pd.Timestamp, pd.Timestamp]:
    f = result.forecasts
    rows = f[(f["unique_id"] == series_id) & (f["h"] == 1) & f["y"].notna()]
    actual = result.actuals[result.actuals["unique_id"] == series_id]["ds"]
    if rows.empty:
        return actual.iloc[0], actual.iloc[-1]
    worst = rows["ds"].to_numpy()[np.argmax(np.abs(rows["y"].to_numpy() - rows["mean"].to_numpy()))]
    step = _step(actual.to_numpy()) or 0.0
    # in integers, kept inside the nanosecond range: near 1677 or 2262, or with a step of centuries, a Timestamp
    # would overflow
    at = int(nanoseconds([worst])[0])
    edges = [max(at - int(step * (steps * 2 // 3)), _FIRST_NS), min(at + int(step * (steps // 3)), _LAST_NS)]
    first, last = utc(np.array(edges, np.int64))
    return first, last


def worst_series(result: ReplayResult, top: int) -> tuple[list[str], str]:
    """The ``top`` series with the highest mean MASE over the models (MAE where no series has a scale), and the
    score ranked by (``"MASE"`` or ``"MAE"``)."""
    if top < 0:
        raise ValueError(f"top={top}: the number of worst series to draw cannot be negative")
    per_series = result.summary("series")
    score = "mase" if per_series["mase"].notna().any() else "mae"
    ranked = per_series.groupby("unique_id", observed=True)[score].mean().sort_values(ascending=False)
    return [str(s) for s in ranked.dropna().index[:top]], score.upper()


# -- the page ----------------------------------------------------------------------------------------------
def _table(frame: pd.DataFrame) -> str:
    """An HTML table; a ``coverage`` cell further than the tolerance from the row's ``target`` gets ``off``."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for column, value in row.items():
            css = ""
            if column == "coverage" and np.isfinite(value) and abs(value - row["target"]) > COVERAGE_TOLERANCE:
                css = ' class="off"'
            cells.append(f"<td{css}>{html.escape(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def interval_table(summary: pd.DataFrame, levels: list[str]) -> pd.DataFrame:
    """The interval columns of a summary, one row per model and level: ``model, level, target, coverage,
    width, interval_score``."""
    keys = [c for c in summary.columns if c in ("model", "h", "unique_id")]
    parts = [summary[keys].assign(level=f"{level} %", target=summary[f"target-{level}"],
                                  coverage=summary[f"coverage-{level}"], width=summary[f"width-{level}"],
                                  interval_score=summary[f"interval_score-{level}"]) for level in levels]
    return pd.concat(parts, ignore_index=True).sort_values(keys, kind="stable")


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "–"
        if abs(value) < 1e6:
            return f"{value:,.4g}"
        return f"{value:,.0f}" if abs(value) < 1e15 else f"{value:.4g}"  # 1e36 was a 47-digit cell
    if isinstance(value, int | np.integer):
        return f"{value:,}"
    return str(value)


def _figure(fig: Figure, alt: str, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _series_count(run: dict, actuals: pd.DataFrame) -> str:
    """The run's series count as its summary (and the command line) gives it, with those that have no observation
    here said apart (held: seen at a single timestamp, README); a result without a summary counts what it shows."""
    shown = actuals["unique_id"].nunique()
    total = int(run.get("n_series", shown))
    unseen = total - shown
    return f"{total:,}" + (f" ({unseen:,} held, with no observation applied: seen at a single timestamp)"
                           if unseen > 0 else "")


def _run_section(result: ReplayResult) -> str:
    run, cfg = result.run, result.config
    actuals = result.actuals
    span = (f"{actuals['ds'].min():%Y-%m-%d %H:%M} → {actuals['ds'].max():%Y-%m-%d %H:%M} UTC"
            if len(actuals) else "no observations")
    items = {
        "source": result.source,
        "series": _series_count(run, actuals),
        "observations": f"{run.get('n_observations', len(actuals)):,}",
        "time span": span,
        "models": ", ".join(f"{alias} ({name})" if alias != name else alias for alias, name in cfg.lanes),
        "horizon": f"{cfg.horizon} steps",
        "interval levels": ", ".join(f"{level} %" for level in result.levels),
        "calibrator": cfg.calibrator,
        "forecast steps": f"{len(result.forecasts):,}",
    }
    pairs = [*items.items(), *(("note", note) for note in run.get("notes", []))]  # e.g. a model that never forecast
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in pairs)
    return f"<table><tbody>{rows}</tbody></table>"


def _counts(frame: pd.DataFrame, keys: list[str], what: str) -> str:
    if frame.empty:
        return f'<p class="note">No {what}.</p>'
    counts = frame.groupby(keys, dropna=False).size().rename("count").reset_index()
    return _table(counts.sort_values("count", ascending=False))


def render(result: ReplayResult, series: list[str] | None = None, top: int = 3) -> str:
    """The report as one HTML string."""
    summary = result.summary()
    point = summary[["model", "n_forecasts", "n_scored", "n_no_interval", "mae", "rmse", "mase", "smape"]]
    by_horizon = result.summary("horizon")
    worst, score = worst_series(result, top)
    chosen = list(dict.fromkeys([*(series or []), *worst]))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tidecast replay report — {html.escape(Path(result.source).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>tidecast replay report</h1>", _run_section(result),
        "<h2>Summary per model</h2>",
        '<p class="note">Prequential: each forecast scored once, when its outcome arrived. MASE: error over the '
        "series' one-step in-sample seasonal-naive error up to the forecast's origin. sMAPE in percent. "
        f"Coverage further than {COVERAGE_TOLERANCE} from its target in red; a step issued without an interval "
        "counts as a miss.</p>",
        _table(point), _table(interval_table(summary, result.levels)),
        "<h2>Coverage and width by horizon</h2>",
        _figure(_per_horizon_figure(result, by_horizon), "coverage and width by horizon",
                "Left: share of outcomes inside each level's interval, per horizon; dashed: targets. "
                "Right: mean width of the intervals that were given."),
        "<h2>Coverage over time</h2>",
        _figure(_rolling_figure(result), "coverage over time",
                "Share of outcomes inside the interval among forecasts whose targets fall in each time span "
                "(all horizons and series)."),
        "<h2>Series</h2>",
        f'<p class="note">{len(chosen)} series: '
        + (f"asked for: {html.escape(', '.join(series))}; " if series else "")
        + f"largest errors (mean {score} over models): {html.escape(', '.join(worst))}. "
          "Outcomes outside the widest band: a rug along the bottom (whole series) or red dots (zoom). Vertical "
          "lines: drift alarms (dashed) and retrain promotions (solid).</p>",
    ]
    for series_id in chosen:
        parts.append(f"<h3>{html.escape(series_id)}</h3>")
        parts.append(_figure(_series_figure(result, series_id), f"forecasts of {series_id}",
                             f"{series_id}: actual (black) and forecasts with bands at h = 1 and h = "
                             f"{result.horizon}, outcomes outside the widest band as a rug along the bottom; "
                             "last: the span around its largest h = 1 error, misses in red."))
    parts += ["<h2>Events</h2>", _counts(result.events, ["model", "detector", "kind"], "drift or retrain events"),
              "<h2>Dead letters</h2>", _counts(result.dead_letters, ["reason"], "dead letters"),
              "</body></html>"]
    return "\n".join(parts)


def write_report(result: ReplayResult, path: Path, series: list[str] | None = None, top: int = 3) -> Path:
    """Write :func:`render`'s page to ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, render(result, series, top))
    return path
