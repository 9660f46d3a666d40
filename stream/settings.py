"""Settings declared once, as typed fields of frozen dataclasses.

A field made with :func:`setting` carries its help text, group and checks. From it come the command-line flag
(``group_id`` -> ``--group-id``), the environment variable (``TIDECAST_GROUP_ID``) and the key of the TOML file
(``group_id = "tidecast"``; dashes work too). :func:`add_arguments` puts the flags on an argparse parser, each
``None`` when not given so that "not given" stays visible; :func:`resolve` then builds the dataclass, each value
by precedence **flag > environment > file > default**, parsed by the field's type. Dictionary settings
(``model_params``) merge instead: file, then environment, then flags, key by key.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo:
...     horizon: int = setting(24, "forecast steps", group="engine", check=at_least(1))
...     topic: str | None = setting(None, "input topic", group="kafka")
>>> args = argparse.Namespace(horizon=None, topic="obs")
>>> file = SettingsFile(values={"horizon": 48, "topic": "other"})
>>> resolve(Demo, args, env={"TIDECAST_HORIZON": "12"}, file=file)
Demo(horizon=12, topic='obs')
>>> resolve(Demo, argparse.Namespace(horizon="0", topic=None), env={})
Traceback (most recent call last):
...
tidecast.stream.settings.SettingsError: --horizon 0: must be at least 1

Errors name the setting and where its value came from; a secret's value is never shown (nor in ``repr``, help or
the reference tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import numbers
import re
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

ENV_PREFIX = "TIDECAST_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
#: Order of the groups in ``--help`` and in the reference tables; groups not listed come after.
GROUP_ORDER = ("input", "kafka", "kafka security (passed to kafka-python)", "state", "service", "engine", "output",
               "pace")
HIDDEN = "<hidden>"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_META = "tidecast.setting"

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting that cannot be used: unknown, missing, or a value that does not parse or fails its check."""


# -- declaring ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Meta:
    """What a :func:`setting` field declares besides its type and default."""

    help: str
    group: str
    name: str | None = None  # stem of the flag and environment variable when not the field's name
    key: str | None = None  # TOML key when not ``name``
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # the problem with a parsed value, or None
    parse: Callable[[Any], Any] | None = None  # text or TOML value -> value, instead of the type's parser
    secret: bool = False  # never printed: not in help, errors, repr or the reference tables
    required: bool = False
    repeat: bool = False  # the flag may be given several times; items accumulate
    sep: str | None = ","  # separator of list items in text; None: whitespace (and flags are not split)
    positional: bool = False
    metavar: str | None = None
    shown_default: str | None = None  # the default as documented, where the field's own is a placeholder
    # the field this one is an alternative way to set (--alpha and --level): given by sources of different
    # precedence, the lower one is dropped, so that a flag overrides the file's alternative too; given by the same
    # source, both reach the class, whose own check reports a contradiction
    alternative_to: str | None = None
    # the setting that chooses the component these parameters are for (calibrator_params: calibrator): when a flag
    # or the environment changes that choice, the file's parameters for the component it replaced are dropped, so a
    # shared file's [calibrator_params] do not make TIDECAST_CALIBRATOR=... an error; ``kept(params, file's choice,
    # final choice)`` says which of them still apply (default: all when the choice is the same, else none)
    parameters_of: str | None = None
    kept: Callable[[Any, Any, Any], Any] | None = None


def setting(default: Any = None, help: str = "", *, group: str, **meta: Any) -> Any:
    """A dataclass field that is also a command-line flag, an environment variable and a TOML key."""
    info = Meta(help=help, group=group, **meta)
    metadata = {_META: info}
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, repr=not info.secret)
    return field(default=default, metadata=metadata, repr=not info.secret)


def at_least(low: float, high: float = math.inf) -> Callable[[Any], str | None]:
    """A check: ``None`` or a finite number ``>= low`` (and ``<= high`` when given): ``inf`` would pass ``>=`` and
    end later in a traceback (a sleep, a timeout in milliseconds)."""
    def check(value: Any) -> str | None:
        if value is None:
            return None
        if not _real(value):  # a string from the Python API: math.isfinite raised, naming no setting
            return f"must be a number, got {type(value).__name__} {value!r}"
        if not math.isfinite(value):
            return "must be a finite number"
        if value < low:
            return f"must be at least {low}"
        return None if value <= high else f"must be at most {high}"
    return check


def positive(value: float | None) -> str | None:
    """A check: ``None`` or a finite number ``> 0``."""
    if value is not None and not _real(value):
        return f"must be a number, got {type(value).__name__} {value!r}"
    return None if value is None or (value > 0 and math.isfinite(value)) else "must be a finite positive number"


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_bool(value: Any) -> bool:
    """A boolean from TOML (bool) or text (``1/true/yes/on``, ``0/false/no/off``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("not a boolean (true/false, 1/0, yes/no, on/off)")


@dataclass(frozen=True)
class Setting:
    """One declared field of a settings class, with the type its annotation names."""

    field: str
    type: Any
    optional: bool
    default: Any
    meta: Meta

    @property
    def name(self) -> str:
        return self.meta.name or self.field

    @property
    def key(self) -> str:
        return self.meta.key or self.name

    @property
    def flag(self) -> str:
        return self.name if self.meta.positional else "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def is_bool(self) -> bool:
        return self.type is bool

    @property
    def is_collection(self) -> bool:
        return typing.get_origin(self.type) in (list, dict) or self.type in (list, dict)

    @property
    def merges(self) -> bool:
        return typing.get_origin(self.type) is dict or self.type is dict

    def shown_default(self) -> str:
        """The default as help and the reference tables show it."""
        if self.meta.secret:
            return ""
        if self.meta.shown_default is not None:
            return self.meta.shown_default
        return format_value(self.default)

    def convert(self, raw: Any) -> Any:
        """A value from a flag, the environment (text) or the file (TOML types); raises ``ValueError``."""
        if raw is None:
            if self.optional:
                return None
            raise ValueError("a value is required")
        if self.is_collection and isinstance(raw, str):
            raw = split_items(raw, self.meta.sep)
        value = self.meta.parse(raw) if self.meta.parse is not None else _convert(raw, self.type)
        if self.meta.choices is not None and value not in self.meta.choices:
            raise ValueError(f"not one of {', '.join(self.meta.choices)}")
        problem = self.meta.check(value) if self.meta.check is not None else None
        if problem:
            raise ValueError(problem)
        return value


def format_value(value: Any) -> str:
    """A value as the reference tables and help show it."""
    if value is None or value == {}:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def split_items(text: str, sep: str | None) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]`` (``sep=None``: split on whitespace)."""
    parts = text.split() if sep is None else text.split(sep)
    return [part.strip() for part in parts if part.strip()]


def _toml_kind(raw: Any) -> str:
    return {dict: "a table", list: "a list", tuple: "a list"}.get(type(raw), type(raw).__name__)


def _convert(raw: Any, kind: Any) -> Any:
    if kind is bool:
        return parse_bool(raw)
    if isinstance(raw, bool) and kind in (int, float, str):
        raise ValueError(f"expected {kind.__name__}, got a boolean")
    if kind in (int, float) and not isinstance(raw, str | int | float):  # a TOML table or list, a date
        raise ValueError(f"expected a {'whole number' if kind is int else 'number'}, got {_toml_kind(raw)}")
    if kind is int:
        if isinstance(raw, float):
            raise ValueError("not a whole number")
        try:
            return int(raw)
        except ValueError:
            raise ValueError("not a whole number") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("not a number") from None
    if kind is str:
        if isinstance(raw, str | int | float):
            return str(raw)
        raise ValueError(f"expected text, got {_toml_kind(raw)}")
    if kind is Path:
        if isinstance(raw, str) and not raw.strip():  # Path("") is the working directory
            raise ValueError("an empty path")
        if isinstance(raw, str | Path):
            return Path(raw)
        raise ValueError(f"expected a path, got {type(raw).__name__}")
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind) or (str,)
        if not isinstance(raw, list | tuple):
            raise ValueError(f"expected a list, got {_toml_kind(raw)}")
        return [_convert(v, item) for v in raw]
    if kind is Any:
        return raw
    raise TypeError(f"no parser for settings of type {kind!r}: give the field a parse=")


@cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The declared settings of a dataclass, in field order (base classes first)."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            continue
        kind, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        found.append(Setting(f.name, kind, optional, default, meta))
    return tuple(found)


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(kind))
    return kind, False


def check_declared(obj: Any) -> None:
    """Run the declared checks on a directly constructed settings object (``__post_init__``)."""
    for s in settings_of(type(obj)):
        value = getattr(obj, s.field)
        if value is None or (s.meta.required and isinstance(value, str) and not value.strip()):
            if s.meta.required:  # an empty TIDECAST_TOPIC= is as missing as none
                raise SettingsError(f"{s.name} is required ({_where_to_set(s)})")
            continue
        problem = None
        if s.meta.choices is not None and value not in s.meta.choices:
            problem = f"not one of {', '.join(s.meta.choices)}"
        elif s.meta.check is not None:
            problem = s.meta.check(value)
        if problem:
            raise SettingsError(f"{s.name} {_shown(s, value)}: {problem}")


def _where_to_set(s: Setting) -> str:
    return f"{s.flag}, {s.env} or {s.key} in the config file"


def _shown(s: Setting, value: Any) -> str:
    return HIDDEN if s.meta.secret else repr(value)


# -- the command line ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, classes: Sequence[type]) -> None:
    """Declare the settings of ``classes`` on ``parser``, grouped, each ``None`` unless given."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in ordered(classes):
        group = groups.get(s.meta.group) or groups.setdefault(s.meta.group, parser.add_argument_group(s.meta.group))
        help_text = _help(s).replace("%", "%%")
        if s.meta.positional:
            group.add_argument(s.name, nargs="?", default=None, metavar=s.name.upper(), help=help_text)
        elif s.is_bool:
            group.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(s.flag, dest=s.name, action="append" if s.meta.repeat else "store", default=None,
                               metavar=_metavar(s), help=help_text)


def ordered(classes: Sequence[type]) -> list[Setting]:
    """The settings of ``classes`` (first declaration of a name wins), grouped in :data:`GROUP_ORDER`."""
    seen: dict[str, Setting] = {}
    for cls in classes:
        for s in settings_of(cls):
            seen.setdefault(s.name, s)
    rank = {group: i for i, group in enumerate(GROUP_ORDER)}
    return sorted(seen.values(), key=lambda s: rank.get(s.meta.group, len(rank)))


def _metavar(s: Setting) -> str:
    if s.meta.metavar:
        return s.meta.metavar
    if s.meta.choices:
        return "{" + ",".join(s.meta.choices) + "}"
    return s.name.upper()


def _help(s: Setting) -> str:
    default = s.shown_default()
    shown = f" (default: {default})" if default else ""
    return f"{s.meta.help}{shown} [env {s.env}]"


# -- the file -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SettingsFile:
    """A TOML settings file: top-level values (keys with underscores) and the ``[kafka]`` table."""

    values: Mapping[str, Any] = field(default_factory=dict)
    kafka: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None


def load_file(path: str | Path | None, known_keys: Collection[str]) -> SettingsFile:
    """Read a TOML settings file; a key no setting reads is an error that names the closest valid one.

    The ``[kafka]`` table is returned as is (its keys are kafka-python's, checked by the caller).
    """
    if path is None:
        return SettingsFile()
    if not str(path).strip():  # TIDECAST_CONFIG= would read the directory '.'
        raise SettingsError("the config file's path is empty (--config, TIDECAST_CONFIG)")
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8; a file saved as UTF-16 or Latin-1 is not
        raise SettingsError(f"{path}: not valid TOML: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise SettingsError(f"config file {path}: {err.strerror or err}") from None
    values = {key.replace("-", "_"): value for key, value in data.items()}
    if len(values) < len(data):  # max-gap and max_gap: one would win without a word
        raise SettingsError(f"{path}: a key is given twice, with '-' and with '_' ("
                            f"{', '.join(k for k in data if k.replace('-', '_') != k)})")
    kafka = values.pop("kafka", {})
    if not isinstance(kafka, dict):
        raise SettingsError(f"{path}: kafka must be a table ([kafka]) of kafka-python client settings")
    for key in values:
        if key not in known_keys:
            raise SettingsError(f"{path}: unknown key {key!r}{suggest(key, [*known_keys, 'kafka'])}")
    return SettingsFile(values, kafka, path)


def suggest(word: str, candidates: Iterable[str]) -> str:
    """``; did you mean 'x'?`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def keys_of(classes: Iterable[type]) -> set[str]:
    """The TOML keys the settings of ``classes`` read."""
    return {s.key for cls in classes for s in settings_of(cls)}


def env_names_of(classes: Iterable[type]) -> set[str]:
    """The environment variables the settings of ``classes`` read (plus ``TIDECAST_CONFIG``)."""
    return {s.env for cls in classes for s in settings_of(cls)} | {CONFIG_ENV}


def warn_unknown_env(env: Mapping[str, str], known: Collection[str]) -> list[str]:
    """Log one warning naming the ``TIDECAST_*`` variables no setting reads (never their values).

    A warning, not an error: Kubernetes injects ``<SERVICE>_SERVICE_HOST``-style variables for every service.
    """
    unknown = sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)
    if unknown:
        named = ", ".join(f"{name} ({_guess(name, known, env[name])})" for name in unknown)
        log.warning("ignored environment variables that are no tidecast setting: %s", named)
    return unknown


# Kubernetes' service links for a service named tidecast-...: X_SERVICE_HOST, X_SERVICE_PORT[_NAME],
# X_PORT_80_TCP[_PROTO|_PORT|_ADDR] and X_PORT=tcp://10.0.0.11:80 (a bare _PORT only with such a value, else a typo)
_SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT)(_\w+)?$|_PORT_\d+_(TCP|UDP|SCTP)(_\w+)?$")
_SERVICE_URL = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)


def _guess(name: str, known: Collection[str], value: str = "") -> str:
    if _SERVICE_LINK.search(name) or (name.endswith("_PORT") and _SERVICE_URL.match(value)):
        return "a Kubernetes service link?"
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else "unknown"


# -- resolving ----------------------------------------------------------------------------------------------------
def resolve(cls: type[T], args: argparse.Namespace, env: Mapping[str, str], file: SettingsFile | None = None,
            **fixed: Any) -> T:
    """Build ``cls`` from its settings (flag > environment > file > default) plus the ``fixed`` fields."""
    file = file or SettingsFile()
    values: dict[str, Any] = {}
    precedence: dict[str, int] = {}  # field -> 0 flag, 1 environment, 2 file
    from_file: dict[str, Any] = {}  # field -> the file's value, converted
    given: dict[str, list[Any]] = {}  # field -> the flag's and the environment's values, converted
    for s in settings_of(cls):
        found = list(_sources(s, args, env, file))
        if not found:
            continue
        precedence[s.field] = ("flag", "env").index(found[0][1]) if found[0][1] in ("flag", "env") else 2
        converted = [(_converted(s, raw, where), where) for raw, where in found]
        given[s.field] = [value for value, where in converted if where in ("flag", "env")]
        if converted[-1][1] not in ("flag", "env"):
            from_file[s.field] = converted[-1][0]
            _note_env_over_file(s, found, converted)
        values[s.field] = _merged(s, [value for value, _ in converted])
    by_field = {s.field: s for s in settings_of(cls)}
    for s in settings_of(cls):
        chooser = s.meta.parameters_of
        if chooser is None or s.field not in from_file or precedence.get(chooser, 2) == 2:
            continue  # the choice, if any, was the file's own: its parameters stand (or fail) as written
        choice_in_file = from_file.get(chooser, by_field[chooser].default)
        kept = (s.meta.kept or _same_choice)(from_file[s.field], choice_in_file, values[chooser])
        values[s.field] = _merged(s, [*given[s.field], kept])
    for s in settings_of(cls):
        other = s.meta.alternative_to
        if other in values and s.field in values and precedence[s.field] != precedence[other]:
            del values[s.field if precedence[s.field] > precedence[other] else other]
    return cls(**values, **fixed)  # __post_init__ checks what needs several fields (and required ones)


def _note_env_over_file(s: Setting, found: list[tuple[Any, str]], converted: list[tuple[Any, str]]) -> None:
    """Warn when the environment, and no flag, replaces a different value written in the file: a container image's
    own ``TIDECAST_*`` defaults beat a mounted config file, which surprised operators who set the port there."""
    if s.merges or converted[0][1] != "env" or converted[0][0] == converted[-1][0]:
        return
    log.warning("%s replaces %s (the environment beats the config file)", _origin(s, found[0][0], "env"),
                _origin(s, found[-1][0], found[-1][1]))


def _merged(s: Setting, values: list[Any]) -> Any:
    """A setting's value from its sources' values, highest precedence first: the first, or for a table all of
    them merged key by key."""
    if not s.merges:
        return values[0]
    merged: dict[str, Any] = {}
    for value in reversed(values):
        merged = merge(merged, value)
    return merged


def _same_choice(params: Any, file_choice: Any, choice: Any) -> Any:
    """A component's parameters from the file apply while the component is the one the file chose."""
    return params if file_choice == choice else {}


def from_values(cls: type[T], values: Mapping[str, Any], where: str, **fixed: Any) -> T:
    """Build ``cls`` from a mapping of setting names to values (Python or TOML types), checked like a file."""
    by_field = {s.field: s for s in settings_of(cls)}
    converted = {}
    for key, raw in values.items():
        if key not in by_field:
            raise SettingsError(f"{where}: unknown setting {key!r}{suggest(key, by_field)}")
        converted[key] = _converted(by_field[key], raw, f"file {where}")
    return cls(**converted, **fixed)


def _sources(s: Setting, args: argparse.Namespace, env: Mapping[str, str],
             file: SettingsFile) -> Iterator[tuple[Any, str]]:
    """The values given for ``s``, highest precedence first, each with a description of where it came from."""
    raw = getattr(args, s.name, None)
    if raw is not None:
        if s.meta.repeat and s.meta.sep is not None:
            raw = [item for part in raw for item in split_items(part, s.meta.sep)]
        yield raw, "flag"
    if s.env in env:
        yield env[s.env], "env"
    if s.key in file.values:
        yield file.values[s.key], f"file {file.path}" if file.path else "file"


def _converted(s: Setting, raw: Any, where: str) -> Any:
    try:
        return s.convert(raw)
    except (TypeError, ValueError) as err:
        raise SettingsError(f"{_origin(s, raw, where)}: {err}") from None


def _origin(s: Setting, raw: Any, where: str) -> str:
    """``--log-level 'LOUD'``, ``TIDECAST_LOG_LEVEL='LOUD' (environment)``, ``log_level = 'LOUD' in FILE``."""
    shown = HIDDEN if s.meta.secret else _short(raw)
    if where == "flag":
        return f"{s.flag} {shown}"
    if where == "env":
        return f"{s.env}={shown} (environment)"
    return f"{s.key} = {shown} in {where.removeprefix('file ') or 'the config file'}"


def _short(raw: Any) -> str:
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return " ".join(raw)
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    return text if len(text) <= 200 else text[:200] + "..."


def merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``, nested tables merged key by key."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_key_values(raw: Any, what: str, nested: bool) -> dict[str, Any]:
    """``KEY=VALUE`` items (``nested``: ``NAME.KEY=VALUE``) or a TOML table -> a dict; values are JSON.

    >>> parse_key_values(["sn24.period=24", "sn24.max_period=48", "hw.alpha=0.2"], "model parameter", nested=True)
    {'sn24': {'period': 24, 'max_period': 48}, 'hw': {'alpha': 0.2}}
    """
    if isinstance(raw, Mapping):
        if nested and not all(isinstance(v, Mapping) for v in raw.values()):
            raise ValueError(f"{what}s must be tables of tables, e.g. [model_params.NAME]")
        return {str(k): dict(v) if nested else v for k, v in raw.items()}
    if not isinstance(raw, list | tuple):
        raise ValueError(f"expected {what} items or a table")
    out: dict[str, Any] = {}
    for item in raw:
        key, sep, text = str(item).partition("=")
        name, dot, param = key.partition(".")
        if not sep or not key or (nested and (not dot or not name or not param)):
            shape = "NAME.KEY=VALUE" if nested else "KEY=VALUE"
            raise ValueError(f"{what} {item!r} is not {shape}")
        value = _json_or_text(text)
        table, field = (out.setdefault(name, {}), param) if nested else (out, key)
        if field in table:  # one would win without a word (merging across sources is fine)
            raise ValueError(f"{what} {key} is given twice: {table[field]!r} and {value!r}")
        table[field] = value
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# -- showing ------------------------------------------------------------------------------------------------------
class SettingsView(Mapping[str, Any]):
    """A read-only mapping of a settings object's fields (what kafka client helpers read); repr hides secrets."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._secret = {s.field for s in settings_of(type(obj)) if s.meta.secret}
        self._names = [f.name for f in dataclasses.fields(obj)]

    def __getitem__(self, key: str) -> Any:
        if key not in self._names:
            raise KeyError(key)
        return getattr(self._obj, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        shown = {k: HIDDEN if k in self._secret and self[k] is not None else self[k] for k in self._names}
        return f"SettingsView({shown!r})"


def reference_table(classes: Sequence[type], keep: Callable[[str], bool] | None = None, title: str = "") -> str:
    """Markdown tables, one per group, of the settings of ``classes`` (only groups ``keep`` accepts): flag,
    environment variable, file key, default and meaning."""
    lines: list[str] = []
    current = None
    for s in ordered(classes):
        if keep is not None and not keep(s.meta.group):
            continue
        if s.meta.group != current:
            current = s.meta.group
            heading = f"{title} — {current}" if title else current
            lines += ["", f"**{heading}**", "", "| flag | environment | file key | default | meaning |",
                      "|---|---|---|---|---|"]
        flag = f"{s.flag}, --no-{s.flag[2:]}" if s.is_bool else s.name.upper() if s.meta.positional else s.flag
        meaning = s.meta.help + (f" ({' / '.join(s.meta.choices)})" if s.meta.choices else "")
        lines.append(f"| `{flag}` | `{s.env}` | `{s.key}` | {_cell(s.shown_default())} | {_cell(meaning)} |")
    return "\n".join(lines).strip("\n") + "\n"


def _cell(text: str) -> str:
    return re.sub(r"([|<])", r"\\\1", text)
