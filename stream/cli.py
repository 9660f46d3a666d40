"""The ``tidecast`` command line.

    tidecast replay [PATH] ...   replay a CSV/Parquet/JSON-lines history through the engine (no Kafka)
    tidecast serve ...           the Kafka consumer-group service (docs/serve.md)
    tidecast produce PATH ...    replay a history file into a Kafka topic

Run ``tidecast <command> --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from tidecast.monitors.conformal import CALIBRATORS, DEFAULT_CALIBRATOR
from tidecast.stream.config import EngineConfig
from tidecast.stream.sources import BUNDLED_SAMPLE, ReplaySpec


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _param_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_model_params(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["seasonal-naive.period=24"]`` -> ``{"seasonal-naive": {"period": 24}}``."""
    params: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        model, dot, name = key.partition(".")
        if not sep or not dot or not model or not name:
            raise argparse.ArgumentTypeError(f"--model-param wants MODEL.KEY=VALUE, got {item!r}")
        params.setdefault(model, {})[name] = _param_value(value)
    return params


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the engine (replay, serve)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", type=_csv_list, default=None,
                   help="model name(s), comma-separated, compared side by side (default: seasonal-naive); "
                        "known: seasonal-naive, holt-winters, snarimax, cyclenet")
    g.add_argument("--horizon", type=int, default=None, help="forecast steps H (default 24)")
    g.add_argument("--alpha", type=float, default=None, help="target miscoverage (default 0.1 = 90%% intervals)")
    g.add_argument("--calibrator", default=None, choices=sorted(CALIBRATORS),
                   help=f"conformal method (default {DEFAULT_CALIBRATOR})")
    g.add_argument("--model-param", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="model parameter, repeatable, e.g. seasonal-naive.period=24")
    g.add_argument("--freq", default=None, help="grid step, e.g. 1h or 30min (default: inferred per series)")
    g.add_argument("--max-gap", type=int, default=None,
                   help="longest gap (ticks) filled by interpolation; longer gaps reset a series (default H)")
    g.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1)")


def engine_config(args: argparse.Namespace, base: EngineConfig | None = None) -> EngineConfig:
    """An :class:`EngineConfig` from ``base`` with the command-line overrides applied."""
    cfg = (base or EngineConfig()).to_dict()
    overrides = {"models": args.model, "horizon": args.horizon, "alpha": args.alpha,
                 "calibrator": args.calibrator, "freq": args.freq, "max_gap": args.max_gap}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    for model, params in parse_model_params(args.model_param).items():
        cfg["model_params"].setdefault(model, {}).update(params)
    return EngineConfig(**cfg)


def add_input_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The history-file flags shared by ``replay`` and ``produce``; returns the group for extra flags."""
    g = parser.add_argument_group("input")
    g.add_argument("--format", choices=("auto", "wide", "long", "jsonl"), default="auto")
    g.add_argument("--time-column", default=None, help="default: ds, timestamp, date, datetime, time or col 1")
    g.add_argument("--series-column", default="unique_id", help="long format series id column")
    g.add_argument("--value-column", default="y", help="long format value column")
    g.add_argument("--name", default=None, help="wide format series prefix (default: file stem)")
    g.add_argument("--columns", type=_csv_list, default=None, help="wide format channels (default: all)")
    return g


def replay_spec(args: argparse.Namespace) -> ReplaySpec:
    """The :class:`ReplaySpec` the input flags describe."""
    return ReplaySpec(path=args.path, format=args.format, time_column=args.time_column,
                      series_column=args.series_column, value_column=args.value_column, name=args.name,
                      columns=args.columns)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a history file through the engine",
                       description="Replay a CSV/Parquet/JSON-lines history as a stream and score every forecast. "
                                   f"Without PATH: the bundled NAB nyc_taxi sample ({BUNDLED_SAMPLE.name}).")
    p.add_argument("path", nargs="?", type=Path, default=BUNDLED_SAMPLE, help="CSV, Parquet or .jsonl file")
    g = add_input_arguments(p)
    add_engine_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, help="forecast records, .parquet or .csv")
    g.add_argument("--dead-letter", type=Path, default=Path("tidecast-dead-letters.jsonl"),
                   help="rejected rows as JSON lines (created only if there are any)")
    g.add_argument("--summary-json", type=Path, default=None, help="write the summary as JSON")
    g.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    g.add_argument("--linger", type=float, default=0.0, help="keep /metrics up this many seconds after the run")
    g.add_argument("--rate", type=float, default=None, help="throttle to this many observations per second")
    g.add_argument("--batch-size", type=int, default=2000, help="observations per engine batch")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_replay)


def _run_replay(args: argparse.Namespace) -> int:
    from tidecast.stream.replay import ReplayOptions, run_replay  # keeps `tidecast --help` fast

    spec = replay_spec(args)
    options = ReplayOptions(spec=spec, out=args.out, dead_letter=args.dead_letter, summary_json=args.summary_json,
                            metrics_port=args.metrics_port, rate=args.rate, linger_seconds=args.linger,
                            batch_size=args.batch_size, torch_threads=args.torch_threads,
                            progress=not args.no_progress)
    run_replay(engine_config(args), options, make_console())
    return 0


def make_console() -> Console:
    """A console that keeps the summary table readable when output goes to a file or CI log."""
    return Console() if sys.stdout.isatty() else Console(width=130)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from tidecast.stream.serve import SERVE_OPTIONS
    from tidecast.stream.settings import add_options

    p = sub.add_parser("serve", help="run the Kafka consumer-group service",
                       description="Consume observations from Kafka, publish forecasts with intervals, checkpoint "
                                   "per-series state. Every option can also come from the environment (TIDECAST_*) "
                                   "or a TOML file (--config); precedence flag > env > file > default. "
                                   "See docs/serve.md.")
    p.add_argument("--config", type=Path, default=None, help="TOML settings file [env TIDECAST_CONFIG]")
    add_options(p, SERVE_OPTIONS)
    add_engine_arguments(p)
    p.set_defaults(func=_run_serve, torch_threads=None, model_param=None)


def _layered(args: argparse.Namespace, options: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resolved option values and the settings file's content."""
    from tidecast.stream.settings import load_file, model_params_from_file, resolve

    file = load_file(args.config or os.environ.get("TIDECAST_CONFIG"))
    if "model_params" in file:
        file["model_param"] = list(file.get("model_param", [])) + model_params_from_file(file)
    return resolve(args, options, file=file), file


def _run_serve(args: argparse.Namespace) -> int:
    from tidecast.stream.serve import ENGINE_OPTIONS, SERVE_OPTIONS, ServeConfig, run_serve

    values, file = _layered(args, SERVE_OPTIONS + ENGINE_OPTIONS)
    for opt in ENGINE_OPTIONS:  # back onto the namespace, where engine_config() reads them
        setattr(args, opt.name, values.pop(opt.name))
    args.model_param = args.model_param or []
    config = ServeConfig(options=values, engine=engine_config(args), kafka_extra=dict(file.get("kafka", {})),
                         torch_threads=args.torch_threads)
    return run_serve(config)


def _add_produce(sub: argparse._SubParsersAction) -> None:
    from tidecast.stream.settings import add_options

    p = sub.add_parser("produce", help="replay a history file into a Kafka topic",
                       description="Send a CSV/Parquet/JSON-lines history (the formats of `replay`) to Kafka, one "
                                   "observation per message keyed by series_id, in event-time order.")
    p.add_argument("path", type=Path, help="CSV, Parquet or .jsonl file")
    p.add_argument("--config", type=Path, default=None, help="TOML settings file [env TIDECAST_CONFIG]")
    g = add_input_arguments(p)
    g.add_argument("--rows", type=int, default=None, help="send only the file's first N rows")
    g = p.add_argument_group("pace")
    pace = g.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    pace.add_argument("--speed", type=float, default=None, help="replay at X times event time")
    add_options(p, _produce_options())
    p.set_defaults(func=_run_produce)


def _produce_options() -> tuple:
    """``produce``'s own settings plus the Kafka security ones it shares with ``serve``."""
    from tidecast.stream.produce import PRODUCE_OPTIONS
    from tidecast.stream.serve import SERVE_OPTIONS

    return PRODUCE_OPTIONS + tuple(o for o in SERVE_OPTIONS if o.group.startswith("kafka security"))


def _run_produce(args: argparse.Namespace) -> int:
    from tidecast.stream.produce import ProduceOptions, run_produce

    values, file = _layered(args, _produce_options())
    for required in ("bootstrap_servers", "topic"):
        if not values.get(required):
            raise ValueError(f"{required} is required (--{required.replace('_', '-')} or TIDECAST_{required.upper()})")
    spec = replay_spec(args)
    options = ProduceOptions(spec=spec, topic=values["topic"], kafka=values, kafka_extra=dict(file.get("kafka", {})),
                             rate=args.rate, speed=args.speed, rows=args.rows, partitions=values["partitions"],
                             replication_factor=values["replication_factor"])
    summary = run_produce(options)
    Console(stderr=True).print(
        f"sent {summary['sent']:,} observations to {summary['topic']} in {summary['elapsed_seconds']:.1f} s "
        f"({summary['messages_per_second'] or 0:,.0f} msg/s); rows skipped: {summary['skipped_rows']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidecast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_replay(sub)
    _add_serve(sub)
    _add_produce(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
