"""The ``tidecast`` command line.

    tidecast replay [PATH] ...   replay a CSV/Parquet/JSON-lines history through the engine (no Kafka)
    tidecast serve ...           the Kafka consumer-group service (docs/serve.md)
    tidecast produce PATH ...    replay a history file into a Kafka topic

Every option of every command is also an environment variable (``--group-id`` -> ``TIDECAST_GROUP_ID``) and a key
of the TOML file given by ``--config`` (``group_id = "..."``); precedence flag > environment > file > default.
One file can serve all three commands: each reads the keys it knows, and a key no command knows is an error.
Run ``tidecast <command> --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape

import tidecast
from tidecast.stream.config import (
    SECURITY,
    EngineConfig,
    InputSettings,
    ServeConfig,
    ServeSettings,
    check_kafka_table,
)
from tidecast.stream.produce import ProduceOptions
from tidecast.stream.replay import ReplayOptions
from tidecast.stream.settings import (
    CONFIG_ENV,
    SettingsFile,
    add_arguments,
    env_names_of,
    keys_of,
    load_file,
    reference_table,
    resolve,
    warn_unknown_env,
)
from tidecast.stream.sources import BUNDLED_SAMPLE

#: The settings classes whose fields are each command's options (flags, environment, file keys).
COMMANDS: dict[str, tuple[type, ...]] = {
    "replay": (InputSettings, EngineConfig, ReplayOptions),
    "serve": (ServeSettings, EngineConfig),
    "produce": (InputSettings, ProduceOptions),
}
ALL_SETTINGS = tuple(dict.fromkeys(cls for classes in COMMANDS.values() for cls in classes))


def _add_command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
                 **texts: str) -> None:
    # no abbreviations: "--events" (replay's file) silently set serve's --events-topic, "--max-s" --max-series
    p = sub.add_parser(name, allow_abbrev=False, **texts)
    p.add_argument("--config", default=None, help=f"TOML settings file [env {CONFIG_ENV}]")  # "" is refused
    add_arguments(p, COMMANDS[name])
    p.set_defaults(func=func)


def _layered(args: argparse.Namespace) -> tuple[Mapping[str, str], SettingsFile]:
    """The environment and the settings file (checked: unknown keys are errors, unknown variables warnings; the
    [kafka] table too, by every command, since one file serves them all)."""
    env = os.environ
    warn_unknown_env(env, env_names_of(ALL_SETTINGS))
    file = load_file(args.config if args.config is not None else env.get(CONFIG_ENV), keys_of(ALL_SETTINGS))
    check_kafka_table(file.kafka, f"the [kafka] table of {file.path}")
    return env, file


def _run_replay(args: argparse.Namespace) -> int:
    from tidecast.stream.replay import run_replay

    with _stops_as_interrupts():
        try:
            env, file = _layered(args)
            spec = resolve(InputSettings, args, env, file).spec(default_path=BUNDLED_SAMPLE)
            engine = resolve(EngineConfig, args, env, file)
            options = resolve(ReplayOptions, args, env, file, spec=spec)
            run_replay(engine, options, make_console(), settings_file=file.path)
        except KeyboardInterrupt:
            Console(stderr=True, soft_wrap=True).print("[bold red]interrupted:[/] the outputs are closed and hold "
                                                       "what was written until then; no summary")
            return 130
    return 0


@contextlib.contextmanager
def _stops_as_interrupts() -> Iterator[None]:
    """SIGTERM (timeout, docker stop, a deleted Job) and SIGHUP (the terminal closed) unwind like Ctrl-C, through
    the finally blocks that close every output (a Parquet file cut off before its footer could not be read at
    all; a producer's messages not yet sent were lost). From the command's start (Ctrl-C while the settings were
    checked printed a traceback), only for this command, and only where Python lets a handler be set (the main
    thread); the caller's handlers come back afterwards. A SIGHUP ignored (nohup) stays ignored."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, _interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def make_console() -> Console:
    """A console that keeps the summary table readable when output goes to a file or CI log."""
    return Console() if sys.stdout.isatty() else Console(width=130)


def _run_serve(args: argparse.Namespace) -> int:
    from tidecast.stream import serve

    env, file = _layered(args)
    config = ServeConfig(resolve(ServeSettings, args, env, file), resolve(EngineConfig, args, env, file),
                         kafka_extra=file.kafka)
    return serve.run_serve(config)


def _run_produce(args: argparse.Namespace) -> int:
    from tidecast.stream.produce import run_produce

    with _stops_as_interrupts():  # SIGTERM lost the messages handed to the producer but not yet sent
        try:
            env, file = _layered(args)
            spec = resolve(InputSettings, args, env, file).spec()
            options = resolve(ProduceOptions, args, env, file, spec=spec, kafka_extra=file.kafka)
            summary = run_produce(options)
        except KeyboardInterrupt:
            Console(stderr=True, soft_wrap=True).print("[bold red]interrupted:[/] before any message was sent")
            return 130
    lost = max(summary["handed"] - summary["sent"], 0)
    Console(stderr=True, soft_wrap=True).print(
        f"{'interrupted: ' if summary['interrupted'] else ''}sent {summary['sent']:,} observations to "
        f"{summary['topic']} in {summary['elapsed_seconds']:.1f} s ({summary['messages_per_second'] or 0:,.0f} "
        f"msg/s){f' ({lost:,} more handed over, not acknowledged: may be lost)' if lost else ''}; skipped (bad "
        f"rows, or cells of a wide file): {summary['skipped_rows']}")
    return 130 if summary["interrupted"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidecast", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {tidecast.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_command(sub, "replay", _run_replay, help="replay a history file through the engine",
                 description="Replay a CSV/Parquet/JSON-lines history as a stream and score every forecast. "
                             f"Without PATH: the bundled NAB nyc_taxi sample ({BUNDLED_SAMPLE.name}).")
    _add_command(sub, "serve", _run_serve, help="run the Kafka consumer-group service",
                 description="Consume observations from Kafka, publish forecasts with intervals, checkpoint "
                             "per-series state. Every option can also come from the environment (TIDECAST_*) or a "
                             "TOML file (--config); precedence flag > env > file > default. See docs/serve.md.")
    _add_command(sub, "produce", _run_produce, help="replay a history file into a Kafka topic",
                 description="Send a CSV/Parquet/JSON-lines history (the formats of `replay`) to Kafka, one "
                             "observation per message keyed by series_id, in event-time order.")
    return parser


def reference() -> str:
    """The configuration reference of README.md (between its ``settings-reference`` markers), from the fields."""
    parts = [
        ("`replay`, `serve`", (EngineConfig,), None),
        ("`serve`", (ServeSettings,), None),
        ("`produce`", (ProduceOptions,), lambda group: group != SECURITY),
        ("`replay`, `produce`", (InputSettings,), None),
        ("`replay`", (ReplayOptions,), None),
    ]
    return "\n".join(reference_table(classes, keep, title) for title, classes, keep in parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as err:  # user mistakes and the environment: one line, not a traceback
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
