"""Sequential conformal calibrators: a registry of vectorised (row x horizon) interval makers.

All share :class:`~tidecast.monitors.conformal.base.Calibrator`: ``update(rows, residuals, mask)`` with the residuals
that matured now, ``interval(rows, means)``, ``export_rows``/``import_rows`` (per-row arrays) and
``get_params`` (JSON). bench/conformal.py measures them side by side; docs/conformal.md has the tables.
"""

from __future__ import annotations

from typing import Any

from tidecast.monitors.conformal.aci import ACI
from tidecast.monitors.conformal.base import Calibrator, ScoreCalibrator
from tidecast.monitors.conformal.dtaci import DtACI
from tidecast.monitors.conformal.pid import ConformalPID
from tidecast.monitors.conformal.saocp import SAOCP
from tidecast.monitors.conformal.sfogd import SFOGD
from tidecast.monitors.conformal.spci import SPCI
from tidecast.monitors.conformal.tracker import QuantileTracker

CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.name: cls for cls in (ConformalPID, QuantileTracker, ACI, DtACI, SFOGD, SAOCP, SPCI)
}

#: The engine's default; chosen by bench/conformal.py (docs/conformal.md): conformal PID with the AR
#: scorecaster has the lowest interval score on every case at target coverage, never an infinite interval.
DEFAULT_CALIBRATOR = ConformalPID.name


def make_calibrator(name: str, horizon: int, alpha: float, **params: Any) -> Calibrator:
    """Build a registered calibrator by name."""
    try:
        cls = CALIBRATORS[name]
    except KeyError:
        raise ValueError(f"unknown calibrator {name!r}; known: {', '.join(sorted(CALIBRATORS))}") from None
    return cls(horizon=horizon, alpha=alpha, **params)


__all__ = [
    "ACI",
    "CALIBRATORS",
    "DEFAULT_CALIBRATOR",
    "SAOCP",
    "SFOGD",
    "SPCI",
    "Calibrator",
    "ConformalPID",
    "DtACI",
    "QuantileTracker",
    "ScoreCalibrator",
    "make_calibrator",
]
