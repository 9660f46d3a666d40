"""Configuration declared once: frozen dataclasses whose fields are the settings of ``replay``, ``serve`` and
``produce`` (see :mod:`tidecast.stream.settings` for how a field becomes a flag, a ``TIDECAST_*`` variable and a
TOML key).

* :class:`EngineConfig` — what the engine does with every series; shared by ``replay``, ``serve`` and the
  benchmarks.
* :class:`InputSettings` — how ``replay`` and ``produce`` read a history file.
* :class:`KafkaClientSettings` — bootstrap servers and security, shared by ``serve`` and ``produce``.
* :class:`ServeSettings` and :class:`ServeConfig` — everything ``serve`` runs with.

>>> cfg = EngineConfig(models=["sn24=seasonal-naive", "sn48=seasonal-naive"],
...                    model_params={"sn24": {"period": 24}, "sn48": {"period": 48}})
>>> cfg.lanes
[('sn24', 'seasonal-naive'), ('sn48', 'seasonal-naive')]
>>> EngineConfig(models=["seasonal-naive", "seasonal-naive"])
Traceback (most recent call last):
...
tidecast.stream.settings.SettingsError: two lanes are named 'seasonal-naive': give each an alias, e.g. \
--model a=seasonal-naive --model b=seasonal-naive
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import pandas as pd
from pandas.tseries.frequencies import to_offset
from pandas.tseries.offsets import Day, Tick, Week

from tidecast.models.registry import MODELS, check_keywords, check_params, keyword_parameters, parse_lane
from tidecast.monitors.conformal import CALIBRATORS, DEFAULT_CALIBRATOR
from tidecast.monitors.drift import DEFAULT_DETECTOR, DETECTORS
from tidecast.monitors.scoring import level_name
from tidecast.stream.kafka import (
    ASSIGNMENT_STRATEGIES,
    COMPACT_COMPRESSIONS,
    FIXED_CLIENT_KEYS,
    OUTPUT_FORMATS,
    parse_servers,
)
from tidecast.stream.partitioner import DEFAULT_PARTITIONER, PARTITIONERS
from tidecast.stream.records import DEFAULT_MAX_ABS_VALUE, DEFAULT_MAX_BYTES
from tidecast.stream.settings import (
    SettingsError,
    SettingsView,
    at_least,
    check_declared,
    from_values,
    parse_key_values,
    setting,
    settings_of,
    suggest,
)
from tidecast.stream.sources import ReplaySpec

ENGINE, INPUT = "engine", "input"
KAFKA, SECURITY, STATE, SERVICE = "kafka", "kafka security (passed to kafka-python)", "state", "service"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def not_blank(value: str) -> str | None:
    """A check: a name that is not empty (an empty ``TIDECAST_FORECAST_TOPIC=`` named no topic at all)."""
    return "must not be empty" if not str(value).strip() else None


def _names_channels(value: list[str]) -> str | None:
    # an empty list read as "every channel", the opposite of what it says
    return None if value else "names no channel (leave it unset to use every channel)"


def _names_series(value: list[str]) -> str | None:
    # an empty list would dead-letter every series (unknown_series) without a word
    return None if value else "names no series (leave it unset to accept every series)"


def _known_lanes(models: list[str]) -> str | None:
    """A check: each lane parses (its error then names where the value came from: flag, environment or file)."""
    for text in models:
        try:
            parse_lane(text)
        except ValueError as err:
            return str(err)
    return None


#: The smallest miscoverage a setting may ask for (a level of at most 99.9999 %): below ~1e-16 a Gaussian prior's
#: quantile is infinite (conformal PID issued only infinite intervals at alpha 1e-17), and finer levels than this
#: share their names (6 significant digits) with their neighbours.
MIN_ALPHA = 1e-6


def _miscoverage(value: float) -> str | None:
    if not 0 < value < 1:
        return "must be in (0, 1)"
    return None if value >= MIN_ALPHA else f"must be at least {MIN_ALPHA:g} (a level of at most 99.9999 %)"


def _levels(value: list[float]) -> str | None:
    if not value:
        return "give at least one level, e.g. 80,95"
    for level in value:
        if 0 < level < 1:  # a fraction (0.95) for a percentage would silently give a 0.95 % interval
            return f"{level:g} looks like a fraction: levels are in percent, e.g. {100 * level:g} (each in [1, 100))"
        if not 0 < level < 100:
            return f"{level:g} is no coverage level: each must be in (0, 100), in percent"
        if level > 100 * (1 - MIN_ALPHA):
            return f"{level!r} is finer than a calibrator can learn: each level at most 99.9999"
    if len(set(value)) < len(value):
        return "a level is given twice"
    names = [level_name(1 - level / 100) for level in value]
    if len(set(names)) < len(names):  # their columns and labels (lo-80, coverage-80) would overwrite each other
        return f"levels {value} share the names {names}: give levels that differ in their first 6 digits"
    return None


def _known_calibrator(name: str) -> str | None:
    """Built-in calibrators and those of installed plug-ins, found when the setting is read."""
    return None if name in CALIBRATORS else f"not one of {', '.join(sorted(CALIBRATORS))}"


#: Observations held per series to infer its grid step (their most frequent gap; the lower median when none
#: repeats) when freq is not set: missing values or one odd gap among the first few cannot set a wrong grid.
#: Fixed, because held rows are part of saved state.
STEP_WINDOW = 8
#: Longest forecast horizon. Per series and lane the engine keeps the pending forecasts (H(H+1)/2 steps) and the
#: calibrator its ring of issued intervals per horizon: about 10·H² bytes with the default calibrator and one level,
#: 4·H² more per further level (measured with Engine.series_state_bytes: 10.2 MB at H = 1000, 4.1 MB per level).
MAX_HORIZON = 1000
BYTES_PER_HORIZON_SQUARED = 10
BYTES_PER_HORIZON_SQUARED_PER_LEVEL = 4


def _horizon(value: int) -> str | None:
    if value < 1:
        return "must be at least 1"
    if value > MAX_HORIZON:
        per_series = BYTES_PER_HORIZON_SQUARED
        return (f"must be at most {MAX_HORIZON}: every series keeps about {per_series}·H² bytes of pending "
                f"forecasts and calibrator state per model with one level, {BYTES_PER_HORIZON_SQUARED_PER_LEVEL}·H² "
                f"more per further level ({_size(per_series * MAX_HORIZON ** 2)} at H={MAX_HORIZON}, "
                f"{_size(per_series * value ** 2)} at H={value})")
    return None


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" or n_bytes >= 100 else f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.0f} TB"


def port_number(value: int | None) -> str | None:
    """A check: ``None`` or a TCP port (0 picks a free one)."""
    return None if value is None or 0 <= value <= 65_535 else "must be a TCP port, 0 to 65535"


def grid_step(value: str) -> pd.Timedelta:
    """The fixed time step ``value`` names: a duration (``1h``, ``30min``, ``15s``) or a pandas frequency alias of
    a fixed length (``h``, ``D``, ``min``: what ``pd.infer_freq`` returns). ``ValueError`` for anything else,
    calendar frequencies included (a month or a business day has no one length).

    >>> grid_step("30min"), grid_step("h")
    (Timedelta('0 days 00:30:00'), Timedelta('0 days 01:00:00'))
    """
    try:
        offset = to_offset(value)
    except ValueError:
        offset = None
    # a calendar alias first: pandas' Timedelta reads "1MS" (month start) as one millisecond, an old spelling
    if offset is not None and not isinstance(offset, Tick | Day | Week):
        raise ValueError(_calendar(offset.freqstr))
    try:
        step = pd.Timedelta(value)
    except ValueError:
        if offset is None:
            raise ValueError("not a time step (e.g. 1h, 30min, 15s)") from None
        try:
            step = pd.Timedelta(offset)
        except ValueError:
            raise ValueError(_calendar(offset.freqstr)) from None
    return _in_nanoseconds(step)


def _in_nanoseconds(step: pd.Timedelta) -> pd.Timedelta:
    """``step``, if int64 nanoseconds hold it (pandas builds ``200000d`` in seconds, then overflowed later)."""
    try:
        step.value  # noqa: B018 - the conversion is the check
    except OverflowError:
        raise ValueError("longer than a time step can be (int64 nanoseconds: about 292 years)") from None
    return step


def _calendar(name: str) -> str:
    return (f"{name} is a calendar frequency, not a fixed time step: give a duration such as 7D or 1h (calendar "
            "months and business days are not supported)")


def _grid_step(value: str | None) -> str | None:
    if value is None:
        return None
    if str(value).strip().lstrip("+-").replace(".", "", 1).isdigit():  # pandas reads a bare "1800" as nanoseconds
        return "a number without a unit is no time step: say 1800s, 30min, 1h"
    try:
        step = grid_step(value)
    except ValueError as err:
        return str(err)
    if pd.isna(step):  # "" and "nat" parse as NaT
        return "not a time step (e.g. 1h, 30min, 15s; leave it unset to infer the step)"
    return None if step.value > 0 else "must be positive"


def _params_of_kept_lanes(params: dict[str, Any], file_models: list[str], models: list[str]) -> dict[str, Any]:
    """The file's lane parameters once a flag or the environment replaced its lanes: those of the lanes that are
    gone are dropped (README's example file with TIDECAST_MODEL=holt-winters failed on its seasonal-naive table),
    and so are those of an alias now naming another model (``a=seasonal-naive`` -> ``a=holt-winters`` handed the
    new model the old one's parameters); those of the lanes still there, and those naming no lane of the file (a
    typo), stay and are checked."""
    lanes = dict(parse_lane(text) for text in models)
    gone = {alias for alias, name in map(parse_lane, file_models) if lanes.get(alias) != name}
    return {alias: value for alias, value in params.items() if alias not in gone}


@dataclass(frozen=True)
class EngineConfig:
    """What the engine does with every series.

    Lanes: each entry of ``models`` is ``ALIAS=MODEL`` or a bare ``MODEL`` (its own alias); the alias names the lane
    in forecast records, metric labels, ``model_params``, state keys and the state fingerprint. Filled ticks of a
    gap up to ``max_gap`` are learned (models need a contiguous grid) but never scored or forecast from; a longer
    gap resets the series' model history. Series beyond ``max_series``, or outside ``allowed_series`` when it is
    set, are dead-lettered (``unknown_series``).
    """

    horizon: int = setting(24, f"forecast steps H (ticks of the series' own grid), at most {MAX_HORIZON}",
                           group=ENGINE, check=_horizon)
    alpha: float | None = setting(None, "target miscoverage: intervals aim at 1 - alpha coverage; the one-level "
                                  "shorthand of --level", group=ENGINE, shown_default="0.1", check=_miscoverage,
                                  alternative_to="levels")
    levels: list[float] | None = setting(
        None, "interval coverage levels in percent, comma-separated (80,95): one calibrator pass learns them all; "
              "the first is the records' lower/upper", group=ENGINE, name="level", key="levels", repeat=True,
        metavar="LEVEL[,LEVEL]", shown_default="100·(1 - alpha)", check=_levels)
    models: list[str] = setting(["seasonal-naive"], "lanes compared side by side, ALIAS=MODEL or MODEL, "
                                f"comma-separated or repeated; models: {', '.join(MODELS)}, a plug-in's (entry point "
                                "group tidecast.models) or river:MODULE.CLASS (a river forecaster)", group=ENGINE,
                                name="model", repeat=True, metavar="[ALIAS=]MODEL", check=_known_lanes)
    model_params: dict[str, dict[str, Any]] = setting(
        {}, "lane parameter ALIAS.KEY=VALUE (VALUE is JSON), repeated; in the file: [model_params.ALIAS] tables; "
            "in the environment: whitespace-separated items", group=ENGINE, name="model_param", key="model_params",
        repeat=True, sep=None, metavar="ALIAS.KEY=VALUE",
        parse=partial(parse_key_values, what="model parameter", nested=True), parameters_of="models",
        kept=_params_of_kept_lanes)
    calibrator: str = setting(DEFAULT_CALIBRATOR, f"conformal method: {', '.join(sorted(CALIBRATORS))}, or a plug-in's "
                              "(entry point group tidecast.calibrators)", group=ENGINE, check=_known_calibrator)
    calibrator_params: dict[str, Any] = setting(
        {}, "calibrator parameter KEY=VALUE (VALUE is JSON), repeated; in the file: a [calibrator_params] table",
        group=ENGINE, name="calibrator_param", key="calibrator_params", repeat=True, sep=None,
        metavar="KEY=VALUE",
        parse=partial(parse_key_values, what="calibrator parameter", nested=False), parameters_of="calibrator")
    freq: str | None = setting(None, "grid step, a pandas offset such as 1h or 30min", group=ENGINE,
                               shown_default=f"inferred per series: the commonest gap of its first {STEP_WINDOW} "
                               "observations", check=_grid_step)
    max_gap: int | None = setting(None, "longest gap (ticks) filled by linear interpolation; a longer one resets the "
                                  "series", group=ENGINE, shown_default="H", check=at_least(0))
    max_abs_value: float | None = setting(
        DEFAULT_MAX_ABS_VALUE, "values larger in magnitude are dead-lettered (out_of_range); 0 = no limit. The "
        "default is where a double stops holding every unit digit; sentinels such as 1e20 or 1e308 lie above it",
        group=ENGINE, shown_default=f"{DEFAULT_MAX_ABS_VALUE:g}", check=at_least(0))
    max_series: int = setting(100_000, "series limit per process", group=ENGINE, check=at_least(1))
    allowed_series: list[str] | None = setting(None, "accept only these series, comma-separated", group=ENGINE,
                                               shown_default="all", check=_names_series)
    coverage_window: int = setting(1000, "effective window (scored forecasts) of the rolling coverage and width "
                                   "gauges", group=ENGINE, check=at_least(1))
    drift_detector: str = setting(DEFAULT_DETECTOR, "label-based drift detector on each lane's matured residuals, "
                                  "pooled over horizons; none: off", group=ENGINE,
                                  choices=("none", *sorted(DETECTORS)))
    drift_params: dict[str, Any] = setting(
        {}, "drift detector parameter KEY=VALUE (VALUE is JSON), repeated; in the file: a [drift_params] table",
        group=ENGINE, name="drift_param", key="drift_params", repeat=True, sep=None, metavar="KEY=VALUE",
        parse=partial(parse_key_values, what="drift detector parameter", nested=False),
        parameters_of="drift_detector")
    bootstrap_params: dict[str, Any] = setting(
        {}, "bootstrap watcher parameter KEY=VALUE (VALUE is JSON), repeated: slack, threshold, warmup, memory, "
            "scale_memory; it runs on each lane whose model has bootstrap > 0 (--model-param ALIAS.bootstrap=8); "
            "in the file: a [bootstrap_params] table", group=ENGINE, name="bootstrap_param",
        key="bootstrap_params", repeat=True, sep=None, metavar="KEY=VALUE",
        parse=partial(parse_key_values, what="bootstrap watcher parameter", nested=False))
    drift_window: int = setting(168, "a series counts as drifting (tidecast_series_drifting) for this many steps of "
                                "its own grid after a drift alarm", group=ENGINE, check=at_least(1))
    retrain: str = setting("off", "retrain each lane's model under drift: alarms start a refit, a shadow gate "
                           "promotes or rejects it (on); off: never", group=ENGINE, choices=("off", "on"))
    retrain_params: dict[str, Any] = setting(
        {}, "retrain policy parameter KEY=VALUE (VALUE is JSON; RetrainPolicy's and mode, history, epochs, "
            "lambdas), repeated; in the file: a [retrain_params] table", group=ENGINE, name="retrain_param",
        key="retrain_params", repeat=True, sep=None, metavar="KEY=VALUE",
        parse=partial(parse_key_values, what="retrain parameter", nested=False))
    maintenance_budget_seconds: float = setting(0.05, "time given to deferred model work (fitting) between batches",
                                                group=ENGINE, check=at_least(0))
    torch_threads: int = setting(1, "torch intra-op threads", group=ENGINE, check=at_least(1, 1024))

    def __post_init__(self) -> None:
        check_declared(self)
        self._settle_levels()
        if not self.models:
            raise SettingsError("at least one model is required")
        lanes = [_lane(text) for text in self.models]
        aliases = [alias for alias, _ in lanes]
        for alias in aliases:
            if aliases.count(alias) > 1:
                name = dict(lanes)[alias]
                raise SettingsError(f"two lanes are named {alias!r}: give each an alias, e.g. --model a={name} "
                                    f"--model b={name}")
        # One spelling per lane, so that `x` and `x=x` give the same state fingerprint.
        object.__setattr__(self, "models", [alias if alias == name else f"{alias}={name}" for alias, name in lanes])
        object.__setattr__(self, "model_params", self._checked_model_params(dict(lanes)))
        accepted = keyword_parameters(CALIBRATORS[self.calibrator], exclude=("horizon", "alpha"))
        try:
            params = check_keywords(accepted, dict(self.calibrator_params), "calibrator parameter ", self.calibrator)
        except ValueError as err:
            raise SettingsError(f"{err} (from --calibrator-param or [calibrator_params])") from None
        object.__setattr__(self, "calibrator_params", params)
        object.__setattr__(self, "drift_params", self._checked_drift_params())
        object.__setattr__(self, "bootstrap_params", self._checked_bootstrap_params())
        from tidecast.stream.retrain import retrain_settings

        try:  # checked even while --retrain is off, so a file that turns it on later holds no surprise
            retrain_settings(self.retrain_params)
        except (TypeError, ValueError) as err:
            raise SettingsError(f"{err} (from --retrain-param or [retrain_params])") from None
        self._check_values()

    def _check_values(self) -> None:
        """Build the engine's parts once and drop them, so that a value a part refuses (a negative learning rate,
        a lookback of 0) fails here, before any data is read or a Kafka connection made (``serve`` builds its
        engine only once it has joined the group), with the settings it came from named. About 10 ms once the
        model libraries are imported. What that engine tells of the configuration is kept (not a setting, not in
        the fingerprint): :attr:`series_state_bytes`."""
        from tidecast.stream.engine import Engine

        try:
            engine = Engine.from_config(self)
        except ValueError as err:
            raise SettingsError(str(err)) from None
        object.__setattr__(self, "_series_state_bytes", engine.series_state_bytes())

    @property
    def series_state_bytes(self) -> int:
        """Bytes of one series' exported state under this configuration (:meth:`Engine.series_state_bytes`)."""
        return self._series_state_bytes  # type: ignore[attr-defined]  # set by _check_values

    def _settle_levels(self) -> None:
        """``alpha`` is the first level's: from ``levels`` when given (a contradicting ``alpha`` is an error)."""
        if self.levels is None:
            object.__setattr__(self, "alpha", 0.1 if self.alpha is None else float(self.alpha))
            return
        levels = [float(level) for level in self.levels]
        first = (100.0 - levels[0]) / 100.0
        if self.alpha is not None and abs(self.alpha - first) > 1e-12:  # both from one source (see resolve)
            raise SettingsError(f"alpha {self.alpha:g} contradicts level {','.join(f'{v:g}' for v in levels)}: alpha "
                                f"{self.alpha:g} is the one-level shorthand of level {100 * (1 - self.alpha):g}; give "
                                "one (--alpha / --level, TIDECAST_ALPHA / TIDECAST_LEVEL, alpha / levels in the file)")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "alpha", first)

    @property
    def alphas(self) -> tuple[float, ...]:
        """Miscoverage of every interval level, the first being ``alpha``."""
        if self.levels is None:
            return (float(self.alpha),)  # type: ignore[arg-type]  # settled in __post_init__
        return tuple((100.0 - level) / 100.0 for level in self.levels)

    @property
    def level_names(self) -> list[str]:
        """Every level as text, coverage in percent: ``["80", "95"]``."""
        return [level_name(alpha) for alpha in self.alphas]

    def _checked_model_params(self, lanes: dict[str, str]) -> dict[str, dict[str, Any]]:
        checked = {}
        for alias, params in self.model_params.items():
            if alias not in lanes:
                known = ", ".join(f"{a} ({name})" if a != name else a for a, name in lanes.items())
                raise SettingsError(f"model parameters for {alias!r}, which is no lane; the lanes are: {known} "
                                    "(--model-param, TIDECAST_MODEL_PARAM and [model_params.ALIAS] name a lane by its "
                                    "alias)")
            try:
                checked[alias] = check_params(lanes[alias], dict(params), alias)
            except ValueError as err:
                where = f"--model-param, TIDECAST_MODEL_PARAM or [model_params.{alias}]"  # merged key by key
                raise SettingsError(f"{err} (from {where})") from None
        return checked

    def _checked_drift_params(self) -> dict[str, Any]:
        if self.drift_detector == "none":
            if self.drift_params:
                given = ", ".join(sorted(self.drift_params))
                raise SettingsError(f"drift detector parameters given ({given}), but the drift detector is none: "
                                    "drop them (--drift-param, TIDECAST_DRIFT_PARAM, [drift_params]) or name a "
                                    "detector (--drift-detector, TIDECAST_DRIFT_DETECTOR, "
                                    "drift_detector)")
            return {}
        accepted = keyword_parameters(DETECTORS[self.drift_detector])
        try:
            return check_keywords(accepted, dict(self.drift_params), "drift detector parameter ", self.drift_detector)
        except ValueError as err:
            raise SettingsError(f"{err} (from --drift-param or [drift_params])") from None

    def _checked_bootstrap_params(self) -> dict[str, Any]:
        from tidecast.monitors.bootstrap import BootstrapMonitor

        accepted = keyword_parameters(BootstrapMonitor, exclude=("model", "horizon"))
        try:
            params = check_keywords(accepted, dict(self.bootstrap_params), "bootstrap watcher parameter ", "bootstrap")
            # the values too, even with no lane running replicas (as retrain's while --retrain is off)
            BootstrapMonitor(None, self.horizon, **params)  # type: ignore[arg-type]  # the model is only stored
        except (TypeError, ValueError) as err:
            raise SettingsError(f"{err} (from --bootstrap-param or [bootstrap_params])") from None
        return params

    @property
    def lanes(self) -> list[tuple[str, str]]:
        """``(alias, model name)`` of each lane, in order."""
        return [parse_lane(text) for text in self.models]

    @property
    def step_ns(self) -> int | None:
        if self.freq is None:
            return None
        return int(grid_step(self.freq).value)

    @property
    def gap_limit(self) -> int:
        return self.horizon if self.max_gap is None else self.max_gap

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lane(text: str) -> tuple[str, str]:
    try:
        return parse_lane(text)
    except ValueError as err:
        raise SettingsError(f"--model: {err}") from None


_SPEC = ReplaySpec()  # the library's defaults; the settings below only expose them


@dataclass(frozen=True)
class InputSettings:
    """How ``replay`` and ``produce`` read a history file (CSV, Parquet or JSON lines)."""

    path: Path | None = setting(None, "CSV, Parquet or .jsonl file", group=INPUT,
                                positional=True, shown_default="replay: the bundled NYC-taxi sample; produce: required")
    format: str = setting(_SPEC.format, "file layout", group=INPUT, choices=("auto", "wide", "long", "jsonl"))
    time_column: str | None = setting(_SPEC.time_column, "time column", group=INPUT,
                                      shown_default="ds, timestamp, date, datetime, time or the first column")
    series_column: str = setting(_SPEC.series_column, "long format: series id column", group=INPUT)
    value_column: str = setting(_SPEC.value_column, "long format: value column", group=INPUT)
    name: str | None = setting(_SPEC.name, "wide format: series id prefix", group=INPUT, shown_default="file stem",
                               check=not_blank)
    columns: list[str] | None = setting(_SPEC.columns, "wide format: channels to use, comma-separated", group=INPUT,
                                        shown_default="all", check=_names_channels)

    def __post_init__(self) -> None:
        check_declared(self)

    def spec(self, default_path: Path | None = None) -> ReplaySpec:
        """The :class:`ReplaySpec` these settings describe; ``default_path`` when no path was given."""
        path = self.path if self.path is not None else default_path
        if path is None:
            raise SettingsError("PATH is required (the history file to read)")
        return ReplaySpec(path=path, format=self.format, time_column=self.time_column,
                          series_column=self.series_column, value_column=self.value_column, name=self.name,
                          columns=self.columns)


def _names_servers(value: str) -> str | None:
    return None if parse_servers(value) else "names no server (host:port, comma-separated)"


def readable_file(value: str) -> str | None:
    """A check: a file that exists (a missing CA bundle read as "the cluster is unreachable" for the whole
    outage budget: kafka-python's own error is logged below the level serve shows while connecting)."""
    return None if Path(value).is_file() else "no such file"


@dataclass(frozen=True)
class KafkaClientSettings:
    """Where the Kafka cluster is and how to authenticate; every kafka-python client gets these."""

    bootstrap_servers: str | None = setting(None, "Kafka bootstrap servers, comma-separated (required)", group=KAFKA,
                                            required=True, check=_names_servers)
    security_protocol: str | None = setting(None, "security protocol", group=SECURITY,
                                            choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"))
    sasl_mechanism: str | None = setting(None, "SASL mechanism", group=SECURITY,
                                         choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"))
    sasl_plain_username: str | None = setting(None, "SASL username", group=SECURITY)
    sasl_plain_password: str | None = setting(None, "SASL password (prefer the environment or the file)",
                                              group=SECURITY, secret=True)
    sasl_kerberos_service_name: str | None = setting(None, "Kerberos service name", group=SECURITY)
    sasl_kerberos_domain_name: str | None = setting(None, "Kerberos domain name", group=SECURITY)
    ssl_cafile: str | None = setting(None, "CA bundle", group=SECURITY, check=readable_file)
    ssl_certfile: str | None = setting(None, "client certificate", group=SECURITY, check=readable_file)
    ssl_keyfile: str | None = setting(None, "client key", group=SECURITY, check=readable_file)
    ssl_password: str | None = setting(None, "client key password", group=SECURITY, secret=True)
    ssl_crlfile: str | None = setting(None, "certificate revocation list", group=SECURITY, check=readable_file)
    ssl_ciphers: str | None = setting(None, "allowed ciphers", group=SECURITY)
    ssl_check_hostname: bool | None = setting(None, "verify the broker's hostname", group=SECURITY)

    @property
    def options(self) -> SettingsView:
        """The settings as a read-only mapping (what :func:`tidecast.stream.kafka.client_settings` reads)."""
        return SettingsView(self)

    def check_security(self) -> None:
        """TLS files or SASL settings under a protocol that uses none: kafka-python's default is PLAINTEXT, which
        ignores them without a word (a client meant for mTLS connected in plain text, or not at all)."""
        protocol = self.security_protocol or "PLAINTEXT"
        ssl = [s.key for s in settings_of(KafkaClientSettings) if s.key.startswith("ssl_")
               and getattr(self, s.key) is not None]
        sasl = [s.key for s in settings_of(KafkaClientSettings) if s.key.startswith("sasl_")
                and getattr(self, s.key) is not None]
        for given, needs in ((ssl, ("SSL", "SASL_SSL")), (sasl, ("SASL_PLAINTEXT", "SASL_SSL"))):
            if given and protocol not in needs:  # named by key: the values may come from a flag, env or file
                raise SettingsError(f"{', '.join(given)} set, but the security protocol is {protocol}, which uses "
                                    f"none of them: set security_protocol (--security-protocol) to "
                                    f"{' or '.join(needs)}")


@cache
def kafka_client_keys() -> frozenset[str]:
    """Keys the ``[kafka]`` table may hold: the settings of kafka-python's consumer, producer and admin client."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    return frozenset(KafkaConsumer.DEFAULT_CONFIG) | set(KafkaProducer.DEFAULT_CONFIG) | set(
        KafkaAdminClient.DEFAULT_CONFIG)


def check_kafka_table(table: Mapping[str, Any], where: str = "[kafka]") -> dict[str, Any]:
    """The ``[kafka]`` table, refused if a key is no kafka-python client setting, is one of tidecast's own settings
    (set there, a flag or the environment could not override it: flag > environment > file must hold) or one that
    tidecast fixes on its clients (:data:`~tidecast.stream.kafka.FIXED_CLIENT_KEYS`)."""
    from tidecast.stream.produce import ProduceOptions  # produce imports this module

    known: Collection[str] = kafka_client_keys()
    own = {s.key: s for cls in (ServeSettings, ProduceOptions) for s in settings_of(cls)}
    for key in table:
        if key not in known:
            raise SettingsError(f"unknown key {key!r} in {where} (kafka-python client settings){suggest(key, known)}")
        if key in FIXED_CLIENT_KEYS:  # first: batch_size here is the producers' bytes, not tidecast's batch_size
            also = (f" (tidecast's own {key}, {own[key].meta.help}, is set as {key} at the top of the file, "
                    f"{own[key].flag} or {own[key].env})" if key in own else "")
            raise SettingsError(f"{key!r} in {where}: tidecast sets it on its clients itself: "
                                f"{FIXED_CLIENT_KEYS[key]}{also}")
        if key in own:
            s = own[key]
            raise SettingsError(f"{key!r} in {where} is a tidecast setting: set it as {s.key} at the top of the "
                                f"file, {s.flag} or {s.env}")
    return dict(table)


@dataclass(frozen=True)
class ServeSettings(KafkaClientSettings):
    """``serve``'s own settings: topics, consumer group, state and the service around the engine."""

    topic: str | None = setting(None, "input topic: JSON observations keyed by series_id (required)", group=KAFKA,
                                required=True)
    group_id: str = setting("tidecast", "consumer group; members share the topic's partitions", group=KAFKA,
                            check=not_blank)
    forecast_topic: str | None = setting(None, "output topic for forecasts", group=KAFKA,
                                         shown_default="<topic>-forecasts", check=not_blank)
    output_format: str = setting("json", "forecast messages: json (one per series and origin, keyed by series id) or "
                                 "compact (one Arrow message per partition and engine batch, many series' forecasts "
                                 "in columns: far fewer messages; read them with tidecast.stream.kafka.read_forecasts)",
                                 group=KAFKA, choices=OUTPUT_FORMATS)
    compact_compression: str = setting("lz4", "Arrow IPC body compression of compact forecast messages (any Arrow "
                                       "reader undoes it): lz4 (a third fewer bytes; the producer and the broker "
                                       "spend less), zstd (smaller, slower) or none", group=KAFKA,
                                       choices=COMPACT_COMPRESSIONS)
    output_processes: int | None = setting(None, "child processes that encode and send the forecasts "
                                           "(tidecast.stream.output_process), each with a producer of its own; 0: "
                                           "the worker sends them. In the json format one process is held to the "
                                           "client's per-message cost (README, serve at scale)", group=KAFKA,
                                           shown_default="2 with --output-format json, 0 with compact",
                                           check=at_least(0))
    fetch_process: bool = setting(False, "fetch and decode the input in a child process "
                                  "(tidecast.stream.fetch_process); the group consumer keeps the membership and "
                                  "commits. Takes the record parsing off the engine's interpreter: worth it with "
                                  "two cores or more (README, serve at scale)", group=KAFKA)
    events_topic: str | None = setting(None, "output topic for drift events (alarms of the lanes' drift monitors)",
                                       group=KAFKA, shown_default="<topic>-events", check=not_blank)
    dead_letter_topic: str | None = setting(None, "topic for rejected records", group=KAFKA,
                                            shown_default="<topic>-dead-letters", check=not_blank)
    changelog_topic: str | None = setting(None, "state changelog, co-partitioned with the input", group=KAFKA,
                                          shown_default="<group_id>-<topic>-changelog", check=not_blank)
    client_id: str = setting("tidecast", "Kafka client id", group=KAFKA)
    auto_offset_reset: str = setting("earliest", "where a partition without state or commit starts", group=KAFKA,
                                     choices=("earliest", "latest"))
    assignment_strategy: str = setting("range", "partition assignment strategy", group=KAFKA,
                                       choices=tuple(ASSIGNMENT_STRATEGIES))
    session_timeout_ms: int = setting(45_000, "group session timeout", group=KAFKA, check=at_least(1))
    heartbeat_interval_ms: int = setting(3_000, "group heartbeat interval", group=KAFKA, check=at_least(1))
    max_poll_interval_ms: int = setting(300_000, "longest gap between polls before the member is removed",
                                        group=KAFKA, check=at_least(1))
    max_poll_records: int = setting(500, "records per poll", group=KAFKA, check=at_least(1))
    max_partition_fetch_bytes: int = setting(1_048_576, "fetch size per partition", group=KAFKA, check=at_least(1))
    fetch_max_bytes: int = setting(52_428_800, "fetch size per request", group=KAFKA, check=at_least(1))
    fetch_max_wait_ms: int = setting(20, "how long the broker may hold a fetch for more data; kafka-python's 500 ms "
                                     "default put a forecast ~170 ms behind its observation at half load",
                                     group=KAFKA, check=at_least(0))
    max_request_size: int = setting(16 * 1024 * 1024, "largest message the producer sends (state records can be "
                                    "large; the changelog topic is created to accept them)", group=KAFKA,
                                    check=at_least(1))
    partitioner: str = setting(DEFAULT_PARTITIONER, "how the producers map a series id key to its input partition: "
                               "murmur2 (Java, kafka-python), crc32 (librdkafka: confluent-kafka, kcat), fnv1a (Go's "
                               "Sarama); records on another partition are dead-lettered (wrong_partition)",
                               group=KAFKA, choices=tuple(PARTITIONERS))
    broker_outage_budget: float = setting(300.0, "seconds an unreachable Kafka cluster is waited out (at start and "
                                          "during an outage) before serve exits 1", group=KAFKA, check=at_least(0))
    create_topics: bool = setting(True, "create missing output, dead-letter and changelog topics", group=KAFKA)
    replication_factor: int = setting(1, "replication factor of topics tidecast creates", group=KAFKA,
                                      check=at_least(1))
    state_dir: Path = setting(Path("tidecast-state"), "local checkpoint directory", group=STATE)
    checkpoint_records: int = setting(10_000, "checkpoint after this many records", group=STATE, check=at_least(1))
    checkpoint_interval: float = setting(10.0, "... or after this many seconds", group=STATE, check=at_least(0))
    changelog_bytes_per_record: float = setting(
        100.0, "changelog budget: a checkpoint writes every series of its partitions, so the next one waits until "
        "the records since then reach the last one's bytes divided by this, or 30 checkpoint intervals pass (0: no "
        "budget). A restore reads one checkpoint's worth of changelog and re-reads the input records since",
        group=STATE, check=at_least(0))
    metrics_port: int | None = setting(None, "serve Prometheus /metrics, /healthz and /readyz on this port",
                                       group=SERVICE, check=port_number)
    metrics_address: str = setting("0.0.0.0", "address of the /metrics server", group=SERVICE)
    liveness_timeout: float = setting(60.0, "/healthz fails once the worker or poll loop has not gone round for "
                                      "this many seconds", group=SERVICE, check=at_least(0))
    max_queued_records: int = setting(20_000, "pause fetching above this many queued records (resume below half)",
                                      group=SERVICE, check=at_least(1))
    batch_size: int = setting(2_000, "largest engine batch, in records", group=SERVICE, check=at_least(1))
    max_record_bytes: int = setting(DEFAULT_MAX_BYTES, "larger input values are dead-lettered (oversized)",
                                    group=SERVICE, check=at_least(1))
    dead_letter_max_bytes: int = setting(1_000_000, "raw values longer than this are cut in the dead-letter topic "
                                         "(original size in a header); 0 = never cut", group=SERVICE,
                                         check=at_least(0))
    shutdown_timeout: float = setting(8.0, "seconds a graceful stop may take before giving up", group=SERVICE,
                                      check=at_least(0))
    lag_interval: float = setting(1.0, "seconds between lag refreshes of paused partitions", group=SERVICE,
                                  check=at_least(0))
    log_level: str = setting("INFO", "logging level", group=SERVICE, choices=LOG_LEVELS,
                             parse=lambda value: str(value).strip().upper())

    def __post_init__(self) -> None:
        check_declared(self)
        self.check_security()
        derived = {"forecast_topic": f"{self.topic}-forecasts", "events_topic": f"{self.topic}-events",
                   "dead_letter_topic": f"{self.topic}-dead-letters",
                   "changelog_topic": f"{self.group_id}-{self.topic}-changelog"}
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        self._check_topics_differ()

    def _check_topics_differ(self) -> None:
        """Each topic one role: a forecast topic that is the input would feed serve its own forecasts (each one a
        dead letter), a changelog that is the dead-letter topic would restore from rejected records."""
        roles = {"topic": self.topic, "forecast_topic": self.forecast_topic, "events_topic": self.events_topic,
                 "dead_letter_topic": self.dead_letter_topic, "changelog_topic": self.changelog_topic}
        seen: dict[str, str] = {}
        for role, name in roles.items():
            if name in seen:
                other = "input topic (--topic)" if seen[name] == "topic" else seen[name]
                raise SettingsError(f"{role} {name!r} is also the {other}: every topic serve reads or writes must be "
                                    "its own (leave the output topics unset for their derived names)")
            seen[name] = role


#: How long a group-less consumer (changelog restore, lag probe) lets the broker hold a fetch, in ms.
READER_FETCH_WAIT_MS = 100

#: room for a state record's header (JSON meta, array names and shapes) beside the series' arrays
STATE_RECORD_SLACK = 64 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``serve`` runs with: its settings, the engine configuration and the ``[kafka]`` table.

    Every setting reads as an attribute (``cfg.topic``, ``cfg.group_id``); ``settings`` may be given as a mapping
    of setting names to values, which is checked like a settings file.
    """

    settings: ServeSettings
    engine: EngineConfig = field(default_factory=EngineConfig)
    kafka_extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.settings, ServeSettings):
            object.__setattr__(self, "settings", from_values(ServeSettings, self.settings, "ServeConfig"))
        object.__setattr__(self, "kafka_extra", check_kafka_table(self.kafka_extra))
        self._check_client_values()
        self._check_state_fits()

    def _check_client_values(self) -> None:
        """What kafka-python checks only when a client is built, after connecting: here, it would stop serve with a
        traceback instead of one line naming the setting. Types of ``[kafka]`` values (``request_timeout_ms =
        "60000"`` failed in a comparison), the order of the timeouts, and ``group_instance_id``, which tidecast's
        group-less consumers (changelog restore, lag probe) cannot take."""
        from kafka import KafkaConsumer, KafkaProducer

        defaults = {**KafkaProducer.DEFAULT_CONFIG, **KafkaConsumer.DEFAULT_CONFIG}
        for key, value in self.kafka_extra.items():
            kind = type(defaults.get(key))
            if kind in (bool, int, str) and type(value) is not kind:
                raise SettingsError(f"{key} = {value!r} in the [kafka] table: kafka-python wants {kind.__name__}")
        if "group_instance_id" in self.kafka_extra:
            raise SettingsError("group_instance_id in the [kafka] table: static group membership is not supported "
                                "(tidecast's group-less consumers take the same client settings and refuse it)")
        s, extra = self.settings, self.kafka_extra
        request = extra.get("request_timeout_ms", KafkaConsumer.DEFAULT_CONFIG["request_timeout_ms"])
        idle = extra.get("connections_max_idle_ms", KafkaConsumer.DEFAULT_CONFIG["connections_max_idle_ms"])
        wait = max(s.fetch_max_wait_ms, READER_FETCH_WAIT_MS)
        if not wait < request < idle:
            raise SettingsError(f"--fetch-max-wait-ms ({s.fetch_max_wait_ms}; the group-less readers wait "
                                f"{READER_FETCH_WAIT_MS}) must be below the Kafka clients' request_timeout_ms "
                                f"({request}), and that below connections_max_idle_ms ({idle}): lower the first or "
                                "raise the others in the [kafka] table")
        if s.heartbeat_interval_ms >= s.session_timeout_ms:
            raise SettingsError(f"--heartbeat-interval-ms ({s.heartbeat_interval_ms}) must be below "
                                f"--session-timeout-ms ({s.session_timeout_ms})")

    def _check_state_fits(self) -> None:
        """A series' state is one changelog record at least (blocks never split a series): one larger than
        ``max_request_size`` failed the first checkpoint, and serve exited at every restart (H = 1000 with two
        lanes or three levels: ~20 MB a series)."""
        need = self.engine.series_state_bytes
        if need + STATE_RECORD_SLACK > self.settings.max_request_size:
            wanted = need + STATE_RECORD_SLACK
            raise SettingsError(
                f"one series' state takes {need:,} bytes (horizon {self.engine.horizon}, {len(self.engine.models)} "
                f"lane(s), {len(self.engine.alphas)} level(s): pending forecasts and calibrators grow as H^2), more "
                f"than a changelog record may (--max-request-size {self.settings.max_request_size:,}): raise "
                f"--max-request-size to at least {wanted:,} (and the brokers' message.max.bytes; the changelog topic "
                f"is created with it), or lower --horizon")

    @property
    def options(self) -> SettingsView:
        """The serve settings as a read-only mapping (for :func:`tidecast.stream.kafka.client_settings`)."""
        return self.settings.options

    @property
    def torch_threads(self) -> int:
        return self.engine.torch_threads

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "settings":
            raise AttributeError(name)
        return getattr(self.settings, name)
