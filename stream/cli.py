"""The ``tidecast`` command line.

    tidecast replay [PATH] ...   replay a CSV/Parquet/JSON-lines history through the engine (no Kafka)

Run ``tidecast <command> --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from monitors.conformal import CALIBRATORS, DEFAULT_CALIBRATOR
from stream.config import EngineConfig
from stream.sources import BUNDLED_SAMPLE, ReplaySpec


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


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a history file through the engine",
                       description="Replay a CSV/Parquet/JSON-lines history as a stream and score every forecast. "
                                   f"Without PATH: the bundled NAB nyc_taxi sample ({BUNDLED_SAMPLE.name}).")
    p.add_argument("path", nargs="?", type=Path, default=BUNDLED_SAMPLE, help="CSV, Parquet or .jsonl file")
    g = p.add_argument_group("input")
    g.add_argument("--format", choices=("auto", "wide", "long", "jsonl"), default="auto")
    g.add_argument("--time-column", default=None, help="default: ds, timestamp, date, datetime, time or col 1")
    g.add_argument("--series-column", default="unique_id", help="long format series id column")
    g.add_argument("--value-column", default="y", help="long format value column")
    g.add_argument("--name", default=None, help="wide format series prefix (default: file stem)")
    g.add_argument("--columns", type=_csv_list, default=None, help="wide format channels (default: all)")
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
    from stream.replay import ReplayOptions, run_replay  # keeps `tidecast --help` fast

    spec = ReplaySpec(path=args.path, format=args.format, time_column=args.time_column,
                      series_column=args.series_column, value_column=args.value_column, name=args.name,
                      columns=args.columns)
    options = ReplayOptions(spec=spec, out=args.out, dead_letter=args.dead_letter, summary_json=args.summary_json,
                            metrics_port=args.metrics_port, rate=args.rate, linger_seconds=args.linger,
                            batch_size=args.batch_size, torch_threads=args.torch_threads,
                            progress=not args.no_progress)
    run_replay(engine_config(args), options, make_console())
    return 0


def make_console() -> Console:
    """A console that keeps the summary table readable when output goes to a file or CI log."""
    return Console() if sys.stdout.isatty() else Console(width=130)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidecast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_replay(sub)
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
