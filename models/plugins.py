"""Plug-ins: registries that other installed packages extend, and river forecasters named by import path.

A registry maps a name on the command line to what builds it. Besides its built-in entries it reads the
`entry points <https://packaging.python.org/en/latest/specifications/entry-points/>`_ of one group, so that
``pip install`` of another distribution adds names without touching tidecast:

* ``tidecast.models`` — ``name = "package.module:factory"``; the factory is called as
  ``factory(horizon=H, **params)`` (or ``factory(**params)`` if it takes no ``horizon``) and returns a
  :class:`~tidecast.models.base.BatchForecaster`. Its keyword parameters are the lane's ``--model-param`` keys.
* ``tidecast.calibrators`` — ``name = "package.module:CalibratorClass"``, a
  :class:`~tidecast.monitors.conformal.base.Calibrator` built as ``cls(horizon=H, alpha=alphas, **params)``.

Entry points are listed without importing anything; the object behind a name is imported when it is first used,
so a broken plug-in costs only the lanes that ask for it. They are read again when a name is not found, so a
package installed while a process runs is found too.

Names a registry resolves by *prefix* are not listed at all: ``river:MODULE.CLASS`` is any river forecaster (a
subclass of ``river.time_series.base.Forecaster``) by its path below the ``river`` package, run through
:class:`~tidecast.models.adapters.PerSeries` behind :class:`~tidecast.models.adapters.Standardised` (a warm-up
window of ``warmup`` observations fixes a standardisation; forecasts are ``NaN`` until then).

>>> from tidecast.models.registry import MODELS
>>> "seasonal-naive" in MODELS, "river:time_series.SNARIMAX" in MODELS, "river:no.Such" in MODELS
(True, True, False)
>>> sorted(river_parameters("river:time_series.SNARIMAX"))[:4]
['d', 'm', 'p', 'q']
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

RIVER_PREFIX = "river:"
MODEL_GROUP = "tidecast.models"
CALIBRATOR_GROUP = "tidecast.calibrators"


class Registry(Mapping[str, T]):
    """Built-in entries, then the entry points of ``group`` (imported on first use), then prefixed names.

    ``resolvers`` maps a prefix (``"river:"``) to a function that turns the whole name into an entry, or raises
    ``ValueError`` saying why it cannot; prefixed names are found but never listed.
    """

    def __init__(self, group: str, builtins: Mapping[str, T], kind: str = "name",
                 resolvers: Mapping[str, Callable[[str], T]] | None = None) -> None:
        self.group = group
        self.kind = kind
        self.builtins = dict(builtins)
        self.resolvers = dict(resolvers or {})
        self._loaded: dict[str, T] = {}

    def _entry_points(self) -> dict[str, EntryPoint]:
        found = {ep.name: ep for ep in entry_points(group=self.group)}
        return {name: ep for name, ep in found.items() if name not in self.builtins}

    def __getitem__(self, name: str) -> T:
        if name in self.builtins:
            return self.builtins[name]
        if name in self._loaded:
            return self._loaded[name]
        for prefix, resolve in self.resolvers.items():
            if name.startswith(prefix):
                try:
                    value = resolve(name)
                except ValueError:
                    raise KeyError(name) from None
                self._loaded[name] = value
                return value
        point = self._entry_points().get(name)
        if point is None:
            raise KeyError(name)
        try:
            value = point.load()
        except Exception as err:  # a plug-in that cannot be imported: say which and why, once
            raise ValueError(f"{name!r} ({self.group} entry point {point.value} of "
                             f"{getattr(point.dist, 'name', 'an installed package')}) cannot be loaded: "
                             f"{type(err).__name__}: {err}") from err
        self._loaded[name] = value
        return value

    def why_not(self, name: str) -> str | None:
        """Why ``name`` resolves to nothing (for error messages), or ``None`` when it does."""
        for prefix, resolve in self.resolvers.items():
            if name.startswith(prefix):
                try:
                    resolve(name)
                except ValueError as err:
                    return str(err)
                return None
        return None if name in self else f"unknown {self.kind} {name!r}; known: {', '.join(self)}"

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        yield from self.builtins
        yield from sorted(self._entry_points())

    def __len__(self) -> int:
        return len(self.builtins) + len(self._entry_points())


def river_class(name: str) -> type:
    """The river forecaster class named by ``river:MODULE.CLASS``; ``ValueError`` saying why not."""
    path = name.removeprefix(RIVER_PREFIX)
    module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise ValueError(f"{name!r}: write river:MODULE.CLASS, e.g. river:time_series.SNARIMAX")
    try:
        from river.time_series.base import Forecaster

        module = importlib.import_module(f"river.{module_name}")
    except ImportError as err:
        raise ValueError(f"{name!r}: cannot import river.{module_name} ({err})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Forecaster)):
        raise ValueError(f"{name!r}: river.{path} is not a river forecaster (river.time_series.base.Forecaster)")
    return cls


def _river_model(cls: type, name: str, horizon: int, warmup: int = 100, **params: Any) -> Any:
    from river import time_series

    from tidecast.models.adapters import PerSeries, Standardised

    if warmup < 2:
        raise ValueError(f"warmup = {warmup!r}: expected at least 2 observations")
    try:
        trial = cls(**params)  # a missing or refused argument fails now, not at the first forecast
    except (TypeError, ValueError) as err:
        raise ValueError(f"river.{name.removeprefix(RIVER_PREFIX)}: {err}") from None
    # river's HoltWinters starts its seasonal terms as y / level, which a centred level near 0 blows up (MAE 39
    # against 0.87 on raw values); its forecasts scale with its input, so dividing by the deviation alone is exact
    center = not issubclass(cls, time_series.HoltWinters)
    _try_out(trial, name, params, center)
    return PerSeries(name, partial(Standardised, lambda period: cls(**params), 1, 2, warmup, center))


def _try_out(model: Any, name: str, params: dict[str, Any], center: bool) -> None:
    """Run a fresh river ``model`` (built with ``params``) on a short made-up series, standardised as the lane will:
    river's constructors take values their models cannot use (``alpha="0,3"``, ``p=-2``), which failed at every
    series' first step, logged once, and the lane forecast nothing (exit 0)."""
    from tidecast.models.adapters import river_min_history

    n = 2 * (river_min_history(model) or 0) + 50
    values = np.sin(np.arange(n) * 0.7) + 0.1 * np.random.default_rng(0).normal(size=n) + (0.0 if center else 5.0)
    try:
        for y in values.tolist():
            model.learn_one(y)
        forecast = [float(v) for v in model.forecast(1)]
    except Exception as err:  # noqa: BLE001 - river's own error, whatever it is
        raise ValueError(f"river.{name.removeprefix(RIVER_PREFIX)} with {params}: fails on a trial series "
                         f"({type(err).__name__}: {err})") from None
    if not np.isfinite(forecast).all():
        raise ValueError(f"river.{name.removeprefix(RIVER_PREFIX)} with {params}: no finite forecast on a trial "
                         "series")


def river_factory(name: str) -> Callable[..., Any]:
    """A model factory for ``river:MODULE.CLASS``: ``factory(horizon, warmup=100, **class_params)``."""
    cls = river_class(name)
    factory = partial(_river_model, cls, name)
    factory.river_class = cls  # type: ignore[attr-defined]  # where river_parameters finds the parameters
    return factory


def river_parameters(name: str) -> dict[str, Any]:
    """Parameters of a ``river:`` lane: the class's keyword arguments plus ``warmup`` (name -> annotation)."""
    cls = river_class(name)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # river's annotations may name types it imports only for type checkers
        hints = {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {n: _plain_hint(hints.get(n, Any)) for n, p in inspect.signature(cls).parameters.items()
              if p.kind in kinds}
    return {**params, "warmup": int}


def _plain_hint(hint: Any) -> Any:
    """Keep ``int``/``float``/``bool``/``str`` (and their optionals) to check values against; anything else is
    taken as given (river's estimators and callables cannot come from JSON anyway)."""
    simple = {int, float, bool, str, type(None)}
    if hint in simple:
        return hint
    args = typing.get_args(hint)
    if args and all(a in simple for a in args):
        return hint
    return Any


def takes_horizon(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` accepts a ``horizon`` keyword."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    return "horizon" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
