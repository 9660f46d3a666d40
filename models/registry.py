"""Model registry: names on the command line -> :class:`~tidecast.models.base.BatchForecaster` tables.

=================  =====================================================================================
name               model
=================  =====================================================================================
``seasonal-naive`` :class:`tidecast.models.naive.SeasonalNaive` (vectorised)
``holt-winters``   river ``HoltWinters`` (additive) per series, standardised, cycle detected
``snarimax``       river ``SNARIMAX`` per series, standardised, cycle detected
``cyclenet``       :mod:`tidecast.models.cyclenet` — RCF + linear/MLP backbone, one shared backbone (torch)
``cfc``            :mod:`tidecast.models.liquid` — liquid CfC cell, one hidden state per series, dt-aware (torch)
=================  =====================================================================================

Keyword parameters come from ``EngineConfig.model_params[name]`` (``--model-param name.key=value`` on the CLI).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from tidecast.models.adapters import PerSeries, Standardised
from tidecast.models.base import BatchForecaster
from tidecast.models.naive import SeasonalNaive


def _holt_winters(period: int, alpha: float, beta: float, gamma: float):
    from river import time_series

    if period <= 1:  # no cycle: double exponential smoothing
        return time_series.HoltWinters(alpha=alpha, beta=beta)
    return time_series.HoltWinters(alpha=alpha, beta=beta, gamma=gamma, seasonality=period)


def _snarimax(period: int, p: int, d: int, q: int, sp: int, sq: int, lr: float):
    from river import linear_model, optim, preprocessing, time_series

    regressor = preprocessing.StandardScaler() | linear_model.LinearRegression(
        optimizer=optim.SGD(lr), intercept_lr=lr, clip_gradient=1.0
    )
    seasonal = period > 1
    return time_series.SNARIMAX(p=p, d=d, q=q, m=period if seasonal else 1, sp=sp if seasonal else 0,
                                sq=sq if seasonal else 0, regressor=regressor)


def holt_winters(horizon: int, period: int | None = None, max_period: int = 200, warmup: int | None = None,
                 alpha: float = 0.1, beta: float = 0.01, gamma: float = 0.3) -> BatchForecaster:
    """river HoltWinters (additive) per series; smoothing constants from a small grid on ETTh1 rows 0-6000."""
    build = partial(_holt_winters, alpha=alpha, beta=beta, gamma=gamma)
    return PerSeries("holt-winters", partial(Standardised, build, period, max_period, warmup))


def snarimax(horizon: int, period: int | None = None, max_period: int = 200, warmup: int | None = None,
             p: int = 2, d: int = 0, q: int = 1, sp: int = 1, sq: int = 0, lr: float = 0.01) -> BatchForecaster:
    """river SNARIMAX per series with a standardised target (its SGD diverges on raw scale)."""
    build = partial(_snarimax, p=p, d=d, q=q, sp=sp, sq=sq, lr=lr)
    return PerSeries("snarimax", partial(Standardised, build, period, max_period, warmup))


def seasonal_naive(horizon: int, **params: Any) -> BatchForecaster:
    return SeasonalNaive(**params)


def cyclenet(horizon: int, **params: Any) -> BatchForecaster:
    from tidecast.models.cyclenet import build  # torch is imported only when CycleNet is asked for

    return build(horizon=horizon, **params)


def cfc(horizon: int, **params: Any) -> BatchForecaster:
    from tidecast.models.liquid import build  # torch is imported only when the liquid model is asked for

    return build(horizon=horizon, **params)


MODELS: dict[str, Callable[..., BatchForecaster]] = {
    "seasonal-naive": seasonal_naive,
    "holt-winters": holt_winters,
    "snarimax": snarimax,
    "cyclenet": cyclenet,
    "cfc": cfc,
}


def make_model(name: str, horizon: int, **params: Any) -> BatchForecaster:
    """Build a registered model by name."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    return factory(horizon=horizon, **params)
