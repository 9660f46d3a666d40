"""Engine configuration: one dataclass, shared by ``replay``, ``serve`` and the benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from tidecast.monitors.conformal import DEFAULT_CALIBRATOR


@dataclass
class EngineConfig:
    """What the engine does with every series.

    horizon: forecast steps H (ticks of the series' own grid).
    alpha: target miscoverage; intervals aim at ``1 - alpha`` coverage.
    models: model names from :mod:`tidecast.models.registry`, run side by side on every series.
    model_params: per-model keyword overrides, e.g. ``{"seasonal-naive": {"period": 24}}``.
    calibrator / calibrator_params: the conformal method from :mod:`tidecast.monitors.conformal`.
    freq: the grid step (a pandas offset such as ``"1h"``). ``None`` infers it per series from its first two
        observations (the first one is held until the second arrives).
    max_gap: longest run of missing ticks filled by linear interpolation (filled ticks are learned, never scored
        and never forecast from); a longer gap resets the series' model history. ``None`` means ``horizon``.
    max_series: series limit per process; observations of further series are dead-lettered (``unknown_series``).
    allowed_series: if set, only these series are accepted; others are dead-lettered (``unknown_series``).
    coverage_window: effective window (scored forecasts) of the rolling coverage and width gauges.
    maintenance_budget_seconds: time given to deferred model work (fitting, replay training) between batches.
    """

    horizon: int = 24
    alpha: float = 0.1
    models: list[str] = field(default_factory=lambda: ["seasonal-naive"])
    model_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibrator: str = DEFAULT_CALIBRATOR
    calibrator_params: dict[str, Any] = field(default_factory=dict)
    freq: str | None = None
    max_gap: int | None = None
    max_series: int = 100_000
    allowed_series: list[str] | None = None
    coverage_window: int = 1000
    maintenance_budget_seconds: float = 0.05

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not self.models:
            raise ValueError("at least one model is required")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"duplicate model names in {self.models}")
        _ = self.step_ns  # validate freq early

    @property
    def step_ns(self) -> int | None:
        if self.freq is None:
            return None
        step = pd.Timedelta(self.freq).value
        if step <= 0:
            raise ValueError(f"freq must be positive, got {self.freq!r}")
        return int(step)

    @property
    def gap_limit(self) -> int:
        return self.horizon if self.max_gap is None else self.max_gap

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
