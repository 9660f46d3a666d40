"""Model registry: names on the command line -> :class:`~tidecast.models.base.BatchForecaster` tables.

=================  =====================================================================================
name               model
=================  =====================================================================================
``seasonal-naive`` :class:`tidecast.models.naive.SeasonalNaive` (vectorised)
``holt-winters``   river ``HoltWinters`` (additive, two-cycle start) per series, standardised, cycle detected
``snarimax``       river ``SNARIMAX`` per series, standardised, cycle detected
``cyclenet``       :mod:`tidecast.models.cyclenet` — RCF + linear/MLP backbone, one shared backbone (torch)
``cfc``            :mod:`tidecast.models.liquid` — liquid CfC cell, one hidden state per series, dt-aware (torch)
=================  =====================================================================================

Each engine lane is ``ALIAS=NAME`` (``sn24=seasonal-naive``) or a bare ``NAME``, its own alias; the alias names the
lane everywhere after (records, metric labels, state, ``--model-param ALIAS.KEY=VALUE``). A model's parameters are
those of its constructor (:func:`model_parameters`); :func:`check_params` refuses others and converts values to
the annotated types, so a bad parameter fails before any work starts:

>>> parse_lane("sn24=seasonal-naive"), parse_lane("holt-winters")
(('sn24', 'seasonal-naive'), ('holt-winters', 'holt-winters'))
>>> check_params("seasonal-naive", {"period": 24}, "sn24")
{'period': 24}
>>> check_params("seasonal-naive", {"bogus": 1}, "sn24")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: model parameter sn24.bogus: seasonal-naive has no parameter 'bogus'; valid: period, max_period, ...
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

from tidecast.models.adapters import PerSeries, Standardised
from tidecast.models.base import BatchForecaster, check_rate, require
from tidecast.models.naive import SeasonalNaive, check_ticks
from tidecast.models.plugins import MODEL_GROUP, RIVER_PREFIX, Registry, river_factory, river_parameters, takes_horizon


def _holt_winters(period: int, alpha: float, beta: float, gamma: float):
    from river import time_series

    from tidecast.models.holt_winters import AdditiveHoltWinters

    if period <= 1:  # no cycle: double exponential smoothing
        return time_series.HoltWinters(alpha=alpha, beta=beta)
    return AdditiveHoltWinters(alpha=alpha, beta=beta, gamma=gamma, seasonality=period)


def _snarimax(period: int, p: int, d: int, q: int, sp: int, sq: int, lr: float):
    from river import linear_model, optim, preprocessing, time_series

    regressor = preprocessing.StandardScaler() | linear_model.LinearRegression(
        optimizer=optim.SGD(lr), intercept_lr=lr, clip_gradient=1.0
    )
    seasonal = period > 1
    return time_series.SNARIMAX(p=p, d=d, q=q, m=period if seasonal else 1, sp=sp if seasonal else 0,
                                sq=sq if seasonal else 0, regressor=regressor)


def holt_winters(horizon: int, period: int | None = None, max_period: int = 200, warmup: int | None = None,
                 alpha: float = 0.1, beta: float = 0.01, gamma: float = 0.3, bootstrap: int = 0) -> BatchForecaster:
    """river HoltWinters (additive) per series; smoothing constants from a small grid on ETTh1 rows 0-6000.
    ``bootstrap=B``: a residual bootstrap of B replicas (0: none)."""
    _check_cycle(period, max_period, warmup)
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        require(0 <= value <= 1, name, value, "a smoothing constant in [0, 1]")
    # river's additive seasonal update reads the trend: beta = 0 failed at the first fit, after the warm-up
    require(beta > 0 or period == 1, "beta", beta, "a smoothing constant in (0, 1] (0 only with period=1: no cycle)")
    build = partial(_holt_winters, alpha=alpha, beta=beta, gamma=gamma)
    return PerSeries("holt-winters", partial(Standardised, build, period, max_period, warmup), bootstrap=bootstrap,
                     bootstrap_kind="residual")


def snarimax(horizon: int, period: int | None = None, max_period: int = 200, warmup: int | None = None,
             p: int = 2, d: int = 0, q: int = 1, sp: int = 1, sq: int = 0, lr: float = 0.01,
             bootstrap: int = 0) -> BatchForecaster:
    """river SNARIMAX per series with a standardised target (its SGD diverges on raw scale).
    ``bootstrap=B``: B replicas fed each value ``k ~ Poisson(1)`` times (online bagging; 0: none)."""
    _check_cycle(period, max_period, warmup)
    for name, value in (("p", p), ("d", d), ("q", q), ("sp", sp), ("sq", sq)):
        require(0 <= value <= 100, name, value, "an order from 0 to 100")
    check_rate("lr", lr)
    build = partial(_snarimax, p=p, d=d, q=q, sp=sp, sq=sq, lr=lr)
    return PerSeries("snarimax", partial(Standardised, build, period, max_period, warmup), bootstrap=bootstrap)


def _check_cycle(period: int | None, max_period: int, warmup: int | None) -> None:
    check_ticks("period", period, optional=True)
    check_ticks("max_period", max_period)
    check_ticks("warmup", warmup, low=2, optional=True)


def seasonal_naive(horizon: int, **params: Any) -> BatchForecaster:
    return SeasonalNaive(**params)


def cyclenet(horizon: int, **params: Any) -> BatchForecaster:
    from tidecast.models.cyclenet import build  # torch is imported only when CycleNet is asked for

    return build(horizon=horizon, **params)


def cfc(horizon: int, **params: Any) -> BatchForecaster:
    from tidecast.models.liquid import build  # torch is imported only when the liquid model is asked for

    return build(horizon=horizon, **params)


#: Built-in models, then those of installed plug-ins (entry point group ``tidecast.models``), then any river
#: forecaster as ``river:MODULE.CLASS`` (see :mod:`tidecast.models.plugins`).
MODELS: Registry[Callable[..., BatchForecaster]] = Registry(MODEL_GROUP, {
    "seasonal-naive": seasonal_naive,
    "holt-winters": holt_winters,
    "snarimax": snarimax,
    "cyclenet": cyclenet,
    "cfc": cfc,
}, kind="model", resolvers={RIVER_PREFIX: river_factory})


def _cyclenet_class() -> type:
    from tidecast.models.cyclenet import CycleNetForecaster  # torch: imported only when CycleNet is asked for

    return CycleNetForecaster


#: Factories that forward ``**params`` to a class: the class whose constructor declares them.
def _cfc_class() -> type:
    from tidecast.models.liquid import CfCForecaster  # torch: imported only when the liquid model is asked for

    return CfCForecaster


_PARAMETERS_OF: dict[str, Callable[[], Callable[..., Any]]] = {
    "seasonal-naive": lambda: SeasonalNaive,
    "cyclenet": _cyclenet_class,
    "cfc": _cfc_class,
}
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def parse_lane(text: str) -> tuple[str, str]:
    """``"ALIAS=NAME"`` -> ``(alias, name)``; a bare ``NAME`` is its own alias."""
    alias, sep, name = (part.strip() for part in text.partition("="))
    if not sep:
        name = alias
        if name.startswith(RIVER_PREFIX):
            raise ValueError(f"{text!r}: a river lane needs an alias, e.g. snx={text}")
    if not _ALIAS.fullmatch(alias):
        # the alias is a state key prefix (ALIAS/...) and a --model-param prefix (ALIAS.KEY): keep it plain
        raise ValueError(f"lane alias {alias!r} in {text!r}: use letters, digits, '-' and '_' "
                         "(starting with a letter or digit)")
    problem = MODELS.why_not(name)
    if problem is not None:
        raise ValueError(f"{problem} (in {text!r}; river forecasters: river:MODULE.CLASS)")
    return alias, name


def model_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of a registered model (name -> annotation), from its constructor's signature."""
    if name.startswith(RIVER_PREFIX):
        return river_parameters(name)
    target = _PARAMETERS_OF[name]() if name in _PARAMETERS_OF else MODELS[name]
    return keyword_parameters(target, exclude=("horizon",))


def keyword_parameters(target: Callable[..., Any], exclude: Collection[str] = ()) -> dict[str, Any]:
    """The named parameters of a function or class constructor (name -> annotation, ``Any`` where none)."""
    function = target.__init__ if isinstance(target, type) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # a plug-in's annotations may name what only its type checker imports: check nothing
        hints = {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: hints.get(name, Any) for name, p in inspect.signature(target).parameters.items()
            if p.kind in kinds and name not in exclude}


def check_params(name: str, params: dict[str, Any], alias: str) -> dict[str, Any]:
    """``params`` for the lane ``alias`` of model ``name``, converted to the annotated types; ``ValueError``
    naming the parameter (and the valid ones) for a parameter the model does not take or a value it cannot."""
    return check_keywords(model_parameters(name), params, f"model parameter {alias}.", name)


def check_keywords(accepted: dict[str, Any], params: dict[str, Any], prefix: str, owner: str) -> dict[str, Any]:
    """Shared by models and calibrators: known keywords only, values converted to their annotations."""
    out = {}
    for key, value in params.items():
        if key not in accepted:
            raise ValueError(f"{prefix}{key}: {owner} has no parameter {key!r}; valid: {', '.join(accepted)}")
        try:
            out[key] = coerce(value, accepted[key])
        except ValueError as err:
            raise ValueError(f"{prefix}{key} = {value!r}: {err}") from None
    return out


def coerce(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` wants it: strict for ``int``, ``float``, ``bool`` and ``str`` (``int`` is a
    ``float``), lists and tuples item by item, unions tried in turn; other annotations (callables) take the value
    as given.

    >>> coerce(24, int | None), coerce(1, float), coerce(None, int | None)
    (24, 1.0, None)
    >>> coerce("abc", int | None)
    Traceback (most recent call last):
    ...
    ValueError: expected int or None (null in JSON and --model-param; leave the key out in TOML), got 'abc'
    >>> coerce([24, 168], tuple[int, ...])
    [24, 168]
    >>> coerce("inf", float)
    inf
    """
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        for option in options:
            try:
                return coerce(value, option)
            except ValueError:
                continue
        names = " or ".join(dict.fromkeys(_type_name(o) for o in options))
        raise ValueError(f"expected {names}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("inf", "infinity"):
            return float(value)  # JSON has no infinity: h=inf ("that statistic never alarms") arrives as text
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(annotation) in _SEQUENCES:
        kind = typing.get_args(annotation)[0]
        if isinstance(value, list | tuple):  # a TOML or JSON array, kept as given (saved settings compare equal)
            return type(value)(coerce(item, kind) for item in value)
        raise ValueError(f"expected {_type_name(annotation)}, got {value!r}")
    else:
        return value
    name = "None" if annotation is type(None) else annotation.__name__
    raise ValueError(f"expected {name}, got {value!r}")


#: Annotations read as "a list of": ``Sequence[float]`` too (dtaci's gammas), which passed a scalar through unchecked.
_SEQUENCES = (tuple, list, collections.abc.Sequence)


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None (null in JSON and --model-param; leave the key out in TOML)"
    if typing.get_origin(annotation) in _SEQUENCES:
        kind = typing.get_args(annotation)[0]
        example = {int: "[24, 168]", float: "[0.01, 0.1]", str: '["a", "b"]'}.get(kind, "[...]")
        return f"a list of {kind.__name__} (e.g. {example})"
    return getattr(annotation, "__name__", str(annotation))


def make_model(name: str, horizon: int, **params: Any) -> BatchForecaster:
    """Build a registered model by name (a plug-in's factory gets ``horizon`` only if it takes one)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(MODELS.why_not(name) or f"unknown model {name!r}") from None
    model = factory(horizon=horizon, **params) if takes_horizon(factory) else factory(**params)
    if not isinstance(model, BatchForecaster):
        raise ValueError(f"model {name!r} built a {type(model).__name__}, not a BatchForecaster (wrap one-series "
                         "forecasters in tidecast.models.adapters.PerSeries)")
    return model
