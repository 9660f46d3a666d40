"""``tidecast replay``: run a history file through the engine, as the live service would have.

source (file) -> decode (:mod:`tidecast.stream.sources`) -> :class:`~tidecast.stream.engine.Engine` -> forecast sink,
drift events, dead letters, metrics -> summary (and, with ``--report``, a :class:`~tidecast.stream.result.ReplayResult`
written as an HTML report). Nothing here is specific to files except the source: the engine, the rules and the
metrics are the ones ``serve`` uses. :func:`execute` is the loop shared with the Python API (:func:`tidecast.replay`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tidecast.models.runtime import set_torch_threads
from tidecast.monitors.drift import DriftEvent
from tidecast.monitors.metrics import Metrics
from tidecast.stream.batch import ForecastBatch, ObservationBatch
from tidecast.stream.config import EngineConfig, port_number
from tidecast.stream.engine import Engine, EngineResult
from tidecast.stream.records import REASONS
from tidecast.stream.result import ResultCollector
from tidecast.stream.settings import at_least, check_declared, positive, setting
from tidecast.stream.sinks import (
    EventSink,
    ForecastSink,
    JsonlDeadLetters,
    JsonlEvents,
    NullSink,
    forecast_sink_for,
    write_whole,
    written_in_place,
)
from tidecast.stream.sources import DeadLetter, Replay, ReplaySpec, load_replay

#: The longest single sleep replay takes (a year): --linger's bound, and --rate's pause per batch at most.
LONGEST_SLEEP = 365 * 86_400.0


DEFAULT_DEAD_LETTER = Path("tidecast-dead-letters.jsonl")


@dataclass(frozen=True)
class ReplayOptions:
    """Everything ``tidecast replay`` takes besides the engine configuration (the file comes in ``spec``)."""

    out: Path | None = setting(None, "forecast records, .parquet or .csv", group="output")
    events: Path | None = setting(None, "drift events (the lanes' monitors' alarms) as JSON lines", group="output")
    dead_letter: Path | None = setting(DEFAULT_DEAD_LETTER, "rejected rows as JSON lines (created "
                                       "only if there are any; an earlier run's file is emptied)", group="output")
    summary_json: Path | None = setting(None, "write the summary as JSON", group="output")
    report: Path | None = setting(None, "write a self-contained HTML report (summary, coverage, plots of the worst "
                                  "series, events, dead letters)", group="output")
    report_series: list[str] | None = setting(None, "series the report plots besides those with the largest errors, "
                                              "comma-separated", group="output", shown_default="none")
    progress: bool = setting(True, "progress bar", group="output")
    metrics_port: int | None = setting(None, "serve Prometheus /metrics on this port", group="service",
                                       check=port_number)
    metrics_address: str = setting("127.0.0.1", "address the /metrics server listens on (0.0.0.0: every "
                                   "interface)", group="service")
    linger_seconds: float = setting(0.0, "keep /metrics up this many seconds after the run (needs --metrics-port)",
                                    group="service", name="linger", check=at_least(0, LONGEST_SLEEP))
    rate: float | None = setting(None, "throttle to this many observations per second", group="pace",
                                 shown_default="as fast as possible", check=positive)
    batch_size: int = setting(2000, "observations per engine batch", group="pace", check=at_least(1))
    spec: ReplaySpec = field(default_factory=ReplaySpec)

    def __post_init__(self) -> None:
        check_declared(self)


def run_replay(config: EngineConfig, options: ReplayOptions, console: Console | None = None,
               settings_file: Path | None = None) -> dict[str, Any]:
    """Replay a file end to end and return the summary (also printed and optionally written as JSON, and with
    ``options.report`` an HTML report).

    Everything a user can get wrong — outputs that would overwrite the input or the ``settings_file`` or cannot
    be written, model parameters, the metrics port — is checked before the first row is read. A summary or
    report an earlier run left at those paths is removed before this one starts: a run that fails part way
    leaves no summary beside this run's (emptied) events file that would read as its own.
    """
    console = console or Console()
    check_outputs(options, settings_file)
    for earlier in (options.summary_json, options.report):
        if earlier is not None and not written_in_place(Path(earlier)):
            Path(earlier).unlink(missing_ok=True)
    metrics = Metrics(reasons=REASONS)
    engine = Engine.from_config(config, metrics)
    server = _serve_metrics(metrics, options.metrics_address, options.metrics_port, console)
    set_torch_threads(config.torch_threads)
    replay = load_replay(options.spec)
    source = str(options.spec.path)
    if options.report_series:
        _check_report_series(options.report_series, replay)
    collector = ResultCollector(config) if options.report is not None else None
    summary = execute(engine, replay, source, options, console, collector)
    # the files first: a stdout closed early (piped to head) or full ends the process at the table
    if options.summary_json is not None:
        options.summary_json.parent.mkdir(parents=True, exist_ok=True)
        write_whole(options.summary_json, json.dumps(summary, indent=2))
    if collector is not None and options.report is not None:
        result = collector.build(summary, source)
        replayed = set(result.actuals["unique_id"].cat.categories)
        wanted = options.report_series or []
        left_out = [series_id for series_id in wanted if series_id not in replayed]
        if left_out:  # in the input, yet never replayed: a report of the rest beats none after the whole run
            shown = ", ".join(map(escape, left_out))  # ids may hold rich markup's brackets
            console.print(f"[yellow]--report-series: {shown} left out of the report: in the input but "
                          f"not replayed (a series seen at one timestamp only is held; one refused by "
                          f"--allowed-series or --max-series is dead-lettered)[/yellow]")
        path = result.report(options.report, series=[s for s in wanted if s in replayed])
    print_summary(summary, console)
    if collector is not None and options.report is not None:
        console.print(f"report: {escape(str(path))} ({path.stat().st_size / 1e6:.1f} MB)")
    if server is not None and options.linger_seconds > 0:
        console.print(f"serving /metrics on http://{_host(options.metrics_address)}:{server.server_port}/metrics "
                      f"for {options.linger_seconds:.0f} s more")
        with contextlib.suppress(KeyboardInterrupt):  # the run is complete: a stop now is its normal end
            time.sleep(options.linger_seconds)
    if server is not None:
        server.shutdown()
    return summary


def _check_report_series(wanted: list[str], replay: Replay) -> None:
    """``ValueError`` before any work for a ``--report-series`` the file does not hold."""
    known = set(replay.observations.series_ids.tolist())
    for series_id in wanted:
        if series_id not in known:
            shown = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
            raise ValueError(f"--report-series {series_id!r}: no such series in the input; series: {shown} (the flag "
                             "and TIDECAST_REPORT_SERIES split on commas and trim spaces: name an id holding either "
                             "in the TOML file's report_series list)")


class _Tee:
    """Writes every forecast batch to several sinks."""

    def __init__(self, *sinks: ForecastSink) -> None:
        self.sinks = sinks

    def write(self, batch: ForecastBatch) -> None:
        for sink in self.sinks:
            sink.write(batch)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def execute(engine: Engine, replay: Replay, source: str, options: ReplayOptions, console: Console,
            collector: ResultCollector | None = None) -> dict[str, Any]:
    """The replay loop: every batch through the engine, forecasts to ``options.out`` (and the collector), dead
    letters to ``options.dead_letter`` (and the collector), model maintenance between batches; the summary."""
    metrics = engine.metrics
    letters = JsonlDeadLetters(options.dead_letter) if options.dead_letter is not None else None
    sinks = [forecast_sink_for(options.out)] + ([collector] if collector is not None else [])
    sink = _Tee(*sinks)
    events: EventSink = JsonlEvents(options.events) if options.events is not None else NullSink()
    counts: dict[tuple[str, str], int] = {}
    started = time.perf_counter()

    def dead_letter(letter: DeadLetter) -> None:
        if letters is not None:
            letters.write(letter)
        if collector is not None:
            collector.letter(letter)

    def forward(result: EngineResult) -> None:
        sink.write(result.forecasts)
        _events(events, counts, result.events)
        if collector is not None:
            collector.observe(result)

    try:
        for letter in replay.dead_letters:
            dead_letter(letter)
            metrics.dead_letters.labels(reason=letter.reason).inc()
        batch_size = options.batch_size if options.rate is None else max(1, min(options.batch_size,
                                                                                   int(options.rate / 20)))
        with _progress(console, options.progress) as progress:
            task = progress.add_task(f"replay {Path(source).name}", total=len(replay.observations))
            for batch in replay.batches(batch_size):
                result = engine.process(batch)
                forward(result)
                for letter in _rejections(result, batch, source):
                    dead_letter(letter)  # the engine already counted them in its metrics
                engine.maintenance()
                progress.advance(task, len(batch))
                _throttle(options.rate, started, progress.tasks[task].completed)
        forward(engine.flush())  # series still inferring their step at the end of the file
    finally:
        sink.close()
        events.close()
        if letters is not None:
            letters.close()
    elapsed = time.perf_counter() - started
    letter_file = options.dead_letter if letters is not None and letters.count else None
    return _summary(engine, metrics, elapsed, letter_file, options, counts)


def check_outputs(options: ReplayOptions, settings_file: Path | None = None) -> None:
    """``ValueError`` for an output that is the input file, the settings file, another output, or cannot be
    written, and for ``--report-series`` without ``--report`` or ``--linger`` without ``--metrics-port`` (each
    would do nothing)."""
    if options.report_series and options.report is None:
        raise ValueError("--report-series picks the series of the HTML report: give --report PATH too")
    if options.linger_seconds > 0 and options.metrics_port is None:
        raise ValueError("--linger keeps /metrics up after the run: give --metrics-port PORT too")
    outputs = {"--out": options.out, "--events": options.events, "--dead-letter": options.dead_letter,
               "--summary-json": options.summary_json, "--report": options.report}
    given = {flag: Path(path) for flag, path in outputs.items() if path is not None}
    if options.out is not None:
        forecast_sink_for(options.out)  # an extension it cannot write is refused before any input is read
    source = Path(options.spec.path)
    for flag, path in given.items():
        if _same_file(path, source):
            raise ValueError(f"{flag} {path} is the input file: it would be overwritten; choose another path")
        if settings_file is not None and _same_file(path, Path(settings_file)):
            raise ValueError(f"{flag} {path} is the settings file (--config): it would be overwritten; choose "
                             "another path")
        for other, other_path in given.items():
            # /dev/null takes several outputs (the default dead-letter file's error suggests it)
            if other < flag and _same_file(path, other_path) and not _a_device(path):
                raise ValueError(f"{other} and {flag} are the same file {path}: choose two paths")
        problem = _unwritable(path)
        if problem:
            hint = (" (the default, in the working directory: give --dead-letter PATH elsewhere, or /dev/null to "
                    "drop rejected rows)" if flag == "--dead-letter" and path == DEFAULT_DEAD_LETTER else "")
            raise ValueError(f"{flag} {path}: {problem}{hint}")


def _a_device(path: Path) -> bool:
    return path.exists() and stat.S_ISCHR(path.stat().st_mode)


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _unwritable(path: Path) -> str | None:
    """Why ``path`` could not be written, or ``None``: tried for real (the folders are created, as the sinks
    would; a probe file is made and removed), since permission bits do not tell everything (root, /proc)."""
    if path.is_dir():
        return "is a directory"
    if path.exists() and not path.is_file():  # a device or pipe: opening one to probe it ends a pipe's reader
        return None  # (or blocks, with none yet)
    try:
        if path.exists():
            with path.open("ab"):
                return None
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.absolute().parent):
            return None
    except OSError as err:
        return f"cannot be written: {err.strerror or err}"


def _serve_metrics(metrics: Metrics, address: str, port: int | None, console: Console):
    if port is None:
        return None
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=address, registry=metrics.registry)
    except OSError as err:  # in use, not an address of this host, not allowed
        raise ValueError(f"--metrics-port {port}: cannot listen on {address}:{port}: "
                         f"{err.strerror or err}") from None
    console.print(f"metrics on http://{_host(address)}:{server.server_port}/metrics")
    return server


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _events(sink: EventSink, counts: dict[tuple[str, str], int], events: list[DriftEvent]) -> None:
    sink.write(events)
    for event in events:
        key = (event.model, event.detector)
        counts[key] = counts.get(key, 0) + 1


def _rejections(result: EngineResult, batch: ObservationBatch, source: str) -> list[DeadLetter]:
    return [
        DeadLetter(rej.reason, rej.detail, source,
                   (int(batch.partitions[rej.index]), int(batch.offsets[rej.index])),
                   {"series_id": batch.series_ids[rej.index], "timestamp_ns": int(batch.timestamps_ns[rej.index]),
                    "value": float(batch.values[rej.index])})
        for rej in result.rejections
    ]


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("obs"), TimeRemainingColumn(), console=console, disable=not enabled,
                    transient=True)


def _throttle(rate: float | None, started: float, done: float) -> None:
    if rate:
        ahead = done / rate - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(min(ahead, LONGEST_SLEEP))  # --rate 1e-300 asked for a sleep time.sleep cannot take


def _summary(engine: Engine, metrics: Metrics, elapsed: float, letter_file: Path | None, options: ReplayOptions,
             event_counts: dict[tuple[str, str], int]) -> dict[str, Any]:
    summary = engine.summary()
    summary["n_resets"] = int(metrics.registry.get_sample_value("tidecast_series_resets_total") or 0)
    events: dict[str, dict[str, int]] = {}  # model -> detector -> events
    for (model, detector), count in sorted(event_counts.items()):
        events.setdefault(model, {})[detector] = count
    dead = {}
    for sample in metrics.dead_letters.collect()[0].samples:
        if sample.name.endswith("_total") and sample.value > 0:
            dead[sample.labels["reason"]] = int(sample.value)
    return {
        **summary,
        "notes": not_ready_notes(engine, summary),
        "dead_letters": dead,
        "dead_letter_file": str(letter_file) if letter_file is not None else None,
        "drift_events": events,
        "events_file": str(options.events) if options.events is not None else None,
        "elapsed_seconds": elapsed,
        "observations_per_second": summary["n_observations"] / elapsed if elapsed > 0 else None,
        "config": engine.config.to_dict(),
    }


def not_ready_notes(engine: Engine, summary: dict[str, Any]) -> list[str]:
    """A line per model with series that never forecast: how many, what the model waits for (where it can tell)
    and the longest series seen, so that a replay of a short history says why its table is empty; and a line when
    most rows repeated a timestamp, even where every lane forecast from the rest (1,380 of 1,440 rows skipped
    said nothing while a lane still forecast)."""
    notes = []
    duplicates = summary.get("n_duplicates", 0)
    # most rows repeat a timestamp: times read from the wrong column (a date beside a time of day); said once
    repeated = duplicates > summary["n_observations"]
    repeated_note = (f"{duplicates:,} rows repeated their series' last timestamp (is the time column right? "
                     "--time-column / time_column=)")
    for lane in engine.lanes:
        silent = summary["models"][lane.name]["n_series_without_forecast"]
        if not silent:
            continue
        note = f"{lane.name}: {silent:,} of {summary['n_series']:,} series never forecast"
        held = summary.get("n_held", 0)
        if held:  # a series seen at one timestamp has no grid step: it is held, not warming up
            note += (f" ({held:,} of them seen at one timestamp only: held back, no grid step to forecast on; "
                     "the freq setting, --freq or freq=, sets one)")
        needs = lane.model.first_forecast_after()
        if needs is not None:
            note += f"; a series needs {needs[0]:,} observations first ({needs[1]})"
        longest = max(summary["max_series_observations"], 1 if held else 0)  # a held row is an observation too
        note += f"; the longest series here has {longest:,}"
        resets = summary["n_resets"]
        if resets:  # a reset restarts a series' history: its count no longer says how far it got
            note += (f", and {resets:,} gap{'s' * (resets > 1)} longer than max_gap restarted "
                     f"{'histories' if resets > 1 else 'a history'} (is the time column right? --freq / freq=, "
                     "--max-gap / max_gap=)")
        elif repeated:
            note += f", and {repeated_note}"
            repeated = False
        elif needs is not None and longest >= needs[0] and silent >= summary["n_series"]:
            note += ("; long enough for that minimum, yet no forecast was ever finite: the model needs more on this "
                     "data, or diverged or failed (check its --model-param / model_params= values)")
        notes.append(note)
    if repeated:  # every lane forecast from what was left: still most of the input was skipped
        notes.append(f"{repeated_note}, more than the {summary['n_observations']:,} applied")
    return notes


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The end-of-run table: one row per model, side by side."""
    cfg = summary["config"]
    levels = list(next(iter(summary["models"].values()))["levels"]) if summary["models"] else []
    targets = ", ".join(f"{level} %" for level in levels)
    table = Table(title=f"tidecast replay — H={cfg['horizon']}, target coverage {targets}, "
                        f"calibrator {cfg['calibrator']}")
    interval_columns = ("coverage", "mean width", "interval score")
    if len(levels) > 1:  # one set of interval columns per level
        interval_columns = tuple(f"{col} {level}" for level in levels for col in ("coverage", "width", "score"))
    for col in ("model", "forecasts", "MAE", "RMSE", *interval_columns):
        table.add_column(col, justify="left" if col == "model" else "right")
    best = min((m["mae"] for m in summary["models"].values() if m["mae"] is not None), default=None)
    for name, m in summary["models"].items():
        cells = []
        for level in levels:
            lv = m["levels"][level]
            cells += [_fmt(lv["coverage"], ".3f"), _fmt(lv["mean_width"]), _fmt(lv["interval_score"])]
        table.add_row(name, f"{m['n_forecasts']:,}", _fmt(m["mae"], bold=m["mae"] == best), _fmt(m["rmse"]), *cells)
    console.print(table)
    dead = ", ".join(f"{k}={v}" for k, v in sorted(summary["dead_letters"].items())) or "none"
    console.print(
        f"{summary['n_observations']:,} observations of {summary['n_series']} series in "
        f"{summary['elapsed_seconds']:.1f} s ({summary['observations_per_second'] or 0:,.0f} obs/s); "
        f"duplicates {summary['n_duplicates']}, snapped collisions {summary['n_collisions']}, gap-filled ticks "
        f"{summary['n_gap_filled']}"
        + (f", gap resets {summary['n_resets']}" if summary.get("n_resets") else "")
        + (f", held (series seen at one timestamp) {summary['n_held']}" if summary["n_held"] else "")
        + f"; dead letters: {dead}"
        + (f" -> {escape(summary['dead_letter_file'])}" if summary["dead_letter_file"] else "")
    )
    events = ", ".join(f"{model}/{detector} {n:,}" for model, by in summary["drift_events"].items()
                       for detector, n in by.items()) or "none"
    # paths are text, not rich markup: "runs/[v2]/" printed as "runs//", and "[/b]" ended the run before its summary
    console.print(f"drift events: {events}"
                  + (f" -> {escape(summary['events_file'])}" if summary["events_file"] else ""))
    for note in summary.get("notes", []):
        console.print(f"[yellow]note[/yellow]: {note}", highlight=False)


def _fmt(value: float | None, spec: str = ".4g", bold: bool = False) -> str:
    if value is None:
        return "-"
    text = format(value, spec)
    return f"[bold green]{text}[/]" if bold else text
