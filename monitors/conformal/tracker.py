"""Quantile tracker (Angelopoulos, Candès & Tibshirani, NeurIPS 2023, "Conformal PID control", the P term).

Each (row, horizon) cell tracks its thresholds by online gradient descent on the pinball loss:
``q <- q + eta * (miss - a)`` with ``miss = 1{score > q}``, ``a = alpha/2`` per side. The step
``eta = lr * scale`` follows the score's magnitude (an exponential mean of |residual|), so the same ``lr`` works on
any unit (the paper's adaptive learning rate). O(1) per step and never infinite, unlike unclipped ACI. This is
:class:`~tidecast.monitors.conformal.pid.ConformalPID` with neither integrator nor scorecaster. Until a cell's first
issued interval is scored (h residuals), its thresholds are the Gaussian quantile on the median ``|r|`` it has seen,
then ``q`` walks from there.

>>> import numpy as np
>>> cal = QuantileTracker(horizon=1, alpha=0.1)
>>> rows = np.array([0])
>>> rng = np.random.default_rng(0)
>>> for _ in range(5000):
...     cal.update(rows, rng.normal(size=(1, 1)), np.ones((1, 1), bool))
>>> lo, hi = cal.interval(rows, np.zeros((1, 1)))
>>> bool(1.3 < hi[0, 0] < 2.0 and -2.0 < lo[0, 0] < -1.3)
True
"""

from __future__ import annotations

from collections.abc import Sequence

from tidecast.monitors.conformal.pid import ConformalPID


class QuantileTracker(ConformalPID):
    """P-only conformal control in residual units."""

    name = "quantile-tracker"

    def __init__(
        self,
        horizon: int,
        alpha: float | Sequence[float] = 0.1,
        lr: float = 0.3,
        scale_decay: float = 0.01,
        symmetric: bool = False,
    ) -> None:
        super().__init__(
            horizon, alpha, lr=lr, scorecaster=None, scale_decay=scale_decay, scale_memory_per_h=0.0,
            mean_memory_per_h=0.0, ki=0.0,
            normalize=False, symmetric=symmetric,
        )
