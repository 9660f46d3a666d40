"""Layered settings for the long-running commands: flag > environment (``TIDECAST_*``) > TOML file > default.

Every option is declared once as an :class:`Option`. :func:`add_options` puts it on an argparse parser with a
``None`` default (so "not given" is visible), :func:`resolve` then fills each missing value from the environment
variable ``TIDECAST_<NAME>``, then from the TOML file, then from the option's default.

The TOML file uses the option names as keys (``bootstrap_servers = "kafka:9092"``; dashes work too) plus two
tables: ``[kafka]``, passed verbatim to the kafka-python clients (any of their settings), and
``[model_params.<model>]``, the file form of ``--model-param``.

>>> opts = [Option("horizon", int, 24, "steps"), Option("topic", str, None, "input topic")]
>>> ns = argparse.Namespace(horizon=None, topic="obs")
>>> resolve(ns, opts, env={"TIDECAST_HORIZON": "12"}, file={"horizon": 48, "topic": "other"})
{'horizon': 12, 'topic': 'obs'}
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "TIDECAST_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: Any) -> bool:
    """A boolean from TOML (bool) or text (``1/true/yes/on``, ``0/false/no/off``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_list(value: Any) -> list[str]:
    """A list from TOML (array) or text (comma-separated)."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def parse_words(value: Any) -> list[str]:
    """A list from TOML (array) or text (whitespace-separated; for values that may contain commas)."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return str(value).split()


@dataclass(frozen=True)
class Option:
    """One setting: its name (``bootstrap_servers`` -> ``--bootstrap-servers``, ``TIDECAST_BOOTSTRAP_SERVERS``)."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    group: str = "service"
    choices: Sequence[str] | None = None
    secret: bool = False  # never printed back
    cli: bool = True  # False: declared by another helper (the engine options), only resolved here

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Declare the options on ``parser``, grouped, each with a ``None`` default."""
    groups: dict[str, Any] = {}
    for opt in options:
        if not opt.cli:
            continue
        group = groups.get(opt.group) or groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        shown = "" if opt.default is None or opt.secret else f" (default: {opt.default})"
        help_text = f"{opt.help}{shown} [env {opt.env}]".replace("%", "%%")
        if opt.parse is parse_bool:
            group.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(opt.flag, dest=opt.name, type=str, default=None, choices=opt.choices,
                               metavar=opt.name.upper(), help=help_text)


def load_file(path: str | Path | None) -> dict[str, Any]:
    """A TOML settings file as a flat dict (keys normalised to underscores); ``{}`` without a path."""
    if path is None:
        return {}
    with Path(path).open("rb") as fh:
        data = tomllib.load(fh)
    return {key.replace("-", "_"): value for key, value in data.items()}


def resolve(args: argparse.Namespace, options: Sequence[Option], env: Mapping[str, str] | None = None,
            file: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Each option's value by precedence flag > env > file > default, parsed by the option's parser."""
    env = os.environ if env is None else env
    file = file or {}
    values: dict[str, Any] = {}
    for opt in options:
        raw, source = getattr(args, opt.name, None), "flag"
        if raw is None and opt.env in env:
            raw, source = env[opt.env], f"environment variable {opt.env}"
        if raw is None and opt.name in file:
            raw, source = file[opt.name], "config file"
        if raw is None:
            values[opt.name] = opt.default
            continue
        try:
            value = raw if source == "flag" and not isinstance(raw, str) else opt.parse(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{opt.name}: bad value from {source}: {err}") from err
        if opt.choices is not None and value not in opt.choices:
            raise ValueError(f"{opt.name}: {value!r} from {source} is not one of {', '.join(opt.choices)}")
        values[opt.name] = value
    return values


def model_params_from_file(file: Mapping[str, Any]) -> list[str]:
    """``[model_params.<model>]`` tables as ``--model-param`` items (values JSON-encoded)."""
    import json

    items = []
    for model, params in (file.get("model_params") or {}).items():
        for key, value in params.items():
            items.append(f"{model}.{key}={json.dumps(value)}")
    return items
