"""The Python API: :func:`replay`, importable as ``tidecast.replay``.

A DataFrame (or a file) in, a :class:`~tidecast.stream.result.ReplayResult` out — the same engine, rules and
scores as ``tidecast replay`` on the command line, which is a thin layer over the same loop
(:func:`tidecast.stream.replay.execute`).

>>> import pandas as pd, tidecast
>>> frame = pd.DataFrame({"unique_id": "a", "ds": pd.date_range("2024-01-01", periods=60, freq="h"),
...                       "y": [float(i % 4) for i in range(60)]})
>>> result = tidecast.replay(frame, models=["seasonal-naive"], horizon=3, levels=(80, 95),
...                          model_params={"seasonal-naive": {"period": 4}})
>>> result.forecasts[["unique_id", "h", "mean", "y"]].head(3)
  unique_id  h  mean    y
0         a  1   0.0  0.0
1         a  2   1.0  1.0
2         a  3   2.0  2.0
>>> tidecast.replay(frame, level=[80, 95])  # Nixtla spells it level
Traceback (most recent call last):
...
TypeError: replay() got an unexpected option 'level' (did you mean 'levels'?); options: allowed_series, alpha, ...
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from tidecast.models.runtime import torch_threads
from tidecast.monitors.conformal import DEFAULT_CALIBRATOR
from tidecast.monitors.metrics import Metrics
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.records import REASONS
from tidecast.stream.replay import ReplayOptions, execute
from tidecast.stream.result import ReplayResult, ResultCollector
from tidecast.stream.settings import settings_of, split_items
from tidecast.stream.sources import ReplaySpec, load_frame, load_replay

#: Keyword options besides the named arguments: engine settings, how to read the input, and how to run.
ENGINE_OPTIONS = tuple(f.name for f in dataclasses.fields(EngineConfig)
                       if f.name not in ("models", "horizon", "levels", "calibrator", "freq"))
INPUT_OPTIONS = ("format", "time_column", "series_column", "value_column", "name", "columns")
INPUT_FORMATS = ("auto", "wide", "long", "jsonl")
RUN_OPTIONS = ("batch_size", "progress")
#: The KEY=VALUE settings (model_params, retrain_params ...): a string is parsed as the CLI and environment do.
_KEY_VALUE_SETTINGS = {s.field: s for s in settings_of(EngineConfig) if s.field.endswith("_params")}


DEFAULT_LEVELS = (80, 95)
#: replay()'s own arguments, named in the error for an unknown option (Nixtla spells one of them ``level``).
NAMED_ARGUMENTS = ("models", "horizon", "levels", "calibrator", "freq")


def replay(data: pd.DataFrame | str | Path, models: Sequence[str] | str = ("seasonal-naive",), horizon: int = 24,
           levels: Sequence[float] | str | None = DEFAULT_LEVELS, calibrator: str | None = None,
           freq: str | None = None, **options: Any) -> ReplayResult:
    """Replay a history through the engine as the live service would have, and return everything it produced.

    data: a long DataFrame (``unique_id, ds, y``, Nixtla's layout), a wide one (a time column or a
    ``DatetimeIndex`` plus one column per series), or the path of a CSV, Parquet or JSON-lines file.
    models: lanes, ``ALIAS=MODEL`` or ``MODEL`` — built-in names, plug-ins' (entry points ``tidecast.models``)
    or ``river:MODULE.CLASS`` (a string: comma-separated, as the CLI's ``--model``). horizon: steps forecast at
    every observation. levels: interval coverages in percent, all learned in one calibrator pass (a string:
    comma-separated; ``None``, or ``alpha=`` given instead: the one level ``1 - alpha``, default 90 %).
    calibrator: the conformal method (default: the engine's). freq: the grid step (default: inferred per series).

    options: any other engine setting (``model_params={"alias": {...}}``, ``calibrator_params``, ``max_gap``,
    ``alpha``, ``coverage_window``, ``torch_threads`` ...), how to read the input (``time_column``,
    ``series_column``, ``value_column``, ``format``, ``name``, ``columns``) and ``batch_size`` (observations per
    engine batch, 2000) and ``progress`` (a progress bar, off). Bad input cells become dead letters
    (``result.dead_letters``), never exceptions; a mistake in the arguments raises before any work.
    """
    unknown = sorted(set(options) - {*ENGINE_OPTIONS, *INPUT_OPTIONS, *RUN_OPTIONS})
    if unknown:
        known = {*ENGINE_OPTIONS, *INPUT_OPTIONS, *RUN_OPTIONS, *NAMED_ARGUMENTS}
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"replay() got an unexpected option {unknown[0]!r}{hint}; options: "
                        f"{', '.join(sorted(known))}")
    options = {k: v for k, v in options.items() if v is not None}  # None: not given (the setting's default)
    if isinstance(options.get("alpha"), str):  # as levels="80,95" is read
        options["alpha"] = _number("alpha", options["alpha"])
    for key in ("columns", "allowed_series"):  # "a,b" as the CLI reads it (a set of it was the set of letters)
        if key in options:
            options[key] = _names(key, options[key], "a list of names (or one comma-separated string)",
                                  Sequence | set | frozenset)
    if options.get("format", "auto") not in INPUT_FORMATS:
        raise ValueError(f"format={options['format']!r}: one of {', '.join(INPUT_FORMATS)}")
    for key, setting in _KEY_VALUE_SETTINGS.items():  # "cooldown=5 budget=2": the CLI's spelling, parsed as it is
        if isinstance(options.get(key), str):
            try:
                options[key] = setting.convert(options[key])
            except ValueError as err:
                raise ValueError(f"{key}={options[key]!r}: {err}") from None
    models = _names("models", models, "model names (a list, or one comma-separated string)", Sequence, empty=False)
    levels = _listed(levels, float)
    if "alpha" in options and levels is not None:
        if levels is not DEFAULT_LEVELS:
            raise ValueError(f"give levels or alpha, not both (alpha={options['alpha']} is levels=("
                             f"{100 * (1 - options['alpha']):g},))")
        levels = None  # alpha alone: its one level replaces the default levels
    if levels is not None and levels is not DEFAULT_LEVELS:
        levels = [_level(level) for level in _items("levels", levels)]
    if isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral):
        raise TypeError(f"horizon must be a whole number of steps, got {horizon!r}")
    batch_size = options.get("batch_size", 2000)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be a whole number of observations, got {batch_size!r}")
    config = EngineConfig(models=list(models), horizon=horizon, levels=None if levels is None else list(levels),
                          calibrator=calibrator or DEFAULT_CALIBRATOR, freq=freq,
                          **{k: v for k, v in options.items() if k in ENGINE_OPTIONS})
    spec_options = {k: v for k, v in options.items() if k in INPUT_OPTIONS}
    if isinstance(data, pd.DataFrame):
        source = "<DataFrame>"
        loaded = load_frame(data, ReplaySpec(**spec_options), source)
    elif isinstance(data, str | Path):
        source = str(data)
        loaded = load_replay(ReplaySpec(path=Path(data), **spec_options))
    else:
        raise TypeError(f"data must be a pandas DataFrame or a path, got {type(data).__name__}")
    run = ReplayOptions(dead_letter=None, progress=bool(options.get("progress", False)),
                        batch_size=int(batch_size))
    engine = Engine.from_config(config, Metrics(reasons=REASONS))
    collector = ResultCollector(config)
    with torch_threads(config.torch_threads):  # the caller's count back afterwards
        summary = execute(engine, loaded, source, run, Console(stderr=True), collector)
    for note in summary["notes"]:  # e.g. a history shorter than a model's warm-up: say why nothing came out
        warnings.warn(note, UserWarning, stacklevel=2)
    return collector.build(summary, source)


def _items(name: str, value: Any) -> list[Any]:
    if isinstance(value, numbers.Real):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name} must be a list of numbers or a comma-separated string, got {value!r}") from None


def _level(level: Any) -> float:
    """One interval level in percent: a number, or a string of one (``"80"``, as a CSV or a form gives it)."""
    if isinstance(level, bool) or not isinstance(level, numbers.Real | str):
        raise TypeError(f"levels: {level!r} is not a number (levels are percentages, e.g. levels=(80, 95))")
    try:
        return float(level)
    except ValueError:
        raise ValueError(f"levels: {level!r} is not a number (levels are percentages, e.g. levels=(80, 95))") from None


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: not a number") from None


def _names(key: str, value: Any, what: str, kinds: Any, empty: bool = True) -> Any:
    """``value`` as :func:`_listed` reads names; ``TypeError`` naming ``key`` unless it is ``kinds`` of strings
    (and not empty, unless ``empty``)."""
    value = _listed(value, str)
    if (not isinstance(value, kinds) or isinstance(value, str) or not (empty or value)
            or not all(isinstance(item, str) for item in value)):
        raise TypeError(f"{key} must be {what}, got {value!r}")
    return value


def _listed(value: Any, kind: type) -> Any:
    """A comma-separated string (the CLI's spelling) as a list of ``kind``; anything else unchanged."""
    if isinstance(value, str):
        try:
            return [kind(part) for part in split_items(value, ",")]
        except ValueError:
            raise ValueError(f"{value!r}: not a comma-separated list of {kind.__name__} values") from None
    return value
