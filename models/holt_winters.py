"""river's additive Holt-Winters with a correct start: its first two cycles set the level, trend and season.

river (0.26) starts every Holt-Winters model from its first ``seasonality`` values with seasonal terms
``y / level``, the multiplicative formula, even for the additive model, and with a trend equal to the mean
step *inside* that first cycle, which is mostly the cycle's own slope. On a standardised series the level is
near 0, so those seasonal terms are huge (first forecasts of 32-79 on data around 7-13), or a division by zero.

:class:`AdditiveHoltWinters` keeps river's update equations and replaces only the start (the classical
two-cycle initialisation): after ``2 * seasonality`` observations, the trend is the step between the two
cycles' means spread over one cycle, the level is that line's value just before the first observation, and
each seasonal term is the two cycles' mean deviation from the line at its phase (the terms sum to zero).
river's recursion then runs over those ``2 * seasonality`` observations. Forecasts need that many
observations: :attr:`AdditiveHoltWinters.is_ready` says when.

>>> model = AdditiveHoltWinters(alpha=0.3, beta=0.01, gamma=0.2, seasonality=4)
>>> for i in range(8):
...     model.learn_one(0.1 * (i % 4) - 0.15)  # standardised-like: the level is about 0
>>> model.is_ready, [round(v, 2) for v in model.forecast(4)]
(True, [-0.15, -0.05, 0.05, 0.15])
"""

from __future__ import annotations

import numpy as np
from river import time_series


class AdditiveHoltWinters(time_series.HoltWinters):
    """river's ``HoltWinters(multiplicative=False)`` started from its first two cycles.

    alpha, beta, gamma: smoothing of the level, trend and seasonal terms (``beta > 0``: river's seasonal
    update needs the trend). seasonality: cycle length in observations (>= 2).
    """

    def __init__(self, alpha: float, beta: float, gamma: float, seasonality: int) -> None:
        if seasonality < 2:
            raise ValueError(f"seasonality must be >= 2, got {seasonality} (no cycle: use river's HoltWinters)")
        if not beta or beta <= 0:
            raise ValueError("beta must be > 0: river's additive seasonal update reads the trend")
        super().__init__(alpha=alpha, beta=beta, gamma=gamma, seasonality=seasonality)

    @property
    def is_ready(self) -> bool:
        """Whether the components are set (after ``2 * seasonality`` observations)."""
        return self._initialized

    def learn_one(self, y: float, x: dict | None = None) -> None:
        if self._initialized:
            super().learn_one(y, x)
            return
        self._first_values.append(y)
        if len(self._first_values) >= 2 * self.seasonality:
            self._initialise()

    def _initialise(self) -> None:
        m = self.seasonality
        first = np.asarray(self._first_values, dtype=float)
        cycle_means = first.reshape(2, m).mean(axis=1)
        trend = (cycle_means[1] - cycle_means[0]) / m
        # the line through each cycle's mean at its middle step
        line = cycle_means[0] + trend * (np.arange(2 * m) - (m - 1) / 2)
        season = (first - line).reshape(2, m).mean(axis=0)
        self.level.append(float(cycle_means[0] - trend * (m + 1) / 2))  # the line one step before the first value
        self.trend.append(float(trend))
        self.season.extend(season.tolist())
        self._initialized = True
        self._first_values = []  # not needed any more: keep the state small
        for y in first.tolist():  # river's own recursion over the values that set the start
            super().learn_one(y)
