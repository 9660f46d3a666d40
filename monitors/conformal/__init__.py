"""Sequential conformal calibrators: a registry of vectorised (row x horizon) interval makers."""

from __future__ import annotations

from typing import Any

from monitors.conformal.base import Calibrator
from monitors.conformal.tracker import QuantileTracker

CALIBRATORS: dict[str, type[Calibrator]] = {
    QuantileTracker.name: QuantileTracker,
}

#: The engine's default; chosen by bench/conformal.py (see README).
DEFAULT_CALIBRATOR = QuantileTracker.name


def make_calibrator(name: str, horizon: int, alpha: float, **params: Any) -> Calibrator:
    """Build a registered calibrator by name."""
    try:
        cls = CALIBRATORS[name]
    except KeyError:
        raise ValueError(f"unknown calibrator {name!r}; known: {', '.join(sorted(CALIBRATORS))}") from None
    return cls(horizon=horizon, alpha=alpha, **params)


__all__ = ["CALIBRATORS", "DEFAULT_CALIBRATOR", "Calibrator", "QuantileTracker", "make_calibrator"]
